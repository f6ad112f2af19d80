"""Read the few header attributes the node records, from an encoded instance, without pixel data."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag, Tag

from node.receive.status import Status

#: The attributes read_header records (pydicom reads only these, plus Specific Character Set).
WANTED_TAGS = [
    Tag(k)
    for k in (
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "PatientID",
        "PatientName",
        "StudyDate",
        "AccessionNumber",
        "StudyDescription",
        "SeriesNumber",
        "SeriesDescription",
        "ImagesInAcquisition",
        "NumberOfTemporalPositions",
        "NumberOfSlices",
    )
]


class HeaderError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class InstanceHeader:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    modality: str | None
    patient_id: str | None
    patient_name: str | None
    study_date: str | None
    accession_number: str | None
    study_description: str | None
    series_number: str | None
    series_description: str | None
    expected_count: int | None
    expected_source: str | None


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    try:
        value: Any = ds.get(keyword)
    except Exception:  # a malformed optional value is recorded as absent
        return None
    if value is None or value == "":
        return None
    return str(value).strip("\x00 ")[:256] or None


def _positive_int(ds: pydicom.Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        number = int(value) if value not in (None, "") else None
    except Exception:
        return None
    return number if number and number > 0 else None


def expected_count(
    temporal: int | None, slices: int | None, images: int | None
) -> tuple[int | None, str | None]:
    """How many instances a series announces, and which attributes said so (positive values only)."""
    if temporal and slices:
        return temporal * slices, "NumberOfTemporalPositions x NumberOfSlices"
    if images:
        return images, "ImagesInAcquisition"
    return None, None


def _expected(ds: pydicom.Dataset) -> tuple[int | None, str | None]:
    return expected_count(
        _positive_int(ds, "NumberOfTemporalPositions"),
        _positive_int(ds, "NumberOfSlices"),
        _positive_int(ds, "ImagesInAcquisition"),
    )


def _check_not_truncated(ds: pydicom.Dataset) -> None:
    for tag, raw in ds._dict.items():
        if (
            isinstance(raw, RawDataElement)
            and raw.value is not None
            and raw.length != 0xFFFFFFFF
            and len(raw.value) < raw.length
        ):
            raise HeaderError(
                Status.CANNOT_UNDERSTAND,
                f"cannot parse the data set: element {tag} declares {raw.length} bytes "
                f"but only {len(raw.value)} follow",
            )


def read_header(source: bytes | memoryview | Path | BinaryIO) -> InstanceHeader:
    """Parse the preamble, file meta and the header attributes; raise HeaderError with a status."""
    fh: BinaryIO
    if isinstance(source, bytes | memoryview):
        fh = io.BytesIO(source)
    elif isinstance(source, Path):
        fh = open(source, "rb")  # noqa: SIM115 - closed below
    else:
        fh = source
    try:
        ds = pydicom.dcmread(fh, stop_before_pixels=True, specific_tags=list[BaseTag](WANTED_TAGS))
        _check_not_truncated(ds)
        # Touch the values so that a malformed element fails here and not later.
        for elem in ds:
            _ = elem.value
    except (
        InvalidDicomError,
        EOFError,
        ValueError,
        KeyError,
        TypeError,
        OSError,
        NotImplementedError,
    ) as exc:
        raise HeaderError(Status.CANNOT_UNDERSTAND, f"cannot parse the data set: {exc}") from exc
    finally:
        if isinstance(source, Path):
            fh.close()
    meta = ds.file_meta
    ts = str(meta.get("TransferSyntaxUID", "") or "")
    missing = [
        k
        for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        if not _text(ds, k)
    ]
    if missing:
        raise HeaderError(
            Status.DATASET_DOES_NOT_MATCH,
            f"required attribute(s) missing or empty: {', '.join(missing)}",
        )
    expected, source_name = _expected(ds)
    return InstanceHeader(
        sop_class_uid=str(ds.SOPClassUID).strip("\x00 "),
        sop_instance_uid=str(ds.SOPInstanceUID).strip("\x00 "),
        study_uid=str(ds.StudyInstanceUID).strip("\x00 "),
        series_uid=str(ds.SeriesInstanceUID).strip("\x00 "),
        transfer_syntax=ts,
        modality=_text(ds, "Modality"),
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        study_date=_text(ds, "StudyDate"),
        accession_number=_text(ds, "AccessionNumber"),
        study_description=_text(ds, "StudyDescription"),
        series_number=_text(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription"),
        expected_count=expected,
        expected_source=source_name,
    )
