"""Series completion with a controlled clock, on SQLite and on a real PostgreSQL 15."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from node.audit.recorder import as_event, rows_for_study
from node.completion.monitor import CompletionMonitor
from node.db.engine import make_engine, make_session_factory
from node.db.migrate import upgrade
from node.db.models import Series
from node.receive.ingest import Carrier, Ingestor
from node.receive.spool import Spool
from node.settings import CompletionSection
from tests.factories import SeriesSpec, ct_series


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Harness:
    def __init__(self, url: str, root: Path) -> None:
        self.engine = make_engine(url)
        upgrade(self.engine)
        self.sessions = make_session_factory(self.engine)
        self.spool = Spool(root / "spool", root / "incoming")
        self.ingestor = Ingestor(self.sessions, self.spool)
        self.clock = Clock()

    def monitor(self, quiet: float = 5, hints: bool = True) -> CompletionMonitor:
        cfg = CompletionSection(quiet_seconds=quiet, use_count_hints=hints)
        return CompletionMonitor(self.sessions, cfg, clock=self.clock)

    def carrier(self) -> Carrier:
        return self.ingestor.open_carrier(
            "dimse", calling_ae="SCU", called_ae="SEGNODE", remote_host="127.0.0.1", remote_port=1
        )

    def store(self, carrier: Carrier, ds: Dataset) -> None:
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import dcmwrite

        buf = DicomBytesIO()
        dcmwrite(buf, ds, enforce_file_format=True)
        temp = self.spool.write_temp([buf.getvalue()])
        assert self.ingestor.store(temp, carrier).ok

    def series(self, uid: str) -> Series:
        with self.sessions() as s:
            row = s.scalar(select(Series).where(Series.series_uid == uid))
            assert row is not None
            return row


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    else:
        url = request.getfixturevalue("postgres_url")
    h = Harness(url, tmp_path)
    request.addfinalizer(h.engine.dispose)
    return h


def test_completes_after_quiet_time_from_release(harness: Harness) -> None:
    spec = SeriesSpec(n=4)
    monitor = harness.monitor(quiet=5)
    carrier = harness.carrier()
    for ds in ct_series(spec):
        harness.store(carrier, ds)
    harness.clock.advance(60)
    assert monitor.check_once() == []  # the association is still open: not complete however long
    harness.ingestor.close_carrier(carrier, "released", 4)
    harness.clock.now = datetime.now(UTC)
    assert monitor.check_once() == []
    harness.clock.advance(4.9)
    assert monitor.check_once() == []
    harness.clock.advance(0.2)
    (done,) = monitor.check_once()
    assert (done.series_uid, done.reason, done.instance_count, done.generation) == (
        spec.series_uid,
        "quiet",
        4,
        1,
    )
    row = harness.series(spec.series_uid)
    assert row.state == "complete" and row.completion_reason == "quiet"
    assert monitor.check_once() == []  # completes once


def test_count_hint_completes_early_while_association_open(harness: Harness) -> None:
    spec = SeriesSpec(n=3, images_in_acquisition=3)
    monitor = harness.monitor(quiet=300)
    carrier = harness.carrier()
    datasets = ct_series(spec)
    for ds in datasets[:2]:
        harness.store(carrier, ds)
    assert monitor.check_once() == []
    harness.store(carrier, datasets[2])
    (done,) = monitor.check_once()
    assert done.reason == "count_hint:ImagesInAcquisition"


def test_count_hint_can_be_disabled(harness: Harness) -> None:
    spec = SeriesSpec(n=2, images_in_acquisition=2)
    monitor = harness.monitor(quiet=300, hints=False)
    carrier = harness.carrier()
    for ds in ct_series(spec):
        harness.store(carrier, ds)
    assert monitor.check_once() == []


def test_late_instance_reopens_and_supersedes(harness: Harness) -> None:
    spec = SeriesSpec(n=3)
    monitor = harness.monitor(quiet=1)
    datasets = ct_series(spec)
    first = harness.carrier()
    for ds in datasets[:2]:
        harness.store(first, ds)
    harness.ingestor.close_carrier(first, "released", 2)
    harness.clock.now = datetime.now(UTC) + timedelta(seconds=2)
    assert [d.generation for d in monitor.check_once()] == [1]
    late = harness.carrier()
    harness.store(late, datasets[2])
    row = harness.series(spec.series_uid)
    assert (row.state, row.generation, row.instance_count) == ("receiving", 2, 3)
    harness.ingestor.close_carrier(late, "released", 1)
    harness.clock.now = datetime.now(UTC) + timedelta(seconds=2)
    (again,) = monitor.check_once()
    assert (again.generation, again.instance_count) == (2, 3)
    with harness.sessions() as s:
        trail = [as_event(r) for r in rows_for_study(s, spec.study_uid)]
    assert [e.type for e in trail] == [
        "instance.stored",
        "instance.stored",
        "series.completed",
        "series.reopened",
        "instance.stored",
        "series.completed",
    ]
    assert trail[3].details()["generation"] == 2


def test_completion_survives_restart(harness: Harness, tmp_path: Path) -> None:
    """A new monitor (new process) over the same database completes what the old one left."""
    from node.recovery import close_stale_carriers

    spec = SeriesSpec(n=2)
    carrier = harness.carrier()
    for ds in ct_series(spec):
        harness.store(carrier, ds)
    # crash: the carrier is never closed. At start-up the node closes stale carriers.
    assert close_stale_carriers(harness.sessions) == 1
    restarted = CompletionMonitor(
        harness.sessions,
        CompletionSection(quiet_seconds=1),
        clock=lambda: datetime.now(UTC) + timedelta(seconds=2),
    )
    (done,) = restarted.check_once()
    assert done.reason == "quiet"


def test_audit_rows_cannot_be_changed(harness: Harness) -> None:
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    spec = SeriesSpec(n=1)
    harness.store(harness.carrier(), ct_series(spec)[0])
    for sql in ("UPDATE audit_events SET event_type = 'x'", "DELETE FROM audit_events"):
        with pytest.raises(DBAPIError, match="append-only"), harness.sessions.begin() as s:
            s.execute(text(sql))
