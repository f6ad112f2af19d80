"""Keep a pynetdicom requestor's reactor thread from taking the responses its sender waits for.

pynetdicom (3.0.x) runs a reactor thread beside every association. Between two DIMSE requests it
polls the message queue (``dimse.get_msg(block=False)``) and serves whatever it finds as an incoming
request. ``send_c_store`` and the other ``send_*`` methods pause the reactor first, but the pause
has a window: they clear the reactor's checkpoint and wait for its ``_is_paused`` flag, and the flag
can still read True just after the reactor has passed the checkpoint. When the peer answers quickly
(a busy host, a fast SCP) the reactor then takes the C-STORE-RSP, logs "Received unexpected C-STORE
service message" and drops it; the sender waits out the whole DIMSE timeout and aborts the
association (pynetdicom issues #842, #850 and #875 report the symptom).

``guard_responses`` fixes this for one association: the non-blocking poll, which only the reactor
makes, takes a message off the queue only when it is a request, and leaves responses for the
blocking ``get_msg`` of the ``send_*`` method waiting for them. Call it right after
``AE.associate`` returns, before the first request.
"""

from __future__ import annotations

from typing import Any

from pynetdicom.association import Association


def guard_responses(assoc: Association) -> None:
    """Install the guard on ``assoc`` (harmless on one that was not established: nothing polls it)."""
    dimse = assoc.dimse
    queue = dimse.msg_queue
    blocking_get = dimse.get_msg

    def get_msg(block: bool = False) -> tuple[Any, Any]:
        if block:
            return blocking_get(True)
        with queue.mutex:  # the head is only ever taken here or by the blocking get, both locked
            if not queue.queue:
                return None, None
            _context_id, msg = queue.queue[0]
            if not msg.is_valid_request:
                return None, None  # a response: the sender's blocking get_msg takes it
            item: tuple[Any, Any] = queue.queue.popleft()
            return item

    dimse.get_msg = get_msg  # type: ignore[method-assign]
