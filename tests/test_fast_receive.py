"""The lean C-STORE receive path (node.receive.fast_dul, store_codec, receivers, write_gate).

Parity tests compare the direct encoders/decoders with pynetdicom's own; the end-to-end tests use
real peers (pynetdicom SCUs, DCMTK storescu) against ``segnode serve``.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from sqlalchemy import select

from node.db.models import AuditEvent, Instance
from node.receive.fast_dul import HEADER_PROBE_BYTES, DatasetSink, part10_header
from node.receive.header import read_header
from node.receive.spool import Spool
from node.receive.store_codec import decode_c_store_rq, encode_c_store_rsp
from node.receive.write_gate import WriteGate
from tests.conftest import RunningNode, dcmtk_env, need_tool, start_node, wait_for
from tests.dimse_peers import associate, echoscu, scu_ae, send_datasets
from tests.factories import SeriesSpec, ct_instance, ct_series, write_series

CT = "1.2.840.10008.5.1.4.1.1.2"


def _instances(node: RunningNode) -> dict[str, Instance]:
    with node.sessions()() as s:
        return {r.sop_instance_uid: r for r in s.scalars(select(Instance)).all()}


def _encoded(ds: Dataset) -> bytes:
    """The data set as pynetdicom sends it (explicit VR little endian, no file meta)."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


# -- parity with pynetdicom --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "ts"),
    [
        (CT, "1.2.826.0.1.3680043.8.498.1234567890123456789", "1.2.840.10008.1.2.1"),
        ("1.2.3", "1.2.34", "1.2.840.10008.1.2"),
        (CT, "..", "1.2.840.10008.1.2.4.50"),
        ("1.2", "/tmp/evil", "1.2.840.10008.1.2.1.99"),
    ],
)
def test_part10_header_is_what_pynetdicom_writes(sop_class: str, sop_instance: str, ts: str) -> None:
    meta = create_file_meta(
        sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_instance), transfer_syntax=UID(ts)
    )
    assert part10_header(sop_class, sop_instance, ts) == b"\x00" * 128 + b"DICM" + encode_file_meta(meta)


def _pynetdicom_rsp(primitive: C_STORE) -> bytes:
    msg = C_STORE_RSP()
    msg.primitive_to_message(primitive)
    (pdata,) = list(msg.encode_msg(1, 16384))
    pdv = pdata.presentation_data_value_list[0][1]
    assert pdv[0] == 0x03
    return bytes(pdv[1:])


@pytest.mark.parametrize(
    ("status", "comment", "uid"),
    [
        (0x0000, None, "1.2.3.4"),
        (0xA700, "Out of resources: disk full", "1.2.3.45"),
        (0xC000, "x" * 63, "1.2"),
        (0xA900, "odd", ".."),
        (0x0000, None, None),
    ],
)
def test_c_store_rsp_encoding_matches_pynetdicom(status: int, comment: str | None, uid: str | None) -> None:
    rsp = C_STORE()
    rsp.MessageID = rsp.MessageIDBeingRespondedTo = 9
    rsp.AffectedSOPClassUID = CT
    rsp.AffectedSOPInstanceUID = uid
    rsp.Status = status
    if comment:
        rsp.ErrorComment = comment  # type: ignore[assignment]  # pynetdicom annotates it as None
    assert encode_c_store_rsp(rsp) == _pynetdicom_rsp(rsp)


def test_c_store_rsp_with_unusual_content_is_left_to_pynetdicom() -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 1
    rsp.Status = 0xC000
    rsp.ErrorComment = "Ünïcödé"  # type: ignore[assignment]
    assert encode_c_store_rsp(rsp) is None
    rsp.ErrorComment = None
    rsp.OffendingElement = [0x00100010]  # type: ignore[assignment]
    assert encode_c_store_rsp(rsp) is None


def _pynetdicom_rq(**kw: object) -> tuple[bytes, C_STORE]:
    req = C_STORE()
    req.MessageID = 5
    req.AffectedSOPClassUID = CT
    req.AffectedSOPInstanceUID = str(kw.get("uid", "1.2.3.4.5"))
    req.Priority = int(kw.get("priority", 2))  # type: ignore[call-overload]
    if "move_ae" in kw:
        req.MoveOriginatorApplicationEntityTitle = str(kw["move_ae"])
        req.MoveOriginatorMessageID = 77
    req.DataSet = BytesIO(b"\x10\x00\x20\x00\x02\x00\x00\x00x ")
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    pdatas = list(msg.encode_msg(3, 16384))
    command = bytes(pdatas[0].presentation_data_value_list[0][1])
    decoded = DIMSEMessage()
    for pdata in pdatas:
        if decoded.decode_msg(pdata):
            break
    return command, decoded.message_to_primitive()  # type: ignore[return-value]


@pytest.mark.parametrize(
    "kw", [{}, {"uid": "1.2.34"}, {"move_ae": "MOVER"}, {"move_ae": " A ", "priority": 1}, {"uid": ".."}]
)
def test_c_store_rq_decoding_matches_pynetdicom(kw: dict[str, object]) -> None:
    command, reference = _pynetdicom_rq(**kw)
    assert command[0] == 0x03
    mine = decode_c_store_rq(command[1:])
    assert mine is not None
    for name in (
        "MessageID",
        "AffectedSOPClassUID",
        "AffectedSOPInstanceUID",
        "Priority",
        "MoveOriginatorApplicationEntityTitle",
        "MoveOriginatorMessageID",
    ):
        assert getattr(mine, name) == getattr(reference, name), name
        assert type(getattr(mine, name)) is type(getattr(reference, name)), name


def test_other_commands_are_left_to_pynetdicom() -> None:
    command, _ = _pynetdicom_rq()
    body = command[1:]
    # C-ECHO-RQ: group length, SOP class, command field 0x0030, message ID, no data set
    echo = (
        b"\x00\x00\x02\x00\x12\x00\x00\x001.2.840.10008.1.1\x00"
        + b"\x00\x00\x00\x01\x02\x00\x00\x00\x30\x00"
        + b"\x00\x00\x10\x01\x02\x00\x00\x00\x01\x00"
        + b"\x00\x00\x00\x08\x02\x00\x00\x00\x01\x01"
    )
    assert decode_c_store_rq(echo) is None
    assert decode_c_store_rq(body[:-3]) is None  # truncated
    assert decode_c_store_rq(body + b"\x00\x00\x99\x99\x02\x00\x00\x00\x00\x00") is None  # unknown element


# -- the data set sink --------------------------------------------------------------------------------


def _sink_file(tmp_path: Path, data: bytes, chunk: int) -> tuple[DatasetSink, Path]:
    spool = Spool(tmp_path / "spool", tmp_path / "incoming")
    ds_uid = "1.2.3.4.5.6"
    sink = DatasetSink(spool, CT, ds_uid, "1.2.840.10008.1.2.1")
    for start in range(0, len(data), chunk):
        sink.write(memoryview(data)[start : start + chunk])
    return sink, sink.path


@pytest.mark.parametrize("chunk", [7, 4096, 1 << 20])
def test_sink_writes_the_part10_file_and_parses_the_header_early(tmp_path: Path, chunk: int) -> None:
    ds = ct_instance(SeriesSpec(n=1, size=256), 0)  # 128 KiB of pixels: more than the probe
    data = _encoded(ds)
    assert len(data) > HEADER_PROBE_BYTES
    sink, path = _sink_file(tmp_path, data, chunk)
    assert sink.header is not None  # parsed as soon as the probe was full, before the end
    result = sink.finish()
    assert result.error is None and result.path == path
    on_disk = path.read_bytes()
    assert on_disk == part10_header(CT, "1.2.3.4.5.6", "1.2.840.10008.1.2.1") + data
    assert result.header == read_header(path)


def test_sink_header_probe_is_not_trusted_when_pixel_data_is_beyond_it(tmp_path: Path) -> None:
    ds = ct_instance(SeriesSpec(n=1, size=256), 0)
    ds.add_new(0x00291010, "OB", b"\x00" * (HEADER_PROBE_BYTES + 100))  # a large private element first
    ds.SeriesDescription = "AFTER THE PROBE"  # (0008,103E) precedes it anyway; check all the same
    data = _encoded(ds)
    sink, path = _sink_file(tmp_path, data, 4096)
    result = sink.finish()
    assert result.header is None  # the parse ran out of probe: the handler parses the file instead
    assert read_header(path).series_description == "AFTER THE PROBE"


def test_sink_small_data_set_is_parsed_whole(tmp_path: Path) -> None:
    ds = ct_instance(SeriesSpec(n=1, size=16), 0)
    data = _encoded(ds)
    assert len(data) < HEADER_PROBE_BYTES
    sink, path = _sink_file(tmp_path, data, 1000)
    result = sink.finish()
    assert result.header is not None and result.header == read_header(path)


def test_sink_discard_removes_the_file(tmp_path: Path) -> None:
    sink, path = _sink_file(tmp_path, b"\x08\x00\x16\x00UI\x04\x001.2\x00", 5)
    assert path.exists()
    sink.discard()
    assert not path.exists()


# -- write gate ------------------------------------------------------------------------------------------


def test_write_gate_serialises_processes(tmp_path: Path) -> None:
    gate = WriteGate.for_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert gate.lock_path == tmp_path / "db.sqlite.write-lock"
    assert WriteGate.for_database("postgresql+psycopg://u@h/db").lock_path is None
    script = (
        "import fcntl,os,sys; fd=os.open(sys.argv[1],os.O_RDWR); "
        "fcntl.flock(fd, fcntl.LOCK_EX|fcntl.LOCK_NB) if sys.argv[2]=='nb' else None; print('got')"
    )
    with gate.hold():
        blocked = subprocess.run(
            [sys.executable, "-c", script, str(gate.lock_path), "nb"], capture_output=True, text=True
        )
        assert blocked.returncode != 0  # another process cannot take it meanwhile
    free = subprocess.run(
        [sys.executable, "-c", script, str(gate.lock_path), "nb"], capture_output=True, text=True
    )
    assert free.returncode == 0 and "got" in free.stdout
    gate.close()


# -- end to end ------------------------------------------------------------------------------------------


def test_many_small_pdus_and_fragments_store_byte_exact(node: RunningNode) -> None:
    """A peer with a tiny max PDU splits each data set over many PDUs: the stored file is exact."""
    datasets = ct_series(SeriesSpec(n=3, size=128))
    ae = scu_ae("SMALLPDU")
    ae.maximum_pdu_size = 4096
    assoc = associate(ae, node.dimse_port, ae_title=node.ae_title, max_pdu=4096)
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()
    assert statuses == [0, 0, 0]
    rows = _instances(node)
    for ds in datasets:
        row = rows[str(ds.SOPInstanceUID)]
        stored = (node.storage / "spool" / row.path).read_bytes()
        expected = part10_header(CT, str(ds.SOPInstanceUID), "1.2.840.10008.1.2.1") + _encoded(ds)
        assert stored == expected
        assert hashlib.sha256(stored).hexdigest() == row.sha256
    assert list((node.storage / "incoming").iterdir()) == []


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def _raw_association(node: RunningNode, calling: str = "RAWSCU") -> socket.socket:
    """A connection with an association for CT Image Storage (context 1, explicit VR LE), raw bytes."""
    context = (
        struct.pack(">BBBB", 1, 0, 0, 0) + _item(0x30, CT.encode()) + _item(0x40, b"1.2.840.10008.1.2.1")
    )
    body = (
        struct.pack(">HH", 1, 0)
        + node.ae_title.ljust(16).encode()
        + calling.ljust(16).encode()
        + b"\x00" * 32
        + _item(0x10, b"1.2.840.10008.3.1.1.1")
        + _item(0x20, context)
        + _item(0x50, _item(0x51, struct.pack(">L", 1 << 20)) + _item(0x52, b"1.2.3.4"))
    )
    sock = socket.create_connection(("127.0.0.1", node.dimse_port), timeout=30)
    sock.sendall(struct.pack(">BBL", 0x01, 0, len(body)) + body)
    header = sock.recv(6, socket.MSG_WAITALL)
    kind, _, length = struct.unpack(">BBL", header)
    sock.recv(length, socket.MSG_WAITALL)
    assert kind == 0x02, f"association not accepted (PDU type {kind:#x})"
    return sock


def _pdata(context_id: int, control: int, payload: bytes) -> bytes:
    item = struct.pack(">LBB", len(payload) + 2, context_id, control) + payload
    return struct.pack(">BBL", 0x04, 0, len(item)) + item


def test_connection_lost_mid_data_set_leaves_no_partial_file(node: RunningNode) -> None:
    ds = ct_instance(SeriesSpec(n=1, size=256), 0)
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = CT
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID
    req.Priority = 2
    req.DataSet = BytesIO(_encoded(ds))
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    command = bytes(next(iter(msg.encode_msg(1, 1 << 20))).presentation_data_value_list[0][1])
    sock = _raw_association(node)
    sock.sendall(_pdata(1, command[0], command[1:]))
    sock.sendall(_pdata(1, 0x00, _encoded(ds)[:50000]))  # first half of the data set, not the last
    wait_for(lambda: list((node.storage / "incoming").iterdir()), what="the partial file to be written")
    sock.close()
    wait_for(lambda: not list((node.storage / "incoming").iterdir()), what="the partial file to be removed")
    assert _instances(node) == {}
    assert echoscu(node) == 0


def test_release_is_recorded_as_released_every_time(node: RunningNode, tmp_path: Path) -> None:
    paths = write_series(ct_series(SeriesSpec(n=2, size=64)), tmp_path / "in")
    for _ in range(5):
        proc = subprocess.run(
            [
                need_tool("storescu"),
                "-aet",
                "RELSCU",
                "-aec",
                node.ae_title,
                "127.0.0.1",
                str(node.dimse_port),
            ]
            + [str(p) for p in paths],
            env=dcmtk_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    with node.sessions()() as s:
        ended = s.scalars(select(AuditEvent).where(AuditEvent.event_type == "association.ended")).all()
    assert [e.details["how"] for e in ended] == ["released"] * 5


def _peak_rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as fh:
            total += next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    return total


def _rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as fh:
            total += next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    return total


def test_large_instance_is_streamed_not_held_in_memory(node: RunningNode, tmp_path: Path) -> None:
    """A 96 MB instance: the server's peak resident memory grows by far less than its size."""
    frames = 192
    ds = ct_instance(SeriesSpec(n=1, size=512), 0)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2.1")  # Enhanced CT
    ds.NumberOfFrames = frames
    del ds.PixelData
    path = tmp_path / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    frame = os.urandom(512 * 512 * 2)
    with open(path, "ab") as fh:
        fh.write(b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<L", frames * len(frame)))
        for _ in range(frames):
            fh.write(frame)
    pid = node.proc.pid
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pytest.skip("cannot reset the peak RSS counter here")
    before = _rss_kb([pid])
    proc = subprocess.run(
        [
            need_tool("storescu"),
            "-aet",
            "BIGSCU",
            "-aec",
            node.ae_title,
            "127.0.0.1",
            str(node.dimse_port),
            str(path),
        ],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    grown_mb = (_peak_rss_kb([pid]) - before) / 1024
    size_mb = path.stat().st_size / 2**20
    assert grown_mb < 48, f"peak RSS grew by {grown_mb:.0f} MB while receiving {size_mb:.0f} MB"
    (row,) = _instances(node).values()
    assert row.size > frames * len(frame)


# -- several receiver processes ----------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except OSError:
                continue
    return out


def _receivers(n: int) -> dict[str, str]:
    """A node with ``n`` receiver processes and no executor (its workers are multiprocessing children too)."""
    return {"SEGNODE_DIMSE__RECEIVERS": str(n), "SEGNODE_EXECUTOR__ENABLED": "false"}


def _receiver_pids(node: RunningNode) -> list[int]:
    pids = []
    for child in _children(node.proc.pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline:
            pids.append(child)
    return pids


def test_receiver_processes_share_the_port_and_stop_cleanly(tmp_path: Path) -> None:
    running = start_node(tmp_path / "st", extra_env=_receivers(3))
    try:
        receivers = _receiver_pids(running)
        assert len(receivers) == 3
        spec = SeriesSpec(n=24, size=64)
        paths = write_series(ct_series(spec), tmp_path / "in")
        procs = [
            subprocess.Popen(
                [need_tool("storescu"), "-aet", f"PAR{i}", "-aec", running.ae_title, "127.0.0.1"]
                + [str(running.dimse_port)]
                + [str(p) for p in paths[i::4]],
                env=dcmtk_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(4)
        ]
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, out
        assert len(_instances(running)) == 24
        assert send_datasets(running, ct_series(SeriesSpec(n=2))) == [0, 0]
        assert echoscu(running) == 0
    finally:
        code = running.stop()
    assert code == 0
    for pid in receivers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    with running.sessions()() as s:
        ended = s.scalars(select(AuditEvent).where(AuditEvent.event_type == "association.ended")).all()
    assert len(ended) >= 5 and all(e.details["how"] == "released" for e in ended)
    # the port is free again
    _assert_port_free(running.dimse_port)


def _assert_port_free(port: int) -> None:
    """Nobody listens on ``port`` any more (connections in TIME_WAIT do not count)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
        probe.listen()


def test_receivers_stop_when_the_node_is_killed(tmp_path: Path) -> None:
    running = start_node(tmp_path / "st", extra_env=_receivers(2))
    receivers = _receiver_pids(running)
    assert len(receivers) == 2
    os.kill(running.proc.pid, signal.SIGKILL)
    running.proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in receivers):
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in receivers)
    _assert_port_free(running.dimse_port)


def test_a_receiver_that_dies_is_started_again(tmp_path: Path) -> None:
    running = start_node(tmp_path / "st", extra_env=_receivers(2))
    try:
        first = _receiver_pids(running)
        os.kill(first[0], signal.SIGKILL)
        wait_for(
            lambda: len(pids := _receiver_pids(running)) == 2 and first[0] not in pids,
            timeout=60,
            what="the receiver to be started again",
        )
        wait_for(
            lambda: "exited with -9; starting it again" in running.log(), what="the restart to be logged"
        )
        for _ in range(4):  # whichever receiver the kernel picks, it answers
            assert echoscu(running) == 0
    finally:
        assert running.stop() == 0


def test_sigterm_lets_receivers_finish_inflight_associations(tmp_path: Path) -> None:
    running = start_node(tmp_path / "st", extra_env=_receivers(2))
    paths = write_series(ct_series(SeriesSpec(n=120, size=128)), tmp_path / "in")
    proc = subprocess.Popen(
        [need_tool("storescu"), "-aet", "LONGSCU", "-aec", running.ae_title, "127.0.0.1"]
        + [str(running.dimse_port)]
        + [str(p) for p in paths],
        env=dcmtk_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for(lambda: len(_instances(running)) >= 5, what="the transfer to be under way")
    running.proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert running.proc.wait(timeout=60) == 0
    assert len(_instances(running)) == 120
    assert "segnode: stopped" in running.log()
