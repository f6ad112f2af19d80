"""One pass of the loop on this machine: a fresh ``segnode serve`` (SQLite, local executor, shipped
rules, installed models) whose only destination is a local receiving "PACS"; the study goes in by
C-STORE from that PACS's AE title (so the shipped rules' ``sender`` destination answers it), and the
run ends when every job of the study has finished and its results have arrived.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.demo.peer import SEG_STORAGE, Received, ReceivingPeer
from node.demo.send import DicomFile, SendError, SendResult, send_files
from node.demo.timeline import AuditItem, Timeline, build_timeline, load_trail

PACS_AE = "DEMOPACS"
NOTE_EVERY_S = 60.0
NODE_AE = "SEGNODE"
TERMINAL = ("done", "failed", "cancelled", "superseded")
SR_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.88.22",
    "1.2.840.10008.5.1.4.1.1.88.33",
    "1.2.840.10008.5.1.4.1.1.88.34",
)

Log = Callable[[str], None]


class DemoError(Exception):
    """The demo cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class RunConfig:
    run_dir: Path  # this run's own folder: node storage, PACS folder, logs
    models_dir: Path  # installed bundles (linked into the node's storage)
    timeout: float = 1800.0
    device: str = "cpu"
    quiet_seconds: float | None = None  # None: the embedded default
    extra_settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobInfo:
    uid: str
    pipeline: str
    state: str
    error: str | None
    series_uids: list[str]


@dataclass
class Outcome:
    study_uids: list[str]
    send: SendResult
    jobs: list[JobInfo]
    timelines: dict[str, Timeline]  # by study UID (each for that study's chosen job)
    trails: dict[str, list[AuditItem]]
    received: list[Received]  # what the PACS got from segnode
    no_match: dict[str, dict[str, str]]  # series UID -> rule -> reason, for series no rule took
    node_storage: Path
    config_path: Path
    log_path: Path

    @property
    def segs(self) -> list[Received]:
        return [r for r in self.received if r.sop_class_uid == SEG_STORAGE]

    @property
    def srs(self) -> list[Received]:
        return [r for r in self.received if r.sop_class_uid in SR_CLASSES]

    def job_written(self, job_uid: str) -> AuditItem | None:
        for items in self.trails.values():
            for item in reversed(items):
                if item.event_type == "job.written" and item.job_uid == job_uid:
                    return item
        return None


class NodeProcess:
    """``segnode serve`` in a child process, on any free loopback port."""

    def __init__(self, config_path: Path, storage: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.storage = storage
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 120.0) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEGNODE_")}
        env["TCP_NODELAY"] = "1"
        ready = self.storage / "run" / "ready.json"
        ready.unlink(missing_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed in stop()
        self._log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DemoError(f"segnode serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            if ready.is_file():
                try:
                    self.port = int(json.loads(ready.read_text())["dimse"]["port"])
                    return self.port
                except (ValueError, KeyError, TypeError):
                    pass
            time.sleep(0.1)
        self.stop()
        raise DemoError(f"segnode serve did not become ready in {timeout:.0f} s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 60.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()
        self.proc = None


def write_config(run: RunConfig, peer: ReceivingPeer) -> tuple[Path, Path]:
    """The node's configuration: embedded defaults plus a storage of its own and the PACS destination."""
    storage = run.run_dir / "node"
    storage.mkdir(parents=True, exist_ok=True)
    link = storage / "models"
    if not link.exists():
        link.symlink_to(run.models_dir.resolve(), target_is_directory=True)
    config: dict[str, Any] = {
        "node": {"ae_title": NODE_AE},
        "storage": {"path": str(storage.resolve())},
        "dimse": {"host": "127.0.0.1", "port": 0},
        "dicomweb": {"enabled": False},
        "executor": {"device": run.device},
        "destinations": {
            "pacs": {
                "type": "dimse",
                "description": "the demo's receiving PACS (pynetdicom C-STORE SCP)",
                "ae_title": peer.ae_title,
                "host": peer.host,
                "port": peer.port,
            }
        },
    }
    if run.quiet_seconds is not None:
        config["completion"] = {"quiet_seconds": run.quiet_seconds}
    for section, values in run.extra_settings.items():
        config.setdefault(section, {}).update(values)
    path = run.run_dir / "segnode.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path, storage


def _sessions(storage: Path) -> sessionmaker[Session]:
    from node.db.engine import make_engine, make_session_factory

    return make_session_factory(make_engine(f"sqlite:///{(storage / 'segnode.db').resolve()}"))


def _jobs(sessions: sessionmaker[Session], study_uids: Sequence[str]) -> list[JobInfo]:
    from node.db.models import Job

    with sessions() as s:
        rows = s.scalars(select(Job).where(Job.study_uid.in_(list(study_uids))).order_by(Job.id)).all()
        return [JobInfo(r.uid, r.pipeline, r.state, r.error, list(r.series_uids)) for r in rows]


def _routing(items: Sequence[AuditItem], series: set[str]) -> tuple[set[str], dict[str, dict[str, str]]]:
    """Series routed so far (a job, no match or skipped), and the no-match reasons."""
    routed: set[str] = set()
    reasons: dict[str, dict[str, str]] = {}
    for item in items:
        if item.event_type == "job.created":
            routed.update(str(u) for u in item.details.get("series_uids") or [])
        elif item.event_type == "route.no_match" and item.series_uid:
            routed.add(item.series_uid)
            reasons[item.series_uid] = dict(item.details.get("reasons") or {})
        elif item.event_type == "route.skipped" and item.series_uid:
            routed.add(item.series_uid)
            reasons[item.series_uid] = {"(skipped)": str(item.details.get("reason", ""))}
    return routed & series, reasons


def run_study(files: Sequence[DicomFile], run: RunConfig, log: Log) -> Outcome:
    """Start a node and the PACS, send ``files``, wait for every job of the study and its results."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    study_uids = sorted({f.study_uid for f in files})
    series = {f.series_uid for f in files}
    peer = ReceivingPeer(run.run_dir / "pacs", ae_title=PACS_AE)
    peer.start()
    config_path, storage = write_config(run, peer)
    node = NodeProcess(config_path, storage, run.run_dir / "segnode.log")
    try:
        log(f"starting segnode (storage {storage}, log {node.log_path})")
        port = node.start()
        log(f"segnode listening as {NODE_AE} on 127.0.0.1:{port}; PACS {PACS_AE} on 127.0.0.1:{peer.port}")
        log(f"sending {len(files)} instances by C-STORE from {PACS_AE} ...")
        try:
            sent = send_files(files, "127.0.0.1", port, NODE_AE, PACS_AE)
        except SendError as exc:
            raise DemoError(str(exc)) from None
        if sent.failed:
            worst = ", ".join(
                f"{uid}: {sent.errors.get(uid, f'status 0x{st:04X}')}"
                for uid, st in list(sent.failed.items())[:5]
            )
            raise DemoError(f"segnode refused {len(sent.failed)} of {len(files)} instances ({worst})")
        log(f"sent in {sent.last_response_at - sent.started_at:.2f} s; waiting for completion, routing, "
            "inference and delivery")  # fmt: skip
        sessions = _sessions(storage)
        return _wait(sessions, study_uids, series, sent, peer, node, run, log, config_path, storage)
    finally:
        node.stop()
        peer.stop()


def _wait(
    sessions: sessionmaker[Session],
    study_uids: list[str],
    series: set[str],
    sent: SendResult,
    peer: ReceivingPeer,
    node: NodeProcess,
    run: RunConfig,
    log: Log,
    config_path: Path,
    storage: Path,
) -> Outcome:
    origin = datetime.fromtimestamp(sent.last_response_at, UTC)
    deadline = time.monotonic() + run.timeout
    shown: set[tuple[str, str]] = set()
    next_note = time.monotonic() + NOTE_EVERY_S
    while True:
        trails = {uid: load_trail(sessions, uid) for uid in study_uids}
        items = [i for t in trails.values() for i in t]
        routed, reasons = _routing(items, series)
        jobs = [j for j in _jobs(sessions, study_uids) if j.state != "superseded"]
        timelines = {uid: build_timeline(uid, trails[uid]) for uid in study_uids}
        for uid, tl in timelines.items():
            for stage in tl.stages:
                if stage.at is not None and (uid, stage.name) not in shown:
                    shown.add((uid, stage.name))
                    log(f"  {stage.name:<10} +{(stage.at - origin).total_seconds():7.2f} s  {stage.detail}")
        received = [r for r in peer.received() if r.study_uid in study_uids]
        finished = routed == series and all(j.state in TERMINAL for j in jobs)
        if finished:
            return Outcome(
                study_uids, sent, jobs, timelines, trails, received,
                {k: v for k, v in reasons.items() if k in series}, storage, config_path, node.log_path,
            )  # fmt: skip
        if time.monotonic() >= next_note:
            next_note += NOTE_EVERY_S
            states = ", ".join(f"{j.pipeline} {j.state}" for j in jobs) or "no job yet"
            waited = (datetime.now(UTC) - origin).total_seconds()
            log(f"  ... {waited:.0f} s after the last C-STORE response ({states}); CPU inference is slow")
        if not node.alive():
            raise DemoError(f"segnode stopped unexpectedly:\n{node.log_tail()}")
        if time.monotonic() > deadline:
            states = ", ".join(f"{j.uid[:8]} {j.pipeline} {j.state}" for j in jobs) or "no job yet"
            raise DemoError(
                f"no result after {run.timeout:.0f} s ({states}; {len(routed)}/{len(series)} series routed); "
                f"see {node.log_path} and 'segnode audit {study_uids[0]} --config {config_path}'"
            )
        time.sleep(0.25)
