"""Read what the loader needs from each instance's header, one ``FrameHeader`` per frame.

Pixel data are not read here. For native little-endian pixel data the file offset of the pixel data
value is recorded so that ``pixels.py`` can read frames straight into the output volume; everything
else (compressed, big endian, deflated) is decoded later through pydicom.

Single-frame instances give one frame each. Enhanced multi-frame instances give one frame per frame,
with geometry, rescale and temporal attributes taken from the Per-frame Functional Groups, falling
back to the Shared Functional Groups (and to the top-level data set).
"""

from __future__ import annotations

import re
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from pipelines.volume import values
from pipelines.volume.reasons import Reason, refuse

PIXEL_DATA_TAG = 0x7FE00010
FLOAT_PIXEL_DATA_TAGS = (0x7FE00008, 0x7FE00009)
NATIVE_LITTLE_ENDIAN = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))


@dataclass(slots=True)
class FileHeader:
    """What all frames of one instance share."""

    path: Path
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    rows: int
    columns: int
    samples_per_pixel: int
    photometric: str
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    number_of_frames: int
    has_modality_lut: bool
    cardiac_number_of_images: int | None
    gantry_tilt: float | None
    # Offset of the first byte of the native Pixel Data value (None: decode through pydicom).
    pixel_offset: int | None
    pixel_length: int
    # UIDs that were empty in the data set and taken from the file meta information instead.
    uid_fallbacks: tuple[str, ...]
    is_enhanced: bool

    @property
    def frame_bytes(self) -> int:
        return self.rows * self.columns * self.samples_per_pixel * (self.bits_allocated // 8)


@dataclass(slots=True)
class FrameHeader:
    """One frame (a 2D image) and where it lies."""

    file: FileHeader
    frame_index: int  # 0-based within the file
    position: tuple[float, float, float] | None  # ImagePositionPatient, LPS mm
    orientation: tuple[float, float, float, float, float, float] | None  # ImageOrientationPatient
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns) mm
    slice_thickness: float | None
    spacing_between_slices: float | None
    slope: float | None
    intercept: float | None
    acquisition_number: int | None
    temporal_position: int | None  # TemporalPositionIndex (enhanced) or TemporalPositionIdentifier
    trigger_time: float | None  # ms: TriggerTime or NominalCardiacTriggerDelayTime
    content_time: float | None  # seconds since midnight: ContentTime / FrameAcquisitionDateTime
    acquisition_time: float | None  # seconds since midnight
    instance_number: int | None
    image_type: str  # ImageType / FrameType, joined with backslashes

    @property
    def frame_number(self) -> int | None:
        """1-based frame number for a multi-frame instance, None for a single-frame instance."""
        return self.frame_index + 1 if self.file.is_enhanced or self.file.number_of_frames > 1 else None

    def describe(self) -> str:
        name = self.file.path.name
        return f"{name} frame {self.frame_index + 1}" if self.frame_number is not None else name


def read_headers(paths: Sequence[Path], notes: list[str]) -> list[FrameHeader]:
    """Headers of every frame of every file, in file order; invalid values met are summarised in notes."""
    frames: list[FrameHeader] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for path in paths:
            frames.extend(_read_file(Path(path)))
    kinds: dict[str, int] = {}
    for warning in caught:
        kind = str(warning.message).split(":")[0].split(" Please see")[0].strip()
        kinds[kind] = kinds.get(kind, 0) + 1
    if kinds:
        listed = "; ".join(f"{kind} ({count}x)" for kind, count in sorted(kinds.items()))
        notes.append(f"invalid DICOM values tolerated while reading headers: {listed}")
    bad_uids = _invalid_uids(frames)
    if bad_uids:
        listed = "; ".join(f"{keyword} in {count} instances" for keyword, count in sorted(bad_uids.items()))
        notes.append(f"UIDs that are not valid UI values (e.g. leading-zero components) tolerated: {listed}")
    return frames


_UID_FIELDS = (
    ("SOPInstanceUID", "sop_instance_uid"),
    ("StudyInstanceUID", "study_instance_uid"),
    ("SeriesInstanceUID", "series_instance_uid"),
    ("FrameOfReferenceUID", "frame_of_reference_uid"),
)
_VALID_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def _invalid_uids(frames: Sequence[FrameHeader]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for info in {id(f.file): f.file for f in frames}.values():
        for keyword, attribute in _UID_FIELDS:
            uid = getattr(info, attribute)
            if uid and (len(uid) > 64 or not _VALID_UID.match(uid)):
                counts[keyword] = counts.get(keyword, 0) + 1
    return counts


def _read_file(path: Path) -> list[FrameHeader]:
    try:
        with open(path, "rb") as fp:
            ds = dcmread(fp, stop_before_pixels=True)
            transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
            encoding = getattr(ds, "original_encoding", (None, None))
            pixel_offset, pixel_length, pixel_tag = _pixel_element(fp, transfer_syntax, encoding[0])
    except (InvalidDicomError, OSError, EOFError, ValueError, struct.error) as exc:
        raise refuse(Reason.UNREADABLE_INSTANCE, f"{path.name} cannot be read as DICOM: {exc}") from exc
    if pixel_tag in FLOAT_PIXEL_DATA_TAGS:
        raise refuse(
            Reason.UNSUPPORTED_PIXEL_FORMAT,
            f"{path.name} has Float/Double Float Pixel Data; only integer Pixel Data (7FE0,0010) is "
            "supported",
        )
    if pixel_tag != PIXEL_DATA_TAG:
        raise refuse(Reason.NO_PIXEL_DATA, f"{path.name} has no Pixel Data (7FE0,0010)")
    try:
        return _frames(ds, path, transfer_syntax, pixel_offset, pixel_length)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise refuse(Reason.UNREADABLE_INSTANCE, f"{path.name}: unreadable header value: {exc}") from exc


def _pixel_element(
    fp: Any, transfer_syntax: str, implicit: bool | None
) -> tuple[int | None, int, int | None]:
    """(value offset for native little-endian data or None, value length, tag) of the element at fp.

    ``implicit`` is the VR encoding pydicom actually found (files sometimes contradict their transfer
    syntax); the fast path is only used where the element header is exactly what is expected.
    """
    if transfer_syntax == str(DeflatedExplicitVRLittleEndian):
        # pydicom inflated the data set into memory: fp says nothing; the decoder checks Pixel Data.
        return None, 0, PIXEL_DATA_TAG
    start = fp.tell()
    head = fp.read(12)
    if len(head) < 8:
        return None, 0, None
    order = ">" if transfer_syntax == str(ExplicitVRBigEndian) else "<"
    group, element = struct.unpack(f"{order}HH", head[:4])
    tag = (group << 16) | element
    if transfer_syntax not in NATIVE_LITTLE_ENDIAN or implicit is None:
        return None, 0, tag
    if implicit:
        (length,) = struct.unpack("<I", head[4:8])
        offset = start + 8
    elif len(head) == 12 and head[4:6] in (b"OB", b"OW", b"UN") and head[6:8] == b"\0\0":
        (length,) = struct.unpack("<I", head[8:12])
        offset = start + 12
    else:
        return None, 0, tag
    if length == 0xFFFFFFFF:  # encapsulated in a native syntax: let pydicom sort it out
        return None, 0, tag
    return offset, length, tag


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return tag


TAGS: dict[str, int] = {
    keyword: _tag(keyword)
    for keyword in (
        "SOPClassUID",
        "SOPInstanceUID",
        "Modality",
        "ImageType",
        "ContentTime",
        "AcquisitionTime",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "FrameOfReferenceUID",
        "AcquisitionNumber",
        "InstanceNumber",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "TemporalPositionIdentifier",
        "SliceThickness",
        "SpacingBetweenSlices",
        "TriggerTime",
        "GantryDetectorTilt",
        "CardiacNumberOfImages",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "NumberOfFrames",
        "Rows",
        "Columns",
        "PixelSpacing",
        "BitsAllocated",
        "BitsStored",
        "PixelRepresentation",
        "RescaleIntercept",
        "RescaleSlope",
        "ModalityLUTSequence",
        "FrameType",
        "TemporalPositionIndex",
        "NominalCardiacTriggerDelayTime",
        "FrameAcquisitionDateTime",
        "MediaStorageSOPClassUID",
        "MediaStorageSOPInstanceUID",
    )
}


def _text(ds: Dataset | None, keyword: str) -> str:
    return values.text(ds, TAGS[keyword])


def _int(ds: Dataset | None, keyword: str) -> int | None:
    return values.integer(ds, TAGS[keyword])


def _float(ds: Dataset | None, keyword: str) -> float | None:
    return values.number(ds, TAGS[keyword])


def _floats(ds: Dataset | None, keyword: str, count: int, where: str) -> tuple[float, ...] | None:
    if ds is None:
        return None
    tag = TAGS[keyword]
    numbers = values.numbers(ds, tag)
    if numbers is None:
        written = values.raw_text_or_numbers(ds, tag)
        if written is None or not any(written):
            return None
        raise refuse(
            Reason.INVALID_GEOMETRY,
            f"{where}: {keyword} {chr(92).join(written)!r} is not numeric; {count} numbers are required",
        )
    if len(numbers) != count:
        raise refuse(
            Reason.INVALID_GEOMETRY,
            f"{where}: {keyword} has {len(numbers)} values {tuple(numbers)}; {count} are required",
        )
    return tuple(numbers)


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


def _time_seconds(text: str) -> float | None:
    """HHMMSS.FFFFFF (TM) or the time part of YYYYMMDDHHMMSS.FFFFFF (DT) as seconds since midnight."""
    text = text.strip()
    if not text:
        return None
    if len(text) >= 14 and text[:8].isdigit() and "." not in text[:8]:
        text = text[8:]  # DT: drop the date
    text = text.split("+")[0].split("-")[0].replace(":", "")
    if len(text) < 2:
        return None
    try:
        hours = int(text[0:2])
        minutes = int(text[2:4]) if len(text) >= 4 else 0
        seconds = float(text[4:]) if len(text) > 4 else 0.0
    except ValueError:
        return None
    return hours * 3600.0 + minutes * 60.0 + seconds


def _item(ds: Dataset | None, keyword: str) -> Dataset | None:
    if ds is None or keyword not in ds:
        return None
    seq = ds.get(keyword)
    if not seq:
        return None
    item = seq[0]
    return item if isinstance(item, Dataset) else None


def _uid(ds: Dataset, keyword: str, meta_keyword: str, fallbacks: list[str]) -> str:
    value = _text(ds, keyword)
    if not value:
        meta = _text(ds.file_meta, meta_keyword) if hasattr(ds, "file_meta") else ""
        if meta:
            fallbacks.append(keyword)
            return meta
    return value


def _frames(
    ds: Dataset, path: Path, transfer_syntax: str, pixel_offset: int | None, pixel_length: int
) -> list[FrameHeader]:
    fallbacks: list[str] = []
    sop_class = _uid(ds, "SOPClassUID", "MediaStorageSOPClassUID", fallbacks)
    sop_instance = _uid(ds, "SOPInstanceUID", "MediaStorageSOPInstanceUID", fallbacks)
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    is_enhanced = shared is not None or bool(per_frame)
    number_of_frames = _int(ds, "NumberOfFrames") or 1
    bits_allocated = _int(ds, "BitsAllocated") or 0
    info = FileHeader(
        path=path,
        transfer_syntax=transfer_syntax,
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
        modality=_text(ds, "Modality"),
        rows=_int(ds, "Rows") or 0,
        columns=_int(ds, "Columns") or 0,
        samples_per_pixel=_int(ds, "SamplesPerPixel") or 1,
        photometric=_text(ds, "PhotometricInterpretation"),
        bits_allocated=bits_allocated,
        bits_stored=_int(ds, "BitsStored") or bits_allocated,
        pixel_representation=_int(ds, "PixelRepresentation") or 0,
        number_of_frames=number_of_frames,
        has_modality_lut=TAGS["ModalityLUTSequence"] in ds,
        cardiac_number_of_images=_int(ds, "CardiacNumberOfImages"),
        gantry_tilt=_float(ds, "GantryDetectorTilt"),
        pixel_offset=pixel_offset,
        pixel_length=pixel_length,
        uid_fallbacks=tuple(fallbacks),
        is_enhanced=is_enhanced,
    )
    where = path.name
    top_type = _text(ds, "ImageType")
    acquisition_number = _int(ds, "AcquisitionNumber")
    instance_number = _int(ds, "InstanceNumber")
    if not is_enhanced:
        return [
            FrameHeader(
                file=info,
                frame_index=index,
                position=_position(ds, where),
                orientation=_orientation(ds, where),
                pixel_spacing=_spacing(ds, where),
                slice_thickness=_float(ds, "SliceThickness"),
                spacing_between_slices=_float(ds, "SpacingBetweenSlices"),
                slope=_float(ds, "RescaleSlope"),
                intercept=_float(ds, "RescaleIntercept"),
                acquisition_number=acquisition_number,
                temporal_position=_int(ds, "TemporalPositionIdentifier"),
                trigger_time=_float(ds, "TriggerTime"),
                content_time=_time_seconds(_text(ds, "ContentTime")),
                acquisition_time=_time_seconds(_text(ds, "AcquisitionTime")),
                instance_number=instance_number,
                image_type=top_type,
            )
            for index in range(number_of_frames)
        ]
    frames = []
    items = list(per_frame or [])
    for index in range(number_of_frames):
        item = items[index] if index < len(items) else None
        frame_where = f"{where} frame {index + 1}"

        def group(keyword: str, item: Dataset | None = item) -> Dataset | None:
            return _item(item, keyword) or _item(shared, keyword)

        measures = group("PixelMeasuresSequence")
        transform = group("PixelValueTransformationSequence")
        content = group("FrameContentSequence")
        cardiac = group("CardiacSynchronizationSequence")
        frame_type = group("MRImageFrameTypeSequence") or group("CTImageFrameTypeSequence")
        frame_type_text = _text(frame_type, "FrameType")
        frames.append(
            FrameHeader(
                file=info,
                frame_index=index,
                position=_position(group("PlanePositionSequence"), frame_where) or _position(ds, frame_where),
                orientation=_orientation(group("PlaneOrientationSequence"), frame_where)
                or _orientation(ds, frame_where),
                pixel_spacing=_spacing(measures, frame_where) or _spacing(ds, frame_where),
                slice_thickness=_first(_float(measures, "SliceThickness"), _float(ds, "SliceThickness")),
                spacing_between_slices=_first(
                    _float(measures, "SpacingBetweenSlices"), _float(ds, "SpacingBetweenSlices")
                ),
                slope=_float(transform, "RescaleSlope") if transform else _float(ds, "RescaleSlope"),
                intercept=_float(transform, "RescaleIntercept")
                if transform
                else _float(ds, "RescaleIntercept"),
                acquisition_number=acquisition_number,
                temporal_position=_int(content, "TemporalPositionIndex"),
                trigger_time=_first(
                    _float(cardiac, "NominalCardiacTriggerDelayTime"), _float(ds, "TriggerTime")
                ),
                content_time=_time_seconds(_text(content, "FrameAcquisitionDateTime")),
                acquisition_time=None,
                instance_number=instance_number,
                image_type=frame_type_text or top_type,
            )
        )
    return frames


def _position(ds: Dataset | None, where: str) -> tuple[float, float, float] | None:
    values = _floats(ds, "ImagePositionPatient", 3, where)
    return (values[0], values[1], values[2]) if values else None


def _orientation(ds: Dataset | None, where: str) -> tuple[float, float, float, float, float, float] | None:
    v = _floats(ds, "ImageOrientationPatient", 6, where)
    return (v[0], v[1], v[2], v[3], v[4], v[5]) if v else None


def _spacing(ds: Dataset | None, where: str) -> tuple[float, float] | None:
    values = _floats(ds, "PixelSpacing", 2, where)
    return (values[0], values[1]) if values else None
