"""The demo's "PACS": a pynetdicom C-STORE SCP on a loopback port that keeps what it receives.

Each instance is written to ``folder/<SOP Instance UID>.dcm`` before the success status goes back, and
recorded with the wall-clock time the handler finished (what the sender sees as the C-STORE response,
give or take the send of a few bytes).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.receive.transfer_syntaxes import ACCEPTED_TRANSFER_SYNTAXES

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass(frozen=True)
class Received:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str
    calling_ae: str
    path: Path
    responded_at: float  # time.time() when the handler returned success


class ReceivingPeer:
    """Start with ``start()``; ``port`` is the bound loopback port; ``stop()`` shuts it down."""

    def __init__(
        self, folder: Path, ae_title: str = "DEMOPACS", host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.host = host
        self._port = port
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._received: list[Received] = []
        self._server: Any = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the receiving peer is not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = 0
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 60
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        self._server = ae.start_server(
            (self.host, self._port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> ReceivingPeer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _on_store(self, event: Any) -> int:
        try:
            ds: Dataset = event.dataset
            ds.file_meta = event.file_meta
        except Exception:  # an undecodable data set: refuse it like a PACS would
            return 0xC210
        sop_uid = str(ds.get("SOPInstanceUID", "") or "")
        if not sop_uid:
            return 0xA900
        path = self.folder / f"{sop_uid}.dcm"
        tmp = path.with_suffix(".part")
        ds.save_as(tmp, enforce_file_format=True)
        tmp.replace(path)
        item = Received(
            sop_class_uid=str(ds.get("SOPClassUID", "")),
            sop_instance_uid=sop_uid,
            study_uid=str(ds.get("StudyInstanceUID", "")),
            series_uid=str(ds.get("SeriesInstanceUID", "")),
            modality=str(ds.get("Modality", "")),
            calling_ae=str(event.assoc.requestor.ae_title).strip(),
            path=path,
            responded_at=time.time(),
        )
        with self._changed:
            self._received.append(item)
            self._changed.notify_all()
        return 0x0000

    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def wait_for(self, predicate: Any, timeout: float) -> list[Received]:
        """Block until ``predicate(received_list)`` is true or ``timeout`` passes; returns the list."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(list(self._received)):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(min(left, 0.5))
            return list(self._received)
