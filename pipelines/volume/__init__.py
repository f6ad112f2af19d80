"""Series to volume, with a validation gate.

``load_series(files)`` reads a DICOM series (single-frame or enhanced multi-frame instances, any
transfer syntax the node accepts) into ``Volume`` objects: float32 modality values (HU for CT) on a
regular grid, axis order ``(slice, row, column)`` or ``(time, slice, row, column)`` for cine, with a 4x4
affine from (slice, row, column) indices to LPS mm (see ``pipelines.volume.model``). A series that
cannot be turned into a correct volume is refused with ``pipelines.base.PipelineError`` and one of the
reasons in ``Reason``; what was tolerated or assumed is listed in ``Volume.notes`` for the audit trail.

Typical use in a pipeline::

    series = load_series(request.series_files)            # every phase
    volume = load_volume(request.series_files, phase="last")  # one phase (or the only one)
    hu = volume.voxels                                     # (slice, row, column) float32
    refs = volume.slice_sources                            # SourceFrame per slice, for DICOM-SEG
"""

from pipelines.volume.loader import (
    DEFAULT_MIN_SLICES,
    DEFAULT_SPACING_TOLERANCE,
    SeriesPlan,
    load_series,
    load_volume,
    plan_series,
)
from pipelines.volume.model import SeriesVolumes, SourceFrame, Volume
from pipelines.volume.reasons import Reason

__all__ = [
    "DEFAULT_MIN_SLICES",
    "DEFAULT_SPACING_TOLERANCE",
    "Reason",
    "SeriesPlan",
    "SeriesVolumes",
    "SourceFrame",
    "Volume",
    "load_series",
    "load_volume",
    "plan_series",
]
