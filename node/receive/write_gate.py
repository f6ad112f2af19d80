"""One writer at a time into a SQLite database, across threads and receiver processes, without sleeping.

SQLite admits one write transaction at a time. A connection that finds the database locked is put
to sleep by SQLite's busy handler for 1, 2, 5, 10, 15... ms before it tries again, so with several
associations (threads, or receiver processes) recording instances at once, the lock is often free
while every waiter is still asleep: throughput drops below that of a single association. The gate
queues the writers instead: a thread lock within the process, ``flock`` on a file next to the
database between processes; a waiter is woken the moment the lock is released. Only the database
transaction, with the instance's rename and fsync inside it (``Spool.commit``), goes through the gate;
receiving, hashing, header parsing and the early flush of a large file stay parallel.

PostgreSQL needs no gate (it queues writers itself): the gate is a no-op there.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy.engine import make_url


class WriteGate:
    def __init__(self, lock_path: Path | None) -> None:
        self.lock_path = lock_path
        self._thread_lock = threading.Lock()
        self._fd = -1

    @classmethod
    def for_database(cls, url: str) -> WriteGate:
        """A gate for the SQLite database at ``url``; a no-op gate for any other database."""
        parsed = make_url(url)
        if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
            return cls(None)
        return cls(Path(parsed.database).with_name(Path(parsed.database).name + ".write-lock"))

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        if self.lock_path is None:
            yield
            return
        with self._thread_lock:
            fd = self._lock_fd()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _lock_fd(self) -> int:
        if self._fd < 0:
            assert self.lock_path is not None
            self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return self._fd

    def close(self) -> None:
        with self._thread_lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
