"""TensorRT backend: an engine built from the ONNX file, cached per model, GPU and TensorRT version.

``tensorrt`` is imported only when this backend is created; where it is absent, creating the backend
raises ``BackendUnavailable`` with what to install. Buffers are torch CUDA tensors, so the engine's
sliding-window loop keeps the whole volume on the GPU.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pipelines.inference.backend import FloatArray, check_batch
from pipelines.inference.errors import BackendUnavailable, InferenceError
from pipelines.inference.geometry import OutputGeometry
from pipelines.inference.torch_backend import resolve_torch_device

INSTALL_HINT = (
    "tensorrt is not installed: pip install tensorrt (a build matching this machine's CUDA), "
    "or use the onnxruntime backend"
)


def import_tensorrt() -> Any:
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        raise BackendUnavailable(f"{INSTALL_HINT} ({exc})") from exc


def engine_cache_key(
    onnx_bytes: bytes,
    gpu_name: str,
    compute_capability: tuple[int, int],
    trt_version: str,
    fp16: bool,
    profile: Sequence[Sequence[int]],
) -> str:
    """Identifies a built engine: the same key means the cached engine is valid on this machine."""
    h = hashlib.sha256(onnx_bytes)
    meta = json.dumps(
        {
            "gpu": gpu_name,
            "cc": list(compute_capability),
            "trt": trt_version,
            "fp16": fp16,
            "profile": [list(s) for s in profile],
        },
        sort_keys=True,
    )
    h.update(meta.encode())
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower()
    return f"{gpu}-trt{trt_version}-{'fp16' if fp16 else 'fp32'}-{h.hexdigest()[:16]}"


class TensorRTBackend:
    def __init__(
        self,
        onnx_path: str | Path,
        cache_dir: str | Path,
        *,
        device: str | torch.device = "cuda",
        fp16: bool = False,
        max_batch: int = 2,
        input_shape: Sequence[int] | None = None,
        geometry: OutputGeometry | None = None,
        workspace_bytes: int = 4 << 30,
    ) -> None:
        trt = import_tensorrt()
        self._trt = trt
        dev = torch.device(device)
        if dev.type != "cuda":
            raise BackendUnavailable(f"the tensorrt backend needs a CUDA device, got {dev}")
        self._device = resolve_torch_device(dev)
        path = Path(onnx_path)
        if not path.is_file():
            raise InferenceError(f"ONNX file {path} does not exist")
        if max_batch < 1:
            raise InferenceError(f"max_batch must be >= 1, got {max_batch}")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        data = path.read_bytes()
        with torch.cuda.device(self._device):
            network_input = self._parse_input_shape(path)
            static_batch = network_input[0] if network_input[0] > 0 else None
            spatial = list(network_input[2:])
            if any(d <= 0 for d in spatial):
                if input_shape is None:
                    raise InferenceError(
                        f"{path} has dynamic spatial dims {network_input}: pass input_shape="
                    )
                spatial = [int(s) for s in input_shape]
            elif input_shape is not None and tuple(input_shape) != tuple(spatial):
                raise InferenceError(f"{path} takes spatial input {tuple(spatial)}, not {tuple(input_shape)}")
            channels = network_input[1]
            if channels <= 0:
                raise InferenceError(f"{path} has a dynamic channel dim; export it with a fixed one")
            self._max_batch = static_batch or max_batch
            self._static_batch = static_batch
            shape_min = (static_batch or 1, channels, *spatial)
            shape_max = (self._max_batch, channels, *spatial)
            props = torch.cuda.get_device_properties(self._device)
            key = engine_cache_key(
                data,
                props.name,
                (props.major, props.minor),
                str(trt.__version__),
                fp16,
                (shape_min, shape_max),
            )
            cache = Path(cache_dir)
            cache.mkdir(parents=True, exist_ok=True)
            self._engine_path = cache / f"{path.stem}-{key}.engine"
            engine = self._load(self._engine_path)
            if engine is None:
                serialized = self._build(path, shape_min, shape_max, fp16, workspace_bytes)
                tmp = self._engine_path.with_suffix(f".tmp{os.getpid()}")
                tmp.write_bytes(serialized)
                os.replace(tmp, self._engine_path)
                engine = self._runtime.deserialize_cuda_engine(serialized)
                if engine is None:
                    raise InferenceError(f"TensorRT could not load the engine it built from {path}")
            self._engine = engine
            self._context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise InferenceError(f"{path}: expected one input and one output, got {inputs} / {outputs}")
        for name in (*inputs, *outputs):
            if engine.get_tensor_dtype(name) != trt.float32:
                raise InferenceError(
                    f"{path}: tensor {name} is {engine.get_tensor_dtype(name)}, expected float32"
                )
        self._in_name, self._out_name = inputs[0], outputs[0]
        self._input_shape = tuple(spatial)
        self._channels = channels
        self._context.set_input_shape(self._in_name, shape_max)
        out_spatial = tuple(int(d) for d in self._context.get_tensor_shape(self._out_name))[2:]
        self._geometry = geometry or OutputGeometry.from_shapes(self._input_shape, out_spatial)
        self._buffers: dict[tuple[int, ...], torch.Tensor] = {}
        self._name = f"tensorrt-{'fp16' if fp16 else 'fp32'}"

    # construction helpers

    def _parse_input_shape(self, path: Path) -> tuple[int, ...]:
        network, _parser = self._parse(path)
        return tuple(int(d) for d in network.get_input(0).shape)

    def _parse(self, path: Path) -> tuple[Any, Any]:
        trt = self._trt
        builder = trt.Builder(self._logger)
        major = int(str(trt.__version__).split(".")[0])
        flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse_from_file(str(path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise InferenceError(f"TensorRT cannot parse {path}: {errors}")
        self._builder = builder
        return network, parser

    def _load(self, engine_path: Path) -> Any:
        if not engine_path.is_file():
            return None
        return self._runtime.deserialize_cuda_engine(engine_path.read_bytes())  # None when stale

    def _build(
        self,
        path: Path,
        shape_min: tuple[int, ...],
        shape_max: tuple[int, ...],
        fp16: bool,
        workspace_bytes: int,
    ) -> bytes:
        trt = self._trt
        network, _parser = self._parse(path)
        builder = self._builder
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        profile.set_shape(network.get_input(0).name, shape_min, shape_max, shape_max)
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise InferenceError(f"TensorRT could not build an engine from {path} (see its log above)")
        return bytes(serialized)

    # the Backend interface

    @property
    def name(self) -> str:
        return self._name

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def torch_device(self) -> torch.device:
        return self._device

    @property
    def geometry(self) -> OutputGeometry:
        return self._geometry

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        return self._input_shape

    @property
    def engine_path(self) -> Path:
        return self._engine_path

    def output_shape_for(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        return self._geometry.output_shape_for(input_shape)

    def predict(self, batch: FloatArray) -> FloatArray:
        check_batch(batch, self._input_shape)
        y = self.predict_tensor(torch.from_numpy(batch).to(self._device))
        out: FloatArray = y.to("cpu").numpy()
        return out

    def predict_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        n = int(batch.shape[0])
        if batch.dtype != torch.float32 or batch.device != self._device:
            raise InferenceError(f"expected float32 on {self._device}, got {batch.dtype} on {batch.device}")
        if tuple(batch.shape[1:]) != (self._channels, *self._input_shape):
            raise InferenceError(
                f"this engine takes (N, {self._channels}, {self._input_shape}), got {tuple(batch.shape)}"
            )
        if n > self._max_batch:
            raise InferenceError(f"batch {n} exceeds the engine's max_batch {self._max_batch}")
        x = batch.contiguous()
        if self._static_batch is not None and n < self._static_batch:
            pad = torch.zeros((self._static_batch - n, *x.shape[1:]), dtype=x.dtype, device=x.device)
            x = torch.cat([x, pad])
        self._context.set_input_shape(self._in_name, tuple(x.shape))
        out_shape = tuple(int(d) for d in self._context.get_tensor_shape(self._out_name))
        out = self._buffers.get(out_shape)
        if out is None:
            out = torch.empty(out_shape, dtype=torch.float32, device=self._device)
            self._buffers[out_shape] = out
        self._context.set_tensor_address(self._in_name, x.data_ptr())
        self._context.set_tensor_address(self._out_name, out.data_ptr())
        stream = torch.cuda.current_stream(self._device)
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise InferenceError("TensorRT execution failed")
        return out[:n]

    def close(self) -> None:
        self._buffers.clear()
