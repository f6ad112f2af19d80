"""Generated DICOM test data (real files from ../shared are used where the tests need real images)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


@dataclass
class SeriesSpec:
    n: int = 5
    size: int = 32
    modality: str = "CT"
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    images_in_acquisition: int | None = None
    description: str = "TEST SERIES"
    frame_uid: str = field(default_factory=generate_uid)


def ct_instance(spec: SeriesSpec, index: int, seed: int = 0) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = spec.series_uid
    ds.FrameOfReferenceUID = spec.frame_uid
    ds.Modality = spec.modality
    ds.PatientID = "SEGNODE-TEST"
    ds.PatientName = "Test^Patient"
    ds.StudyDate = "20260101"
    ds.SeriesNumber = 1
    ds.SeriesDescription = spec.description
    ds.InstanceNumber = index + 1
    if spec.images_in_acquisition:
        ds.ImagesInAcquisition = spec.images_in_acquisition
    ds.ImagePositionPatient = [0.0, 0.0, index * 2.5]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 2.5
    ds.Rows = ds.Columns = spec.size
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    rng = np.random.default_rng(seed * 100003 + index)
    ds.PixelData = rng.integers(0, 2000, (spec.size, spec.size), dtype=np.int16).tobytes()
    return ds


def ct_series(spec: SeriesSpec) -> list[Dataset]:
    return [ct_instance(spec, i) for i in range(spec.n)]


def write_series(datasets: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def iter_files(folder: Path) -> Iterator[Path]:
    yield from sorted(p for p in folder.rglob("*") if p.is_file())
