"""Body crop before the liver net, ported from ``pyliverlesionseg==0.3`` (``crop_ct_image``,
``crop_mr_image``; Apache-2.0, Xikai Tang and Georg Schramm, KU Leuven).

Both take a 3-D array in **LPS** orientation (index grows toward patient Left, Posterior, Superior),
the voxel size in mm, and return the bounding box ``(slice_x, slice_y, slice_z)``.

CT: x/y from the largest connected region of HU > -150 (after one erosion); z from about 20 mm below
the hips (bone profile) to 70 mm above the liver dome (lung air profile); at most 489 x 408 x 408 mm.
MR: z the top 400 mm (+30 mm), x/y the box of the largest region above 1 % of the maximum (the body).
Deviation from the original, which also intersects y with the abdomen's edges found on the y intensity
profile: that edge detector works in voxels (a 61-voxel difference kernel, extrema of order 70, a
100-voxel margin), and on a tightly framed MR (the CHAOS T2 scans: 256 x 256 at 1.25 mm, the body
filling the field of view) it puts the edges up to 35 mm inside the skin, cutting off the body wall next to
the liver; the liver net then misses the liver along it (CHAOS patient 1: Dice 0.854 with the cut, 0.879
without). A body crop is there to drop background, so y is not cut into the body any more; the profile's
edges are used only where no body region is found.

The original loops that relax a threshold until something is found are kept, bounded; where a
heuristic finds nothing at all (e.g. a short series without lungs or hips) the crop falls back to the
whole extent along that axis and says so in ``notes``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy import ndimage  # type: ignore[import-untyped]
from scipy.signal import argrelextrema  # type: ignore[import-untyped]

BBox = tuple[slice, slice, slice]
MAX_SIZE_MM = (489.0, 408.0, 408.0)


@dataclass
class Crop:
    bbox: BBox
    notes: list[str] = field(default_factory=list)


class _NotFound(Exception):
    pass


def _convolve_same(
    values: npt.NDArray[np.generic], kernel: npt.NDArray[np.generic]
) -> npt.NDArray[np.float64]:
    return np.convolve(np.asarray(values, dtype=np.float64), np.asarray(kernel, dtype=np.float64), "same")


def _run_diff(values: npt.NDArray[np.intp]) -> npt.NDArray[np.intp]:
    """``scipy.signal.convolve(values, [1, -1], 'same')``: the first value, then successive differences."""
    out = np.empty_like(values)
    if len(values):
        out[0] = values[0]
        out[1:] = np.diff(values)
    return out


def _largest_region_bbox(mask: npt.NDArray[np.bool_]) -> BBox:
    labels, count = ndimage.label(mask)
    if count == 0:
        raise _NotFound("no connected region")
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    found = ndimage.find_objects(labels)[int(np.argmax(sizes))]
    return (found[0], found[1], found[2])


def _extrema(
    profile: npt.NDArray[np.float64],
    comparator: Callable[[npt.NDArray[np.float64], npt.NDArray[np.float64]], npt.NDArray[np.bool_]],
    order: int,
    step: int,
) -> npt.NDArray[np.intp]:
    """``argrelextrema`` with the order lowered by ``step`` (down to 1) until something is found."""
    while True:
        found: npt.NDArray[np.intp] = argrelextrema(profile, comparator, order=order)[0]
        if len(found) or order == 1:
            if not len(found):
                raise _NotFound("no local extremum in the profile")
            return found
        order = max(1, order - step)


def _clamp_size(box: slice, size_max_mm: float, voxel_mm: float, centre: float, from_centre: bool) -> slice:
    start, stop = int(box.start), int(box.stop)
    extent = stop - start
    if extent * voxel_mm <= size_max_mm:
        return slice(start, stop)
    excess_mm = extent * voxel_mm - size_max_mm
    if from_centre:
        d_start = int(np.ceil((centre - start) / extent * excess_mm / voxel_mm))
        d_stop = int(np.ceil((stop - centre) / extent * excess_mm / voxel_mm))
    else:
        d_start = d_stop = int(np.ceil(excess_mm / (2 * voxel_mm)))
    return slice(start + d_start, stop - d_stop)


def _liver_dome_slice(
    ct2: npt.NDArray[np.float32], voxel: Sequence[float], lung_th: float
) -> tuple[int, tuple[int, int]]:
    """Approximate liver dome slice (from the lungs) and the x/y centre of the air inside the body."""
    ct3 = ct2.copy()
    ct3[:, :, -1] = 0
    air = ct3 < lung_th
    if air.shape[2] > 1:
        air[:, :, :-1] = ndimage.binary_opening(air[:, :, :-1], np.ones((5, 5, 5)))
    padded = np.pad(air, ((3, 3), (3, 3), (0, 0)), mode="constant", constant_values=1)
    labels_padded, count = ndimage.label(padded)
    labels = labels_padded[3:-3, 3:-3, :]
    if count < 3:
        raise _NotFound("fewer than three air regions (no lungs in the field of view)")
    counts = np.bincount(labels.ravel(), minlength=count + 1)[1:].astype(np.int64)
    counts[counts == 0] = -1  # as scipy's labeled_comprehension(..., default=-1) in the original
    volumes = counts * float(np.prod(voxel))
    label_ids = np.arange(1, count + 1)
    ordered = np.sort(volumes)
    background = int(label_ids[volumes == ordered[-1]][0])
    air_abd = (labels != background) & air
    profile = _convolve_same(air_abd.sum(0).sum(0), np.ones(7))
    high, low = float(profile.max()), float(profile.min())
    if high == low:
        raise _NotFound("flat air profile")
    threshold = low + 0.5 * (high - low)
    range_lung = np.where(profile > threshold)[0]
    diff = _run_diff(range_lung)
    run_starts = np.where(diff != 1)[0]
    dome_1 = int(range_lung[0])
    if len(run_starts) > 1:
        gap = profile[range_lung[run_starts[1] - 1] : range_lung[run_starts[1]]]
        if np.any(gap < low + 0.2 * (high - low)):
            dome_1 = int(range_lung[run_starts[1]])
    found_abd = ndimage.find_objects(air_abd.astype(np.int32))
    if not found_abd or found_abd[0] is None:
        raise _NotFound("no air inside the body")
    box_abd = found_abd[0]
    centre = ((box_abd[0].start + box_abd[0].stop + 1) // 2, (box_abd[1].start + box_abd[1].stop + 1) // 2)
    lungs = [int(label_ids[volumes == ordered[-2]][0]), int(label_ids[volumes == ordered[-3]][0])]
    objects = ndimage.find_objects(labels)
    lower_bounds = [objects[lung - 1][2].start for lung in lungs]
    lung_box = objects[lungs[int(np.argmax(lower_bounds))] - 1]
    assert lung_box is not None
    dome_2 = int(lung_box[2].start)
    return max(dome_1, dome_2), centre


def _hip_slice(ct: npt.NDArray[np.float32], dome: int, bone_th: float, bone_hip_ratio: float) -> int:
    bone = (ct > bone_th).astype(np.int16)
    profile = _convolve_same(bone.sum(0).sum(0), np.ones(7))[:dome]
    if len(profile) < 3:
        raise _NotFound("liver dome at the bottom of the volume")
    slice_max = int(np.argmax(profile))
    local_min = _extrema(profile, np.less, 15, 3)
    slice_min = int(local_min[np.argsort(profile[local_min])[0]])
    local_max = _extrema(profile, np.greater, 15, 3)
    order = np.argsort(profile[local_max])
    second_max = int(local_max[order[-2]] if len(order) >= 2 else local_max[order[-1]])
    if slice_min < slice_max and slice_min < second_max:
        slice_min = second_max + int(np.argmin(profile[second_max:]))
    local_max_5 = _extrema(profile, np.greater, 5, 1)
    ratio = bone_hip_ratio
    while True:
        level = ratio * (profile[slice_max] - profile[slice_min]) + profile[slice_min]
        candidates = np.where(profile > level)[0]
        at_maxima = np.intersect1d(local_max_5, candidates)
        if len(candidates) and len(at_maxima):
            break
        if ratio <= 0.05:
            raise _NotFound("no hip candidates in the bone profile")
        ratio = max(ratio - 0.1, 0.05)
    below = at_maxima[at_maxima < slice_min]
    return 0 if len(below) < 2 else int(below[-1])


def crop_ct(
    ct: npt.NDArray[np.float32],
    voxel: Sequence[float],
    size_max_mm: Sequence[float] = MAX_SIZE_MM,
    tissue_th: float = -150,
    lung_th: float = -600,
    bone_th: float = 500,
    bone_hip_ratio: float = 0.7,
    liver_height_max: float = 400,
    liver_dome_margin_mm: float = 70.0,
    hip_margin_mm: float = 20.0,
) -> Crop:
    """The body box of a CT volume in HU (LPS array)."""
    notes: list[str] = []
    body = ndimage.binary_erosion(ct > tissue_th)
    try:
        box1 = _largest_region_bbox(body)
    except _NotFound:
        raise ValueError("no body found in the CT (nothing above -150 HU)") from None
    ct2 = np.full(ct.shape, ct.min(), dtype=np.float32)
    ct2[box1] = ct[box1]
    nz = ct.shape[2]
    centre_xy: tuple[float, float] = (
        (box1[0].start + box1[0].stop) / 2.0,
        (box1[1].start + box1[1].stop) / 2.0,
    )
    try:
        dome, centre = _liver_dome_slice(ct2, voxel, lung_th)
        centre_xy = (float(centre[0]), float(centre[1]))
    except _NotFound as exc:
        dome = nz
        notes.append(f"body crop: liver dome not found ({exc}); keeping the top of the volume")
    try:
        hip = _hip_slice(ct, dome, bone_th, bone_hip_ratio)
    except _NotFound as exc:
        hip = 0
        notes.append(f"body crop: hips not found ({exc}); keeping the bottom of the volume")
    if (dome - hip) * voxel[2] > liver_height_max:
        hip = dome - int(liver_height_max / voxel[2])
    zstart = max(0, hip - int(hip_margin_mm / voxel[2]))
    zend = min(nz, dome + int(liver_dome_margin_mm / voxel[2]))
    # Deviation from the original: the dome estimate is the lowest lung base, and in some patients the
    # liver reaches more than 70 mm above it (e.g. TotalSegmentator's example CT: >= 96 mm, Dice 0.58 with
    # the original window, 0.96 without the top cut). The window is therefore extended upward to the
    # patch's full height (size_max_mm[2]) where the volume allows; long scans are still cut to it.
    zend = max(zend, min(nz, zstart + int(size_max_mm[2] / voxel[2])))
    if zend <= zstart:
        zstart, zend = 0, nz
        notes.append("body crop: empty z range; keeping the whole volume")
    box = (box1[0], box1[1], slice(zstart, zend))
    cropped = ct[box]
    tissue = ndimage.binary_erosion(cropped > tissue_th, np.ones((5, 5, 5)))
    try:
        box2 = _largest_region_bbox(tissue)
        x = slice(box[0].start + box2[0].start, box[0].start + box2[0].stop)
        y = slice(box[1].start + box2[1].start, box[1].start + box2[1].stop)
    except _NotFound:
        x, y = box[0], box[1]
        notes.append("body crop: no soft tissue left after erosion; keeping the first x/y box")
    return Crop(
        (
            _clamp_size(x, size_max_mm[0], voxel[0], centre_xy[0], from_centre=True),
            _clamp_size(y, size_max_mm[1], voxel[1], centre_xy[1], from_centre=True),
            _clamp_z(box[2], size_max_mm[2], voxel[2]),
        ),
        notes,
    )


def _clamp_z(box: slice, size_max_mm: float, voxel_mm: float) -> slice:
    start, stop = int(box.start), int(box.stop)
    extent = stop - start
    if extent * voxel_mm > size_max_mm:
        start += int(np.ceil((extent * voxel_mm - size_max_mm) / voxel_mm))
    return slice(start, stop)


def _mr_y_range(mr: npt.NDArray[np.float32]) -> slice:
    """The anterior/posterior extent of the abdomen from the y intensity profile's edges."""
    n_y = mr.shape[1]
    profile = _convolve_same(np.sum(mr, (0, 2)), np.ones(7))
    edge = _convolve_same(profile, np.concatenate((np.ones(30), np.zeros(1), -np.ones(30))))
    arg_min = int(np.argmin(edge))
    order = 70
    local_max = argrelextrema(edge, np.greater, order=order)[0]
    while len(local_max) <= 1 and order != 2:
        order = max(order - 10, 2)
        local_max = argrelextrema(edge, np.greater, order=order)[0]
    if len(local_max) == 0:
        abd_max = int(np.argmax(edge))
    elif len(local_max) == 1:
        abd_max = int(local_max[0])
    else:
        second = np.sort(edge[local_max])[-2]
        strong = local_max[edge[local_max] > 0.5 * second]
        margin = 100
        candidates = strong[strong < arg_min - margin]
        while len(candidates) < 1 and margin > -n_y:
            margin -= 10
            candidates = strong[strong < arg_min - margin]
        candidates = candidates[candidates < 0.4 * n_y]
        if len(candidates) == 0:
            abd_max = int(np.argmax(edge))
            if abd_max >= 0.4 * n_y:
                abd_max = 0
        elif (
            len(candidates) > 1
            and np.all(edge[candidates[-2] : candidates[-1] + 1] > 0.5 * edge[candidates[-1]])
        ) or (len(candidates) > 1 and edge[candidates[-1]] < 0.5 * edge[candidates[-2]]):
            abd_max = int(candidates[-2])
        else:
            abd_max = int(candidates[-1])
    ratio = 0.45
    starts = np.where(edge < ratio * edge[abd_max])[0]
    starts = starts[starts < abd_max]
    while len(starts) == 0 and ratio < 1.0:
        ratio += 0.05
        starts = np.where(edge < ratio * edge[abd_max])[0]
        starts = starts[starts < abd_max]
    y_start = 0 if len(starts) == 0 else int(starts[-1])
    ratio = 0.6
    ends = np.where(edge > ratio * edge[arg_min])[0]
    ends = ends[ends > arg_min]
    while len(ends) < 1:
        ratio += 0.05
        if ratio > 1.0:
            break
        ends = np.where(edge > ratio * edge[arg_min])[0]
        ends = ends[ends > arg_min]
    if ratio <= 1.0:
        jumps = np.where(_run_diff(ends) > 1)[0]
        if len(jumps) > 1:
            ends = ends[jumps[-1] :]
        y_end = arg_min if len(ends) == 0 else int(ends[0])
    else:
        y_end = n_y
    return slice(y_start, y_end)


def crop_mr(
    mr: npt.NDArray[np.float32],
    voxel: Sequence[float],
    size_max_mm: Sequence[float] = MAX_SIZE_MM,
    tissue_ratio: float = 0.01,
    liver_height_max: float = 400,
    zstart_margin_mm: float = 30.0,
) -> Crop:
    """The body box of an abdominal MR volume (LPS array)."""
    notes: list[str] = []
    nz = mr.shape[2]
    zstart = max(0, nz - int(liver_height_max / voxel[2]) - int(zstart_margin_mm / voxel[2]))
    z = slice(zstart, nz)
    cropped = mr[:, :, z]
    tissue = ndimage.binary_erosion(cropped > tissue_ratio * np.max(cropped), np.ones((5, 5, 5)))
    try:
        box = _largest_region_bbox(tissue)
        x = slice(box[0].start, box[0].stop)
        y = slice(box[1].start, box[1].stop)  # the whole body: see the module's note on the original
    except _NotFound:
        x, y = slice(0, mr.shape[0]), _mr_y_range(mr)
        notes.append(
            "body crop: no tissue region in the MR; keeping the whole x extent, y from the intensity profile"
        )
    if y.stop <= y.start:
        y = slice(0, mr.shape[1])
        notes.append("body crop: empty y range; keeping the whole y extent")
    return Crop(
        (
            _clamp_size(x, size_max_mm[0], voxel[0], 0.0, from_centre=False),
            _clamp_size(y, size_max_mm[1], voxel[1], 0.0, from_centre=False),
            _clamp_z(z, size_max_mm[2], voxel[2]),
        ),
        notes,
    )
