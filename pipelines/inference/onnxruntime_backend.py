"""ONNX Runtime backend: CPU by default; CUDA and TensorRT execution providers when this build has them."""

from __future__ import annotations

import ctypes.util
import importlib.util
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort  # type: ignore[import-untyped]

from pipelines.inference.backend import FloatArray, check_batch, physical_cores
from pipelines.inference.errors import BackendUnavailable, InferenceError
from pipelines.inference.geometry import OutputGeometry

ProviderSpec = str | tuple[str, dict[str, Any]]
_SHORT = {
    "TensorrtExecutionProvider": "tensorrt",
    "CUDAExecutionProvider": "cuda",
    "CPUExecutionProvider": "cpu",
}
_ORT_TYPES: dict[str, type[np.floating[Any]]] = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _tensorrt_libraries_present() -> bool:
    return importlib.util.find_spec("tensorrt") is not None or ctypes.util.find_library("nvinfer") is not None


def auto_providers(
    device_id: int = 0, trt_cache_dir: Path | None = None, trt_fp16: bool = False
) -> list[ProviderSpec]:
    """TensorRT EP (when listed and TensorRT is installed), then CUDA EP (when listed), then CPU."""
    available = set(ort.get_available_providers())
    chosen: list[ProviderSpec] = []
    if "TensorrtExecutionProvider" in available and _tensorrt_libraries_present():
        options: dict[str, Any] = {"device_id": device_id, "trt_fp16_enable": trt_fp16}
        if trt_cache_dir is not None:
            trt_cache_dir.mkdir(parents=True, exist_ok=True)
            options |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(trt_cache_dir)}
        chosen.append(("TensorrtExecutionProvider", options))
    if "CUDAExecutionProvider" in available:
        chosen.append(("CUDAExecutionProvider", {"device_id": device_id}))
    chosen.append("CPUExecutionProvider")
    return chosen


def _static_dims(shape: Sequence[Any]) -> tuple[int, ...] | None:
    return tuple(int(d) for d in shape) if all(isinstance(d, int) and d > 0 for d in shape) else None


@dataclass
class _Worker:
    """One session and its I/O binding; a batch may be split across several workers."""

    session: Any
    binding: Any


class OnnxRuntimeBackend:
    """Reused ``InferenceSession``s with all graph optimisations, I/O bound into reused output buffers.

    ``intra_op_threads`` (default: the physical cores this process may use) is the thread budget.
    ``sessions``: on the CPU a batch of windows can be split between sessions that run concurrently,
    each with its share of the threads; independent windows scale better than one session's parallel
    loops (no barrier per operator, steadier on a busy machine). ``"auto"`` splits a batch of ``n`` into
    the largest divisor of ``n`` not above the thread budget (a batch of 1: one session, all threads;
    2 windows on 2+ cores: 2 sessions); an int fixes the number; GPU providers always use one session.
    Sessions are created on first need; each holds its own copy of the weights. One ``predict`` at a
    time: the backend is not meant to be shared between threads.

    ``geometry`` defaults to what the file's static shapes say (a smaller output is taken as centred),
    else 'same'.
    """

    def __init__(
        self,
        onnx_path: str | Path,
        *,
        providers: Sequence[ProviderSpec] | Literal["auto"] = "auto",
        intra_op_threads: int | None = None,
        sessions: int | Literal["auto"] = "auto",
        geometry: OutputGeometry | None = None,
        device_id: int = 0,
        trt_cache_dir: Path | None = None,
        trt_fp16: bool = False,
        allow_spinning: bool = True,
    ) -> None:
        path = Path(onnx_path)
        if not path.is_file():
            raise InferenceError(f"ONNX file {path} does not exist")
        if sessions != "auto" and (not isinstance(sessions, int) or sessions < 1):
            raise InferenceError(f"sessions must be 'auto' or an int >= 1, got {sessions!r}")
        if providers == "auto":
            chosen = auto_providers(device_id, trt_cache_dir, trt_fp16)
        else:
            available = ort.get_available_providers()
            chosen = list(providers)
            for spec in chosen:
                name = spec if isinstance(spec, str) else spec[0]
                if name not in available:
                    raise BackendUnavailable(
                        f"{name} is not available in this onnxruntime {ort.__version__} build "
                        f"(it has {', '.join(available)}); GPU providers need onnxruntime-gpu"
                    )
        self._path = path
        self._chosen = chosen
        self._threads = int(intra_op_threads or physical_cores())
        self._allow_spinning = allow_spinning
        self._workers: dict[int, list[_Worker]] = {}  # per-session thread count -> workers
        first_worker = self._worker(self._threads)
        self._workers[self._threads] = [first_worker]
        session = first_worker.session
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1:
            raise InferenceError(f"{path} has {len(inputs)} inputs; the engine feeds exactly one")
        self._in_name: str = inputs[0].name
        self._out_name: str = outputs[0].name
        self._in_type = _ORT_TYPES.get(inputs[0].type)
        if self._in_type is None:
            raise InferenceError(
                f"{path} takes {inputs[0].type}; only float and float16 inputs are supported"
            )
        self._out_float32 = outputs[0].type == "tensor(float)"
        in_spatial = _static_dims(list(inputs[0].shape)[2:])
        out_spatial = _static_dims(list(outputs[0].shape)[2:])
        self._input_shape = in_spatial
        if geometry is None:
            geometry = (
                OutputGeometry.from_shapes(in_spatial, out_spatial)
                if in_spatial is not None and out_spatial is not None
                else OutputGeometry.same()
            )
        self._geometry = geometry
        self._providers: list[str] = list(session.get_providers())
        first = self._providers[0]
        on_gpu = first in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
        self._device = f"cuda:{device_id}" if on_gpu else "cpu"
        self._sessions: int | Literal["auto"] = 1 if on_gpu else sessions
        self._name = f"onnxruntime-{_SHORT.get(first, first)}"
        self._buffers: dict[tuple[int, ...], FloatArray] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._executor_size = 0

    def _worker(self, threads: int) -> _Worker:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        spinning = "1" if self._allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(self._path), sess_options=options, providers=self._chosen)
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise InferenceError(f"onnxruntime cannot load {self._path}: {exc}") from exc
        return _Worker(session, session.io_binding())

    @property
    def name(self) -> str:
        return self._name

    @property
    def device(self) -> str:
        return self._device

    @property
    def providers(self) -> list[str]:
        """The execution providers the session actually uses, in priority order."""
        return list(self._providers)

    @property
    def intra_op_threads(self) -> int:
        """The thread budget, shared by the sessions that run one batch."""
        return self._threads

    @property
    def geometry(self) -> OutputGeometry:
        return self._geometry

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        return self._input_shape

    @property
    def onnx_path(self) -> Path:
        return self._path

    def output_shape_for(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        return self._geometry.output_shape_for(input_shape)

    def split_for(self, n: int) -> int:
        """How many sessions share a batch of ``n`` windows."""
        if self._sessions == "auto":
            limit = min(n, self._threads)
            return max(d for d in range(1, limit + 1) if n % d == 0)
        return min(self._sessions, n)

    def _workers_for(self, k: int) -> list[_Worker]:
        threads = max(1, self._threads // k)
        workers = self._workers.setdefault(threads, [])
        while len(workers) < k:
            workers.append(self._worker(threads))
        return workers[:k]

    def _run_all(self, jobs: list[Callable[[], None]]) -> None:
        if len(jobs) == 1:
            jobs[0]()
            return
        if self._executor is None or self._executor_size < len(jobs) - 1:
            if self._executor is not None:
                self._executor.shutdown()
            self._executor_size = len(jobs) - 1
            self._executor = ThreadPoolExecutor(self._executor_size, thread_name_prefix="onnxruntime-batch")
        futures = [self._executor.submit(job) for job in jobs[1:]]
        try:
            jobs[0]()  # this thread runs one share itself
        finally:
            wait(futures)  # never leave a session running behind an error
        for future in futures:
            future.result()

    def predict(self, batch: FloatArray) -> FloatArray:
        check_batch(batch, self._input_shape)
        feed = np.ascontiguousarray(batch, dtype=self._in_type)
        n = int(feed.shape[0])
        k = self.split_for(n)
        workers = self._workers_for(k)
        edges = [round(i * n / k) for i in range(k + 1)]
        parts = [(workers[i], edges[i], edges[i + 1]) for i in range(k)]
        key = tuple(feed.shape)
        buffer = self._buffers.get(key)
        if buffer is None or not self._out_float32:
            # The first batch of a shape learns the output shape; its result becomes the reused buffer.
            results: list[Any] = [None] * k

            def plain(i: int, w: _Worker, a: int, b: int) -> Callable[[], None]:
                def job() -> None:
                    results[i] = w.session.run([self._out_name], {self._in_name: feed[a:b]})[0]

                return job

            self._run_all([plain(i, w, a, b) for i, (w, a, b) in enumerate(parts)])
            out: FloatArray = np.ascontiguousarray(np.concatenate(results), dtype=np.float32)
            if self._out_float32:
                self._buffers[key] = out
            return out
        shape = list(buffer.shape[1:])

        def bound(w: _Worker, a: int, b: int) -> Callable[[], None]:
            def job() -> None:
                w.binding.bind_cpu_input(self._in_name, feed[a:b])
                w.binding.bind_output(
                    self._out_name, "cpu", 0, np.float32, [b - a, *shape], buffer[a:b].ctypes.data
                )
                w.session.run_with_iobinding(w.binding)

            return job

        self._run_all([bound(w, a, b) for w, a, b in parts])
        return buffer

    def close(self) -> None:
        self._buffers.clear()
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None
        for workers in self._workers.values():
            for w in workers:
                w.binding.clear_binding_inputs()
                w.binding.clear_binding_outputs()
