"""Source image headers, made fit to derive a result object from.

Real archives send sources that highdicom refuses as they are: dates such as ``20120000`` or a
birth date ``00000000``, a different FrameOfReferenceUID on every image of one stack, absent Type 2
attributes, UIDs with leading-zero components. ``prepare_sources`` never changes the caller's data
sets: it builds small copies holding only the attributes a result object takes from its sources,
repairs what can be repaired without changing what is referenced, and says what it did in ``notes``.

UIDs that identify the sources (Study, Series, SOP Instance) are kept exactly as received even when
they are not valid UI values: a result must point at the instances the archive holds, in the study
the archive holds. Everything else that is invalid is written empty (all such attributes are Type 2)
rather than copied.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from highdicom.spatial import VOLUME_INDEX_CONVENTION, get_normal_vector
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import DA, DT, TM, validate_value

from pipelines.base import PipelineError
from pipelines.outputs.uids import is_valid_uid

# Copied from the first source (in slice order) only: patient, study and source equipment.
_PATIENT_STUDY = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "TypeOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "ReferringPhysicianName",
    "StudyDescription",
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription",
    # The source's equipment becomes an item of ContributingEquipmentSequence (never top level).
    "Manufacturer",
    "ManufacturerModelName",
    "DeviceSerialNumber",
    "SoftwareVersions",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
)
# Copied from every source.
_PER_IMAGE = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "Rows",
    "Columns",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
)
# Type 2 attributes a result object copies; written empty where the source lacks them.
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
_IDENTIFYING_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
_PER_IMAGE_TAGS = tuple(
    (keyword, BaseTag(tag_for_keyword(keyword) or 0)) for keyword in (*_PER_IMAGE, "NumberOfFrames")
)
_NUMBER_OF_FRAMES = BaseTag(0x00280008)
_FRAME_OF_REFERENCE_UID = BaseTag(0x00200052)
_DATE_TIME_PARSERS: dict[str, Any] = {"DA": DA, "TM": TM, "DT": DT}
_PATIENT_SEX = {"M", "F", "O", ""}
_UNCHECKED_VRS = {"SQ", "UI", "OB", "OD", "OF", "OL", "OV", "OW", "UN"}  # UIDs: kept as received
_ORIENTATION_TOLERANCE = 1e-4
_POSITION_TOLERANCE = 1e-3  # mm along the slice normal: closer slices count as the same position


@dataclass
class PreparedSources:
    """Sanitised copies of the sources, sorted along the slice normal (ascending distance)."""

    headers: list[Dataset]
    # order[k]: index, in the caller's sequence, of the k-th slice in sorted order
    order: npt.NDArray[np.intp]
    positions: npt.NDArray[np.float64]  # (N, 3) ImagePositionPatient in sorted order
    orientation: tuple[float, ...]
    sop_class_uids: list[str]  # in sorted order, as received
    sop_instance_uids: list[str]  # in sorted order, as received
    notes: list[str] = field(default_factory=list)

    @property
    def first(self) -> Dataset:
        return self.headers[0]


def _value_text(value: Any) -> str:
    return "" if value is None else str(value)


def _check_value(header: Dataset, keyword: str, notes: list[str]) -> None:
    """Blank (Type 2 or 3 attributes only) a value that is invalid for its VR, and say so."""
    elem = header.data_element(keyword)
    if elem is None or elem.VR in _UNCHECKED_VRS or elem.value is None or elem.value == "":
        return
    values = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
    try:
        for value in values:
            validate_value(elem.VR, value, config.RAISE)
            if elem.VR in _DATE_TIME_PARSERS and str(value).strip():
                _DATE_TIME_PARSERS[elem.VR](str(value).strip())
    except ValueError:
        _set(header, keyword, "")
        notes.append(f"source {keyword} {_value_text(elem.value)!r} is not a valid {elem.VR}; written empty")


def _check_character_set(header: Dataset, notes: list[str]) -> None:
    if "SpecificCharacterSet" not in header:
        return
    value = header.SpecificCharacterSet
    terms = [str(v).strip() for v in (value if isinstance(value, MultiValue) else [value])]
    if not any(terms):
        del header.SpecificCharacterSet  # empty: the default repertoire
        return
    try:
        for term in terms:
            if term:
                hd.enum.SpecificCharacterSetValues(term)
    except ValueError:
        # Text values are already decoded; UTF-8 can encode whatever they hold.
        _set(header, "SpecificCharacterSet", "ISO_IR 192")
        notes.append(
            f"source SpecificCharacterSet {terms!r} is not a defined term; ISO_IR 192 (UTF-8) is used"
        )


def _sanitise_first(header: Dataset, notes: list[str]) -> None:
    _check_character_set(header, notes)
    if "PatientSex" in header:
        sex = _value_text(header.PatientSex).strip()
        if sex.upper() not in _PATIENT_SEX:
            notes.append(f"source PatientSex {sex!r} is not M, F or O; written empty")
            _set(header, "PatientSex", "")
        elif sex.upper() != _value_text(header.PatientSex):
            _set(header, "PatientSex", sex.upper())
    for keyword in _PATIENT_STUDY:
        if keyword in header:
            _check_value(header, keyword, notes)
    missing = [keyword for keyword in _TYPE2 if keyword not in header]
    for keyword in missing:
        _set(header, keyword, "")
    if missing:
        notes.append(f"source lacks Type 2 attribute(s) {', '.join(missing)}; written empty")


def _set(header: Dataset, keyword: str, value: Any) -> None:
    """Replace (never modify: elements are shared with the caller's data sets) an element."""
    tag = tag_for_keyword(keyword)
    assert tag is not None
    header[tag] = DataElement(tag, dictionary_VR(tag), value)


def _copy(source: Dataset, keywords: Sequence[str], into: Dataset) -> None:
    """Copy elements by reference (they are replaced, never modified); sequences deep."""
    for keyword in keywords:
        if keyword in source:
            elem = source.data_element(keyword)
            if elem is not None:
                into[elem.tag] = copy.deepcopy(elem) if elem.VR == "SQ" else elem


def _float_list(value: Any, n: int, what: str, index: int) -> list[float]:
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError) as exc:
        raise PipelineError("source_geometry_invalid", f"source {index}: {what} {value!r}") from exc
    if len(values) != n or not all(np.isfinite(values)):
        raise PipelineError("source_geometry_invalid", f"source {index}: {what} {value!r}")
    return values


def _fetch(source: Dataset) -> dict[str, DataElement]:
    """The per-image elements of ``source`` (tag-keyed look-ups: keyword access is slow)."""
    out = {}
    for keyword, tag in _PER_IMAGE_TAGS:
        elem = source.get(tag)
        if elem is not None:
            out[keyword] = elem
    return out


def _text(elements: dict[str, DataElement], keyword: str) -> str:
    elem = elements.get(keyword)
    return "" if elem is None or elem.value is None else str(elem.value).strip()


def prepare_sources(sources: Sequence[Dataset], *, derived_frame_of_reference_uid: str) -> PreparedSources:
    """Check, copy and sort single-frame source headers (pixel data is neither needed nor copied).

    ``derived_frame_of_reference_uid`` is used only when no source has a FrameOfReferenceUID.
    Raises ``PipelineError`` for sources no result can be derived from (several series, missing
    UIDs, mixed orientations or sizes, duplicate positions, multi-frame images).
    """
    if len(sources) == 0:
        raise PipelineError("no_sources", "a result object needs at least one source image")
    notes: list[str] = []
    fetched = [_fetch(src) for src in sources]
    for index, elements in enumerate(fetched):
        for keyword in _IDENTIFYING_UIDS:
            if not _text(elements, keyword):
                raise PipelineError("source_uid_missing", f"source {index} has no {keyword}")
        if int(_text(elements, "NumberOfFrames") or 1) > 1:
            raise PipelineError(
                "multiframe_source_unsupported", f"source {index} is a multi-frame image; give single frames"
            )
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
            if not _text(elements, keyword):
                raise PipelineError("source_geometry_missing", f"source {index} has no {keyword}")
    column = {keyword: [_text(e, keyword) for e in fetched] for keyword in _IDENTIFYING_UIDS}
    for keyword, values in column.items():
        if not all(value.isascii() and value.isprintable() for value in values):
            raise PipelineError("source_uid_invalid", f"a source {keyword} holds characters no UID may hold")
    bad_classes = sorted({uid for uid in column["SOPClassUID"] if not is_valid_uid(uid)})
    if bad_classes:
        raise PipelineError("source_uid_invalid", f"source SOPClassUID {bad_classes[0]!r} is not a UID")
    studies, series = set(column["StudyInstanceUID"]), set(column["SeriesInstanceUID"])
    if len(studies) > 1 or len(series) > 1:
        raise PipelineError("mixed_series", f"sources span {len(studies)} studies and {len(series)} series")
    sizes = {(int(e["Rows"].value), int(e["Columns"].value)) for e in fetched}
    if len(sizes) > 1:
        raise PipelineError("mixed_sizes", f"sources have different sizes: {sorted(sizes)}")
    if len(set(column["SOPInstanceUID"])) != len(sources):
        raise PipelineError(
            "duplicate_instances", "a SOP Instance UID occurs more than once among the sources"
        )

    orientations = np.array(
        [
            _float_list(e["ImageOrientationPatient"].value, 6, "ImageOrientationPatient", i)
            for i, e in enumerate(fetched)
        ]
    )
    if np.abs(orientations - orientations[0]).max() > _ORIENTATION_TOLERANCE:
        raise PipelineError("mixed_orientations", "sources do not share one ImageOrientationPatient")
    positions = np.array(
        [
            _float_list(e["ImagePositionPatient"].value, 3, "ImagePositionPatient", i)
            for i, e in enumerate(fetched)
        ]
    )
    normal = get_normal_vector(orientations[0].tolist(), index_convention=VOLUME_INDEX_CONVENTION)
    distances = positions @ normal
    order = np.argsort(distances, kind="stable")
    if len(sources) > 1 and np.diff(distances[order]).min() < _POSITION_TOLERANCE:
        raise PipelineError("duplicate_slice_positions", "two sources lie at the same slice position")

    iop_elem = fetched[order[0]]["ImageOrientationPatient"]
    if np.abs(orientations - orientations[0]).max() > 0:
        notes.append(
            "source ImageOrientationPatient values differ by less than "
            f"{_ORIENTATION_TOLERANCE}; the first slice's is used for all"
        )

    present = [uid for uid in (_text(fetched[i], "FrameOfReferenceUID") for i in order) if uid]
    if not present:
        frame_of_reference = derived_frame_of_reference_uid
        notes.append(f"sources have no FrameOfReferenceUID; a derived one is used ({frame_of_reference})")
    else:
        frame_of_reference = present[0]
        distinct = len(set(present))
        if distinct > 1 or len(present) < len(sources):
            notes.append(
                f"sources carry {distinct} different FrameOfReferenceUIDs"
                + (f" ({len(sources) - len(present)} none)" if len(present) < len(sources) else "")
                + f" for one stack of one series; the first slice's ({frame_of_reference}) is used"
            )
    frame_of_reference_elem = DataElement(_FRAME_OF_REFERENCE_UID, "UI", frame_of_reference)

    headers: list[Dataset] = []
    for index in order:
        by_tag: dict[BaseTag, DataElement | RawDataElement] = {
            elem.tag: elem for elem in fetched[index].values()
        }
        by_tag.pop(_NUMBER_OF_FRAMES, None)
        by_tag[iop_elem.tag] = iop_elem
        by_tag[frame_of_reference_elem.tag] = frame_of_reference_elem
        headers.append(Dataset(by_tag))  # a new data set of the (shared, never modified) elements
    _copy(sources[order[0]], _PATIENT_STUDY, headers[0])
    _sanitise_first(headers[0], notes)

    invalid = sorted(
        {uid for keyword in _IDENTIFYING_UIDS[:3] for uid in column[keyword] if not is_valid_uid(uid)}
    )
    if invalid:
        notes.append(
            f"{len(invalid)} source UID(s) are not valid UI values (e.g. {invalid[0]}: leading zeros or "
            "bad characters); they are referenced unchanged so that the result points at the archived "
            "instances and study"
        )
    return PreparedSources(
        headers=headers,
        order=order.astype(np.intp),
        positions=positions[order],
        orientation=tuple(float(v) for v in orientations[0]),
        sop_class_uids=[column["SOPClassUID"][i] for i in order],
        sop_instance_uids=[column["SOPInstanceUID"][i] for i in order],
        notes=notes,
    )
