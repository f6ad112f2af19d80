"""Bring cases into the plan's space (target spacing, normalised) and sample training patches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from trainer.data import Case, Volume, load_case, normalise, resample
from trainer.plan import Plan


@dataclass
class Prepared:
    case_id: str
    image: NDArray[np.float32]  # (C, X, Y, Z) at the plan spacing, normalised
    label: NDArray[np.uint8] | None  # (X, Y, Z)
    original: Volume  # as read (for evaluation in the original grid)
    fg_index: dict[int, NDArray[np.int64]]  # class -> flat voxel indices (subsampled)


def prepare_volume(v: Volume, plan: Plan, rng: np.random.Generator | None = None) -> Prepared:
    target = (plan.spacing[0], plan.spacing[1], plan.spacing[2])
    r = resample(v, target, tuple(plan.resample_axes))
    img = normalise(r.image, plan.normalisation)
    fg: dict[int, NDArray[np.int64]] = {}
    if r.label is not None:
        flat = r.label.ravel()
        rng = rng or np.random.default_rng(0)
        for c in range(1, plan.num_classes):
            idx = np.flatnonzero(flat == c)
            if len(idx) > 20000:
                idx = np.sort(rng.choice(idx, 20000, replace=False))
            if len(idx):
                fg[c] = idx.astype(np.int64)
    return Prepared(v.case_id, img, r.label, v, fg)


def prepare_case(case: Case, plan: Plan) -> Prepared:
    return prepare_volume(load_case(case), plan)


def _crop(arr: NDArray[np.generic], lo: list[int], size: list[int]) -> NDArray[np.generic]:
    """Crop ``arr`` over its last len(size) axes starting at ``lo`` (may be out of bounds: zero pad)."""
    nd = len(size)
    lead = arr.shape[: arr.ndim - nd]
    out = np.zeros((*lead, *size), dtype=arr.dtype)
    src, dst = [], []
    for a in range(nd):
        n = arr.shape[arr.ndim - nd + a]
        s0, s1 = max(lo[a], 0), min(lo[a] + size[a], n)
        if s1 <= s0:
            return out
        src.append(slice(s0, s1))
        dst.append(slice(s0 - lo[a], s1 - lo[a]))
    out[(..., *dst)] = arr[(..., *src)]
    return out


class PatchSampler:
    """Random patches (2D slices or 3D blocks) with foreground oversampling, from prepared cases."""

    def __init__(self, cases: list[Prepared], plan: Plan, crop_size: list[int]) -> None:
        self.cases = [c for c in cases if c.label is not None]
        if not self.cases:
            raise ValueError("no labelled cases to sample from")
        self.plan = plan
        self.crop = crop_size

    def sample(self, rng: np.random.Generator, batch: int) -> tuple[NDArray[np.float32], NDArray[np.uint8]]:
        plan = self.plan
        imgs, labs = [], []
        for i in range(batch):
            case = self.cases[int(rng.integers(len(self.cases)))]
            assert case.label is not None
            shape = case.label.shape
            force_fg = i >= round(batch * (1 - plan.foreground_oversample)) and bool(case.fg_index)
            if force_fg:
                cls = list(case.fg_index)[int(rng.integers(len(case.fg_index)))]
                idx = case.fg_index[cls]
                centre = list(np.unravel_index(int(idx[int(rng.integers(len(idx)))]), shape))
            else:
                centre = [int(rng.integers(s)) for s in shape]
            if plan.dim == 2:
                assert plan.slice_axis is not None
                axes = [a for a in range(3) if a != plan.slice_axis]
                k = centre[plan.slice_axis]
                img2 = np.take(case.image, k, axis=plan.slice_axis + 1)
                lab2 = np.take(case.label, k, axis=plan.slice_axis)
                c2 = [centre[a] for a in axes]
                shp = [shape[a] for a in axes]
                # random (non-forced) centres keep the patch inside the slice where possible
                if not force_fg:
                    c2 = [
                        int(rng.integers(min(p // 2, s // 2), max(s - p // 2, s // 2) + 1))
                        for p, s in zip(plan.patch_size, shp, strict=True)
                    ]
                lo = [c - cs // 2 for c, cs in zip(c2, self.crop, strict=True)]
                imgs.append(_crop(img2, lo, self.crop))
                labs.append(_crop(lab2, lo, self.crop))
            else:
                lo = [c - cs // 2 for c, cs in zip(centre, self.crop, strict=True)]
                imgs.append(_crop(case.image, lo, self.crop))
                labs.append(_crop(case.label, lo, self.crop))
        return np.stack(imgs).astype(np.float32), np.stack(labs)[:, None]
