"""Series completion: quiet time after the last carrying association ended, or a count hint.

A series in state ``receiving`` becomes ``complete`` when either
- every association / request that carried it has ended and nothing arrived for
  ``completion.quiet_seconds`` since the later of its last instance and that end (reason ``quiet``), or
- the instances declared by a count hint (ImagesInAcquisition, NumberOfTemporalPositions x
  NumberOfSlices) have all arrived (reason ``count_hint:<source>``).
State lives in the database only, so completion carries on across a restart.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.audit import events as ev
from node.audit.recorder import record, utcnow
from node.db.models import Association, Series, SeriesAssociation, Study
from node.settings import CompletionSection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completed:
    study_uid: str
    series_uid: str
    reason: str
    instance_count: int
    generation: int


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class CompletionMonitor:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: CompletionSection,
        clock: Callable[[], datetime] = utcnow,
        on_complete: Callable[[Completed], None] | None = None,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.clock = clock
        self.on_complete = on_complete
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _decide(self, s: Session, series: Series, now: datetime) -> str | None:
        carriers = s.execute(
            select(func.count(), func.count(Association.ended_at), func.max(Association.ended_at))
            .select_from(SeriesAssociation)
            .join(Association, Association.id == SeriesAssociation.association_id)
            .where(SeriesAssociation.series_id == series.id)
        ).one()
        total, ended, last_end = carriers
        if (
            self.settings.use_count_hints
            and series.expected_count
            and series.instance_count >= series.expected_count
        ):
            return f"count_hint:{series.expected_source or 'declared'}"
        if ended < total:
            return None  # an association that carried this series is still open
        quiet_since = max(t for t in (_aware(series.last_received_at), _aware(last_end)) if t is not None)
        if now - quiet_since >= timedelta(seconds=self.settings.quiet_seconds):
            return "quiet"
        return None

    def check_once(self) -> list[Completed]:
        """Complete every series that is due now; each completion is its own transaction."""
        now = self.clock()
        done: list[Completed] = []
        with self.sessions() as s:
            receiving = s.scalars(select(Series).where(Series.state == "receiving")).all()
            # Decide without the write lock first (most polls complete nothing, and a write
            # transaction per poll would queue behind, and delay, the ingest of every instance).
            candidates = [series.id for series in receiving if self._decide(s, series, now) is not None]
        for series_id in candidates:
            with self.sessions() as s, s.begin():
                series = s.get(Series, series_id, with_for_update=True, populate_existing=True)
                if series is None or series.state != "receiving":
                    continue
                reason = self._decide(s, series, now)
                if reason is None:
                    continue
                study_uid = s.scalar(select(Study.study_uid).where(Study.id == series.study_id)) or ""
                s.execute(
                    update(Series)
                    .where(Series.id == series.id)
                    .values(state="complete", completed_at=now, completion_reason=reason)
                )
                record(
                    s,
                    ev.SeriesCompleted(
                        study_uid=study_uid,
                        series_uid=series.series_uid,
                        reason=reason,
                        instance_count=series.instance_count,
                        generation=series.generation,
                    ),
                    at=now,
                )
                done.append(
                    Completed(study_uid, series.series_uid, reason, series.instance_count, series.generation)
                )
        for item in done:
            log.info(
                "series %s complete (%s, %d instances, generation %d)",
                item.series_uid,
                item.reason,
                item.instance_count,
                item.generation,
            )
            if self.on_complete is not None:
                self.on_complete(item)
        return done

    # -- background loop -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="completion", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.poll_seconds):
            try:
                self.check_once()
            except Exception:  # the loop must survive a transient database error
                log.exception("series completion check failed; retrying")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
