"""``segnode jobs cancel``: a job that has not finished is cancelled.

Queued, written or dispatching jobs are cancelled at once (``job.cancelled``). A running job is marked
``cancel_requested`` (``job.cancel_requested``); the executor that runs it stops its worker and then
cancels it. A running job whose node is down is cancelled when the node (or another) finds it orphaned.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.audit import events as ev
from node.audit.recorder import record
from node.db.models import Job
from node.jobs.transitions import transition


class CancelError(Exception):
    pass


@dataclass(frozen=True)
class Cancelled:
    job_id: int
    job_uid: str
    state: str  # cancelled, or running (cancel requested)


def cancel_job(sessions: sessionmaker[Session], ref: str, author: str) -> Cancelled:
    with sessions.begin() as s:
        q = select(Job).where(Job.id == int(ref)) if ref.isdigit() else select(Job).where(Job.uid == ref)
        job = s.scalar(q.with_for_update())
        if job is None:
            raise CancelError(f"no job {ref!r}; see 'segnode jobs list'")
        if job.state == "running":
            if not job.cancel_requested:
                job.cancel_requested = True
                record(
                    s,
                    ev.JobCancelRequested(
                        study_uid=job.study_uid,
                        series_uid=job.series_uids[0] if len(job.series_uids) == 1 else None,
                        job_uid=job.uid,
                        by=author,
                    ),
                )
            return Cancelled(job.id, job.uid, "running")
        if job.state not in ("queued", "written", "dispatching"):
            raise CancelError(f"job {job.id} is {job.state}; only unfinished jobs can be cancelled")
        transition(s, job, "cancelled", reason=f"cancelled by {author}", details={"by": author})
        return Cancelled(job.id, job.uid, "cancelled")
