"""STOW-RS against a real ``segnode serve``: dicomweb-client and hand-built multipart bodies."""

from __future__ import annotations

import hashlib
import io
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from sqlalchemy import select

from node.db.models import Association, AuditEvent, Instance
from node.receive.multipart_stream import MultipartError, MultipartStream
from node.receive.stow import needs_preamble, parse_media_type
from tests.conftest import RunningNode, start_node, wait_for
from tests.factories import SeriesSpec, ct_instance, ct_series

BOUNDARY = "segnode-test-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
STUDY_MISMATCH = 0xC409
TOKEN = "s3cret-t0ken"
SMALL_LIMIT = 100_000  # dicomweb.max_request_bytes of the token node


# -- fixtures: one node per configuration for the whole module ------------------------------------
@pytest.fixture(scope="module")
def open_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    running = start_node(tmp_path_factory.mktemp("stow-open") / "store")
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture(scope="module")
def token_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    running = start_node(
        tmp_path_factory.mktemp("stow-token") / "store",
        extra_env={"SEGNODE_DICOMWEB__TOKEN": TOKEN, "SEGNODE_DICOMWEB__MAX_REQUEST_BYTES": str(SMALL_LIMIT)},
    )
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture(scope="module")
def full_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    running = start_node(
        tmp_path_factory.mktemp("stow-full") / "store",
        extra_env={"SEGNODE_STORAGE__MIN_FREE_BYTES": str(2**62)},
    )
    yield running
    assert running.stop() == 0, running.log()


# -- helpers -----------------------------------------------------------------------------------------
def base_url(node: RunningNode) -> str:
    return f"http://127.0.0.1:{node.dicomweb_port}/dicomweb"


def stow_url(node: RunningNode, study: str | None = None) -> str:
    return f"{base_url(node)}/studies" + (f"/{study}" if study else "")


def client(node: RunningNode, token: str | None = None) -> DICOMwebClient:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    web = DICOMwebClient(base_url(node), headers=headers)
    web.set_http_retry_params(retry=False)
    return web


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def multipart(parts: list[tuple[str | None, bytes]], boundary: str = BOUNDARY) -> bytes:
    body = b""
    for content_type, payload in parts:
        body += f"\r\n--{boundary}\r\n".encode()
        if content_type is not None:
            body += f"Content-Type: {content_type}\r\n".encode()
        body += b"\r\n" + payload
    return body + f"\r\n--{boundary}--\r\n".encode()


def post(node: RunningNode, body: Any, content_type: str = STOW_TYPE, **kw: Any) -> requests.Response:
    headers = {"Content-Type": content_type, "Accept": "application/dicom+json", **kw.pop("headers", {})}
    return requests.post(kw.pop("url", stow_url(node)), data=body, headers=headers, timeout=60, **kw)


def referenced(response: Dataset) -> list[str]:
    return [str(item.ReferencedSOPInstanceUID) for item in response.get("ReferencedSOPSequence", [])]


def failures(response: Dataset) -> dict[str | None, int]:
    """SOP Instance UID (None when it could not be read) -> FailureReason."""
    out: dict[str | None, int] = {}
    for item in response.get("FailedSOPSequence", []):
        uid = item.get("ReferencedSOPInstanceUID")
        out[str(uid) if uid else None] = int(item.FailureReason)
    return out


def as_dataset(response: requests.Response) -> Dataset:
    assert response.headers["Content-Type"] == "application/dicom+json"
    return Dataset.from_json(response.json())


def events(node: RunningNode, event_type: str | None = None, **where: Any) -> list[AuditEvent]:
    with node.sessions()() as s:
        q = select(AuditEvent).order_by(AuditEvent.id)
        if event_type:
            q = q.where(AuditEvent.event_type == event_type)
        for key, value in where.items():
            q = q.where(getattr(AuditEvent, key) == value)
        return list(s.scalars(q))


def instances(node: RunningNode, *sop_uids: str) -> list[Instance]:
    with node.sessions()() as s:
        q = select(Instance).where(Instance.sop_instance_uid.in_(sop_uids)).order_by(Instance.id)
        return list(s.scalars(q))


def incoming(node: RunningNode) -> list[Path]:
    return sorted((node.storage / "incoming").glob("*"))


def http_rejections(node: RunningNode, status: int) -> list[AuditEvent]:
    return [e for e in events(node, "http.rejected") if e.details["status"] == status]


# -- the multipart parser and media types, without a server ----------------------------------------
def test_multipart_stream_survives_any_chunking() -> None:
    payloads = [b"", b"\r\n--" + BOUNDARY.encode()[:-1] + b"x", bytes(range(256)) * 40]
    body = b"preamble\r\n" + multipart([("application/dicom", p) for p in payloads]) + b"epilogue"
    for step in (1, 2, 3, 7, 64, len(body)):
        got: list[bytearray] = []
        parser = MultipartStream(
            BOUNDARY,
            on_part_begin=lambda headers, got=got: got.append(bytearray()),
            on_part_data=lambda view, got=got: got[-1].extend(view),
            on_part_end=lambda: None,
        )
        for i in range(0, len(body), step):
            parser.feed(body[i : i + step])
        parser.close()
        assert [bytes(g) for g in got] == payloads, step
    truncated = MultipartStream(
        BOUNDARY, on_part_begin=lambda h: None, on_part_data=lambda v: None, on_part_end=lambda: None
    )
    truncated.feed(multipart([("text/plain", b"x")])[:-10])
    with pytest.raises(MultipartError):
        truncated.close()


def test_media_type_parameters_quoted_or_not() -> None:
    assert parse_media_type('Multipart/Related; type="application/dicom"; boundary="a b;c"') == (
        "multipart/related",
        {"type": "application/dicom", "boundary": "a b;c"},
    )
    assert parse_media_type("multipart/related;type=application/dicom;boundary=xyz") == (
        "multipart/related",
        {"type": "application/dicom", "boundary": "xyz"},
    )
    assert parse_media_type("nonsense") is None
    ds = ct_instance(SeriesSpec(n=1), 0)
    assert not needs_preamble(encode(ds))
    bare = io.BytesIO()
    pydicom.dcmwrite(bare, ds)  # what dicomweb-client sends: file meta, no preamble
    assert needs_preamble(bare.getvalue())


# -- storing -----------------------------------------------------------------------------------------
def test_store_series_with_dicomweb_client(open_node: RunningNode) -> None:
    spec = SeriesSpec(n=4)
    datasets = ct_series(spec)
    sent = [str(ds.SOPInstanceUID) for ds in datasets]
    response = client(open_node).store_instances(datasets)
    assert sorted(referenced(response)) == sorted(sent)
    assert "FailedSOPSequence" not in response
    assert str(response.RetrieveURL).endswith(f"/dicomweb/studies/{spec.study_uid}")
    for item in response.ReferencedSOPSequence:
        assert item.ReferencedSOPClassUID == datasets[0].SOPClassUID
        assert f"/series/{spec.series_uid}/instances/{item.ReferencedSOPInstanceUID}" in str(item.RetrieveURL)

    rows = instances(open_node, *sent)
    assert sorted(r.sop_instance_uid for r in rows) == sorted(sent)
    for row in rows:
        path = open_node.storage / "spool" / row.path
        data = path.read_bytes()
        assert data[128:132] == b"DICM"  # stored as a Part 10 file though the client sent no preamble
        assert hashlib.sha256(data).hexdigest() == row.sha256 and len(data) == row.size
        assert pydicom.dcmread(path).SOPInstanceUID == row.sop_instance_uid
    with open_node.sessions()() as s:
        carriers = {r.association_id for r in rows}
        assert len(carriers) == 1
        assoc = s.get(Association, carriers.pop())
        assert assoc is not None and assoc.protocol == "stow" and assoc.end_reason == "released"
    stored = events(open_node, "instance.stored", study_uid=spec.study_uid)
    assert len(stored) == 4 and {e.details["protocol"] for e in stored} == {"stow"}
    assert incoming(open_node) == []

    # Over 1 MB dicomweb-client switches to chunked transfer encoding; the result is the same.
    big = ct_series(SeriesSpec(n=3, size=512))
    response = client(open_node).store_instances(big)
    assert sorted(referenced(response)) == sorted(str(ds.SOPInstanceUID) for ds in big)
    assert len(instances(open_node, *referenced(response))) == 3


def test_instance_of_another_study_than_the_url(open_node: RunningNode) -> None:
    spec = SeriesSpec(n=2)
    good = ct_series(spec)
    stranger = ct_instance(SeriesSpec(n=1), 0)
    response = client(open_node).store_instances([*good, stranger], study_instance_uid=spec.study_uid)
    assert sorted(referenced(response)) == sorted(str(ds.SOPInstanceUID) for ds in good)
    assert failures(response) == {str(stranger.SOPInstanceUID): STUDY_MISMATCH}
    assert str(response.RetrieveURL).endswith(f"/dicomweb/studies/{spec.study_uid}")
    assert instances(open_node, str(stranger.SOPInstanceUID)) == []
    rejected = events(open_node, "instance.rejected", sop_instance_uid=str(stranger.SOPInstanceUID))
    assert [e.details["status"] for e in rejected] == [STUDY_MISMATCH]

    # Nothing of the study in the URL: 409, every instance listed.
    only = ct_instance(SeriesSpec(n=1), 0)
    with pytest.raises(requests.HTTPError) as info:
        client(open_node).store_instances([only], study_instance_uid=spec.study_uid)
    assert info.value.response.status_code == 409
    assert failures(as_dataset(info.value.response)) == {str(only.SOPInstanceUID): STUDY_MISMATCH}


def test_bad_parts_fail_alone(open_node: RunningNode) -> None:
    spec = SeriesSpec(n=2)
    good = ct_series(spec)
    no_series = ct_instance(spec, 5)
    del no_series.SeriesInstanceUID
    octet = ct_instance(spec, 6)
    body = multipart(
        [
            ("application/dicom", encode(good[0])),
            ("application/dicom", b"this is not DICOM at all" * 50),
            ("application/dicom", encode(no_series)),
            ("application/octet-stream", encode(octet)),
            ("application/dicom; transfer-syntax=1.2.840.10008.1.2.1", encode(good[1])),
        ]
    )
    response = post(open_node, body)
    assert response.status_code == 202, response.text
    result = as_dataset(response)
    assert sorted(referenced(result)) == sorted(str(ds.SOPInstanceUID) for ds in good)
    assert failures(result) == {
        None: CANNOT_UNDERSTAND,
        str(no_series.SOPInstanceUID): DOES_NOT_MATCH,
        str(octet.SOPInstanceUID): CANNOT_UNDERSTAND,
    }
    assert len(instances(open_node, *(str(ds.SOPInstanceUID) for ds in good))) == 2
    assert instances(open_node, str(no_series.SOPInstanceUID), str(octet.SOPInstanceUID)) == []
    carrier = events(open_node, "instance.stored", sop_instance_uid=str(good[0].SOPInstanceUID))[
        0
    ].association_uid
    rejected = events(open_node, "instance.rejected", association_uid=carrier)
    assert sorted(e.details["status"] for e in rejected) == sorted(
        [CANNOT_UNDERSTAND, DOES_NOT_MATCH, CANNOT_UNDERSTAND]
    )
    assert {e.details["protocol"] for e in rejected} == {"stow"}
    assert {e.sop_instance_uid for e in rejected} == {
        None,
        str(no_series.SOPInstanceUID),
        str(octet.SOPInstanceUID),
    }
    assert incoming(open_node) == []


def test_media_type_and_syntax_errors(open_node: RunningNode) -> None:
    ds = ct_instance(SeriesSpec(n=1), 0)
    part = encode(ds)
    before_415 = len(http_rejections(open_node, 415))
    before_400 = len(http_rejections(open_node, 400))

    assert post(open_node, part, content_type="application/dicom").status_code == 415
    xml = f'multipart/related; type="application/dicom+xml"; boundary={BOUNDARY}'
    assert (
        post(open_node, multipart([("application/dicom+xml", b"<x/>")]), content_type=xml).status_code == 415
    )
    assert post(open_node, b"", content_type="").status_code == 415
    assert len(http_rejections(open_node, 415)) == before_415 + 3

    malformed = [
        (
            multipart([("application/dicom", part)]),
            'multipart/related; type="application/dicom"',
        ),  # no boundary
        (b"no delimiter anywhere in here", STOW_TYPE),
        (multipart([("application/dicom", part)])[: len(part) // 2], STOW_TYPE),  # truncated
        (f"--{BOUNDARY}--\r\n".encode(), STOW_TYPE),  # no parts
        (f"--{BOUNDARY}\r\nContent Type broken\r\n\r\nx\r\n--{BOUNDARY}--".encode(), STOW_TYPE),
    ]
    for body, content_type in malformed:
        response = post(open_node, body, content_type=content_type)
        assert response.status_code == 400, (body[:60], response.text)
        assert response.json()["error"]
    assert len(http_rejections(open_node, 400)) == before_400 + len(malformed)
    assert instances(open_node, str(ds.SOPInstanceUID)) == []
    assert incoming(open_node) == []
    with open_node.sessions()() as s:
        open_carriers = s.scalars(select(Association).where(Association.ended_at.is_(None))).all()
        assert open_carriers == []

    # Unquoted type and boundary parameters are fine.
    response = post(
        open_node,
        multipart([("application/dicom", part)]),
        content_type=f"multipart/related; type=application/dicom; boundary={BOUNDARY}",
    )
    assert response.status_code == 200
    assert referenced(as_dataset(response)) == [str(ds.SOPInstanceUID)]


def test_identical_and_changed_resend(open_node: RunningNode) -> None:
    datasets = ct_series(SeriesSpec(n=2))
    sops = [str(ds.SOPInstanceUID) for ds in datasets]
    web = client(open_node)
    web.store_instances(datasets)
    again = web.store_instances(datasets)
    assert sorted(referenced(again)) == sorted(sops)
    assert "FailedSOPSequence" not in again
    rows = instances(open_node, *sops)
    assert [r.version for r in rows] == [1, 1]
    assert len(events(open_node, "instance.duplicate", sop_instance_uid=sops[0])) == 1
    assert len(list((open_node.storage / "spool" / rows[0].path).parent.glob("*.dcm"))) == 2

    changed = datasets[0]
    changed.SeriesDescription = "CHANGED ON RESEND"
    response = web.store_instances([changed])
    assert referenced(response) == [sops[0]]
    versions = instances(open_node, sops[0])
    assert [r.version for r in versions] == [1, 2]
    assert versions[1].path.endswith(".v2.dcm")
    assert (
        pydicom.dcmread(open_node.storage / "spool" / versions[1].path).SeriesDescription
        == "CHANGED ON RESEND"
    )
    new_version = events(open_node, "instance.new_version", sop_instance_uid=sops[0])
    assert [e.details["version"] for e in new_version] == [2]


def test_healthz(open_node: RunningNode) -> None:
    response = requests.get(f"http://127.0.0.1:{open_node.dicomweb_port}/healthz", timeout=10)
    assert response.status_code == 200
    facts = response.json()
    assert facts["status"] == "ok"
    assert facts["database"]["reachable"] is True
    assert facts["spool"]["free_bytes"] > 0 and facts["spool"]["accepting"] is True


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{key} not in /proc/{pid}/status")


def test_large_instance_is_streamed_to_disk(open_node: RunningNode) -> None:
    """~150 MB of pixel data, generated on the fly: the server's peak RSS must not grow by the body."""
    spec = SeriesSpec(n=1)
    ds = ct_instance(spec, 0)
    frames = 288
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = frames
    del ds.PixelData
    pixel_bytes = 512 * 512 * 2 * frames
    header = encode(ds) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)
    block = hashlib.shake_256(b"segnode").digest(1024 * 1024)

    def dicom_chunks() -> Iterator[bytes]:
        yield header
        for _ in range(pixel_bytes // len(block)):
            yield block

    digest = hashlib.sha256()
    for chunk in dicom_chunks():
        digest.update(chunk)

    def body() -> Iterator[bytes]:
        yield f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        yield from dicom_chunks()
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    pid = open_node.proc.pid
    client(open_node).store_instances(ct_series(SeriesSpec(n=1)))  # warm every code path first
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    baseline = _status_kb(pid, "VmHWM")
    response = post(open_node, body())
    assert response.status_code == 200, response.text
    peak_growth_mb = (_status_kb(pid, "VmHWM") - baseline) / 1024
    assert peak_growth_mb < 100, (
        f"server RSS grew by {peak_growth_mb:.0f} MB for a {len(header) + pixel_bytes} byte body"
    )

    (row,) = instances(open_node, str(ds.SOPInstanceUID))
    assert row.size == len(header) + pixel_bytes and row.sha256 == digest.hexdigest()
    assert (open_node.storage / "spool" / row.path).stat().st_size == row.size
    assert incoming(open_node) == []


def test_slow_upload_does_not_block_and_a_dropped_one_leaves_nothing(open_node: RunningNode) -> None:
    """While one body is half sent the node answers others; when its client goes away the half part
    is deleted and the request's carrier is closed as aborted."""
    big = encode(ct_instance(SeriesSpec(n=1, size=1024), 0))  # ~2 MB
    half_sent, give_up = threading.Event(), threading.Event()
    outcome: list[BaseException] = []

    def body() -> Iterator[bytes]:
        yield f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        yield big[: len(big) * 3 // 4]
        half_sent.set()
        give_up.wait(timeout=60)
        raise ConnectionAbortedError("client gives up")

    def upload() -> None:
        try:
            post(open_node, body())
        except BaseException as exc:
            outcome.append(exc)

    aborted_before = len([e for e in events(open_node, "association.ended") if e.details["how"] == "aborted"])
    sender = threading.Thread(target=upload)
    sender.start()
    try:
        assert half_sent.wait(timeout=30)
        # The part is already being written under incoming/ ...
        wait_for(lambda: len(incoming(open_node)) == 1, timeout=10, what="the half part in incoming/")
        # ... and the node keeps serving.
        health = requests.get(f"http://127.0.0.1:{open_node.dicomweb_port}/healthz", timeout=10)
        assert health.status_code == 200
        other = ct_series(SeriesSpec(n=1))
        assert referenced(client(open_node).store_instances(other)) == [str(other[0].SOPInstanceUID)]
    finally:
        give_up.set()
        sender.join(timeout=60)
    assert outcome and isinstance(outcome[0], requests.ConnectionError)  # it never got an answer

    def aborted() -> bool:
        ended = [e for e in events(open_node, "association.ended") if e.details["how"] == "aborted"]
        return len(ended) == aborted_before + 1

    wait_for(aborted, timeout=20, what="the dropped request to be recorded as aborted")
    assert incoming(open_node) == []


# -- authentication and limits -----------------------------------------------------------------------
def test_bearer_token(token_node: RunningNode) -> None:
    datasets = ct_series(SeriesSpec(n=2))
    body = multipart([("application/dicom", encode(ds)) for ds in datasets])

    missing = post(token_node, body)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = post(token_node, body, headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 401
    basic = post(token_node, body, headers={"Authorization": f"Basic {TOKEN}"})
    assert basic.status_code == 401
    rejected = http_rejections(token_node, 401)
    assert len(rejected) == 3
    assert {e.details["path"] for e in rejected} == {"/dicomweb/studies"}
    assert {e.details["method"] for e in rejected} == {"POST"}
    assert all(e.details["remote_host"] == "127.0.0.1" for e in rejected)
    assert instances(token_node, *(str(ds.SOPInstanceUID) for ds in datasets)) == []
    with pytest.raises(requests.HTTPError):
        client(token_node).store_instances(datasets)

    response = client(token_node, TOKEN).store_instances(datasets)
    assert sorted(referenced(response)) == sorted(str(ds.SOPInstanceUID) for ds in datasets)
    assert len(instances(token_node, *referenced(response))) == 2
    # /healthz needs no token.
    assert requests.get(f"http://127.0.0.1:{token_node.dicomweb_port}/healthz", timeout=10).status_code == 200


def test_request_over_the_size_limit(token_node: RunningNode) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    ds = ct_instance(SeriesSpec(n=1, size=256), 0)  # ~130 kB, over the 100 kB limit
    body = multipart([("application/dicom", encode(ds))])
    assert len(body) > SMALL_LIMIT
    declared = post(token_node, body, headers=auth)
    assert declared.status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is found while streaming
        for i in range(0, len(body), 16384):
            yield body[i : i + 16384]

    streamed = post(token_node, chunks(), headers=auth)
    assert streamed.status_code == 413
    assert len(http_rejections(token_node, 413)) == 2
    assert instances(token_node, str(ds.SOPInstanceUID)) == []
    assert incoming(token_node) == []


# -- disk full ---------------------------------------------------------------------------------------
def test_disk_full_fails_every_part(full_node: RunningNode) -> None:
    datasets = ct_series(SeriesSpec(n=3))
    sops = [str(ds.SOPInstanceUID) for ds in datasets]
    with pytest.raises(requests.HTTPError) as info:
        client(full_node).store_instances(datasets)
    response = info.value.response
    assert response.status_code == 409
    result = as_dataset(response)
    assert failures(result) == dict.fromkeys(sops, OUT_OF_RESOURCES)
    assert "ReferencedSOPSequence" not in result
    assert instances(full_node, *sops) == []
    assert incoming(full_node) == []
    assert list((full_node.storage / "spool").rglob("*.dcm")) == []
    rejected = events(full_node, "instance.rejected")
    assert sorted(e.sop_instance_uid or "" for e in rejected) == sorted(sops)
    assert {e.details["status"] for e in rejected} == {OUT_OF_RESOURCES}
    ended = events(full_node, "association.ended")
    assert [(e.details["how"], e.details["instances"]) for e in ended] == [("released", 0)]
