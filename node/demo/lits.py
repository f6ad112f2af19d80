"""The LiTS case inside the PyPI package ``liver-ct-segmentation-package`` (a real contrast CT).

The wheel is downloaded with ``pip download --no-deps`` (never installed: it pins torch 1.7), checked
by sha256 and kept in ``cache_dir/downloads``; a second run needs no network. Inside it,
``data/img_117.mrc`` is LiTS training volume 117 cropped around the liver and resampled to 128^3 (HU,
float32), ``data/lab_117.mrc`` its reference labels (1 liver, 2 tumour).

The MRC files carry no voxel size or orientation. Their axes were read from the anatomy: index 0 runs
to the patient's left, index 1 to posterior, index 2 to superior (LPS, the array order of the NIfTI the
authors started from); the voxel size is not recorded anywhere, so ``ASSUMED_SPACING_MM`` is an
estimate (vertebral level height, aortic diameter) and volumes in ml are approximate.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from pipelines.bundles.wheels import PinnedWheel, WheelMismatch, WheelUnavailable, fetch_pinned_wheel

PACKAGE = "liver-ct-segmentation-package"
VERSION = "1.6.0"
WHEEL = "liver_ct_segmentation_package-1.6.0-py2.py3-none-any.whl"
WHEEL_SHA256 = "67ffa526d8500ce5e3d9f2c96c1690543d811d352d93d531301d35791b9d6bba"
PIN = PinnedWheel(PACKAGE, VERSION, WHEEL, WHEEL_SHA256)
IMAGE_MEMBER = "liver_ct_segmentation_package/data/img_117.mrc"
LABEL_MEMBER = "liver_ct_segmentation_package/data/lab_117.mrc"
LICENCE_MEMBER = "liver_ct_segmentation_package-1.6.0.dist-info/LICENSE"
MEMBERS = {
    IMAGE_MEMBER: "6519548844be8c92a6f37dff22961800ec4baad72a4efbb9f7061ffd265e1780",
    LABEL_MEMBER: "0f4950afdb218ae1a8790c2367a3f1bffe3d68cf186239cdfae897e4d4f99240",
}
CASE = "LiTS training volume 117"
ASSUMED_SPACING_MM = 1.6
PROVENANCE = (
    f"{CASE}, from the PyPI package {PACKAGE}=={VERSION} (file data/img_117.mrc; package licence MIT, "
    "Luis Kuhn Cuellar). The image itself comes from the Liver Tumor Segmentation Benchmark (LiTS, "
    "Bilic et al., Medical Image Analysis 2023), released under CC BY-NC-SA 4.0: non-commercial use, "
    "attribution, share-alike. The package ships it cropped to the liver and resampled to 128^3 "
    f"without a voxel size; {ASSUMED_SPACING_MM} mm isotropic is assumed, so volumes are approximate."
)

MRC_MODES: dict[int, str] = {0: "i1", 1: "i2", 2: "f4", 6: "u2"}


class FetchError(Exception):
    """The package index could not be reached, or it served something else than expected."""


def fetch_wheel(cache_dir: Path, log: Callable[[str], None] = lambda _m: None, timeout: float = 300) -> Path:
    """The verified wheel, from ``cache_dir/downloads`` or downloaded there with ``pip download``."""
    try:
        return fetch_pinned_wheel(PIN, cache_dir, log, timeout)
    except WheelUnavailable as exc:
        raise FetchError(
            f"cannot download {PACKAGE}=={VERSION} from the package index ({exc}). Without network use "
            f"'segnode demo --study DIR' with a CT series of your own, or put {WHEEL} into "
            f"{cache_dir / 'downloads'}"
        ) from exc
    except WheelMismatch as exc:
        raise FetchError(str(exc)) from exc


def read_mrc(data: bytes) -> NDArray[np.float32]:
    """An MRC2014 volume as float32, array order as written (nz, ny, nx), x fastest."""
    if len(data) < 1024:
        raise FetchError(f"not an MRC file: {len(data)} bytes, the header alone is 1024")
    little = data[212] == 0x44
    order = "<" if little else ">"
    header = np.frombuffer(data[:40], dtype=f"{order}i4")
    nx, ny, nz, mode = (int(v) for v in header[:4])
    if data[208:212] != b"MAP ":
        raise FetchError("not an MRC2014 file (no 'MAP ' at byte 208)")
    mapping = tuple(int(v) for v in np.frombuffer(data[64:76], dtype=f"{order}i4"))
    if mapping != (1, 2, 3):
        raise FetchError(f"MRC axis mapping {mapping} is not supported (only 1, 2, 3)")
    if mode not in MRC_MODES:
        raise FetchError(f"MRC mode {mode} is not supported (only {sorted(MRC_MODES)})")
    extended = int(np.frombuffer(data[92:96], dtype=f"{order}i4")[0])
    dtype = np.dtype(f"{order}{MRC_MODES[mode]}")
    count = nx * ny * nz
    start = 1024 + extended
    if len(data) < start + count * dtype.itemsize:
        raise FetchError(
            f"MRC data is truncated: {nx}x{ny}x{nz} mode {mode} needs more than {len(data)} bytes"
        )
    values = np.frombuffer(data, dtype=dtype, count=count, offset=start).reshape(nz, ny, nx)
    return values.astype(np.float32)


@dataclass(frozen=True)
class LitsCase:
    hu: NDArray[np.float32]  # (x to patient left, y to posterior, z to superior)
    labels: NDArray[np.float32]  # same grid: 0 background, 1 liver, 2 tumour
    spacing_mm: float
    wheel: Path
    licence_text: str

    @property
    def ras_affine(self) -> NDArray[np.float64]:
        """NIfTI-style (RAS) affine of ``hu``, centred on the volume's middle."""
        s = self.spacing_mm
        affine = np.diag([-s, -s, s, 1.0])
        centre = (np.array(self.hu.shape, dtype=np.float64) - 1.0) / 2.0
        affine[:3, 3] = -affine[:3, :3] @ centre
        return affine


def load_case(wheel: Path) -> LitsCase:
    """Read the LiTS image, labels and licence out of the wheel, checking each file's sha256."""
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{wheel} is not a zip archive: {exc}") from exc
    with archive:
        names = set(archive.namelist())
        blobs: dict[str, bytes] = {}
        for member, expected in MEMBERS.items():
            if member not in names:
                raise FetchError(f"{wheel.name} has no {member}")
            blob = archive.read(member)
            actual = hashlib.sha256(blob).hexdigest()
            if actual != expected:
                raise FetchError(f"{member} in {wheel.name}: sha256 {actual}, expected {expected}")
            blobs[member] = blob
        licence = archive.read(LICENCE_MEMBER).decode("utf-8", "replace") if LICENCE_MEMBER in names else ""
    return LitsCase(
        hu=read_mrc(blobs[IMAGE_MEMBER]),
        labels=read_mrc(blobs[LABEL_MEMBER]),
        spacing_mm=ASSUMED_SPACING_MM,
        wheel=wheel,
        licence_text=licence,
    )
