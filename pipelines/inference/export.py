"""Export a PyTorch module to ONNX and prove that onnxruntime reproduces it."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort  # type: ignore[import-untyped]
import torch

from pipelines.inference.errors import ExportParityError, InferenceError

Exporter = Literal["dynamo", "torchscript"]


@dataclass(frozen=True)
class ExportResult:
    path: Path
    exporter: Exporter
    max_abs_diff: float  # onnxruntime (CPU) against the module, on a seeded random batch


class _FirstOutput(torch.nn.Module):
    """Exports one output tensor even when the module returns a tuple (deep supervision heads)."""

    def __init__(self, module: torch.nn.Module, index: int) -> None:
        super().__init__()
        self.module = module
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.module(x)
        if isinstance(y, list | tuple):
            y = y[self.index]
        if not isinstance(y, torch.Tensor):
            raise InferenceError(f"the module returned {type(y).__name__}, expected a tensor")
        return y


def export_onnx(
    module: torch.nn.Module,
    example_shape: Sequence[int],
    path: str | Path,
    *,
    dynamic_batch: bool = True,
    exporter: Exporter = "dynamo",
    opset: int | None = None,
    output_index: int = 0,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    check_batch: int = 2,
    seed: int = 0,
) -> ExportResult:
    """Write ``module`` as ONNX (input ``input``, output ``output``), spatial dims fixed to
    ``example_shape[2:]`` and the batch dim dynamic unless ``dynamic_batch=False``.

    Then runs onnxruntime (CPU) and the module on the same seeded random batch; the file is put in
    place only if every value agrees within ``atol + rtol * |torch|``, else ``ExportParityError``.
    """
    shape = tuple(int(s) for s in example_shape)
    if len(shape) < 3 or any(s < 1 for s in shape):
        raise InferenceError(f"example_shape must be (N, C, *spatial) with positive sizes, got {shape}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    module = module.eval()
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    wrapped = _FirstOutput(module, output_index).eval()
    example = torch.zeros(shape, device=device)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation chatter
            if exporter == "dynamo":
                dims = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
                torch.onnx.export(
                    wrapped,
                    (example,),
                    str(tmp),
                    dynamo=True,
                    input_names=["input"],
                    output_names=["output"],
                    dynamic_shapes=dims,
                    opset_version=opset,
                    external_data=False,
                    verbose=False,
                )
            elif exporter == "torchscript":
                axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
                torch.onnx.export(
                    wrapped,
                    (example,),
                    str(tmp),
                    dynamo=False,
                    input_names=["input"],
                    output_names=["output"],
                    dynamic_axes=axes,
                    opset_version=opset or 17,
                    do_constant_folding=True,
                )
            else:
                raise InferenceError(f"exporter must be 'dynamo' or 'torchscript', got {exporter!r}")

        batch = check_batch if dynamic_batch else shape[0]
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((batch, *shape[1:]), dtype=np.float32)
        with torch.inference_mode():
            ref = wrapped(torch.from_numpy(x).to(device)).float().cpu().numpy()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(tmp), sess_options=options, providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
        if got.shape != ref.shape:
            raise ExportParityError(
                f"{target.name}: onnxruntime returned shape {got.shape}, the module {ref.shape}", float("inf")
            )
        diff = np.abs(got.astype(np.float32) - ref)
        max_diff = float(diff.max())
        if not np.all(diff <= atol + rtol * np.abs(ref)):
            raise ExportParityError(
                f"{target.name}: onnxruntime differs from the module by up to {max_diff:.3g} "
                f"(allowed {atol:g} + {rtol:g}*|value|); the file was not written",
                max_diff,
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(target, exporter, max_diff)
