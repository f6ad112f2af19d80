"""The mri-cardiac measurement report: one TID 1500 Comprehensive 3D SR over the ED and ES SEGs.

Content:

- TID 1501 groups with the function (finding: SCT Left ventricle / Right ventricle / Left Ventricle
  Myocardium): Left/Right Ventricular ED Volume (LN 8821-1 / 8822-9) and ES Volume (LN 8823-7 /
  8824-5), Stroke Volume (SCT 90096001), ejection fraction by MR (LN 8811-2 / 8818-7); Left Ventricle
  Mass (LN 18087-7, at ED, 1.05 g/ml).
- TID 1411 volumetric groups, one per segment of each SEG, referencing it: its Volume (SCT 118565006).
  Where a phase's images span several series (one per slice location) each series has its own SEG and
  the groups give the volume within that SEG.

Units are UCUM ``ml``, ``g`` and ``%``. Every SEG and every source image of both phases are evidence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pipelines.base import PipelineError
from pipelines.mri_cardiac.function import CardiacFunction
from pipelines.mri_cardiac.labels import SEGMENT_ORDER, Structure
from pipelines.outputs import SEGNODE_MANUFACTURER, Algorithm, OutputIdentity, derive_uid
from pipelines.outputs.provenance import segnode_version
from pipelines.outputs.sources import prepare_sources

UNIT_ML = Code("ml", "UCUM", "milliliter")
UNIT_G = Code("g", "UCUM", "gram")
UNIT_PERCENT = Code("%", "UCUM", "percent")
LV_ED_VOLUME = Code("8821-1", "LN", "Left Ventricular ED Volume")
LV_ES_VOLUME = Code("8823-7", "LN", "Left Ventricular ES Volume")
RV_ED_VOLUME = Code("8822-9", "LN", "Right Ventricular ED Volume")
RV_ES_VOLUME = Code("8824-5", "LN", "Right Ventricular ES Volume")
LV_EF_MR = Code("8811-2", "LN", "Left ventricular ejection fraction by MR")
RV_EF_MR = Code("8818-7", "LN", "Right ventricular ejection fraction by MR")
LV_MASS = Code("18087-7", "LN", "Left Ventricle Mass")
STROKE_VOLUME = Code("90096001", "SCT", "Stroke Volume")
VOLUME = codes.SCT.Volume  # SCT 118565006
LEFT_VENTRICLE = Code("87878005", "SCT", "Left ventricle")
RIGHT_VENTRICLE = Code("53085002", "SCT", "Right ventricle")
LV_MYOCARDIUM = Code("49848007", "SCT", "Left Ventricle Myocardium")
CARDIAC_MRI = Code("58718-8", "LN", "MR Heart")


@dataclass(frozen=True)
class PhaseSeg:
    """A written SEG of one phase: its header, its source images and each structure's volume in it."""

    name: str  # "ED" or "ES"
    seg: Dataset
    sources: Sequence[Dataset]
    volumes_ml: Mapping[Structure, float]


@dataclass(frozen=True)
class ReportResult:
    path: Path
    series_instance_uid: str
    sop_instance_uid: str
    notes: list[str]


def _concept(item: Dataset) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(
        value=str(item.CodeValue),
        scheme_designator=str(item.CodingSchemeDesignator),
        meaning=str(item.CodeMeaning),
    )


def _measurement(name: Code, value: float, unit: Code) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=round(float(value), 3), unit=unit)


Group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations


def _function_groups(
    f: CardiacFunction, identity: OutputIdentity, algorithm: hd.sr.AlgorithmIdentification, notes: list[str]
) -> list[Group]:
    groups: list[Group] = []
    for name, finding, edv, esv, ed_code, es_code, sv, ef, ef_code in (
        ("Left ventricle function", LEFT_VENTRICLE, f.lv_edv_ml, f.lv_esv_ml, LV_ED_VOLUME, LV_ES_VOLUME,
         f.lv_sv_ml, f.lv_ef_percent, LV_EF_MR),
        ("Right ventricle function", RIGHT_VENTRICLE, f.rv_edv_ml, f.rv_esv_ml, RV_ED_VOLUME, RV_ES_VOLUME,
         f.rv_sv_ml, f.rv_ef_percent, RV_EF_MR),
    ):  # fmt: skip
        items = [
            _measurement(ed_code, edv, UNIT_ML),
            _measurement(es_code, esv, UNIT_ML),
            _measurement(STROKE_VOLUME, sv, UNIT_ML),
        ]
        if ef == ef:  # not NaN: an empty ventricle at ED has no ejection fraction
            items.append(_measurement(ef_code, ef, UNIT_PERCENT))
        else:
            notes.append(f"{name}: no ejection fraction (end-diastolic volume 0)")
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=identity.uid("tracking", name), identifier=name
                ),
                finding_type=finding,
                algorithm_id=algorithm,
                measurements=items,
            )
        )
    name = "Left ventricular myocardium"
    groups.append(
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=identity.uid("tracking", name), identifier=name),
            finding_type=LV_MYOCARDIUM,
            algorithm_id=algorithm,
            measurements=[_measurement(LV_MASS, f.lv_mass_g, UNIT_G)],
        )
    )
    return groups


def write_function_report(
    segs: Sequence[PhaseSeg],
    function: CardiacFunction,
    *,
    algorithm: Algorithm,
    identity: OutputIdentity,
    out_path: Path,
    series_number: int = 902,
    series_description: str = "segnode mri-cardiac function",
) -> ReportResult:
    """Write the report; segment numbers follow ``labels.SEGMENT_ORDER`` (RV 1, MYO 2, LV 3)."""
    number = {s: i for i, s in enumerate(SEGMENT_ORDER, start=1)}
    measurement_algorithm = hd.sr.AlgorithmIdentification(name=algorithm.name, version=algorithm.version)
    notes: list[str] = []
    groups = _function_groups(function, identity, measurement_algorithm, notes)
    evidence: list[Dataset] = []
    for phase in segs:
        prepared = prepare_sources(
            phase.sources, derived_frame_of_reference_uid=identity.uid("frame-of-reference")
        )
        notes.extend(n for n in prepared.notes if n not in notes)
        evidence.append(phase.seg)
        evidence.extend(prepared.headers)
        segments = {int(s.SegmentNumber): s for s in phase.seg.get("SegmentSequence", [])}
        for structure in SEGMENT_ORDER:
            segment = segments.get(number[structure])
            if segment is None:
                raise PipelineError(
                    "unknown_segment", f"the {phase.name} SEG has no segment {number[structure]}"
                )
            sites = [hd.sr.FindingSite(_concept(r)) for r in segment.get("AnatomicRegionSequence", [])]
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=identity.uid("tracking", str(phase.seg.SOPInstanceUID), structure.value),
                        identifier=f"{segment.SegmentLabel} at {phase.name}",
                    ),
                    referenced_segment=hd.sr.ReferencedSegment(
                        sop_class_uid=str(phase.seg.SOPClassUID),
                        sop_instance_uid=str(phase.seg.SOPInstanceUID),
                        segment_number=number[structure],
                        source_series=hd.sr.SourceSeriesForSegmentation(
                            str(prepared.first.SeriesInstanceUID)
                        ),
                    ),
                    finding_type=_concept(segment.SegmentedPropertyTypeCodeSequence[0]),
                    finding_sites=sites or None,
                    algorithm_id=measurement_algorithm,
                    measurements=[_measurement(VOLUME, phase.volumes_ml[structure], UNIT_ML)],
                )
            )

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derive_uid("device-observer", identity.pipeline, "segnode"),
            name=identity.pipeline,
            manufacturer_name=SEGNODE_MANUFACTURER,
            model_name=identity.pipeline,
            serial_number="segnode",
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=CARDIAC_MRI,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=identity.series_uid("sr"),
        series_number=series_number,
        sop_instance_uid=identity.instance_uid("sr"),
        instance_number=1,
        manufacturer=SEGNODE_MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description,
        manufacturer_model_name=identity.pipeline,
        software_versions=segnode_version(),
        device_serial_number="segnode",
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    sr.save_as(tmp, enforce_file_format=True)
    tmp.replace(out_path)
    return ReportResult(out_path, str(sr.SeriesInstanceUID), str(sr.SOPInstanceUID), notes)


def read_seg_header(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)
