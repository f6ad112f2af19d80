"""PyTorch backend: eager by default; autocast (fp16/bf16), ``torch.compile`` and CUDA graphs as options."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from pipelines.inference.backend import FloatArray, check_batch
from pipelines.inference.errors import BackendUnavailable, InferenceError
from pipelines.inference.geometry import OutputGeometry

AmpMode = Literal["fp16", "bf16"]
_AMP_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_torch_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable(
                f"device {dev} asked for, but CUDA is not available (torch {torch.__version__}, "
                f"built with CUDA {torch.version.cuda or 'no'}; no GPU visible)"
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise InferenceError(f"device {dev} is not supported: use cpu or cuda[:N]")
    return dev


class TorchBackend:
    """Runs a ``torch.nn.Module`` in eval mode without autograd.

    - ``amp``: autocast to fp16 (CUDA only) or bf16 (CUDA or CPU); weights stay fp32, outputs are
      returned as float32.
    - ``compile``: wrap the module in ``torch.compile`` (``compile_mode``, default inductor's default).
    - ``cuda_graphs``: capture one CUDA graph per batch shape and replay it; with ``compile`` as well,
      ``torch.compile(mode="reduce-overhead")`` does the capturing instead.
    - ``channels_last``: run a 3D network in channels-last memory format.
    - ``geometry``: for 'valid'-padding networks, where the output lies in the input.
    - ``input_shape``: the fixed spatial input size for models that need one (single-patch mode).

    The module is moved to the device and put in eval mode in place.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        device: str | torch.device = "cpu",
        *,
        amp: AmpMode | None = None,
        compile: bool = False,
        compile_mode: str | None = None,
        cuda_graphs: bool = False,
        channels_last: bool = False,
        geometry: OutputGeometry | None = None,
        input_shape: Sequence[int] | None = None,
        output_index: int = 0,
    ) -> None:
        self._device = resolve_torch_device(device)
        if amp is not None and amp not in _AMP_DTYPES:
            raise InferenceError(f"amp must be one of {sorted(_AMP_DTYPES)} or None, got {amp!r}")
        if amp == "fp16" and self._device.type != "cuda":
            raise InferenceError("fp16 autocast is for CUDA devices; use amp='bf16' on CPU")
        if cuda_graphs and self._device.type != "cuda":
            raise InferenceError("cuda_graphs needs a CUDA device")
        self._amp = amp
        self._geometry = geometry or OutputGeometry.same()
        self._input_shape = tuple(int(s) for s in input_shape) if input_shape is not None else None
        self._output_index = output_index
        self._channels_last = channels_last
        module = module.to(self._device).eval()
        if channels_last:
            module = module.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        self._module = module
        self._forward: Callable[..., Any] = module
        self._compiled_graphs = compile and cuda_graphs
        self._manual_graphs = cuda_graphs and not compile
        if compile:
            mode = "reduce-overhead" if cuda_graphs else compile_mode
            self._forward = torch.compile(module, mode=mode, dynamic=False)
        self._graphs: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, torch.cuda.CUDAGraph]] = {}
        parts = ["torch", self._device.type, amp or "fp32"]
        parts += ["compile"] if compile else []
        parts += ["graphs"] if cuda_graphs else []
        parts += ["cl"] if channels_last else []
        self._name = "-".join(parts)

    @property
    def name(self) -> str:
        return self._name

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def torch_device(self) -> torch.device:
        return self._device

    @property
    def geometry(self) -> OutputGeometry:
        return self._geometry

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        return self._input_shape

    @property
    def module(self) -> torch.nn.Module:
        return self._module

    def output_shape_for(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        return self._geometry.output_shape_for(input_shape)

    def predict(self, batch: FloatArray) -> FloatArray:
        check_batch(batch, self._input_shape)
        x = torch.from_numpy(batch).to(self._device, non_blocking=False)
        y = self.predict_tensor(x)
        out: FloatArray = y.detach().to("cpu").contiguous().numpy()
        return out

    def predict_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dtype != torch.float32 or batch.device != self._device:
            raise InferenceError(f"expected float32 on {self._device}, got {batch.dtype} on {batch.device}")
        if self._input_shape is not None and tuple(batch.shape[2:]) != self._input_shape:
            raise InferenceError(
                f"this model takes spatial input {self._input_shape}, got {tuple(batch.shape[2:])}"
            )
        if self._manual_graphs:
            return self._replay(batch)
        if self._compiled_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
        with torch.no_grad(), self._autocast(cache_enabled=True):
            return self._run(batch)

    def close(self) -> None:
        self._graphs.clear()

    # internals

    def _autocast(self, cache_enabled: bool) -> contextlib.AbstractContextManager[Any]:
        if self._amp is None:
            return contextlib.nullcontext()
        return torch.autocast(
            device_type=self._device.type, dtype=_AMP_DTYPES[self._amp], cache_enabled=cache_enabled
        )

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self._channels_last and x.ndim == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        y = self._forward(x)
        if isinstance(y, list | tuple):
            y = y[self._output_index]
        if not isinstance(y, torch.Tensor):
            raise InferenceError(
                f"the module returned {type(y).__name__}, expected a tensor (or a tuple of them)"
            )
        return y.float()

    def _replay(self, batch: torch.Tensor) -> torch.Tensor:
        key = tuple(batch.shape)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(key)
            self._graphs[key] = entry
        static_in, static_out, graph = entry
        static_in.copy_(batch)
        graph.replay()
        return static_out

    def _capture(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.CUDAGraph]:
        with torch.no_grad():
            static_in = torch.zeros(shape, device=self._device)
        side = torch.cuda.Stream(device=self._device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side), torch.no_grad(), self._autocast(cache_enabled=False):
            for _ in range(3):  # warm up cuDNN autotuning and the allocator outside the capture
                self._run(static_in)
        torch.cuda.current_stream(self._device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), self._autocast(cache_enabled=False), torch.cuda.graph(graph):
            static_out = self._run(static_in)
        return static_in, static_out, graph
