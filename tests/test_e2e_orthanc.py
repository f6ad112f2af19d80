"""The whole loop with a real Orthanc (Debian's orthanc + orthanc-dicomweb) in a private network namespace.

A real CT series (TotalSegmentator example, UIDs regenerated in a temporary copy) and a real cine MR series
(Sunnybrook, as it is) go into Orthanc with DCMTK ``storescu``; orthanc/route_to_segnode.lua forwards each
stable series to ``segnode serve`` by C-STORE; segnode completes the series, its rules create a job, the
executor runs the pipeline and the dispatcher sends the DICOM-SEG and SR back into Orthanc, by C-STORE
('sender') or STOW-RS (/dicom-web). The results are read back with QIDO-RS / WADO-RS (dicomweb-client) and
compared with what segnode wrote; the script records that it did not forward them back.

Faults: Orthanc down while results are pending (short dispatch backoff here), segnode killed with SIGKILL
during inference, a series the volume gate refuses. One module-scoped Orthanc serves all tests; CPU
inference of ct-liver makes the two CT flows (marked slow) take minutes each.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, generate_uid
from sqlalchemy import select

from tests.conftest import RunningNode, need_shared, need_tool, wait_for
from tests.orthanc_support import Orthanc, OrthancSite, storescu

CT_DICOM = ("liver", "totalsegmentator_example", "example_ct_dicom")
SUNNYBROOK = ("cardiac", "sunnybrook", "SCD0000101", "dicom")

# -- data -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    study_uid: str
    series_uid: str
    files: tuple[Path, ...]


def ct_study(folder: Path, *, patient: str, drop: Sequence[int] = (), tilt: Sequence[int] = ()) -> Study:
    """The real 20-slice CT with consistent, fresh UIDs (its own are empty) in ``folder``.

    ``drop``: indexes (by position, head to feet) of slices left out; ``tilt``: slices whose
    orientation is rotated 10 degrees about the patient's left-right axis (a mixed-orientation series).
    """
    source = need_shared(*CT_DICOM)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    datasets = [pydicom.dcmread(p) for p in sorted(source.iterdir())]
    datasets.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    files: list[Path] = []
    for index, ds in enumerate(datasets):
        if index in drop:
            continue
        sop_uid = generate_uid()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.PatientID = patient
        ds.PatientName = f"E2E^{patient}"
        ds.StudyID = "E2E"
        ds.SeriesNumber = 3
        ds.AccessionNumber = patient[:16]
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        if index in tilt:
            angle = np.deg2rad(10.0)
            ds.ImageOrientationPatient = [1, 0, 0, 0, float(np.cos(angle)), float(np.sin(angle))]
        path = folder / f"ct-{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return Study(study_uid, series_uid, tuple(files))


def mr_study() -> Study:
    """The Sunnybrook cine SAX series as it is (its invalid UIDs included): 240 images, 20 phases."""
    source = need_shared(*SUNNYBROOK)
    files = tuple(sorted(source.iterdir(), key=lambda p: int(p.stem)))
    with warnings.catch_warnings():  # its UIDs have leading-zero components, on purpose
        warnings.simplefilter("ignore", UserWarning)
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        return Study(str(first.StudyInstanceUID), str(first.SeriesInstanceUID), files)


# -- helpers ----------------------------------------------------------------------------------------


def send_to_orthanc(site: OrthancSite, files: Sequence[Path], calling: str = "MODALITY") -> None:
    done = storescu(site.netns, files, port=site.orthanc.dicom_port, calling=calling)
    assert done.returncode == 0, f"storescu failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"


def wait_routed(orthanc: Orthanc, series_uid: str, timeout: float = 120) -> str:
    decision = wait_for(
        lambda: orthanc.routing_decision(series_uid),
        timeout=timeout,
        interval=0.2,
        what=f"route_to_segnode.lua to decide on series {series_uid}",
    )
    return str(decision)


def wait_forwarded(orthanc: Orthanc, series_uid: str, timeout: float = 300) -> dict[str, Any]:
    decision = wait_routed(orthanc, series_uid)
    assert decision.startswith("forwarded job="), decision
    job_id = decision.split("=", 1)[1].split()[0]

    def _finished() -> dict[str, Any] | None:
        job = orthanc.job(job_id)
        return job if job["State"] in ("Success", "Failure") else None

    job = wait_for(_finished, timeout=timeout, interval=0.2, what=f"Orthanc job {job_id} to finish")
    assert job["State"] == "Success", f"{job}\n{orthanc.log()[-4000:]}"
    return dict(job)


def audit(node: RunningNode, study_uid: str) -> list[dict[str, Any]]:
    done = node.cli("audit", study_uid, "--json", check=False)
    if done.returncode != 0:
        return []
    return list(json.loads(done.stdout))


def jobs_of(node: RunningNode, study_uid: str) -> list[Any]:
    from node.db.models import Job

    with node.sessions()() as s:
        return list(s.scalars(select(Job).where(Job.study_uid == study_uid).order_by(Job.id)).all())


def series_of(node: RunningNode, series_uid: str) -> Any:
    from node.db.models import Series

    with node.sessions()() as s:
        return s.scalar(select(Series).where(Series.series_uid == series_uid))


def in_order(events: Sequence[str], expected: Sequence[str]) -> bool:
    """``expected`` occurs in ``events`` as a subsequence (other events may come in between)."""
    position = 0
    for name in events:
        if position < len(expected) and name == expected[position]:
            position += 1
    return position == len(expected)


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture
def segnode(orthanc_site: OrthancSite, tmp_path: Path) -> Iterator[RunningNode]:
    """segnode that receives, routes and creates jobs, without running them (no executor)."""
    running = orthanc_site.start_segnode(tmp_path / "store", {"SEGNODE_EXECUTOR__ENABLED": "false"})
    yield running
    running.stop()


# -- tests ------------------------------------------------------------------------------------------


def test_orthanc_runs_isolated_with_the_dicomweb_plugin(orthanc_site: OrthancSite) -> None:
    orthanc = orthanc_site.orthanc
    system = orthanc.get_json("/system")
    assert system["DicomAet"] == "ORTHANC"
    assert "dicom-web" in orthanc.get_json("/plugins")
    # Orthanc binds 0.0.0.0, but inside a namespace whose only interface is lo.
    assert orthanc.proc is not None
    own = os.readlink("/proc/self/ns/net")
    assert os.readlink(f"/proc/{orthanc.proc.pid}/ns/net") == orthanc_site.netns.namespace_id() != own
    links = subprocess.run(
        orthanc_site.netns.wrap(["ip", "-o", "link"]), capture_output=True, text=True, check=True
    ).stdout
    assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]


def test_ct_series_goes_through_orthanc_to_a_segnode_job(
    orthanc_site: OrthancSite, segnode: RunningNode, tmp_path: Path
) -> None:
    need_tool("storescu")
    study = ct_study(tmp_path / "ct", patient="E2E-CT-ROUTE")
    send_to_orthanc(orthanc_site, study.files)
    job = wait_forwarded(orthanc_site.orthanc, study.series_uid)
    assert job["Content"]["InstancesCount"] == len(study.files)

    created = wait_for(lambda: jobs_of(segnode, study.study_uid), timeout=60, what="segnode's job")
    assert [(j.rule_name, j.pipeline, j.series_uids) for j in created] == [
        ("ct-liver", "ct-liver", [study.series_uid])
    ]
    assert created[0].sender_ae == "ORTHANC"
    series = series_of(segnode, study.series_uid)
    assert series.instance_count == len(study.files) and series.state == "complete"

    events = [e["event"] for e in audit(segnode, study.study_uid)]
    assert events.count("instance.stored") == len(study.files)
    assert in_order(events, ["instance.stored", "series.completed", "job.created"])


def test_segnode_results_written_back_are_not_forwarded(
    orthanc_site: OrthancSite, segnode: RunningNode, tmp_path: Path
) -> None:
    """A SEG and an SR as segnode writes them, stored into Orthanc by C-STORE from segnode's AE and by
    STOW-RS: the script records 'skipped' for both series and segnode never receives them."""
    need_tool("storescu")
    study = ct_study(tmp_path / "ct", patient="E2E-CT-BOUNCE")
    seg, sr = segnode_results(study, tmp_path / "results")
    # DIMSE, calling AE = segnode's (as node/dispatch sends them)
    send_to_orthanc(orthanc_site, [seg], calling=segnode.ae_title)
    # STOW-RS, as a dicomweb destination does
    orthanc_site.netns.call(lambda: orthanc_site.orthanc.dicomweb().store_instances([pydicom.dcmread(sr)]))

    for path in (seg, sr):
        series_uid = str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
        decision = wait_routed(orthanc_site.orthanc, series_uid)
        assert decision.startswith("skipped: segnode's own result (Manufacturer segnode)"), decision
    # Whatever segnode's AE title stores is never sent back to it, whoever made it.
    other = ct_study(tmp_path / "other", patient="E2E-CT-BY-AE")
    send_to_orthanc(orthanc_site, other.files[:3], calling=segnode.ae_title)
    decision = wait_routed(orthanc_site.orthanc, other.series_uid)
    assert decision == f"skipped: segnode's own result (sent by AE {segnode.ae_title})", decision
    # The forwarded CT is the positive control: same Orthanc, same script, same segnode.
    send_to_orthanc(orthanc_site, study.files)
    wait_forwarded(orthanc_site.orthanc, study.series_uid)
    wait_for(lambda: jobs_of(segnode, study.study_uid), timeout=60, what="the CT's job")

    from node.db.models import Instance

    with segnode.sessions()() as s:
        classes = set(s.scalars(select(Instance.sop_class_uid)).all())
    assert classes == {CTImageStorage}


def segnode_results(study: Study, folder: Path) -> tuple[Path, Path]:
    """A DICOM-SEG and a TID 1500 SR over ``study`` written by segnode's own writers (pipelines/outputs)."""
    from pipelines.outputs import (
        LIVER,
        Algorithm,
        OutputIdentity,
        SegmentMeasurement,
        write_measurement_report,
        write_seg,
    )

    folder.mkdir(parents=True, exist_ok=True)
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in study.files]
    masks = np.zeros((1, len(sources), int(sources[0].Rows), int(sources[0].Columns)), bool)
    masks[0, 5:12, 200:300, 150:260] = True
    identity = OutputIdentity(study.series_uid, "ct-liver", "e2e", "1")
    algorithm = Algorithm(name="e2e", version="1")
    seg = write_seg(
        sources, masks, [LIVER], algorithm=algorithm, identity=identity, out_path=folder / "seg.dcm"
    )
    sr = write_measurement_report(
        seg.path,
        sources,
        [SegmentMeasurement(segment_number=1, volume_ml=float(masks.sum()) * 0.001)],
        algorithm=algorithm,
        identity=identity,
        out_path=folder / "sr.dcm",
    )
    return seg.path, sr.path


def test_cine_mr_series_goes_through_orthanc_to_a_segnode_job(
    orthanc_site: OrthancSite, segnode: RunningNode
) -> None:
    """Sunnybrook as it is (UIDs with leading zeros, invalid dates) through Orthanc: one cine series of
    240 images (20 phases) arrives complete and the mri-cardiac rule makes one job of it."""
    need_tool("storescu")
    study = mr_study()
    orthanc_site.orthanc.forget_series(study.series_uid)
    send_to_orthanc(orthanc_site, study.files)
    job = wait_forwarded(orthanc_site.orthanc, study.series_uid)
    assert job["Content"]["InstancesCount"] == len(study.files) == 240

    created = wait_for(lambda: jobs_of(segnode, study.study_uid), timeout=120, what="segnode's job")
    assert [(j.rule_name, j.pipeline, j.series_uids, j.sender_ae) for j in created] == [
        ("mri-cardiac", "mri-cardiac", [study.series_uid], "ORTHANC")
    ]
    events = [e["event"] for e in audit(segnode, study.study_uid)]
    assert events.count("instance.stored") == 240
    assert in_order(events, ["instance.stored", "series.completed", "job.created"])


def test_production_example_config_needs_users_and_known_peers(
    orthanc_site: OrthancSite, tmp_path: Path
) -> None:
    """orthanc-production.json (ports, folders and passwords replaced): anonymous requests and wrong
    passwords are refused, segnode's user can STOW a result (which is not forwarded: own output), and a
    DICOM peer that is not registered cannot store."""
    import urllib.error

    from tests.orthanc_support import production_config

    need_tool("storescu")
    netns = orthanc_site.netns
    users = {"admin": "admin-e2e", "segnode": "stow-e2e"}
    config = production_config(
        storage=tmp_path / "orthanc",
        http_port=netns.free_port(),
        dicom_port=netns.free_port(),
        users=users,
    )
    orthanc = Orthanc(netns, tmp_path / "orthanc", config, auth=("admin", users["admin"]))
    orthanc.start()
    try:
        assert orthanc.get_json("/system")["DicomAet"] == "ORTHANC"
        with pytest.raises(urllib.error.HTTPError) as refused:
            orthanc.request("GET", "/system", auth=None)
        assert refused.value.code == 401
        with pytest.raises(urllib.error.HTTPError) as wrong:
            orthanc.request("GET", "/system", auth=("segnode", "wrong"))
        assert wrong.value.code == 401

        study = ct_study(tmp_path / "ct", patient="E2E-PROD")
        seg, _sr = segnode_results(study, tmp_path / "results")
        client = orthanc.dicomweb(auth=("segnode", users["segnode"]))
        netns.call(lambda: client.store_instances([pydicom.dcmread(seg)]))
        seg_series = str(pydicom.dcmread(seg, stop_before_pixels=True).SeriesInstanceUID)
        assert wait_routed(orthanc, seg_series).startswith("skipped: segnode's own result")
        found = netns.call(lambda: client.search_for_series(search_filters={"SeriesInstanceUID": seg_series}))
        assert len(found) == 1

        stranger = storescu(netns, study.files[:1], port=orthanc.dicom_port, calling="STRANGER")
        assert stranger.returncode != 0
        assert orthanc.series_id(study.series_uid) is None
    finally:
        orthanc.stop()


# -- the whole loop: inference and delivery back into Orthanc --------------------------------------------

OPEN_STATES = ("queued", "running", "written", "dispatching")
# Short retries so that "Orthanc down for minutes" takes seconds here.
FLOW_ENV = {
    "SEGNODE_EXECUTOR__WORKERS": "1",
    "SEGNODE_EXECUTOR__HEARTBEAT_SECONDS": "1",
    "SEGNODE_DISPATCH__POLL_SECONDS": "0.2",
    "SEGNODE_DISPATCH__BACKOFF_BASE_SECONDS": "0.5",
    "SEGNODE_DISPATCH__BACKOFF_MAX_SECONDS": "2",
    "SEGNODE_DISPATCH__MAX_ATTEMPTS": "1000",
    "SEGNODE_DISPATCH__BREAKER_COOLDOWN_SECONDS": "1",
    "SEGNODE_DISPATCH__CONNECT_TIMEOUT_SECONDS": "5",
}
INFERENCE_TIMEOUT = 1800.0  # CPU inference shares two cores with everything else on a CI runner


def link_ct_models(storage: Path) -> None:
    """The real ``segnode models install ct-liver`` (once per test session, tests/liver_support.py),
    made visible under this node's storage."""
    from tests.liver_support import installed

    models = installed().storage.models
    storage.mkdir(parents=True, exist_ok=True)
    (storage / "models").symlink_to(models, target_is_directory=True)


def job_row(node: RunningNode, job_uid: str) -> Any:
    from node.db.models import Job

    with node.sessions()() as s:
        return s.scalar(select(Job).where(Job.uid == job_uid))


def results_of(node: RunningNode, job_uid: str) -> list[Any]:
    from node.db.models import Job, JobResult

    with node.sessions()() as s:
        return list(
            s.scalars(select(JobResult).join(Job, Job.id == JobResult.job_id).where(Job.uid == job_uid)).all()
        )


def wait_job(node: RunningNode, study_uid: str, states: Sequence[str], timeout: float) -> Any:
    def _in_state() -> Any:
        jobs = [j for j in jobs_of(node, study_uid) if j.state != "superseded"]
        if jobs and jobs[-1].state == "failed" and "failed" not in states:
            raise AssertionError(f"job failed: {jobs[-1].error}\n{node.log()[-4000:]}")
        return jobs[-1] if jobs and jobs[-1].state in states else None

    return wait_for(_in_state, timeout=timeout, interval=0.5, what=f"a job of {study_uid} in {states}")


def edit_rule(node: RunningNode, name: str, folder: Path, **changes: Any) -> None:
    import yaml

    from node.route.store import default_rule_texts

    text = dict(default_rule_texts())[f"{name}.yaml"]
    rule = yaml.safe_load(text)
    rule.update(changes)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(rule), encoding="utf-8")
    node.cli("rules", "edit", name, str(path))


def orthanc_results(site: OrthancSite, study_uid: str) -> dict[str, list[dict[str, Any]]]:
    """QIDO-RS: every instance of the study in Orthanc, by modality."""
    client = site.orthanc.dicomweb()
    found = site.netns.call(lambda: client.search_for_instances(study_instance_uid=study_uid))
    by_modality: dict[str, list[dict[str, Any]]] = {}
    for item in found:
        modality = item.get("00080060", {}).get("Value", [""])[0]
        by_modality.setdefault(modality, []).append(item)
    return by_modality


def uid_of(item: dict[str, Any], tag: str) -> str:
    return str(item[tag]["Value"][0])


def retrieve(site: OrthancSite, item: dict[str, Any]) -> Any:
    """WADO-RS: the instance as stored in Orthanc."""
    client = site.orthanc.dicomweb()
    return site.netns.call(
        lambda: client.retrieve_instance(
            study_instance_uid=uid_of(item, "0020000D"),
            series_instance_uid=uid_of(item, "0020000E"),
            sop_instance_uid=uid_of(item, "00080018"),
        )
    )


def check_results_in_orthanc(
    site: OrthancSite, node: RunningNode, study: Study, job_uid: str, segments: set[str] | None = None
) -> None:
    """Every result the job wrote is in Orthanc exactly once (QIDO-RS), filed in the source study, equal
    to the file segnode wrote (WADO-RS), referencing the source series; none was forwarded back."""
    written = results_of(node, job_uid)
    kinds = sorted(r.kind for r in written)
    assert "seg" in kinds, kinds
    in_orthanc = orthanc_results(site, study.study_uid)
    assert len(in_orthanc.get(pydicom.dcmread(study.files[0], stop_before_pixels=True).Modality, [])) == len(
        study.files
    )
    assert len(in_orthanc.get("SEG", [])) == kinds.count("seg"), in_orthanc.keys()
    assert len(in_orthanc.get("SR", [])) == kinds.count("sr"), in_orthanc.keys()
    expected = {r.sop_instance_uid: r for r in written}
    stored = {uid_of(i, "00080018"): i for m in ("SEG", "SR") for i in in_orthanc.get(m, [])}
    assert set(stored) == set(expected)

    for uid, result in expected.items():
        got = retrieve(site, stored[uid])
        mine = pydicom.dcmread(node.storage / result.path)
        assert got.Manufacturer == mine.Manufacturer == "segnode"
        assert got.StudyInstanceUID == study.study_uid
        assert got.SeriesInstanceUID == result.series_instance_uid
        if result.kind == "seg":
            assert got.ReferencedSeriesSequence[0].SeriesInstanceUID == study.series_uid
            assert got.PixelData == mine.PixelData
            labels = {s.SegmentLabel for s in got.SegmentSequence}
            assert labels == {s.SegmentLabel for s in mine.SegmentSequence}
            if segments is not None:
                assert labels == segments
        else:
            assert len(got.ContentSequence) == len(mine.ContentSequence)
        decision = wait_routed(site.orthanc, result.series_instance_uid)
        assert decision.startswith("skipped: segnode's own result"), decision

    from node.db.models import Instance

    with node.sessions()() as s:
        received = set(s.scalars(select(Instance.sop_instance_uid)).all())
    assert not (received & set(expected)), "a result came back to segnode"


def check_delivered_once(node: RunningNode, study: Study, job_uid: str, destination: str) -> None:
    """One successful delivery to ``destination`` with every result instance accepted (status 0)."""
    succeeded = [e["details"] for e in audit(node, study.study_uid) if e["event"] == "delivery.succeeded"]
    assert len(succeeded) == 1, succeeded
    assert succeeded[0]["job_uid"] == job_uid and succeeded[0]["destination"] == destination
    assert succeeded[0]["statuses"] == {r.sop_instance_uid: 0 for r in results_of(node, job_uid)}


def worker_cpu_seconds(parent_pid: int) -> float:
    """CPU time used so far by the child processes of ``parent_pid`` (the executor's workers)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent_pid:  # fields: state, ppid, ..., utime (12), stime (13)
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def event_names(node: RunningNode, study_uid: str) -> list[str]:
    return [e["event"] for e in audit(node, study_uid)]


@pytest.mark.slow
def test_ct_through_orthanc_back_by_cstore_survives_an_orthanc_outage(
    orthanc_site: OrthancSite, tmp_path: Path
) -> None:
    """The real CT: Orthanc -> Lua -> segnode -> ct-liver -> SEG + SR by C-STORE to 'sender' (Orthanc).
    Orthanc is stopped while the job runs and restarted later: the results are delivered once."""
    need_tool("storescu")
    storage = tmp_path / "store"
    link_ct_models(storage)
    node = orthanc_site.start_segnode(storage, extra_env=FLOW_ENV)
    orthanc = orthanc_site.orthanc
    try:
        study = ct_study(tmp_path / "ct", patient="E2E-CT-CSTORE")
        send_to_orthanc(orthanc_site, study.files)
        wait_forwarded(orthanc, study.series_uid)
        job = wait_job(node, study.study_uid, ("running", "written", "dispatching", "done"), timeout=120)
        assert job.destinations == ["sender"] and job.sender_ae == "ORTHANC"

        orthanc.stop()  # results are pending: the job is running
        wait_for(
            lambda: event_names(node, study.study_uid).count("delivery.retry_scheduled") >= 2,
            timeout=INFERENCE_TIMEOUT,
            interval=1,
            what="two failed deliveries while Orthanc is down",
        )
        assert job_row(node, job.uid).state in ("written", "dispatching")
        orthanc.start()
        done = wait_job(node, study.study_uid, ("done",), timeout=180)

        check_results_in_orthanc(orthanc_site, node, study, done.uid, {"Liver", "Liver lesion"})
        events = event_names(node, study.study_uid)
        assert in_order(
            events,
            ["instance.stored", "series.completed", "job.created", "job.running", "job.written",
             "job.dispatching", "delivery.retry_scheduled", "delivery.succeeded", "job.done"],
        )  # fmt: skip
        assert events.count("job.running") == 1
        check_delivered_once(node, study, done.uid, "sender")
    finally:
        if not orthanc.running:
            orthanc.start()
        node.stop()


@pytest.mark.slow
def test_ct_through_orthanc_back_by_stow_exactly_once_after_sigkill_in_inference(
    orthanc_site: OrthancSite, tmp_path: Path
) -> None:
    """The real CT with the ct-liver rule sending to Orthanc's /dicom-web (STOW-RS, liver only). segnode is
    killed with SIGKILL while the job runs and started again: the job runs again from the queue and its
    results are in Orthanc exactly once."""
    import signal

    need_tool("storescu")
    storage = tmp_path / "store"
    link_ct_models(storage)
    node = orthanc_site.start_segnode(storage, extra_env=FLOW_ENV)
    try:
        edit_rule(node, "ct-liver", tmp_path, destinations=["orthanc-web"], pipeline={
            "name": "ct-liver", "parameters": {"lesions": False}})  # fmt: skip
        study = ct_study(tmp_path / "ct", patient="E2E-CT-STOW")
        send_to_orthanc(orthanc_site, study.files)
        wait_forwarded(orthanc_site.orthanc, study.series_uid)
        job = wait_job(node, study.study_uid, ("running",), timeout=120)
        assert job.destinations == ["orthanc-web"]
        # in inference: the worker process has computed for a while (loading takes a few CPU seconds)
        wait_for(
            lambda: worker_cpu_seconds(node.proc.pid) >= 15,
            timeout=INFERENCE_TIMEOUT,
            interval=0.5,
            what="the worker to be well into inference",
        )
        assert job_row(node, job.uid).state == "running"
        node.stop(signal.SIGKILL)
        assert job_row(node, job.uid).state == "running"
        assert not orthanc_results(orthanc_site, study.study_uid).get("SEG")

        node = orthanc_site.start_segnode(storage, extra_env=FLOW_ENV)
        done = wait_job(node, study.study_uid, ("done",), timeout=INFERENCE_TIMEOUT)
        assert done.uid == job.uid and done.attempts == 2
        check_results_in_orthanc(orthanc_site, node, study, done.uid, {"Liver"})
        events = event_names(node, study.study_uid)
        assert events.count("job.running") == 2
        assert in_order(events, ["job.created", "job.running", "job.queued", "job.running", "job.written",
                                 "job.dispatching", "delivery.succeeded", "job.done"])  # fmt: skip
        check_delivered_once(node, study, done.uid, "orthanc-web")
    finally:
        node.stop()


def test_series_failing_validation_is_audited_with_no_output(
    orthanc_site: OrthancSite, tmp_path: Path
) -> None:
    """A CT whose slices do not share one orientation: the job fails with the volume gate's reason, no
    result is written or sent, nothing stays open, and the node goes on working."""
    need_tool("storescu")
    storage = tmp_path / "store"
    link_ct_models(storage)
    node = orthanc_site.start_segnode(storage, extra_env=FLOW_ENV)
    try:
        study = ct_study(tmp_path / "ct", patient="E2E-CT-TILT", tilt=[7])
        send_to_orthanc(orthanc_site, study.files)
        wait_forwarded(orthanc_site.orthanc, study.series_uid)
        failed = wait_job(node, study.study_uid, ("failed",), timeout=600)
        assert "orientation" in (failed.error or ""), failed.error
        assert results_of(node, failed.uid) == []
        assert not [j for j in jobs_of(node, study.study_uid) if j.state in OPEN_STATES]
        events = event_names(node, study.study_uid)
        assert in_order(events, ["series.completed", "job.created", "job.running", "job.failed"])
        assert not any(e.startswith("delivery.") for e in events)
        assert set(orthanc_results(orthanc_site, study.study_uid)) == {"CT"}
        assert node.proc.poll() is None
        echo = orthanc_site.segnode_cli(node, "destinations", "echo", "orthanc")
        assert echo.returncode == 0, echo.stdout + echo.stderr
    finally:
        node.stop()


@cache
def _cardiac_models() -> Path | str:
    """``segnode models install mri-cardiac`` (the bundle committed under models/) once per session."""
    import tempfile

    from tests.conftest import REPO, SEGNODE

    root = Path(tempfile.mkdtemp(prefix="segnode-cardiac-models-"))
    atexit.register(shutil.rmtree, root, True)
    config = root / "segnode.yaml"
    config.write_text(f"storage:\n  path: {root / 'data'}\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGNODE_")}
    done = subprocess.run(
        [*SEGNODE, "models", "install", "mri-cardiac", "--config", str(config)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if done.returncode != 0:
        if "bundle_missing" in done.stderr or "no committed bundle" in done.stderr:
            return (
                "the mri-cardiac bundle is not committed under models/ in this checkout: "
                + done.stderr.strip()
            )
        raise AssertionError(f"segnode models install mri-cardiac failed:\n{done.stderr}")
    return root / "data" / "models"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")  # Sunnybrook's UIDs, on purpose
def test_cine_mr_through_orthanc_back_by_cstore(orthanc_site: OrthancSite, tmp_path: Path) -> None:
    """Sunnybrook cine SAX as it is: Orthanc -> Lua -> segnode -> mri-cardiac (shipped rule, 'sender') ->
    SEG(s) and SR by C-STORE into Orthanc, every step audited in order."""
    need_tool("storescu")
    study = mr_study()
    models = _cardiac_models()
    if isinstance(models, str):
        pytest.skip(models)
    storage = tmp_path / "store"
    storage.mkdir(parents=True)
    (storage / "models").symlink_to(models, target_is_directory=True)
    node = orthanc_site.start_segnode(storage, extra_env=FLOW_ENV)
    try:
        orthanc_site.orthanc.forget_series(study.series_uid)
        send_to_orthanc(orthanc_site, study.files)
        wait_forwarded(orthanc_site.orthanc, study.series_uid)
        done = wait_job(node, study.study_uid, ("done",), timeout=INFERENCE_TIMEOUT)
        assert (done.rule_name, done.destinations, done.sender_ae) == ("mri-cardiac", ["sender"], "ORTHANC")
        check_results_in_orthanc(orthanc_site, node, study, done.uid)
        events = event_names(node, study.study_uid)
        assert in_order(
            events,
            ["instance.stored", "series.completed", "job.created", "job.running", "job.written",
             "job.dispatching", "delivery.succeeded", "job.done"],
        )  # fmt: skip
        check_delivered_once(node, study, done.uid, "sender")
    finally:
        node.stop()
