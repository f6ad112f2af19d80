"""Series -> volume(s): read headers, validate, split phases, sort, read pixels, say what was done.

Order of work: headers of all files (cheap); pixel format, series, size, orientation and pixel spacing
checks over all frames; phase / time point split; then for each phase that is to be loaded the stack
checks (slice count, tilt, spacing, gaps, time point consistency, frame of reference) and only then the
pixel data. A refusal therefore never costs a full pixel read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from pipelines.volume.geometry import (
    Orientation,
    check_stack,
    cluster_positions,
    common_orientation,
    common_pixel_spacing,
    common_size,
    positions,
)
from pipelines.volume.grouping import Phase, split_phases
from pipelines.volume.headers import FileHeader, FrameHeader, read_headers
from pipelines.volume.model import SeriesVolumes, SourceFrame, Volume, select_index
from pipelines.volume.pixels import SUPPORTED_BITS, read_frames
from pipelines.volume.reasons import Reason, refuse

DEFAULT_MIN_SLICES = 3
DEFAULT_SPACING_TOLERANCE = 0.05  # fraction of the slice step
ACCEPTED_PHOTOMETRIC = ("MONOCHROME2", "MONOCHROME1")


@dataclass(frozen=True)
class SeriesPlan:
    """Everything known from the headers, before any pixel is read."""

    frames: list[FrameHeader]
    position_ids: NDArray[np.int64]
    distances: NDArray[np.float64]  # ImagePositionPatient . normal per frame
    orientation: Orientation
    pixel_spacing: tuple[float, float]
    size: tuple[int, int]
    modality: str
    phases: list[Phase]
    notes: list[str]

    @property
    def phase_labels(self) -> list[str]:
        return [p.label for p in self.phases]


def load_series(
    files: Sequence[Path],
    *,
    phase: int | str | None = None,
    min_slices: int = DEFAULT_MIN_SLICES,
    spacing_tolerance: float = DEFAULT_SPACING_TOLERANCE,
    multi_series: bool = False,
) -> SeriesVolumes:
    """Load every phase of a series (or only ``phase``: an index, "first", "last" or a phase label).

    ``multi_series``: accept files of several series of one study (e.g. a cine acquired as one series
    per slice location) and build one volume from them; see ``plan_series``.
    Refuses with ``pipelines.base.PipelineError`` (reasons in ``pipelines.volume.reasons.Reason``).
    """
    plan = plan_series(files, multi_series=multi_series)
    labels = plan.phase_labels
    indices = range(len(plan.phases)) if phase is None else [select_index(labels, phase)]
    volumes = [build_volume(plan, plan.phases[i], min_slices, spacing_tolerance) for i in indices]
    return SeriesVolumes(volumes=volumes, phase_labels=labels, notes=list(plan.notes))


def load_volume(
    files: Sequence[Path],
    *,
    phase: int | str | None = None,
    min_slices: int = DEFAULT_MIN_SLICES,
    spacing_tolerance: float = DEFAULT_SPACING_TOLERANCE,
) -> Volume:
    """One volume: the series' only phase, or ``phase``; refuses ``multiple_phases`` when ambiguous."""
    plan = plan_series(files)
    chosen = plan.phases[select_index(plan.phase_labels, phase)]
    return build_volume(plan, chosen, min_slices, spacing_tolerance)


def plan_series(files: Sequence[Path], *, multi_series: bool = False) -> SeriesPlan:
    """Read and check all headers, and split the series into phases; reads no pixel data.

    With ``multi_series`` the files may belong to several series of one study (a study-level rule
    gathering e.g. one cine series per slice location); they must still share one orientation, size
    and pixel spacing, and their positions must form one stack. The volume then names the series of
    its first slice; each ``SourceFrame`` keeps its own instance.
    """
    if not files:
        raise refuse(Reason.NO_FILES, "no files were given; a series needs at least one instance")
    notes: list[str] = []
    frames = read_headers([Path(f) for f in files], notes)
    file_headers = list({id(f.file): f.file for f in frames}.values())
    _check_pixel_format(file_headers)
    if multi_series:
        _check_one_study(file_headers, notes)
    else:
        _check_one_series(file_headers)
    size = common_size(frames)
    orientation = common_orientation(frames)
    pixel_spacing = common_pixel_spacing(frames)
    ipp = positions(frames)
    distances = ipp @ orientation.normal
    ids = cluster_positions(distances)
    modality = Counter(f.modality for f in file_headers).most_common(1)[0][0]
    phases = split_phases(frames, ids, modality)
    if len(phases) > 1:
        notes.append(
            f"series split into {len(phases)} phases with duplicate slice positions: "
            + ", ".join(p.label for p in phases)
        )
    notes.extend(_uid_notes(file_headers))
    return SeriesPlan(
        frames=frames,
        position_ids=ids,
        distances=distances,
        orientation=orientation,
        pixel_spacing=pixel_spacing,
        size=size,
        modality=modality,
        phases=phases,
        notes=notes,
    )


def build_volume(plan: SeriesPlan, phase: Phase, min_slices: int, spacing_tolerance: float) -> Volume:
    """Check one phase's stack and read its pixels into a ``Volume``."""
    frames = plan.frames
    named = f" in phase {phase.label}" if phase.label else ""
    first = sorted(phase.times[0], key=lambda i: float(plan.distances[i]))
    n = len(first)
    if n < min_slices:
        raise refuse(
            Reason.TOO_FEW_SLICES,
            f"{n} slice position(s){named}; at least {min_slices} are required for a volume",
        )
    notes = list(plan.notes)
    stack = [frames[i] for i in first]
    ipp = positions(stack)
    where = [f.describe() for f in stack]
    if n >= 2:
        step = check_stack(ipp, where, plan.orientation, plan.pixel_spacing, spacing_tolerance)
    else:
        step = _single_slice_step(stack[0], notes)
    ordered = [first]
    for t, members in enumerate(phase.times[1:], start=1):
        ordered.append(_same_positions(plan, phase, first, members, t))
    used = [frames[i] for order in ordered for i in order]
    _frame_of_reference(used, is_cine=len(ordered) > 1, notes=notes)
    notes.extend(_rescale_notes(used))
    notes.extend(_volume_notes(stack, step))
    if len(ordered) > 1:
        notes.append(
            f"cine: {len(used)} frames as {len(ordered)} time points x {n} slices, time points separated by "
            f"{phase.time_key}"
        )
    rows, columns = plan.size
    shape: tuple[int, ...] = (len(ordered), n, rows, columns) if len(ordered) > 1 else (n, rows, columns)
    voxels = np.empty(shape, dtype=np.float32)
    read_frames(used, voxels.reshape(len(used), rows, columns), notes)
    reference = stack[0].file
    return Volume(
        voxels=voxels,
        origin=ipp[0].copy(),
        row_direction=plan.orientation.row,
        column_direction=plan.orientation.column,
        slice_direction=plan.orientation.normal,
        spacing=(step, plan.pixel_spacing[0], plan.pixel_spacing[1]),
        sources=tuple(tuple(_source(frames[i]) for i in order) for order in ordered),
        frame_of_reference_uid=reference.frame_of_reference_uid,
        study_instance_uid=reference.study_instance_uid,
        series_instance_uid=reference.series_instance_uid,
        modality=plan.modality,
        phase_label=phase.label,
        trigger_times=phase.trigger_times if len(ordered) > 1 else (),
        notes=notes,
    )


def _source(frame: FrameHeader) -> SourceFrame:
    return SourceFrame(
        sop_class_uid=frame.file.sop_class_uid,
        sop_instance_uid=frame.file.sop_instance_uid,
        frame_number=frame.frame_number,
        path=frame.file.path,
    )


def _same_positions(
    plan: SeriesPlan, phase: Phase, first: list[int], members: list[int], t: int
) -> list[int]:
    order = sorted(members, key=lambda i: float(plan.distances[i]))
    expected = [int(plan.position_ids[i]) for i in first]
    found = [int(plan.position_ids[i]) for i in order]
    if found != expected:
        missing = sorted(set(expected) - set(found))
        detail = f"{len(missing)} of its slice positions are missing" if missing else "its positions differ"
        raise refuse(
            Reason.INCONSISTENT_TIME_POINTS,
            f"time point {t + 1} ({phase.time_key} rank {t + 1}) has {len(found)} slices where time point 1 "
            f"has {len(expected)}; {detail}. A cine volume needs every slice position at every time point",
        )
    return order


def _check_pixel_format(files: list[FileHeader]) -> None:
    for info in files:
        if info.samples_per_pixel != 1 or info.photometric not in ACCEPTED_PHOTOMETRIC:
            raise refuse(
                Reason.UNSUPPORTED_PHOTOMETRIC,
                f"{info.path.name}: PhotometricInterpretation {info.photometric!r} with SamplesPerPixel "
                f"{info.samples_per_pixel}; only grayscale images ({', '.join(ACCEPTED_PHOTOMETRIC)}, one "
                "sample per pixel) can be loaded",
            )
        if info.bits_allocated not in SUPPORTED_BITS or info.rows <= 0 or info.columns <= 0:
            raise refuse(
                Reason.UNSUPPORTED_PIXEL_FORMAT,
                f"{info.path.name}: BitsAllocated {info.bits_allocated}, Rows {info.rows}, Columns "
                f"{info.columns}; supported are BitsAllocated {', '.join(map(str, SUPPORTED_BITS))} and a "
                "non-empty image",
            )
        if info.has_modality_lut:
            raise refuse(
                Reason.UNSUPPORTED_MODALITY_LUT,
                f"{info.path.name}: a Modality LUT Sequence is present; only RescaleSlope/RescaleIntercept "
                "(linear) modality transforms are supported",
            )


def _check_one_series(files: list[FileHeader]) -> None:
    series = Counter(info.series_instance_uid for info in files)
    if len(series) > 1:
        listed = "; ".join(f"{uid or '(empty)'} ({count} files)" for uid, count in series.most_common(4))
        raise refuse(
            Reason.MIXED_SERIES,
            f"the files belong to {len(series)} series: {listed}; a volume is built from one series",
        )


def _check_one_study(files: list[FileHeader], notes: list[str]) -> None:
    studies = Counter(info.study_instance_uid for info in files)
    if len(studies) > 1:
        listed = "; ".join(f"{uid or '(empty)'} ({count} files)" for uid, count in studies.most_common(4))
        raise refuse(
            Reason.MIXED_SERIES,
            f"the files belong to {len(studies)} studies: {listed}; series are gathered within one study",
        )
    series = Counter(info.series_instance_uid for info in files)
    if len(series) > 1:
        notes.append(f"{len(series)} series of one study gathered into one volume")


def _uid_notes(files: list[FileHeader]) -> list[str]:
    notes = []
    fallbacks = Counter(keyword for info in files for keyword in info.uid_fallbacks)
    for keyword, count in sorted(fallbacks.items()):
        notes.append(
            f"{keyword} empty in {count} of {len(files)} instances: the file meta information's "
            f"MediaStorage{keyword} was used"
        )
    for label, attribute in (
        ("SOPInstanceUID", "sop_instance_uid"),
        ("SOPClassUID", "sop_class_uid"),
        ("StudyInstanceUID", "study_instance_uid"),
        ("SeriesInstanceUID", "series_instance_uid"),
    ):
        empty = sum(1 for info in files if not getattr(info, attribute))
        if empty:
            notes.append(f"{label} empty in {empty} of {len(files)} instances: kept as an empty string")
    return notes


def _frame_of_reference(frames: list[FrameHeader], is_cine: bool, notes: list[str]) -> None:
    uids = Counter(f.file.frame_of_reference_uid for f in frames)
    if len(uids) == 1:
        if not next(iter(uids)):
            notes.append("FrameOfReferenceUID is empty: kept as an empty string")
        return
    reference = frames[0].file.frame_of_reference_uid
    if is_cine:
        notes.append(
            f"{len(uids)} different FrameOfReferenceUIDs in one cine stack whose geometry is consistent: "
            f"tolerated, {reference!r} (slice 1, time point 1) used"
        )
        return
    listed = "; ".join(f"{uid or '(empty)'} ({count} frames)" for uid, count in uids.most_common(3))
    raise refuse(
        Reason.MIXED_FRAMES_OF_REFERENCE,
        f"{len(uids)} FrameOfReferenceUIDs in one stack: {listed}; positions in different frames of "
        "reference cannot be combined into one volume",
    )


def _rescale_notes(frames: list[FrameHeader]) -> list[str]:
    notes = []
    no_slope = sum(1 for f in frames if f.slope is None)
    no_intercept = sum(1 for f in frames if f.intercept is None)
    if no_slope and no_slope == no_intercept:
        notes.append(
            f"RescaleSlope/RescaleIntercept missing on {no_slope} of {len(frames)} frames: identity "
            "(slope 1, intercept 0) used"
        )
    else:
        if no_slope:
            notes.append(f"RescaleSlope missing on {no_slope} of {len(frames)} frames: 1 used")
        if no_intercept:
            notes.append(f"RescaleIntercept missing on {no_intercept} of {len(frames)} frames: 0 used")
    return notes


def _volume_notes(stack: list[FrameHeader], step: float) -> list[str]:
    notes = []
    photometric = {f.file.photometric for f in stack}
    if "MONOCHROME1" in photometric:
        notes.append(
            "MONOCHROME1 frames: modality values are kept as they are (display inversion not applied)"
        )
    tilts = sorted(
        {f.file.gantry_tilt for f in stack if f.file.gantry_tilt is not None and f.file.gantry_tilt}
    )
    if tilts:
        listed = ", ".join(f"{t:g}" for t in tilts)
        notes.append(
            f"GantryDetectorTilt {listed} degrees, but slice positions lie along the slice normal "
            "(reconstructed without tilt): accepted"
        )
    declared = sorted({f.spacing_between_slices for f in stack if f.spacing_between_slices is not None})
    if len(stack) > 1 and declared and all(abs(abs(s) - step) > 0.01 * step for s in declared):
        listed = ", ".join(f"{s:g}" for s in declared)
        notes.append(
            f"SpacingBetweenSlices {listed} mm disagrees with the {step:.4g} mm step of the positions: "
            "the positions were used"
        )
    return notes


def _single_slice_step(frame: FrameHeader, notes: list[str]) -> float:
    for name, value in (
        ("SpacingBetweenSlices", frame.spacing_between_slices),
        ("SliceThickness", frame.slice_thickness),
    ):
        if value is not None and value > 0:
            notes.append(f"single slice: slice spacing {value:g} mm taken from {name}")
            return float(value)
    notes.append("single slice without SpacingBetweenSlices or SliceThickness: slice spacing 1 mm assumed")
    return 1.0
