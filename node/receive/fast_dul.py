"""A lean receive path for pynetdicom association acceptors.

pynetdicom's acceptor spends most of a C-STORE's time outside the handler:

- its DUL reactor polls the socket with ``select`` and sleeps ``run_loop_delay`` (1 ms) whenever
  there is nothing to do, and its association reactor sleeps 1 ms per loop; every request and
  every response waits out one or more of those sleeps;
- ``AssociationSocket.recv`` reads 4096 bytes per call into a growing ``bytearray``; a P-DATA PDU
  is then copied into ``bytes``, into PDV items, into the message's ``BytesIO`` and finally twice
  more by ``Event.encoded_dataset()``: a data set is copied five times and lives in memory several
  times over (a 500 MB instance costs a gigabyte);
- command sets, the file meta and responses are built as pydicom ``Dataset`` objects and encoded or
  decoded by pydicom: about 2.5 ms per C-STORE on a slow core.

The subclasses here keep pynetdicom's association negotiation, state machine, service classes and
event handlers, and change the hot path only:

- :class:`FastDUL` waits in ``poll`` on the socket and on a wake-up pipe (no sleeping). A P-DATA-TF
  PDU received in data transfer (Sta6) is parsed straight off the socket: command fragments go to
  the DIMSE provider, C-STORE data set fragments are received with ``recv_into`` into one reusable
  buffer and written straight into a temp file under the spool's ``incoming/`` folder
  (:class:`DatasetSink`), so an instance of any size never sits in memory and is not copied in
  user space. A C-STORE response in Sta6 is sent from the association thread itself.
- :class:`FastDIMSE` decodes C-STORE requests and encodes C-STORE responses directly
  (``node.receive.store_codec``; anything unusual goes to pynetdicom's codec), opens the data set
  file and records the outcome (:class:`ReceivedDataset`, with the header when it could be parsed
  from the first bytes while the rest arrived) for the handler, which takes it with
  :func:`received_dataset` and hands the file to ``Spool.adopt_temp``.
- :class:`FastAssociation` runs pynetdicom's acceptor reactor loop, but waits on an event set by
  the DUL and DIMSE queues instead of sleeping 1 ms per loop.
- :class:`FastAssociationServer` (with :class:`FastRequestHandler`) creates these associations and
  can share its port with sibling processes (``SO_REUSEPORT``).

Differences from stock pynetdicom: ``EVT_DATA_RECV`` and ``EVT_PDU_RECV`` are not triggered for
P-DATA-TF PDUs received in Sta6, nor ``EVT_PDU_SENT``/``EVT_DATA_SENT`` for C-STORE responses sent
directly; ``EVT_DIMSE_RECV``/``EVT_DIMSE_SENT`` are skipped only while no handler is bound to them
(pynetdicom's standard logging handlers are bound only when the ``pynetdicom`` logger is enabled for
DEBUG). ``EVT_RELEASED`` is triggered before the A-RELEASE-RP is sent and ``EVT_REJECTED`` before the
A-ASSOCIATE-RJ is sent: with a reactor that no longer dawdles, the peer would otherwise see the
connection end (and the node record ``EVT_CONN_CLOSE``) before the release or rejection is recorded.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from node.receive.header import InstanceHeader, read_header
from node.receive.header_scan import scan_header
from node.receive.spool import OutOfSpace, Spool
from node.receive.store_codec import decode_c_store_rq, encode_c_store_rsp

if TYPE_CHECKING:
    from pynetdicom.ae import ApplicationEntity

log = logging.getLogger(__name__)

#: Size of the per-association receive buffer that data set fragments pass through.
CHUNK_BYTES = 1024 * 1024
#: How much of a data set is kept in memory to parse its header while the rest arrives.
HEADER_PROBE_BYTES = 64 * 1024
#: Largest PDU read whole into memory (any PDU the fast path does not stream); larger ones abort.
MAX_BUFFERED_PDU = 64 * 1024 * 1024
#: How long the reactors wait before re-checking timers when nothing happens, seconds.
IDLE_WAIT = 0.1

_PDU_HEADER = struct.Struct(">BBL")
_PDV_HEADER = struct.Struct(">LBB")
_P_DATA_TF = 0x04
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
_VALID_PDU_TYPES = frozenset(range(0x01, 0x08))

_IMPLEMENTATION_UID = str(PYNETDICOM_IMPLEMENTATION_UID)
_IMPLEMENTATION_VERSION = str(PYNETDICOM_IMPLEMENTATION_VERSION)

T = TypeVar("T")


class _Closed(Exception):
    """The peer closed the connection (or it timed out) in the middle of a PDU."""


class _BadPDU(Exception):
    """The PDU's items do not add up: an invalid PDU (Evt19)."""


class NotifyingQueue(queue.Queue[T]):
    """A queue that sets ``event`` whenever something is put on it."""

    def __init__(self, event: threading.Event) -> None:
        super().__init__()
        self._event = event

    def _put(self, item: T) -> None:
        super()._put(item)
        self._event.set()


@dataclass(frozen=True)
class ReceivedDataset:
    """A C-STORE data set as received: a Part 10 file under ``incoming/``, or why there is none."""

    path: Path
    size: int
    error: Exception | None = None
    header: InstanceHeader | None = None  # parsed while receiving, when that was provably complete
    sha256: str | None = None  # of the whole file, hashed while writing (set when complete)


def _element(tag: bytes, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element with a 2-byte length (UI, SH)."""
    return tag + vr + struct.pack("<H", len(value)) + value


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the file meta group that pynetdicom's ``Event.encoded_dataset()`` writes.

    The same bytes as ``encode_file_meta(create_file_meta(...))`` from ``pynetdicom.dsutils``, encoded
    here directly because pydicom takes about a millisecond per instance for these seven elements.
    """
    try:
        uids = [
            v.encode("ascii") for v in (sop_class_uid, sop_instance_uid, transfer_syntax, _IMPLEMENTATION_UID)
        ]
        version = _IMPLEMENTATION_VERSION.encode("ascii")
    except UnicodeEncodeError:
        uids = []
    if not uids or max(len(u) for u in uids) > 0xFFF0 or len(version) > 16:
        meta = create_file_meta(
            sop_class_uid=UID(sop_class_uid),
            sop_instance_uid=UID(sop_instance_uid),
            transfer_syntax=UID(transfer_syntax),
        )
        return b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
    padded = [u + b"\x00" if len(u) % 2 else u for u in uids]
    body = b"".join(
        (
            b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01",  # (0002,0001) version 00\01
            _element(b"\x02\x00\x02\x00", b"UI", padded[0]),  # Media Storage SOP Class UID
            _element(b"\x02\x00\x03\x00", b"UI", padded[1]),  # Media Storage SOP Instance UID
            _element(b"\x02\x00\x10\x00", b"UI", padded[2]),  # Transfer Syntax UID
            _element(b"\x02\x00\x12\x00", b"UI", padded[3]),  # Implementation Class UID
            _element(b"\x02\x00\x13\x00", b"SH", version + b" " * (len(version) % 2)),  # version name
        )
    )
    group_length = b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<L", len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body


class DatasetSink:
    """Writes one C-STORE data set, with preamble and file meta, to a new temp file under incoming/.

    It also parses the instance header (``scan_header``, or ``read_header`` where the scanner is not
    sure) from the first HEADER_PROBE_BYTES as soon as they are in, while the rest of the data set is
    still arriving, and keeps it only when the parse provably saw every attribute a parse of the whole
    file would: it stopped at a top-level Pixel Data element inside the probe, or the probe holds the
    whole data set. Otherwise ``header`` stays None and the file is parsed as usual.
    """

    def __init__(self, spool: Spool, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> None:
        self.error: Exception | None = None
        self.size = 0
        self.header: InstanceHeader | None = None
        self._fd = -1
        self._probe: bytearray | None = None
        self._digest = hashlib.sha256()
        self._spool = spool
        try:
            self._fd, self.path = spool.open_temp()
        except OSError as exc:
            self.path = spool.incoming / f"unwritten-{os.getpid()}-{id(self):x}.part"
            self._fail(exc)
            return
        try:
            spool.check_space(0)
            prefix = part10_header(sop_class_uid, sop_instance_uid, transfer_syntax)
            self._write(memoryview(prefix))
        except Exception as exc:
            self._fail(exc)
            return
        self._probe = bytearray(prefix)
        self._probe_limit = len(prefix) + HEADER_PROBE_BYTES

    def write(self, data: memoryview) -> None:
        if self.error is not None:
            return  # already failed: the rest of the data set is drained and dropped
        self._write(data)
        probe = self._probe
        if probe is not None:
            probe += data[: self._probe_limit - len(probe)]
            if len(probe) >= self._probe_limit:
                self._parse_probe(complete=False)

    def _write(self, data: memoryview) -> None:
        self._digest.update(data)
        try:
            while data:
                written = os.write(self._fd, data)
                data = data[written:]
                self.size += written
        except OSError as exc:
            self._fail(exc)

    def _parse_probe(self, complete: bool) -> None:
        probe, self._probe = self._probe, None
        if probe is None or self.error is not None:
            return
        scanned = scan_header(probe, complete)  # ~0.07 ms; None when it cannot be sure
        if scanned is not None:
            self.header = scanned
            return
        fh = io.BytesIO(probe)
        try:
            header = read_header(fh)
        except Exception:  # anything odd: the handler parses the file and reports it
            return
        if not complete and probe[fh.tell() : fh.tell() + 4] != _PIXEL_DATA_TAG:
            return  # the parse ran out of probe before Pixel Data: it may have missed attributes
        self.header = header

    def _fail(self, exc: Exception) -> None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            exc = OutOfSpace(f"disk full while writing to {self.path.parent}: {exc.strerror}")
        self.error = exc
        self._probe = None
        self._close_fd()
        self.path.unlink(missing_ok=True)

    def _close_fd(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                os.close(fd)
            except OSError as exc:
                if self.error is None:
                    self._fail(exc)

    def finish(self) -> ReceivedDataset:
        if self._probe is not None:
            self._parse_probe(complete=True)
        if self.error is None and self._fd >= 0:
            try:  # a large file's data goes to disk now; Spool.commit fsyncs every file after its rename
                self._spool.flush_early(self._fd, self.size)
            except OSError as exc:
                self._fail(exc)
        self._close_fd()
        if self.error is not None:
            return ReceivedDataset(self.path, self.size, self.error)
        return ReceivedDataset(self.path, self.size, None, self.header, self._digest.hexdigest())

    def discard(self) -> None:
        self._probe = None
        self._close_fd()
        self.path.unlink(missing_ok=True)


class FastDIMSE(DIMSEServiceProvider):
    """DIMSE provider that has C-STORE data sets streamed to a file instead of kept in memory.

    A C-STORE request's command set is decoded, and a C-STORE response's encoded, by
    ``node.receive.store_codec`` when nothing is bound to ``EVT_DIMSE_RECV`` / ``EVT_DIMSE_SENT``
    (pynetdicom binds its logging handlers there only when its logger is at DEBUG); anything else goes
    through pynetdicom's own DIMSE message classes.
    """

    def __init__(self, assoc: FastAssociation, spool: Spool) -> None:
        super().__init__(assoc)
        self.msg_queue: queue.Queue[Any] = NotifyingQueue(assoc.activity)
        self._spool = spool
        self._sink: DatasetSink | None = None
        self._sink_context: int | None = None
        self._pending: C_STORE | None = None  # decoded here, waiting for its data set
        self._received: dict[Path, ReceivedDataset] = {}
        self._lock = threading.Lock()

    # -- called by FastDUL (DUL thread) ---------------------------------------------------------------
    def command_fragment(self, context_id: int, control: int, data: bytes) -> None:
        """A command PDV: a C-STORE request is decoded here, anything else by pynetdicom."""
        if self._sink is not None:  # a new command in the middle of a data set: invalid
            self._drop_sink()
            self.message = None
            self.dul.event_queue.put("Evt19")
            return
        if self.message is None and control & 0x03 == 0x03 and _unobserved(self.assoc, evt.EVT_DIMSE_RECV):
            primitive = decode_c_store_rq(data)
            if primitive is not None and self._open_sink(primitive, context_id):
                primitive._context_id = context_id
                primitive._dataset_path = cast(DatasetSink, self._sink).path
                self._pending = primitive
                return
        self.receive_primitive(_p_data(context_id, bytes((control,)) + data))
        msg = self.message
        if control & 0x02 and type(msg) is C_STORE_RQ:
            # The command set is complete and announces a data set: receive it into a file.
            cs = msg.command_set
            if self._open_sink(cs, context_id):
                msg._data_set_path = cast(DatasetSink, self._sink).path

    def sink_for(self, context_id: int) -> DatasetSink | None:
        """Where a data set fragment under ``context_id`` goes, or None to use pynetdicom's path."""
        if self._sink is not None and context_id != self._sink_context:
            # Fragments of one message under two presentation contexts: invalid.
            raise _BadPDU(f"data set fragment under context {context_id}, expected {self._sink_context}")
        return self._sink

    def finish_dataset(self, context_id: int) -> None:
        """The last fragment of the streamed data set arrived: complete the message."""
        sink, self._sink, self._sink_context = self._sink, None, None
        assert sink is not None
        result = sink.finish()
        with self._lock:
            self._received[result.path] = result
        pending, self._pending = self._pending, None
        if pending is not None:
            self.msg_queue.put((context_id, pending))
            return
        # pynetdicom completes the message (EVT_DIMSE_RECV, primitive, msg_queue) on the final
        # (empty) data set fragment; the primitive carries the path as ``_dataset_path``.
        self.receive_primitive(_p_data(context_id, b"\x02"))

    # -- called by the association thread ----------------------------------------------------------------
    def send_msg(self, primitive: Any, context_id: int) -> None:
        if (
            type(primitive) is C_STORE
            and primitive.MessageIDBeingRespondedTo is not None
            and _unobserved(self.assoc, evt.EVT_DIMSE_SENT, evt.EVT_PDU_SENT, evt.EVT_DATA_SENT)
        ):
            command = encode_c_store_rsp(primitive)
            if command is not None and cast(FastDUL, self.dul).send_command(context_id, command):
                return
        super().send_msg(primitive, context_id)

    # -- called by the C-STORE handler -----------------------------------------------------------------
    def take_received(self, path: Path) -> ReceivedDataset | None:
        with self._lock:
            return self._received.pop(path, None)

    # -- end of the association --------------------------------------------------------------------------
    def discard_unclaimed(self) -> None:
        """Delete data sets no handler took (association aborted or ended mid-transfer)."""
        self._drop_sink()
        with self._lock:
            leftovers, self._received = list(self._received.values()), {}
        for item in leftovers:
            item.path.unlink(missing_ok=True)

    def _open_sink(self, command: Any, context_id: int) -> bool:
        try:
            transfer_syntax = self.assoc._accepted_cx[context_id].transfer_syntax[0]
        except (KeyError, IndexError):
            return False  # not an accepted context: pynetdicom aborts the association when served
        self._sink = DatasetSink(
            self._spool,
            str(command.AffectedSOPClassUID),
            str(command.AffectedSOPInstanceUID),
            str(transfer_syntax),
        )
        self._sink_context = context_id
        return True

    def _drop_sink(self) -> None:
        self._pending = None
        if self._sink is not None:
            self._sink.discard()
            self._sink = None
            self._sink_context = None


def _unobserved(assoc: Association, *events: Any) -> bool:
    """True when no handler is bound to any of ``events`` (the fast paths would not trigger them)."""
    return not any(assoc.get_handlers(event) for event in events)


def _p_data(context_id: int, pdv: bytes) -> P_DATA:
    primitive = P_DATA()
    # pynetdicom's setter wants a list of [context ID, PDV] lists (its annotation says tuples).
    primitive.presentation_data_value_list = cast(Any, [[context_id, pdv]])
    return primitive


class FastDUL(DULServiceProvider):
    """DUL provider that blocks on the socket and a wake-up pipe and streams P-DATA fragments."""

    def __init__(self, assoc: FastAssociation) -> None:
        super().__init__(assoc)
        self._activity = assoc.activity
        self.to_user_queue: queue.Queue[Any] = NotifyingQueue(assoc.activity)
        self._wake_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._send_lock = threading.RLock()
        self._held: A_ASSOCIATE | None = None
        self._released = False
        self._unsent = 0  # primitives queued for the reactor and not yet sent by it
        self._buffer = memoryview(bytearray(CHUNK_BYTES))

    # -- waking the reactor ----------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_w >= 0:
                # A full pipe means the reactor has wake-ups pending anyway.
                with contextlib.suppress(BlockingIOError):
                    os.write(self._wake_w, b"\x00")

    def send_pdu(self, primitive: Any) -> None:
        if isinstance(primitive, A_ASSOCIATE) and primitive.result not in (None, 0x00) and not self._released:
            # An A-ASSOCIATE-RJ: pynetdicom queues it, then triggers EVT_REJECTED, then kills the
            # association. Sent from kill() (release_held) instead, so that the rejection is
            # recorded before the peer hears of it, as it was when the reactor polled every 1 ms.
            self._held = primitive
            return
        with self._send_lock:
            self._unsent += 1
        super().send_pdu(primitive)
        self._wake()

    def release_held(self) -> None:
        """Send a held A-ASSOCIATE-RJ (see send_pdu); from here on nothing is held."""
        self._released = True
        held, self._held = self._held, None
        if held is not None:
            self.send_pdu(held)

    def _send(self, pdu: Any) -> None:
        with self._send_lock:
            super()._send(pdu)
            self._unsent = max(0, self._unsent - 1)

    def send_command(self, context_id: int, command: bytes) -> bool:
        """Send an encoded command set (one PDV, last fragment) as a P-DATA-TF; False if not possible.

        In Sta6 with nothing else waiting to be sent, the PDU goes straight out from the calling
        thread (Sta6 + Evt9 is DT-1: send the P-DATA-TF, stay in Sta6), sparing the hand-over to the
        reactor thread. Over TLS it is queued for the reactor as usual: an SSL socket must not be
        written by one thread while another reads it.
        """
        item = struct.pack(">LBB", len(command) + 2, context_id, 0x03) + command
        limit = self.assoc.requestor.maximum_length
        if limit and len(item) > limit:
            return False
        with self._send_lock:
            sock = self.socket.socket if self.socket is not None else None
            direct = (
                self._unsent == 0
                and sock is not None
                and not isinstance(sock, ssl.SSLSocket)
                and self.state_machine.current_state == "Sta6"
            )
            if direct:
                assert sock is not None
                with contextlib.suppress(OSError):  # a broken connection: the reactor finds out
                    sock.sendall(_PDU_HEADER.pack(_P_DATA_TF, 0, len(item)) + item)
                return True
        self.send_pdu(_p_data(context_id, b"\x03" + command))
        return True

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self._wake()
        if threading.current_thread() is not self and self.is_alive():
            self.join()
        return True

    def _close_wake_pipe(self) -> None:
        with self._wake_lock:
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1

    def _poll(self, timeout: float, wake: bool = False) -> bool:
        """True if the socket is readable within ``timeout`` seconds (``poll``: any descriptor number).

        With ``wake`` the wait also ends when the wake-up pipe is written, and the pipe is drained:
        only the reactor's idle wait does that, right before it checks its queues again.
        """
        wrapper = self.socket
        sock = wrapper.socket if wrapper is not None and wrapper._is_connected else None
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True  # decrypted data is buffered in the SSL object, invisible to poll
        poller = select.poll()
        if wake:
            poller.register(self._wake_r, select.POLLIN)
        sock_fd = sock.fileno() if sock is not None else -1
        if sock_fd >= 0:
            poller.register(sock_fd, select.POLLIN | select.POLLPRI)
        try:
            events = poller.poll(timeout * 1000)
        except OSError:
            return False
        ready = False
        for fd, _ in events:
            if wake and fd == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 4096):
                        pass
            elif fd == sock_fd:
                ready = True  # data, or hang-up / error: the read finds out which
        return ready

    def _wait(self) -> None:
        """Block until the socket is readable, a primitive is queued, or IDLE_WAIT passes."""
        self._poll(IDLE_WAIT, wake=True)

    def _is_transport_event(self) -> bool:
        """pynetdicom's check for incoming data (including Sta13's close), polled without select."""
        wrapper = self.socket
        if wrapper is None:
            return False
        if self.state_machine.current_state == "Sta13":
            if self._poll(0):
                self._read_pdu_data()
                return True
            wrapper.close()  # no more data: close the connection (Evt17)
            return True
        if self._poll(0):
            self._read_pdu_data()
            return True
        return False

    # -- reactor ------------------------------------------------------------------------------------------
    def run_reactor(self) -> None:
        """pynetdicom's DUL loop, waiting on the socket and the wake-up pipe instead of sleeping."""
        self._idle_timer.start()
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception as exc:
                    log.error("exception in the DUL reactor, aborting the association: %s", exc)
                    log.debug("DUL reactor exception", exc_info=True)
                    self._abort_now()
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    self._wait()
                    continue
                self.state_machine.do_action(event)
        finally:
            self._close_wake_pipe()
            self._activity.set()

    def _abort_now(self) -> None:
        """As pynetdicom does on an exception in its reactor: A-ABORT, bypassing the state machine."""
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = 0x00
        if self.socket is not None:
            self.socket.send(abort_pdu.encode())
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True

    # -- receiving ----------------------------------------------------------------------------------------
    def _recv_into(self, view: memoryview) -> None:
        sock = cast(AssociationSocket, self.socket).socket
        assert sock is not None
        flags = 0 if isinstance(sock, ssl.SSLSocket) else socket.MSG_WAITALL
        while view:
            try:
                n = sock.recv_into(view, len(view), flags)
            except (OSError, TimeoutError) as exc:
                raise _Closed(str(exc)) from exc
            if n == 0:
                raise _Closed("connection closed by the peer")
            view = view[n:]

    def _recv_bytes(self, n: int) -> bytes:
        if n <= len(self._buffer):
            self._recv_into(self._buffer[:n])
            return bytes(self._buffer[:n])
        data = bytearray(n)
        self._recv_into(memoryview(data))
        return bytes(data)

    def _read_pdu_data(self) -> None:
        """Read one PDU; stream a P-DATA-TF in Sta6, hand anything else to the state machine."""
        try:
            header = self._recv_bytes(6)
        except _Closed as exc:
            log.debug("connection closed before a PDU header: %s", exc)
            self.event_queue.put("Evt17")
            return
        pdu_type, _, length = _PDU_HEADER.unpack(header)
        if pdu_type not in _VALID_PDU_TYPES:
            log.error("unknown PDU type 0x%02X received", pdu_type)
            self.event_queue.put("Evt19")
            return
        if pdu_type == _P_DATA_TF and self.state_machine.current_state == "Sta6" and self.event_queue.empty():
            try:
                self._stream_p_data(length)
            except _Closed as exc:
                log.error("connection closed in the middle of a P-DATA-TF PDU: %s", exc)
                self.event_queue.put("Evt17")
            except _BadPDU as exc:
                log.error("invalid P-DATA-TF PDU: %s", exc)
                self.event_queue.put("Evt19")
            return
        if length > MAX_BUFFERED_PDU:
            log.error("PDU of type 0x%02X is too long (%d bytes)", pdu_type, length)
            self.event_queue.put("Evt19")
            return
        try:
            body = self._recv_bytes(length)
        except _Closed as exc:
            log.error("connection closed before the entire PDU was received: %s", exc)
            self.event_queue.put("Evt17")
            return
        try:
            pdu, event = self._decode_pdu(bytearray(header + body))
        except Exception as exc:
            log.error("unable to decode the received PDU: %s", exc)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _stream_p_data(self, length: int) -> None:
        """Deliver each PDV of a P-DATA-TF PDU as it comes off the socket (Sta6 + Evt10: DT-2)."""
        dimse = cast(FastDIMSE, self.assoc.dimse)
        remaining = length
        while remaining:
            if remaining < 6:
                self._recv_bytes(remaining)
                raise _BadPDU(f"{remaining} stray byte(s) after the last PDV item")
            item_length, context_id, control = _PDV_HEADER.unpack(self._recv_bytes(6))
            if item_length < 2 or item_length + 4 > remaining:
                raise _BadPDU(f"PDV item length {item_length} with {remaining - 4} bytes left in the PDU")
            remaining -= 4 + item_length
            size = item_length - 2
            sink = None if control & 0x01 else dimse.sink_for(context_id)
            if sink is None and size > MAX_BUFFERED_PDU:
                raise _BadPDU(f"a {size}-byte fragment that would have to be held in memory")
            if control & 0x01:
                dimse.command_fragment(context_id, control, self._recv_bytes(size))
                continue
            if sink is None:  # a data set we do not stream (not a C-STORE request): pynetdicom's way
                dimse.receive_primitive(_p_data(context_id, bytes((control,)) + self._recv_bytes(size)))
                continue
            while size:
                view = self._buffer[: min(size, len(self._buffer))]
                self._recv_into(view)
                sink.write(view)
                size -= len(view)
                self._idle_timer.restart()
            if control & 0x02:
                dimse.finish_dataset(context_id)


class FastAssociation(Association):
    """An acceptor association using :class:`FastDUL` and :class:`FastDIMSE`."""

    def __init__(self, ae: ApplicationEntity, mode: str, spool: Spool) -> None:
        self.activity = threading.Event()
        super().__init__(ae, mode)
        self.dul = FastDUL(self)
        self.dimse = FastDIMSE(self, spool)
        # The timeouts were applied to the DUL created by Association.__init__: apply them again.
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout

    def _bind_defaults(self) -> None:
        for event in evt._INTERVENTION_EVENTS:
            self.bind(event, evt.get_default_handler(event))
        if logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
            self.bind(evt.EVT_DIMSE_RECV, standard_dimse_recv_handler)
            self.bind(evt.EVT_DIMSE_SENT, standard_dimse_sent_handler)
            self.bind(evt.EVT_PDU_RECV, standard_pdu_recv_handler)
            self.bind(evt.EVT_PDU_SENT, standard_pdu_sent_handler)

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            cast(FastDIMSE, self.dimse).discard_unclaimed()

    def kill(self) -> None:
        cast(FastDUL, self.dul).release_held()
        super().kill()

    def _run_reactor(self) -> None:
        """pynetdicom's acceptor loop, waiting for activity instead of sleeping 1 ms per loop."""
        self._is_paused = False
        served = False
        while not self._kill:
            if not served:
                self.activity.wait(IDLE_WAIT)
            self.activity.clear()

            # Let send_*() callers pause the reactor (see pynetdicom's Association._run_reactor).
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            served = msg is not None
            if msg:
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                # EVT_RELEASED first, then the A-RELEASE-RP: the DUL closes the connection as soon
                # as the response is out (EVT_CONN_CLOSE), and a release must be handled as one.
                log.debug("association released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.acse.send_release(is_response=True)
                self.kill()
                return

            if self.acse.is_aborted():
                log.debug("association aborted")
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires for subscribers
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                log.error("network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class FastRequestHandler(RequestHandler):
    """Creates a :class:`FastAssociation` for each connection."""

    server: FastAssociationServer

    def _create_association(self) -> Association:
        sock = cast(socket.socket, self.request)
        # Responses are small: send them at once. Reads block (see FastDUL._wait) with the network
        # timeout as a limit on a peer that stops in the middle of a PDU.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        timeout = self.ae.network_timeout
        if timeout:
            seconds = int(timeout)
            timeval = struct.pack("ll", seconds, int((timeout - seconds) * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)

        assoc = FastAssociation(self.ae, MODE_ACCEPTOR, self.server.spool)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(AssociationSocket(assoc, client_socket=sock))

        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = self.server.copied_contexts()
        assoc.requestor.address_info = self.remote

        for event, handlers in self.server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler in cast(list[tuple[Any, Any]], handlers):
                    assoc.bind(event, handler[0], handler[1])
        return assoc


class FastAssociationServer(ThreadedAssociationServer):
    """A threaded acceptor whose associations use the fast receive path."""

    def __init__(self, *args: Any, spool: Spool, reuse_port: bool = False, **kwargs: Any) -> None:
        self.spool = spool
        self.reuse_port = reuse_port
        kwargs.setdefault("request_handler", FastRequestHandler)
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.reuse_port:
            assert self.socket is not None
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def _bind_defaults(self) -> None:
        for event in evt._INTERVENTION_EVENTS:
            self.bind(event, evt.get_default_handler(event))
        if logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
            self.bind(evt.EVT_DIMSE_RECV, standard_dimse_recv_handler)
            self.bind(evt.EVT_DIMSE_SENT, standard_dimse_sent_handler)
            self.bind(evt.EVT_PDU_RECV, standard_pdu_recv_handler)
            self.bind(evt.EVT_PDU_SENT, standard_pdu_sent_handler)

    def copied_contexts(self) -> list[Any]:
        """Each association negotiates on its own copy of the supported contexts."""
        from copy import deepcopy

        return deepcopy(self.contexts)


def received_dataset(event: Any) -> ReceivedDataset | None:
    """The streamed data set of a C-STORE ``event``; None when it came through pynetdicom's path."""
    dimse = getattr(event.assoc, "dimse", None)
    path = getattr(event.request, "_dataset_path", None)
    if not isinstance(dimse, FastDIMSE) or not isinstance(path, Path):
        return None
    return dimse.take_received(path)
