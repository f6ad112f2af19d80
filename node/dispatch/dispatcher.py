"""The dispatcher: ``written`` jobs -> one durable outbox row per (job, destination) -> delivered.

One scheduler thread claims ``written`` jobs (job -> ``dispatching`` and its ``deliveries`` rows in
one transaction) and finds deliveries that are due. Deliveries are grouped by peer (``Target.key``);
each peer gets its own worker thread, so a dead or slow peer only ever delays its own deliveries (no
head-of-line blocking). A delivery attempt is three steps: mark ``sending`` (+1 attempt, audited),
send with no transaction open, record the outcome (per-instance statuses merged, then delivered,
retry with backoff, or failed) together with the job's own transition once every delivery of the job
has ended: all delivered -> ``done``, any failed -> ``failed`` with the peer's answer.

After a crash, ``sending`` rows go back to ``pending``: the resend carries the same deterministic
SOP Instance UIDs, so the peer replaces what it may already have, never duplicates it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from node.audit import events as ev
from node.audit.recorder import record, utcnow
from node.db.models import Delivery, Job
from node.dispatch import dimse, stow
from node.dispatch.destinations import DestinationError, DestinationStore, Target, resolve
from node.dispatch.outcome import AttemptResult, InstanceStatus, ResultFile
from node.dispatch.policy import CircuitBreakers, backoff_delay
from node.dispatch.results import result_files
from node.jobs.transitions import transition
from node.settings import Settings

log = logging.getLogger(__name__)

CLAIM_BATCH = 50
DUE_BATCH = 500


@dataclass(frozen=True)
class _Due:
    delivery_id: int
    target: Target


def _job_keys(job: Job) -> dict[str, Any]:
    return {
        "study_uid": job.study_uid,
        "series_uid": job.series_uids[0] if len(job.series_uids) == 1 else None,
    }


def _as_aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes (stored as UTC)."""
    from datetime import UTC

    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class Dispatcher:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: Settings,
        *,
        clock: Callable[[], datetime] = utcnow,
        rng: random.Random | None = None,
    ) -> None:
        self.sessions = sessions
        self.settings = settings.dispatch
        self.storage_root = settings.storage.path
        self.destinations = DestinationStore(sessions, settings.destinations)
        tls = settings.dimse.tls
        self.calling = dimse.Calling(settings.node.ae_title, tls if tls.certificate or tls.ca else None)
        self.breakers = CircuitBreakers(
            self.settings.breaker_threshold, self.settings.breaker_cooldown_seconds
        )
        self.clock = clock
        self.rng = rng or random.Random()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._workers: dict[str, threading.Thread] = {}
        self._inflight: set[int] = set()  # delivery ids this dispatcher is sending right now
        self._lock = threading.Lock()

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        recovered = self.recover()
        if recovered:
            log.info("dispatch: %d delivery(ies) were being sent when the node stopped; resending", recovered)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        with self._lock:
            workers = list(self._workers.values())
        for w in workers:
            w.join(max(0.0, deadline - time.monotonic()))

    def wake(self) -> None:
        self._wake.set()

    def recover(self) -> int:
        """Deliveries left ``sending`` by a previous run are due again (the attempt stays counted)."""
        with self.sessions.begin() as s:
            result = s.execute(
                update(Delivery)
                .where(Delivery.state == "sending")
                .values(state="pending", next_attempt_at=self.clock(), updated_at=self.clock())
            )
            return int(getattr(result, "rowcount", 0) or 0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the database may be briefly unavailable; never let the thread die
                log.exception("dispatch: scheduling pass failed")
            self._wake.wait(self.settings.poll_seconds)
            self._wake.clear()

    def tick(self) -> None:
        self.claim_written()
        self.release_orphans()
        self.schedule_due()

    def release_orphans(self) -> int:
        """``sending`` rows nobody here is sending (their outcome could not be recorded, e.g. the
        database was briefly unavailable) are due again once they are older than one attempt can take."""
        grace = timedelta(
            seconds=self.settings.connect_timeout_seconds
            + self.settings.timeout_seconds
            + 10 * self.settings.poll_seconds
        )
        cutoff = self.clock() - grace
        with self._lock:
            busy = set(self._inflight)
        with self.sessions() as s:
            stale = [
                i
                for i in s.scalars(
                    select(Delivery.id).where(Delivery.state == "sending", Delivery.last_attempt_at < cutoff)
                ).all()
                if i not in busy
            ]
        if not stale:
            return 0
        with self.sessions.begin() as s:
            result = s.execute(
                update(Delivery)
                .where(Delivery.id.in_(stale), Delivery.state == "sending")
                .values(state="pending", next_attempt_at=self.clock(), updated_at=self.clock())
            )
        log.warning("dispatch: %d delivery(ies) left in 'sending' are due again", len(stale))
        return int(getattr(result, "rowcount", 0) or 0)

    # -- written jobs -> deliveries --------------------------------------------------------------
    def claim_written(self) -> int:
        claimed = 0
        # read before the write transaction: on SQLite every transaction takes the write lock
        effective = self.destinations.effective()
        with self.sessions.begin() as s:
            jobs = s.scalars(
                select(Job)
                .where(Job.state == "written")
                .order_by(Job.id)
                .limit(CLAIM_BATCH)
                .with_for_update(skip_locked=True)
            ).all()
            if not jobs:
                return 0
            for job in jobs:
                self._claim(s, job, effective)
                claimed += 1
        return claimed

    def _claim(self, s: Session, job: Job, effective: Any) -> None:
        now = self.clock()
        files = result_files(s, job.id, self.storage_root)
        names = list(dict.fromkeys(job.destinations))
        transition(
            s,
            job,
            "dispatching",
            details={"destinations": names, "results": [f.sop_instance_uid for f in files]},
        )
        existing = {d.destination: d for d in s.scalars(select(Delivery).where(Delivery.job_id == job.id))}
        for name in names:
            d = existing.get(name)
            if d is not None and d.state == "delivered":
                continue  # a retried job resends only what did not arrive
            if d is None:
                d = Delivery(job_id=job.id, destination=name, created_at=now, outcomes={})
                s.add(d)
            d.state, d.attempts, d.next_attempt_at, d.updated_at = "pending", 0, now, now
            d.last_error = None
            try:
                target = resolve(
                    effective,
                    name,
                    sender_ae=job.sender_ae,
                    sender_host=job.sender_host,
                    sender_port=self.settings.sender_port,
                ).describe()
            except DestinationError:
                target = "(unresolved)"
            record(
                s,
                ev.DeliveryQueued(
                    **_job_keys(job), job_uid=job.uid, destination=name, target=target, instances=len(files)
                ),
            )
        s.flush()
        self._settle_job(s, job)

    # -- due deliveries -> per-peer workers ------------------------------------------------------
    def schedule_due(self) -> int:
        now = self.clock()
        with self.sessions() as s:
            rows = s.execute(
                select(Delivery.id, Delivery.destination, Job.sender_ae, Job.sender_host)
                .join(Job, Job.id == Delivery.job_id)
                .where(Delivery.state == "pending", Delivery.next_attempt_at <= now)
                .order_by(Delivery.next_attempt_at, Delivery.id)
                .limit(DUE_BATCH)
            ).all()
        if not rows:
            return 0
        effective = self.destinations.effective()
        by_key: dict[str, list[_Due]] = {}
        for delivery_id, name, sender_ae, sender_host in rows:
            try:
                target = resolve(
                    effective,
                    name,
                    sender_ae=sender_ae,
                    sender_host=sender_host,
                    sender_port=self.settings.sender_port,
                )
            except DestinationError as exc:
                self._fail_unresolved(delivery_id, str(exc))
                continue
            by_key.setdefault(target.key, []).append(_Due(delivery_id, target))
        started = 0
        with self._lock:
            for key, due in by_key.items():
                worker = self._workers.get(key)
                if worker is not None and worker.is_alive():
                    continue  # that peer's worker picks these up on its next pass
                if self.breakers.state(key) == "open":
                    self._hold(due, key)
                    continue
                worker = threading.Thread(
                    target=self._work, args=(key, due), name=f"dispatch:{key}", daemon=True
                )
                self._workers[key] = worker
                worker.start()
                started += 1
        return started

    def _hold(self, due: Sequence[_Due], key: str) -> None:
        """An open breaker: the peer's deliveries wait for its trial instead of being looked at again
        and again (so they never crowd other peers' deliveries out of the due query)."""
        at = self.breakers.retry_at(key)
        if at is None:
            return
        when = self.clock() + timedelta(seconds=max(0.0, at - time.monotonic()))
        with self.sessions.begin() as s:
            s.execute(
                update(Delivery)
                .where(Delivery.id.in_([d.delivery_id for d in due]), Delivery.state == "pending")
                .values(next_attempt_at=when)
            )

    def _work(self, key: str, due: list[_Due]) -> None:
        for i, item in enumerate(due):
            if self._stop.is_set():
                return
            if not self.breakers.allow(key):
                self._hold(due[i:], key)
                return
            with self._lock:
                self._inflight.add(item.delivery_id)
            try:
                self.attempt(item.delivery_id, item.target)
            except Exception:
                self.breakers.release(key)
                log.exception("dispatch: delivery %d to %s failed unexpectedly", item.delivery_id, key)
            finally:
                with self._lock:
                    self._inflight.discard(item.delivery_id)

    # -- one attempt -----------------------------------------------------------------------------
    def attempt(self, delivery_id: int, target: Target) -> None:
        with self.sessions.begin() as s:
            d = s.get(Delivery, delivery_id, with_for_update=True)
            if d is None or d.state != "pending":
                self.breakers.release(target.key)
                return
            job = s.get(Job, d.job_id, with_for_update=True)
            assert job is not None
            if job.state != "dispatching":  # cancelled or superseded meanwhile: nothing more to send
                d.state, d.last_error, d.updated_at = "failed", f"job is {job.state}", self.clock()
                d.last_status = f"job {job.state}"
                record(
                    s,
                    ev.DeliveryFailed(
                        **_job_keys(job),
                        job_uid=job.uid,
                        destination=d.destination,
                        target=target.describe(),
                        attempt=d.attempts,
                        status=d.last_status,
                        error=f"not sent: the job is {job.state}",
                        permanent=True,
                    ),
                )
                self.breakers.release(target.key)
                return
            files = [
                f
                for f in result_files(s, job.id, self.storage_root)
                if (d.outcomes or {}).get(f.sop_instance_uid, {}).get("outcome")
                not in ("delivered", "warning")
            ]
            d.state, d.attempts = "sending", d.attempts + 1
            d.last_attempt_at = d.updated_at = self.clock()
            attempt_no = d.attempts
            record(
                s,
                ev.DeliveryAttempted(
                    **_job_keys(job),
                    job_uid=job.uid,
                    destination=d.destination,
                    target=target.describe(),
                    attempt=attempt_no,
                    instances=len(files),
                ),
            )
        result = self._send(target, files)
        self._record(delivery_id, target, files, result, attempt_no)
        if result.transient_error:
            if self.breakers.failure(target.key):
                self._audit_breaker(target, opened=True)
        elif result.error is None:
            if self.breakers.success(target.key):
                self._audit_breaker(target, opened=False)
        else:
            self.breakers.release(target.key)

    def _send(self, target: Target, files: list[ResultFile]) -> AttemptResult:
        missing = [str(f.path) for f in files if not f.path.is_file()]
        if missing:
            return AttemptResult(
                error=f"result file(s) missing: {', '.join(missing)}",
                status="missing results",
                permanent=True,
            )
        if not files:
            return AttemptResult(status="nothing to send")
        try:
            if target.type == "dimse":
                return dimse.send(target, files, self.settings, self.calling)
            return stow.send(target, files, self.settings)
        except (OSError, RuntimeError, ValueError) as exc:
            return AttemptResult(error=f"{type(exc).__name__}: {exc}", status="error")

    def _record(
        self, delivery_id: int, target: Target, files: list[ResultFile], result: AttemptResult, attempt: int
    ) -> None:
        now = self.clock()
        with self.sessions.begin() as s:
            d = s.get(Delivery, delivery_id, with_for_update=True)
            assert d is not None
            job = s.get(Job, d.job_id, with_for_update=True)
            assert job is not None
            outcomes = dict(d.outcomes or {})
            for uid, st in result.instances.items():
                outcomes[uid] = {
                    "status": st.status,
                    "outcome": st.outcome,
                    "detail": st.detail,
                    "attempt": attempt,
                }
            d.outcomes = outcomes
            d.last_status = result.status[:64]
            d.updated_at = now
            open_uids = [
                f.sop_instance_uid for f in files if not _done(result.instances.get(f.sop_instance_uid))
            ]
            failures = {uid: st for uid, st in result.instances.items() if st.outcome == "failed"}
            error = result.error or "; ".join(
                f"{uid}: {st.detail or 'failed'} ({_hex(st.status)})" for uid, st in failures.items()
            )
            keys = _job_keys(job)
            common: dict[str, Any] = {
                "job_uid": job.uid,
                "destination": d.destination,
                "target": target.describe(),
                "attempt": attempt,
            }
            if not open_uids and result.error is None:
                d.state, d.last_error, d.next_attempt_at = "delivered", None, now
                record(
                    s,
                    ev.DeliverySucceeded(
                        **keys,
                        **common,
                        statuses={uid: int(o.get("status") or 0) for uid, o in outcomes.items()},
                        warnings={
                            uid: f"{_hex(o.get('status'))} {o.get('detail', '')}".strip()
                            for uid, o in outcomes.items()
                            if o.get("outcome") == "warning"
                        },
                    ),
                )
            elif result.permanent or d.attempts >= self.settings.max_attempts:
                d.state, d.last_error = "failed", error
                record(
                    s,
                    ev.DeliveryFailed(
                        **keys, **common, status=result.status, error=error, permanent=result.permanent
                    ),
                )
            else:
                delay = backoff_delay(d.attempts, self.settings, self.rng)
                d.state, d.last_error = "pending", error
                d.next_attempt_at = now + timedelta(seconds=delay)
                record(
                    s,
                    ev.DeliveryRetryScheduled(
                        **keys, **common, delay_seconds=round(delay, 3), status=result.status, error=error
                    ),
                )
            s.flush()
            self._settle_job(s, job)

    def _fail_unresolved(self, delivery_id: int, reason: str) -> None:
        with self.sessions.begin() as s:
            d = s.get(Delivery, delivery_id, with_for_update=True)
            if d is None or d.state != "pending":
                return
            job = s.get(Job, d.job_id, with_for_update=True)
            assert job is not None
            d.state, d.last_error, d.last_status, d.updated_at = "failed", reason, "unresolved", self.clock()
            record(
                s,
                ev.DeliveryFailed(
                    **_job_keys(job),
                    job_uid=job.uid,
                    destination=d.destination,
                    target="(unresolved)",
                    attempt=d.attempts,
                    status="unresolved",
                    error=reason,
                    permanent=True,
                ),
            )
            s.flush()
            self._settle_job(s, job)

    def _settle_job(self, s: Session, job: Job) -> None:
        """Once no delivery of ``job`` is pending or sending: done, or failed with the peers' answers."""
        if job.state != "dispatching":
            return
        deliveries = s.scalars(select(Delivery).where(Delivery.job_id == job.id).order_by(Delivery.id)).all()
        if any(d.state in ("pending", "sending") for d in deliveries):
            return
        summary = {d.destination: {"state": d.state, "status": d.last_status} for d in deliveries}
        failed = [d for d in deliveries if d.state == "failed"]
        if not failed:
            transition(s, job, "done", details={"deliveries": summary})
            return
        reason = "; ".join(
            f"delivery to {d.destination} failed: {d.last_status}: {d.last_error}" for d in failed
        )
        transition(s, job, "failed", reason=reason[:2000], details={"deliveries": summary})

    def _audit_breaker(self, target: Target, *, opened: bool) -> None:
        event: ev.Event
        if opened:
            log.warning(
                "dispatch: %s (%s) unreachable %d times in a row; pausing it for %.0f s",
                target.name,
                target.describe(),
                self.breakers.threshold,
                self.breakers.cooldown,
            )
            event = ev.DestinationBreakerOpened(
                destination=target.name,
                target=target.describe(),
                failures=self.breakers.threshold,
                cooldown_seconds=self.breakers.cooldown,
            )
        else:
            log.info("dispatch: %s (%s) reachable again", target.name, target.describe())
            event = ev.DestinationBreakerClosed(destination=target.name, target=target.describe())
        with self.sessions.begin() as s:
            record(s, event)


def _done(status: InstanceStatus | None) -> bool:
    return status is not None and status.done


def _hex(status: int | None) -> str:
    return "no status" if status is None else f"0x{status:04X}"
