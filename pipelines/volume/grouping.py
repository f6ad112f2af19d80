"""Split frames that share slice positions into phases (separate volumes) or time points (cine).

A series without duplicate positions is one phase with one time point. Where positions repeat, the
first attribute that separates the repeats cleanly decides:

1. ``AcquisitionNumber`` (exact values): multi-phase CT/MR acquired as separate acquisitions -> phases.
2. ``TemporalPositionIndex`` (enhanced) / ``TemporalPositionIdentifier`` (exact values).
3. ``TriggerTime`` / ``NominalCardiacTriggerDelayTime``, then ``ContentTime`` /
   ``FrameAcquisitionDateTime``, then ``AcquisitionTime``: ranked within each position (trigger times
   of a cine differ slightly from slice to slice, so the n-th time at every position is time point n).
4. ``InstanceNumber`` ranked within each position, only where ``CardiacNumberOfImages`` says that
   each position holds that many cardiac phases.

An exact key separates cleanly when every frame has it, it takes as many values as the most repeated
position has frames, and no value repeats a position. A ranked key separates cleanly when every frame
has it, every position holds the same number of frames and no value repeats within a position.

For MR the temporal keys (2-4) are tried before ``AcquisitionNumber`` and, when one of them separates the
frames, the series becomes one cine / dynamic volume (time, slice, row, column). Any other separation
(CT, PET; or MR separated only by ``AcquisitionNumber``) gives phases: one 3D volume each.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import median

import numpy as np
from numpy.typing import NDArray

from pipelines.volume.headers import FrameHeader
from pipelines.volume.reasons import Reason, refuse

CINE_MODALITIES = frozenset({"MR"})

KeyFn = Callable[[FrameHeader], float | None]


@dataclass(frozen=True)
class Phase:
    label: str  # "" when the series is a single phase
    times: list[list[int]]  # frame indices (into the series' frame list) per time point, in time order
    time_key: str  # the attribute that separated time points of a cine volume ("" for 3D)
    trigger_times: tuple[float, ...]  # median trigger time (ms) per time point; empty if unknown


def _exact(
    frames: Sequence[FrameHeader], key: KeyFn, ids: NDArray[np.int64], multiplicity: int
) -> list[list[int]]:
    values = [key(f) for f in frames]
    if any(v is None for v in values):
        return []
    groups: dict[float, list[int]] = defaultdict(list)
    for index, value in enumerate(values):
        assert value is not None
        groups[value].append(index)
    if len(groups) != multiplicity:
        return []
    for members in groups.values():
        if len({int(ids[i]) for i in members}) != len(members):
            return []
    return [groups[value] for value in sorted(groups)]


def _ranked(
    frames: Sequence[FrameHeader], key: KeyFn, ids: NDArray[np.int64], multiplicity: int
) -> list[list[int]]:
    values = [key(f) for f in frames]
    if any(v is None for v in values):
        return []
    by_position: dict[int, list[int]] = defaultdict(list)
    for index, position in enumerate(ids):
        by_position[int(position)].append(index)
    groups: list[list[int]] = [[] for _ in range(multiplicity)]
    for members in by_position.values():
        if len(members) != multiplicity:
            return []
        ordered = sorted(members, key=lambda i: values[i] or 0.0)
        if len({values[i] for i in ordered}) != len(ordered):
            return []
        for rank, index in enumerate(ordered):
            groups[rank].append(index)
    return groups


def _cardiac_instance_number(frames: Sequence[FrameHeader], multiplicity: int) -> KeyFn | None:
    counts = {f.file.cardiac_number_of_images for f in frames}
    if counts != {multiplicity}:
        return None
    return lambda f: None if f.instance_number is None else float(f.instance_number)


def _float_key(attribute: str) -> KeyFn:
    def key(frame: FrameHeader) -> float | None:
        value = getattr(frame, attribute)
        return None if value is None else float(value)

    return key


def split_phases(frames: Sequence[FrameHeader], ids: NDArray[np.int64], modality: str) -> list[Phase]:
    """Phases of the series; each phase lists its frames per time point (see the module docstring)."""
    multiplicity = max(Counter(int(i) for i in ids).values())
    if multiplicity == 1:
        return [Phase(label="", times=[list(range(len(frames)))], time_key="", trigger_times=())]

    temporal_name = (
        "TemporalPositionIndex" if any(f.file.is_enhanced for f in frames) else "TemporalPositionIdentifier"
    )
    acquisition: list[tuple[str, bool, KeyFn | None]] = [
        ("AcquisitionNumber", True, _float_key("acquisition_number"))
    ]
    temporal: list[tuple[str, bool, KeyFn | None]] = [
        (temporal_name, True, _float_key("temporal_position")),
        ("TriggerTime", False, _float_key("trigger_time")),
        ("ContentTime", False, _float_key("content_time")),
        ("AcquisitionTime", False, _float_key("acquisition_time")),
        ("InstanceNumber", False, _cardiac_instance_number(frames, multiplicity)),
    ]
    cine = modality in CINE_MODALITIES
    candidates = temporal + acquisition if cine else acquisition + temporal
    for name, exact, key in candidates:
        if key is None:
            continue
        groups = (_exact if exact else _ranked)(frames, key, ids, multiplicity)
        if not groups:
            continue
        labels = [_label(name, exact, key, frames, members, rank) for rank, members in enumerate(groups)]
        if cine and name != "AcquisitionNumber":
            return [
                Phase(label="", times=groups, time_key=name, trigger_times=_trigger_times(frames, groups))
            ]
        return [
            Phase(label=label, times=[members], time_key="", trigger_times=())
            for label, members in zip(labels, groups, strict=True)
        ]
    raise refuse(Reason.DUPLICATE_POSITIONS, _duplicates_message(frames, ids, multiplicity, temporal_name))


def _label(
    name: str, exact: bool, key: KeyFn, frames: Sequence[FrameHeader], members: list[int], rank: int
) -> str:
    if exact:
        value = key(frames[members[0]])
        assert value is not None
        return f"{name}={int(value) if float(value).is_integer() else value}"
    return f"{name}#{rank + 1}"


def _trigger_times(frames: Sequence[FrameHeader], groups: list[list[int]]) -> tuple[float, ...]:
    result = []
    for members in groups:
        times = [frames[i].trigger_time for i in members]
        if any(t is None for t in times):
            return ()
        result.append(float(median(t for t in times if t is not None)))
    return tuple(result)


def _duplicates_message(
    frames: Sequence[FrameHeader], ids: NDArray[np.int64], multiplicity: int, temporal_name: str
) -> str:
    counts = Counter(int(i) for i in ids)
    repeated = [position for position, count in counts.items() if count > 1]
    example_id = repeated[0]
    members = [frames[int(i)] for i in np.flatnonzero(ids == example_id)]
    where = ", ".join(f.describe() for f in members[:4])
    position = members[0].position or (0.0, 0.0, 0.0)
    types = sorted({f.image_type for f in members if f.image_type})
    hint = f"; they differ in ImageType/FrameType ({' vs '.join(types[:3])})" if len(types) > 1 else ""
    instances = Counter((f.file.sop_instance_uid, f.frame_index) for f in frames if f.file.sop_instance_uid)
    repeats = [key for key, count in instances.items() if count > 1]
    if repeats:
        uid, frame_index = repeats[0]
        copies = ", ".join(
            f.file.path.name for f in frames if (f.file.sop_instance_uid, f.frame_index) == (uid, frame_index)
        )
        hint += (
            f"; {len(repeats)} frame(s) were given more than once, e.g. SOPInstanceUID {uid} in {copies} "
            "(pass one version of each instance)"
        )
    return (
        f"{len(repeated)} slice positions occur more than once (up to {multiplicity} times; e.g. "
        f"[{position[0]:.4g}, {position[1]:.4g}, {position[2]:.4g}] in {where}){hint}. They are not "
        f"separable by AcquisitionNumber, {temporal_name}, TriggerTime, ContentTime or AcquisitionTime into "
        "phases with one frame per position, so no single volume can be built"
    )
