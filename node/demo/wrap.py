"""A voxel array with a NIfTI (RAS) affine as a DICOM CT series: CT Image Storage, one file per slice.

Index order is NIfTI's: ``voxels[i, j, k]`` with ``affine @ (i, j, k, 1)`` in RAS mm. Slice ``k`` becomes
one instance whose pixel (row r, column c) is ``voxels[c, r, k]``: the row direction (increasing
column) is the affine's first axis, the column direction its second, both converted to LPS. The third
axis must be perpendicular to them (a sheared grid would be a gantry tilt; it is refused). Values are
rounded to int16 (slope 1, intercept 0: HU for CT). UIDs are derived from ``uid_seed``, so wrapping the
same data twice yields the same series.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
ORTHOGONALITY_TOLERANCE = 1e-4


class WrapError(Exception):
    """The volume cannot be written as a regular axial/oblique series; the message says why."""


@dataclass(frozen=True)
class SeriesInfo:
    """What the series says about itself; ``uid_seed`` makes every UID deterministic."""

    uid_seed: str
    patient_id: str = "DEMO"
    patient_name: str = "Demo^Patient"
    study_description: str = "CT ABDOMEN"
    series_description: str = "CT abdomen"
    body_part: str = "ABDOMEN"
    accession_number: str = ""
    study_date: str = ""
    study_time: str = ""
    series_number: int = 1
    manufacturer: str = "segnode demo (wrapped NIfTI)"
    modality: str = "CT"


@dataclass(frozen=True)
class Geometry:
    """The DICOM geometry a NIfTI affine implies (LPS mm)."""

    row_direction: NDArray[np.float64]  # ImageOrientationPatient[0:3]: along increasing column index
    column_direction: NDArray[np.float64]  # ImageOrientationPatient[3:6]: along increasing row index
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    slice_step: NDArray[np.float64]  # LPS mm from slice k to k + 1
    origin: NDArray[np.float64]  # ImagePositionPatient of slice 0

    @property
    def slice_spacing(self) -> float:
        return float(np.linalg.norm(self.slice_step))

    def position(self, k: int) -> NDArray[np.float64]:
        result: NDArray[np.float64] = self.origin + k * self.slice_step
        return result


def geometry_from_affine(affine: NDArray[np.float64] | Sequence[Sequence[float]]) -> Geometry:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise WrapError(f"the affine must be a finite 4x4 matrix, not shape {a.shape}")
    axes = RAS_TO_LPS @ a[:3, :3]
    lengths = np.linalg.norm(axes, axis=0)
    if np.any(lengths <= 0):
        raise WrapError(f"the affine has a zero-length axis (voxel sizes {lengths.tolist()})")
    units = axes / lengths
    row_dir, col_dir, slice_dir = units[:, 0], units[:, 1], units[:, 2]
    if abs(float(row_dir @ col_dir)) > ORTHOGONALITY_TOLERANCE:
        raise WrapError("the affine's first two axes are not perpendicular; DICOM pixels are rectangular")
    normal = np.cross(row_dir, col_dir)
    if np.linalg.norm(np.cross(normal, slice_dir)) > ORTHOGONALITY_TOLERANCE:
        raise WrapError(
            "the affine's slice axis is not perpendicular to the image plane (a sheared grid, like a "
            "gantry tilt); resample it first"
        )
    return Geometry(
        row_direction=row_dir,
        column_direction=col_dir,
        pixel_spacing=(float(lengths[1]), float(lengths[0])),
        slice_step=axes[:, 2],
        origin=RAS_TO_LPS @ a[:3, 3],
    )


def _ds(value: float) -> str:
    """A DS value of at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text if len(text) <= 16 else f"{value:.8g}"


def _uid(seed: str, *parts: str) -> UID:
    """A 2.25 UID (PS3.5 B.2) from the first 128 bits of a SHA-256 over ``seed`` and ``parts``."""
    digest = hashlib.sha256("\x00".join((seed, *parts)).encode("utf-8")).digest()
    return UID(f"2.25.{int.from_bytes(digest[:16], 'big')}")


def series_uids(info: SeriesInfo) -> tuple[UID, UID, UID]:
    """(Study, Series, Frame of Reference) UIDs of the wrapped series."""
    return _uid(info.uid_seed, "study"), _uid(info.uid_seed, "series"), _uid(info.uid_seed, "frame")


def wrap_volume(
    voxels: NDArray[np.floating] | NDArray[np.integer],
    affine: NDArray[np.float64] | Sequence[Sequence[float]],
    out_dir: Path,
    info: SeriesInfo,
) -> list[Path]:
    """Write ``voxels`` (i, j, k) as one CT instance per k into ``out_dir``; returns the files in k order."""
    data = np.asarray(voxels)
    if data.ndim != 3:
        raise WrapError(f"expected a 3-D volume, got {data.ndim} dimensions {data.shape}")
    if min(data.shape) < 1:
        raise WrapError(f"the volume is empty: shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise WrapError("the volume holds NaN or infinite values")
    geometry = geometry_from_affine(affine)
    study_uid, series_uid, frame_uid = series_uids(info)
    values = np.clip(np.rint(data), -32768, 32767).astype(np.int16)
    out_dir.mkdir(parents=True, exist_ok=True)
    orientation = [_ds(v) for v in (*geometry.row_direction, *geometry.column_direction)]
    normal = np.cross(geometry.row_direction, geometry.column_direction)
    paths: list[Path] = []
    n = data.shape[2]
    for k in range(n):
        sop_uid = _uid(info.uid_seed, "instance", str(k))
        pixels = np.ascontiguousarray(values[:, :, k].T)
        ds = _instance(info, study_uid, series_uid, frame_uid, sop_uid)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in geometry.position(k)]
        ds.ImageOrientationPatient = orientation
        ds.PixelSpacing = [_ds(geometry.pixel_spacing[0]), _ds(geometry.pixel_spacing[1])]
        ds.SliceThickness = _ds(geometry.slice_spacing)
        ds.SpacingBetweenSlices = _ds(geometry.slice_spacing)
        ds.SliceLocation = _ds(float(geometry.position(k) @ normal))
        ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
        ds.SmallestImagePixelValue = int(pixels.min())
        ds.LargestImagePixelValue = int(pixels.max())
        ds.PixelData = pixels.astype("<i2").tobytes()
        path = out_dir / f"CT{k + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _instance(info: SeriesInfo, study_uid: UID, series_uid: UID, frame_uid: UID, sop_uid: UID) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = info.study_date
    ds.SeriesDate = info.study_date
    ds.StudyTime = info.study_time
    ds.AccessionNumber = info.accession_number
    ds.Modality = info.modality
    ds.Manufacturer = info.manufacturer
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = info.study_description
    ds.SeriesDescription = info.series_description
    ds.PatientName = info.patient_name
    ds.PatientID = info.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = info.body_part
    ds.KVP = ""
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = info.series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    return ds


def wrap_nifti(path: Path, out_dir: Path, info: SeriesInfo) -> list[Path]:
    """A NIfTI file (3-D) as a CT series; see ``wrap_volume``."""
    import nibabel as nib

    try:
        image: Any = nib.load(str(path))
    except Exception as exc:  # nibabel raises several unrelated types for unreadable files
        raise WrapError(f"cannot read {path} as NIfTI: {exc}") from exc
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    return wrap_volume(data, np.asarray(image.affine, dtype=np.float64), out_dir, info)
