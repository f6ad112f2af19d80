"""The cardiac model from its installed bundle, and segmentation of one phase with it.

Everything the preprocessing needs comes from the bundle's manifest:

- ``input.patch_size`` (X, Y, Z) with a 1 on one axis: a 2D model applied slice by slice on the other
  two axes (a 3D model otherwise);
- ``input.spacing_mm``: the grid the model works on; the in-plane axes of a 2D model (all axes of a 3D
  one) are resampled to it (cubic), the probabilities resampled back (linear) before the argmax;
- ``input.normalisation["MR"].method``: ``zscore`` (over the whole phase volume, as nnU-Net does for MR)
  or ``none``;
- ``output.activation``: ``softmax`` or ``none`` (logits; the argmax is the same), one output channel
  per label plus background;
- ``labels``: which value is RV, LV myocardium, LV cavity (``labels.py``).

Axis convention of the model input: (X, Y, Z) = (column, row, slice) of the DICOM images, the layout
NIfTI converters store a short-axis stack in (and ACDC's images are in); the network sees each image in
its acquisition plane, never reoriented.
"""

from __future__ import annotations

import functools
import importlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import onnx
import torch
import torch.nn.functional as F
from scipy import ndimage  # type: ignore[import-untyped]

from pipelines.base import PipelineError
from pipelines.bundles import Bundle, BundleError, load_bundle
from pipelines.inference.backend import Backend, TensorBackend
from pipelines.inference.errors import BackendUnavailable, InferenceError
from pipelines.inference.factory import create_backend
from pipelines.inference.geometry import OutputGeometry
from pipelines.inference.sliding_window import SlidingWindowConfig, SlidingWindowInferer
from pipelines.mri_cardiac.labels import Structure, StructureLabel, structure_labels

BUNDLE_NAME = "mri-cardiac"
BackendName = Literal["onnxruntime", "torch"]
BACKENDS: tuple[BackendName, ...] = ("onnxruntime", "torch")
NORMALISATIONS = ("zscore", "none")
FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class ModelSpec:
    """What the manifest says about the model's input and output, checked."""

    spacing: tuple[float, float, float]  # (X, Y, Z) mm
    patch: tuple[int, ...]  # the network's spatial window: 2 values (2D) or 3
    slice_axis: int | None  # 2D: the (X, Y, Z) axis the network does not see
    normalisation: str
    activation: Literal["softmax", "none"]
    channels: int
    labels: dict[Structure, StructureLabel]

    @property
    def resampled_axes(self) -> tuple[int, ...]:
        return tuple(a for a in range(3) if a != self.slice_axis)

    @property
    def values(self) -> dict[Structure, int]:
        return {s: label.value for s, label in self.labels.items()}


def model_spec(bundle: Bundle) -> ModelSpec:
    m = bundle.manifest
    problems = []
    if "MR" not in m.modality:
        problems.append(f"modality {m.modality} (pipeline: MR)")
    patch = tuple(int(p) for p in m.input.patch_size)
    ones = [a for a, p in enumerate(patch) if p == 1]
    slice_axis = ones[0] if len(ones) == 1 else None
    if slice_axis not in (None, 2):
        problems.append(f"input.patch_size {patch}: a 2D model works in the image plane (X, Y), size 1 on Z")
    if len(ones) > 1:
        problems.append(
            f"input.patch_size {patch}: at most one axis of size 1 (the slice axis of a 2D model)"
        )
    norm = m.input.normalisation.get("MR")
    method = norm.method if norm is not None else "?"
    if method not in NORMALISATIONS:
        problems.append(f"input.normalisation MR {method!r} (pipeline: {', '.join(NORMALISATIONS)})")
    if m.output.activation not in ("softmax", "none"):
        problems.append(f"output.activation {m.output.activation} (pipeline: softmax or none)")
    if tuple(m.output.patch_size) != patch or any(m.output.offset):
        problems.append(
            f"output patch {m.output.patch_size} offset {m.output.offset} (pipeline: same as input)"
        )
    if m.input.channels != 1:
        problems.append(f"input.channels {m.input.channels} (pipeline: 1)")
    if m.output.channels != max(label.value for label in m.labels) + 1:
        problems.append(
            f"output.channels {m.output.channels} for labels up to {max(lab.value for lab in m.labels)}"
        )
    if problems:
        raise PipelineError(
            "model_incompatible",
            f"bundle {bundle.name} {bundle.version} does not match the mri-cardiac pipeline: "
            + "; ".join(problems),
        )
    activation: Literal["softmax", "none"] = "softmax" if m.output.activation == "softmax" else "none"
    return ModelSpec(
        spacing=(float(m.input.spacing_mm[0]), float(m.input.spacing_mm[1]), float(m.input.spacing_mm[2])),
        patch=tuple(p for a, p in enumerate(patch) if a != slice_axis),
        slice_axis=slice_axis,
        normalisation=method,
        activation=activation,
        channels=m.output.channels,
        labels=structure_labels(m.labels),
    )


def open_bundle(models_dir: Path, version: str | None = None) -> Bundle:
    try:
        return load_bundle(models_dir, BUNDLE_NAME, version)
    except BundleError as exc:
        if exc.reason == "bundle_missing":
            raise PipelineError(
                "model_missing", f"{exc.message}; install it with 'segnode models install {BUNDLE_NAME}'"
            ) from None
        raise PipelineError(
            "model_invalid", f"{exc.message}; reinstall with 'segnode models install {BUNDLE_NAME}'"
        ) from None


def _torch_module(bundle: Bundle) -> torch.nn.Module:
    entry = bundle.manifest.backend("torch")
    assert entry is not None and entry.module is not None  # validated by the manifest
    module_name, _, attr = entry.module.partition(":")
    module: torch.nn.Module = getattr(importlib.import_module(module_name), attr)()
    state = torch.load(bundle.backend_file("torch"), map_location="cpu", weights_only=True)
    module.load_state_dict(state, strict=True)
    return module


def default_backend(bundle: Bundle, device: str) -> BackendName:
    """torch on a GPU when the bundle has it, else onnxruntime."""
    if device != "cpu" and bundle.manifest.backend("torch") is not None:
        return "torch"
    return "onnxruntime"


def create_model_backend(bundle: Bundle, name: BackendName, device: str, threads: int | None) -> Backend:
    try:
        path = bundle.backend_file(name)
        if name == "onnxruntime":
            return create_backend(
                name,
                onnx_path=path,
                device=device,
                providers=["CPUExecutionProvider"] if device == "cpu" else "auto",
                intra_op_threads=threads,
            )
        if threads:
            torch.set_num_threads(threads)
        return create_backend(name, module=_torch_module(bundle), device=device)
    except BundleError as exc:
        raise PipelineError("model_incompatible", exc.message) from None
    except (BackendUnavailable, InferenceError) as exc:
        raise PipelineError("backend_unavailable", f"{name} on {device}: {exc}") from None


def normalise(image: FloatArray, method: str) -> FloatArray:
    """The manifest's intensity normalisation over one phase volume (as the trainer's ``normalise``)."""
    if method == "zscore":
        out: FloatArray = ((image - float(image.mean())) / max(float(image.std()), 1e-8)).astype(np.float32)
        return out
    if method == "none":
        return image.astype(np.float32, copy=False)
    raise PipelineError("model_incompatible", f"unknown normalisation {method!r}")


def resample_image(
    image: FloatArray, spacing: tuple[float, ...], target: tuple[float, ...], axes: tuple[int, ...]
) -> FloatArray:
    """Cubic resampling of ``image`` (X, Y, Z) to ``target`` spacing along ``axes``: what
    ``ndimage.zoom(order=3, mode="nearest")`` (the trainer's resampling) gives, computed axis by axis as
    matrix products (the cubic B-spline zoom is separable and linear along each axis), about 10x faster."""
    factors = [1.0, 1.0, 1.0]
    for a in axes:
        factors[a] = spacing[a] / target[a]
    if all(abs(f - 1.0) < 1e-3 for f in factors):
        return image
    shape = [max(1, round(s * f)) for s, f in zip(image.shape, factors, strict=True)]
    out: npt.NDArray[np.float64] = image.astype(np.float64)
    for axis, (n_in, n_out) in enumerate(zip(image.shape, shape, strict=True)):
        if n_in != n_out:
            moved = np.tensordot(cubic_zoom_matrix(n_in, n_out), out, axes=(1, axis))  # axis first
            out = np.moveaxis(moved, 0, axis)
    return np.ascontiguousarray(out, dtype=np.float32)


def first_argmax(scores: FloatArray) -> npt.NDArray[np.uint8]:
    """``scores.argmax(axis=0)`` (the first channel on ties) as uint8, channel by channel: numpy's
    reduction over the outer axis is slower than K-1 element-wise passes for the few channels here."""
    best = scores[0].copy()
    index = np.zeros(scores.shape[1:], dtype=np.uint8)
    for k in range(1, scores.shape[0]):
        higher = scores[k] > best
        index[higher] = k
        np.maximum(best, scores[k], out=best)
    return index


@functools.lru_cache(maxsize=64)
def cubic_zoom_matrix(n_in: int, n_out: int) -> npt.NDArray[np.float64]:
    """The (n_out, n_in) matrix of ``ndimage.zoom(order=3, mode="nearest")`` along one axis of length
    ``n_in`` to ``n_out``: the zoom is linear, so its columns are the zooms of the unit vectors."""
    if n_in == 1:
        return np.ones((n_out, 1))
    matrix: npt.NDArray[np.float64] = ndimage.zoom(np.eye(n_in), (n_out / n_in, 1.0), order=3, mode="nearest")
    matrix.setflags(write=False)
    return matrix


class _SliceBackend:
    """A 2D backend seen as a 3D one whose windows have size 1 on the first spatial axis, so that one
    sliding-window pass (and each window batch) spans every slice of a phase."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def device(self) -> str:
        return self.inner.device

    @property
    def geometry(self) -> OutputGeometry:
        return OutputGeometry.same()

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        fixed = self.inner.input_shape
        return None if fixed is None else (1, *fixed)

    def output_shape_for(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(int(s) for s in input_shape)

    def predict(self, batch: FloatArray) -> FloatArray:
        out = self.inner.predict(np.ascontiguousarray(batch[:, :, 0]))
        expanded: FloatArray = out[:, :, np.newaxis]
        return expanded

    def close(self) -> None:
        self.inner.close()


class _SliceTensorBackend(_SliceBackend):
    def __init__(self, inner: TensorBackend) -> None:
        super().__init__(inner)
        self.tensor_inner = inner

    @property
    def torch_device(self) -> torch.device:
        return self.tensor_inner.torch_device

    def predict_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        return self.tensor_inner.predict_tensor(batch[:, :, 0].contiguous()).unsqueeze(2)


def _slice_backend(inner: Backend) -> _SliceBackend:
    return _SliceTensorBackend(inner) if isinstance(inner, TensorBackend) else _SliceBackend(inner)


def batch_capacity(bundle: Bundle, name: BackendName, wanted: int) -> int:
    """``wanted`` windows a call when the ONNX file's batch axis is dynamic, else its fixed size."""
    if name != "onnxruntime":
        return wanted
    try:
        graph = onnx.load(str(bundle.backend_file(name)), load_external_data=False).graph
        dim = graph.input[0].type.tensor_type.shape.dim[0]
    except Exception:  # unreadable or not ONNX: one window a call is always accepted
        return 1
    if dim.HasField("dim_value") and dim.dim_value > 0:
        return min(wanted, int(dim.dim_value))
    return wanted


class CardiacModel:
    """An opened cardiac model: ``segment(voxels, spacing)`` for one phase's label map."""

    def __init__(
        self, bundle: Bundle, spec: ModelSpec, backend: Backend, overlap: float, tta: bool, batch: int
    ) -> None:
        self.bundle = bundle
        self.notes: list[str] = []
        #: Seconds spent so far in each stage of ``probabilities``: ``prep`` (resampling and
        #: normalisation), ``net`` (the sliding-window network passes) and ``post`` (resampling the
        #: probabilities back to the image grid).
        self.stage_seconds: dict[str, float] = {"prep": 0.0, "net": 0.0, "post": 0.0}
        self.spec = spec
        self.backend = backend
        if spec.slice_axis is None:
            patch, overlaps, runner = spec.patch, (overlap,) * 3, backend
            flips: tuple[int, ...] = (0, 1, 2)
        else:
            # (slice, a, b): windows of one slice each, batched across slices
            patch, overlaps, runner = (1, *spec.patch), (0.0, overlap, overlap), _slice_backend(backend)
            flips = (1, 2)
        self._inferer = SlidingWindowInferer(
            runner,
            SlidingWindowConfig(
                patch_size=patch,
                overlap=overlaps,
                batch_size=batch,
                activation=spec.activation,
                tta_axes=flips if tta else (),
            ),
        )

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> CardiacModel:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def probabilities(
        self, voxels: FloatArray, spacing: tuple[float, float, float], slices: slice | None = None
    ) -> FloatArray:
        """(slice, row, column) modality values with ``spacing`` (slice, row, column) mm ->
        (K, slice, row, column) probabilities (or logits when the model has no activation).
        ``slices``: predict only those slices; the normalisation still sees the whole phase."""
        t0 = time.perf_counter()
        out: FloatArray = self._probabilities_kxyz(voxels, spacing, slices).numpy().transpose(0, 3, 2, 1)
        self.stage_seconds["post"] += time.perf_counter() - t0
        return out

    def _probabilities_kxyz(
        self, voxels: FloatArray, spacing: tuple[float, float, float], slices: slice | None
    ) -> torch.Tensor:
        """As ``probabilities``, as a (K, column, row, slice) tensor."""
        spec = self.spec
        t0 = time.perf_counter()
        if slices is not None and spec.slice_axis is None:
            voxels, slices = voxels[slices], None  # a 3D model sees only the slices asked for
        xyz = np.ascontiguousarray(voxels.transpose(2, 1, 0), dtype=np.float32)  # (column, row, slice)
        xyz_spacing = (spacing[2], spacing[1], spacing[0])
        image = resample_image(xyz, xyz_spacing, spec.spacing, spec.resampled_axes)
        image = normalise(image, spec.normalisation)
        if slices is not None:
            image, xyz = image[:, :, slices], xyz[:, :, slices]
        size = xyz.shape
        t1 = time.perf_counter()
        self.stage_seconds["prep"] += t1 - t0
        if spec.slice_axis is None:
            probs = torch.from_numpy(self._inferer(image[np.newaxis]))
            t1 = self._net_done(t1)
            if tuple(probs.shape[1:]) != size:
                probs = F.interpolate(probs[None], size=list(size), mode="trilinear", align_corners=False)[0]
        else:
            axis = spec.slice_axis
            stack = np.moveaxis(image, axis, 0)  # (slice, a, b)
            probs = torch.from_numpy(self._inferer(stack[np.newaxis]))  # (K, slice, a, b)
            t1 = self._net_done(t1)
            in_plane = [s for a, s in enumerate(size) if a != axis]
            if list(probs.shape[2:]) != in_plane:
                probs = F.interpolate(
                    probs.transpose(0, 1), size=in_plane, mode="bilinear", align_corners=False
                )
                probs = probs.transpose(0, 1)
            probs = torch.movedim(probs, 1, axis + 1)  # (K, X, Y, Z)
        self.stage_seconds["post"] += time.perf_counter() - t1
        return probs

    def _net_done(self, started: float) -> float:
        now = time.perf_counter()
        self.stage_seconds["net"] += now - started
        return now

    def segment(
        self, voxels: FloatArray, spacing: tuple[float, float, float], slices: slice | None = None
    ) -> npt.NDArray[np.uint8]:
        """(slice, row, column) label map of one phase (of ``slices`` only when given), before
        post-processing."""
        probabilities = self._probabilities_kxyz(voxels, spacing, slices)
        t0 = time.perf_counter()
        labels = first_argmax(probabilities.numpy()).transpose(2, 1, 0).copy()
        self.stage_seconds["post"] += time.perf_counter() - t0
        return labels


def open_model(
    models_dir: Path,
    backend: BackendName | None = None,
    device: str = "cpu",
    threads: int | None = None,
    overlap: float = 0.5,
    tta: bool = False,
    batch: int = 4,
) -> CardiacModel:
    bundle = open_bundle(models_dir)
    spec = model_spec(bundle)
    name = backend or default_backend(bundle, device)
    if name not in BACKENDS:
        raise PipelineError(
            "invalid_parameter", f"backend must be one of {', '.join(BACKENDS)}, not {name!r}"
        )
    notes: list[str] = []
    try:
        backend_ = create_model_backend(bundle, name, device, threads)
    except PipelineError as exc:
        if exc.reason != "backend_unavailable" or backend is not None or device == "cpu":
            raise
        # a GPU node without onnxruntime's CUDA provider, for a bundle without torch weights
        notes.append(f"{exc.message}; ran {name} on the CPU instead")
        backend_ = create_model_backend(bundle, name, "cpu", threads)
    model = CardiacModel(bundle, spec, backend_, overlap, tta, batch_capacity(bundle, name, batch))
    model.notes.extend(notes)
    return model
