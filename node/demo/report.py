"""Read the measurements back out of a TID 1500 SR (what the PACS would show) and compare a SEG with
reference labels."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from numpy.typing import NDArray


@dataclass(frozen=True)
class Measurement:
    group: str  # the measurement group's Tracking Identifier (the segment's label)
    name: str  # the concept, e.g. "Volume"
    value: float
    unit: str  # UCUM code, e.g. "ml"


def sr_measurements(path: Path) -> list[Measurement]:
    """Every numeric item of each measurement group in a TID 1500 SR."""
    sr = pydicom.dcmread(path)
    out: list[Measurement] = []
    for container in _items(sr.get("ContentSequence", [])):
        for group in _items(container.get("ContentSequence", [])):
            children = list(_items(group.get("ContentSequence", [])))
            label = next(
                (str(c.get("TextValue", "")) for c in children if _concept(c) == "Tracking Identifier"), ""
            )
            for child in children:
                if child.get("ValueType") != "NUM" or not child.get("MeasuredValueSequence"):
                    continue
                value = child.MeasuredValueSequence[0]
                unit = value.MeasurementUnitsCodeSequence[0].CodeValue
                out.append(Measurement(label, _concept(child), float(value.NumericValue), str(unit)))
    return out


def _items(seq: Iterable[Any]) -> Iterable[Any]:
    yield from seq


def _concept(item: Any) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeMeaning) if seq else ""


def format_measurements(items: list[Measurement]) -> str:
    lines = []
    for m in items:
        unit = "" if m.unit.startswith("{") else f" {m.unit}"
        value = f"{m.value:.0f}" if m.unit.startswith("{") else f"{m.value:.1f}"
        lines.append(f"  {m.group:<16} {m.name:<40} {value}{unit}")
    return "\n".join(lines)


def dice(a: NDArray[np.bool_], b: NDArray[np.bool_]) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0
