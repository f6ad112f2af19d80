"""Inference engine: sliding-window and single-patch inference over one backend interface.

Usage (``volume`` is channel-first, ``(C, D, H, W)``; the result is ``(K, D, H, W)`` float32)::

    backend = create_backend("onnxruntime", onnx_path=bundle / "model.onnx")  # or "torch", "tensorrt"
    config = SlidingWindowConfig(patch_size=(64, 128, 128), overlap=0.5, batch_size=2, activation="softmax")
    probabilities = SlidingWindowInferer(backend, config)(volume)
"""

from pipelines.inference.backend import Backend, FloatArray, TensorBackend, physical_cores
from pipelines.inference.errors import BackendUnavailable, ExportParityError, InferenceError
from pipelines.inference.export import ExportResult, export_onnx
from pipelines.inference.factory import BACKEND_KINDS, backend_status, create_backend
from pipelines.inference.geometry import OutputGeometry
from pipelines.inference.onnxruntime_backend import OnnxRuntimeBackend
from pipelines.inference.sliding_window import (
    InferenceOptions,
    SlidingWindowConfig,
    SlidingWindowInferer,
    single_patch_inference,
    sliding_window_inference,
    tta_flips,
)
from pipelines.inference.tensorrt_backend import TensorRTBackend
from pipelines.inference.tiling import importance_map, window_starts
from pipelines.inference.torch_backend import TorchBackend

__all__ = [
    "BACKEND_KINDS",
    "Backend",
    "BackendUnavailable",
    "ExportParityError",
    "ExportResult",
    "FloatArray",
    "InferenceError",
    "InferenceOptions",
    "OnnxRuntimeBackend",
    "OutputGeometry",
    "SlidingWindowConfig",
    "SlidingWindowInferer",
    "TensorBackend",
    "TensorRTBackend",
    "TorchBackend",
    "backend_status",
    "create_backend",
    "export_onnx",
    "importance_map",
    "physical_cores",
    "single_patch_inference",
    "sliding_window_inference",
    "tta_flips",
    "window_starts",
]
