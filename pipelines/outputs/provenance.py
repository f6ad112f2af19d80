"""How segnode marks its own result objects, so that the node never processes them again.

Every SEG and SR that segnode writes carries, at the top level of the data set:

- ``Manufacturer`` (0008,0070) = ``SEGNODE_MANUFACTURER`` ("segnode"),
- ``ManufacturerModelName`` (0008,1090) = the pipeline name (e.g. "ct-liver"),
- ``SoftwareVersions`` (0018,1020) = the segnode version,
- Series and SOP Instance UIDs under ``2.25.`` derived as in ``pipelines.outputs.uids``.

``is_segnode_output`` is the check a router applies: ``Manufacturer`` alone decides it (the model
name and version say which pipeline and release wrote it). The source's own equipment is kept in
``ContributingEquipmentSequence``, never at the top level, so a source never looks like an output.
"""

from __future__ import annotations

from importlib import metadata

from pydicom.dataset import Dataset

SEGNODE_MANUFACTURER = "segnode"
# Top-level attributes that identify a segnode output and what wrote it.
SEGNODE_OUTPUT_ATTRIBUTES = ("Manufacturer", "ManufacturerModelName", "SoftwareVersions")


def segnode_version() -> str:
    try:
        return metadata.version("segnode")
    except metadata.PackageNotFoundError:  # running from a tree that was never installed
        return "0+unknown"


def is_segnode_output(ds: Dataset) -> bool:
    """True when ``ds`` (a header is enough) was written by segnode."""
    return str(ds.get("Manufacturer", "")).strip() == SEGNODE_MANUFACTURER
