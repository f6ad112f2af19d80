"""The durable spool: temp file, atomic rename into a path built from sanitised UIDs, one fsync.

A file is first written under ``incoming/`` (same filesystem as ``spool/``), then renamed to
``spool/<study>/<series>/<sop>[.vN].dcm`` and fsynced under its final name (``Spool.commit``). That
single fsync is the instance's durability point: on Linux an fsync of a file that was just given a
new name also makes that name (and any new folders) durable: ext4 and XFS commit the journal
transaction that holds the rename, btrfs logs the new name, and ext4 without a journal syncs the new
parent folders (``ext4_sync_parent``), so no separate folder fsync is needed. Files of
``EARLY_FLUSH_BYTES`` or more are flushed once more before the rename (``flush_early``), outside the
database's write gate, so that the fsync under the gate has little left to write. A UID that is not
a plain dotted-digit string of at most 64 characters is replaced by a hash, so nothing a peer sends
can name a path outside the spool.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_PLAIN_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_COPY_CHUNK = 4 * 1024 * 1024
EARLY_FLUSH_BYTES = 8 * 1024 * 1024  # flush larger files before the write gate (see flush_early)


class OutOfSpace(Exception):
    """Not enough free space to accept an instance (DIMSE status 0xA700; STOW-RS FailureReason 0xA700)."""


def safe_uid_component(uid: str) -> str:
    """A path component for ``uid``: the UID itself when it is plain dotted digits, else a hash."""
    if len(uid) <= 64 and _PLAIN_UID.match(uid):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


@dataclass(frozen=True)
class TempFile:
    path: Path
    size: int
    sha256: str


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, root: Path, incoming: Path, *, fsync: bool = True, min_free_bytes: int = 0) -> None:
        self.root = root
        self.incoming = incoming
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._root = str(root)
        self._known_dirs: set[str] = set()

    # -- space -----------------------------------------------------------------------------------
    def check_space(self, needed: int) -> None:
        free = shutil.disk_usage(self.incoming).free
        if free - needed < self.min_free_bytes:
            raise OutOfSpace(
                f"only {free} bytes free in {self.incoming}; {needed} needed and "
                f"{self.min_free_bytes} must stay free (storage.min_free_bytes)"
            )

    # -- temp files ------------------------------------------------------------------------------
    def open_temp(self) -> tuple[int, Path]:
        """A new, empty temp file under ``incoming/``, open for writing: (descriptor, path)."""
        fd, name = tempfile.mkstemp(dir=self.incoming, suffix=".part")
        return fd, Path(name)

    def new_temp_path(self) -> Path:
        fd, path = self.open_temp()
        os.close(fd)
        return path

    def write_temp(self, chunks: Iterable[bytes | memoryview], size_hint: int = 0) -> TempFile:
        """Write ``chunks`` to a new temp file; on any failure nothing is left behind."""
        self.check_space(size_hint)
        fd, name = tempfile.mkstemp(dir=self.incoming, suffix=".part")
        path = Path(name)
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb", buffering=0) as fh:
                for chunk in chunks:
                    digest.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        written = fh.write(view)
                        if written is None:
                            raise OSError(errno.EIO, "short write")
                        view = view[written:]
                    size += len(chunk)
                self.flush_early(fh.fileno(), size)
        except OSError as exc:
            path.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutOfSpace(f"disk full while writing to {self.incoming}: {exc.strerror}") from exc
            raise
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return TempFile(path=path, size=size, sha256=digest.hexdigest())

    def adopt_temp(self, path: Path) -> TempFile:
        """Take over a complete file written by someone else under ``incoming/``: hash it."""
        digest = hashlib.sha256()
        size = 0
        with open(path, "rb", buffering=0) as fh:
            while True:
                block = fh.read(_COPY_CHUNK)
                if not block:
                    break
                digest.update(block)
                size += len(block)
            self.flush_early(fh.fileno(), size)
        return TempFile(path=path, size=size, sha256=digest.hexdigest())

    def flush_early(self, fd: int, size: int) -> None:
        """Write a large temp file's data to disk now, before the caller takes the write gate.

        ``commit`` fsyncs every file after its rename; for a file of ``EARLY_FLUSH_BYTES`` or more,
        flushing its data here keeps that fsync (made while the database's write gate is held) down
        to a journal commit, so one big instance does not hold up every other writer. Smaller files
        get their one fsync in ``commit`` only."""
        if self.fsync and size >= EARLY_FLUSH_BYTES:
            os.fdatasync(fd)

    def discard(self, temp: TempFile | Path) -> None:
        path = temp.path if isinstance(temp, TempFile) else temp
        path.unlink(missing_ok=True)

    # -- final placement -------------------------------------------------------------------------
    def place(self, study_uid: str, series_uid: str, sop_uid: str, version: int) -> str:
        """Where an instance goes, relative to the spool root (what the database records)."""
        suffix = ".dcm" if version == 1 else f".v{version}.dcm"
        return (
            f"{safe_uid_component(study_uid)}/{safe_uid_component(series_uid)}/"
            f"{safe_uid_component(sop_uid)}{suffix}"
        )

    def commit(self, temp: TempFile, relative: str) -> None:
        """Atomically move ``temp`` to ``relative`` (from ``place``), then fsync it there: its data,
        its new name and any new folders become durable together (see the module's docstring)."""
        final = os.path.join(self._root, relative)
        folder = os.path.dirname(final)
        if folder not in self._known_dirs:
            os.makedirs(folder, exist_ok=True)
            self._known_dirs.add(folder)
        os.replace(temp.path, final)
        if self.fsync:
            _fsync_path(final)

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    def leftover_temps(self) -> list[Path]:
        return sorted(self.incoming.glob("*"))
