"""The one interface between the node and a pipeline.

The node (executor, ``segnode run-pipeline``) builds a ``PipelineRequest`` and calls
``Pipeline.run``; it never imports model code. A pipeline refuses input it cannot process
correctly by raising ``PipelineError`` with a short machine-readable ``reason`` (for the audit
trail) and a message for people.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class PipelineError(Exception):
    """Refusal with a named reason, e.g. ``mixed_orientations``, ``gantry_tilt``, ``model_missing``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class PipelineRequest:
    series_files: Sequence[Path]
    output_dir: Path
    models_dir: Path
    parameters: Mapping[str, Any] = field(default_factory=dict)
    # Folded into the deterministic UIDs of the results, so that a re-run replaces earlier results.
    rule_version: str = "0"
    device: str = "cpu"


@dataclass
class PipelineOutput:
    files: list[Path]
    measurements: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Pipeline(Protocol):
    name: str

    def run(self, request: PipelineRequest) -> PipelineOutput: ...
