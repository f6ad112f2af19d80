"""Datasets in the nnU-Net v2 raw layout: ``imagesTr/<case>_<cccc>.nii.gz``, ``labelsTr/<case>.nii.gz``,
``dataset.json``; reading, patient grouping, splits and the preprocessing a plan asks for."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

DEFAULT_GROUP_REGEX = r"^(?P<group>.+?)(?:_frame\d+)?$"


class DatasetError(Exception):
    """A dataset that cannot be read as nnU-Net raw layout; the message says what is wrong."""


@dataclass(frozen=True)
class Case:
    case_id: str
    images: tuple[Path, ...]  # one per channel, in channel order
    label: Path | None
    group: str  # patient: splits never separate cases of one group


@dataclass
class RawDataset:
    root: Path
    meta: dict[str, Any]
    cases: list[Case]
    channel_names: list[str]
    labels: dict[str, int]  # name -> value, background included
    file_ending: str = ".nii.gz"
    case_meta: dict[str, dict[str, str]] = field(default_factory=dict)  # e.g. site/scanner per case

    @property
    def ignore_value(self) -> int | None:
        """nnU-Net's ``ignore`` label: voxels whose truth is unknown."""
        return self.labels.get("ignore")

    @property
    def num_classes(self) -> int:
        return max(v for k, v in self.labels.items() if k != "ignore") + 1

    def foreground_labels(self) -> dict[str, int]:
        return {k: v for k, v in self.labels.items() if v != 0 and k != "ignore"}


def read_dataset(root: Path, group_regex: str = DEFAULT_GROUP_REGEX) -> RawDataset:
    root = Path(root)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise DatasetError(f"{root}: no dataset.json (nnU-Net v2 raw layout expected)")
    meta = json.loads(meta_path.read_text())
    ending = str(meta.get("file_ending", ".nii.gz"))
    channels = meta.get("channel_names") or meta.get("modality")
    if not isinstance(channels, dict) or not channels:
        raise DatasetError(f"{meta_path}: channel_names is missing")
    channel_names = [str(channels[k]) for k in sorted(channels, key=int)]
    labels = {str(k): int(v) for k, v in dict(meta.get("labels", {})).items()}
    if not labels or 0 not in labels.values():
        raise DatasetError(f"{meta_path}: labels must map names to values and include background 0")
    images_dir = root / "imagesTr"
    labels_dir = root / "labelsTr"
    if not images_dir.is_dir():
        raise DatasetError(f"{root}: imagesTr/ is missing")
    pattern = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})" + re.escape(ending) + "$")
    by_case: dict[str, dict[int, Path]] = {}
    for p in sorted(images_dir.iterdir()):
        m = pattern.match(p.name)
        if m:
            by_case.setdefault(m["case"], {})[int(m["ch"])] = p
    if not by_case:
        raise DatasetError(f"{images_dir}: no <case>_0000{ending} images")
    grouper = re.compile(group_regex)
    cases: list[Case] = []
    for case_id, chans in sorted(by_case.items()):
        if sorted(chans) != list(range(len(channel_names))):
            raise DatasetError(
                f"{case_id}: channels {sorted(chans)} but dataset.json names {len(channel_names)} channel(s)"
            )
        lab = labels_dir / f"{case_id}{ending}"
        gm = grouper.match(case_id)
        group = gm["group"] if gm and "group" in gm.groupdict() else case_id
        cases.append(
            Case(
                case_id,
                tuple(chans[i] for i in range(len(channel_names))),
                lab if lab.is_file() else None,
                group,
            )
        )
    case_meta: dict[str, dict[str, str]] = {}
    for key in ("case_metadata", "metadata"):
        if isinstance(meta.get(key), dict):
            case_meta = {str(k): {str(a): str(b) for a, b in v.items()} for k, v in meta[key].items()}
    return RawDataset(root, meta, cases, channel_names, labels, ending, case_meta)


@dataclass
class Volume:
    """A case as arrays: image (C, X, Y, Z) float32, label (X, Y, Z) uint8 or None, spacing in mm."""

    case_id: str
    image: NDArray[np.float32]
    label: NDArray[np.uint8] | None
    spacing: tuple[float, float, float]
    affine: NDArray[np.float64]


def load_nifti(path: Path) -> tuple[NDArray[Any], tuple[float, float, float], NDArray[np.float64]]:
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise DatasetError(f"{path}: expected a 3D volume, got shape {data.shape}")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    while len(zooms) < 3:
        zooms = (*zooms, 1.0)
    return data, (zooms[0], zooms[1], zooms[2]), np.asarray(img.affine, dtype=np.float64)


def load_case(case: Case) -> Volume:
    chans = []
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    affine = np.eye(4)
    for i, p in enumerate(case.images):
        data, sp, aff = load_nifti(p)
        if i == 0:
            spacing, affine = sp, aff
        elif data.shape != chans[0].shape:
            raise DatasetError(f"{case.case_id}: channel {i} shape {data.shape} != {chans[0].shape}")
        chans.append(np.asarray(data, dtype=np.float32))
    label = None
    if case.label is not None:
        lab, _, _ = load_nifti(case.label)
        if lab.shape != chans[0].shape:
            raise DatasetError(f"{case.case_id}: label shape {lab.shape} != image shape {chans[0].shape}")
        label = np.asarray(np.rint(lab), dtype=np.uint8)
    return Volume(case.case_id, np.stack(chans), label, spacing, affine)


def split_groups(
    groups: list[str], val_fraction: float, seed: int, folds: int = 0, fold: int = 0
) -> tuple[list[str], list[str]]:
    """Patient-level split: returns (train_groups, val_groups). With folds > 1, fold ``fold`` of a
    seeded k-fold partition is the validation set; otherwise a seeded fraction is."""
    uniq = sorted(set(groups))
    rng = np.random.default_rng(seed)
    order = [uniq[i] for i in rng.permutation(len(uniq))]
    if folds > 1:
        if not 0 <= fold < folds:
            raise ValueError(f"fold {fold} is outside 0..{folds - 1}")
        val = order[fold::folds]
    else:
        n_val = max(1, round(len(order) * val_fraction)) if val_fraction > 0 else 0
        val = order[:n_val]
    vset = set(val)
    return [g for g in order if g not in vset], sorted(val)


def normalise(image: NDArray[np.float32], scheme: dict[str, Any]) -> NDArray[np.float32]:
    """Normalise each channel as the plan says (``zscore`` per case or ``ct`` with dataset statistics)."""
    out = np.empty_like(image, dtype=np.float32)
    for c in range(image.shape[0]):
        ch = scheme["channels"][c]
        x = image[c].astype(np.float32)
        if ch["method"] == "ct":
            x = np.clip(x, ch["lower"], ch["upper"])
            x = (x - ch["mean"]) / max(ch["std"], 1e-8)
        elif ch["method"] == "zscore":
            x = (x - float(x.mean())) / max(float(x.std()), 1e-8)
        elif ch["method"] != "none":
            raise ValueError(f"unknown normalisation {ch['method']!r}")
        out[c] = x
    return out


def resample(volume: Volume, target: tuple[float, float, float], axes: tuple[int, ...]) -> Volume:
    """Resample to ``target`` spacing along ``axes`` (others untouched): image cubic, label nearest."""
    factors = [1.0, 1.0, 1.0]
    for a in axes:
        factors[a] = volume.spacing[a] / target[a]
    if all(abs(f - 1.0) < 1e-3 for f in factors):
        return volume
    shape = [max(1, round(s * f)) for s, f in zip(volume.image.shape[1:], factors, strict=True)]
    zoom = [n / s for n, s in zip(shape, volume.image.shape[1:], strict=True)]
    img = np.stack([ndimage.zoom(ch, zoom, order=3, mode="nearest") for ch in volume.image]).astype(
        np.float32
    )
    lab = None
    if volume.label is not None:
        lab = ndimage.zoom(volume.label, zoom, order=0, mode="nearest").astype(np.uint8)
    sp = tuple(volume.spacing[i] / zoom[i] for i in range(3))
    return Volume(volume.case_id, img, lab, (sp[0], sp[1], sp[2]), volume.affine)


def resample_label_to(label: NDArray[np.uint8], shape: tuple[int, ...]) -> NDArray[np.uint8]:
    if tuple(label.shape) == tuple(shape):
        return label
    zoom = [n / s for n, s in zip(shape, label.shape, strict=True)]
    return ndimage.zoom(label, zoom, order=0, mode="nearest").astype(np.uint8)
