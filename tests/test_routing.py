"""Routing in a running node: completed series -> rules -> exactly one job per matching rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import select

from node.db.models import AuditEvent, Job, Series
from tests.conftest import RunningNode, wait_for
from tests.dimse_peers import send_datasets, storescu
from tests.factories import SeriesSpec, ct_series, write_series


def abdomen(n: int = 22, **kw: Any) -> list[Dataset]:
    datasets = ct_series(SeriesSpec(n=n, description="ABDOMEN PV", **kw))
    for ds in datasets:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BodyPartExamined = "ABDOMEN"
    return datasets


def jobs(node: RunningNode, **where: Any) -> list[Job]:
    with node.sessions()() as s:
        q = select(Job).order_by(Job.id)
        for k, v in where.items():
            q = q.where(getattr(Job, k) == v)
        return list(s.scalars(q).all())


def trail(node: RunningNode, study_uid: str) -> list[str]:
    with node.sessions()() as s:
        return list(
            s.scalars(
                select(AuditEvent.event_type).where(AuditEvent.study_uid == study_uid).order_by(AuditEvent.id)
            ).all()
        )


def routed(node: RunningNode, series_uid: str, generation: int = 1) -> bool:
    with node.sessions()() as s:
        row = s.scalar(select(Series).where(Series.series_uid == series_uid))
        return row is not None and row.routed_generation >= generation


def test_matching_series_creates_one_job_even_when_sent_twice(node: RunningNode, tmp_path: Path) -> None:
    datasets = abdomen()
    study, series = datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID
    paths = write_series(datasets, tmp_path / "ct")
    assert storescu(node, paths, calling="CTSCANNER").returncode == 0
    wait_for(lambda: routed(node, series), what="routing")
    (job,) = jobs(node)
    assert (job.rule_name, job.rule_version, job.pipeline, job.state, job.lane) == (
        "ct-liver",
        1,
        "ct-liver",
        "queued",
        "routine",
    )
    assert job.series_uids == [series] and job.destinations == ["sender"]
    assert job.sender_ae == "CTSCANNER" and job.sender_host == "127.0.0.1"
    assert trail(node, study) == ["instance.stored"] * 22 + ["series.completed", "job.created"]

    # the same series again: identical instances are duplicates, the series is not re-opened
    assert storescu(node, paths, calling="CTSCANNER").returncode == 0
    with node.sessions()() as s:
        row = s.scalar(select(Series).where(Series.series_uid == series))
        assert row is not None and (row.state, row.generation) == ("complete", 1)
    assert len(jobs(node)) == 1
    assert trail(node, study)[-22:] == ["instance.duplicate"] * 22

    listed = json.loads(node.cli("jobs", "list", "--json").stdout)
    assert [j["uid"] for j in listed] == [job.uid]
    shown = node.cli("jobs", "show", str(job.id)).stdout
    assert "job.created" in shown and "ct-liver" in shown
    assert listed == json.loads(node.cli("jobs", "list", "--state", "queued", "--json").stdout)


def test_superseded_series_gets_a_new_job_that_supersedes_the_old(node: RunningNode) -> None:
    datasets = abdomen()
    series = datasets[0].SeriesInstanceUID
    assert send_datasets(node, datasets) == [0] * 22
    wait_for(lambda: routed(node, series), what="first routing")
    late = abdomen(n=1, study_uid=datasets[0].StudyInstanceUID, series_uid=series)[0]
    late.ImagePositionPatient = [0, 0, 99.0]
    assert send_datasets(node, [late]) == [0]
    wait_for(lambda: routed(node, series, generation=2), what="second routing")
    first, second = jobs(node)
    assert first.state == "superseded" and second.state == "queued"
    assert second.supersedes_job_id == first.id
    assert second.series_generations == [2]
    events = trail(node, datasets[0].StudyInstanceUID)
    assert events[-4:] == ["instance.stored", "series.completed", "job.created", "job.superseded"]
    assert events.count("series.reopened") == 1


def test_no_match_and_own_output_are_audited(node: RunningNode) -> None:
    mr = ct_series(SeriesSpec(n=3, modality="MR"))
    own = abdomen()
    for ds in own:
        ds.Manufacturer = "segnode"
    assert send_datasets(node, mr) == [0] * 3
    assert send_datasets(node, own) == [0] * 22
    wait_for(
        lambda: routed(node, mr[0].SeriesInstanceUID) and routed(node, own[0].SeriesInstanceUID),
        what="routing",
    )
    assert jobs(node) == []
    with node.sessions()() as s:
        no_match = s.scalar(select(AuditEvent).where(AuditEvent.event_type == "route.no_match"))
        skipped = s.scalar(select(AuditEvent).where(AuditEvent.event_type == "route.skipped"))
    assert no_match is not None and no_match.series_uid == mr[0].SeriesInstanceUID
    assert set(no_match.details["reasons"]) == {"ct-liver", "mri-cardiac"}
    assert "modality" in no_match.details["reasons"]["ct-liver"]
    assert skipped is not None and skipped.series_uid == own[0].SeriesInstanceUID
    assert "segnode's own" in skipped.details["reason"]

    backtest = json.loads(node.cli("rules", "backtest", "--since", "1h", "--json").stdout)
    by_series = {b["series_uid"]: b for b in backtest}
    assert by_series[mr[0].SeriesInstanceUID]["would_match"] == []
    assert by_series[own[0].SeriesInstanceUID]["skipped"]


def test_study_level_rule_gathers_matching_series_into_one_job(node: RunningNode, tmp_path: Path) -> None:
    rule = tmp_path / "study.yaml"
    rule.write_text(
        "name: multiphase\nlevel: study\npriority: 10\npriority_lane: stat\n"
        "match: {all: [{fact: modality, equals: CT}, {attribute: SeriesDescription, regex: PHASE}]}\n"
        "pipeline: {name: ct-liver, parameters: {phase: all}}\n"
    )
    node.cli("rules", "add", str(rule), "--author", "test")
    node.cli("rules", "disable", "ct-liver")
    spec = SeriesSpec(n=3)
    arterial = ct_series(SeriesSpec(n=3, study_uid=spec.study_uid, description="ARTERIAL PHASE"))
    venous = ct_series(SeriesSpec(n=3, study_uid=spec.study_uid, description="VENOUS PHASE"))
    other = ct_series(SeriesSpec(n=3, study_uid=spec.study_uid, description="TOPOGRAM"))
    assert send_datasets(node, arterial + venous + other) == [0] * 9
    wait_for(lambda: jobs(node, rule_name="multiphase"), what="the study job", timeout=60)
    (job,) = jobs(node)
    assert job.level == "study" and job.lane == "stat" and job.parameters == {"phase": "all"}
    assert sorted(job.series_uids) == sorted([arterial[0].SeriesInstanceUID, venous[0].SeriesInstanceUID])
    assert job.rule_version == 1


def test_router_runs_a_pass_when_woken(tmp_path: Path) -> None:
    """The completion monitor wakes the router: a pass runs at once, not at the next poll (60 s here)."""
    from node.route.router import Router
    from node.route.store import RuleStore
    from node.service import Database
    from node.settings import Settings

    class CountingStore(RuleStore):
        passes = 0

        def signature(self) -> tuple[object, ...]:
            CountingStore.passes += 1  # read once at the start of every routing pass
            return super().signature()

    db = Database.open(Settings(storage={"path": tmp_path}))
    router = Router(db.sessions, CountingStore(db.sessions, []), tmp_path, quiet_seconds=5, poll_seconds=60)
    router.start()
    try:
        router.wake()
        wait_for(lambda: CountingStore.passes >= 1, timeout=20, what="a routing pass after wake()")
        router.wake()
        wait_for(lambda: CountingStore.passes >= 2, timeout=20, what="a second pass after wake()")
    finally:
        router.stop()
    assert router._thread is not None and not router._thread.is_alive()
