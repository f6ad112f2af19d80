"""Choose a backend by name: ``torch``, ``onnxruntime`` or ``tensorrt``."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from pipelines.inference.backend import Backend
from pipelines.inference.errors import BackendUnavailable, InferenceError
from pipelines.inference.geometry import OutputGeometry
from pipelines.inference.onnxruntime_backend import OnnxRuntimeBackend, ProviderSpec
from pipelines.inference.tensorrt_backend import INSTALL_HINT, TensorRTBackend
from pipelines.inference.torch_backend import AmpMode, TorchBackend

BACKEND_KINDS = ("torch", "onnxruntime", "tensorrt")
_ALIASES = {"torch": "torch", "pytorch": "torch", "onnxruntime": "onnxruntime", "ort": "onnxruntime",
            "tensorrt": "tensorrt", "trt": "tensorrt"}  # fmt: skip


def backend_status() -> dict[str, str | None]:
    """Per backend kind: None when it can run here, else why not (for logs and `segnode` diagnostics)."""
    status: dict[str, str | None] = {"torch": None, "onnxruntime": None, "tensorrt": None}
    if importlib.util.find_spec("tensorrt") is None:
        status["tensorrt"] = INSTALL_HINT
    elif not torch.cuda.is_available():
        status["tensorrt"] = "the tensorrt backend needs a CUDA GPU, and none is visible"
    return status


def create_backend(
    kind: str,
    *,
    module: torch.nn.Module | None = None,
    onnx_path: str | Path | None = None,
    device: str = "cpu",
    amp: AmpMode | None = None,
    compile: bool = False,
    cuda_graphs: bool = False,
    channels_last: bool = False,
    providers: Sequence[ProviderSpec] | Literal["auto"] = "auto",
    intra_op_threads: int | None = None,
    sessions: int | Literal["auto"] = "auto",
    cache_dir: str | Path | None = None,
    fp16: bool = False,
    max_batch: int = 2,
    input_shape: Sequence[int] | None = None,
    geometry: OutputGeometry | None = None,
) -> Backend:
    """``torch`` needs ``module``; ``onnxruntime`` and ``tensorrt`` need ``onnx_path`` (see ``export_onnx``);
    ``tensorrt`` also ``cache_dir`` for its engines. Options that do not apply to the chosen kind are
    refused rather than silently ignored."""
    resolved = _ALIASES.get(kind.lower())
    if resolved is None:
        raise InferenceError(f"unknown backend {kind!r}; choose one of {', '.join(BACKEND_KINDS)}")
    if resolved == "torch":
        if module is None:
            raise InferenceError("the torch backend needs module=")
        _refuse(
            resolved,
            fp16=fp16,
            providers=providers != "auto",
            cache_dir=cache_dir is not None,
            intra_op_threads=intra_op_threads is not None,
            sessions=sessions != "auto",
        )
        return TorchBackend(
            module,
            device,
            amp=amp,
            compile=compile,
            cuda_graphs=cuda_graphs,
            channels_last=channels_last,
            geometry=geometry,
            input_shape=input_shape,
        )
    if onnx_path is None:
        raise InferenceError(f"the {resolved} backend needs onnx_path= (write one with export_onnx)")
    _refuse(
        resolved, amp=amp is not None, compile=compile, cuda_graphs=cuda_graphs, channels_last=channels_last
    )
    if resolved == "onnxruntime":
        if input_shape is not None:
            raise InferenceError(
                "onnxruntime reads the input shape from the ONNX file; do not pass input_shape"
            )
        trt_cache = Path(cache_dir) / "ort-tensorrt" if cache_dir is not None else None
        device_id = torch.device(device).index or 0
        backend: Backend = OnnxRuntimeBackend(
            onnx_path,
            providers=providers,
            intra_op_threads=intra_op_threads,
            sessions=sessions,
            geometry=geometry,
            device_id=device_id,
            trt_cache_dir=trt_cache,
            trt_fp16=fp16,
        )
        if torch.device(device).type == "cuda" and backend.device == "cpu":
            raise BackendUnavailable(
                f"device {device} asked for, but onnxruntime runs {onnx_path} on the CPU "
                "(no CUDA execution provider: install onnxruntime-gpu)"
            )
        return backend
    if cache_dir is None:
        raise InferenceError("the tensorrt backend needs cache_dir= for its built engines")
    _refuse(
        resolved,
        providers=providers != "auto",
        intra_op_threads=intra_op_threads is not None,
        sessions=sessions != "auto",
    )
    return TensorRTBackend(
        onnx_path,
        cache_dir,
        device=device if device != "cpu" else "cuda",
        fp16=fp16,
        max_batch=max_batch,
        input_shape=input_shape,
        geometry=geometry,
    )


def _refuse(kind: str, **given: bool) -> None:
    bad = [name for name, present in given.items() if present]
    if bad:
        raise InferenceError(f"option(s) {', '.join(bad)} do not apply to the {kind} backend")
