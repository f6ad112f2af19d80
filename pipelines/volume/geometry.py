"""Geometry checks: one orientation, one pixel spacing, positions on a straight, evenly spaced line.

Everything here works on frame headers and plain numpy arrays and refuses with a named reason; the
affine itself is built by ``model.Volume`` from the values checked here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from pipelines.volume.headers import FrameHeader
from pipelines.volume.reasons import Reason, refuse

FloatArray = NDArray[np.float64]

ORIENTATION_TOLERANCE = 1e-3  # max difference of a direction cosine between frames (about 0.06 degrees)
UNIT_TOLERANCE = 1e-3  # |row|, |column| within 1 +- this, |row . column| below it
PIXEL_SPACING_TOLERANCE = 1e-3  # relative difference of PixelSpacing between frames
POSITION_TOLERANCE_MM = 0.02  # two frames closer than this along the normal are at the same position
TILT_TOLERANCE_PIXELS = 0.25  # largest in-plane offset of a slice from the line along the normal


@dataclass(frozen=True)
class Orientation:
    row: FloatArray  # ImageOrientationPatient[0:3], normalised
    column: FloatArray  # ImageOrientationPatient[3:6], normalised
    normal: FloatArray  # row x column


def _fmt(values: Sequence[float] | FloatArray) -> str:
    return "[" + ", ".join(f"{float(v):.6g}" for v in values) + "]"


def _example(frames: Sequence[FrameHeader], count: int = 3) -> str:
    names = [f.describe() for f in frames[:count]]
    more = f" and {len(frames) - count} more" if len(frames) > count else ""
    return ", ".join(names) + more


def common_size(frames: Sequence[FrameHeader]) -> tuple[int, int]:
    sizes = Counter((f.file.rows, f.file.columns) for f in frames)
    if len(sizes) > 1:
        example: dict[tuple[int, int], str] = {}
        for f in frames:
            example.setdefault((f.file.rows, f.file.columns), f.describe())
        listed = "; ".join(
            f"{r}x{c} ({n} frames, e.g. {example[(r, c)]})" for (r, c), n in sizes.most_common()
        )
        raise refuse(
            Reason.MIXED_SIZES, f"frames differ in Rows x Columns: {listed}; a volume needs one size"
        )
    rows, columns = next(iter(sizes))
    return rows, columns


def common_orientation(frames: Sequence[FrameHeader]) -> Orientation:
    missing = [f for f in frames if f.orientation is None]
    if missing:
        raise refuse(
            Reason.NO_GEOMETRY,
            f"ImageOrientationPatient (or PlaneOrientationSequence) is missing on {len(missing)} of "
            f"{len(frames)} frames ({_example(missing)}); a volume needs the orientation of every frame",
        )
    reference = np.array(frames[0].orientation, dtype=np.float64)
    groups: dict[int, list[FrameHeader]] = {}
    representatives: list[FloatArray] = []
    for frame in frames:
        iop = np.array(frame.orientation, dtype=np.float64)
        for index, rep in enumerate(representatives):
            if np.max(np.abs(iop - rep)) <= ORIENTATION_TOLERANCE:
                groups[index].append(frame)
                break
        else:
            representatives.append(iop)
            groups[len(representatives) - 1] = [frame]
    if len(representatives) > 1:
        listed = "; ".join(
            f"{_fmt(rep)} ({len(groups[i])} frames, e.g. {groups[i][0].describe()})"
            for i, rep in enumerate(representatives[:4])
        )
        more = f" and {len(representatives) - 4} more" if len(representatives) > 4 else ""
        raise refuse(
            Reason.MIXED_ORIENTATIONS,
            f"ImageOrientationPatient differs between frames: {listed}{more}; all frames of a volume must "
            f"share one orientation (tolerance {ORIENTATION_TOLERANCE} per direction cosine)",
        )
    row, column = reference[:3], reference[3:]
    row_norm, column_norm = float(np.linalg.norm(row)), float(np.linalg.norm(column))
    dot = float(row @ column) / max(row_norm * column_norm, 1e-12)
    if (
        abs(row_norm - 1) > UNIT_TOLERANCE
        or abs(column_norm - 1) > UNIT_TOLERANCE
        or abs(dot) > UNIT_TOLERANCE
    ):
        raise refuse(
            Reason.INVALID_GEOMETRY,
            f"ImageOrientationPatient {_fmt(reference)} ({frames[0].describe()}) is not two orthogonal unit "
            f"vectors (lengths {row_norm:.6g}, {column_norm:.6g}, dot product {dot:.3g}; tolerance "
            f"{UNIT_TOLERANCE})",
        )
    row = row / row_norm
    column = column / column_norm
    normal = np.cross(row, column)
    normal = normal / np.linalg.norm(normal)
    return Orientation(row=row, column=column, normal=normal)


def common_pixel_spacing(frames: Sequence[FrameHeader]) -> tuple[float, float]:
    missing = [f for f in frames if f.pixel_spacing is None]
    if missing:
        raise refuse(
            Reason.NO_GEOMETRY,
            f"PixelSpacing (or PixelMeasuresSequence) is missing on {len(missing)} of {len(frames)} frames "
            f"({_example(missing)}); a volume needs the pixel spacing in mm",
        )
    spacings = np.array([f.pixel_spacing for f in frames], dtype=np.float64)
    reference = spacings[0]
    if np.any(reference <= 0):
        raise refuse(
            Reason.INVALID_GEOMETRY,
            f"PixelSpacing {_fmt(reference)} ({frames[0].describe()}) must be positive",
        )
    deviation = np.max(np.abs(spacings - reference) / reference, axis=1)
    bad = np.flatnonzero(deviation > PIXEL_SPACING_TOLERANCE)
    if bad.size:
        first = int(bad[0])
        raise refuse(
            Reason.MIXED_PIXEL_SPACING,
            f"PixelSpacing {_fmt(spacings[first])} ({frames[first].describe()}) differs from "
            f"{_fmt(reference)} ({frames[0].describe()}) on {bad.size} frames; a volume needs one pixel "
            f"spacing (relative tolerance {PIXEL_SPACING_TOLERANCE})",
        )
    return float(reference[0]), float(reference[1])


def positions(frames: Sequence[FrameHeader]) -> FloatArray:
    """(N, 3) ImagePositionPatient of each frame."""
    missing = [f for f in frames if f.position is None]
    if missing:
        raise refuse(
            Reason.NO_GEOMETRY,
            f"ImagePositionPatient (or PlanePositionSequence) is missing on {len(missing)} of {len(frames)} "
            f"frames ({_example(missing)}); a volume needs the position of every frame",
        )
    return np.array([f.position for f in frames], dtype=np.float64)


def check_stack(
    ipp: FloatArray,
    where: Sequence[str],
    orientation: Orientation,
    pixel_spacing: tuple[float, float],
    spacing_tolerance: float,
) -> float:
    """Validate a sorted stack of positions (ascending along the normal); return the slice step in mm.

    ``ipp`` is (n, 3) with n >= 2 and distinct positions; ``where`` names each slice for messages.
    Refuses ``gantry_tilt`` (positions not on a line along the normal), ``missing_slices`` (a gap that
    is a whole multiple of the regular step) and ``non_uniform_spacing`` (anything else irregular).
    """
    n = ipp.shape[0]
    d = (ipp - ipp[0]) @ orientation.normal
    in_plane = (ipp - ipp[0]) - np.outer(d, orientation.normal)
    offsets = np.linalg.norm(in_plane, axis=1)
    allowed = TILT_TOLERANCE_PIXELS * min(pixel_spacing)
    worst = int(np.argmax(offsets))
    if offsets[worst] > allowed:
        angle = float(np.degrees(np.arctan2(offsets[worst], abs(d[worst])))) if d[worst] else 90.0
        raise refuse(
            Reason.GANTRY_TILT,
            f"slice positions do not follow the slice normal {_fmt(orientation.normal)}: {where[worst]} is "
            f"offset {offsets[worst]:.3f} mm in-plane from {where[0]} over {d[worst]:.3f} mm along the "
            "normal "
            f"(a tilt or shear of {angle:.2f} degrees); allowed is {allowed:.3f} mm "
            f"({TILT_TOLERANCE_PIXELS} pixel). Tilted-gantry and sheared stacks are not resampled",
        )
    steps = np.diff(d)
    nominal = float(np.median(steps))
    if nominal <= 0:
        raise refuse(
            Reason.INVALID_GEOMETRY, f"slices are not separated along the normal (step {nominal:.4g} mm)"
        )
    for k, step in enumerate(steps):
        ratio = float(step) / nominal
        if abs(ratio - 1) <= spacing_tolerance:
            continue
        multiple = round(ratio)
        if multiple >= 2 and abs(ratio - multiple) <= spacing_tolerance * multiple:
            raise refuse(
                Reason.MISSING_SLICES,
                f"gap of {step:.4g} mm between {where[k]} and {where[k + 1]} (at {d[k]:.4g} and "
                f"{d[k + 1]:.4g} mm along the normal) where the series steps {nominal:.4g} mm: "
                f"{multiple - 1} slice(s) missing; allowed deviation {spacing_tolerance:.0%} of the step",
            )
        raise refuse(
            Reason.NON_UNIFORM_SPACING,
            f"step of {step:.4g} mm between {where[k]} and {where[k + 1]} differs from the series' "
            f"{nominal:.4g} mm by {abs(ratio - 1):.1%}; allowed is {spacing_tolerance:.0%} of the step",
        )
    step = float(d[-1] / (n - 1))
    drift = np.abs(d - step * np.arange(n))
    worst = int(np.argmax(drift))
    if drift[worst] > spacing_tolerance * step:
        raise refuse(
            Reason.NON_UNIFORM_SPACING,
            f"{where[worst]} lies {drift[worst]:.3f} mm from where a regular {step:.4g} mm grid puts it; "
            f"allowed is {spacing_tolerance:.0%} of the step",
        )
    return step


def cluster_positions(d: FloatArray) -> NDArray[np.int64]:
    """Position id per frame: frames closer than POSITION_TOLERANCE_MM along the normal share an id."""
    order = np.argsort(d, kind="stable")
    ids = np.empty(d.shape[0], dtype=np.int64)
    current = 0
    previous = None
    for index in order:
        if previous is not None and d[index] - previous > POSITION_TOLERANCE_MM:
            current += 1
        ids[index] = current
        previous = d[index]
    return ids
