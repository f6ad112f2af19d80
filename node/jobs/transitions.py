"""The job state machine: every move is checked against ``ALLOWED`` and is one audit row, same transaction.

::

    queued -> running -> written -> dispatching -> done
       |         |  \\        \\            \\-> written (dispatcher retry), failed
       |         |   \\-> queued (crash/timeout/restart, attempts left)
       \\-> cancelled / superseded / failed (never started: no input, unknown pipeline)
    failed -> queued (run again) | written (resend)   [segnode jobs retry: event job.retried]

The router supersedes open and done jobs itself (its own ``job.superseded`` row); ``transition`` to
``superseded`` writes the same typed event.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from node.audit import events as ev
from node.audit.recorder import record, utcnow
from node.db.models import Job

JOB_STATES = ("queued", "running", "written", "dispatching", "done", "failed", "cancelled", "superseded")
TERMINAL_STATES = ("done", "failed", "cancelled", "superseded")

ALLOWED: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled", "superseded", "failed"}),
    "running": frozenset({"written", "queued", "failed", "cancelled", "superseded"}),
    "written": frozenset({"dispatching", "done", "failed", "cancelled", "superseded"}),
    "dispatching": frozenset({"done", "failed", "written", "cancelled", "superseded"}),
    "done": frozenset({"superseded"}),
    "failed": frozenset({"queued", "written"}),
    "cancelled": frozenset(),
    "superseded": frozenset(),
}

_EVENTS: dict[str, type[ev.JobTransition]] = {
    "queued": ev.JobQueued,
    "running": ev.JobRunning,
    "written": ev.JobWritten,
    "dispatching": ev.JobDispatching,
    "done": ev.JobDone,
    "failed": ev.JobFailed,
    "cancelled": ev.JobCancelled,
}


class IllegalTransition(Exception):
    def __init__(self, job_uid: str, frm: str, to: str) -> None:
        allowed = ", ".join(sorted(ALLOWED.get(frm, frozenset()))) or "none (final state)"
        super().__init__(f"job {job_uid}: {frm} -> {to} is not allowed (from {frm}: {allowed})")
        self.job_uid, self.frm, self.to = job_uid, frm, to


def can_transition(frm: str, to: str) -> bool:
    return to in ALLOWED.get(frm, frozenset())


def transition(
    s: Session,
    job: Job,
    to: str,
    *,
    reason: str | None = None,
    details: Mapping[str, Any] | None = None,
    at: datetime | None = None,
) -> None:
    """Move ``job`` to ``to`` and add the audit row to ``s`` (the caller commits both together).

    Raises ``IllegalTransition`` (nothing changed) when the move is not in ``ALLOWED``. The caller should
    hold the job row locked (``with_for_update``) when others may move it concurrently.
    """
    frm = job.state
    if to not in JOB_STATES:
        raise IllegalTransition(job.uid, frm, to)
    if not can_transition(frm, to):
        raise IllegalTransition(job.uid, frm, to)
    now = at or utcnow()
    job.state = to
    job.updated_at = now
    if to == "running":
        job.attempts = (job.attempts or 0) + 1
        job.started_at = now
        job.finished_at = None
        job.heartbeat_at = now
    elif frm == "running":
        job.claimed_by = None
        job.heartbeat_at = None
    if to == "queued" and frm == "failed":
        job.attempts = 0  # a retry by hand gets a fresh set of attempts
        job.cancel_requested = False
    if to in TERMINAL_STATES:
        job.finished_at = now
    if to in ("failed", "cancelled") or (to == "queued" and frm == "running"):
        job.error = reason
    elif to in ("running", "done") or frm == "failed":
        job.error = None
    series_uid = job.series_uids[0] if len(job.series_uids) == 1 else None
    extra = dict(details or {})
    event: ev.Event
    if to == "superseded":
        event = ev.JobSuperseded(
            study_uid=job.study_uid,
            series_uid=series_uid,
            job_uid=job.uid,
            by_job_uid=str(extra.get("by_job_uid", "")),
            previous_state=frm,
        )
    else:
        cls = ev.JobRetried if frm == "failed" else _EVENTS[to]
        event = cls(
            study_uid=job.study_uid,
            series_uid=series_uid,
            job_uid=job.uid,
            from_state=frm,
            to_state=to,
            reason=reason,
            attempt=job.attempts or 0,
            extra=extra,
        )
    record(s, event, at=now)
