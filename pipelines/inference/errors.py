"""Errors of the inference engine."""

from __future__ import annotations


class InferenceError(ValueError):
    """A request the engine cannot serve: a bad configuration, or a model whose output contradicts it."""


class BackendUnavailable(RuntimeError):
    """A backend whose runtime (package, GPU, execution provider) is missing on this machine."""


class ExportParityError(RuntimeError):
    """An exported ONNX file whose predictions differ from the PyTorch module beyond the tolerance."""

    def __init__(self, message: str, max_abs_diff: float) -> None:
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
