"""Engine and session factory for the tracking database (SQLite in WAL mode, or PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker


def _sqlite_pragmas(synchronous: str) -> Callable[[Any, Any], None]:
    def apply(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return apply


def make_engine(url: str, echo: bool = False, durable: bool = True) -> Engine:
    """Create an engine; for SQLite the parent folder is created and WAL is switched on.

    ``durable`` (``storage.fsync``): every SQLite commit fsyncs the WAL (``synchronous=FULL``), so a
    committed job, delivery or rule change survives power loss too; without it (``NORMAL``) commits
    survive a crash of the process, not of the machine, and the database stays consistent either way.
    The receive path records instances through ``make_ingest_engine`` instead."""
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"echo": echo, "future": True}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 60, "check_same_thread": False}
        kwargs["pool_size"] = 32
        kwargs["max_overflow"] = 32
    else:
        kwargs["pool_pre_ping"] = True
        kwargs["pool_size"] = 16
        kwargs["max_overflow"] = 32
    engine = create_engine(parsed, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas("FULL" if durable else "NORMAL"))
        # pysqlite's own transaction handling defers BEGIN; emit BEGIN IMMEDIATE ourselves so that
        # concurrent writers queue on the lock instead of failing to upgrade a read lock.
        event.listen(engine, "connect", lambda c, r: setattr(c, "isolation_level", None))
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    return engine


def make_ingest_engine(url: str, echo: bool = False) -> Engine:
    """The engine the receive path records instances with.

    Its SQLite commits run at ``synchronous=NORMAL`` whatever ``storage.fsync`` says: an instance is
    durable once its spool file is fsynced (``Spool.commit``), and start-up recovery records a spool
    file whose row a power cut lost. That keeps the instance's fsync the only one before Success."""
    return make_engine(url, echo=echo, durable=False)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"
