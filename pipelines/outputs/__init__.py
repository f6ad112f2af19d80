"""Result objects of segnode pipelines: DICOM-SEG and DICOM SR (TID 1500), with deterministic UIDs."""

from pipelines.outputs.provenance import SEGNODE_MANUFACTURER, SEGNODE_OUTPUT_ATTRIBUTES, is_segnode_output
from pipelines.outputs.seg import SegResult, write_seg
from pipelines.outputs.segments import LIVER, LIVER_LESION, Algorithm, SegmentSpec
from pipelines.outputs.sr import SegmentMeasurement, SrResult, write_measurement_report
from pipelines.outputs.uids import OutputIdentity, derive_uid

__all__ = [
    "LIVER",
    "LIVER_LESION",
    "SEGNODE_MANUFACTURER",
    "SEGNODE_OUTPUT_ATTRIBUTES",
    "Algorithm",
    "OutputIdentity",
    "SegResult",
    "SegmentMeasurement",
    "SegmentSpec",
    "SrResult",
    "derive_uid",
    "is_segnode_output",
    "write_measurement_report",
    "write_seg",
]
