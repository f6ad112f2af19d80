"""node.dispatch.reactor_guard: pynetdicom's reactor thread leaves responses to the waiting sender."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from node.dispatch.destinations import Target
from node.dispatch.dimse import Calling, _associate
from node.dispatch.reactor_guard import guard_responses


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A real pynetdicom Verification SCP on a loopback port."""
    scp = AE(ae_title="ECHOSCP")
    scp.add_supported_context(Verification)
    server = scp.start_server(("127.0.0.1", 0), block=False)
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


@pytest.fixture
def assoc(echo_port: int) -> Iterator[Association]:
    """An established association to that SCP."""
    scu = AE(ae_title="GUARDSCU")
    scu.acse_timeout = scu.dimse_timeout = scu.network_timeout = 30
    scu.add_requested_context(Verification)
    association = scu.associate("127.0.0.1", echo_port, ae_title="ECHOSCP")
    assert association.is_established
    try:
        yield association
    finally:
        association.release()


def _store_rsp(message_id: int) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = "1.2.3.4"
    rsp.Status = 0x0000
    return rsp


def _count_reactor_polls(association: Association) -> list[int]:
    """Wrap the association's get_msg; the list counts the non-blocking calls (the reactor's)."""
    polls = [0]
    inner = association.dimse.get_msg

    def get_msg(block: bool = False) -> tuple[Any, Any]:
        if not block:
            polls[0] += 1
        return inner(block)

    association.dimse.get_msg = get_msg  # type: ignore[method-assign]
    return polls


def _wait_for_polls(polls: list[int], at_least: int) -> None:
    deadline = time.monotonic() + 20
    while polls[0] < at_least:
        assert time.monotonic() < deadline, "the reactor thread stopped polling"
        time.sleep(0.001)


def test_the_reactor_leaves_a_queued_response_for_the_sender(assoc: Association) -> None:
    guard_responses(assoc)
    polls = _count_reactor_polls(assoc)
    assoc.dimse.msg_queue.put((1, _store_rsp(1)))
    _wait_for_polls(polls, polls[0] + 3)  # the running reactor has polled the queue since
    context_id, msg = assoc.dimse.get_msg(block=True)
    assert (context_id, msg.MessageIDBeingRespondedTo, msg.Status) == (1, 1, 0)
    assert assoc.is_established


def test_unguarded_reactor_takes_the_response(assoc: Association) -> None:
    """What the guard prevents: pynetdicom's own reactor swallows a response it finds queued."""
    polls = _count_reactor_polls(assoc)
    assoc.dimse.msg_queue.put((1, _store_rsp(1)))
    _wait_for_polls(polls, polls[0] + 3)
    assert assoc.dimse.msg_queue.empty()


def test_the_poll_still_takes_requests_in_order() -> None:
    unstarted = Association(AE(), "requestor")  # no reactor thread: the test makes its polls
    guard_responses(unstarted)
    echo = C_ECHO()
    echo.MessageID = 7
    echo.AffectedSOPClassUID = Verification
    unstarted.dimse.msg_queue.put((1, echo))
    unstarted.dimse.msg_queue.put((1, _store_rsp(2)))
    assert unstarted.dimse.get_msg(block=False) == (1, echo)
    assert unstarted.dimse.get_msg(block=False) == (None, None)  # the response stays queued
    assert unstarted.dimse.get_msg(block=False) == (None, None)
    _, rsp = unstarted.dimse.get_msg(block=True)
    assert rsp.MessageIDBeingRespondedTo == 2
    assert unstarted.dimse.get_msg(block=False) == (None, None)  # empty queue


def test_c_echo_through_a_guarded_association(assoc: Association) -> None:
    guard_responses(assoc)
    for _ in range(20):
        assert int(assoc.send_c_echo().Status) == 0


def test_the_dispatcher_guards_its_associations(echo_port: int) -> None:
    ae = AE(ae_title="SEGNODE")
    ae.add_requested_context(Verification)
    target = Target(name="pacs", type="dimse", ae_title="ECHOSCP", host="127.0.0.1", port=echo_port)
    association, connected = _associate(ae, target, Calling(ae_title="SEGNODE"))
    assert association.is_established and connected
    try:
        polls = _count_reactor_polls(association)
        association.dimse.msg_queue.put((1, _store_rsp(5)))
        _wait_for_polls(polls, polls[0] + 3)
        _, msg = association.dimse.get_msg(block=True)
        assert msg.MessageIDBeingRespondedTo == 5
    finally:
        association.release()
