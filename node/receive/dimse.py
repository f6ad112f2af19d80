"""DICOM (DIMSE) listener: C-ECHO and C-STORE SCP on pynetdicom.

The C-STORE handler has its collaborators bound in (``evt_handlers`` with arguments, as in
pynetdicom's own examples): the data set has already been streamed, with its file meta, into a temp
file under the spool's ``incoming/`` folder by the receive path (``node.receive.fast_dul``); the
handler adopts that file (hashed while it arrived), has the ingestor record it (rename into the
spool, one fsync, commit), and answers. Nothing is decoded
beyond the few header attributes recorded.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.audit import events as ev
from node.receive.fast_dul import FastAssociationServer, received_dataset
from node.receive.header import HeaderError, InstanceHeader
from node.receive.header_scan import header_of_file
from node.receive.ingest import Carrier, Ingestor
from node.receive.spool import OutOfSpace, Spool, TempFile
from node.receive.status import Status
from node.receive.transfer_syntaxes import ACCEPTED_TRANSFER_SYNTAXES
from node.receive.write_gate import WriteGate
from node.settings import Settings

log = logging.getLogger(__name__)

REJECT_REASONS = {
    (0x01, 0x01, 0x03): "calling AE title not recognised",
    (0x01, 0x01, 0x07): "called AE title not recognised",
    (0x02, 0x02, 0x01): "user identity rejected",
    (0x02, 0x03, 0x02): "local limit exceeded: too many associations",
}


@dataclass
class _Tracked:
    carrier: Carrier
    instances: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class CarrierTable:
    """Maps live pynetdicom associations to their recorded carrier."""

    def __init__(self) -> None:
        self._items: dict[int, _Tracked] = {}
        self._lock = threading.Lock()

    def add(self, assoc: Any, carrier: Carrier) -> None:
        with self._lock:
            self._items[id(assoc)] = _Tracked(carrier)

    def get(self, assoc: Any) -> _Tracked | None:
        with self._lock:
            return self._items.get(id(assoc))

    def pop(self, assoc: Any) -> _Tracked | None:
        with self._lock:
            return self._items.pop(id(assoc), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


def _peer(assoc: Any) -> tuple[str | None, int | None, str | None, str | None]:
    req = assoc.requestor
    return (
        req.address or None,
        req.port or None,
        (req.ae_title or "").strip() or None,
        (assoc.acceptor.primitive.called_ae_title.strip() if assoc.acceptor.primitive else None),
    )


def handle_accepted(
    event: Any, ingestor: Ingestor, carriers: CarrierTable, tls: bool, gate: WriteGate
) -> None:
    assoc = event.assoc
    host, port, calling, _ = _peer(assoc)
    called = assoc.requestor.primitive.called_ae_title.strip() if assoc.requestor.primitive else None
    with gate.hold():
        carrier = ingestor.open_carrier(
            "dimse", calling_ae=calling, called_ae=called, remote_host=host, remote_port=port, tls=tls
        )
    carriers.add(assoc, carrier)
    log.info("association %s accepted from %s@%s:%s", carrier.uid, calling, host, port)


def _end(event: Any, ingestor: Ingestor, carriers: CarrierTable, gate: WriteGate, how: str) -> None:
    tracked = carriers.pop(event.assoc)
    if tracked is None:
        return
    with gate.hold():
        ingestor.close_carrier(tracked.carrier, how, tracked.instances)
    log.info("association %s %s after %d instance(s)", tracked.carrier.uid, how, tracked.instances)


def handle_released(event: Any, ingestor: Ingestor, carriers: CarrierTable, gate: WriteGate) -> None:
    _end(event, ingestor, carriers, gate, "released")


def handle_aborted(event: Any, ingestor: Ingestor, carriers: CarrierTable, gate: WriteGate) -> None:
    _end(event, ingestor, carriers, gate, "aborted")


def handle_closed(event: Any, ingestor: Ingestor, carriers: CarrierTable, gate: WriteGate) -> None:
    _end(event, ingestor, carriers, gate, "closed")


def handle_rejected(event: Any, ingestor: Ingestor, settings: Settings, gate: WriteGate) -> None:
    assoc = event.assoc
    rq = assoc.requestor.primitive
    calling = (rq.calling_ae_title if rq else assoc.requestor.ae_title or "").strip()
    called = (rq.called_ae_title if rq else "").strip()
    allowed = settings.dimse.allowed_calling_aets
    rsd = (0x02, 0x03, 0x02)
    if allowed and calling not in allowed:
        rsd = (0x01, 0x01, 0x03)
    if settings.dimse.check_called_aet and called != settings.node.ae_title:
        rsd = (0x01, 0x01, 0x07)
    text = REJECT_REASONS[rsd]
    log.warning("association from %s@%s rejected: %s", calling, assoc.requestor.address, text)
    with gate.hold():
        _audit_rejected(ingestor, assoc, calling, called, rsd, text)


def _audit_rejected(
    ingestor: Ingestor, assoc: Any, calling: str, called: str, rsd: tuple[int, int, int], text: str
) -> None:
    ingestor.audit(
        ev.AssociationRejected(
            protocol="dimse",
            calling_ae=calling or None,
            called_ae=called or None,
            remote_host=assoc.requestor.address,
            remote_port=assoc.requestor.port,
            result=rsd[0],
            source=rsd[1],
            reason=rsd[2],
            reason_text=text,
        )
    )


def _status(code: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = int(code)
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


def _spool_instance(event: Any, spool: Spool) -> tuple[TempFile, InstanceHeader | None]:
    """The received data set as a temp file under incoming/, and its header when already parsed.

    Raises OutOfSpace or OSError; nothing is left in incoming/ then.
    """
    received = received_dataset(event)
    if received is None:  # not streamed by the fast receive path: the data set is in memory
        payload = event.encoded_dataset()
        return spool.write_temp((payload,), size_hint=len(payload)), None
    try:
        if received.error is not None:
            raise received.error
        spool.check_space(0)  # as write_temp: what stays free after the instance is written
        if received.sha256 is not None:  # hashed while it was written
            return TempFile(path=received.path, size=received.size, sha256=received.sha256), received.header
        return spool.adopt_temp(received.path), received.header
    except BaseException:
        spool.discard(received.path)
        raise


def _header(temp: TempFile) -> InstanceHeader | None:
    """Parse the header before taking the write gate; on failure ``Ingestor.store`` reports it."""
    try:
        return header_of_file(temp.path)
    except HeaderError:
        return None


def handle_store(
    event: Any, ingestor: Ingestor, spool: Spool, carriers: CarrierTable, gate: WriteGate
) -> Dataset | int:
    """C-STORE: spool the encoded data set durably, record it, answer. No pixel decoding here."""
    tracked = carriers.get(event.assoc)
    if tracked is None:  # should not happen: EVT_ACCEPTED always precedes a C-STORE
        received = received_dataset(event)
        if received is not None:
            spool.discard(received.path)
        return _status(Status.PROCESSING_FAILURE, "association not registered")
    request = event.request
    sop_uid = str(request.AffectedSOPInstanceUID or "")
    sop_class = str(request.AffectedSOPClassUID or "")
    try:
        temp, header = _spool_instance(event, spool)
    except OutOfSpace as exc:
        with gate.hold():
            rejected = ingestor.reject(
                tracked.carrier, Status.OUT_OF_RESOURCES, str(exc), sop_instance_uid=sop_uid
            )
        return _status(rejected.status, "Out of resources: disk full")
    except Exception as exc:  # an unwritable spool must never take the listener down
        log.exception("cannot spool instance %s", sop_uid)
        with gate.hold():
            rejected = ingestor.reject(
                tracked.carrier,
                Status.OUT_OF_RESOURCES,
                f"cannot write spool: {exc}",
                sop_instance_uid=sop_uid,
            )
        return _status(rejected.status, "Cannot write spool")
    try:
        if header is None:
            header = _header(temp)
        with gate.hold():
            result = ingestor.store(
                temp,
                tracked.carrier,
                expected_sop_instance_uid=sop_uid,
                expected_sop_class_uid=sop_class,
                header=header,
            )
    except BaseException:
        spool.discard(temp)  # not acknowledged: leave nothing behind in incoming/
        raise
    if result.ok:
        with tracked.lock:
            tracked.instances += 1
        return int(Status.SUCCESS)  # pynetdicom takes a bare status; no Dataset to build
    return _status(result.status, result.comment)


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    tls = settings.dimse.tls
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    assert tls.certificate is not None and tls.key is not None
    ctx.load_cert_chain(certfile=str(tls.certificate), keyfile=str(tls.key))
    if tls.ca is not None:
        ctx.load_verify_locations(cafile=str(tls.ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def build_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.node.ae_title)
    ae.maximum_pdu_size = settings.dimse.max_pdu
    ae.maximum_associations = settings.dimse.max_associations
    ae.network_timeout = settings.dimse.network_timeout
    ae.acse_timeout = settings.dimse.acse_timeout
    ae.dimse_timeout = settings.dimse.network_timeout
    ae.require_called_aet = settings.dimse.check_called_aet
    ae.require_calling_aet = list(settings.dimse.allowed_calling_aets)
    ae.add_supported_context(Verification, ACCEPTED_TRANSFER_SYNTAXES[:3])
    for cx in StoragePresentationContexts:
        assert cx.abstract_syntax is not None
        ae.add_supported_context(cx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    return ae


class DimseServer:
    """One pynetdicom acceptor on a socket (shared with sibling receiver processes when asked)."""

    def __init__(
        self,
        settings: Settings,
        ingestor: Ingestor,
        spool: Spool,
        *,
        reuse_port: bool = False,
        warn_open: bool = True,
    ) -> None:
        self.settings = settings
        self.ingestor = ingestor
        self.spool = spool
        self.reuse_port = reuse_port
        self.carriers = CarrierTable()
        self.gate = WriteGate.for_database(settings.database_url)
        self.ae = build_ae(settings)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        if warn_open and not settings.dimse.allowed_calling_aets:
            log.warning("dimse.allowed_calling_aets is empty: any calling AE title may store instances")

    def handlers(self) -> list[Any]:
        tls = self.settings.dimse.tls.enabled
        gate = self.gate
        return [
            (evt.EVT_ACCEPTED, handle_accepted, [self.ingestor, self.carriers, tls, gate]),
            (evt.EVT_REJECTED, handle_rejected, [self.ingestor, self.settings, gate]),
            (evt.EVT_RELEASED, handle_released, [self.ingestor, self.carriers, gate]),
            (evt.EVT_ABORTED, handle_aborted, [self.ingestor, self.carriers, gate]),
            (evt.EVT_CONN_CLOSE, handle_closed, [self.ingestor, self.carriers, gate]),
            (evt.EVT_C_STORE, handle_store, [self.ingestor, self.spool, self.carriers, gate]),
        ]

    def start(self, port: int | None = None) -> tuple[str, int]:
        """Listen on ``dimse.host`` and ``port`` (default ``dimse.port``); return the bound address."""
        address = (self.settings.dimse.host, self.settings.dimse.port if port is None else port)
        server = self.ae.make_server(
            address,
            ssl_context=tls_context(self.settings),
            evt_handlers=self.handlers(),
            server_class=FastAssociationServer,
            spool=self.spool,
            reuse_port=self.reuse_port,
        )
        # As AE.start_server(block=False) does, with our server class.
        self.ae._servers.append(server)
        self._thread = threading.Thread(target=server.serve_forever, name="dimse-acceptor", daemon=True)
        self._thread.start()
        self._server = server
        host, bound_port = server.server_address[:2]
        log.info("DICOM listener %s on %s:%s", self.settings.node.ae_title, host, bound_port)
        return str(host), int(bound_port)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def stop(self, grace_seconds: float) -> None:
        """Stop accepting, let in-flight associations finish (up to ``grace_seconds``), then abort."""
        if self._server is None:
            return
        server = self._server
        server.shutdown()  # stops serve_forever and closes the listening socket
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and [a for a in server.active_associations if a.is_alive()]:
            time.sleep(0.05)
        for assoc in server.active_associations:
            if assoc.is_alive():
                log.warning("aborting association still open at shutdown")
                assoc.abort()
        self._server = None
