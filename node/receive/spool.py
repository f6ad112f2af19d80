"""The durable spool: temp file, fsync, atomic rename into a path built from sanitised UIDs.

A file is first written under ``incoming/`` (same filesystem as ``spool/``), fsynced, then renamed
to ``spool/<study>/<series>/<sop>[.vN].dcm`` and the folder fsynced. A UID that is not a plain
dotted-digit string of at most 64 characters is replaced by a hash, so nothing a peer sends can
name a path outside the spool.
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


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
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
        """Write ``chunks`` to a new temp file, fsynced; on any failure nothing is left behind."""
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
                if self.fsync:
                    os.fsync(fh.fileno())
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
        """Take over a complete file written by someone else under ``incoming/``: hash and fsync it."""
        digest = hashlib.sha256()
        size = 0
        with open(path, "rb", buffering=0) as fh:
            while True:
                block = fh.read(_COPY_CHUNK)
                if not block:
                    break
                digest.update(block)
                size += len(block)
            if self.fsync:
                os.fsync(fh.fileno())
        return TempFile(path=path, size=size, sha256=digest.hexdigest())

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
        """Atomically move ``temp`` to ``relative`` (from ``place``) and make the rename durable."""
        final = os.path.join(self._root, relative)
        folder = os.path.dirname(final)
        if folder not in self._known_dirs:
            new_dirs = [p for p in (folder, os.path.dirname(folder)) if not os.path.exists(p)]
            os.makedirs(folder, exist_ok=True)
            if self.fsync:
                for created in reversed(new_dirs):
                    _fsync_dir(os.path.dirname(created))
            self._known_dirs.add(folder)
        os.replace(temp.path, final)
        if self.fsync:
            _fsync_dir(folder)

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    def leftover_temps(self) -> list[Path]:
        return sorted(self.incoming.glob("*"))
