"""Pipelines known to the node, by name, loaded lazily so that the node imports no model code."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from pipelines.base import Pipeline, PipelineError


@dataclass(frozen=True)
class PipelineInfo:
    name: str
    entry_point: str  # "module:attribute", a class taking no arguments
    description: str


PIPELINES: dict[str, PipelineInfo] = {
    info.name: info
    for info in (
        PipelineInfo(
            "ct-liver",
            "pipelines.ct_liver.pipeline:CtLiverPipeline",
            "Liver and liver lesions on CT (and liver on MR): DICOM-SEG with two segments, SR with volumes.",
        ),
        PipelineInfo(
            "mri-cardiac",
            "pipelines.mri_cardiac.pipeline:MriCardiacPipeline",
            "RV, LV myocardium and LV on cine short-axis MRI at ED and ES: SEGs and an SR with function.",
        ),
    )
}


def pipeline_names() -> list[str]:
    return sorted(PIPELINES)


def preload_code() -> list[str]:
    """Import the code of every registered pipeline and load the SEG/SR writer's tables, so that a worker
    process's first job does not wait seconds for them. Returns what could not be loaded, and why; the
    job that needs such a pipeline fails with the same error, so nothing is raised here."""
    problems = []
    for info in PIPELINES.values():
        module = info.entry_point.partition(":")[0]
        try:
            importlib.import_module(module)
        except Exception as exc:  # ImportError, or a module failing at import time
            problems.append(f"{info.name}: {type(exc).__name__}: {exc}")
    try:
        from pipelines.outputs.tables import preload_tables

        preload_tables()
    except Exception as exc:
        problems.append(f"SEG/SR tables: {type(exc).__name__}: {exc}")
    return problems


def load_pipeline(name: str) -> Pipeline:
    info = PIPELINES.get(name)
    if info is None:
        raise PipelineError("unknown_pipeline", f"no pipeline {name!r}; known: {', '.join(pipeline_names())}")
    module_name, _, attr = info.entry_point.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PipelineError("pipeline_unavailable", f"pipeline {name!r} cannot be loaded: {exc}") from exc
    pipeline: Pipeline = getattr(module, attr)()
    return pipeline
