"""What the rule engine knows about a series: its first instance's header plus derived facts.

Attribute conditions look at the header of the series' first instance (lowest InstanceNumber);
facts are computed over every instance of the series:

- ``instance_count``: instances in the series; ``frame_count``: frames over all instances
- ``slice_count``: distinct slice positions along the slice normal
- ``orientation``: axial / sagittal / coronal / oblique from ImageOrientationPatient
- ``slice_spacing``: median distance between neighbouring slice positions (mm)
- ``temporal_positions`` (alias ``phases``): distinct TemporalPositionIdentifier values, else images
  per slice position, else distinct TemporalPositionIndex of multi-frame images, else
  NumberOfTemporalPositions / CardiacNumberOfImages as declared
- ``modality``, ``sop_class`` (SOP Class UID), ``manufacturer``
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

ORIENTATION_TOLERANCE = 0.8  # |normal component| needed to call a plane axial/sagittal/coronal


def _floats(value: Any, n: int) -> list[float] | None:
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _iop(ds: Dataset) -> list[float] | None:
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    if iop is None and "SharedFunctionalGroupsSequence" in ds:
        try:
            shared = ds.SharedFunctionalGroupsSequence[0]
            iop = _floats(shared.PlaneOrientationSequence[0].ImageOrientationPatient, 6)
        except (AttributeError, IndexError):
            iop = None
    return iop


def _positions(ds: Dataset) -> list[list[float]]:
    ipp = _floats(ds.get("ImagePositionPatient"), 3)
    if ipp is not None:
        return [ipp]
    out: list[list[float]] = []
    for frame in ds.get("PerFrameFunctionalGroupsSequence", []) or []:
        try:
            pos = _floats(frame.PlanePositionSequence[0].ImagePositionPatient, 3)
        except (AttributeError, IndexError):
            pos = None
        if pos is not None:
            out.append(pos)
    return out


def orientation_of(iop: Sequence[float] | None) -> str | None:
    if iop is None:
        return None
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    if norm == 0:
        return None
    normal = np.abs(normal / norm)
    axis = int(np.argmax(normal))
    if normal[axis] < ORIENTATION_TOLERANCE:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _temporal(headers: Sequence[Dataset], per_position: int) -> int | None:
    ids = {h.get("TemporalPositionIdentifier") for h in headers} - {None, ""}
    if len(ids) > 1:
        return len(ids)
    if per_position > 1:
        # single-frame cine: every slice position holds one image per phase (trigger times differ
        # slightly between slices, so counting distinct TriggerTime values would overcount)
        return per_position
    frames = set()
    for h in headers:
        for f in h.get("PerFrameFunctionalGroupsSequence", []) or []:
            try:
                frames.add(int(f.FrameContentSequence[0].TemporalPositionIndex))
            except (AttributeError, IndexError, TypeError, ValueError):
                continue
    if len(frames) > 1:
        return len(frames)
    first = headers[0]
    for keyword in ("NumberOfTemporalPositions", "CardiacNumberOfImages"):
        try:
            declared = int(first.get(keyword) or 0)
        except (TypeError, ValueError):
            declared = 0
        if declared > 0:
            return declared
    return 1 if headers else None


@dataclass
class SeriesFacts:
    headers: list[Dataset]
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def first(self) -> Dataset:
        return self.headers[0]

    @property
    def series_uid(self) -> str:
        return str(self.first.get("SeriesInstanceUID", "") or "")

    @property
    def study_uid(self) -> str:
        return str(self.first.get("StudyInstanceUID", "") or "")

    def fact(self, name: str) -> Any:
        return self.values.get(FACT_ALIASES.get(name, name))


def _instance_number(ds: Dataset) -> int:
    try:
        return int(ds.get("InstanceNumber") or 0)
    except (TypeError, ValueError):
        return 0


def compute_facts(headers: Sequence[Dataset]) -> SeriesFacts:
    if not headers:
        raise ValueError("a series has at least one instance")
    ordered = sorted(headers, key=_instance_number)
    first = ordered[0]
    iop = next((v for v in (_iop(h) for h in ordered) if v is not None), None)
    normal = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:])) if iop else None
    per_position: dict[float, int] = {}
    if normal is not None:
        for h in ordered:
            for pos in _positions(h):
                key = round(float(np.dot(normal, pos)), 2)
                per_position[key] = per_position.get(key, 0) + 1
    sorted_d = sorted(per_position)
    gaps = [b - a for a, b in pairwise(sorted_d)]
    frames = 0
    for h in ordered:
        try:
            frames += max(1, int(h.get("NumberOfFrames") or 1))
        except (TypeError, ValueError):
            frames += 1
    values = {
        "instance_count": len(ordered),
        "frame_count": frames,
        "slice_count": len(sorted_d) or None,
        "orientation": orientation_of(iop),
        "slice_spacing": round(median(gaps), 3) if gaps else None,
        "temporal_positions": _temporal(ordered, max(per_position.values(), default=0)),
        "modality": (str(first.get("Modality") or "").strip() or None),
        "sop_class": (str(first.get("SOPClassUID") or "").strip() or None),
        "manufacturer": (str(first.get("Manufacturer") or "").strip() or None),
    }
    return SeriesFacts(ordered, values)


FACT_ALIASES = {"phases": "temporal_positions"}
FACTS: frozenset[str] = frozenset(
    {
        "instance_count",
        "frame_count",
        "slice_count",
        "orientation",
        "slice_spacing",
        "temporal_positions",
        "modality",
        "sop_class",
        "manufacturer",
        *FACT_ALIASES,
    }
)


def read_headers(paths: Sequence[Path], on_error: Callable[[Path, str], None] | None = None) -> list[Dataset]:
    """Headers without pixel data; unreadable files are reported to ``on_error`` and skipped."""
    out: list[Dataset] = []
    for path in paths:
        try:
            out.append(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception as exc:  # any unreadable file is skipped, never fatal
            if on_error is not None:
                on_error(path, str(exc))
    return out
