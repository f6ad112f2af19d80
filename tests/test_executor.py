"""The executor (node/execute) and the job state machine (node/jobs): real worker processes running the real
ct-liver pipeline on the real 20-slice CT series from ../shared, real SQLite and PostgreSQL, real SIGKILLs.

Jobs are inserted as the router creates them (state queued, with their series and instances recorded);
instance rows point at the shared files in place (never copied). Assertions are on audit event sequences.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from node.audit.recorder import as_event
from node.db.models import AuditEvent, Instance, Job, JobResult, Series, Study
from node.execute.budget import NEVER, Placement, SlotView, place
from node.execute.cancel import CancelError, cancel_job
from node.execute.claim import claim_next
from node.execute.executor import Executor, result_dir
from node.execute.lanes import in_claim_order
from node.jobs.transitions import ALLOWED, JOB_STATES, IllegalTransition, transition
from node.service import Database
from node.settings import Settings
from tests.conftest import start_node, wait_for
from tests.factories import SeriesSpec, ct_series, write_series
from tests.liver_support import CT_DICOM, installed, need

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


# --- helpers ---------------------------------------------------------------------------------------------


def make_settings(root: Path, database_url: str | None = None, **executor: Any) -> Settings:
    cfg: dict[str, Any] = {"poll_seconds": 0.1, "heartbeat_seconds": 0.5, "stale_seconds": 30.0}
    cfg.update(executor)
    data: dict[str, Any] = {"storage": {"path": root}, "executor": cfg}
    if database_url:
        data["database"] = {"url": database_url}
    return Settings(**data)


def add_series(s: Session, files: list[Path], modality: str = "CT") -> tuple[str, str]:
    """Record a complete, routed series whose instances are ``files`` (absolute paths, read in place)."""
    study_uid, series_uid = f"2.25.{uuid.uuid4().int}", f"2.25.{uuid.uuid4().int}"
    study = Study(study_uid=study_uid, first_received_at=NOW, last_received_at=NOW)
    s.add(study)
    s.flush()
    series = Series(
        study_id=study.id,
        series_uid=series_uid,
        modality=modality,
        state="complete",
        generation=1,
        routed_generation=1,
        instance_count=len(files),
        first_received_at=NOW,
        last_received_at=NOW,
        completed_at=NOW,
    )
    s.add(series)
    s.flush()
    for i, f in enumerate(files):
        s.add(
            Instance(
                series_id=series.id,
                sop_instance_uid=f"{series_uid}.{i + 1}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                version=1,
                path=str(f.resolve()),
                size=f.stat().st_size,
                sha256="0" * 64,
                transfer_syntax="1.2.840.10008.1.2.1",
                received_at=NOW,
            )
        )
    return study_uid, series_uid


def add_job(
    s: Session,
    study_uid: str,
    series_uid: str,
    *,
    lane: str = "routine",
    created_at: datetime = NOW,
    pipeline: str = "ct-liver",
    **columns: Any,
) -> Job:
    uid = uuid.uuid4().hex
    job = Job(
        uid=uid,
        dedupe_key=f"test:{uid}",
        level="series",
        study_uid=study_uid,
        series_uids=[series_uid],
        series_generations=[1],
        rule_name="test",
        rule_version=1,
        pipeline=pipeline,
        # the lesion net is skipped to keep the CPU runs short (the liver net and both outputs still run)
        parameters={"lesions": False} if pipeline == "ct-liver" else {},
        destinations=[],
        lane=lane,
        state="queued",
        created_at=created_at,
        updated_at=created_at,
        **columns,
    )
    s.add(job)
    s.flush()
    return job


def job_events(sessions: sessionmaker[Session], job_uid: str) -> list[str]:
    with sessions() as s:
        rows = s.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
        return [
            r.event_type
            for r in rows
            if (r.details or {}).get("job_uid") == job_uid and r.event_type.startswith(("job.", "executor."))
        ]


def job_row(sessions: sessionmaker[Session], job_uid: str) -> Job:
    with sessions() as s:
        job = s.scalar(select(Job).where(Job.uid == job_uid))
        assert job is not None
        return job


def wait_state(
    sessions: sessionmaker[Session], job_uid: str, states: tuple[str, ...], timeout: float = 900
) -> Job:
    def reached() -> Job | None:
        job = job_row(sessions, job_uid)
        return job if job.state in states else None

    found: Job = wait_for(reached, timeout=timeout, interval=0.1, what=f"job {job_uid} in {states}")
    return found


def real_ct() -> list[Path]:
    return sorted(need(CT_DICOM).iterdir())


def link_models(root: Path) -> None:
    """The real installed ct-liver bundles (installed once per test session) under ``root``/models."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "models").symlink_to(installed().storage.models, target_is_directory=True)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    opened = Database.open(make_settings(tmp_path / "data"))
    yield opened
    opened.engine.dispose()


@pytest.fixture
def executor_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Executor] = []

    def make(root: Path, **cfg: Any) -> tuple[Executor, Database]:
        settings = make_settings(root, **cfg)
        database = Database.open(settings)
        ex = Executor(database.sessions, settings)
        started.append(ex)
        return ex, database

    yield make
    for ex in started:
        ex.stop(timeout=5)
        ex.sessions.kw["bind"].dispose()


# --- the state machine -----------------------------------------------------------------------------------


def test_every_transition_outside_the_table_is_refused_and_leaves_no_trace(db: Database) -> None:
    for frm in JOB_STATES:
        for to in (*JOB_STATES, "bogus"):
            with db.sessions.begin() as s:
                study, series = add_series(s, [])
                job = add_job(s, study, series)
                job.state = frm
                s.flush()
                before = s.scalar(select(text("count(*)")).select_from(AuditEvent))
                if to in ALLOWED[frm]:
                    transition(s, job, to, reason="test", details={"by_job_uid": "x"})
                    assert job.state == to
                    s.flush()
                    assert s.scalar(select(text("count(*)")).select_from(AuditEvent)) == before + 1
                else:
                    with pytest.raises(IllegalTransition):
                        transition(s, job, to)
                    assert job.state == frm
                    s.flush()
                    assert s.scalar(select(text("count(*)")).select_from(AuditEvent)) == before


def test_a_job_s_life_is_one_typed_audit_row_per_move(db: Database) -> None:
    with db.sessions.begin() as s:
        study, series = add_series(s, [])
        job = add_job(s, study, series)
        for to, reason in [
            ("running", None),
            ("queued", "worker crashed"),
            ("running", None),
            ("written", None),
            ("dispatching", None),
            ("failed", "delivery to pacs failed: 0xA700"),
            ("written", "retry requested"),
            ("dispatching", None),
            ("done", None),
        ]:
            transition(s, job, to, reason=reason, details={"note": to})
        uid = job.uid
    with db.sessions() as s:
        rows = s.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
        events = [as_event(r) for r in rows if r.details.get("job_uid") == uid]
    assert [e.type for e in events] == [
        "job.running",
        "job.queued",
        "job.running",
        "job.written",
        "job.dispatching",
        "job.failed",
        "job.retried",
        "job.dispatching",
        "job.done",
    ]
    failed = events[5]
    assert failed.details()["from"] == "dispatching" and failed.details()["to"] == "failed"
    assert failed.details()["reason"] == "delivery to pacs failed: 0xA700"
    assert [e.details()["attempt"] for e in events[:3]] == [1, 1, 2]
    assert events[0].study_uid == study and events[0].series_uid == series
    job = job_row(db.sessions, uid)
    assert job.state == "done" and job.error is None and job.finished_at is not None


# --- lanes, claiming, budget ------------------------------------------------------------------------------


def test_lanes_run_stat_first_and_ageing_lets_nothing_starve(db: Database) -> None:
    ageing = 300.0
    with db.sessions.begin() as s:
        study, series = add_series(s, [Path(__file__)])
        old_research = add_job(s, study, series, lane="research", created_at=NOW - timedelta(seconds=700))
        routine = add_job(s, study, series, lane="routine", created_at=NOW - timedelta(seconds=100))
        new_stat = add_job(s, study, series, lane="stat", created_at=NOW)
        older_stat = add_job(s, study, series, lane="stat", created_at=NOW - timedelta(seconds=10))
        new_research = add_job(s, study, series, lane="research", created_at=NOW)
        # ranks (s from NOW): research that waited 700 s -100 (it has aged past even the stat jobs),
        # stat -10 and 0, routine +200, new research +600
        expected = [old_research.uid, older_stat.uid, new_stat.uid, routine.uid, new_research.uid]
        ordered = in_claim_order(s.scalars(select(Job)).all(), ageing)
        assert [j.uid for j in ordered] == expected
    claimed = []
    while True:
        claim = claim_next(
            db.sessions,
            "test:1:x",
            spool_root=Path("/"),
            ageing_seconds=ageing,
            default_max_attempts=3,
            default_timeout_seconds=60,
        )
        if claim is None:
            break
        claimed.append(claim.job_uid)
    assert claimed == expected


def test_a_job_without_instances_fails_at_claim_time(db: Database) -> None:
    with db.sessions.begin() as s:
        study, series = add_series(s, [])
        uid = add_job(s, study, series).uid
    claim = claim_next(
        db.sessions,
        "t:1:x",
        spool_root=Path("/"),
        ageing_seconds=1,
        default_max_attempts=1,
        default_timeout_seconds=1,
    )
    assert claim is None
    assert job_events(db.sessions, uid) == ["job.running", "job.failed"]
    assert (job_row(db.sessions, uid).error or "").startswith("no_input")


def test_memory_budget_makes_a_job_wait_rather_than_over_commit() -> None:
    def need(p: str) -> int:
        return {"big": 6000, "small": 2000, "huge": 20000}[p]

    idle, busy = SlotView(False, frozenset()), SlotView(True, frozenset({"big"}))
    assert place("small", [busy, idle], need, 8000) == Placement(1)
    assert place("big", [busy, idle], need, 8000) is None  # waits for the running one
    assert place("big", [busy, idle], need, None) == Placement(1)  # no budget
    assert place("huge", [idle], need, 8000) == NEVER
    warm = SlotView(False, frozenset({"small"}))
    assert place("small", [idle, warm], need, 8000) == Placement(1)  # the warm worker first
    # loading 'big' next to the warm 'small' fits only if that worker drops 'small' first
    assert place("big", [warm], need, 7000) == Placement(0, evict_self=True)
    # an idle worker's warm model is dropped to make room for another idle worker's job
    assert place("big", [SlotView(False, frozenset({"big"})), warm], need, 6000) == Placement(0)
    two_warm = [SlotView(False, frozenset({"small"})), SlotView(False, frozenset({"small"}))]
    assert place("big", two_warm, need, 6000) == Placement(0, evict_self=True, evict_idle=(1,))


def _claim_all(
    sessions: sessionmaker[Session], name: str, out: list[str], errors: list[BaseException]
) -> None:
    try:
        while True:
            claim = claim_next(
                sessions,
                f"test:{name}:x",
                spool_root=Path("/"),
                ageing_seconds=300,
                default_max_attempts=3,
                default_timeout_seconds=60,
                worker=name,
            )
            if claim is None:
                return
            out.append(claim.job_uid)
    except BaseException as exc:  # surfaced by the test
        errors.append(exc)


def _two_claimers(sessions_a: sessionmaker[Session], sessions_b: sessionmaker[Session], n: int) -> None:
    with sessions_a.begin() as s:
        study, series = add_series(s, [Path(__file__)])
        uids = {add_job(s, study, series, created_at=NOW + timedelta(seconds=i)).uid for i in range(n)}
    got_a: list[str] = []
    got_b: list[str] = []
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=_claim_all, args=(sessions_a, "a", got_a, errors)),
        threading.Thread(target=_claim_all, args=(sessions_b, "b", got_b, errors)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert not set(got_a) & set(got_b)
    assert sorted(got_a + got_b) == sorted(uids)
    with sessions_a() as s:
        running = s.scalars(select(AuditEvent).where(AuditEvent.event_type == "job.running")).all()
        claimed = sorted(r.details["job_uid"] for r in running if r.details["job_uid"] in uids)
        assert claimed == sorted(uids)  # each claimed exactly once


def test_sqlite_single_claimer_per_write_lock(tmp_path: Path) -> None:
    from node.db.engine import make_engine, make_session_factory

    settings = make_settings(tmp_path / "data")
    database = Database.open(settings)
    other = make_session_factory(make_engine(settings.database_url))
    _two_claimers(database.sessions, other, 30)


def test_postgres_claimers_skip_locked_rows_and_never_share_a_job(postgres_url: str, tmp_path: Path) -> None:
    from node.db.engine import make_engine, make_session_factory

    settings = make_settings(tmp_path / "data", database_url=postgres_url)
    database = Database.open(settings)
    other = make_session_factory(make_engine(postgres_url))
    with database.sessions.begin() as s:
        study, series = add_series(s, [Path(__file__)])
        first = add_job(s, study, series, lane="stat").uid
        second = add_job(s, study, series, lane="routine").uid
    # another transaction holds the best job locked: the claimer skips it at once instead of waiting
    with other.begin() as holder:
        holder.execute(select(Job).where(Job.uid == first).with_for_update())
        started = time.monotonic()
        claim = claim_next(
            database.sessions,
            "pg:1:x",
            spool_root=Path("/"),
            ageing_seconds=300,
            default_max_attempts=3,
            default_timeout_seconds=60,
        )
        assert claim is not None and claim.job_uid == second
        assert time.monotonic() - started < 30  # did not wait for the holder (a lock wait never ends here)
    assert job_row(database.sessions, first).state == "queued"
    with database.sessions.begin() as s:
        s.execute(text("UPDATE jobs SET state = 'done'"))  # clear the table for the concurrent part
    _two_claimers(database.sessions, other, 40)
    database.engine.dispose()


def test_jobs_cancel_command(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = tmp_path / "data"
    database = Database.open(make_settings(root))
    with database.sessions.begin() as s:
        study, series = add_series(s, [])
        job = add_job(s, study, series)
        job_id, uid = job.id, job.uid
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGNODE_")}
    env["SEGNODE_STORAGE__PATH"] = str(root)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "node.cli", "jobs", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    done = cli("cancel", str(job_id))
    assert done.returncode == 0, done.stderr
    assert f"job {job_id} cancelled" in done.stdout
    again = cli("cancel", uid)
    assert again.returncode == 1 and "is cancelled; only unfinished jobs can be cancelled" in again.stderr
    missing = cli("cancel", "999999")
    assert missing.returncode == 1 and "no job '999999'" in missing.stderr
    assert job_events(database.sessions, uid) == ["job.cancelled"]
    database.engine.dispose()


# --- worker processes with the real pipeline --------------------------------------------------------------


def test_a_series_the_pipeline_refuses_fails_with_its_reason_and_no_output(
    tmp_path: Path, executor_factory: Any
) -> None:
    files = write_series(ct_series(SeriesSpec(n=4, modality="PT")), tmp_path / "pet")
    ex, database = executor_factory(tmp_path / "data")
    with database.sessions.begin() as s:
        study, series = add_series(s, files, modality="PT")
        uid = add_job(s, study, series).uid
    ex.start()
    job = wait_state(database.sessions, uid, ("failed",), timeout=300)
    assert (job.error or "").startswith("unsupported_modality: ")
    assert job_events(database.sessions, uid) == ["job.running", "job.failed"]
    with database.sessions() as s:
        assert s.scalars(select(JobResult)).all() == []
        failed = s.scalar(select(AuditEvent).where(AuditEvent.event_type == "job.failed"))
        assert failed is not None and failed.details["refusal"] == "unsupported_modality"
    out = result_dir(tmp_path / "data", uid)
    assert not out.exists() or not any(out.iterdir())
    # nothing stuck: the worker is alive and serves the next job
    with database.sessions.begin() as s:
        uid2 = add_job(s, study, series).uid
    wait_state(database.sessions, uid2, ("failed",), timeout=120)


def _check_written(sessions: sessionmaker[Session], root: Path, uid: str) -> list[JobResult]:
    with sessions() as s:
        job = s.scalar(select(Job).where(Job.uid == uid))
        assert job is not None
        rows = list(s.scalars(select(JobResult).where(JobResult.job_id == job.id).order_by(JobResult.id)))
    assert [r.kind for r in rows] == ["seg", "sr"]
    for r in rows:
        path = root / r.path
        assert r.path.startswith(f"results/{uid}/") and path.is_file()
        assert hashlib.sha256(path.read_bytes()).hexdigest() == r.sha256 and path.stat().st_size == r.size
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.SOPInstanceUID == r.sop_instance_uid and ds.SeriesInstanceUID == r.series_instance_uid
    assert sorted(p.name for p in (root / "results" / uid).iterdir()) == sorted(
        Path(r.path).name for r in rows
    )  # no staging folder left
    return rows


def test_real_ct_liver_jobs_are_written_and_the_second_runs_warm(
    tmp_path: Path, executor_factory: Any
) -> None:
    files = real_ct()
    root = tmp_path / "data"
    link_models(root)
    ex, database = executor_factory(root)
    with database.sessions.begin() as s:
        study, series = add_series(s, files)
        first = add_job(s, study, series).uid
        second = add_job(s, study, series, created_at=NOW + timedelta(seconds=1)).uid
    ex.start()
    wait_state(database.sessions, second, ("written", "failed"))
    for uid in (first, second):
        assert job_row(database.sessions, uid).state == "written", job_row(database.sessions, uid).error
        assert job_events(database.sessions, uid) == ["job.running", "job.written"]
    a = _check_written(database.sessions, root, first)
    b = _check_written(database.sessions, root, second)
    assert a[0].sop_instance_uid == b[0].sop_instance_uid  # deterministic result UIDs
    with database.sessions() as s:
        written = s.scalars(
            select(AuditEvent).where(AuditEvent.event_type == "job.written").order_by(AuditEvent.id)
        ).all()
    assert [w.details["warm"] for w in written] == [False, True]  # one worker kept the pipeline loaded
    assert written[0].details["measurements"]["liver_volume_ml"] > 0


def test_a_worker_killed_mid_job_is_replaced_and_the_job_retried(
    tmp_path: Path, executor_factory: Any
) -> None:
    files = real_ct()
    root = tmp_path / "data"
    link_models(root)
    ex, database = executor_factory(root)
    with database.sessions.begin() as s:
        study, series = add_series(s, files)
        uid = add_job(s, study, series).uid
    ex.start()
    wait_state(database.sessions, uid, ("running",), timeout=120)
    pid = ex.worker_pids()["worker-1"]
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    job = wait_state(database.sessions, uid, ("written", "failed"))
    assert job.state == "written", job.error
    assert job.attempts == 2
    assert job_events(database.sessions, uid) == [
        "job.running",
        "executor.worker_exited",
        "job.queued",
        "job.running",
        "job.written",
    ]
    assert ex.worker_pids()["worker-1"] != pid
    _check_written(database.sessions, root, uid)


def test_a_job_past_its_timeout_has_its_worker_killed_then_fails_after_max_attempts(
    tmp_path: Path, executor_factory: Any
) -> None:
    files = real_ct()
    root = tmp_path / "data"
    link_models(root)
    ex, database = executor_factory(root, max_attempts=2)
    with database.sessions.begin() as s:
        study, series = add_series(s, files)
        uid = add_job(s, study, series, timeout_seconds=1.0).uid
    ex.start()
    job = wait_state(database.sessions, uid, ("failed", "written"), timeout=300)
    assert job.state == "failed"
    assert "timeout" in (job.error or "") and "gave up after 2 of 2 attempts" in (job.error or "")
    assert job_events(database.sessions, uid) == ["job.running", "job.queued", "job.running", "job.failed"]
    assert not (result_dir(root, uid).exists() and any(result_dir(root, uid).iterdir()))


def test_cancel_stops_a_running_job_s_worker_and_cancels_queued_jobs_at_once(
    tmp_path: Path, executor_factory: Any
) -> None:
    files = real_ct()
    root = tmp_path / "data"
    link_models(root)
    ex, database = executor_factory(root)
    with database.sessions.begin() as s:
        study, series = add_series(s, files)
        running = add_job(s, study, series).uid
        waiting = add_job(s, study, series, created_at=NOW + timedelta(seconds=5)).uid
    done = cancel_job(database.sessions, waiting, author="tester")
    assert done.state == "cancelled"
    ex.start()
    wait_state(database.sessions, running, ("running",), timeout=120)
    pid = ex.worker_pids()["worker-1"]
    assert cancel_job(database.sessions, running, author="tester").state == "running"
    job = wait_state(database.sessions, running, ("cancelled", "written"), timeout=120)
    assert job.state == "cancelled"
    assert job_events(database.sessions, running) == ["job.running", "job.cancel_requested", "job.cancelled"]
    assert job_events(database.sessions, waiting) == ["job.cancelled"]
    wait_for(lambda: ex.worker_pids()["worker-1"] not in (None, pid), what="a fresh worker")
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(CancelError, match="only unfinished jobs"):
        cancel_job(database.sessions, running, author="tester")


def test_a_job_superseded_while_running_is_stopped_and_writes_nothing(
    tmp_path: Path, executor_factory: Any
) -> None:
    files = real_ct()
    root = tmp_path / "data"
    link_models(root)
    ex, database = executor_factory(root)
    with database.sessions.begin() as s:
        study, series = add_series(s, files)
        uid = add_job(s, study, series).uid
    ex.start()
    wait_state(database.sessions, uid, ("running",), timeout=120)
    pid = ex.worker_pids()["worker-1"]
    with database.sessions.begin() as s:  # what the router does when a newer generation of the series arrives
        job = s.scalar(select(Job).where(Job.uid == uid).with_for_update())
        assert job is not None
        transition(s, job, "superseded", details={"by_job_uid": "newer"})
    wait_for(lambda: ex.worker_pids()["worker-1"] not in (None, pid), what="the worker to be replaced")
    assert job_events(database.sessions, uid) == ["job.running", "job.superseded"]
    with database.sessions() as s:
        assert s.scalars(select(JobResult)).all() == []
    assert not result_dir(root, uid).exists() or not any(result_dir(root, uid).iterdir())


def child_workers(pid: int) -> list[int]:
    """Worker processes (multiprocessing spawn children) of process ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_kill_9_of_the_node_during_inference_gives_exactly_one_written_result(tmp_path: Path) -> None:
    files = real_ct()
    root = tmp_path / "store"
    link_models(root)
    settings = make_settings(root)
    database = Database.open(settings)
    with database.sessions.begin() as s:
        study, series = add_series(s, files)
        uid = add_job(s, study, series).uid
    database.engine.dispose()
    env = {"SEGNODE_EXECUTOR__POLL_SECONDS": "0.1", "SEGNODE_EXECUTOR__HEARTBEAT_SECONDS": "0.5"}
    node = start_node(root, extra_env=env)
    try:
        sessions = node.sessions()
        wait_state(sessions, uid, ("running",), timeout=120)
        time.sleep(1.0)  # into the pipeline
        workers = child_workers(node.proc.pid)
        assert workers, "the node runs its pipelines in worker processes"
        node.stop(sig=signal.SIGKILL)
        wait_for(lambda: not any(_alive(p) for p in workers), timeout=30, what="orphaned workers to exit")
        sessions = node.sessions()
        assert job_row(sessions, uid).state == "running"  # as the crash left it
        node = start_node(root, extra_env=env)
        sessions = node.sessions()
        job = wait_state(sessions, uid, ("written", "dispatching", "done", "failed"))
        assert job.state != "failed", job.error
        events = job_events(sessions, uid)
        assert events[:4] == ["job.running", "job.queued", "job.running", "job.written"]
        assert events.count("job.written") == 1
        _check_written(sessions, root, uid)
    finally:
        node.stop()


def test_preload_imports_every_pipeline_and_reports_broken_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """executor.preload_pipelines: a new worker imports the pipelines' code before its first job."""
    import sys

    from pipelines import registry

    assert registry.preload_code() == []
    assert "highdicom._standard_utils" in sys.modules
    for info in registry.PIPELINES.values():
        assert info.entry_point.partition(":")[0] in sys.modules
    broken = registry.PipelineInfo("broken", "pipelines.no_such_module:Nothing", "its code is gone")
    monkeypatch.setitem(registry.PIPELINES, "broken", broken)
    problems = registry.preload_code()
    assert len(problems) == 1 and problems[0].startswith("broken: ModuleNotFoundError")
    assert Settings().executor.preload_pipelines is True
