"""C-STORE SCU (and C-ECHO) with pynetdicom.

For every SOP class among the files, presentation contexts are proposed one transfer syntax each:
the file's own syntax, Explicit VR Little Endian and Implicit VR Little Endian. Each instance goes in
its own syntax when the peer accepted it, else in an accepted uncompressed one (pynetdicom re-encodes
explicit <-> implicit VR; a compressed file is decompressed first). A peer that accepts none of the
contexts for a SOP class fails that instance permanently. Association rejects, aborts and timeouts
are transient; every C-STORE response status is kept per instance.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.dispatch.destinations import Target
from node.dispatch.outcome import AttemptResult, InstanceStatus, ResultFile, dimse_status_outcome, hex_status
from node.dispatch.reactor_guard import guard_responses
from node.settings import DispatchSection, TlsSection

log = logging.getLogger(__name__)

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_REJECT_RESULT = {1: "rejected-permanent", 2: "rejected-transient"}


@dataclass(frozen=True)
class Calling:
    """Who we are on the wire: our AE title and, for TLS destinations, our certificate."""

    ae_title: str
    tls: TlsSection | None = None


def client_tls_context(tls: TlsSection | None) -> ssl.SSLContext:
    """TLS for an outgoing association: verify the peer with ``dimse.tls.ca`` (system roots when
    unset), present ``dimse.tls.certificate``/``key`` when configured (mutual TLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca) if tls and tls.ca else None)
    ctx.check_hostname = False  # PACS peers are addressed by IP as often as by name; the CA decides
    if tls is not None and tls.certificate and tls.key:
        ctx.load_cert_chain(str(tls.certificate), str(tls.key))
    return ctx


def _ae(calling: Calling, settings: DispatchSection) -> AE:
    ae = AE(ae_title=calling.ae_title)
    ae.connection_timeout = settings.connect_timeout_seconds
    ae.acse_timeout = settings.connect_timeout_seconds
    ae.dimse_timeout = settings.timeout_seconds
    ae.network_timeout = settings.timeout_seconds
    return ae


def _associate(ae: AE, target: Target, calling: Calling) -> tuple[Association, list[bool]]:
    """Request an association; the list gets an entry once the TCP connection is open."""
    assert target.host is not None and target.port is not None and target.ae_title is not None
    tls_args = (client_tls_context(calling.tls), target.host) if target.tls else None
    connected: list[bool] = []
    assoc = ae.associate(
        target.host,
        target.port,
        ae_title=target.ae_title,
        tls_args=tls_args,
        evt_handlers=[(evt.EVT_CONN_OPEN, lambda _event: connected.append(True))],
    )
    guard_responses(assoc)  # a quick C-STORE-RSP must reach send_c_store, not the reactor thread
    return assoc, connected


def _failed_association(assoc: Association, connected: bool, target: Target) -> str:
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        if rsp is not None:
            return (
                f"A-ASSOCIATE-RJ {_REJECT_RESULT.get(int(rsp.result or 0), rsp.result)} "
                f"source {rsp.result_source} reason {rsp.diagnostic}"
            )
        return "association rejected"
    if not connected:
        return f"no connection to {target.host}:{target.port} (refused, unreachable or timed out)"
    return "association aborted, or no answer to the association request in time"


def _read(path: str) -> Dataset:
    return pydicom.dcmread(path)


def _choose(assoc: Association, sop_class: str, own: UID) -> UID | None:
    accepted = [
        UID(cx.transfer_syntax[0])
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == sop_class and cx.transfer_syntax
    ]
    if own in accepted:
        return own
    for ts in _UNCOMPRESSED:
        if ts in accepted:
            return ts
    return None


def send(
    target: Target, files: Sequence[ResultFile], settings: DispatchSection, calling: Calling
) -> AttemptResult:
    """Send ``files`` over one association; per-instance statuses, or an attempt-level error."""
    ae = _ae(calling, settings)
    own: dict[str, UID] = {}
    for f in files:
        meta = pydicom.dcmread(f.path, stop_before_pixels=True, specific_tags=[])
        own[f.sop_instance_uid] = UID(str(meta.file_meta.TransferSyntaxUID))
    for sop_class in sorted({f.sop_class_uid for f in files}):
        syntaxes = {own[f.sop_instance_uid] for f in files if f.sop_class_uid == sop_class}
        for proposed in [*sorted(syntaxes - set(_UNCOMPRESSED)), *_UNCOMPRESSED]:
            ae.add_requested_context(sop_class, proposed)
    assoc, connected = _associate(ae, target, calling)
    if not assoc.is_established:
        reason = _failed_association(assoc, bool(connected), target)
        return AttemptResult(error=reason, status=reason.split(" reason")[0].split(" (")[0][:64])
    result = AttemptResult()
    try:
        for f in files:
            ts = _choose(assoc, f.sop_class_uid, own[f.sop_instance_uid])
            if ts is None:
                result.instances[f.sop_instance_uid] = InstanceStatus(
                    None, "failed", f"the peer accepted no presentation context for {f.sop_class_uid}"
                )
                continue
            ds = _read(str(f.path))
            detail = ""
            if ts != own[f.sop_instance_uid]:
                if own[f.sop_instance_uid].is_compressed:
                    ds.decompress()
                detail = f"sent as {ts.name} (file: {own[f.sop_instance_uid].name})"
            rsp = assoc.send_c_store(ds)
            if not assoc.is_established and "Status" not in rsp:
                result.error = "association lost while waiting for a C-STORE response"
                result.status = "aborted"
                break
            if "Status" not in rsp:
                result.error = "no C-STORE response (DIMSE timeout)"
                result.status = "timeout"
                break
            status = int(rsp.Status)
            comment = str(rsp.get("ErrorComment", "") or "")
            outcome = dimse_status_outcome(status)
            text = "; ".join(x for x in (detail, comment) if x)
            result.instances[f.sop_instance_uid] = InstanceStatus(status, outcome, text)
            log.debug("C-STORE %s to %s: %s", f.sop_instance_uid, target.describe(), hex_status(status))
    finally:
        if assoc.is_established:
            assoc.release()
    if result.error is None:
        worst = [s.status for s in result.instances.values() if s.outcome == "failed"]
        warn = [s.status for s in result.instances.values() if s.outcome == "warning"]
        result.status = hex_status((worst or warn or [0])[0])
        if all(s.status is None for s in result.instances.values() if s.outcome == "failed") and worst:
            # nothing acceptable was negotiated for some SOP class: the peer will not change its mind
            result.status = "no presentation context"
    return result


def echo(target: Target, settings: DispatchSection, calling: Calling) -> tuple[bool, str]:
    """C-ECHO: (success, the peer's answer in words)."""
    ae = _ae(calling, settings)
    ae.add_requested_context(Verification)
    assoc, connected = _associate(ae, target, calling)
    if not assoc.is_established:
        return False, _failed_association(assoc, bool(connected), target)
    try:
        rsp = assoc.send_c_echo()
        if "Status" not in rsp:
            return False, "no C-ECHO response (timeout or connection lost)"
        status = int(rsp.Status)
        accepted = assoc.acceptor
        who = f"{accepted.ae_title}"
        impl = accepted.implementation_class_uid
        version = accepted.implementation_version_name
        return status == 0, (
            f"C-ECHO status {hex_status(status)} from AE {who!r} "
            f"(implementation {impl}{' ' + str(version) if version else ''})"
        )
    finally:
        if assoc.is_established:
            assoc.release()
