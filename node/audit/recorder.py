"""Write audit events as rows, inside the caller's transaction; read them back as typed events."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import Connection, Table, insert, select
from sqlalchemy.orm import Session

from node.audit.events import Event, event_from_row
from node.db.models import AuditEvent

_AUDIT: Table = AuditEvent.__table__  # type: ignore[assignment]
_INSERT_AUDIT = insert(_AUDIT)


def utcnow() -> datetime:
    return datetime.now(UTC)


def record(session: Session, event: Event, at: datetime | None = None) -> None:
    """Add one audit row for ``event`` to ``session`` (committed with the caller's transaction)."""
    session.add(
        AuditEvent(
            at=at or utcnow(),
            event_type=event.type,
            study_uid=event.study_uid,
            series_uid=event.series_uid,
            sop_instance_uid=event.sop_instance_uid,
            association_uid=event.association_uid,
            details=event.details(),
        )
    )


def rows_for_study(session: Session, study_uid: str) -> Sequence[AuditEvent]:
    return session.scalars(
        select(AuditEvent).where(AuditEvent.study_uid == study_uid).order_by(AuditEvent.id)
    ).all()


def as_event(row: AuditEvent) -> Event:
    keys = {
        "study_uid": row.study_uid,
        "series_uid": row.series_uid,
        "sop_instance_uid": row.sop_instance_uid,
        "association_uid": row.association_uid,
    }
    return event_from_row(row.event_type, keys, dict(row.details or {}))


def record_on(conn: Connection, event: Event, at: datetime | None = None) -> None:
    """``record`` for SQLAlchemy Core connections (the ingest hot path), same row."""
    conn.execute(
        _INSERT_AUDIT,
        {
            "at": at or utcnow(),
            "event_type": event.type,
            "study_uid": event.study_uid,
            "series_uid": event.series_uid,
            "sop_instance_uid": event.sop_instance_uid,
            "association_uid": event.association_uid,
            "details": event.details(),
        },
    )
