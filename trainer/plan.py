"""Dataset fingerprint and the plan derived from it (nnU-Net's rules, simplified), both as JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data import RawDataset, load_case

PLAN_VERSION = 1
ANISOTROPY_RATIO = 3.0


def fingerprint(ds: RawDataset, max_cases: int | None = None) -> dict[str, Any]:
    """Spacings, sizes, per-channel intensity statistics (in the foreground) and class frequencies."""
    cases = [c for c in ds.cases if c.label is not None][: max_cases or None]
    if not cases:
        raise ValueError(f"{ds.root}: no labelled cases")
    spacings, shapes = [], []
    fg_samples: list[list[np.ndarray]] = [[] for _ in ds.channel_names]
    counts = np.zeros(ds.num_classes, dtype=np.int64)
    rng = np.random.default_rng(0)
    per_case = {}
    for case in cases:
        v = load_case(case)
        assert v.label is not None
        spacings.append(v.spacing)
        shapes.append(v.image.shape[1:])
        counts += np.bincount(v.label.ravel(), minlength=ds.num_classes)[: ds.num_classes]
        fg = v.label > 0
        for c in range(v.image.shape[0]):
            vals = v.image[c][fg] if fg.any() else v.image[c].ravel()
            fg_samples[c].append(rng.choice(vals, size=min(len(vals), 10000), replace=False))
        per_case[case.case_id] = {
            "spacing": list(v.spacing),
            "shape": list(v.image.shape[1:]),
            "classes": sorted(int(x) for x in np.unique(v.label)),
        }
    intensity = []
    for c, name in enumerate(ds.channel_names):
        vals = np.concatenate(fg_samples[c]).astype(np.float64)
        intensity.append(
            {
                "channel": name,
                "mean": float(vals.mean()),
                "std": float(vals.std()),
                "min": float(vals.min()),
                "max": float(vals.max()),
                "percentile_00_5": float(np.percentile(vals, 0.5)),
                "percentile_99_5": float(np.percentile(vals, 99.5)),
                "median": float(np.median(vals)),
            }
        )
    total = counts.sum()
    inv = {v: k for k, v in ds.labels.items()}
    return {
        "dataset": str(ds.root),
        "num_cases": len(cases),
        "num_groups": len({c.group for c in cases}),
        "channels": ds.channel_names,
        "labels": ds.labels,
        "spacings": [list(s) for s in spacings],
        "shapes": [list(s) for s in shapes],
        "median_spacing": [float(x) for x in np.median(np.asarray(spacings), axis=0)],
        "median_shape": [float(x) for x in np.median(np.asarray(shapes), axis=0)],
        "intensity": intensity,
        "class_voxels": {inv.get(i, str(i)): int(n) for i, n in enumerate(counts)},
        "class_frequency": {inv.get(i, str(i)): float(n / total) for i, n in enumerate(counts)},
        "cases": per_case,
    }


@dataclass
class Plan:
    dataset: str
    dim: int  # 2 or 3
    spacing: list[float]  # target spacing (X, Y, Z) in mm
    resample_axes: list[int]  # axes resampled to the target spacing
    slice_axis: int | None  # for 2D: the axis the network does not see (largest spacing)
    patch_size: list[int]  # per network axis (2 or 3 values)
    kernels: list[list[int]]
    strides: list[list[int]]
    filters: list[int]
    batch_size: int
    normalisation: dict[str, Any]
    num_classes: int
    labels: dict[str, int]
    channels: list[str]
    network: str = "dynunet"
    norm: str = "instance"
    foreground_oversample: float = 0.33
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Plan:
        data = json.loads(Path(path).read_text())
        if data.get("version") != PLAN_VERSION:
            raise ValueError(f"{path}: plan version {data.get('version')} is not {PLAN_VERSION}")
        return cls(**data)

    def full_patch(self) -> tuple[int, int, int]:
        """Patch as 3 values in volume axis order (1 on the slice axis for 2D)."""
        if self.dim == 3:
            return (self.patch_size[0], self.patch_size[1], self.patch_size[2])
        out = list(self.patch_size)
        assert self.slice_axis is not None
        out.insert(self.slice_axis, 1)
        return (out[0], out[1], out[2])


def _topology(
    patch: list[int], spacing: list[float], max_levels: int, min_size: int
) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """nnU-Net style: pool an axis while its size stays >= 2*min_size and its spacing is within a
    factor 2 of the finest; kernels 1 on axes still too coarse. Returns kernels, strides, patch."""
    n = len(patch)
    sp = list(spacing)
    size = list(patch)
    kernels = [[3 if sp[a] <= 2 * min(sp) else 1 for a in range(n)]]
    strides = [[1] * n]
    for _ in range(max_levels - 1):
        finest = min(sp)
        st = [2 if size[a] >= 2 * min_size and sp[a] <= 2 * finest else 1 for a in range(n)]
        if not any(s == 2 for s in st):
            break
        for a in range(n):
            if st[a] == 2:
                size[a] //= 2
                sp[a] *= 2
        strides.append(st)
        kernels.append([3 if sp[a] <= 2 * min(sp) else 1 for a in range(n)])
    # make the patch divisible by the total stride per axis
    total = [math.prod(s[a] for s in strides) for a in range(n)]
    fixed = [max(total[a], round(patch[a] / total[a]) * total[a]) for a in range(n)]
    return kernels, strides, fixed


def make_plan(fp: dict[str, Any], modality: str = "MR", overrides: dict[str, Any] | None = None) -> Plan:
    """Derive a plan from a fingerprint; ``overrides`` (from the CLI) win over every rule."""
    o = {k: v for k, v in (overrides or {}).items() if v is not None}
    med_sp = [float(x) for x in fp["median_spacing"]]
    spacing = [float(x) for x in o.get("spacing", med_sp)]
    med_shape = [float(s) * med_sp[i] / spacing[i] for i, s in enumerate(fp["median_shape"])]
    anisotropic = max(spacing) / min(spacing) > ANISOTROPY_RATIO
    dim = int(o.get("dim", 2 if anisotropic else 3))
    slice_axis = int(np.argmax(spacing)) if dim == 2 else None
    axes = [a for a in range(3) if a != slice_axis]
    resample_axes = axes if dim == 2 else [0, 1, 2]
    net_spacing = [spacing[a] for a in axes]
    if "patch_size" in o:
        patch = [int(x) for x in o["patch_size"]]
        if len(patch) != len(axes):
            raise ValueError(f"patch_size needs {len(axes)} values for a {dim}D plan, got {patch}")
    else:
        cap = 512 if dim == 2 else 160
        patch = [min(cap, math.ceil(med_shape[a])) for a in axes]
        budget = int(o.get("max_patch_voxels", 256 * 256 if dim == 2 else 128**3))
        while math.prod(patch) > budget:
            i = int(np.argmax([p * s for p, s in zip(patch, net_spacing, strict=True)]))
            patch[i] = int(patch[i] * 0.9)
    kernels, strides, patch = _topology(
        patch, net_spacing, int(o.get("max_levels", 6 if dim == 2 else 5)), int(o.get("min_feature_size", 4))
    )
    base = int(o.get("base_filters", 32))
    cap_f = int(o.get("max_filters", 512 if dim == 2 else 320))
    filters = [min(cap_f, base * 2**i) for i in range(len(strides))]
    if "batch_size" in o:
        batch = int(o["batch_size"])
    else:
        # nnU-Net keeps about 5% of the dataset's voxels per step; here a coarse CPU/GPU-neutral rule
        ref = (256 * 256 * 12) if dim == 2 else (128**3 * 2)
        batch = max(2, min(48 if dim == 2 else 4, ref // math.prod(patch)))
    norm_channels = []
    for st, name in zip(fp["intensity"], fp["channels"], strict=True):
        method = o.get("normalisation") or ("ct" if modality == "CT" or name.upper() == "CT" else "zscore")
        entry: dict[str, Any] = {"channel": name, "method": method}
        if method == "ct":
            entry.update(
                lower=st["percentile_00_5"], upper=st["percentile_99_5"], mean=st["mean"], std=st["std"]
            )
        norm_channels.append(entry)
    return Plan(
        dataset=fp["dataset"],
        dim=dim,
        spacing=spacing,
        resample_axes=resample_axes,
        slice_axis=slice_axis,
        patch_size=patch,
        kernels=kernels,
        strides=strides,
        filters=filters,
        batch_size=batch,
        normalisation={"modality": modality, "channels": norm_channels},
        num_classes=len(fp["labels"]) if "num_classes" not in o else int(o["num_classes"]),
        labels=dict(fp["labels"]),
        channels=list(fp["channels"]),
        network=str(o.get("network", "dynunet")),
        norm=str(o.get("norm", "instance")),
        foreground_oversample=float(o.get("foreground_oversample", 0.33)),
        extra={"anisotropic": anisotropic, "median_shape_at_target": med_shape},
    )
