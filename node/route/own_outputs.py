"""Recognise segnode's own results so that a PACS forwarding everything back never causes a loop.

segnode writes its DICOM-SEG and SR with ``Manufacturer`` = ``segnode`` (see pipelines/outputs);
a result written back into a PACS that forwards it again is recognised by that, together with its
SOP class, and no rule ever matches it.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

SEGNODE_MANUFACTURER = "segnode"

RESULT_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
        "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation Storage
        "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
        "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
        "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
        "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture (previews)
    }
)


def own_output_reason(ds: Dataset) -> str | None:
    """Why ``ds`` is one of segnode's results, or None when it is not."""
    manufacturer = str(ds.get("Manufacturer", "") or "").strip().lower()
    model = str(ds.get("ManufacturerModelName", "") or "").strip().lower()
    sop_class = str(ds.get("SOPClassUID", "") or "").strip()
    if manufacturer == SEGNODE_MANUFACTURER or model.startswith(SEGNODE_MANUFACTURER):
        kind = "result object" if sop_class in RESULT_SOP_CLASSES else "object"
        return f"segnode's own {kind} (Manufacturer {ds.get('Manufacturer')!r}), never routed"
    return None
