"""Result delivery (node/dispatch) against real peers on loopback: DCMTK storescp, a pynetdicom SCP
answering chosen statuses, a hung peer, segnode's own STOW-RS receiver; the outbox, backoff, circuit
breaker, ``sender``, the CLI (``destinations add|list|echo``, ``jobs retry``).

The result files are a real DICOM-SEG and TID 1500 SR written by pipelines/outputs over the real GE CT
slices (and their manual liver segmentation) in ../shared/data/liver/dcmqi_ct3slice_seg.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import select

from node.audit.recorder import utcnow
from node.db.models import AuditEvent, Delivery, Instance, Job, JobResult
from node.dispatch import dimse
from node.dispatch.destinations import DestinationError, Target, resolve_sender
from node.dispatch.dispatcher import Dispatcher
from node.dispatch.outcome import ResultFile
from node.dispatch.policy import backoff_delay
from node.dispatch.stow import parse_store_response
from node.service import Database
from node.settings import DestinationSection, DispatchSection, Settings, TlsSection, load_settings
from pipelines.outputs import (
    LIVER,
    Algorithm,
    OutputIdentity,
    SegmentMeasurement,
    write_measurement_report,
    write_seg,
)
from tests.conftest import REPO, SEGNODE, start_node, wait_for
from tests.dispatch_peers import free_port, scripted_scp, silent_peer, storescp
from tests.test_tls import pki  # noqa: F401  (fixture)

pytestmark = [
    pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name"),
]

CT3 = "liver/dcmqi_ct3slice_seg/data/segmentations"
FAST = {  # short backoff so retries happen within a test
    "backoff_base_seconds": 0.2,
    "backoff_max_seconds": 0.5,
    "jitter": 0.5,
    "poll_seconds": 0.05,
    "connect_timeout_seconds": 3,
    "timeout_seconds": 20,
}


# -- real result files ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Results:
    storage: Path  # a storage.path holding results/<job uid>/... (copied per test)
    seg: Path
    sr: Path
    seg_uid: str
    sr_uid: str
    sr_class: str
    series_uid: str  # the SEG's
    study_uid: str
    source_series_uid: str


@pytest.fixture(scope="module")
def real_results(tmp_path_factory: pytest.TempPathFactory) -> Results:
    from tests.conftest import need_shared

    data = need_shared(*CT3.split("/"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sources = [
            pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((data / "ct-3slice").glob("*.dcm"))
        ]
    seg_ref = hd.seg.segread(data / "liver.dcm")
    pixels = seg_ref.get_pixels_by_source_instance(
        [str(s.SOPInstanceUID) for s in sources], combine_segments=False, ignore_spatial_locations=True
    )
    masks = np.moveaxis(pixels, -1, 0).astype(bool)
    folder = tmp_path_factory.mktemp("results")
    identity = OutputIdentity(
        source_series_uid=str(sources[0].SeriesInstanceUID),
        pipeline="ct-liver",
        model_version="0.3",
        rule_version="1",
    )
    algorithm = Algorithm(name="test-net", version="1.0")
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
    return Results(
        storage=folder,
        seg=seg.path,
        sr=sr.path,
        seg_uid=seg.sop_instance_uid,
        sr_uid=sr.sop_instance_uid,
        sr_class=sr.sop_class_uid,
        series_uid=seg.series_instance_uid,
        study_uid=seg.study_instance_uid,
        source_series_uid=str(sources[0].SeriesInstanceUID),
    )


def files_of(r: Results) -> list[ResultFile]:
    return [
        ResultFile(r.seg, "1.2.840.10008.5.1.4.1.1.66.4", r.seg_uid, "seg"),
        ResultFile(r.sr, r.sr_class, r.sr_uid, "sr"),
    ]


def dimse_target(port: int, ae: str = "STORESCP", name: str = "pacs") -> Target:
    return Target(name=name, type="dimse", ae_title=ae, host="127.0.0.1", port=port)


CALLING = dimse.Calling("SEGNODE")
QUICK = DispatchSection(**FAST)  # type: ignore[arg-type]


# -- the senders on their own -----------------------------------------------------------------------------
def test_cstore_to_storescp(real_results: Results, tmp_path: Path) -> None:
    with storescp(tmp_path / "in") as scp:
        result = dimse.send(dimse_target(scp.port), files_of(real_results), QUICK, CALLING)
        assert result.error is None, result
        assert {u: s.outcome for u, s in result.instances.items()} == {
            real_results.seg_uid: "delivered",
            real_results.sr_uid: "delivered",
        }
        assert result.status == "0x0000"
        wait_for(lambda: len(scp.files()) == 2, what="two files at storescp")
        assert scp.uids() == sorted([real_results.seg_uid, real_results.sr_uid])
        # what arrived is what was written, element for element
        got = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in scp.files()}
        assert got[real_results.seg_uid].PixelData == pydicom.dcmread(real_results.seg).PixelData
        # a resend replaces (same UIDs -> same files), never duplicates
        again = dimse.send(dimse_target(scp.port), files_of(real_results), QUICK, CALLING)
        assert again.error is None
        assert len(scp.files()) == 2


def test_cstore_converts_to_the_only_syntax_the_peer_accepts(real_results: Results, tmp_path: Path) -> None:
    own = pydicom.dcmread(real_results.seg, stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert own == ExplicitVRLittleEndian
    with storescp(tmp_path / "in", extra=["+xi"]) as scp:  # implicit VR little endian only
        result = dimse.send(dimse_target(scp.port), files_of(real_results), QUICK, CALLING)
        assert result.error is None, result
        assert all(s.outcome == "delivered" for s in result.instances.values())
        assert "Implicit VR Little Endian" in result.instances[real_results.seg_uid].detail
        wait_for(lambda: len(scp.files()) == 2, what="two files at storescp")
        for p in scp.files():
            ds = pydicom.dcmread(p)
            assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
            if ds.SOPInstanceUID == real_results.seg_uid:
                assert ds.PixelData == pydicom.dcmread(real_results.seg).PixelData


def test_cstore_statuses_per_instance(real_results: Results) -> None:
    def script(ds: Any, _i: int) -> int:
        return 0xB000 if ds.SOPInstanceUID == real_results.seg_uid else 0xA700

    with scripted_scp(script) as scp:
        result = dimse.send(dimse_target(scp.port, "SCRIPTED"), files_of(real_results), QUICK, CALLING)
    assert result.error is None
    seg, sr = result.instances[real_results.seg_uid], result.instances[real_results.sr_uid]
    assert (seg.status, seg.outcome) == (0xB000, "warning")
    assert (sr.status, sr.outcome) == (0xA700, "failed")
    assert result.status == "0xA700"


def test_cstore_transient_errors(real_results: Results) -> None:
    refused = dimse.send(dimse_target(free_port()), files_of(real_results), QUICK, CALLING)
    assert refused.transient_error and not refused.instances
    with scripted_scp(lambda ds, i: 0) as scp:  # wrong called AE title: A-ASSOCIATE-RJ
        rejected = dimse.send(dimse_target(scp.port, "NOT-ME"), files_of(real_results), QUICK, CALLING)
        assert not scp.received
    assert rejected.transient_error and rejected.error is not None
    assert rejected.error.startswith("A-ASSOCIATE-RJ rejected-permanent source 1 reason 7"), rejected.error
    with silent_peer() as port:
        hung = dimse.send(
            dimse_target(port),
            files_of(real_results),
            DispatchSection(**{**FAST, "connect_timeout_seconds": 0.5}),
            CALLING,  # type: ignore[arg-type]
        )
    assert hung.transient_error, hung


# -- the outbox: a database, jobs in 'written', a dispatcher --------------------------------------------
@dataclass
class Env:
    settings: Settings
    db: Database
    results: Results

    def dispatcher(self) -> Dispatcher:
        return Dispatcher(self.db.sessions, self.settings)

    def job(self, job_id: int) -> Job:
        with self.db.sessions() as s:
            job = s.get(Job, job_id)
            assert job is not None
            return job

    def deliveries(self, job_id: int) -> dict[str, Delivery]:
        with self.db.sessions() as s:
            return {d.destination: d for d in s.scalars(select(Delivery).where(Delivery.job_id == job_id))}

    def delivery_state(self, job_id: int, destination: str) -> str | None:
        d = self.deliveries(job_id).get(destination)
        return None if d is None else d.state

    def events(self, job_uid: str | None = None, prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
        with self.db.sessions() as s:
            rows = s.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
        return [
            (r.event_type, dict(r.details))
            for r in rows
            if r.event_type.startswith(prefix) and (job_uid is None or r.details.get("job_uid") == job_uid)
        ]

    def wait_state(self, job_id: int, *states: str, timeout: float = 60) -> Job:
        def _check() -> Job | None:
            job = self.job(job_id)
            return job if job.state in states else None

        return wait_for(_check, timeout=timeout, what=f"job {job_id} in {states}")  # type: ignore[no-any-return]

    def add_job(
        self,
        destinations: list[str],
        *,
        sender_ae: str | None = None,
        sender_host: str | None = None,
        state: str = "written",
        with_results: bool = True,
    ) -> tuple[int, str]:
        uid = uuid.uuid4().hex
        now = utcnow()
        r = self.results
        with self.db.sessions.begin() as s:
            job = Job(
                uid=uid,
                dedupe_key=f"test:{uid}",
                level="series",
                study_uid=r.study_uid,
                series_uids=[r.source_series_uid],
                series_generations=[1],
                rule_name="test",
                rule_version=1,
                pipeline="ct-liver",
                parameters={},
                destinations=destinations,
                sender_ae=sender_ae,
                sender_host=sender_host,
                lane="routine",
                state=state,
                created_at=now,
                updated_at=now,
            )
            s.add(job)
            s.flush()
            if with_results:
                folder = self.settings.storage.path / "results" / uid
                folder.mkdir(parents=True)
                for kind, src, sop_class, sop_uid in (
                    ("seg", r.seg, "1.2.840.10008.5.1.4.1.1.66.4", r.seg_uid),
                    ("sr", r.sr, r.sr_class, r.sr_uid),
                ):
                    dst = folder / f"{kind}.dcm"
                    shutil.copyfile(src, dst)
                    data = dst.read_bytes()
                    s.add(
                        JobResult(
                            job_id=job.id,
                            kind=kind,
                            path=str(dst.relative_to(self.settings.storage.path)),
                            sop_class_uid=sop_class,
                            sop_instance_uid=sop_uid,
                            series_instance_uid=r.series_uid,
                            sha256=hashlib.sha256(data).hexdigest(),
                            size=len(data),
                            created_at=now,
                        )
                    )
            return job.id, uid


def make_env(
    tmp_path: Path,
    results: Results,
    destinations: dict[str, dict[str, Any]] | None = None,
    database_url: str | None = None,
    **dispatch: Any,
) -> Env:
    settings = load_settings(
        storage={"path": tmp_path / "node", "fsync": False},
        database={"url": database_url},
        node={"ae_title": "SEGNODE"},
        dispatch={**FAST, **dispatch},
        destinations=destinations or {},
    )
    return Env(settings, Database.open(settings), results)


@contextmanager
def running(env: Env) -> Iterator[Dispatcher]:
    dispatcher = env.dispatcher()
    dispatcher.start()
    try:
        yield dispatcher
    finally:
        dispatcher.stop(timeout=1)


def dimse_dest(port: int, ae: str = "STORESCP") -> dict[str, Any]:
    return {"type": "dimse", "ae_title": ae, "host": "127.0.0.1", "port": port}


def types(events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [t for t, _ in events]


def test_job_delivered_to_a_destination_and_to_the_sender(real_results: Results, tmp_path: Path) -> None:
    with (
        storescp(tmp_path / "pacs") as pacs,
        storescp(tmp_path / "modality", ae_title="MODALITY") as modality,
    ):
        env = make_env(tmp_path, real_results, {"pacs": dimse_dest(pacs.port)}, sender_port=modality.port)
        job_id, job_uid = env.add_job(["pacs", "sender"], sender_ae="MODALITY", sender_host="127.0.0.1")
        with running(env):
            job = env.wait_state(job_id, "done", "failed")
        assert job.state == "done", job.error
        assert pacs.uids() == modality.uids() == sorted([real_results.seg_uid, real_results.sr_uid])
    deliveries = env.deliveries(job_id)
    assert {n: (d.state, d.attempts, d.last_status) for n, d in deliveries.items()} == {
        "pacs": ("delivered", 1, "0x0000"),
        "sender": ("delivered", 1, "0x0000"),
    }
    trail = env.events(job_uid)
    assert types(trail)[0] == "job.dispatching" and types(trail)[-1] == "job.done"
    assert sorted(types(trail)[1:-1]) == sorted(
        ["delivery.queued"] * 2 + ["delivery.attempted"] * 2 + ["delivery.succeeded"] * 2
    )
    queued = {d["destination"]: d["target"] for t, d in trail if t == "delivery.queued"}
    assert queued == {
        "pacs": f"STORESCP@127.0.0.1:{pacs.port}",
        "sender": f"MODALITY@127.0.0.1:{modality.port}",
    }
    # every delivery event is in the study's audit trail too
    with env.db.sessions() as s:
        study_types = {
            e.event_type
            for e in s.scalars(select(AuditEvent).where(AuditEvent.study_uid == real_results.study_uid))
        }
    assert {"delivery.queued", "delivery.attempted", "delivery.succeeded", "job.done"} <= study_types


@pytest.mark.postgres
def test_delivery_on_postgresql(real_results: Results, tmp_path: Path, postgres_url: str) -> None:
    seg = real_results.seg_uid
    with scripted_scp(lambda ds, i: 0xA700 if i == 0 else 0, ae_title="PACS") as scp:
        env = make_env(
            tmp_path, real_results, {"pacs": dimse_dest(scp.port, "PACS")}, database_url=postgres_url
        )
        jobs = [env.add_job(["pacs"]) for _ in range(3)]
        with running(env):
            for job_id, _ in jobs:
                assert env.wait_state(job_id, "done", "failed").state == "done"
        assert scp.count(seg) == 4  # one refusal (0xA700), then each job's SEG once
    env.db.engine.dispose()


def test_cstore_over_mutual_tls(real_results: Results, tmp_path: Path, pki: Path) -> None:  # noqa: F811
    peer = start_node(
        tmp_path / "peer",
        extra_env={
            "SEGNODE_DIMSE__TLS__ENABLED": "true",
            "SEGNODE_DIMSE__TLS__CERTIFICATE": str(pki / "server.crt"),
            "SEGNODE_DIMSE__TLS__KEY": str(pki / "server.key"),
            "SEGNODE_DIMSE__TLS__CA": str(pki / "ca.crt"),
        },
    )
    try:
        dest = {**dimse_dest(peer.dimse_port, peer.ae_title), "tls": True}
        env = make_env(tmp_path, real_results, {"secure": dest})
        env.settings.dimse.tls = TlsSection(
            certificate=pki / "client.crt", key=pki / "client.key", ca=pki / "ca.crt"
        )
        job_id, _ = env.add_job(["secure"])
        with running(env):
            job = env.wait_state(job_id, "done", "failed")
        assert job.state == "done", job.error
        assert {real_results.seg_uid, real_results.sr_uid} <= stored_uids(peer.sessions())
        # without a client certificate the peer's mutual TLS refuses us: a transient failure
        target = Target("secure", "dimse", peer.ae_title, "127.0.0.1", peer.dimse_port, tls=True)
        anonymous = dimse.Calling("SEGNODE", TlsSection(ca=pki / "ca.crt"))
        refused = dimse.send(target, files_of(real_results), QUICK, anonymous)
        assert refused.transient_error and not refused.instances
    finally:
        peer.stop()


def test_sender_port_comes_from_a_destination_with_its_ae_title() -> None:
    dests = {
        "other": DestinationSection(type="dimse", ae_title="CT1", host="10.0.0.9", port=4000),
        "ct": DestinationSection(type="dimse", ae_title="CT1", host="10.0.0.5", port=5104, tls=True),
        "web": DestinationSection(type="dicomweb", url="http://x/dicomweb"),
    }
    target = resolve_sender(dests, "CT1", "10.0.0.5", 104)
    assert (target.ae_title, target.host, target.port, target.tls) == ("CT1", "10.0.0.5", 5104, True)
    assert resolve_sender(dests, "CT2", "10.0.0.7", 104).port == 104  # dispatch.sender_port
    with pytest.raises(DestinationError, match=r"dispatch\.sender_port"):
        resolve_sender(dests, "CT2", "10.0.0.7", None)
    with pytest.raises(DestinationError, match="STOW-RS"):
        resolve_sender(dests, None, None, 104)


def test_warning_failure_then_success(real_results: Results, tmp_path: Path) -> None:
    seg, sr = real_results.seg_uid, real_results.sr_uid
    calls: dict[str, int] = {}

    def script(ds: Any, _i: int) -> int:
        uid = str(ds.SOPInstanceUID)
        calls[uid] = calls.get(uid, 0) + 1
        if uid == seg:
            return 0xB000  # coercion of data elements: a warning, stored
        return 0xA700 if calls[uid] == 1 else 0x0000  # out of resources, then fine

    with scripted_scp(script) as scp:
        env = make_env(tmp_path, real_results, {"pacs": dimse_dest(scp.port, "SCRIPTED")})
        job_id, job_uid = env.add_job(["pacs"])
        with running(env):
            job = env.wait_state(job_id, "done", "failed")
        assert job.state == "done", job.error
        assert scp.count(seg) == 1  # a delivered instance is not sent again
        assert scp.count(sr) == 2
    d = env.deliveries(job_id)["pacs"]
    assert (d.state, d.attempts) == ("delivered", 2)
    assert {u: (o["status"], o["outcome"]) for u, o in d.outcomes.items()} == {
        seg: (0xB000, "warning"),
        sr: (0x0000, "delivered"),
    }
    trail = env.events(job_uid, "delivery.")
    assert types(trail) == [
        "delivery.queued",
        "delivery.attempted",
        "delivery.retry_scheduled",
        "delivery.attempted",
        "delivery.succeeded",
    ]
    assert trail[1][1]["instances"] == 2 and trail[3][1]["instances"] == 1
    assert trail[2][1]["status"] == "0xA700" and sr in trail[2][1]["error"]
    assert trail[4][1]["statuses"] == {seg: 0xB000, sr: 0}
    assert set(trail[4][1]["warnings"]) == {seg}


def test_failure_status_until_attempts_are_used_up(real_results: Results, tmp_path: Path) -> None:
    with scripted_scp(lambda ds, i: 0xA900) as scp:  # data set does not match SOP class, every time
        env = make_env(tmp_path, real_results, {"pacs": dimse_dest(scp.port, "SCRIPTED")}, max_attempts=3)
        job_id, job_uid = env.add_job(["pacs"])
        with running(env):
            job = env.wait_state(job_id, "done", "failed")
        assert len(scp.received) == 6
    assert job.state == "failed"
    assert job.error is not None and "0xA900" in job.error and "pacs" in job.error
    d = env.deliveries(job_id)["pacs"]
    assert (d.state, d.attempts, d.last_status) == ("failed", 3, "0xA900")
    trail = env.events(job_uid)
    assert types(trail).count("delivery.retry_scheduled") == 2
    failed = [x for t, x in trail if t == "delivery.failed"]
    assert len(failed) == 1 and failed[0]["status"] == "0xA900" and failed[0]["permanent"] is False
    assert types(trail)[-1] == "job.failed" and "0xA900" in trail[-1][1]["reason"]


def test_peer_down_then_up_is_delivered_once(real_results: Results, tmp_path: Path) -> None:
    port = free_port()
    env = make_env(tmp_path, real_results, {"pacs": dimse_dest(port, "LATE")}, breaker_threshold=100)
    job_id, job_uid = env.add_job(["pacs"])
    with running(env):
        wait_for(
            lambda: len([t for t, _ in env.events(job_uid) if t == "delivery.retry_scheduled"]) >= 2,
            what="two failed attempts",
        )
        assert env.job(job_id).state == "dispatching"
        with scripted_scp(lambda ds, i: 0, ae_title="LATE", port=port) as scp:
            job = env.wait_state(job_id, "done", "failed")
            assert job.state == "done", job.error
            assert scp.count(real_results.seg_uid) == scp.count(real_results.sr_uid) == 1
    d = env.deliveries(job_id)["pacs"]
    assert d.state == "delivered" and d.attempts >= 3
    retries = [x for t, x in env.events(job_uid) if t == "delivery.retry_scheduled"]
    assert retries and all(x["status"] == f"no connection to 127.0.0.1:{port}" for x in retries), retries


def test_a_hung_destination_delays_nothing_else(real_results: Results, tmp_path: Path) -> None:
    with silent_peer() as hung_port, storescp(tmp_path / "pacs") as pacs:
        env = make_env(
            tmp_path,
            real_results,
            {"hung": dimse_dest(hung_port, "HUNG"), "pacs": dimse_dest(pacs.port)},
            connect_timeout_seconds=30,
        )
        with running(env):
            hung_job, _ = env.add_job(["hung"])
            wait_for(lambda: env.delivery_state(hung_job, "hung") == "sending", what="the hung attempt")
            both_job, _ = env.add_job(["hung", "pacs"])
            live_job, _ = env.add_job(["pacs"])
            assert env.wait_state(live_job, "done", "failed").state == "done"
            wait_for(lambda: env.delivery_state(both_job, "pacs") == "delivered", what="pacs delivery")
            # the first attempt at the hung peer is still waiting for an answer meanwhile
            hung = env.deliveries(hung_job)["hung"]
            assert (hung.state, hung.attempts) == ("sending", 1)
            assert env.job(both_job).state == "dispatching"  # waits for its other destination
        assert pacs.uids() == sorted([real_results.seg_uid, real_results.sr_uid])


def test_circuit_breaker_opens_then_closes(real_results: Results, tmp_path: Path) -> None:
    port = free_port()
    env = make_env(
        tmp_path,
        real_results,
        {"pacs": dimse_dest(port, "FLAKY")},
        breaker_threshold=2,
        breaker_cooldown_seconds=4,
        backoff_base_seconds=0.05,
        backoff_max_seconds=0.1,
    )
    job_id, _job_uid = env.add_job(["pacs"])
    with running(env):
        wait_for(lambda: env.events(prefix="destination.breaker_opened"), what="the breaker to open")
        attempts_when_opened = env.deliveries(job_id)["pacs"].attempts
        with scripted_scp(lambda ds, i: 0, ae_title="FLAKY", port=port) as scp:
            job = env.wait_state(job_id, "done", "failed")
            assert job.state == "done", job.error
            assert scp.count(real_results.seg_uid) == 1
    opened = env.events(prefix="destination.breaker_opened")
    closed = env.events(prefix="destination.breaker_closed")
    assert len(opened) == 1 and len(closed) == 1
    assert opened[0][1] == {
        "destination": "pacs",
        "target": f"FLAKY@127.0.0.1:{port}",
        "failures": 2,
        "cooldown_seconds": 4.0,
    }
    assert attempts_when_opened == 2
    # while open nothing was tried: the next attempt was the half-open trial, and it succeeded
    assert env.deliveries(job_id)["pacs"].attempts == 3
    all_types = types(env.events())
    assert all_types.index("destination.breaker_opened") < all_types.index("destination.breaker_closed")


def test_restart_resends_what_was_being_sent(real_results: Results, tmp_path: Path) -> None:
    with scripted_scp(lambda ds, i: 0, ae_title="PACS") as scp:
        env = make_env(tmp_path, real_results, {"pacs": dimse_dest(scp.port, "PACS")})
        job_id, _ = env.add_job(["pacs"])
        first = env.dispatcher()
        first.claim_written()
        with env.db.sessions.begin() as s:  # as if the node died in the middle of the attempt
            d = s.scalars(select(Delivery).where(Delivery.job_id == job_id)).one()
            d.state, d.attempts = "sending", 1
        with running(env) as dispatcher:
            job = env.wait_state(job_id, "done", "failed")
        assert job.state == "done"
        assert scp.count(real_results.seg_uid) == 1
    assert dispatcher is not first
    assert env.deliveries(job_id)["pacs"].attempts == 2


def test_unknown_destination_fails_the_job(real_results: Results, tmp_path: Path) -> None:
    env = make_env(tmp_path, real_results)
    job_id, job_uid = env.add_job(["nowhere", "sender"])  # and no calling AE to answer
    with running(env):
        job = env.wait_state(job_id, "done", "failed")
    assert job.state == "failed"
    assert job.error is not None and "'nowhere' is not configured" in job.error and "STOW-RS" in job.error
    failed = {x["destination"]: x for t, x in env.events(job_uid) if t == "delivery.failed"}
    assert set(failed) == {"nowhere", "sender"} and all(x["permanent"] for x in failed.values())


# -- STOW-RS to a real DICOMweb server: segnode's own receiver ----------------------------------------------
def web_dest(node_port: int, **auth: str) -> dict[str, Any]:
    return {"type": "dicomweb", "url": f"http://127.0.0.1:{node_port}/dicomweb", **auth}


def stored_uids(sessions: Any) -> set[str]:
    with sessions() as s:
        return set(s.scalars(select(Instance.sop_instance_uid)).all())


def test_stow_rs_delivery_and_a_wrong_token(real_results: Results, tmp_path: Path) -> None:
    peer = start_node(tmp_path / "peer", extra_env={"SEGNODE_DICOMWEB__TOKEN": "s3cret"})
    try:
        assert peer.dicomweb_port
        env = make_env(
            tmp_path,
            real_results,
            {
                "web": web_dest(peer.dicomweb_port, token="s3cret"),
                "web-wrong": web_dest(peer.dicomweb_port, token="guess"),
            },
        )
        good_id, _good_uid = env.add_job(["web"])
        bad_id, bad_uid = env.add_job(["web-wrong"])
        with running(env):
            good = env.wait_state(good_id, "done", "failed")
            bad = env.wait_state(bad_id, "done", "failed")
        assert good.state == "done", good.error
        assert {real_results.seg_uid, real_results.sr_uid} <= stored_uids(peer.sessions())
        d = env.deliveries(good_id)["web"]
        assert (d.state, d.last_status) == ("delivered", "HTTP 200")
        # 401 is final: one attempt, the peer's answer in the audit trail
        assert bad.state == "failed"
        d = env.deliveries(bad_id)["web-wrong"]
        assert (d.state, d.attempts, d.last_status) == ("failed", 1, "HTTP 401")
        failed = [x for t, x in env.events(bad_uid) if t == "delivery.failed"]
        assert failed[0]["permanent"] is True and "wrong bearer token" in failed[0]["error"]
        assert bad.error is not None and "HTTP 401" in bad.error
        # a resend of the same results replaces them at the peer (same UIDs), never duplicates
        again_id, _ = env.add_job(["web"])
        with running(env):
            assert env.wait_state(again_id, "done", "failed").state == "done"
        with peer.sessions()() as s:
            count = len(
                s.scalars(select(Instance).where(Instance.sop_instance_uid == real_results.seg_uid)).all()
            )
        assert count == 1  # the peer recorded the identical resend as a duplicate, no second instance
    finally:
        peer.stop()


def test_stow_rs_failed_sop_sequence(real_results: Results, tmp_path: Path) -> None:
    # a peer without room refuses every instance: HTTP 409 with a FailedSOPSequence (0xA700)
    peer = start_node(tmp_path / "peer", extra_env={"SEGNODE_STORAGE__MIN_FREE_BYTES": str(2**62)})
    try:
        assert peer.dicomweb_port
        env = make_env(tmp_path, real_results, {"web": web_dest(peer.dicomweb_port)}, max_attempts=2)
        job_id, job_uid = env.add_job(["web"])
        with running(env):
            job = env.wait_state(job_id, "done", "failed")
    finally:
        peer.stop()
    assert job.state == "failed"
    d = env.deliveries(job_id)["web"]
    assert (d.state, d.attempts, d.last_status) == ("failed", 2, "HTTP 409")
    assert {u: (o["status"], o["outcome"]) for u, o in d.outcomes.items()} == {
        real_results.seg_uid: (0xA700, "failed"),
        real_results.sr_uid: (0xA700, "failed"),
    }
    trail = env.events(job_uid, "delivery.")
    assert types(trail) == [
        "delivery.queued",
        "delivery.attempted",
        "delivery.retry_scheduled",
        "delivery.attempted",
        "delivery.failed",
    ]
    assert "FailureReason 0xA700" in trail[-1][1]["error"]


def test_parse_store_response_json_and_xml() -> None:
    body = {
        "00081198": {
            "vr": "SQ",
            "Value": [
                {"00081155": {"vr": "UI", "Value": ["1.2.3"]}, "00081197": {"vr": "US", "Value": [272]}}
            ],
        },
        "00081199": {
            "vr": "SQ",
            "Value": [
                {"00081155": {"vr": "UI", "Value": ["1.2.4"]}},
                {"00081155": {"vr": "UI", "Value": ["1.2.5"]}, "00081196": {"vr": "US", "Value": [0xB000]}},
            ],
        },
    }
    assert parse_store_response(json.dumps(body).encode(), "application/dicom+json") == (
        {"1.2.3": 272},
        {"1.2.4": None, "1.2.5": 0xB000},
    )
    xml = b"""<?xml version="1.0"?><NativeDicomModel>
      <DicomAttribute tag="00081198" vr="SQ" keyword="FailedSOPSequence"><Item number="1">
        <DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2.3</Value></DicomAttribute>
        <DicomAttribute tag="00081197" vr="US"><Value number="1">43264</Value></DicomAttribute>
      </Item></DicomAttribute></NativeDicomModel>"""
    assert parse_store_response(xml, "application/dicom+xml") == ({"1.2.3": 0xA900}, {})


# -- the CLI and the running node ---------------------------------------------------------------------
def cli(env: dict[str, str], *args: str, ok: bool | None = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*SEGNODE, *args], env=env, capture_output=True, text=True, cwd=REPO, timeout=120)
    if ok is not None:
        assert (proc.returncode == 0) == ok, f"{args}: rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def cli_env(storage: Path, config: Path | None = None) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("SEGNODE_")}
    e["SEGNODE_STORAGE__PATH"] = str(storage)
    if config is not None:
        e["SEGNODE_CONFIG"] = str(config)
    return e


def test_destinations_add_list_echo(tmp_path: Path) -> None:
    config = tmp_path / "segnode.yaml"
    config.write_text(
        "destinations:\n  pacs:\n    type: dimse\n    ae_title: CONFIGURED\n"
        "    host: 127.0.0.1\n    port: 1\n"
    )
    env = cli_env(tmp_path / "node", config)
    with storescp(tmp_path / "in") as scp:
        added = cli(
            env,
            "destinations",
            "add",
            "archive",
            "--type",
            "dimse",
            "--ae-title",
            "STORESCP",
            "--host",
            "127.0.0.1",
            "--port",
            str(scp.port),
            "--description",
            "long-term",
        )
        assert f"added destination archive: STORESCP@127.0.0.1:{scp.port}" in added.stdout
        clash = cli(
            env,
            "destinations",
            "add",
            "pacs",
            "--type",
            "dimse",
            "--ae-title",
            "X",
            "--host",
            "127.0.0.1",
            "--port",
            "104",
        )
        assert "also defined in the configuration; the configured one is used" in clash.stderr
        again = cli(
            env,
            "destinations",
            "add",
            "archive",
            "--type",
            "dimse",
            "--ae-title",
            "STORESCP",
            "--host",
            "127.0.0.1",
            "--port",
            "104",
            ok=False,
        )
        assert "exists; use --replace" in again.stderr
        bad = cli(env, "destinations", "add", "web", "--type", "dicomweb", "--url", "ftp://x", ok=False)
        assert "url" in bad.stderr
        mixed = cli(
            env,
            "destinations",
            "add",
            "web",
            "--type",
            "dicomweb",
            "--url",
            "http://x",
            "--port",
            "1",
            ok=False,
        )
        assert "--port" in mixed.stderr
        listed = {
            r["name"]: r
            for r in json.loads(cli(env, "destinations", "list", "--json").stdout)
            if r["source"] != "runtime" or r["name"] != "pacs"
        }
        rows = json.loads(cli(env, "destinations", "list", "--json").stdout)
        assert [(r["name"], r["source"]) for r in rows] == [
            ("sender", "built-in"),
            ("archive", "runtime"),
            ("pacs", "config"),
            ("pacs", "runtime"),
        ]
        assert listed["archive"]["target"] == f"STORESCP@127.0.0.1:{scp.port}"
        assert "shadowed" in rows[3]["description"]
        echoed = cli(env, "destinations", "echo", "archive")
        assert "C-ECHO status 0x0000 from AE 'STORESCP'" in echoed.stdout
        down = cli(env, "destinations", "echo", "pacs", ok=False)  # the configured one: port 1, nobody
        assert down.returncode == 1 and "no connection to 127.0.0.1:1" in down.stdout
        assert cli(env, "destinations", "echo", "nowhere", ok=False).returncode == 2
    peer = start_node(tmp_path / "peer", extra_env={"SEGNODE_DICOMWEB__TOKEN": "s3cret"})
    try:
        url = f"http://127.0.0.1:{peer.dicomweb_port}/dicomweb"
        cli(env, "destinations", "add", "web", "--type", "dicomweb", "--url", url, "--token", "s3cret")
        echoed = cli(env, "destinations", "echo", "web")
        assert "OPTIONS /studies: HTTP 405, Allow: POST" in echoed.stdout  # segnode has no QIDO-RS
    finally:
        peer.stop()
    assert cli(env, "destinations", "echo", "web", ok=False).returncode == 1  # nobody there any more
    # a rule may name a destination added at run time; it cannot be removed while a rule uses it
    rule = tmp_path / "rule.yaml"
    rule.write_text(
        "name: to-archive\nmatch: {fact: modality, equals: CT}\npipeline: ct-liver\ndestinations: [archive]\n"
    )
    cli(env, "rules", "add", str(rule))
    in_use = cli(env, "destinations", "remove", "archive", ok=False)
    assert "used by rule(s) to-archive" in in_use.stderr
    cli(env, "rules", "remove", "to-archive")
    assert "removed destination archive" in cli(env, "destinations", "remove", "archive").stdout
    assert cli(env, "destinations", "remove", "archive", ok=False).returncode == 1
    # the audit trail keeps every change
    settings = load_settings(storage={"path": tmp_path / "node"})
    db = Database.open(settings)
    with db.sessions() as s:
        changes = [
            (e.details["destination"], e.details["action"])
            for e in s.scalars(select(AuditEvent).where(AuditEvent.event_type == "destination.changed"))
        ]
    assert changes == [("archive", "add"), ("pacs", "add"), ("web", "add"), ("archive", "remove")]


def test_jobs_retry_resends_or_requeues(real_results: Results, tmp_path: Path) -> None:
    port = free_port()
    env = make_env(tmp_path, real_results, max_attempts=1)
    env_cli = cli_env(env.settings.storage.path)
    cli(
        env_cli,
        "destinations",
        "add",
        "pacs",
        "--type",
        "dimse",
        "--ae-title",
        "PACS",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    )
    resend_id, resend_uid = env.add_job(["pacs"])
    rerun_id, _ = env.add_job(["pacs"], state="failed", with_results=False)
    with running(env):
        assert env.wait_state(resend_id, "done", "failed").state == "failed"
    assert "no connection" in (env.job(resend_id).error or "")
    assert "-> written: results will be sent again" in cli(env_cli, "jobs", "retry", str(resend_id)).stdout
    assert "-> queued: no results on disk" in cli(env_cli, "jobs", "retry", rerun_id and str(rerun_id)).stdout
    refused = cli(env_cli, "jobs", "retry", str(resend_id), ok=False)
    assert "only failed jobs can be retried" in refused.stderr
    with scripted_scp(lambda ds, i: 0, ae_title="PACS", port=port) as scp, running(env):
        job = env.wait_state(resend_id, "done", "failed")
        assert job.state == "done", job.error
        assert scp.count(real_results.seg_uid) == 1
    assert env.job(rerun_id).state == "queued"
    d = env.deliveries(resend_id)["pacs"]
    assert (d.state, d.attempts) == ("delivered", 1)
    trail = types(env.events(resend_uid))
    assert trail.count("job.retried") == 1 and trail[-1] == "job.done"
    assert trail.index("delivery.failed") < trail.index("job.retried") < trail.index("delivery.succeeded")
    shown = json.loads(cli(env_cli, "jobs", "show", str(resend_id), "--json").stdout)
    assert "delivery.succeeded" in [e["event"] for e in shown["events"]]


def test_running_node_dispatches_written_jobs(real_results: Results, tmp_path: Path) -> None:
    with storescp(tmp_path / "in") as scp:
        node = start_node(
            tmp_path / "node",
            extra_env={
                "SEGNODE_DISPATCH__POLL_SECONDS": "0.1",
                "SEGNODE_DESTINATIONS": json.dumps({"pacs": dimse_dest(scp.port)}),
            },
        )
        try:
            settings = load_settings(storage={"path": node.storage}, database={"url": node.database_url})
            env = Env(settings, Database(node.sessions().kw["bind"], node.sessions()), real_results)
            job_id, _job_uid = env.add_job(["pacs"])
            job = env.wait_state(job_id, "done", "failed")
            assert job.state == "done", job.error
            assert scp.uids() == sorted([real_results.seg_uid, real_results.sr_uid])
            listed = cli(node.env, "destinations", "list")
            assert f"STORESCP@127.0.0.1:{scp.port}" in listed.stdout
        finally:
            assert node.stop() == 0


def test_superseded_while_dispatching_sends_nothing_more(real_results: Results, tmp_path: Path) -> None:
    with scripted_scp(lambda ds, i: 0, ae_title="PACS") as scp:
        env = make_env(tmp_path, real_results, {"pacs": dimse_dest(scp.port, "PACS")})
        job_id, job_uid = env.add_job(["pacs"])
        dispatcher = env.dispatcher()
        assert dispatcher.claim_written() == 1
        with env.db.sessions.begin() as s:  # what the router does when newer content arrives
            job = s.get(Job, job_id)
            assert job is not None
            job.state = "superseded"
        dispatcher.tick()
        wait_for(lambda: env.delivery_state(job_id, "pacs") == "failed", what="the delivery to be dropped")
        dispatcher.stop(timeout=5)
        assert not scp.received
    assert env.job(job_id).state == "superseded"
    failed = [x for t, x in env.events(job_uid) if t == "delivery.failed"]
    assert failed and failed[0]["status"] == "job superseded"


def test_backoff_grows_is_capped_and_jittered() -> None:
    import random

    settings = DispatchSection(backoff_base_seconds=2, backoff_max_seconds=30, jitter=0.5)  # type: ignore[call-arg]
    rng = random.Random(7)
    for attempt, ceiling in [(1, 2), (2, 4), (3, 8), (4, 16), (5, 30), (12, 30)]:
        delays = [backoff_delay(attempt, settings, rng) for _ in range(200)]
        assert all(ceiling * 0.5 <= d <= ceiling for d in delays), (attempt, min(delays), max(delays))
        assert max(delays) - min(delays) > ceiling * 0.3  # actually spread, not a constant
    none = DispatchSection(backoff_base_seconds=2, backoff_max_seconds=30, jitter=0)  # type: ignore[call-arg]
    assert backoff_delay(3, none, rng) == 8
    with pytest.raises(ValueError, match="backoff_max_seconds"):
        DispatchSection(backoff_base_seconds=10, backoff_max_seconds=5)  # type: ignore[call-arg]


def test_a_delivery_left_sending_while_running_is_sent_again(real_results: Results, tmp_path: Path) -> None:
    from datetime import timedelta

    with scripted_scp(lambda ds, i: 0, ae_title="PACS") as scp:
        env = make_env(tmp_path, real_results, {"pacs": dimse_dest(scp.port, "PACS")})
        job_id, _ = env.add_job(["pacs"])
        fresh_id, _ = env.add_job(["pacs"])
        with running(env):
            env.wait_state(job_id, "done", "failed")
            env.wait_state(fresh_id, "done", "failed")
            with env.db.sessions.begin() as s:  # an outcome that could not be recorded, long ago / just now
                for jid, age in ((job_id, 3600), (fresh_id, 0)):
                    job = s.get(Job, jid)
                    assert job is not None
                    job.state = "dispatching"
                    d = s.scalars(select(Delivery).where(Delivery.job_id == jid)).one()
                    d.state, d.last_attempt_at = "sending", utcnow() - timedelta(seconds=age)
                    d.outcomes = {}
            # the running dispatcher releases the old one on its own; the recent one is left alone
            assert env.wait_state(job_id, "done", "failed").state == "done"
            assert env.delivery_state(fresh_id, "pacs") == "sending"  # may still be in flight elsewhere
        assert scp.count(real_results.seg_uid) == 3
