"""Claiming queued jobs: one job at a time, row-locked with ``SKIP LOCKED`` on PostgreSQL.

Candidates are read without locks (the oldest few of each lane), put in lane-with-ageing order, and the
first that fits is locked with ``SELECT ... FOR UPDATE SKIP LOCKED`` and re-checked to be still queued; so
two executors (two nodes on one PostgreSQL) never claim the same job and never wait on each other. On
SQLite every write transaction is ``BEGIN IMMEDIATE`` (one writer at a time) and the node runs a single
claimer thread, which gives the same guarantee.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.audit.recorder import utcnow
from node.db.models import Job, Series
from node.execute.lanes import LANE_RANK, in_claim_order
from node.jobs.transitions import transition
from node.route.router import latest_instance_paths

CANDIDATES_PER_LANE = 50


@dataclass(frozen=True)
class Claim:
    job_id: int
    job_uid: str
    study_uid: str
    pipeline: str
    parameters: dict[str, Any]
    rule_version: int
    attempt: int
    max_attempts: int
    timeout_seconds: float
    series_files: list[Path]


@dataclass(frozen=True)
class _Candidate:
    id: int
    lane: str
    created_at: datetime
    pipeline: str


def input_files(s: Session, job: Job, spool_root: Path) -> list[Path]:
    """The latest instances of the job's series (all of them for a study-level job)."""
    files: list[Path] = []
    for uid in job.series_uids:
        series_id = s.scalar(select(Series.id).where(Series.series_uid == uid))
        if series_id is not None:
            files.extend(latest_instance_paths(s, series_id, spool_root))
    return files


def queued_candidates(s: Session) -> list[_Candidate]:
    found: list[_Candidate] = []
    for lane in (*LANE_RANK, None):
        q = select(Job.id, Job.lane, Job.created_at, Job.pipeline).where(Job.state == "queued")
        q = q.where(Job.lane == lane) if lane else q.where(Job.lane.not_in(list(LANE_RANK)))
        rows = s.execute(q.order_by(Job.created_at, Job.id).limit(CANDIDATES_PER_LANE)).all()
        found.extend(_Candidate(r[0], r[1], r[2], r[3]) for r in rows)
    return found


def claim_next(
    sessions: sessionmaker[Session],
    executor_id: str,
    *,
    spool_root: Path,
    ageing_seconds: float,
    default_max_attempts: int,
    default_timeout_seconds: float,
    fits: Callable[[str], bool] = lambda _pipeline: True,
    worker: str | None = None,
    now: datetime | None = None,
) -> Claim | None:
    """Move the best queued job that ``fits`` (by pipeline) to running for ``executor_id``; None if none."""
    with sessions.begin() as s:
        for cand in in_claim_order(queued_candidates(s), ageing_seconds):
            if not fits(cand.pipeline):
                continue
            job = s.scalar(
                select(Job).where(Job.id == cand.id, Job.state == "queued").with_for_update(skip_locked=True)
            )
            if job is None:
                continue  # claimed (or cancelled, superseded) by someone else meanwhile
            files = input_files(s, job, spool_root)
            when = now or utcnow()
            if not files:
                transition(s, job, "running", details={"executor": executor_id, "worker": worker}, at=when)
                transition(
                    s,
                    job,
                    "failed",
                    reason="no_input: the job's series have no instances in the spool",
                    details={"series_uids": list(job.series_uids)},
                    at=when,
                )
                continue
            if job.max_attempts is None:
                job.max_attempts = default_max_attempts
            job.claimed_by = executor_id
            job.claimed_at = when
            transition(s, job, "running", details={"executor": executor_id, "worker": worker}, at=when)
            return Claim(
                job_id=job.id,
                job_uid=job.uid,
                study_uid=job.study_uid,
                pipeline=job.pipeline,
                parameters=dict(job.parameters or {}),
                rule_version=job.rule_version,
                attempt=job.attempts,
                max_attempts=job.max_attempts,
                timeout_seconds=job.timeout_seconds or default_timeout_seconds,
                series_files=files,
            )
    return None
