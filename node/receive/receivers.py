"""Several DICOM receiver processes behind one port (``dimse.receivers`` > 1).

Python runs one thread at a time per process, so one process cannot use more than about one core
for parsing PDUs, hashing and recording instances. With ``dimse.receivers`` = N the node starts N
receiver processes (``spawn``, so none inherits the parent's threads or database connections); each
binds the DICOM port with ``SO_REUSEPORT`` (the kernel spreads new connections over them) and runs
its own DIMSE acceptor, spool and ``Ingestor`` with its own database engine. The parent keeps what
must exist once: start-up recovery, the completion monitor, DICOMweb, and a socket bound (not
listening) to the port so that port 0 resolves to one port for all and the port stays ours while
receivers restart.

A receiver stops on SIGTERM or SIGINT: it stops accepting, lets in-flight associations finish for up
to ``dimse.shutdown_grace_seconds`` and exits. It also stops when the parent goes away (its pipe to
the parent closes), so a killed node leaves no receiver holding the port. A receiver that dies on
its own is logged and started again.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Protocol

from node.settings import Settings

log = logging.getLogger(__name__)

START_TIMEOUT = 120.0
RESTART_DELAY = 1.0


class Listener(Protocol):
    """What the node needs from its DICOM listener, in-process or a pool of receivers."""

    def start(self) -> tuple[str, int]: ...

    def stop(self, grace_seconds: float) -> None: ...


def _reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to ``host:port`` with SO_REUSEPORT: fixes the port for all."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class ReceiverPool:
    """N receiver processes sharing the DICOM port; the same start/stop as ``DimseServer``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.count = settings.dimse.receivers
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: dict[int, BaseProcess] = {}
        self._pipes: dict[int, Connection] = {}
        self._reservation: socket.socket | None = None
        self._port = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._monitor: threading.Thread | None = None
        if not settings.dimse.allowed_calling_aets:
            log.warning("dimse.allowed_calling_aets is empty: any calling AE title may store instances")

    @property
    def port(self) -> int:
        return self._port

    def pids(self) -> list[int]:
        with self._lock:
            return [p.pid for p in self._procs.values() if p.pid is not None and p.is_alive()]

    def start(self) -> tuple[str, int]:
        host = self.settings.dimse.host
        self._reservation = _reserve_port(host, self.settings.dimse.port)
        self._port = int(self._reservation.getsockname()[1])
        try:
            for index in range(self.count):
                self._spawn(index)
            deadline = time.monotonic() + START_TIMEOUT
            for index in range(self.count):
                self._await_ready(index, deadline)
        except BaseException:
            self.stop(0)
            raise
        self._monitor = threading.Thread(target=self._watch, name="dimse-receivers", daemon=True)
        self._monitor.start()
        log.info(
            "DICOM listener %s on %s:%s: %d receiver processes (pids %s)",
            self.settings.node.ae_title,
            host,
            self._port,
            self.count,
            ", ".join(str(pid) for pid in self.pids()),
        )
        return host, self._port

    def _spawn(self, index: int) -> None:
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=receiver_main,
            args=(self.settings.model_dump(), self._port, index, child_end),
            name=f"segnode-receiver-{index}",
            daemon=False,
        )
        proc.start()
        child_end.close()
        with self._lock:
            self._procs[index] = proc
            self._pipes[index] = parent_end

    def _await_ready(self, index: int, deadline: float) -> None:
        pipe = self._pipes[index]
        proc = self._procs[index]
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"DICOM receiver {index} did not start within {START_TIMEOUT:.0f}s")
            if pipe.poll(min(remaining, 0.5)):
                try:
                    kind, detail = pipe.recv()
                except EOFError:
                    kind, detail = "failed", f"exited with {proc.exitcode}"
                if kind == "ready":
                    return
                raise RuntimeError(f"DICOM receiver {index} could not start: {detail}")
            if not proc.is_alive():
                raise RuntimeError(f"DICOM receiver {index} exited with {proc.exitcode} during start-up")

    def _watch(self) -> None:
        """Start a receiver again when it dies on its own."""
        while not self._stopping.is_set():
            with self._lock:
                sentinels = {p.sentinel: i for i, p in self._procs.items()}
            ready = wait(list(sentinels), timeout=1.0)
            if self._stopping.is_set():
                return
            for sentinel in ready:
                index = sentinels[int(sentinel)] if isinstance(sentinel, int) else None
                if index is None:
                    continue
                proc = self._procs[index]
                proc.join(5)  # its sentinel fired: it is exiting; reap it for the exit code
                log.error(
                    "DICOM receiver %d (pid %s) exited with %s; starting it again",
                    index,
                    proc.pid,
                    proc.exitcode,
                )
                self._pipes[index].close()
                time.sleep(RESTART_DELAY)
                if self._stopping.is_set():
                    return
                try:
                    self._spawn(index)
                    self._await_ready(index, time.monotonic() + START_TIMEOUT)
                except Exception as exc:
                    log.error("DICOM receiver %d could not be started again: %s", index, exc)

    def stop(self, grace_seconds: float) -> None:
        """SIGTERM every receiver, wait for in-flight associations to finish, then release the port."""
        self._stopping.set()
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds + 10
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.error("DICOM receiver pid %s did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.join(5)
        if self._monitor is not None:
            self._monitor.join(5)
        for pipe in self._pipes.values():
            pipe.close()
        if self._reservation is not None:
            self._reservation.close()
            self._reservation = None


# -- in the receiver process ----------------------------------------------------------------------------


def _configure_logging(settings: Settings, index: int) -> None:
    logging.basicConfig(
        level=settings.node.log_level,
        format=f"%(asctime)s %(levelname)s %(name)s[r{index}]: %(message)s",
        stream=sys.stderr,
    )
    quiet = max(logging.WARNING, logging.getLevelName(settings.node.log_level))
    for noisy in ("pynetdicom", "alembic"):
        logging.getLogger(noisy).setLevel(quiet)


def receiver_main(settings_data: dict[str, Any], port: int, index: int, parent: Connection) -> None:
    """Entry point of one receiver process."""
    settings = Settings(**settings_data)
    _configure_logging(settings, index)
    stop = threading.Event()

    def _on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    from node.db.engine import make_ingest_engine, make_session_factory
    from node.receive.dimse import DimseServer
    from node.receive.ingest import Ingestor
    from node.receive.spool import Spool

    try:
        engine = make_ingest_engine(settings.database_url, echo=settings.database.echo)
        spool = Spool(
            settings.spool_dir,
            settings.incoming_dir,
            fsync=settings.storage.fsync,
            min_free_bytes=settings.storage.min_free_bytes,
        )
        ingestor = Ingestor(make_session_factory(engine), spool)
        server = DimseServer(settings, ingestor, spool, reuse_port=True, warn_open=False)
        server.start(port)
    except Exception as exc:
        parent.send(("failed", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from exc
    parent.send(("ready", os.getpid()))

    def _watch_parent() -> None:
        with contextlib.suppress(EOFError, OSError):
            parent.recv()  # the parent never sends: this returns when its end closes
        if not stop.is_set():
            log.warning("the node process went away; receiver %d stopping", index)
            stop.set()

    threading.Thread(target=_watch_parent, name="parent-watch", daemon=True).start()
    while not stop.wait(1.0):
        pass
    server.stop(settings.dimse.shutdown_grace_seconds)
    engine.dispose()
