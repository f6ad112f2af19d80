"""The running node: wires settings, database, spool, listeners and completion together."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from node import __version__
from node.audit import events as ev
from node.completion.monitor import CompletionMonitor
from node.db.engine import make_engine, make_ingest_engine, make_session_factory
from node.db.migrate import upgrade
from node.dispatch.dispatcher import Dispatcher
from node.execute.executor import Executor
from node.receive.dimse import DimseServer
from node.receive.ingest import Ingestor
from node.receive.receivers import Listener, ReceiverPool
from node.receive.spool import Spool
from node.recovery import close_stale_carriers, reconcile_spool
from node.route.router import Router
from node.route.store import RuleStore, StoredRule
from node.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Database:
    engine: Engine
    sessions: sessionmaker[Session]

    @classmethod
    def open(cls, settings: Settings, migrate: bool = True) -> Database:
        """Open (and migrate) the database; a database that never had rules gets the shipped defaults."""
        settings.storage.path.mkdir(parents=True, exist_ok=True)
        engine = make_engine(
            settings.database_url, echo=settings.database.echo, durable=settings.storage.fsync
        )
        db = cls(engine, make_session_factory(engine))
        if migrate:
            upgrade(engine)
            seeded = db.rules(settings).seed_defaults()
            if seeded:
                log.info("installed the default rules: %s", ", ".join(seeded))
        return db

    def rules(self, settings: Settings) -> RuleStore:
        return _LiveRuleStore(self.sessions, lambda: self.destination_names(settings))

    def destination_names(self, settings: Settings) -> list[str]:
        """Configured destinations plus those added at run time (``segnode destinations add``)."""
        from node.dispatch.destinations import DestinationStore

        try:
            return DestinationStore(self.sessions, settings.destinations).names()
        except SQLAlchemyError:  # not migrated yet (migrate=False): the configured ones only
            return sorted(settings.destinations)


class _LiveRuleStore(RuleStore):
    """Reads the destination names again whenever it reads the rules, so that a rule may name a
    destination added at run time (``segnode destinations add``) without restarting the node."""

    def __init__(self, sessions: sessionmaker[Session], names: Callable[[], list[str]]) -> None:
        super().__init__(sessions, names())
        self._names = names

    def stored(self, include_removed: bool = False) -> list[StoredRule]:
        self.destinations = self._names()
        return super().stored(include_removed)


def make_spool(settings: Settings) -> Spool:
    return Spool(
        settings.spool_dir,
        settings.incoming_dir,
        fsync=settings.storage.fsync,
        min_free_bytes=settings.storage.min_free_bytes,
    )


class Node:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = Database.open(settings)
        self.spool = make_spool(settings)
        self.ingest_engine = make_ingest_engine(settings.database_url, echo=settings.database.echo)
        self.ingestor = Ingestor(make_session_factory(self.ingest_engine), self.spool)
        # dimse.receivers > 1: that many receiver processes share the port (node.receive.receivers).
        self.dimse: Listener = (
            ReceiverPool(settings)
            if settings.dimse.receivers > 1
            else DimseServer(settings, self.ingestor, self.spool)
        )
        self.completion = CompletionMonitor(self.db.sessions, settings.completion)
        self.dispatcher = Dispatcher(self.db.sessions, settings)
        # Pipelines run in the executor's worker processes, never on this process's threads.
        self.executor: Executor | None = (
            Executor(self.db.sessions, settings, on_written=self.dispatcher.wake)
            if settings.executor.enabled
            else None
        )
        self.router = Router(
            self.db.sessions,
            self.db.rules(settings),
            self.spool.root,
            quiet_seconds=settings.completion.quiet_seconds,
            poll_seconds=settings.completion.poll_seconds,
        )
        self.completion.on_complete = lambda _completed: self.router.wake()
        self._http: Any = None
        self._http_thread: threading.Thread | None = None
        self.dicomweb_port: int | None = None
        self.dimse_port: int | None = None

    def start(self) -> None:
        closed = close_stale_carriers(self.db.sessions)
        if closed:
            log.info("closed %d association(s) left open by the previous run", closed)
        recovered = reconcile_spool(self.db.sessions, self.spool, self.ingestor)
        if recovered:
            log.info("recorded %d spool file(s) left without a database row", recovered)
        _, self.dimse_port = self.dimse.start()
        if self.settings.dicomweb.enabled:
            self._start_http()
        self.completion.start()
        self.router.start()
        self.dispatcher.start()
        if self.executor is not None:
            self.executor.start()
        self.ingestor.audit(
            ev.NodeStarted(
                version=__version__,
                ae_title=self.settings.node.ae_title,
                dimse_port=self.dimse_port,
                dicomweb_port=self.dicomweb_port or 0,
            )
        )

    def _start_http(self) -> None:
        import uvicorn

        from node.receive.stow import build_app

        app = build_app(self.settings, self.ingestor, self.spool)
        config = uvicorn.Config(
            app,
            host=self.settings.dicomweb.host,
            port=self.settings.dicomweb.port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=int(self.settings.dimse.shutdown_grace_seconds) or None,
        )
        server = uvicorn.Server(config)
        # uvicorn installs no signal handlers outside the main thread; serve() owns SIGTERM/SIGINT.
        self._http = server
        self._http_thread = threading.Thread(target=server.run, name="dicomweb", daemon=True)
        self._http_thread.start()
        while not server.started:
            if not self._http_thread.is_alive():
                raise RuntimeError(
                    f"DICOMweb listener could not start on {self.settings.dicomweb.host}:"
                    f"{self.settings.dicomweb.port}"
                )
            threading.Event().wait(0.02)
        sockets = [s for srv in server.servers for s in srv.sockets]
        self.dicomweb_port = int(sockets[0].getsockname()[1]) if sockets else self.settings.dicomweb.port
        log.info("DICOMweb listener on %s:%s", self.settings.dicomweb.host, self.dicomweb_port)

    def stop(self, reason: str = "signal") -> None:
        grace = self.settings.dimse.shutdown_grace_seconds
        self.dimse.stop(grace)
        if self._http is not None:
            self._http.should_exit = True
            if self._http_thread is not None:
                self._http_thread.join(timeout=grace + 5)
        self.completion.stop()
        self.router.stop()
        if self.executor is not None:
            self.executor.stop(timeout=grace)
        self.dispatcher.stop(timeout=grace)
        self.ingestor.audit(ev.NodeStopped(reason=reason))
        self.ingest_engine.dispose()
        self.db.engine.dispose()
