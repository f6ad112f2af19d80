"""The node on a real PostgreSQL 15 (throwaway cluster on 127.0.0.1): migrations, ingest, concurrency."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from node.db.models import AuditEvent, Instance, Series
from tests.conftest import REPO, SEGNODE, RunningNode, start_node, wait_for
from tests.dimse_peers import send_datasets, storescu
from tests.factories import SeriesSpec, ct_series, write_series

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_node(tmp_path: Path, postgres_url: str) -> Iterator[RunningNode]:
    running = start_node(tmp_path / "st", database_url=postgres_url)
    yield running
    running.stop()


def test_db_upgrade_command_on_postgres(postgres_url: str, tmp_path: Path) -> None:
    env = {
        "SEGNODE_DATABASE__URL": postgres_url,
        "SEGNODE_STORAGE__PATH": str(tmp_path),
        "PATH": "/usr/bin:/bin",
    }
    for _ in range(2):  # idempotent
        proc = subprocess.run(
            [*SEGNODE, "db", "upgrade"], env=env, capture_output=True, text=True, cwd=REPO, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        assert "database at revision 0004" in proc.stdout


def test_store_series_and_complete_on_postgres(pg_node: RunningNode, tmp_path: Path) -> None:
    spec = SeriesSpec(n=10)
    proc = storescu(pg_node, write_series(ct_series(spec), tmp_path / "in"))
    assert proc.returncode == 0, proc.stderr

    def complete() -> bool:
        with pg_node.sessions()() as s:
            row = s.scalar(select(Series).where(Series.series_uid == spec.series_uid))
            return row is not None and row.state == "complete"

    wait_for(complete, what="completion")
    with pg_node.sessions()() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 10
        kinds = s.scalars(
            select(AuditEvent.event_type)
            .where(AuditEvent.study_uid == spec.study_uid)
            .order_by(AuditEvent.id)
        ).all()
    # the router runs as soon as the series completes: its events may already follow
    head, rest = kinds[:11], kinds[11:]
    assert head == ["instance.stored"] * 10 + ["series.completed"]
    assert all(kind.startswith(("route.", "job.")) for kind in rest), rest
    listing = pg_node.cli("studies", "list", "--json")
    assert spec.series_uid in listing.stdout


def test_parallel_associations_same_instances_on_postgres(pg_node: RunningNode) -> None:
    """Concurrent stores of the same SOP Instance UID: exactly one copy, the rest duplicates."""
    shared = ct_series(SeriesSpec(n=6))
    own = [ct_series(SeriesSpec(n=4)) for _ in range(10)]
    results: dict[int, list[int]] = {}

    def worker(i: int) -> None:
        results[i] = send_datasets(pg_node, shared + own[i], calling=f"PG{i}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert all(v == [0] * 10 for v in results.values()) and len(results) == 10, results
    with pg_node.sessions()() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 6 + 40
        versions = s.scalars(select(Instance.version).where(Instance.series_id.is_not(None))).all()
        assert set(versions) == {1}
        dups = s.scalar(
            select(func.count()).select_from(AuditEvent).where(AuditEvent.event_type == "instance.duplicate")
        )
        shared_count = s.scalar(
            select(Series.instance_count).where(Series.series_uid == shared[0].SeriesInstanceUID)
        )
    assert dups == 9 * 6
    assert shared_count == 6
    assert len(list((pg_node.storage / "spool").rglob("*.dcm"))) == 46
