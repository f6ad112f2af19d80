"""Pre- and post-processing of the pyliverlesionseg liver and lesion nets, and how patches are fed.

Everything takes and returns RAS-canonical ``(X, Y, Z)`` arrays with the voxel size in mm; internally the
liver steps work in LPS as the original code does (``flip`` of the first two axes). The network itself is
any ``PatchPredictor``: a callable from one input patch ``(X, Y, Z)`` float32 to its probability patch.

Liver (3 mm): body crop -> resample to 1.5 mm -> 3x3x3 median -> resample to 3 mm -> normalise (CT:
``clip(HU / 1000, -0.2, 0.2) * 2.5``; MR: min .. min + 0.8 range to -0.5 .. 0.5) -> one patch centred on
the volume -> threshold 0.5 -> erode (18-neighbourhood) -> largest 6-connected component -> dilate ->
linear resampling back into the crop.

Lesions (1 x 1 x 3 mm): normalise (CT as above; MR centred on the liver's median) -> resample image and
liver mask -> dilate the liver twice (18-neighbourhood) -> -0.5 outside it -> crop to its box -> tiles
with 92 x 84 x 42 output blocks (last block aligned to the end) -> threshold 0.5 -> linear resampling
back -> restricted to the liver by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy import ndimage  # type: ignore[import-untyped]

from pipelines.ct_liver.cropping import BBox, crop_ct, crop_mr
from pipelines.ct_liver.resample import zoom3d

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]
PatchPredictor = Callable[[FloatArray], FloatArray]

MODALITIES = ("CT", "MR")
STRUCT_18 = ndimage.generate_binary_structure(3, 2)
STRUCT_6 = ndimage.generate_binary_structure(3, 1)


@dataclass(frozen=True)
class PatchGeometry:
    """A network's fixed input patch, its output block and the input index of output voxel 0."""

    input_patch: tuple[int, int, int]
    output_patch: tuple[int, int, int]
    offset: tuple[int, int, int]


LIVER_SPACING = (3.0, 3.0, 3.0)
LESION_SPACING = (1.0, 1.0, 3.0)
LIVER_PATCH = PatchGeometry((189, 162, 162), (163, 136, 136), (13, 13, 13))
LESION_PATCH = PatchGeometry((180, 172, 86), (92, 84, 42), (44, 44, 22))


class ProcessingError(ValueError):
    """Input the method cannot handle; ``reason`` is the pipeline's refusal reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"modality must be CT or MR, got {modality!r}")


def to_lps(volume: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
    """RAS <-> LPS: flip the first two axes (its own inverse)."""
    return np.ascontiguousarray(volume[::-1, ::-1, :])


def normalise_ct(volume: npt.NDArray[np.generic]) -> FloatArray:
    out: FloatArray = (np.clip(np.asarray(volume, dtype=np.float32) / 1000.0, -0.2, 0.2) * 2.5).astype(
        np.float32
    )
    return out


def normalise_mr_liver(volume: FloatArray) -> FloatArray:
    low = float(np.min(volume))
    high = low + 0.8 * (float(np.max(volume)) - low)
    if high <= low:
        return np.zeros_like(volume, dtype=np.float32)
    out: FloatArray = ((np.clip(volume, low, high) - low) / (high - low) - 0.5).astype(np.float32)
    return out


def normalise_mr_lesion(volume: npt.NDArray[np.generic], liver: BoolArray) -> FloatArray:
    values = np.asarray(volume, dtype=np.float32)[liver]
    if values.size == 0:
        raise ValueError("the liver mask is empty")
    low, high, median = float(values.min()), float(values.max()), float(np.median(values))
    spans = [abs(low - median), abs(high - median)]
    ratio = min(0.5 / s for s in spans if s > 0) if any(s > 0 for s in spans) else 1.0
    out: FloatArray = ((np.asarray(volume, dtype=np.float32) - median) * ratio).astype(np.float32)
    return out


# --- placing patches (DeepVoxNet's sampling, as used by the original predictor) -----------------------


def _axis_window(n: int, centre: int, patch: int) -> tuple[slice, slice]:
    """Image and patch slices when patch index ``patch // 2`` sits on image index ``centre``."""
    first = centre - patch // 2
    lo, hi = max(0, first), min(n, first + patch)
    return slice(lo, hi), slice(lo - first, hi - first)


def predict_at(
    image: FloatArray,
    centre: Sequence[int],
    predictor: PatchPredictor,
    geometry: PatchGeometry,
    out: FloatArray,
) -> None:
    """Run one patch centred (``patch // 2``) on ``centre`` (zeros outside the image) and write its
    output block into ``out`` (image-shaped) where it falls inside the image."""
    patch = np.zeros(geometry.input_patch, dtype=np.float32)
    image_sl, patch_sl = [], []
    for axis in range(3):
        i_sl, p_sl = _axis_window(image.shape[axis], int(centre[axis]), geometry.input_patch[axis])
        image_sl.append(i_sl)
        patch_sl.append(p_sl)
    patch[tuple(patch_sl)] = image[tuple(image_sl)]
    result = np.asarray(predictor(patch), dtype=np.float32)
    if tuple(result.shape) != geometry.output_patch:
        raise ValueError(f"the network returned {result.shape}, expected {geometry.output_patch}")
    dst, src = [], []
    for axis in range(3):
        first = int(centre[axis]) + geometry.offset[axis] - geometry.input_patch[axis] // 2
        size = geometry.output_patch[axis]
        lo, hi = max(0, first), min(image.shape[axis], first + size)
        dst.append(slice(lo, hi))
        src.append(slice(lo - first, hi - first))
    out[tuple(dst)] = result[tuple(src)]


def fill_nearest(values: FloatArray) -> FloatArray:
    """Voxels no output block reached (NaN) take the value of the nearest reached voxel."""
    missing = np.isnan(values)
    if not missing.any():
        return values
    if missing.all():
        raise ValueError("no voxel received a prediction")
    index = ndimage.distance_transform_edt(missing, return_distances=False, return_indices=True)
    filled: FloatArray = values[tuple(index)]
    return filled


def tile_centres(shape: Sequence[int], block: Sequence[int]) -> list[tuple[int, int, int]]:
    """Centres of the output blocks covering ``shape``: blocks from 0 in steps of their size, the last
    aligned to the end; along an axis shorter than the block, one block on its centre.

    DeepVoxNet also runs a block at the last multiple of the step (``range(0, n, step)``) when it does
    not end on the image's end; that block is always overwritten entirely by the end-aligned block that
    follows it in the same order, so it is left out here: the result is the same, with fewer blocks."""
    per_axis: list[list[int]] = []
    for n, b in zip(shape, block, strict=True):
        step = min(int(b), int(n))
        starts = list(range(0, n - step + 1, step))
        if starts[-1] + step < n:
            starts.append(n - step)
        per_axis.append([s + step // 2 for s in starts])
    return [(x, y, z) for x in per_axis[0] for y in per_axis[1] for z in per_axis[2]]


# --- liver ------------------------------------------------------------------------------------------


@dataclass
class LiverInput:
    network_input: FloatArray  # RAS, 3 mm, normalised
    bbox_lps: BBox  # the body crop, in the original (LPS-flipped) grid
    image_shape: tuple[int, int, int]
    notes: list[str] = field(default_factory=list)


def preprocess_liver(image: npt.NDArray[np.generic], voxel: Sequence[float], modality: str) -> LiverInput:
    _check_modality(modality)
    lps = np.asarray(to_lps(np.asarray(image, dtype=np.float32)), dtype=np.float32)
    voxel_arr = np.asarray(voxel, dtype=np.float64)
    try:
        crop = crop_ct(lps, voxel) if modality == "CT" else crop_mr(lps, voxel)
    except ValueError as exc:
        raise ProcessingError("no_body", str(exc)) from None
    cropped = lps[crop.bbox]
    fine = np.asarray(LIVER_SPACING, dtype=np.float64) / 2.0
    resized = zoom3d(cropped, list(voxel_arr / fine))
    smoothed = ndimage.median_filter(resized, size=3)
    coarse = zoom3d(smoothed, list(fine / np.asarray(LIVER_SPACING)))
    normalised = normalise_ct(coarse) if modality == "CT" else normalise_mr_liver(coarse)
    return LiverInput(
        np.ascontiguousarray(to_lps(normalised), dtype=np.float32),
        crop.bbox,
        (int(image.shape[0]), int(image.shape[1]), int(image.shape[2])),
        crop.notes,
    )


def predict_liver(network_input: FloatArray, predictor: PatchPredictor) -> FloatArray:
    """The liver probability on the 3 mm grid: one patch on the volume's centre voxel
    (``ceil((n - 1) / 2)``), the rest filled from the nearest predicted voxel."""
    out = np.full(network_input.shape, np.nan, dtype=np.float32)
    centre = [math.ceil((n - 1) / 2) for n in network_input.shape]
    predict_at(network_input, centre, predictor, LIVER_PATCH, out)
    return fill_nearest(out)


def largest_component(mask: BoolArray) -> BoolArray:
    labels, count = ndimage.label(mask, structure=STRUCT_6)
    if count == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    out: BoolArray = labels == int(np.argmax(sizes))
    return out


def postprocess_liver(probability: FloatArray, liver_input: LiverInput, threshold: float = 0.5) -> BoolArray:
    """Binary liver on the original (RAS) grid; empty when nothing survives the erosion."""
    lps = np.asarray(to_lps(probability), dtype=np.float32) > threshold
    eroded = ndimage.binary_erosion(lps, structure=STRUCT_18)
    largest = largest_component(eroded)
    full = np.zeros(liver_input.image_shape, dtype=bool)
    if not largest.any():
        return full
    dilated = ndimage.binary_dilation(largest, structure=STRUCT_18).astype(np.int16)
    box = liver_input.bbox_lps
    target = [s.stop - s.start for s in box]
    factors = [t / d for t, d in zip(target, dilated.shape, strict=True)]
    # int16 as in the original: linear interpolation rounded, so effectively >= 0.5.
    resized = ndimage.zoom(dilated, factors, order=1, prefilter=False) > 0
    full_lps = np.zeros(liver_input.image_shape, dtype=bool)
    full_lps[box] = resized
    out: BoolArray = np.asarray(to_lps(full_lps), dtype=bool)
    return out


# --- lesions ----------------------------------------------------------------------------------------


@dataclass
class LesionInput:
    network_input: FloatArray  # cropped to the dilated liver's box, 1 x 1 x 3 mm
    region: BoolArray  # the dilated liver inside the crop: blocks without any of it are not run
    bbox: BBox  # of the crop in the resampled grid
    resampled_shape: tuple[int, int, int]
    image_shape: tuple[int, int, int]


def preprocess_lesions(
    image: npt.NDArray[np.generic], voxel: Sequence[float], modality: str, liver: BoolArray
) -> LesionInput:
    _check_modality(modality)
    if not liver.any():
        raise ProcessingError("no_liver", "the liver mask is empty")
    normalised = normalise_ct(image) if modality == "CT" else normalise_mr_lesion(image, liver)
    factors = np.asarray(voxel, dtype=np.float64) / np.asarray(LESION_SPACING)
    resized = zoom3d(normalised, factors)
    liver_resized = zoom3d(liver.astype(np.float32), factors) > 0.5
    if not liver_resized.any():
        raise ProcessingError("liver_too_small", "the liver vanishes when resampled to 1 x 1 x 3 mm")
    dilated = ndimage.binary_dilation(liver_resized, structure=ndimage.iterate_structure(STRUCT_18, 2))
    masked = np.where(dilated, resized, np.float32(-0.5))
    masked = np.clip(masked, -0.5, 0.5).astype(np.float32)
    found = ndimage.find_objects(dilated.astype(np.int8))[0]
    assert found is not None
    bbox: BBox = (found[0], found[1], found[2])
    return LesionInput(
        np.ascontiguousarray(masked[bbox]),
        np.ascontiguousarray(dilated[bbox]),
        bbox,
        (int(resized.shape[0]), int(resized.shape[1]), int(resized.shape[2])),
        (int(image.shape[0]), int(image.shape[1]), int(image.shape[2])),
    )


def predict_lesions(lesion_input: LesionInput, predictor: PatchPredictor) -> tuple[FloatArray, int, int]:
    """Lesion probability on the crop; returns it with the number of blocks run and skipped. A block
    whose output holds no voxel of the dilated liver is not run (its voxels get 0): the result is
    restricted to the liver anyway."""
    image = lesion_input.network_input
    out = np.full(image.shape, np.nan, dtype=np.float32)
    geometry = LESION_PATCH
    run = skipped = 0
    for centre in tile_centres(image.shape, geometry.output_patch):
        block = []
        for axis in range(3):
            first = centre[axis] + geometry.offset[axis] - geometry.input_patch[axis] // 2
            block.append(slice(max(0, first), min(image.shape[axis], first + geometry.output_patch[axis])))
        if not lesion_input.region[tuple(block)].any():
            skipped += 1
            region = out[tuple(block)]
            region[np.isnan(region)] = 0.0
            continue
        predict_at(image, centre, predictor, geometry, out)
        run += 1
    return fill_nearest(out), run, skipped


def postprocess_lesions(
    probability: FloatArray, lesion_input: LesionInput, threshold: float = 0.5
) -> BoolArray:
    """Binary lesions on the original (RAS) grid (not yet restricted to the liver)."""
    padded = np.zeros(lesion_input.resampled_shape, dtype=np.float32)
    padded[lesion_input.bbox] = probability > threshold
    factors = [t / s for t, s in zip(lesion_input.image_shape, padded.shape, strict=True)]
    out: BoolArray = ndimage.zoom(padded, factors, order=1, prefilter=False) > 0
    return out


def count_components(mask: BoolArray) -> tuple[int, list[int]]:
    """Connected components (26-neighbourhood) and their voxel counts, largest first."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return 0, []
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return int(count), sorted((int(s) for s in sizes), reverse=True)
