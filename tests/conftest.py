"""Shared fixtures: a real ``segnode serve`` process on ephemeral loopback ports, DCMTK, PostgreSQL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SEGNODE = [sys.executable, "-m", "node.cli"]


def need_shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data {path} is absent (../shared/data is provided in CI and dev machines)")
    return path


def need_tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (make test installs it with apt-get)")
    return found


def dcmtk_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"  # Debian's DCMTK otherwise stalls ~40 ms per image
    return env


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class RunningNode:
    proc: subprocess.Popen[bytes]
    storage: Path
    env: dict[str, str]
    dimse_port: int
    dicomweb_port: int | None
    ae_title: str
    log_path: Path
    database_url: str
    _sessions: sessionmaker[Session] | None = field(default=None, repr=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def sessions(self) -> sessionmaker[Session]:
        if self._sessions is None:
            from node.db.engine import make_engine, make_session_factory

            self._sessions = make_session_factory(make_engine(self.database_url))
        return self._sessions

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*SEGNODE, *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=check,
            cwd=REPO,
            timeout=120,
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._sessions is not None:
            bind = self._sessions.kw.get("bind")
            if bind is not None:
                bind.dispose()
            self._sessions = None
        return int(self.proc.returncode)


def start_node(
    storage: Path,
    *,
    database_url: str | None = None,
    extra_env: dict[str, str] | None = None,
    config: Path | None = None,
    timeout: float = 60,
    prefix: Sequence[str] = (),
) -> RunningNode:
    """Start ``segnode serve`` on ephemeral loopback ports and wait until it says it is ready.

    ``prefix`` runs it through a wrapper that execs it (``nsenter --net=...`` for a network namespace)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGNODE_")}
    env.update(
        {
            "SEGNODE_STORAGE__PATH": str(storage),
            "SEGNODE_DIMSE__PORT": "0",
            "SEGNODE_DIMSE__HOST": "127.0.0.1",
            "SEGNODE_DICOMWEB__PORT": "0",
            "SEGNODE_DICOMWEB__HOST": "127.0.0.1",
            "SEGNODE_COMPLETION__QUIET_SECONDS": "1",
            "SEGNODE_COMPLETION__POLL_SECONDS": "0.1",
            "SEGNODE_DIMSE__SHUTDOWN_GRACE_SECONDS": "10",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if database_url:
        env["SEGNODE_DATABASE__URL"] = database_url
    env.update(extra_env or {})
    storage.mkdir(parents=True, exist_ok=True)
    ready = storage / "run" / "ready.json"
    ready.unlink(missing_ok=True)
    log_path = storage.parent / f"{storage.name}-serve-{int(time.time() * 1000)}.log"
    cmd = [*prefix, *SEGNODE, "serve"] + (["--config", str(config)] if config else [])
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

    def _ready() -> dict[str, Any] | None:
        if proc.poll() is not None:
            raise AssertionError(f"segnode serve exited with {proc.returncode}:\n{log_path.read_text()}")
        if ready.exists():
            return dict(json.loads(ready.read_text()))
        return None

    info = wait_for(_ready, timeout=timeout, what="segnode serve to be ready")
    url = database_url or f"sqlite:///{(storage / 'segnode.db').resolve()}"
    return RunningNode(
        proc=proc,
        storage=storage,
        env=env,
        dimse_port=int(info["dimse"]["port"]),
        dicomweb_port=info["dicomweb"]["port"],
        ae_title=info["ae_title"],
        log_path=log_path,
        database_url=url,
    )


@pytest.fixture
def node(tmp_path: Path) -> Iterator[RunningNode]:
    """A node that receives, completes and routes; its executor is off, so jobs stay queued (tests that run
    jobs call ``start_node`` themselves, with the executor on as by default)."""
    running = start_node(tmp_path / "store", extra_env={"SEGNODE_EXECUTOR__ENABLED": "false"})
    yield running
    running.stop()


# -- Orthanc (Debian's orthanc + orthanc-dicomweb) in a private network namespace, one per module -----


@pytest.fixture(scope="module")
def orthanc_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Orthanc with orthanc/orthanc.json and route_to_segnode.lua, started in its own network
    namespace (tests/orthanc_support.py); skips when Orthanc or network namespaces are unavailable."""
    from tests.orthanc_support import open_site

    site = open_site(tmp_path_factory.mktemp("orthanc"))
    try:
        yield site
    finally:
        site.close()


# -- PostgreSQL: a throwaway cluster on 127.0.0.1 for the whole session -------------------------------

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """Start PostgreSQL 15 (initdb as user postgres) on 127.0.0.1; yield a server URL without database."""
    import tempfile

    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"PostgreSQL 15 binaries not found in {PG_BIN} (make test installs postgresql-15)")
    # pytest's own temp folders are private to root; the postgres user needs its own
    base = Path(tempfile.mkdtemp(prefix="segnode-pg-"))
    base.chmod(0o755)
    data = base / "data"
    sock = base / "sock"
    sock.mkdir()
    shutil.chown(base, "postgres")
    shutil.chown(sock, "postgres")
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run(
        [*as_pg, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    port = _free_port()
    subprocess.run(
        [
            *as_pg,
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(base / "pg.log"),
            "-w",
            "-o",
            f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(
            [*as_pg, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], check=False
        )


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A fresh, empty database in the throwaway cluster."""
    import uuid

    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(
        postgres_server.replace("postgresql+psycopg", "postgresql") + "/postgres", autocommit=True
    ) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    return f"{postgres_server}/{name}"
