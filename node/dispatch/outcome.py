"""What one delivery attempt produced: per-instance statuses and, where the attempt as a whole went
wrong, whether that was transient (retry, counts against the breaker) or permanent (fail now)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Outcome = Literal["delivered", "warning", "failed"]


@dataclass(frozen=True)
class ResultFile:
    """One result instance to deliver (a row of ``job_results``, path made absolute)."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    kind: str = ""


@dataclass(frozen=True)
class InstanceStatus:
    status: int | None  # DICOM status (C-STORE response or STOW-RS FailureReason/WarningReason)
    outcome: Outcome
    detail: str = ""

    @property
    def done(self) -> bool:
        return self.outcome != "failed"


@dataclass
class AttemptResult:
    instances: dict[str, InstanceStatus] = field(default_factory=dict)  # by SOP Instance UID
    # Attempt-level problem (no association, HTTP error, connection lost); None when the peer answered.
    error: str | None = None
    status: str = ""  # the peer's answer in short: "0x0000", "0xA700", "HTTP 401", "A-ASSOCIATE-RJ ..."
    permanent: bool = False  # the attempt-level error is final (HTTP 4xx, nothing acceptable)

    @property
    def transient_error(self) -> bool:
        return self.error is not None and not self.permanent


def dimse_status_outcome(status: int) -> Outcome:
    """PS3.4 C-STORE status: 0x0000 success; 0x0001 and 0xBxxx warnings; everything else a failure."""
    if status == 0x0000:
        return "delivered"
    if status == 0x0001 or 0xB000 <= status <= 0xBFFF or status in (0x0107, 0x0116):
        return "warning"
    return "failed"


def hex_status(status: int | None) -> str:
    return "none" if status is None else f"0x{status:04X}"
