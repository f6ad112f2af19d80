"""A worker process: runs pipelines for the executor, one task at a time, keeping loaded pipelines warm.

It never touches the database: it gets a ``Task`` over a pipe, writes the results into the task's staging
folder (fsynced), and answers with ``TaskDone`` (file descriptions), ``TaskRefused`` (a ``PipelineError``:
bad input, not retried) or ``TaskCrashed`` (any other exception: retried). A hard crash (segfault, OOM kill)
simply ends the process; the executor sees that. When the node process dies (even by SIGKILL) the worker
notices its parent is gone and exits, so an orphan never keeps running a job.

With ``preload`` (``executor.preload_pipelines``) a new worker imports every registered pipeline's code
(torch, onnxruntime, highdicom, ...: seconds of CPU) before it waits for its first task, so that a job
does not wait for those imports (``pipelines.registry.preload_code``). Models are opened by the pipelines
on their first job and kept with the pipeline object (``pipelines.bundles.warm``) for the next ones.
"""

from __future__ import annotations

import gc
import hashlib
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

EVICT = "evict"


@dataclass(frozen=True)
class Task:
    job_uid: str
    attempt: int
    pipeline: str
    series_files: list[str]
    output_dir: str  # the staging folder: results/<job uid>/.attempt-<n>
    models_dir: str
    parameters: dict[str, Any]
    rule_version: str
    device: str
    evict: bool = False  # drop the other warm pipelines first (memory budget)


@dataclass(frozen=True)
class ResultInfo:
    name: str  # file name inside the staging folder
    kind: str  # seg | sr | other modality, lower case
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    sha256: str
    size: int


@dataclass(frozen=True)
class TaskDone:
    job_uid: str
    attempt: int
    files: list[ResultInfo]
    measurements: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warm: bool = False  # the pipeline was already loaded in this worker


@dataclass(frozen=True)
class TaskRefused:
    job_uid: str
    attempt: int
    reason: str
    message: str


@dataclass(frozen=True)
class TaskCrashed:
    job_uid: str
    attempt: int
    error: str


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def describe(path: Path) -> ResultInfo:
    """UIDs, kind, hash and size of one result instance (and fsync it)."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    _fsync_file(path)
    modality = str(ds.get("Modality", "") or "").strip()
    return ResultInfo(
        name=path.name,
        kind=modality.lower() or "other",
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        sha256=h.hexdigest(),
        size=path.stat().st_size,
    )


def run_task(task: Task, cache: dict[str, Any]) -> TaskDone | TaskRefused | TaskCrashed:
    from pipelines.base import PipelineError, PipelineRequest
    from pipelines.registry import load_pipeline

    out = Path(task.output_dir)
    try:
        if task.evict:
            for name in [n for n in cache if n != task.pipeline]:
                del cache[name]
            gc.collect()
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        warm = task.pipeline in cache
        pipeline = cache.get(task.pipeline)
        if pipeline is None:
            pipeline = load_pipeline(task.pipeline)
            cache[task.pipeline] = pipeline
        request = PipelineRequest(
            series_files=[Path(p) for p in task.series_files],
            output_dir=out,
            models_dir=Path(task.models_dir),
            parameters=dict(task.parameters),
            rule_version=task.rule_version,
            device=task.device,
        )
        output = pipeline.run(request)
        infos = []
        for f in output.files:
            p = Path(f)
            if p.parent.resolve() != out.resolve():
                raise RuntimeError(f"pipeline {task.pipeline} wrote {p} outside its output folder {out}")
            infos.append(describe(p))
        if not infos:
            raise PipelineError("no_output", f"pipeline {task.pipeline} produced no result instances")
        return TaskDone(
            task.job_uid,
            task.attempt,
            infos,
            measurements=dict(output.measurements),
            timings=dict(output.timings),
            notes=list(output.notes),
            warm=warm,
        )
    except PipelineError as exc:
        shutil.rmtree(out, ignore_errors=True)
        return TaskRefused(task.job_uid, task.attempt, exc.reason, exc.message)
    except Exception as exc:  # anything else is a transient failure for the executor
        shutil.rmtree(out, ignore_errors=True)
        cache.pop(task.pipeline, None)  # its state may be broken (e.g. out of device memory)
        gc.collect()
        detail = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        return TaskCrashed(task.job_uid, task.attempt, detail)


def _watch_parent(parent_pid: int, interval: float = 0.5) -> None:
    """Exit at once when the node process is gone (its children are re-parented)."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(70)
            time.sleep(interval)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker_main(conn: Connection, name: str, parent_pid: int, preload: bool = False) -> None:
    """Entry point of the worker process: serve tasks until told to stop (None) or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the node, which stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _watch_parent(parent_pid)
    if preload:
        from pipelines.registry import preload_code

        for problem in preload_code():
            print(f"segnode {name}: cannot preload pipeline {problem}", file=sys.stderr, flush=True)
    cache: dict[str, Any] = {}
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        if task == EVICT:  # the memory budget needs this worker's warm pipelines gone
            cache.clear()
            gc.collect()
            continue
        conn.send(run_task(task, cache))
