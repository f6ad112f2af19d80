"""The named reasons for which a series is refused, and the one way to raise a refusal.

Each reason is a short machine-readable string written to the audit trail; the message says which value
was wrong and what would have been accepted.
"""

from __future__ import annotations

from enum import StrEnum

from pipelines.base import PipelineError


class Reason(StrEnum):
    NO_FILES = "no_files"
    UNREADABLE_INSTANCE = "unreadable_instance"
    NO_PIXEL_DATA = "no_pixel_data"
    UNSUPPORTED_PHOTOMETRIC = "unsupported_photometric"
    UNSUPPORTED_PIXEL_FORMAT = "unsupported_pixel_format"
    UNSUPPORTED_MODALITY_LUT = "unsupported_modality_lut"
    UNDECODABLE_PIXEL_DATA = "undecodable_pixel_data"
    NO_GEOMETRY = "no_geometry"
    INVALID_GEOMETRY = "invalid_geometry"
    MIXED_SERIES = "mixed_series"
    MIXED_SIZES = "mixed_sizes"
    MIXED_PIXEL_SPACING = "mixed_pixel_spacing"
    MIXED_ORIENTATIONS = "mixed_orientations"
    MIXED_FRAMES_OF_REFERENCE = "mixed_frames_of_reference"
    DUPLICATE_POSITIONS = "duplicate_positions"
    INCONSISTENT_TIME_POINTS = "inconsistent_time_points"
    TOO_FEW_SLICES = "too_few_slices"
    GANTRY_TILT = "gantry_tilt"
    MISSING_SLICES = "missing_slices"
    NON_UNIFORM_SPACING = "non_uniform_spacing"
    UNKNOWN_PHASE = "unknown_phase"
    MULTIPLE_PHASES = "multiple_phases"


def refuse(reason: Reason, message: str) -> PipelineError:
    """The exception to raise: ``raise refuse(Reason.GANTRY_TILT, "...")``."""
    return PipelineError(str(reason), message)
