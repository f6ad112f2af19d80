"""The result instances of a job (table ``job_results``, written by the executor)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Integer, String, column, select, table
from sqlalchemy.orm import Session

from node.dispatch.outcome import ResultFile

# Only the columns the dispatcher reads; the executor owns the table (migration 0003).
_JOB_RESULTS = table(
    "job_results",
    column("id", Integer),
    column("job_id", Integer),
    column("kind", String),
    column("path", String),
    column("sop_class_uid", String),
    column("sop_instance_uid", String),
)


def result_files(s: Session, job_id: int, storage_root: Path) -> list[ResultFile]:
    """The job's results in the order written (SEG before the SR that refers to it); paths absolute."""
    c = _JOB_RESULTS.c
    rows = s.execute(
        select(c.path, c.sop_class_uid, c.sop_instance_uid, c.kind).where(c.job_id == job_id).order_by(c.id)
    ).all()
    return [
        ResultFile(
            path=storage_root / str(path),
            sop_class_uid=str(sop_class),
            sop_instance_uid=str(sop_instance),
            kind=str(kind or ""),
        )
        for path, sop_class, sop_instance, kind in rows
    ]


def results_present(s: Session, job_id: int, storage_root: Path) -> bool:
    """True when the job has results and every file is still on disk."""
    files = result_files(s, job_id, storage_root)
    return bool(files) and all(f.path.is_file() for f in files)
