"""The executor: a claimer thread in the node process and a pool of worker processes that run pipelines.

Every poll the claimer thread (the only one in this process that claims; see claim.py for PostgreSQL and
SQLite):

- collects answers of busy workers: results are moved from the staging folder into
  ``<storage>/results/<job uid>/`` (fsynced), listed in ``job_results`` and the job becomes ``written``, all
  in one transaction; a refusal (``PipelineError``) fails the job at once with its reason, no output;
- notices workers that died (crash, OOM kill, SIGKILL): the job goes back to the queue while attempts are
  left (``max_attempts``), else it fails;
- kills the worker of a job that ran past its timeout (then as a crash), that was cancelled
  (``segnode jobs cancel``) or superseded by a newer job of the same series;
- writes heartbeats of its running jobs, and puts back in the queue the running jobs of executors that are
  gone (a node killed with ``kill -9``: at start-up at once, on the same host; otherwise once their
  heartbeat is older than ``stale_seconds``);
- claims queued jobs for idle workers, in lane order with ageing, within the device's concurrency and
  memory budget.

Inference therefore never runs on the receiving process's threads; a worker that crashes or leaks takes
only its job down, and the job is retried on a fresh worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.audit import events as ev
from node.audit.recorder import record, utcnow
from node.db.models import Job, JobResult
from node.execute.budget import NEVER, Placement, SlotView, estimator, place
from node.execute.claim import Claim, claim_next
from node.execute.worker import EVICT, ResultInfo, Task, TaskCrashed, TaskDone, TaskRefused, worker_main
from node.jobs.transitions import transition
from node.settings import Settings

log = logging.getLogger(__name__)

RESULTS_DIR = "results"


def result_dir(storage_root: Path, job_uid: str) -> Path:
    return storage_root / RESULTS_DIR / job_uid


def staging_dir(storage_root: Path, job_uid: str, attempt: int) -> Path:
    return result_dir(storage_root, job_uid) / f".attempt-{attempt}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _aware(value: datetime) -> datetime:
    from datetime import UTC

    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass
class Slot:
    name: str
    proc: BaseProcess | None = None
    conn: Connection | None = None
    resident: set[str] = field(default_factory=set)
    claim: Claim | None = None
    started: float = 0.0  # monotonic, when the task was sent

    @property
    def busy(self) -> bool:
        return self.claim is not None


class Executor:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: Settings,
        *,
        executor_id: str | None = None,
        clock: Callable[[], datetime] = utcnow,
        on_written: Callable[[], None] | None = None,
    ) -> None:
        """``on_written`` is called (on the executor's thread) after a job's results are committed:
        the node wakes its dispatcher with it, so delivery does not wait for the next poll."""
        from pipelines.bundles import models_dir

        self.on_written = on_written

        self.sessions = sessions
        self.settings = settings
        self.cfg = settings.executor
        self.storage_root = settings.storage.path
        self.spool_root = settings.spool_dir
        self.models_dir = models_dir(settings.storage.path)
        self.host = socket.gethostname()
        self.id = executor_id or f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.clock = clock
        self.need = estimator(self.cfg.model_memory_mb, self.cfg.default_model_memory_mb)
        self.slots = [Slot(f"worker-{i + 1}") for i in range(self.cfg.workers)]
        self._ctx = get_context("spawn")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_heartbeat = 0.0
        self._last_reap = 0.0

    # -- life cycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        recovered = self.recover()
        if recovered:
            log.info("executor: %d running job(s) of a previous run went back to the queue", recovered)
        for slot in self.slots:
            self._spawn(slot)
        self._thread = threading.Thread(target=self._loop, name="executor", daemon=True)
        self._thread.start()
        log.info(
            "executor %s: %d worker(s) on %s, concurrency %d",
            self.id,
            len(self.slots),
            self.cfg.device,
            self.cfg.concurrency,
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop claiming; running jobs' workers are stopped and their jobs go back to the queue."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout + self.cfg.poll_seconds + 5)
        for slot in self.slots:
            if slot.busy:
                self._kill(slot)
                self._give_back(slot, "node stopped while the job ran", count_attempt=False)
            elif slot.conn is not None and slot.proc is not None:
                with contextlib.suppress(OSError):
                    slot.conn.send(None)
                slot.proc.join(timeout=5)
                self._kill(slot)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a database hiccup must not end the executor
                log.exception("executor: tick failed; trying again")
                self._stop.wait(1.0)
            waitables: list[Any] = []
            for slot in self.slots:
                if slot.busy and slot.conn is not None and slot.proc is not None:
                    waitables += [slot.conn, slot.proc.sentinel]
            if waitables:
                wait(waitables, timeout=self.cfg.poll_seconds)
            else:
                self._stop.wait(self.cfg.poll_seconds)

    def tick(self) -> None:
        """One round: collect, police, heartbeat, reap, claim (called by the loop; tests may call it)."""
        self._collect()
        self._police()
        now = time.monotonic()
        if now - self._last_heartbeat >= self.cfg.heartbeat_seconds:
            self._heartbeat()
            self._last_heartbeat = now
        if now - self._last_reap >= self.cfg.stale_seconds / 4:
            self.recover()
            self._last_reap = now
        while not self._stop.is_set() and self._claim_one():
            pass

    # -- workers ----------------------------------------------------------------------------------------

    def _spawn(self, slot: Slot) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=worker_main,
            args=(child, slot.name, os.getpid(), self.cfg.preload_pipelines),
            name=f"segnode-{slot.name}",
            daemon=True,
        )
        proc.start()
        child.close()
        slot.proc, slot.conn, slot.resident = proc, parent, set()

    def _kill(self, slot: Slot) -> None:
        if slot.proc is not None:
            if slot.proc.is_alive():
                slot.proc.kill()
            slot.proc.join(timeout=10)
        if slot.conn is not None:
            slot.conn.close()
        slot.proc, slot.conn = None, None
        slot.resident = set()

    def worker_pids(self) -> dict[str, int | None]:
        return {s.name: (s.proc.pid if s.proc is not None else None) for s in self.slots}

    # -- claiming ---------------------------------------------------------------------------------------

    def _views(self) -> list[SlotView]:
        return [SlotView(s.busy, frozenset(s.resident)) for s in self.slots]

    def _plan(self, pipeline: str) -> Placement | str | None:
        return place(pipeline, self._views(), self.need, self.cfg.memory_budget_mb)

    def _claim_one(self) -> bool:
        running = sum(1 for s in self.slots if s.busy)
        if running >= min(self.cfg.concurrency, len(self.slots)):
            return False
        if all(s.busy for s in self.slots):
            return False
        claim = claim_next(
            self.sessions,
            self.id,
            spool_root=self.spool_root,
            ageing_seconds=self.cfg.lane_ageing_seconds,
            default_max_attempts=self.cfg.max_attempts,
            default_timeout_seconds=self.cfg.job_timeout_seconds,
            fits=lambda pipeline: self._plan(pipeline) is not None,
        )
        if claim is None:
            return False
        plan = self._plan(claim.pipeline)
        if plan == NEVER or not isinstance(plan, Placement):
            self._fail_claim(
                claim,
                f"memory_budget: pipeline {claim.pipeline} needs {self.need(claim.pipeline)} MB, more than "
                f"executor.memory_budget_mb ({self.cfg.memory_budget_mb})",
            )
            return True
        slot = self.slots[plan.slot]
        for i in plan.evict_idle:
            other = self.slots[i]
            if other.conn is not None:
                other.conn.send(EVICT)
                other.resident = set()
        if slot.proc is None or not slot.proc.is_alive():
            self._kill(slot)
            self._spawn(slot)
        staging = staging_dir(self.storage_root, claim.job_uid, claim.attempt)
        task = Task(
            job_uid=claim.job_uid,
            attempt=claim.attempt,
            pipeline=claim.pipeline,
            series_files=[str(p) for p in claim.series_files],
            output_dir=str(staging),
            models_dir=str(self.models_dir),
            parameters=claim.parameters,
            rule_version=str(claim.rule_version),
            device=self.cfg.device,
            evict=plan.evict_self,
        )
        assert slot.conn is not None
        try:
            slot.conn.send(task)
        except OSError:  # the worker died between spawn and send: treat as a crash
            slot.claim, slot.started = claim, time.monotonic()
            self._crashed(slot, "worker unreachable")
            return True
        slot.resident = {claim.pipeline} if plan.evict_self else slot.resident | {claim.pipeline}
        slot.claim, slot.started = claim, time.monotonic()
        log.info("job %s (%s, attempt %d) -> %s", claim.job_uid, claim.pipeline, claim.attempt, slot.name)
        return True

    def _fail_claim(self, claim: Claim, reason: str) -> None:
        with self.sessions.begin() as s:
            job = self._locked(s, claim.job_id)
            if job is not None and job.state == "running" and job.claimed_by == self.id:
                transition(s, job, "failed", reason=reason, at=self.clock())

    # -- answers, crashes, timeouts ---------------------------------------------------------------------

    def _collect(self) -> None:
        for slot in self.slots:
            if not slot.busy or slot.conn is None or slot.proc is None:
                continue
            message: Any = None
            try:
                if slot.conn.poll():
                    message = slot.conn.recv()
            except (EOFError, OSError):
                message = None
            if message is None:
                if not slot.proc.is_alive():
                    self._crashed(slot, f"worker process died (exit code {slot.proc.exitcode})")
                continue
            claim = slot.claim
            assert claim is not None
            if getattr(message, "job_uid", None) != claim.job_uid or message.attempt != claim.attempt:
                log.warning("executor: %s answered for another task; ignored", slot.name)
                continue
            try:
                if isinstance(message, TaskDone):
                    self._written(slot, message)
                elif isinstance(message, TaskRefused):
                    self._refused(slot, message)
                elif isinstance(message, TaskCrashed):
                    slot.resident.discard(claim.pipeline)
                    first = message.error.strip().splitlines()[0] if message.error.strip() else "error"
                    self._give_back(
                        slot, f"pipeline error: {first}", details={"traceback": message.error[-4000:]}
                    )
            except Exception as exc:  # e.g. the results could not be stored: retried like a crash
                log.exception("executor: job %s: handling the answer of %s failed", claim.job_uid, slot.name)
                self._give_back(slot, f"could not store the results: {type(exc).__name__}: {exc}")
            slot.claim = None

    def _crashed(self, slot: Slot, reason: str) -> None:
        claim = slot.claim
        assert claim is not None
        pid = slot.proc.pid if slot.proc is not None else 0
        exitcode = slot.proc.exitcode if slot.proc is not None else None
        self._kill(slot)
        log.warning(
            "executor: %s (pid %s) ended while running job %s: %s", slot.name, pid, claim.job_uid, reason
        )
        with self.sessions.begin() as s:
            record(
                s,
                ev.WorkerExited(
                    study_uid=claim.study_uid,
                    worker=slot.name,
                    pid=pid or 0,
                    exitcode=exitcode,
                    job_uid=claim.job_uid,
                    reason=reason,
                ),
                at=self.clock(),
            )
        self._give_back(slot, reason)
        slot.claim = None
        if not self._stop.is_set():
            self._spawn(slot)

    def _police(self) -> None:
        busy = [s for s in self.slots if s.busy]
        if not busy:
            return
        ids = [s.claim.job_id for s in busy if s.claim is not None]
        with self.sessions() as s:
            rows = {
                r[0]: (r[1], r[2], r[3])
                for r in s.execute(
                    select(Job.id, Job.state, Job.cancel_requested, Job.claimed_by).where(Job.id.in_(ids))
                )
            }
        now = time.monotonic()
        for slot in busy:
            claim = slot.claim
            assert claim is not None
            state, cancel, owner = rows.get(claim.job_id, ("gone", False, None))
            if state != "running" or owner != self.id:
                log.info("job %s is %s now; stopping its worker %s", claim.job_uid, state, slot.name)
                self._kill(slot)
                self._discard(claim)
                slot.claim = None
                self._spawn(slot)
            elif cancel:
                self._kill(slot)
                self._discard(claim)
                with self.sessions.begin() as s:
                    job = self._locked(s, claim.job_id)
                    if job is not None and job.state == "running":
                        transition(
                            s,
                            job,
                            "cancelled",
                            reason="cancelled on request; its worker was stopped",
                            details={"worker": slot.name},
                            at=self.clock(),
                        )
                slot.claim = None
                self._spawn(slot)
            elif now - slot.started > claim.timeout_seconds:
                seconds = now - slot.started
                self._kill(slot)
                self._give_back(
                    slot,
                    f"timeout: still running after {seconds:.0f} s (limit {claim.timeout_seconds:g} s); "
                    "its worker was killed",
                )
                slot.claim = None
                self._spawn(slot)

    def _discard(self, claim: Claim) -> None:
        shutil.rmtree(staging_dir(self.storage_root, claim.job_uid, claim.attempt), ignore_errors=True)

    @staticmethod
    def _locked(s: Session, job_id: int) -> Job | None:
        return s.scalar(select(Job).where(Job.id == job_id).with_for_update())

    def _give_back(
        self,
        slot: Slot,
        reason: str,
        *,
        details: dict[str, Any] | None = None,
        count_attempt: bool = True,
    ) -> None:
        """A transient failure of the running job: to the queue while attempts are left, else failed."""
        claim = slot.claim
        if claim is None:
            return
        self._discard(claim)
        with self.sessions.begin() as s:
            job = self._locked(s, claim.job_id)
            if job is None or job.state != "running" or job.claimed_by != self.id:
                return
            self._requeue_or_fail(
                s, job, reason, details={**(details or {}), "worker": slot.name}, count_attempt=count_attempt
            )

    def _requeue_or_fail(
        self, s: Session, job: Job, reason: str, *, details: dict[str, Any], count_attempt: bool = True
    ) -> str:
        now = self.clock()
        limit = job.max_attempts or self.cfg.max_attempts
        if job.cancel_requested:
            transition(
                s, job, "cancelled", reason=f"cancelled on request ({reason})", details=details, at=now
            )
        elif count_attempt and job.attempts >= limit:
            transition(
                s,
                job,
                "failed",
                reason=f"{reason}; gave up after {job.attempts} of {limit} attempts",
                details=details,
                at=now,
            )
        else:
            transition(s, job, "queued", reason=reason, details=details, at=now)
            if not count_attempt:
                job.attempts = max(0, job.attempts - 1)
        return job.state

    def _refused(self, slot: Slot, message: TaskRefused) -> None:
        claim = slot.claim
        assert claim is not None
        self._discard(claim)
        with self.sessions.begin() as s:
            job = self._locked(s, claim.job_id)
            if job is None or job.state != "running" or job.claimed_by != self.id:
                return
            transition(
                s,
                job,
                "failed",
                reason=f"{message.reason}: {message.message}",
                details={"refusal": message.reason, "worker": slot.name},
                at=self.clock(),
            )

    def _written(self, slot: Slot, done: TaskDone) -> None:
        """Move the results into place (fsynced), list them and mark the job written: one transaction."""
        claim = slot.claim
        assert claim is not None
        dest = result_dir(self.storage_root, claim.job_uid)
        staging = staging_dir(self.storage_root, claim.job_uid, claim.attempt)
        with self.sessions.begin() as s:
            job = self._locked(s, claim.job_id)
            if job is None or job.state != "running" or job.claimed_by != self.id:
                self._discard(claim)
                return
            names = {f.name for f in done.files}
            for old in dest.iterdir():
                if old.name.startswith(".attempt-") and old != staging:
                    shutil.rmtree(old, ignore_errors=True)
                elif old.is_file() and old.name not in names:
                    old.unlink()
            for f in done.files:
                os.replace(staging / f.name, dest / f.name)
            _fsync_dir(dest)
            shutil.rmtree(staging, ignore_errors=True)
            s.execute(delete(JobResult).where(JobResult.job_id == job.id))
            now = self.clock()
            for f in done.files:
                s.add(self._result_row(job.id, claim.job_uid, f, now))
            transition(
                s,
                job,
                "written",
                details={
                    "worker": slot.name,
                    "warm": done.warm,
                    "results": [{"kind": f.kind, "sop_instance_uid": f.sop_instance_uid} for f in done.files],
                    "measurements": done.measurements,
                    "timings": done.timings,
                    "notes": done.notes,
                },
                at=now,
            )
        if self.on_written is not None:
            self.on_written()

    @staticmethod
    def _result_row(job_id: int, job_uid: str, f: ResultInfo, now: datetime) -> JobResult:
        return JobResult(
            job_id=job_id,
            kind=f.kind[:16],
            path=f"{RESULTS_DIR}/{job_uid}/{f.name}",
            sop_class_uid=f.sop_class_uid,
            sop_instance_uid=f.sop_instance_uid,
            series_instance_uid=f.series_instance_uid,
            sha256=f.sha256,
            size=f.size,
            created_at=now,
        )

    # -- heartbeats and recovery ------------------------------------------------------------------------

    def _heartbeat(self) -> None:
        ids = [s.claim.job_id for s in self.slots if s.claim is not None]
        if not ids:
            return
        with self.sessions.begin() as s:
            s.execute(
                update(Job)
                .where(Job.id.in_(ids), Job.state == "running", Job.claimed_by == self.id)
                .values(heartbeat_at=self.clock())
            )

    def _owner_gone(self, job: Job, now: datetime) -> bool:
        owner = job.claimed_by
        if owner is None:
            return True
        host, _, rest = owner.partition(":")
        pid_text = rest.partition(":")[0]
        if host == self.host and pid_text.isdigit():
            pid = int(pid_text)
            if pid != os.getpid() and not _pid_alive(pid):
                return True
        beat = job.heartbeat_at or job.claimed_at or job.updated_at
        return _aware(beat) < now - timedelta(seconds=self.cfg.stale_seconds)

    def recover(self) -> int:
        """Running jobs whose executor is gone go back to the queue (or fail, out of attempts)."""
        now = self.clock()
        moved = 0
        with self.sessions.begin() as s:
            jobs = s.scalars(
                select(Job)
                .where(Job.state == "running", or_(Job.claimed_by.is_(None), Job.claimed_by != self.id))
                .with_for_update(skip_locked=True)
            ).all()
            for job in jobs:
                if not self._owner_gone(job, now):
                    continue
                self._requeue_or_fail(
                    s,
                    job,
                    f"executor {job.claimed_by} is gone (node stopped or killed while the job ran)",
                    details={"previous_executor": job.claimed_by, "executor": self.id},
                )
                moved += 1
        return moved
