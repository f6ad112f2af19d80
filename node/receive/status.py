"""Status codes shared by DIMSE C-STORE responses and STOW-RS FailureReason values (PS3.4 / PS3.18)."""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700  # Refused: out of resources (disk full)
    DATASET_DOES_NOT_MATCH = 0xA900  # Error: data set does not match SOP class / request
    CANNOT_UNDERSTAND = 0xC000  # Error: cannot understand
    PROCESSING_FAILURE = 0x0110  # Failure: processing failure
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    STUDY_UID_MISMATCH = 0xC409  # STOW-RS: instance does not belong to the study in the URL


def is_success(status: int) -> bool:
    return status == Status.SUCCESS
