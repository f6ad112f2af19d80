"""A lean receive path for pynetdicom association acceptors.

pynetdicom's acceptor spends most of a C-STORE's time outside the handler:

- its DUL reactor polls the socket with ``select`` and sleeps ``run_loop_delay`` (1 ms) whenever
  there is nothing to do, and its association reactor sleeps 1 ms per loop; every request and
  every response waits out one or more of those sleeps;
- ``AssociationSocket.recv`` reads 4096 bytes per call into a growing ``bytearray``; a P-DATA PDU
  is then copied into ``bytes``, into PDV items, into the message's ``BytesIO`` and finally twice
  more by ``Event.encoded_dataset()``, so a data set is copied five times and lives in memory
  several times over (a 500 MB instance costs gigabytes).

The subclasses here keep pynetdicom's association negotiation, state machine, service classes and
event handlers, and change only the hot path:

- :class:`FastDUL` waits on the socket and on a wake-up pipe (no sleeping), so requests and
  responses move as soon as they can; a P-DATA-TF PDU received in data transfer (Sta6) is parsed
  straight off the socket: command fragments go to the DIMSE provider as before, C-STORE data set
  fragments are received with ``recv_into`` into one reusable buffer and written straight into a
  temp file under the spool's ``incoming/`` folder (:class:`DatasetSink`), so an instance of any size
  never sits in memory and is never copied in user space.
- :class:`FastDIMSE` opens that file when a C-STORE request's command set is complete and records
  the outcome (:class:`ReceivedDataset`) for the handler, which takes it with
  :func:`received_dataset` and hands the file to ``Spool.adopt_temp``.
- :class:`FastAssociation` runs pynetdicom's acceptor reactor loop, but waits on an event set by
  the DUL and DIMSE queues instead of sleeping 1 ms per loop.
- :class:`FastAssociationServer` (with :class:`FastRequestHandler`) creates these associations and
  can share its port with sibling processes (``SO_REUSEPORT``).

Differences from stock pynetdicom, all on the fast P-DATA path only: ``EVT_DATA_RECV`` and
``EVT_PDU_RECV`` are not triggered for P-DATA-TF PDUs received in Sta6 (nothing in segnode binds
them), and pynetdicom's standard logging handlers are bound only when the ``pynetdicom`` logger is
enabled for DEBUG.
"""

from __future__ import annotations

import contextlib
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
from pynetdicom import evt
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
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from node.receive.spool import OutOfSpace, Spool

if TYPE_CHECKING:
    from pynetdicom.ae import ApplicationEntity

log = logging.getLogger(__name__)

#: Size of the per-association receive buffer that data set fragments pass through.
CHUNK_BYTES = 1024 * 1024
#: Largest PDU read whole into memory (any PDU the fast path does not stream); larger ones abort.
MAX_BUFFERED_PDU = 64 * 1024 * 1024
#: How long the reactors wait before re-checking timers when nothing happens, seconds.
IDLE_WAIT = 0.1

_PDU_HEADER = struct.Struct(">BBL")
_PDV_HEADER = struct.Struct(">LBB")
_P_DATA_TF = 0x04
_VALID_PDU_TYPES = frozenset(range(0x01, 0x08))

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


class DatasetSink:
    """Writes one C-STORE data set, with preamble and file meta, to a new temp file under incoming/."""

    def __init__(self, spool: Spool, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> None:
        self.error: Exception | None = None
        self.size = 0
        self._fd = -1
        self.path = spool.new_temp_path()
        try:
            spool.check_space(0)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
            meta = create_file_meta(
                sop_class_uid=UID(sop_class_uid),
                sop_instance_uid=UID(sop_instance_uid),
                transfer_syntax=UID(transfer_syntax),
            )
            self.write(memoryview(b"\x00" * 128 + b"DICM" + encode_file_meta(meta)))
        except Exception as exc:
            self._fail(exc)

    def write(self, data: memoryview) -> None:
        if self.error is not None:
            return  # already failed: the rest of the data set is drained and dropped
        try:
            while data:
                written = os.write(self._fd, data)
                data = data[written:]
                self.size += written
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        if isinstance(exc, OSError) and exc.errno in (28, 122):  # ENOSPC, EDQUOT
            exc = OutOfSpace(f"disk full while writing to {self.path.parent}: {exc.strerror}")
        self.error = exc
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
        self._close_fd()
        return ReceivedDataset(self.path, self.size, self.error)

    def discard(self) -> None:
        self._close_fd()
        self.path.unlink(missing_ok=True)


class FastDIMSE(DIMSEServiceProvider):
    """DIMSE provider that has C-STORE data sets streamed to a file instead of kept in memory."""

    def __init__(self, assoc: FastAssociation, spool: Spool) -> None:
        super().__init__(assoc)
        self.msg_queue: queue.Queue[Any] = NotifyingQueue(assoc.activity)
        self._spool = spool
        self._sink: DatasetSink | None = None
        self._sink_context: int | None = None
        self._received: dict[Path, ReceivedDataset] = {}
        self._lock = threading.Lock()

    # -- called by FastDUL (DUL thread) ---------------------------------------------------------------
    def command_fragment(self, context_id: int, control: int, data: bytes) -> None:
        """A command PDV: assembled and decoded by pynetdicom, as a P-DATA-TF would be."""
        if self._sink is not None:  # a new command in the middle of a data set: invalid
            self._drop_sink()
            self.message = None
            self.dul.event_queue.put("Evt19")
            return
        self.receive_primitive(_p_data(context_id, bytes((control,)) + data))
        msg = self.message
        if control & 0x02 and type(msg) is C_STORE_RQ:
            # The command set is complete and announces a data set: receive it into a file.
            self._open_sink(msg, context_id)

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
        # pynetdicom completes the message (EVT_DIMSE_RECV, primitive, msg_queue) on the final
        # (empty) data set fragment; the primitive carries the path as ``_dataset_path``.
        self.receive_primitive(_p_data(context_id, b"\x02"))

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

    def _open_sink(self, msg: Any, context_id: int) -> None:
        try:
            transfer_syntax = self.assoc._accepted_cx[context_id].transfer_syntax[0]
        except (KeyError, IndexError):
            return  # not an accepted context: pynetdicom aborts the association when served
        cs = msg.command_set
        self._sink = DatasetSink(
            self._spool, str(cs.AffectedSOPClassUID), str(cs.AffectedSOPInstanceUID), str(transfer_syntax)
        )
        self._sink_context = context_id
        msg._data_set_path = self._sink.path

    def _drop_sink(self) -> None:
        if self._sink is not None:
            self._sink.discard()
            self._sink = None
            self._sink_context = None


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
        self._buffer = memoryview(bytearray(CHUNK_BYTES))

    # -- waking the reactor ----------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_w >= 0:
                # A full pipe means the reactor has wake-ups pending anyway.
                with contextlib.suppress(BlockingIOError):
                    os.write(self._wake_w, b"\x00")

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

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

    def _wait(self) -> None:
        """Block until the socket is readable, a primitive is queued, or IDLE_WAIT passes."""
        sock = self.socket.socket if self.socket is not None else None
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return
        fds: list[Any] = [self._wake_r]
        if sock is not None and sock.fileno() >= 0:
            fds.append(sock)
        try:
            ready, _, _ = select.select(fds, [], [], IDLE_WAIT)
        except (OSError, ValueError):
            return  # the socket was closed under us; the next loop notices
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_r, 4096):
                    pass

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
            if control & 0x01:
                dimse.command_fragment(context_id, control, self._recv_bytes(size))
                continue
            sink = dimse.sink_for(context_id)
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
