"""What a segment is (coded), and which algorithm produced it.

Codes come from pydicom's copy of the DICOM code dictionaries: the segmented property category from
CID 7150 (Segmentation Property Categories), the type from CID 7151 (Segmentation Property Types),
the anatomic region from SNOMED CT (CID 4031 / 7151). These are the same context groups that DCMQI
(3D Slicer) and OHIF use to name segments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code


@dataclass(frozen=True)
class SegmentSpec:
    """One segment of a SEG: a label, its SNOMED CT codes and a display colour."""

    label: str
    category: Code  # CID 7150, e.g. Anatomical Structure (SCT 91723000)
    type: Code  # CID 7151, e.g. Liver (SCT 10200004)
    anatomic_region: Code | None = None  # where the structure is, e.g. Liver for a liver lesion
    rgb: tuple[int, int, int] | None = None  # recommended display colour (written as CIELab)
    tracking_id: str | None = None  # stable name across studies; the label when None

    def description(
        self, segment_number: int, algorithm: Algorithm, tracking_uid: str
    ) -> hd.seg.SegmentDescription:
        return hd.seg.SegmentDescription(
            segment_number=segment_number,
            segment_label=self.label,
            segmented_property_category=self.category,
            segmented_property_type=self.type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm.identification(),
            tracking_uid=tracking_uid,
            tracking_id=self.tracking_id or self.label,
            anatomic_regions=[self.anatomic_region] if self.anatomic_region is not None else None,
            display_color=hd.color.CIELabColor.from_rgb(*self.rgb) if self.rgb is not None else None,
        )


@dataclass(frozen=True)
class Algorithm:
    """Segment Algorithm Identification: the model that produced the masks."""

    name: str  # e.g. "pyliverlesionseg liver 3mm"
    version: str  # model version (bundle version)
    family: Code = codes.cid7162.ArtificialIntelligence  # DCM 123110
    parameters: Mapping[str, str] = field(default_factory=dict)

    def identification(self) -> hd.AlgorithmIdentificationSequence:
        return hd.AlgorithmIdentificationSequence(
            name=self.name,
            family=self.family,
            version=self.version,
            parameters=dict(self.parameters) or None,
        )


# Liver: Anatomical Structure (SCT 91723000) / Liver (SCT 10200004). Colour as 3D Slicer's liver.
LIVER = SegmentSpec(
    label="Liver",
    category=codes.cid7150.AnatomicalStructure,
    type=codes.cid7151.Liver,
    rgb=(221, 130, 101),
)

# Liver lesion: Morphologically Abnormal Structure (SCT 49755003) / Lesion (SCT 52988006),
# anatomic region Liver (SCT 10200004).
LIVER_LESION = SegmentSpec(
    label="Liver lesion",
    category=codes.cid7150.MorphologicallyAbnormalStructure,
    type=codes.cid7151.Lesion,
    anatomic_region=codes.SCT.Liver,
    rgb=(255, 210, 0),
)
