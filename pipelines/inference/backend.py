"""The one interface between the sliding-window engine and a model runtime.

A backend takes a batch of windows ``(N, C, *spatial)`` float32 and returns ``(N, K, *out_spatial)``
float32, where ``out_spatial == geometry.output_shape_for(spatial)``. The returned array belongs to the
caller until the next ``predict`` call: backends may hand out a reused buffer (ONNX Runtime's I/O
binding, a CUDA graph's static output) and the engine may overwrite it in place.

Backends that hold their model on a torch device also implement ``TensorBackend``: the engine then keeps
the volume, the windows and the blending buffers on that device and transfers only the input volume and
the final result.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, TypeAlias, runtime_checkable

import numpy as np
import numpy.typing as npt
import torch

from pipelines.inference.errors import InferenceError
from pipelines.inference.geometry import OutputGeometry

FloatArray: TypeAlias = npt.NDArray[np.float32]


@runtime_checkable
class Backend(Protocol):
    @property
    def name(self) -> str:
        """Short label for logs and timings, e.g. ``torch-cuda-fp16``."""
        ...

    @property
    def device(self) -> str:
        """Where the model runs: ``cpu``, ``cuda:0``."""
        ...

    @property
    def geometry(self) -> OutputGeometry: ...

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """The spatial input size the model requires, or None when any size works."""
        ...

    def output_shape_for(self, input_shape: Sequence[int]) -> tuple[int, ...]: ...

    def predict(self, batch: FloatArray) -> FloatArray: ...

    def close(self) -> None: ...


@runtime_checkable
class TensorBackend(Backend, Protocol):
    @property
    def torch_device(self) -> torch.device: ...

    def predict_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """Like ``predict`` for a float32 tensor on ``torch_device``; returns float32 on that device."""
        ...


def check_batch(batch: FloatArray, input_shape: tuple[int, ...] | None) -> None:
    """Refuse what no model accepts: a wrong rank or dtype, an empty batch, a wrong fixed shape."""
    if batch.dtype != np.float32:
        raise InferenceError(f"batch must be float32, got {batch.dtype}")
    if batch.ndim < 3 or batch.shape[0] < 1:
        raise InferenceError(f"batch must be (N>=1, C, *spatial), got shape {batch.shape}")
    if input_shape is not None and tuple(batch.shape[2:]) != input_shape:
        raise InferenceError(f"this model takes spatial input {input_shape}, got {tuple(batch.shape[2:])}")


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once); the best thread count."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores: set[tuple[str, str]] = set()
    for cpu in allowed:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topo / "physical_package_id").read_text().strip()
            core = (topo / "core_id").read_text().strip()
        except OSError:
            return len(allowed)
        cores.add((package, core))
    return max(1, len(cores))
