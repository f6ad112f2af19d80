"""Keras HDF5 -> PyTorch state dict + ONNX, with a parity check of the export against PyTorch.

The ONNX graphs keep the spatial input size dynamic (the crops inside the U-Nets are traced as shape
arithmetic), so parity is proven on two small valid input sizes in seconds rather than on the full
patch; the pipeline feeds the full patch the manifest names.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort  # type: ignore[import-untyped]
import torch

from pipelines.liver.keras_h5 import WeightsFileError, state_dict_from_keras
from pipelines.liver.networks import build, count_parameters

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "probability"
# Small input sizes each network accepts (skip crops stay integral); parity is checked on these.
PARITY_SHAPES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "liver": ((81, 54, 54), (108, 81, 54)),
    "lesion": ((100, 92, 54), (108, 100, 62)),
}
EXPECTED_SPACING = {"liver": (3.0, 3.0, 3.0), "lesion": (1.0, 1.0, 3.0)}
ATOL = 1e-4
RTOL = 1e-3


class ParityError(Exception):
    """An exported or reloaded network does not reproduce the reference."""


@dataclass(frozen=True)
class Converted:
    kind: str
    state_dict: Path
    onnx: Path
    parameters: int
    max_abs_diff: float


def parity_inputs(shapes: Sequence[tuple[int, int, int]], seed: int = 0) -> list[npt.NDArray[np.float32]]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-0.5, 0.5, size=(1, 1, *s)).astype(np.float32) for s in shapes]


def torch_outputs(
    module: torch.nn.Module, inputs: list[npt.NDArray[np.float32]]
) -> list[npt.NDArray[np.float32]]:
    with torch.inference_mode():
        return [module(torch.from_numpy(x)).numpy() for x in inputs]


def onnx_session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def compare(
    reference: list[npt.NDArray[np.float32]], other: list[npt.NDArray[np.float32]], what: str
) -> float:
    worst = 0.0
    for ref, got in zip(reference, other, strict=True):
        if ref.shape != got.shape:
            raise ParityError(f"{what}: output shape {got.shape}, expected {ref.shape}")
        diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
        worst = max(worst, float(diff.max()))
        if not np.all(diff <= ATOL + RTOL * np.abs(ref)):
            raise ParityError(
                f"{what}: differs from PyTorch by up to {float(diff.max()):.3g} (allowed {ATOL} + {RTOL}|y|)"
            )
    return worst


def parity(kind: str, module: torch.nn.Module, state_dict: Path, onnx_path: Path) -> float:
    """Max |difference| of ONNX Runtime (and of the reloaded state dict) against ``module``."""
    inputs = parity_inputs(PARITY_SHAPES[kind])
    reference = torch_outputs(module.eval(), inputs)
    reloaded = build(kind)
    reloaded.load_state_dict(torch.load(state_dict, map_location="cpu", weights_only=True), strict=True)
    compare(reference, torch_outputs(reloaded.eval(), inputs), f"{kind}: reloaded {state_dict.name}")
    session = onnx_session(onnx_path)
    onnx_out = [session.run([OUTPUT_NAME], {INPUT_NAME: x})[0] for x in inputs]
    return compare(reference, onnx_out, f"{kind}: onnxruntime on {onnx_path.name}")


def export_onnx(module: torch.nn.Module, example_shape: tuple[int, int, int], path: Path) -> None:
    example = torch.zeros((1, 1, *example_shape))
    spatial = {2: "x", 3: "y", 4: "z"}
    tmp = path.with_name(f".{path.name}.tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and tracer chatter
        torch.onnx.export(
            module.eval(),
            (example,),
            str(tmp),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={
                INPUT_NAME: {0: "batch", **spatial},
                OUTPUT_NAME: {0: "batch", 2: "ox", 3: "oy", 4: "oz"},
            },
        )
    onnx.checker.check_model(str(tmp))
    tmp.replace(path)


def convert(kind: str, weights: Path, dest: Path, stem: str) -> Converted:
    """Write ``dest/<stem>.pt`` (state dict) and ``dest/<stem>.onnx`` from a Keras HDF5 file."""
    state, header = state_dict_from_keras(kind, weights)
    spacing = tuple(header.get("voxel_size", ()))
    if spacing != EXPECTED_SPACING[kind]:
        raise WeightsFileError(
            f"{weights.name}: header voxel_size {spacing}, expected {EXPECTED_SPACING[kind]}"
        )
    module = build(kind)
    module.load_state_dict(state, strict=True)
    module.eval()
    pt = dest / f"{stem}.pt"
    torch.save(state, pt)
    onnx_path = dest / f"{stem}.onnx"
    export_onnx(module, PARITY_SHAPES[kind][0], onnx_path)
    worst = parity(kind, module, pt, onnx_path)
    return Converted(kind, pt, onnx_path, count_parameters(module), worst)
