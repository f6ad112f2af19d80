"""Cardiac function from label maps over the phases of a cine stack.

Volumes are voxel counts times the voxel volume (slice step x pixel spacing: the disc summation of
Simpson's method on a short-axis stack). ED is the phase with the largest LV cavity, ES the one with the
smallest; the right ventricle is measured at the same two phases. Stroke volume = EDV - ESV, ejection
fraction = SV / EDV, LV myocardial mass = myocardium volume at ED x 1.05 g/ml.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage  # type: ignore[import-untyped]

from pipelines.base import PipelineError
from pipelines.mri_cardiac.labels import Structure

MYOCARDIAL_DENSITY_G_PER_ML = 1.05
BoolArray = npt.NDArray[np.bool_]
LabelArray = npt.NDArray[np.uint8]


def largest_component(mask: BoolArray) -> BoolArray:
    """The largest 3D connected component (26-connectivity); an empty mask stays empty."""
    if not mask.any():
        return mask
    components, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    keep: BoolArray = components == int(np.argmax(sizes))
    return keep


def _bounding_box(mask: BoolArray, grow: tuple[int, ...]) -> tuple[slice, ...]:
    """Slices of the smallest box holding every True voxel of ``mask`` (not empty), grown by ``grow``
    voxels per axis and clipped to the array."""
    box = []
    for axis, size in enumerate(mask.shape):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(0, int(hits[0]) - grow[axis]), min(size, int(hits[-1]) + 1 + grow[axis])))
    return tuple(box)


def _component_touching(mask: BoolArray, anchor: BoolArray) -> BoolArray:
    """The connected component of ``mask`` sharing the longest border with ``anchor`` (in-plane
    neighbours); the largest component where none touches it."""
    if not mask.any():
        return mask
    components, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    if anchor.any():
        in_plane = np.zeros((3,) * mask.ndim, dtype=bool)
        in_plane[1] = True  # neighbours within the slice (axis 0 is the slice axis)
        # dilated within the anchor's bounding box grown by one voxel in-plane: all it can reach
        box = _bounding_box(anchor, grow=(0,) + (1,) * (mask.ndim - 1))
        near_anchor = ndimage.binary_dilation(anchor[box], structure=in_plane)
        contact = np.bincount(components[box][near_anchor], minlength=count + 1)
        contact[0] = 0
        if contact.max() > 0:
            keep: BoolArray = components == int(np.argmax(contact))
            return keep
    largest: BoolArray = components == int(np.argmax(sizes))
    return largest


def clean_labels(labels: LabelArray, values: Mapping[Structure, int]) -> LabelArray:
    """Post-processing of one phase (slice, row, column): the myocardium keeps its largest 3D connected
    component; the LV cavity and the RV keep the component that borders that myocardium most (the
    largest where none does), so that a bright structure elsewhere (fat, another blood pool) cannot
    outvote the heart; holes in the LV cavity are filled slice by slice (papillary muscles belong to the
    blood pool, as in ACDC). Dropped voxels become background.

    The work is done on the bounding box of the labelled voxels grown by one voxel: components,
    contacts and holes are the same there as in the whole image (the one-voxel ring is background
    that reaches the image border), and the heart is a small part of a cine field of view."""
    if not labels.any():
        return np.zeros_like(labels)
    box = _bounding_box(labels != 0, grow=(1,) * labels.ndim)
    out = np.zeros_like(labels)
    out[box] = _clean_box(labels[box], values)
    return out


def _clean_box(labels: LabelArray, values: Mapping[Structure, int]) -> LabelArray:
    out = np.zeros_like(labels)
    myo = largest_component(labels == values[Structure.MYO])
    out[myo] = values[Structure.MYO]
    for structure in (Structure.LV, Structure.RV):
        out[_component_touching(labels == values[structure], myo)] = values[structure]
    lv = out == values[Structure.LV]
    if lv.any():
        filled = np.stack([ndimage.binary_fill_holes(s) for s in lv])
        out[filled & ~lv] = values[Structure.LV]
    return out


@dataclass(frozen=True)
class PhaseVolumes:
    """Volumes in ml of each structure at one phase."""

    phase: int
    rv_ml: float
    myo_ml: float
    lv_ml: float


def phase_volumes(
    labels: LabelArray, values: Mapping[Structure, int], voxel_ml: float, phase: int
) -> PhaseVolumes:
    counts = np.bincount(labels.ravel(), minlength=max(values.values()) + 1)
    return PhaseVolumes(
        phase=phase,
        rv_ml=float(counts[values[Structure.RV]]) * voxel_ml,
        myo_ml=float(counts[values[Structure.MYO]]) * voxel_ml,
        lv_ml=float(counts[values[Structure.LV]]) * voxel_ml,
    )


def voxel_volume_ml(spacing: Sequence[float]) -> float:
    return float(np.prod([float(s) for s in spacing])) / 1000.0


def pick_ed_es(volumes: Sequence[PhaseVolumes]) -> tuple[int, int]:
    """(ED, ES) phase indices: largest and smallest LV cavity (the earlier phase on ties)."""
    if len(volumes) < 2:
        raise PipelineError("too_few_phases", "ED and ES need at least two segmented phases")
    lv = [v.lv_ml for v in volumes]
    ed = volumes[int(np.argmax(lv))].phase
    es = volumes[int(np.argmin(lv))].phase
    if lv[int(np.argmax(lv))] <= 0.0:
        raise PipelineError("no_left_ventricle", "no LV cavity was found in any phase")
    if ed == es:
        raise PipelineError(
            "no_contraction",
            "the LV cavity has the same volume in every phase: ED and ES cannot be told apart",
        )
    return ed, es


@dataclass(frozen=True)
class CardiacFunction:
    ed_phase: int
    es_phase: int
    lv_edv_ml: float
    lv_esv_ml: float
    rv_edv_ml: float
    rv_esv_ml: float
    lv_myocardium_ed_ml: float
    lv_myocardium_es_ml: float

    @property
    def lv_sv_ml(self) -> float:
        return self.lv_edv_ml - self.lv_esv_ml

    @property
    def rv_sv_ml(self) -> float:
        return self.rv_edv_ml - self.rv_esv_ml

    @property
    def lv_ef_percent(self) -> float:
        return 100.0 * self.lv_sv_ml / self.lv_edv_ml if self.lv_edv_ml > 0 else float("nan")

    @property
    def rv_ef_percent(self) -> float:
        return 100.0 * self.rv_sv_ml / self.rv_edv_ml if self.rv_edv_ml > 0 else float("nan")

    @property
    def lv_mass_g(self) -> float:
        """LV myocardial mass at ED (1.05 g/ml)."""
        return self.lv_myocardium_ed_ml * MYOCARDIAL_DENSITY_G_PER_ML

    def as_dict(self) -> dict[str, float | int | None]:
        """Rounded values; an ejection fraction that does not exist (empty ventricle at ED) is None."""
        out: dict[str, float | int | None] = {
            "ed_phase": self.ed_phase,
            "es_phase": self.es_phase,
            "lv_edv_ml": round(self.lv_edv_ml, 2),
            "lv_esv_ml": round(self.lv_esv_ml, 2),
            "lv_sv_ml": round(self.lv_sv_ml, 2),
            "lv_ef_percent": round(self.lv_ef_percent, 2),
            "rv_edv_ml": round(self.rv_edv_ml, 2),
            "rv_esv_ml": round(self.rv_esv_ml, 2),
            "rv_sv_ml": round(self.rv_sv_ml, 2),
            "rv_ef_percent": round(self.rv_ef_percent, 2),
            "lv_myocardium_ed_ml": round(self.lv_myocardium_ed_ml, 2),
            "lv_mass_g": round(self.lv_mass_g, 2),
        }
        return {k: None if isinstance(v, float) and v != v else v for k, v in out.items()}


def cardiac_function(
    volumes: Sequence[PhaseVolumes], ed: int | None = None, es: int | None = None
) -> CardiacFunction:
    """Function from per-phase volumes; ED/ES picked from the LV cavity unless given."""
    by_phase = {v.phase: v for v in volumes}
    if ed is None or es is None:
        picked_ed, picked_es = pick_ed_es(volumes)
        ed = picked_ed if ed is None else ed
        es = picked_es if es is None else es
    if ed not in by_phase or es not in by_phase:
        raise PipelineError("unknown_phase", f"phases {ed}/{es} were not segmented")
    d, s = by_phase[ed], by_phase[es]
    return CardiacFunction(
        ed_phase=ed,
        es_phase=es,
        lv_edv_ml=d.lv_ml,
        lv_esv_ml=s.lv_ml,
        rv_edv_ml=d.rv_ml,
        rv_esv_ml=s.rv_ml,
        lv_myocardium_ed_ml=d.myo_ml,
        lv_myocardium_es_ml=s.myo_ml,
    )
