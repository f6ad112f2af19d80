"""DICOM SR measurement report (TID 1500) with the volume of each segment of a segnode SEG.

One Comprehensive 3D SR per SEG: TID 1500 Measurement Report whose imaging measurements are one
TID 1411 Volumetric ROI group per segment. Each group references its segment of the SEG
(``ReferencedSegment``: SEG SOP Instance UID + segment number, and the source series), names the
finding (the segment's property type, e.g. Liver, Lesion; its anatomic region as finding site) and
carries the measurements: Volume (SCT 118565006) in UCUM ``ml`` and, for segments whose connected
components are counted, Number of lesions (SCT 246206008) in UCUM ``{lesions}``. The SEG and the
source images are listed as evidence (Current Requested Procedure Evidence Sequence).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pipelines.base import PipelineError
from pipelines.outputs.provenance import SEGNODE_MANUFACTURER, segnode_version
from pipelines.outputs.segments import Algorithm
from pipelines.outputs.sources import prepare_sources
from pipelines.outputs.uids import OutputIdentity, derive_uid

COMPREHENSIVE_3D_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"
UNIT_ML = Code("ml", "UCUM", "milliliter")
UNIT_LESIONS = Code("{lesions}", "UCUM", "lesions")
VOLUME = codes.SCT.Volume  # SCT 118565006
NUMBER_OF_LESIONS = codes.SCT.NumberOfLesions  # SCT 246206008
_PROCEDURES = {
    "CT": codes.LN.CTUnspecifiedBodyRegion,  # LN 25045-6
    "MR": codes.LN.MRIUnspecifiedBodyRegion,  # LN 25056-3
}


@dataclass(frozen=True)
class SegmentMeasurement:
    segment_number: int
    volume_ml: float
    lesion_count: int | None = None  # connected components, for segments of countable findings


@dataclass(frozen=True)
class SrResult:
    path: Path
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    notes: list[str] = field(default_factory=list)


def _code(item: Dataset) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(
        value=str(item.CodeValue),
        scheme_designator=str(item.CodingSchemeDesignator),
        meaning=str(item.CodeMeaning),
        scheme_version=item.get("CodingSchemeVersion"),
    )


def _segments_of(seg: Dataset) -> dict[int, Dataset]:
    return {int(item.SegmentNumber): item for item in seg.get("SegmentSequence", [])}


def write_measurement_report(
    seg: Path | Dataset,
    sources: Sequence[Dataset],
    measurements: Sequence[SegmentMeasurement],
    *,
    algorithm: Algorithm,
    identity: OutputIdentity,
    out_path: Path,
    series_number: int = 902,
    series_description: str = "segnode measurements",
    series_key: str = "sr",
    instance_key: str = "sr",
    instance_number: int = 1,
    device_serial_number: str = "segnode",
    procedure_reported: Code | None = None,
) -> SrResult:
    """Write a TID 1500 measurement report on the segments of ``seg`` (a path or a header).

    ``sources`` are the SEG's source images (headers); ``measurements`` one entry per reported
    segment. UIDs derive from ``identity`` like the SEG's (``series_key``/``instance_key``).
    """
    header = pydicom.dcmread(seg, stop_before_pixels=True) if isinstance(seg, (str, Path)) else seg
    if str(header.get("SOPClassUID", "")) != "1.2.840.10008.5.1.4.1.1.66.4":
        raise PipelineError("not_a_segmentation", "measurements must refer to a DICOM Segmentation")
    described = _segments_of(header)
    prepared = prepare_sources(sources, derived_frame_of_reference_uid=identity.uid("frame-of-reference"))
    source_series = str(prepared.first.SeriesInstanceUID)
    modality = str(prepared.first.get("Modality", ""))
    procedure = procedure_reported or _PROCEDURES.get(modality, codes.SCT.Imaging)
    measurement_algorithm = hd.sr.AlgorithmIdentification(name=algorithm.name, version=algorithm.version)

    groups = []
    for measurement in measurements:
        segment = described.get(measurement.segment_number)
        if segment is None:
            raise PipelineError("unknown_segment", f"the SEG has no segment {measurement.segment_number}")
        items = [hd.sr.Measurement(name=VOLUME, value=float(measurement.volume_ml), unit=UNIT_ML)]
        if measurement.lesion_count is not None:
            items.append(
                hd.sr.Measurement(
                    name=NUMBER_OF_LESIONS, value=int(measurement.lesion_count), unit=UNIT_LESIONS
                )
            )
        sites = [hd.sr.FindingSite(_code(region)) for region in segment.get("AnatomicRegionSequence", [])]
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=identity.uid("tracking", instance_key, str(measurement.segment_number)),
                    identifier=str(segment.SegmentLabel),
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=str(header.SOPClassUID),
                    sop_instance_uid=str(header.SOPInstanceUID),
                    segment_number=measurement.segment_number,
                    source_series=hd.sr.SourceSeriesForSegmentation(source_series),
                ),
                finding_type=_code(segment.SegmentedPropertyTypeCodeSequence[0]),
                finding_sites=sites or None,
                algorithm_id=measurement_algorithm,
                measurements=items,
            )
        )

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derive_uid("device-observer", identity.pipeline, device_serial_number),
            name=identity.pipeline,
            manufacturer_name=SEGNODE_MANUFACTURER,
            model_name=identity.pipeline,
            serial_number=device_serial_number,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure,
        imaging_measurements=groups,
    )
    kwargs: dict[str, Any] = {
        "series_description": series_description,
        "manufacturer_model_name": identity.pipeline,
        "software_versions": segnode_version(),
        "device_serial_number": device_serial_number,
    }
    sr = hd.sr.Comprehensive3DSR(
        evidence=[header, *prepared.headers],
        content=report,
        series_instance_uid=identity.series_uid(series_key),
        series_number=series_number,
        sop_instance_uid=identity.instance_uid(instance_key),
        instance_number=instance_number,
        manufacturer=SEGNODE_MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        **kwargs,
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    sr.save_as(tmp, enforce_file_format=True)
    tmp.replace(out_path)
    return SrResult(
        path=out_path,
        series_instance_uid=str(sr.SeriesInstanceUID),
        sop_instance_uid=str(sr.SOPInstanceUID),
        sop_class_uid=str(sr.SOPClassUID),
        notes=list(prepared.notes),
    )
