"""Which model label is which cardiac structure, and the SEG segment each becomes.

The bundle's manifest names the labels and codes them in SNOMED CT; the pipeline needs to know which
label is the right ventricle, the LV myocardium and the LV cavity (blood pool) to compute function. A
label is recognised by its SNOMED CT type code first, then by its name (ACDC's ``RV``, ``MYO``, ``LV``).
The segments written to the SEG carry the manifest's codes as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from pydicom.sr.coding import Code

from pipelines.base import PipelineError
from pipelines.bundles.manifest import Code as ManifestCode
from pipelines.bundles.manifest import Label
from pipelines.outputs import SegmentSpec


class Structure(StrEnum):
    RV = "rv"  # right-ventricular cavity
    MYO = "myo"  # left-ventricular myocardium
    LV = "lv"  # left-ventricular cavity (blood pool)


# SNOMED CT type codes (CID 7151) that identify each structure.
_TYPE_CODES: dict[str, Structure] = {
    "53085002": Structure.RV,  # Right ventricle
    "49848007": Structure.MYO,  # Left ventricle myocardium
    "87878005": Structure.LV,  # Left ventricle
}
_NAMES: dict[str, Structure] = {
    "rv": Structure.RV,
    "right ventricle": Structure.RV,
    "right ventricular cavity": Structure.RV,
    "myo": Structure.MYO,
    "myocardium": Structure.MYO,
    "lv myocardium": Structure.MYO,
    "left ventricle myocardium": Structure.MYO,
    "left ventricular myocardium": Structure.MYO,
    "lv": Structure.LV,
    "left ventricle": Structure.LV,
    "lv cavity": Structure.LV,
    "left ventricular cavity": Structure.LV,
}
# Display colours (ACDC/3D Slicer-like): RV red, myocardium green, LV cavity blue.
_COLOURS: dict[Structure, tuple[int, int, int]] = {
    Structure.RV: (206, 58, 58),
    Structure.MYO: (80, 190, 90),
    Structure.LV: (60, 110, 220),
}
# Segment labels in the SEG (the codes are the manifest's).
SEGMENT_LABELS: dict[Structure, str] = {
    Structure.RV: "Right ventricle",
    Structure.MYO: "LV myocardium",
    Structure.LV: "LV cavity",
}
# Segment order in every SEG the pipeline writes (segment numbers 1, 2, 3).
SEGMENT_ORDER: tuple[Structure, ...] = (Structure.RV, Structure.MYO, Structure.LV)


@dataclass(frozen=True)
class StructureLabel:
    structure: Structure
    value: int  # label value in the model output
    spec: SegmentSpec


def _code(code: ManifestCode) -> Code:
    return Code(code.value, code.scheme, code.meaning)


def _identify(label: Label) -> Structure | None:
    if label.type.scheme in ("SCT", "SRT") and label.type.value in _TYPE_CODES:
        by_code = _TYPE_CODES[label.type.value]
        # "Left ventricle" may code the cavity (its usual use) but never the myocardium by name.
        by_name = _NAMES.get(label.name.strip().lower())
        return by_name if by_name is not None and by_code is Structure.LV else by_code
    return _NAMES.get(label.name.strip().lower())


def structure_labels(labels: Sequence[Label]) -> dict[Structure, StructureLabel]:
    """RV, MYO and LV from the manifest's labels; refuses ``model_incompatible`` if one is missing."""
    found: dict[Structure, StructureLabel] = {}
    for label in labels:
        structure = _identify(label)
        if structure is None:
            continue
        if structure in found:
            raise PipelineError(
                "model_incompatible",
                f"labels {found[structure].value} and {label.value} both look like {structure.name}",
            )
        spec = SegmentSpec(
            label=SEGMENT_LABELS[structure],
            category=_code(label.category),
            type=_code(label.type),
            anatomic_region=_code(label.anatomic_region) if label.anatomic_region is not None else None,
            rgb=_COLOURS[structure],
        )
        found[structure] = StructureLabel(structure, label.value, spec)
    missing = [s.name for s in SEGMENT_ORDER if s not in found]
    if missing:
        named = ", ".join(f"{lab.value}={lab.name}" for lab in labels)
        raise PipelineError(
            "model_incompatible",
            f"the model's labels ({named}) do not name {', '.join(missing)}; mri-cardiac needs the right "
            "ventricle, the LV myocardium and the LV cavity",
        )
    return found
