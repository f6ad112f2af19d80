"""Routing completed series (and quiet studies) through the rules into job rows.

State is in the database: a series is pending while ``routed_generation < generation``; a study
is pending for study-level rules while its fingerprint (series UIDs and generations) differs from
``routed_fingerprint``. Each job has a unique ``dedupe_key`` (rule + series or study content), so
routing creates exactly one job per matching rule even when it runs twice or concurrently.
A series that re-opens (generation + 1) is routed again; the new job supersedes the old one.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from node.audit import events as ev
from node.audit.recorder import record, utcnow
from node.db.models import Instance, Job, Series, Study
from node.route.evaluate import RuleResult, evaluate_all
from node.route.facts import SeriesFacts, compute_facts, read_headers
from node.route.own_outputs import own_output_reason
from node.route.rules import Rule
from node.route.store import RuleStore, StoredRule

log = logging.getLogger(__name__)

OPEN_JOB_STATES = ("queued", "running", "written", "dispatching")
# A done job is superseded too: its results are replaced by the re-run (deterministic result UIDs).
SUPERSEDABLE = (*OPEN_JOB_STATES, "done")


@dataclass(frozen=True)
class CreatedJob:
    uid: str
    rule: str
    series_uids: tuple[str, ...]
    superseded: tuple[str, ...]


def latest_instance_paths(s: Session, series_id: int, spool_root: Path) -> list[Path]:
    """Files of the latest version of every instance of a series."""
    latest = (
        select(Instance.sop_instance_uid, func.max(Instance.version).label("v"))
        .where(Instance.series_id == series_id)
        .group_by(Instance.sop_instance_uid)
        .subquery()
    )
    rows = s.execute(
        select(Instance.path)
        .join(
            latest,
            (Instance.sop_instance_uid == latest.c.sop_instance_uid) & (Instance.version == latest.c.v),
        )
        .where(Instance.series_id == series_id)
        .order_by(Instance.id)
    ).scalars()
    return [spool_root / p for p in rows]


def _aware(value: datetime) -> datetime:
    from datetime import UTC

    return value if value.tzinfo else value.replace(tzinfo=UTC)


class Router:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        rules: RuleStore,
        spool_root: Path,
        quiet_seconds: float,
        poll_seconds: float = 0.25,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.sessions = sessions
        self.rules = rules
        self.spool_root = spool_root
        self.quiet = timedelta(seconds=quiet_seconds)
        self.poll_seconds = poll_seconds
        self.clock = clock
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._versions: dict[str, int] = {}
        self._signature: tuple[object, ...] | None = None
        self._stored: list[StoredRule] = []

    # -- facts -----------------------------------------------------------------------------------
    def _facts(self, series: Series) -> tuple[SeriesFacts | None, str | None]:
        with self.sessions() as s:
            paths = latest_instance_paths(s, series.id, self.spool_root)
        problems: list[str] = []
        headers = read_headers(paths, on_error=lambda p, e: problems.append(f"{p.name}: {e}"))
        if not headers:
            return None, "no readable instance: " + ("; ".join(problems[:3]) or "series is empty")
        return compute_facts(headers), None

    # -- one pass --------------------------------------------------------------------------------
    def route_once(self) -> list[CreatedJob]:
        signature = self.rules.signature()
        if signature != self._signature:  # parse the rules only when one changed
            self._stored = [r for r in self.rules.stored() if r.rule.enabled]
            self._signature = signature
        stored = self._stored
        self._versions = {r.rule.name: r.version for r in stored}
        rules = [r.rule for r in stored]
        created: list[CreatedJob] = []
        with self.sessions() as s:
            pending = s.scalars(
                select(Series).where(Series.state == "complete", Series.routed_generation < Series.generation)
            ).all()
        for series in pending:
            created += self._route_series(series, [r for r in rules if r.level == "series"])
        study_rules = [r for r in rules if r.level == "study"]
        if study_rules:
            created += self._route_studies(study_rules)
        return created

    def _route_series(self, series: Series, rules: Sequence[Rule]) -> list[CreatedJob]:
        facts, problem = self._facts(series)
        created: list[CreatedJob] = []
        with self.sessions.begin() as s:
            row = s.get(Series, series.id, with_for_update=True, populate_existing=True)
            if row is None or row.state != "complete" or row.routed_generation >= row.generation:
                return []
            if row.generation != series.generation:
                return []  # re-opened meanwhile: the next completion routes it
            study_uid = s.scalar(select(Study.study_uid).where(Study.id == row.study_id)) or ""
            keys = {"study_uid": study_uid, "series_uid": row.series_uid}
            guard = own_output_reason(facts.first) if facts else None
            if facts is None or guard is not None:
                reason = problem or guard or "unreadable"
                record(s, ev.RouteSkipped(**keys, generation=row.generation, reason=reason))
            else:
                results = evaluate_all(rules, facts)
                matched = [r for r in results if r.matched]
                for result in matched:
                    job = self._create_job(
                        s,
                        rule=result.rule,
                        rule_version=self._version_of(result.rule),
                        level="series",
                        study_uid=study_uid,
                        series=[row],
                        dedupe=f"series:{row.series_uid}:{row.generation}:{result.rule.name}",
                        supersede_where=(Job.level == "series")
                        & (Job.rule_name == result.rule.name)
                        & (Job.study_uid == study_uid),
                        supersede_series=row.series_uid,
                    )
                    if job is not None:
                        created.append(job)
                if not matched:
                    record(
                        s,
                        ev.RouteNoMatch(
                            **keys,
                            level="series",
                            generation=row.generation,
                            reasons=self._reasons(results),
                        ),
                    )
            row.routed_generation = row.generation
        return created

    @staticmethod
    def _reasons(results: Sequence[RuleResult]) -> dict[str, str]:
        return {r.rule.name: r.reason() for r in results} or {"(none)": "no enabled rule at this level"}

    def _version_of(self, rule: Rule) -> int:
        return self._versions[rule.name]

    def _create_job(
        self,
        s: Session,
        *,
        rule: Rule,
        rule_version: int,
        level: str,
        study_uid: str,
        series: Sequence[Series],
        dedupe: str,
        supersede_where: object,
        supersede_series: str | None,
    ) -> CreatedJob | None:
        if s.scalar(select(Job.id).where(Job.dedupe_key == dedupe)) is not None:
            return None  # routed before (e.g. by a concurrent pass): exactly one job
        now = self.clock()
        previous = [
            j
            for j in s.scalars(select(Job).where(supersede_where, Job.state.in_(SUPERSEDABLE))).all()  # type: ignore[arg-type]
            if supersede_series is None or supersede_series in j.series_uids
        ]
        job = Job(
            uid=uuid.uuid4().hex,
            dedupe_key=dedupe,
            level=level,
            study_uid=study_uid,
            series_uids=[x.series_uid for x in series],
            series_generations=[x.generation for x in series],
            rule_name=rule.name,
            rule_version=rule_version,
            pipeline=rule.pipeline,
            parameters=dict(rule.parameters),
            destinations=list(rule.destinations),
            sender_ae=series[0].sender_ae,
            sender_host=series[0].sender_host,
            lane=rule.priority_lane,
            state="queued",
            supersedes_job_id=previous[-1].id if previous else None,
            created_at=now,
            updated_at=now,
        )
        s.add(job)
        try:
            with s.begin_nested():
                s.flush()
        except IntegrityError:
            return None
        record(
            s,
            ev.JobCreated(
                study_uid=study_uid,
                series_uid=series[0].series_uid if len(series) == 1 else None,
                job_uid=job.uid,
                rule=rule.name,
                rule_version=rule_version,
                pipeline=rule.pipeline,
                lane=rule.priority_lane,
                destinations=list(rule.destinations),
                series_uids=[x.series_uid for x in series],
                level=level,
            ),
        )
        superseded = []
        for old in previous:
            if old.state in SUPERSEDABLE:
                record(
                    s,
                    ev.JobSuperseded(
                        study_uid=study_uid,
                        series_uid=series[0].series_uid if len(series) == 1 else None,
                        job_uid=old.uid,
                        by_job_uid=job.uid,
                        previous_state=old.state,
                    ),
                )
                s.execute(update(Job).where(Job.id == old.id).values(state="superseded", updated_at=now))
                superseded.append(old.uid)
        log.info("job %s: %s -> %s (%s)", job.uid, rule.name, rule.pipeline, ", ".join(job.series_uids))
        return CreatedJob(job.uid, rule.name, tuple(job.series_uids), tuple(superseded))

    # -- study-level -----------------------------------------------------------------------------
    def _route_studies(self, rules: Sequence[Rule]) -> list[CreatedJob]:
        now = self.clock()
        created: list[CreatedJob] = []
        with self.sessions() as s:
            studies = s.scalars(select(Study)).all()
            candidates = []
            for each in studies:
                series = s.scalars(select(Series).where(Series.study_id == each.id).order_by(Series.id)).all()
                if not series or any(
                    x.state != "complete" or x.routed_generation < x.generation for x in series
                ):
                    continue
                last = max(_aware(x.last_received_at) for x in series)
                if now - last < self.quiet:
                    continue
                fingerprint = hashlib.sha256(
                    "|".join(f"{x.series_uid}:{x.generation}" for x in series).encode()
                ).hexdigest()
                if each.routed_fingerprint == fingerprint:
                    continue
                candidates.append((each.id, fingerprint, list(series)))
        for study_id, fingerprint, series in candidates:
            facts = {x.series_uid: self._facts(x)[0] for x in series}
            with self.sessions.begin() as s:
                locked = s.get(Study, study_id, with_for_update=True, populate_existing=True)
                if locked is None or locked.routed_fingerprint == fingerprint:
                    continue
                study = locked
                reasons: dict[str, str] = {}
                made = 0
                for rule in rules:
                    matching = []
                    for x in series:
                        f = facts[x.series_uid]
                        if f is None:
                            continue
                        result = evaluate_all([rule], f)[0]
                        if result.matched:
                            matching.append(x)
                        else:
                            reasons.setdefault(rule.name, f"{x.series_uid}: {result.reason()}")
                    if not matching:
                        continue
                    reasons.pop(rule.name, None)
                    job = self._create_job(
                        s,
                        rule=rule,
                        rule_version=self._version_of(rule),
                        level="study",
                        study_uid=study.study_uid,
                        series=matching,
                        dedupe=f"study:{study.study_uid}:{fingerprint}:{rule.name}",
                        supersede_where=(Job.level == "study")
                        & (Job.rule_name == rule.name)
                        & (Job.study_uid == study.study_uid),
                        supersede_series=None,
                    )
                    if job is not None:
                        created.append(job)
                        made += 1
                if not made:
                    record(
                        s,
                        ev.RouteNoMatch(
                            study_uid=study.study_uid, level="study", generation=0, reasons=reasons
                        ),
                    )
                study.routed_fingerprint = fingerprint
        return created

    # -- loop ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="router", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Route now rather than at the next poll (the completion monitor calls this)."""
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.poll_seconds)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.route_once()
            except Exception:  # keep routing alive across transient errors; each pass retries
                log.exception("routing pass failed; retrying")

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
