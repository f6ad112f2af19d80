"""DICOM Segmentation (BINARY, Explicit VR Little Endian) from masks over a stack of source images.

``write_seg`` makes the object ``highdicom.seg.Segmentation`` makes of the same input, element for
element, in a fraction of the time (bench/seg_write.py: 512 x 512 x 200, 2 segments). highdicom's
cost grows with the number of sources and frames (per-source IOD table look-ups, one pydicom
Dataset per frame, pydicom encoding every nested item); here:

- highdicom builds the header (patient, study, series, equipment, segment descriptions, shared
  functional groups, dimension index) from the first source and a one-voxel stand-in mask;
- what highdicom derives from all sources and frames is computed here by the same rules, with
  numpy over the whole stack: the references to every source instance (SourceImageSequence,
  ReferencedSeriesSequence), the slice spacing, which (segment, slice) frames are stored (empty
  ones are omitted unless all are empty), their order (segment by segment, slices by ascending
  position along the normal), Dimension Index Values, SegmentsOverlap, DimensionOrganizationType;
- the large, repetitive elements (those references, the Per-Frame Functional Groups, Pixel Data)
  are encoded straight to bytes (``_encode``), frames packed with ``numpy.packbits`` (PS3.5 8.1.1:
  BitsAllocated 1, little bit order, frames back to back), and pydicom writes them as they are.

``tests/test_outputs.py`` compares the result with highdicom's own construction
(``method="highdicom"``) element by element, and reads it back with dcmqi and Cornerstone.
The only intended difference: odd-length Pixel Data is padded with 0x00 (PS3.5 8.1.1), where
highdicom pads with ``b"0"``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from highdicom.spatial import get_volume_positions
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

from pipelines.base import PipelineError
from pipelines.outputs import _encode as enc
from pipelines.outputs.provenance import SEGNODE_MANUFACTURER, segnode_version
from pipelines.outputs.segments import Algorithm, SegmentSpec
from pipelines.outputs.sources import PreparedSources, prepare_sources
from pipelines.outputs.uids import OutputIdentity

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

_PFFG = 0x52009230
_PIXEL_DATA = 0x7FE00010
_DERIVATION_IMAGE_SEQ = 0x00089124
_SOURCE_IMAGE_SEQ = 0x00082112
_DERIVATION_CODE_SEQ = 0x00089215
_REF_SOP_CLASS = 0x00081150
_REF_SOP_INSTANCE = 0x00081155
_SPATIAL_LOCATIONS_PRESERVED = 0x0028135A
_PURPOSE_OF_REFERENCE_SEQ = 0x0040A170
_FRAME_CONTENT_SEQ = 0x00209111
_DIMENSION_INDEX_VALUES = 0x00209157
_PLANE_POSITION_SEQ = 0x00209113
_IMAGE_POSITION = 0x00200032
_SEGMENT_IDENTIFICATION_SEQ = 0x0062000A
_REFERENCED_SERIES_SEQ = 0x00081115
_REFERENCED_INSTANCE_SEQ = 0x0008114A
_SERIES_INSTANCE_UID = 0x0020000E
_REF_SEGMENT_NUMBER = 0x0062000B

Method = Literal["fast", "highdicom"]


@dataclass(frozen=True)
class SegResult:
    path: Path
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    frame_of_reference_uid: str
    number_of_frames: int
    segment_numbers: tuple[int, ...]
    empty_segments: tuple[int, ...]  # segments without a single voxel (described, no frames)
    segments_overlap: bool
    notes: list[str] = field(default_factory=list)


def _as_segment_stack(
    masks: npt.NDArray[Any], n_segments: int, shape: tuple[int, int, int]
) -> npt.NDArray[np.bool_]:
    """(segments, slices, rows, cols) booleans from a stack of binary masks or a label map."""
    if masks.ndim == 3:
        if masks.shape != shape:
            raise PipelineError("mask_shape", f"label map shape {masks.shape} does not match sources {shape}")
        if masks.dtype == np.bool_:
            if n_segments != 1:
                raise PipelineError(
                    "mask_shape", f"a boolean label map describes 1 segment, not {n_segments}"
                )
            return masks[np.newaxis]
        if masks.dtype.kind not in "iu":
            raise PipelineError("mask_dtype", f"a label map must be integer, not {masks.dtype}")
        low, high = int(masks.min()), int(masks.max())
        if low < 0 or high > n_segments:
            raise PipelineError("mask_labels", f"labels {low}..{high} outside 0..{n_segments}")
        return np.stack([masks == k for k in range(1, n_segments + 1)])
    if masks.ndim == 4:
        if masks.shape != (n_segments, *shape):
            raise PipelineError(
                "mask_shape", f"mask stack shape {masks.shape} does not match {(n_segments, *shape)}"
            )
        if masks.dtype == np.bool_:
            return masks
        if masks.dtype.kind not in "iu":
            raise PipelineError("mask_dtype", f"binary masks must be boolean or integer, not {masks.dtype}")
        if masks.size and (int(masks.min()) < 0 or int(masks.max()) > 1):
            raise PipelineError("mask_labels", "a stack of binary masks may only hold 0 and 1")
        if masks.dtype.itemsize == 1:
            return masks.view(np.bool_)
        return masks.astype(np.bool_)
    raise PipelineError(
        "mask_shape", f"masks must be (segments, slices, rows, cols) or a label map, not {masks.shape}"
    )


def _words(stack: npt.NDArray[np.bool_]) -> npt.NDArray[Any]:
    """(segments, slices, k) view for fast ``any``: 8 voxels per uint64 word where the layout allows."""
    flat = np.ascontiguousarray(stack).reshape(stack.shape[0], stack.shape[1], -1)
    if flat.shape[2] % 8 == 0:
        return flat.view(np.uint64)
    return flat


def _segments_overlap(stack: npt.NDArray[np.bool_], nonempty: npt.NDArray[np.bool_]) -> bool:
    words = _words(stack)
    for i in range(stack.shape[0]):
        for j in range(i + 1, stack.shape[0]):
            for plane in np.flatnonzero(nonempty[i] & nonempty[j]):
                if np.any(words[i, plane] & words[j, plane]):
                    return True
    return False


def _pack_frames(
    stack: npt.NDArray[np.bool_], segment_index: npt.NDArray[np.intp], slice_index: npt.NDArray[np.intp]
) -> bytes:
    """Frames ``stack[segment_index[k], slice_index[k]]`` packed 8 pixels a byte, LSB first, no gaps."""
    if stack.shape[2] * stack.shape[3] % 8 == 0:  # frames end on byte boundaries: pack one by one
        packed = b"".join(
            np.packbits(stack[s, p], axis=None, bitorder="little").tobytes()
            for s, p in zip(segment_index.tolist(), slice_index.tolist(), strict=True)
        )
    else:
        packed = np.packbits(stack[segment_index, slice_index], axis=None, bitorder="little").tobytes()
    return packed + b"\x00" if len(packed) % 2 else packed


class _FrameEncoder:
    """Per-Frame Functional Groups items as highdicom builds them (see Image._get_pffg_item)."""

    def __init__(self, prepared: PreparedSources, position_text: Sequence[str]) -> None:
        derivation_code = enc.sequence(
            _DERIVATION_CODE_SEQ,
            [enc.dataset_bytes(hd.sr.CodedConcept.from_code(codes.cid7203.SegmentationImageDerivation))],
        )
        purpose = enc.sequence(
            _PURPOSE_OF_REFERENCE_SEQ,
            [
                enc.dataset_bytes(
                    hd.sr.CodedConcept.from_code(codes.cid7202.SourceImageForImageProcessingOperation)
                )
            ],
        )
        preserved = enc.element(_SPATIAL_LOCATIONS_PRESERVED, b"CS", enc.text("YES")) + purpose
        self._derivation: list[bytes] = []
        self._position: list[bytes] = []
        for sop_class, sop_instance, ipp in zip(
            prepared.sop_class_uids, prepared.sop_instance_uids, position_text, strict=True
        ):
            source_item = (
                enc.element(_REF_SOP_CLASS, b"UI", enc.ui(sop_class))
                + enc.element(_REF_SOP_INSTANCE, b"UI", enc.ui(sop_instance))
                + preserved
            )
            derivation_item = enc.sequence(_SOURCE_IMAGE_SEQ, [source_item]) + derivation_code
            self._derivation.append(enc.sequence(_DERIVATION_IMAGE_SEQ, [derivation_item]))
            self._position.append(
                enc.sequence(_PLANE_POSITION_SEQ, [enc.element(_IMAGE_POSITION, b"DS", enc.text(ipp))])
            )

    def items(
        self,
        segment_numbers: npt.NDArray[np.intp],
        planes: npt.NDArray[np.intp],
        dimension_index: npt.NDArray[np.intp],
        identify_segment: bool,
    ) -> bytes:
        segment_items = {
            int(s): enc.sequence(
                _SEGMENT_IDENTIFICATION_SEQ, [enc.element(_REF_SEGMENT_NUMBER, b"US", enc.us([s]))]
            )
            for s in np.unique(segment_numbers)
        }
        items = []
        for segment, plane in zip(segment_numbers.tolist(), planes.tolist(), strict=True):
            content = enc.sequence(
                _FRAME_CONTENT_SEQ,
                [enc.element(_DIMENSION_INDEX_VALUES, b"UL", enc.ul([segment, int(dimension_index[plane])]))],
            )
            items.append(
                self._derivation[plane]
                + content
                + self._position[plane]
                + (segment_items[segment] if identify_segment else b"")
            )
        return b"".join(enc.item(content) for content in items)


def _segmentation_kwargs(
    prepared: PreparedSources,
    segments: Sequence[SegmentSpec],
    algorithm: Algorithm,
    identity: OutputIdentity,
    *,
    series_key: str,
    instance_key: str,
    series_number: int,
    series_description: str,
    instance_number: int,
    device_serial_number: str,
    content_label: str,
    content_description: str | None,
) -> dict[str, Any]:
    return {
        "source_images": prepared.headers,
        "segmentation_type": hd.seg.SegmentationTypeValues.BINARY,
        "segment_descriptions": [
            spec.description(number, algorithm, identity.uid("tracking", instance_key, str(number)))
            for number, spec in enumerate(segments, start=1)
        ],
        "series_instance_uid": identity.series_uid(series_key),
        "series_number": series_number,
        "sop_instance_uid": identity.instance_uid(instance_key),
        "instance_number": instance_number,
        "manufacturer": SEGNODE_MANUFACTURER,
        "manufacturer_model_name": identity.pipeline,
        "software_versions": segnode_version(),
        "device_serial_number": device_serial_number,
        "series_description": series_description,
        "content_label": content_label,
        "content_description": content_description,
        "transfer_syntax_uid": ExplicitVRLittleEndian,
        "omit_empty_frames": True,
    }


def _set_dimension_organization_uid(seg: Dataset, uid: str) -> None:
    seg.DimensionOrganizationSequence[0].DimensionOrganizationUID = uid
    for index_item in seg.get("DimensionIndexSequence", []):
        index_item.DimensionOrganizationUID = uid


def _write_atomically(path: Path, ds: Dataset) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pydicom.dcmwrite(tmp, ds, enforce_file_format=True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_seg(
    sources: Sequence[Dataset],
    masks: npt.NDArray[Any],
    segments: Sequence[SegmentSpec],
    *,
    algorithm: Algorithm,
    identity: OutputIdentity,
    out_path: Path,
    series_number: int = 901,
    series_description: str = "segnode segmentation",
    series_key: str = "seg",
    instance_key: str = "seg",
    instance_number: int = 1,
    device_serial_number: str = "segnode",
    content_label: str = "SEGMENTATION",
    content_description: str | None = None,
    method: Method = "fast",
) -> SegResult:
    """Write a BINARY DICOM-SEG of ``masks`` over ``sources`` to ``out_path`` (atomically).

    ``sources``: single-frame image headers of one series (pixel data not needed), in any order.
    ``masks``: ``(segments, slices, rows, cols)`` binary masks, or a ``(slices, rows, cols)`` label
    map with values ``0..len(segments)``; slice ``i`` belongs to ``sources[i]``.
    ``segments``: one ``SegmentSpec`` per segment; segment numbers are 1, 2, ... in this order.
    UIDs come from ``identity`` (series: ``series_key``, instance: ``instance_key``), so writing
    the same result again gives the same Series and SOP Instance UIDs.
    ``method="highdicom"`` builds the same object with ``highdicom.seg.Segmentation`` alone
    (slower; kept as the reference and for the benchmark).
    Raises ``PipelineError`` for input no SEG can be made of; ``notes`` says what was repaired.
    """
    if not segments:
        raise PipelineError("no_segments", "a SEG needs at least one segment description")
    prepared = prepare_sources(sources, derived_frame_of_reference_uid=identity.uid("frame-of-reference"))
    first = prepared.first
    n_slices, n_segments = len(prepared.headers), len(segments)
    stack = _as_segment_stack(masks, n_segments, (n_slices, int(first.Rows), int(first.Columns)))
    kwargs = _segmentation_kwargs(
        prepared,
        segments,
        algorithm,
        identity,
        series_key=series_key,
        instance_key=instance_key,
        series_number=series_number,
        series_description=series_description,
        instance_number=instance_number,
        device_serial_number=device_serial_number,
        content_label=content_label,
        content_description=content_description,
    )
    dimension_organization_uid = identity.uid("dimension-organization", instance_key)
    order = prepared.order
    # (segments, slices in the caller's order): does the segment have a voxel in the slice
    nonempty_by_source: npt.NDArray[np.bool_] = np.asarray(
        stack.reshape(n_segments, n_slices, -1).any(axis=2)
    )
    nonempty = nonempty_by_source[:, order]  # (segments, slices in sorted order)
    empty_segments = tuple(int(i) + 1 for i in np.flatnonzero(~nonempty.any(axis=1)))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    if method == "highdicom":
        seg = hd.seg.Segmentation(pixel_array=np.moveaxis(stack[:, order], 0, -1), **kwargs)
        _set_dimension_organization_uid(seg, dimension_organization_uid)
        _write_atomically(out_path, seg)
        frames = int(seg.NumberOfFrames)
        overlap = seg.SegmentsOverlap == "YES"
    elif method == "fast":
        frames, overlap = _write_fast(
            out_path, prepared, stack, nonempty_by_source, kwargs, dimension_organization_uid
        )
    else:
        raise ValueError(f"unknown method {method!r}")
    return SegResult(
        path=out_path,
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=kwargs["series_instance_uid"],
        sop_instance_uid=kwargs["sop_instance_uid"],
        sop_class_uid=SEGMENTATION_STORAGE,
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        number_of_frames=frames,
        segment_numbers=tuple(range(1, n_segments + 1)),
        empty_segments=empty_segments,
        segments_overlap=overlap,
        notes=list(prepared.notes),
    )


def _raw(tag: int, vr: str, value: bytes) -> RawDataElement:
    """An element pydicom writes as it is (explicit VR little endian, defined length)."""
    return RawDataElement(BaseTag(tag), vr, len(value), value, 0, False, True)


def _source_references(prepared: PreparedSources) -> tuple[bytes, bytes]:
    """SourceImageSequence and ReferencedSeriesSequence values over all sources (one series)."""
    items = b"".join(
        enc.item(
            enc.element(_REF_SOP_CLASS, b"UI", enc.ui(sop_class))
            + enc.element(_REF_SOP_INSTANCE, b"UI", enc.ui(sop_instance))
        )
        for sop_class, sop_instance in zip(prepared.sop_class_uids, prepared.sop_instance_uids, strict=True)
    )
    series_item = enc.element(_REFERENCED_INSTANCE_SEQ, b"SQ", items) + enc.element(
        _SERIES_INSTANCE_UID, b"UI", enc.ui(str(prepared.first.SeriesInstanceUID))
    )
    return items, enc.item(series_item)


def _write_fast(
    out_path: Path,
    prepared: PreparedSources,
    stack: npt.NDArray[np.bool_],
    nonempty_by_source: npt.NDArray[np.bool_],
    kwargs: dict[str, Any],
    dimension_organization_uid: str,
) -> tuple[int, bool]:
    n_segments, n_slices, rows, columns = stack.shape
    # Header: highdicom, from the first source and a one-voxel stand-in for its one plane. What
    # highdicom would derive from all sources is filled in below, by highdicom's rules.
    stand_in = np.zeros((1, rows, columns), dtype=np.uint8)
    stand_in[0, 0, 0] = 1
    header = hd.seg.Segmentation(pixel_array=stand_in, **{**kwargs, "source_images": prepared.headers[:1]})

    # Frames: which (segment, slice) frames are stored, in which order, with which indices.
    nonempty = nonempty_by_source[:, prepared.order]
    planes_in_use = nonempty.any(axis=0)
    if planes_in_use.any():
        frame_mask = nonempty
        included = np.flatnonzero(planes_in_use)
    else:  # nothing to omit when every frame is empty: highdicom then stores all of them
        frame_mask = np.ones_like(nonempty)
        included = np.arange(n_slices)
    dimension_index = np.zeros(n_slices, dtype=np.intp)
    dimension_index[included] = np.arange(1, len(included) + 1)
    segment_index, planes = np.nonzero(frame_mask)  # segment by segment, slices ascending
    overlap = n_segments > 1 and _segments_overlap(stack, nonempty_by_source)

    # Shared functional groups: the slice spacing highdicom infers from all source positions.
    measures = header.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    orientation = [
        float(v)
        for v in header.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    ]
    # Positions as highdicom writes and uses them: DS(auto_format=True), i.e. format_number_as_ds.
    position_text = ["\\".join(format_number_as_ds(float(v)) for v in p) for p in prepared.positions]
    positions = np.array([[float(v) for v in text.split("\\")] for text in position_text])
    if "SpacingBetweenSlices" not in prepared.first and n_slices > 1:
        spacing, _ = get_volume_positions(image_positions=positions.tolist(), image_orientation=orientation)
        if spacing is not None:
            measures.SpacingBetweenSlices = format_number_as_ds(spacing)
        elif "SpacingBetweenSlices" in measures:
            del measures.SpacingBetweenSlices

    header.NumberOfFrames = len(planes)
    header.SegmentsOverlap = "YES" if overlap else "NO"
    if "DimensionOrganizationType" in header:
        del header.DimensionOrganizationType
    if n_segments == 1 and len(included) > 1:
        spacing, _ = get_volume_positions(
            image_positions=positions[included].tolist(), image_orientation=orientation, sort=False
        )
        if spacing is not None and spacing > 0.0:
            header.DimensionOrganizationType = "3D"
    _set_dimension_organization_uid(header, dimension_organization_uid)

    # The large, repetitive elements, encoded directly and written by pydicom as they are.
    source_items, series_items = _source_references(prepared)
    per_frame = _FrameEncoder(prepared, position_text).items(
        (segment_index + 1).astype(np.intp),
        planes.astype(np.intp),
        dimension_index,
        identify_segment=n_segments > 1,
    )
    ds = Dataset(header)  # the same elements (and dict) as ``header``, as a plain data set
    ds.file_meta = header.file_meta
    ds.preamble = header.preamble
    ds[_SOURCE_IMAGE_SEQ] = _raw(_SOURCE_IMAGE_SEQ, "SQ", source_items)
    ds[_REFERENCED_SERIES_SEQ] = _raw(_REFERENCED_SERIES_SEQ, "SQ", series_items)
    ds[_PFFG] = _raw(_PFFG, "SQ", per_frame)
    ds[_PIXEL_DATA] = _raw(_PIXEL_DATA, "OB", _pack_frames(stack, segment_index, prepared.order[planes]))
    # The data set is explicit VR little endian as built: lets pydicom write the raw elements as
    # they are instead of decoding and re-encoding them.
    charset = ds.get("SpecificCharacterSet")
    ds.set_original_encoding(False, True, convert_encodings(charset) if charset else default_encoding)
    _write_atomically(out_path, ds)
    return len(planes), overlap
