"""``segnode jobs retry``: a failed job goes round again.

Results still on disk -> ``written`` (the dispatcher resends to the destinations that did not get
them; deliveries already delivered stay so). No results -> ``queued`` (the executor runs it again).
Resending is safe: result UIDs are deterministic, so a destination replaces what it already has.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import Job
from node.dispatch.results import results_present
from node.jobs.transitions import transition


class RetryError(Exception):
    pass


@dataclass(frozen=True)
class Retried:
    job_id: int
    job_uid: str
    to: str  # written | queued


def find_job(s: Session, ref: str) -> Job | None:
    q = select(Job).where(Job.id == int(ref)) if ref.isdigit() else select(Job).where(Job.uid == ref)
    return s.scalar(q.with_for_update())


def retry_job(sessions: sessionmaker[Session], storage_root: Path, ref: str, author: str) -> Retried:
    with sessions.begin() as s:
        job = find_job(s, ref)
        if job is None:
            raise RetryError(f"no job {ref!r}; see 'segnode jobs list'")
        if job.state != "failed":
            raise RetryError(f"job {job.id} is {job.state}; only failed jobs can be retried")
        to = "written" if results_present(s, job.id, storage_root) else "queued"
        transition(
            s,
            job,
            to,
            reason="retry requested",
            details={"by": author, "resend": to == "written", "previous_error": job.error},
        )
        return Retried(job.id, job.uid, to)
