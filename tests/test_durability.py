"""Success means durable: kill -9 at any moment, a full disk, restart recovery, completion across restarts."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from node.db.models import AuditEvent, Instance, Series
from tests.conftest import RunningNode, start_node, wait_for
from tests.dimse_peers import associate, echoscu, scu_ae
from tests.factories import SeriesSpec, ct_series


def _instances(node: RunningNode) -> dict[str, Instance]:
    with node.sessions()() as s:
        return {r.sop_instance_uid: r for r in s.scalars(select(Instance)).all()}


@pytest.mark.parametrize(("seed", "fsync"), [(1, "true"), (2, "false")])
def test_kill_9_loses_no_acknowledged_instance(tmp_path: Path, seed: int, fsync: str) -> None:
    """kill -9 at a random moment; with storage.fsync false too (it gives up power-loss safety only)."""
    storage = tmp_path / "st"
    running = start_node(storage, extra_env={"SEGNODE_STORAGE__FSYNC": fsync})
    spec = SeriesSpec(n=250, size=96)
    datasets = ct_series(spec)
    acknowledged: list[str] = []
    stop = threading.Event()

    def sender() -> None:
        ae = scu_ae("KILLSCU")
        assoc = associate(ae, running.dimse_port, ae_title=running.ae_title)
        try:
            for ds in datasets:
                if stop.is_set() or not assoc.is_established:
                    return
                rsp = assoc.send_c_store(ds)
                if "Status" in rsp and int(rsp.Status) == 0:
                    acknowledged.append(str(ds.SOPInstanceUID))
        finally:
            if assoc.is_established:
                assoc.abort()

    thread = threading.Thread(target=sender)
    thread.start()
    target = random.Random(seed).randint(20, 100)
    wait_for(lambda: len(acknowledged) >= target, timeout=120, what=f"{target} acknowledged instances")
    os.kill(running.proc.pid, signal.SIGKILL)
    running.proc.wait(timeout=30)
    stop.set()
    thread.join(timeout=60)
    assert acknowledged, "nothing was acknowledged before the kill"

    # Every acknowledged instance is in the database and on disk with the recorded hash.
    rows = _instances(running)
    for sop in acknowledged:
        assert sop in rows, f"acknowledged {sop} missing from the database"
        path = storage / "spool" / rows[sop].path
        assert path.exists(), f"acknowledged {sop} missing from the spool"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == rows[sop].sha256
    running.stop()

    # Restart: partial temp files are removed, the dead association is closed, the series completes.
    again = start_node(storage)
    try:
        assert list((storage / "incoming").iterdir()) == []

        def complete() -> bool:
            with again.sessions()() as s:
                row = s.scalar(select(Series).where(Series.series_uid == spec.series_uid))
                return row is not None and row.state == "complete"

        wait_for(complete, what="completion after restart")
        on_disk = {p.relative_to(storage / "spool").as_posix() for p in (storage / "spool").rglob("*.dcm")}
        in_db = {r.path for r in _instances(again).values()}
        assert on_disk == in_db  # no orphan file and no row without file
        with again.sessions()() as s:
            ended = s.scalars(select(AuditEvent).where(AuditEvent.event_type == "association.ended")).all()
            assert any(e.details["how"] == "restart" for e in ended)
    finally:
        again.stop()


def test_orphan_spool_file_is_recorded_at_startup(tmp_path: Path) -> None:
    """A file renamed into the spool whose transaction never committed is recovered, not lost."""
    storage = tmp_path / "st"
    running = start_node(storage)
    running.stop()
    spec = SeriesSpec(n=1)
    (ds,) = ct_series(spec)
    orphan = storage / "spool" / spec.study_uid / spec.series_uid / f"{ds.SOPInstanceUID}.dcm"
    orphan.parent.mkdir(parents=True)
    ds.save_as(orphan, enforce_file_format=True)
    (storage / "incoming" / "tmpabc.part").write_bytes(b"half an instance")
    again = start_node(storage)
    try:
        rows = _instances(again)
        assert ds.SOPInstanceUID in rows
        assert (storage / "spool" / rows[ds.SOPInstanceUID].path).exists()
        assert not (storage / "incoming" / "tmpabc.part").exists()
        with again.sessions()() as s:
            kinds = [
                e.event_type
                for e in s.scalars(
                    select(AuditEvent).where(AuditEvent.study_uid == spec.study_uid).order_by(AuditEvent.id)
                ).all()
            ]
        assert kinds[:2] == ["instance.stored", "instance.recovered"]
    finally:
        again.stop()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 6 MiB filesystem (tmpfs), so the disk really fills up."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_refuses_with_a700_and_leaves_no_partial_file(tmp_path: Path, small_disk: Path) -> None:
    storage = small_disk / "st"
    running = start_node(
        storage,
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        extra_env={"SEGNODE_STORAGE__MIN_FREE_BYTES": "0"},
    )
    try:
        datasets = ct_series(SeriesSpec(n=80, size=256))  # 128 KiB each: 10 MiB, the disk holds 6
        ae = scu_ae("FILLSCU")
        assoc = associate(ae, running.dimse_port, ae_title=running.ae_title)
        statuses = []
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            statuses.append(int(rsp.Status))
            if statuses[-1] == 0xA700:
                break
        assoc.release()
        assert statuses[-1] == 0xA700, statuses
        assert all(s == 0 for s in statuses[:-1])
        assert len(statuses) > 3
        assert list((storage / "incoming").iterdir()) == []
        rows = _instances(running)
        assert len(rows) == len(statuses) - 1
        for row in rows.values():
            path = storage / "spool" / row.path
            assert hashlib.sha256(path.read_bytes()).hexdigest() == row.sha256
        with running.sessions()() as s:
            rejected = s.scalars(select(AuditEvent).where(AuditEvent.event_type == "instance.rejected")).all()
        assert len(rejected) == 1 and rejected[0].details["status"] == 0xA700
        assert "disk full" in rejected[0].details["reason"] or "free" in rejected[0].details["reason"]
        assert echoscu(running) == 0  # still serving
    finally:
        running.stop()


def test_min_free_bytes_refuses_before_writing(tmp_path: Path) -> None:
    running = start_node(tmp_path / "st", extra_env={"SEGNODE_STORAGE__MIN_FREE_BYTES": str(2**62)})
    try:
        ae = scu_ae("FILLSCU")
        assoc = associate(ae, running.dimse_port, ae_title=running.ae_title)
        rsp = assoc.send_c_store(ct_series(SeriesSpec(n=1))[0])
        assoc.release()
        assert int(rsp.Status) == 0xA700
        assert "Out of resources" in str(rsp.get("ErrorComment", ""))
        assert _instances(running) == {}
    finally:
        running.stop()


@pytest.mark.parametrize(("fsync", "synchronous"), [(True, 2), (False, 1)])
def test_sqlite_commits_follow_storage_fsync(tmp_path: Path, fsync: bool, synchronous: int) -> None:
    """storage.fsync also decides whether each SQLite commit is fsynced (FULL = 2) or not (NORMAL = 1)."""
    from sqlalchemy import text

    from node.service import Database
    from node.settings import Settings

    db = Database.open(Settings(storage={"path": tmp_path, "fsync": fsync}))
    with db.engine.connect() as conn:
        assert conn.execute(text("PRAGMA synchronous")).scalar() == synchronous
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_ingest_commits_rely_on_the_spool_fsync(tmp_path: Path) -> None:
    """The receive path's engine commits at NORMAL even with storage.fsync: the fsynced spool file is
    the durability point (a row lost to a power cut is recovered from the spool at start-up)."""
    from sqlalchemy import text

    from node.db.engine import make_ingest_engine
    from node.service import Database
    from node.settings import Settings

    settings = Settings(storage={"path": tmp_path, "fsync": True})
    db = Database.open(settings)
    ingest = make_ingest_engine(settings.database_url)
    try:
        with db.engine.connect() as conn:
            assert conn.execute(text("PRAGMA synchronous")).scalar() == 2
        with ingest.connect() as conn:
            assert conn.execute(text("PRAGMA synchronous")).scalar() == 1
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    finally:
        ingest.dispose()
        db.engine.dispose()


@pytest.mark.parametrize("frames", [1, 40])
def test_one_fsync_per_instance_after_its_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, frames: int
) -> None:
    """Each stored instance costs one fsync, of the file under its final name, and no folder fsync; a
    file of EARLY_FLUSH_BYTES or more has its data flushed (fdatasync) before the write gate as well."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import dcmwrite

    from node.db.engine import make_engine, make_ingest_engine, make_session_factory
    from node.db.migrate import upgrade
    from node.receive.ingest import Ingestor
    from node.receive.spool import EARLY_FLUSH_BYTES, Spool

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(make_engine(url))
    spool = Spool(tmp_path / "spool", tmp_path / "incoming", fsync=True)
    ingestor = Ingestor(make_session_factory(make_ingest_engine(url)), spool)
    carrier = ingestor.open_carrier(
        "dimse", calling_ae="SCU", called_ae="SEGNODE", remote_host=None, remote_port=None
    )
    ds = ct_series(SeriesSpec(n=1, size=512))[0]
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.PixelData = bytes(ds.PixelData) * frames
    buf = DicomBytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    payload = buf.getvalue()
    assert (len(payload) >= EARLY_FLUSH_BYTES) == (frames > 1)

    synced: list[tuple[str, str]] = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def fsync(fd: int) -> None:
        synced.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def fdatasync(fd: int) -> None:
        synced.append(("fdatasync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    temp = spool.write_temp([payload])
    result = ingestor.store(temp, carrier)
    monkeypatch.undo()

    assert result.ok and result.outcome == "stored"
    final = spool.absolute(spool.place(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, 1))
    assert final.read_bytes() == payload
    expected = [("fsync", str(final))]
    if frames > 1:
        expected.insert(0, ("fdatasync", str(temp.path)))
    assert synced == expected
