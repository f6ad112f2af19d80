"""Real peers for the dispatch tests: DCMTK storescp, a pynetdicom SCP answering chosen statuses, a
socket that accepts connections and never answers (a hung PACS)."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.conftest import dcmtk_env, need_tool, wait_for

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class StoreScp:
    """DCMTK storescp on 127.0.0.1:port; one file per SOP Instance UID (a resend overwrites it)."""

    port: int
    folder: Path
    ae_title: str
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def uids(self) -> list[str]:
        import pydicom

        return sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in self.files())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_storescp(
    folder: Path, *, port: int | None = None, ae_title: str = "STORESCP", extra: Sequence[str] = ()
) -> StoreScp:
    tool = need_tool("storescp")
    folder.mkdir(parents=True, exist_ok=True)
    scp = StoreScp(port or free_port(), folder, ae_title)
    scp.log = folder.parent / f"storescp-{scp.port}.log"
    with open(scp.log, "wb") as log:
        scp.proc = subprocess.Popen(
            [tool, "-aet", ae_title, "-od", str(folder), "-uf", *extra, str(scp.port)],
            env=dcmtk_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def _up() -> bool:
        assert scp.proc is not None
        if scp.proc.poll() is not None:
            raise AssertionError(f"storescp exited: {scp.log.read_text() if scp.log else ''}")
        return port_open(scp.port)

    wait_for(_up, timeout=20, what="storescp to listen")
    return scp


@contextmanager
def storescp(folder: Path, **kwargs: Any) -> Iterator[StoreScp]:
    scp = start_storescp(folder, **kwargs)
    try:
        yield scp
    finally:
        scp.stop()


@dataclass
class ScriptedScp:
    """A pynetdicom SCP; ``script(ds, call_index)`` chooses each C-STORE response status."""

    ae_title: str
    script: Callable[[Dataset, int], int]
    port: int = 0
    received: list[tuple[str, int]] = field(default_factory=list)  # (SOP Instance UID, status sent)
    transfer_syntaxes: list[str] = field(default_factory=list)
    _server: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        with self._lock:
            status = self.script(ds, len(self.received))
            self.received.append((str(ds.SOPInstanceUID), status))
            self.transfer_syntaxes.append(str(event.context.transfer_syntax))
        return status

    def count(self, uid: str) -> int:
        with self._lock:
            return sum(1 for u, _ in self.received if u == uid)

    def start(self, port: int | None = None) -> ScriptedScp:
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True
        for cx in StoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax)
        ae.add_supported_context(Verification)
        self.port = port or free_port()
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


@contextmanager
def scripted_scp(
    script: Callable[[Dataset, int], int], ae_title: str = "SCRIPTED", **kw: Any
) -> Iterator[ScriptedScp]:
    scp = ScriptedScp(ae_title, script).start(**kw)
    try:
        yield scp
    finally:
        scp.stop()


@contextmanager
def silent_peer() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word (a hung PACS)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def _accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                held.append(conn)
            except OSError:
                continue

    t = threading.Thread(target=_accept, daemon=True)
    t.start()
    try:
        yield int(srv.getsockname()[1])
    finally:
        stop.set()
        t.join(5)
        for c in held:
            c.close()
        srv.close()
