"""Sliding-window and single-patch inference over a channel-first volume ``(C, *spatial)``.

Blending: every window's prediction is multiplied by the importance map (Gaussian by default) and added
into one preallocated float32 buffer; the weights' sum is added into another; the result is divided once
at the end. Window placement and weights equal MONAI's ``sliding_window_inference`` with the same patch,
overlap and mode, so both give the same numbers.

Activation (``sigmoid``/``softmax`` over channels, or ``none``) is applied either after blending
(``activation_stage="after_blend"``, the default: logits are blended, as nnU-Net v2 does) or to each
window before blending (``"per_window"``: probabilities are blended, as
``sliding_window_inference(..., predictor=lambda x: softmax(model(x)))`` does). With test-time
augmentation the flipped predictions are averaged at the same stage.

Where the work happens: on the backend's torch device for ``TensorBackend``s (torch, TensorRT), so a
GPU run keeps the volume, windows and buffers on the GPU; on the CPU otherwise (onnxruntime), with the
window batch handed to the backend as a NumPy view of a reused buffer.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from pipelines.inference.backend import Backend, FloatArray, TensorBackend
from pipelines.inference.errors import InferenceError
from pipelines.inference.tiling import BlendMode, importance_map, window_starts

Activation = Literal["none", "sigmoid", "softmax"]
ActivationStage = Literal["after_blend", "per_window"]
PadMode = Literal["constant", "reflect", "replicate"]
Volume = npt.NDArray[np.floating] | torch.Tensor

_ACTIVATIONS = ("none", "sigmoid", "softmax")
_STAGES = ("after_blend", "per_window")
_PAD_MODES = ("constant", "reflect", "replicate")


def tta_flips(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every combination of mirrored spatial axes, the identity first (2**len(axes) predictions)."""
    axes = tuple(sorted(set(axes)))
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


def activate_(t: torch.Tensor, activation: Activation, channel_dim: int) -> torch.Tensor:
    """Apply the activation in place over ``channel_dim``."""
    if activation == "sigmoid":
        t.sigmoid_()
    elif activation == "softmax":
        t.sub_(t.amax(dim=channel_dim, keepdim=True))
        t.exp_()
        t.div_(t.sum(dim=channel_dim, keepdim=True))
    return t


@dataclass(frozen=True, kw_only=True)
class InferenceOptions:
    """What both modes share: padding, activation and test-time augmentation."""

    pad_mode: PadMode = "constant"
    pad_value: float = 0.0
    activation: Activation = "none"
    activation_stage: ActivationStage = "after_blend"
    tta_axes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "tta_axes", tuple(int(a) for a in self.tta_axes))
        if self.pad_mode not in _PAD_MODES:
            raise InferenceError(f"pad_mode must be one of {_PAD_MODES}, got {self.pad_mode!r}")
        if self.activation not in _ACTIVATIONS:
            raise InferenceError(f"activation must be one of {_ACTIVATIONS}, got {self.activation!r}")
        if self.activation_stage not in _STAGES:
            raise InferenceError(f"activation_stage must be one of {_STAGES}, got {self.activation_stage!r}")
        if len(set(self.tta_axes)) != len(self.tta_axes) or any(a < 0 for a in self.tta_axes):
            raise InferenceError(f"tta_axes must be distinct spatial axes (0 = first), got {self.tta_axes}")


@dataclass(frozen=True, kw_only=True)
class SlidingWindowConfig(InferenceOptions):
    """``patch_size``: the window the model sees; ``overlap`` in [0, 1) per axis or for all; ``batch_size``
    windows per model call; ``blend``: ``gaussian`` (sigma = ``sigma_scale`` * tile) or ``constant``."""

    patch_size: tuple[int, ...]
    overlap: float | tuple[float, ...] = 0.5
    batch_size: int = 2
    blend: BlendMode = "gaussian"
    sigma_scale: float = 0.125

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if not self.patch_size or any(p < 1 for p in self.patch_size):
            raise InferenceError(
                f"patch_size must be positive sizes, one per spatial axis, got {self.patch_size}"
            )
        overlaps = (
            (self.overlap,) * len(self.patch_size) if isinstance(self.overlap, int | float) else self.overlap
        )
        overlaps = tuple(float(o) for o in overlaps)
        if len(overlaps) != len(self.patch_size) or not all(0.0 <= o < 1.0 for o in overlaps):
            raise InferenceError(f"overlap must be in [0, 1), one value or one per axis, got {self.overlap}")
        object.__setattr__(self, "overlap", overlaps)
        if self.batch_size < 1:
            raise InferenceError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.blend not in ("gaussian", "constant"):
            raise InferenceError(f"blend must be 'gaussian' or 'constant', got {self.blend!r}")
        if self.sigma_scale <= 0:
            raise InferenceError(f"sigma_scale must be > 0, got {self.sigma_scale}")
        if any(a >= len(self.patch_size) for a in self.tta_axes):
            raise InferenceError(
                f"tta_axes {self.tta_axes} name axes beyond the {len(self.patch_size)} spatial ones"
            )

    @property
    def overlaps(self) -> tuple[float, ...]:
        assert isinstance(self.overlap, tuple)
        return self.overlap


def _region(start: Sequence[int], size: Sequence[int]) -> tuple[slice, ...]:
    return (slice(None), *(slice(s, s + n) for s, n in zip(start, size, strict=True)))


def _pad_arg(lo: Sequence[int], hi: Sequence[int]) -> list[int]:
    """F.pad wants (last_lo, last_hi, ..., first_lo, first_hi)."""
    out: list[int] = []
    for a, b in zip(reversed(lo), reversed(hi), strict=True):
        out += [a, b]
    return out


class _WindowPredictor:
    """Calls the backend on a batch of windows, with TTA and per-window activation; checks shapes."""

    def __init__(self, backend: Backend, options: InferenceOptions, ndim: int) -> None:
        self.backend = backend
        self.options = options
        # Checked once: isinstance against a runtime protocol inspects attributes on every call.
        self.tensor_backend: TensorBackend | None = backend if isinstance(backend, TensorBackend) else None
        self.device = self.tensor_backend.torch_device if self.tensor_backend else torch.device("cpu")
        self.flips = tta_flips(options.tta_axes)
        if any(a >= ndim for a in options.tta_axes):
            raise InferenceError(f"tta_axes {options.tta_axes}: there are {ndim} spatial axes")
        if len(self.flips) > 1 and not backend.geometry.is_centred:
            raise InferenceError(
                f"test-time flips need an output centred in the input; this model's is {backend.geometry}"
            )
        self._tta_acc: torch.Tensor | None = None

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        if self.tensor_backend is not None:
            y = self.tensor_backend.predict_tensor(x)
        else:
            y = torch.from_numpy(self.backend.predict(x.numpy()))
        tile = self.backend.output_shape_for(x.shape[2:])
        if y.ndim != x.ndim or y.shape[0] != x.shape[0] or tuple(y.shape[2:]) != tile:
            raise InferenceError(
                f"{self.backend.name} returned {tuple(y.shape)} for input {tuple(x.shape)}; expected "
                f"({x.shape[0]}, K, {', '.join(map(str, tile))}) from its geometry {self.backend.geometry}: "
                "declare the network's output crop with OutputGeometry"
            )
        if self.options.activation_stage == "per_window":
            activate_(y, self.options.activation, 1)
        return y

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.flips) == 1:
            return self._call(x)
        acc: torch.Tensor | None = None
        for flip in self.flips:
            dims = [a + 2 for a in flip]
            y = self._call(torch.flip(x, dims) if dims else x)
            if dims:
                y = torch.flip(y, dims)
            if acc is None:
                if self._tta_acc is None or self._tta_acc.shape != y.shape:
                    self._tta_acc = torch.empty_like(y, memory_format=torch.contiguous_format)
                acc = self._tta_acc
                acc.copy_(y)
            else:
                acc.add_(y)
        assert acc is not None
        return acc.mul_(1.0 / len(self.flips))


def _as_volume(volume: Volume, device: torch.device) -> torch.Tensor:
    if isinstance(volume, torch.Tensor):
        t = volume.detach()
    else:
        t = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    if t.ndim < 2:
        raise InferenceError(f"volume must be channel-first (C, *spatial), got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.float32)


class SlidingWindowInferer:
    """Reusable sliding-window runner for one backend and configuration (buffers kept between calls)."""

    def __init__(self, backend: Backend, config: SlidingWindowConfig) -> None:
        ndim = len(config.patch_size)
        fixed = backend.input_shape
        if fixed is not None and tuple(fixed) != config.patch_size:
            raise InferenceError(
                f"{backend.name} takes input {fixed}; patch_size {config.patch_size} differs"
            )
        self.backend = backend
        self.config = config
        self.tile = backend.output_shape_for(config.patch_size)
        self.offset = backend.geometry.offset(ndim)
        self.shrink = backend.geometry.shrink(ndim)
        self._predict = _WindowPredictor(backend, config, ndim)
        self.device = self._predict.device
        self._batch: torch.Tensor | None = None

    def __call__(self, volume: Volume) -> FloatArray:
        """(C, *spatial) -> (K, *spatial) float32 NumPy array."""
        out: FloatArray = self.run(volume).cpu().numpy()
        return out

    @torch.no_grad()
    def run(self, volume: Volume) -> torch.Tensor:
        """Like ``__call__`` but returns the tensor on the working device (no copy back)."""
        cfg = self.config
        ndim = len(cfg.patch_size)
        vol = _as_volume(volume, self.device)
        if vol.ndim != ndim + 1:
            raise InferenceError(
                f"volume must be (C, *{ndim} spatial) for patch {cfg.patch_size}, got {tuple(vol.shape)}"
            )
        size = tuple(int(s) for s in vol.shape[1:])
        grid = tuple(max(s, t) for s, t in zip(size, self.tile, strict=True))
        extra_lo = tuple((g - s) // 2 for g, s in zip(grid, size, strict=True))
        pad_lo = tuple(e + o for e, o in zip(extra_lo, self.offset, strict=True))
        pad_hi = tuple(
            g - s - e + k - o
            for g, s, e, k, o in zip(grid, size, extra_lo, self.shrink, self.offset, strict=True)
        )
        if any(pad_lo) or any(pad_hi):
            vol = self._pad(vol, pad_lo, pad_hi)
        starts = window_starts(grid, self.tile, cfg.overlaps)
        weights = importance_map(self.tile, cfg.blend, cfg.sigma_scale, self.device)
        norm = torch.zeros(grid, dtype=torch.float32, device=self.device)
        for start in starts:
            norm[_region(start, self.tile)[1:]] += weights
        channels = int(vol.shape[0])
        if self._batch is None or self._batch.shape[1] != channels or self._batch.device != self.device:
            self._batch = torch.empty((cfg.batch_size, channels, *cfg.patch_size), device=self.device)
        out: torch.Tensor | None = None
        for first in range(0, len(starts), cfg.batch_size):
            chunk = starts[first : first + cfg.batch_size]
            x = self._batch[: len(chunk)]
            for j, start in enumerate(chunk):
                x[j].copy_(vol[_region(start, cfg.patch_size)])
            y = self._predict(x)
            if out is None:
                out = torch.zeros((int(y.shape[1]), *grid), dtype=torch.float32, device=self.device)
            for j, start in enumerate(chunk):
                pred = y[j]
                pred.mul_(weights)
                out[_region(start, self.tile)].add_(pred)
        assert out is not None
        out.div_(norm)
        if cfg.activation_stage == "after_blend":
            activate_(out, cfg.activation, 0)
        if grid != size:
            out = out[_region(extra_lo, size)]
        return out

    def _pad(self, vol: torch.Tensor, lo: Sequence[int], hi: Sequence[int]) -> torch.Tensor:
        mode = self.config.pad_mode
        try:
            if mode == "constant":
                return F.pad(vol[None], _pad_arg(lo, hi), mode="constant", value=self.config.pad_value)[0]
            return F.pad(vol[None], _pad_arg(lo, hi), mode=mode)[0]
        except (RuntimeError, NotImplementedError) as exc:
            raise InferenceError(
                f"cannot {mode}-pad a volume of {tuple(vol.shape[1:])} by {lo}/{hi}: {exc}"
            ) from exc


def sliding_window_inference(volume: Volume, backend: Backend, config: SlidingWindowConfig) -> FloatArray:
    """One-shot form of ``SlidingWindowInferer(backend, config)(volume)``."""
    return SlidingWindowInferer(backend, config)(volume)


@torch.no_grad()
def single_patch_inference(
    volume: Volume,
    backend: Backend,
    *,
    patch_size: Sequence[int] | None = None,
    options: InferenceOptions | None = None,
    fill_value: float | Sequence[float] = 0.0,
) -> FloatArray:
    """For models that take one fixed input: centre-crop/pad the volume to ``patch_size`` (default the
    backend's ``input_shape``), predict once, and put the output back where it belongs.

    Crops start at ``(S - P) // 2``; padding puts ``(P - S) // 2`` before. Voxels the output does not cover
    (cropped away, or lost to a 'valid' network's margin) get ``fill_value`` (one value, or one per output
    channel), in the final (activated) units. The activation is applied to the prediction whatever
    ``activation_stage`` says, as there is nothing to blend.
    """
    opts = options or InferenceOptions()
    patch = tuple(int(p) for p in (patch_size if patch_size is not None else backend.input_shape or ()))
    if not patch:
        raise InferenceError(f"{backend.name} declares no fixed input_shape: pass patch_size")
    ndim = len(patch)
    predictor = _WindowPredictor(backend, opts, ndim)
    vol = _as_volume(volume, predictor.device)
    if vol.ndim != ndim + 1:
        raise InferenceError(f"volume must be (C, *{ndim} spatial) for patch {patch}, got {tuple(vol.shape)}")
    size = tuple(int(s) for s in vol.shape[1:])
    start = tuple((s - p) // 2 if s >= p else -((p - s) // 2) for s, p in zip(size, patch, strict=True))
    src = tuple(slice(max(a, 0), min(a + p, s)) for a, p, s in zip(start, patch, size, strict=True))
    lo = [max(-a, 0) for a in start]
    hi = [p - lo_ - (sl.stop - sl.start) for p, lo_, sl in zip(patch, lo, src, strict=True)]
    x = vol[(slice(None), *src)][None]
    if any(lo) or any(hi):
        if opts.pad_mode == "constant":
            x = F.pad(x, _pad_arg(lo, hi), mode="constant", value=opts.pad_value)
        else:
            try:
                x = F.pad(x, _pad_arg(lo, hi), mode=opts.pad_mode)
            except (RuntimeError, NotImplementedError) as exc:
                raise InferenceError(f"cannot {opts.pad_mode}-pad {size} to {patch}: {exc}") from exc
    y = predictor(x.contiguous())[0]
    if opts.activation_stage == "after_blend":
        activate_(y, opts.activation, 0)
    channels = int(y.shape[0])
    fills = (
        [float(fill_value)] * channels
        if isinstance(fill_value, int | float)
        else [float(f) for f in fill_value]
    )
    if len(fills) != channels:
        raise InferenceError(f"fill_value has {len(fills)} values for {channels} output channels")
    out = torch.empty((channels, *size), dtype=torch.float32, device=predictor.device)
    for c, value in enumerate(fills):
        out[c].fill_(value)
    origin = [a + o for a, o in zip(start, backend.geometry.offset(ndim), strict=True)]
    tile = y.shape[1:]
    dst = tuple(slice(max(o, 0), min(o + t, s)) for o, t, s in zip(origin, tile, size, strict=True))
    from_y = tuple(slice(d.start - o, d.stop - o) for d, o in zip(dst, origin, strict=True))
    if all(d.stop > d.start for d in dst):
        out[(slice(None), *dst)] = y[(slice(None), *from_y)]
    result: FloatArray = out.cpu().numpy()
    return result
