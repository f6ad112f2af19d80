"""The per-stage timeline of one study, read from its audit trail.

Stages, each the audit event that marks its end (the latest one when a stage ran more than once, e.g.
a job retried): ``received`` (the last ``instance.stored``), ``completed`` (``series.completed``),
``routed`` (``job.created``), ``queued`` (the last ``job.queued``, else ``job.created``: the router
creates jobs queued), ``running`` (``job.running``), ``written`` (``job.written``), ``dispatched``
(``delivery.succeeded``) and ``done`` (``job.done``). Job and delivery events count only for the
study's chosen job (the newest one not superseded, or the one asked for).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import AuditEvent

STAGES = ("received", "completed", "routed", "queued", "running", "written", "dispatched", "done")
_JOB_STAGE = {"job.queued": "queued", "job.running": "running", "job.written": "written", "job.done": "done"}


@dataclass(frozen=True)
class AuditItem:
    at: datetime
    event_type: str
    series_uid: str | None = None
    sop_instance_uid: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def job_uid(self) -> str | None:
        value = self.details.get("job_uid")
        return str(value) if value else None


@dataclass(frozen=True)
class Stage:
    name: str
    at: datetime | None
    detail: str = ""


@dataclass(frozen=True)
class Timeline:
    study_uid: str
    job_uid: str | None
    stages: tuple[Stage, ...]
    failure: str | None = None  # what ended the job or the delivery badly, if anything

    def at(self, name: str) -> datetime | None:
        for stage in self.stages:
            if stage.name == name:
                return stage.at
        raise KeyError(name)

    def seconds(self, start: str, end: str) -> float | None:
        a, b = self.at(start), self.at(end)
        return None if a is None or b is None else (b - a).total_seconds()


def load_trail(sessions: sessionmaker[Session], study_uid: str) -> list[AuditItem]:
    """The study's audit rows, oldest first, plus job and delivery rows that carry one of its job UIDs."""
    with sessions() as s:
        rows = s.scalars(
            select(AuditEvent)
            .where(
                or_(
                    AuditEvent.study_uid == study_uid,
                    AuditEvent.study_uid.is_(None)
                    & (AuditEvent.event_type.like("job.%") | AuditEvent.event_type.like("delivery.%")),
                )
            )
            .order_by(AuditEvent.id)
        ).all()
        items = [
            AuditItem(
                at=_aware(r.at),
                event_type=r.event_type,
                series_uid=r.series_uid,
                sop_instance_uid=r.sop_instance_uid,
                details=dict(r.details or {}),
            )
            for r in rows
            if r.study_uid == study_uid or r.study_uid is None
        ]
    jobs = {i.job_uid for i in items if i.event_type == "job.created" and i.job_uid}
    return [i for i in items if not (i.job_uid and i.job_uid not in jobs and i.event_type != "job.created")]


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def chosen_job(items: Sequence[AuditItem]) -> str | None:
    """The newest job created for the study that was not superseded."""
    superseded = {i.job_uid for i in items if i.event_type == "job.superseded"}
    created = [i.job_uid for i in items if i.event_type == "job.created" and i.job_uid]
    live = [uid for uid in created if uid not in superseded]
    return live[-1] if live else (created[-1] if created else None)


def build_timeline(study_uid: str, items: Sequence[AuditItem], job_uid: str | None = None) -> Timeline:
    job = job_uid or chosen_job(items)
    at: dict[str, datetime] = {}
    detail: dict[str, str] = {}
    stored = [i for i in items if i.event_type == "instance.stored"]
    if stored:
        at["received"] = stored[-1].at
        span = (stored[-1].at - stored[0].at).total_seconds()
        detail["received"] = f"{len(stored)} instances in {span:.2f} s"
    failure: str | None = None
    for item in items:
        kind = item.event_type
        if kind == "series.completed":
            at["completed"] = item.at
            detail["completed"] = (
                f"{item.details.get('reason', '')}, {item.details.get('instance_count', '?')} inst"
            )
        elif item.job_uid != job:
            continue
        elif kind == "job.created":
            at["routed"] = item.at
            at.setdefault("queued", item.at)
            detail["routed"] = (
                f"rule {item.details.get('rule')} v{item.details.get('rule_version')} -> "
                f"{item.details.get('pipeline')} ({item.details.get('lane')})"
            )
        elif kind in _JOB_STAGE:
            at[_JOB_STAGE[kind]] = item.at
            if kind == "job.running":
                detail["running"] = f"attempt {item.details.get('attempt', 1)}"
        elif kind == "delivery.succeeded":
            at["dispatched"] = item.at
            count = len(item.details.get("statuses") or {})
            detail["dispatched"] = (
                f"{count} instance(s) to {item.details.get('destination')} {item.details.get('target')}"
            )
        elif kind in ("job.failed", "delivery.failed", "job.cancelled"):
            why = item.details.get("reason") or item.details.get("error") or item.details.get("status")
            failure = f"{kind}: {why}"
    stages = tuple(Stage(name, at.get(name), detail.get(name, "")) for name in STAGES)
    return Timeline(study_uid=study_uid, job_uid=job, stages=stages, failure=failure)


def format_timeline(timeline: Timeline, origin: datetime | None = None, origin_label: str = "") -> str:
    """A table: stage, UTC time, seconds since the previous stage and since ``origin`` (default: the
    first stage that happened)."""
    present = [s for s in timeline.stages if s.at is not None]
    zero = origin or (present[0].at if present else None)
    lines = [f"{'stage':<11} {'time (UTC)':<15} {'+prev s':>8} {'+total s':>9}  detail"]
    previous: datetime | None = origin
    for stage in timeline.stages:
        if stage.at is None:
            lines.append(f"{stage.name:<11} {'-':<15} {'':>8} {'':>9}  (not reached)")
            continue
        clock = stage.at.astimezone(UTC).strftime("%H:%M:%S.%f")[:-3]
        step = f"{(stage.at - previous).total_seconds():8.2f}" if previous is not None else f"{'':>8}"
        total = f"{(stage.at - zero).total_seconds():9.2f}" if zero is not None else f"{'':>9}"
        lines.append(f"{stage.name:<11} {clock:<15} {step} {total}  {stage.detail}".rstrip())
        previous = stage.at
    if origin is not None and origin_label:
        lines.append(f"(+prev of the first stage and +total are counted from {origin_label})")
    if timeline.failure:
        lines.append(f"failed: {timeline.failure}")
    return "\n".join(lines)
