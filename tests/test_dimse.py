"""The DIMSE listener with real peers: DCMTK storescu/echoscu and pynetdicom SCUs."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from node.audit.recorder import as_event
from node.db.models import AuditEvent, Instance, Series
from tests.conftest import RunningNode, need_shared, start_node, wait_for
from tests.dimse_peers import associate, echoscu, send_datasets, storescu
from tests.factories import SeriesSpec, ct_instance, ct_series, write_series


def events(node: RunningNode, **where: str) -> list[AuditEvent]:
    with node.sessions()() as s:
        q = select(AuditEvent).order_by(AuditEvent.id)
        for key, value in where.items():
            q = q.where(getattr(AuditEvent, key) == value)
        return list(s.scalars(q).all())


def types(rows: list[AuditEvent]) -> list[str]:
    """Event types of the receive path (routing events come from the router, at their own pace)."""
    return [r.event_type for r in rows if not r.event_type.startswith(("route.", "job."))]


def instance_rows(node: RunningNode, sop: str | None = None) -> list[Instance]:
    with node.sessions()() as s:
        q = select(Instance).order_by(Instance.id)
        if sop:
            q = q.where(Instance.sop_instance_uid == sop)
        return list(s.scalars(q).all())


def series_row(node: RunningNode, uid: str) -> Series | None:
    with node.sessions()() as s:
        return s.scalar(select(Series).where(Series.series_uid == uid))  # session closed on return


def test_echo_and_store_series_with_storescu(node: RunningNode, tmp_path: Path) -> None:
    assert echoscu(node) == 0
    spec = SeriesSpec(n=12)
    paths = write_series(ct_series(spec), tmp_path / "in")
    proc = storescu(node, paths)
    assert proc.returncode == 0, proc.stderr

    rows = instance_rows(node)
    assert len(rows) == 12
    by_sop = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}
    assert sorted(by_sop) == sorted(r.sop_instance_uid for r in rows)
    for row in rows:
        path = by_sop[row.sop_instance_uid]
        stored = node.storage / "spool" / row.path
        assert stored.exists()
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == row.sha256
        assert row.calling_ae == "TESTSCU"
        assert row.transfer_syntax in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
        # what we stored is what was sent (the data set, under a fresh file meta)
        assert pydicom.dcmread(stored).PixelData == pydicom.dcmread(path).PixelData
    wait_for(lambda: (s := series_row(node, spec.series_uid)) and s.state == "complete", what="completion")
    trail = events(node, study_uid=spec.study_uid)
    # the router runs as soon as the series completes: its events may already follow
    head, rest = types(trail)[:13], types(trail)[13:]
    assert head == ["instance.stored"] * 12 + ["series.completed"]
    assert all(kind.startswith(("route.", "job.")) for kind in rest), rest
    completed = as_event(next(e for e in trail if e.event_type == "series.completed"))
    assert completed.details()["reason"] == "quiet"
    assert completed.details()["instance_count"] == 12
    carriers = [e for e in events(node) if e.event_type.startswith("association.")]
    assert types(carriers)[-2:] == ["association.accepted", "association.ended"]
    assert carriers[-1].details["how"] == "released" and carriers[-1].details["instances"] == 12

    listing = node.cli("studies", "list", "--json")
    assert spec.series_uid in listing.stdout
    trail_cli = node.cli("audit", spec.study_uid)
    assert "series.completed" in trail_cli.stdout


def test_wrong_called_ae_is_rejected_and_audited(node: RunningNode, tmp_path: Path) -> None:
    paths = write_series(ct_series(SeriesSpec(n=1)), tmp_path / "in")
    proc = storescu(node, paths, called="NOT_US")
    assert proc.returncode != 0
    assert "Called AE Title Not Recognized" in proc.stdout + proc.stderr
    rejected = [e for e in events(node) if e.event_type == "association.rejected"]
    assert len(rejected) == 1
    assert rejected[0].details["reason"] == 7 and rejected[0].details["result"] == 1
    assert rejected[0].details["called_ae"] == "NOT_US"
    assert instance_rows(node) == []
    assert echoscu(node) == 0  # still serving


def test_calling_ae_allowlist(tmp_path: Path) -> None:
    running = start_node(tmp_path / "st", extra_env={"SEGNODE_DIMSE__ALLOWED_CALLING_AETS": '["GOODPACS"]'})
    try:
        assert "allowed_calling_aets is empty" not in running.log()
        paths = write_series(ct_series(SeriesSpec(n=2)), tmp_path / "in")
        bad = storescu(running, paths, calling="INTRUDER")
        assert bad.returncode != 0
        assert "Calling AE Title Not Recognized" in bad.stdout + bad.stderr
        good = storescu(running, paths, calling="GOODPACS")
        assert good.returncode == 0, good.stderr
        rejected = [e for e in events(running) if e.event_type == "association.rejected"]
        assert [(e.details["calling_ae"], e.details["reason"]) for e in rejected] == [("INTRUDER", 3)]
        assert len(instance_rows(running)) == 2
    finally:
        assert running.stop() == 0


def test_empty_allowlist_is_logged_as_warning(node: RunningNode) -> None:
    assert "allowed_calling_aets is empty" in node.log()


def test_duplicate_identical_and_changed_resend(node: RunningNode, tmp_path: Path) -> None:
    spec = SeriesSpec(n=3)
    datasets = ct_series(spec)
    assert send_datasets(node, datasets) == [0, 0, 0]
    wait_for(lambda: (s := series_row(node, spec.series_uid)) and s.state == "complete", what="completion")
    # identical bytes: acknowledged, no second copy
    assert send_datasets(node, [datasets[0]]) == [0]
    assert len(instance_rows(node, datasets[0].SOPInstanceUID)) == 1
    # different bytes, same SOP Instance UID: kept as a new version
    changed = datasets[1]
    changed.SeriesDescription = "CHANGED"
    assert send_datasets(node, [changed]) == [0]
    versions = instance_rows(node, changed.SOPInstanceUID)
    assert [v.version for v in versions] == [1, 2]
    assert versions[1].path.endswith(".v2.dcm")
    for v in versions:
        assert (node.storage / "spool" / v.path).exists()
    # the series re-opened (superseded) and completes again as generation 2
    wait_for(
        lambda: (s := series_row(node, spec.series_uid)) and s.state == "complete" and s.generation == 2,
        what="second completion",
    )
    # routing events (the router runs as soon as a series completes) interleave; this is about ingest
    trail = [t for t in types(events(node, study_uid=spec.study_uid)) if not t.startswith(("route.", "job."))]
    assert trail == [
        "instance.stored",
        "instance.stored",
        "instance.stored",
        "series.completed",
        "instance.duplicate",
        "series.reopened",
        "instance.new_version",
        "series.completed",
    ]
    row = series_row(node, spec.series_uid)
    assert row is not None and row.instance_count == 3


def _raw_file(path: Path, dataset_bytes: bytes, sop_uid: str) -> Path:
    """A Part 10 file with a valid file meta and arbitrary data set bytes."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with open(path, "wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fh, meta, enforce_standard=True)  # type: ignore[arg-type]
        fh.write(dataset_bytes)
    return path


def test_bad_datasets_get_failure_status_and_node_keeps_serving(
    node: RunningNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pynetdicom import _config

    # send files byte for byte, as a misbehaving modality would, instead of re-encoding them
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    spec = SeriesSpec(n=2)
    good = ct_series(spec)
    missing_series = ct_instance(SeriesSpec(n=1), 0)
    del missing_series.SeriesInstanceUID
    missing_path = tmp_path / "missing.dcm"
    missing_series.save_as(missing_path, enforce_file_format=True)
    garbage_uid = generate_uid()
    # a tag claiming a 4 GB-ish length: the data set cannot be parsed
    garbage = _raw_file(tmp_path / "garbage.dcm", b"\x08\x00\x16\x00UI\xf0\xff" + b"\x01" * 64, garbage_uid)
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    mismatch = ct_instance(SeriesSpec(n=1), 0)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, mismatch)
    # the file meta (and so the C-STORE request) names another SOP Instance UID than the data set
    mismatch_path = _raw_file(tmp_path / "mismatch.dcm", body.getvalue(), generate_uid())

    statuses = send_datasets(node, [good[0], garbage, missing_path, mismatch_path, good[1]])
    assert statuses[0] == 0 and statuses[4] == 0
    assert statuses[1] == 0xC000
    assert statuses[2] == 0xA900
    assert statuses[3] == 0xA900
    rejected = [e for e in events(node) if e.event_type == "instance.rejected"]
    assert len(rejected) == 3
    reasons = [r.details["reason"] for r in rejected]
    assert "cannot parse" in reasons[0]
    assert "SeriesInstanceUID" in reasons[1]
    assert "differs from" in reasons[2]
    assert rejected[0].sop_instance_uid == garbage_uid
    assert len(instance_rows(node)) == 2
    assert list((node.storage / "incoming").iterdir()) == []
    assert echoscu(node) == 0


def test_uids_that_are_not_uids_cannot_escape_the_spool(node: RunningNode) -> None:
    spec = SeriesSpec(n=1, study_uid="../../../../etc", series_uid="..")
    ds = ct_instance(spec, 0)
    ds.SOPInstanceUID = "/tmp/evil"
    ds.file_meta.MediaStorageSOPInstanceUID = "/tmp/evil"
    assert send_datasets(node, [ds]) == [0]
    (row,) = instance_rows(node)
    stored = (node.storage / "spool" / row.path).resolve()
    assert stored.is_relative_to((node.storage / "spool").resolve())
    assert ".." not in row.path and "evil" not in row.path
    assert not Path("/tmp/evil").exists()


def test_ten_simultaneous_associations_lose_and_duplicate_nothing(node: RunningNode) -> None:
    shared = ct_series(SeriesSpec(n=5))  # every association also sends these same five
    per_assoc = [ct_series(SeriesSpec(n=8)) for _ in range(10)]
    results: dict[int, list[int]] = {}

    def worker(i: int) -> None:
        results[i] = send_datasets(node, per_assoc[i] + shared, calling=f"SCU{i}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == list(range(10))
    assert all(st == [0] * 13 for st in results.values()), results
    rows = instance_rows(node)
    assert len(rows) == 10 * 8 + 5
    assert len({r.sop_instance_uid for r in rows}) == len(rows)
    files = [p for p in (node.storage / "spool").rglob("*.dcm")]
    assert len(files) == len(rows)
    dup = [e for e in events(node) if e.event_type == "instance.duplicate"]
    assert len(dup) == 9 * 5
    with node.sessions()() as s:
        counts = {uid: n for uid, n in s.execute(select(Series.series_uid, Series.instance_count)).all()}
        assert s.scalar(select(func.count()).select_from(Instance)) == 85
    assert counts[shared[0].SeriesInstanceUID] == 5
    assert sum(counts.values()) == 85


CODEC_FILES = [
    ("dicom/dcm_qa_ts/In", "*.dcm"),
    ("dicom/pylibjpeg_data_ctmr", "*/*.dcm"),
    ("dicom/pydicom_data_subset", "*.dcm"),
]


def test_real_files_in_every_accepted_transfer_syntax(node: RunningNode) -> None:
    files: list[Path] = []
    for folder, pattern in CODEC_FILES:
        files += sorted(need_shared(*folder.split("/")).glob(pattern))
    sent: dict[str, str] = {}
    for path in files:
        meta = pydicom.dcmread(path, stop_before_pixels=True)
        if "SOPInstanceUID" not in meta or "SeriesInstanceUID" not in meta:
            continue
        sent[str(meta.SOPInstanceUID)] = str(meta.file_meta.TransferSyntaxUID)
    from tests.dimse_peers import scu_ae

    syntaxes = sorted(set(sent.values()))
    ae = scu_ae("CODECSCU", transfer_syntaxes=syntaxes)
    # propose each SOP class once per transfer syntax so that every file goes out as it is encoded
    ae.requested_contexts = []
    classes = sorted({str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in files})
    for cls in classes:
        for ts in syntaxes:
            if len(ae.requested_contexts) < 128:
                ae.add_requested_context(cls, [ts])
    assoc = associate(ae, node.dimse_port, ae_title=node.ae_title)
    assert assoc.is_established
    statuses = {}
    try:
        for path in files:
            rsp = assoc.send_c_store(path)
            statuses[path.name] = int(rsp.Status)
    finally:
        assoc.release()
    assert all(v == 0 for v in statuses.values()), statuses
    stored = {r.sop_instance_uid: r.transfer_syntax for r in instance_rows(node)}
    for sop, ts in sent.items():
        assert stored.get(sop) == ts, (sop, ts)
    assert len(syntaxes) >= 9  # uncompressed LE/BE, deflate, RLE, JPEG lossless, JPEG-LS, J2K...


def test_sigterm_finishes_inflight_association_then_exits_zero(tmp_path: Path) -> None:
    running = start_node(tmp_path / "st")
    spec = SeriesSpec(n=150, size=128)
    paths = write_series(ct_series(spec), tmp_path / "in")
    import subprocess

    from tests.conftest import dcmtk_env, need_tool

    proc = subprocess.Popen(
        [
            need_tool("storescu"),
            "-aet",
            "LONGSCU",
            "-aec",
            running.ae_title,
            "127.0.0.1",
            str(running.dimse_port),
            *map(str, paths),
        ],
        env=dcmtk_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for(lambda: len(instance_rows(running)) >= 5, what="the transfer to be under way")
    import signal

    running.proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert running.proc.wait(timeout=60) == 0
    assert len(instance_rows(running)) == 150
    trail = types(events(running))
    assert trail[-1] == "node.stopped"
    assert "segnode: stopped" in running.log()
