"""Window placement and blending weights, identical to MONAI's ``sliding_window_inference``.

Along each axis of size ``S`` with tile ``T`` the step is ``int(T * (1 - overlap))`` (at least 1) and the
windows start at ``0, step, 2*step, ...``, the last one moved back to end at ``S``: the fewest windows
any tiling with that step can use.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import torch

from pipelines.inference.errors import InferenceError

BlendMode = Literal["gaussian", "constant"]


def axis_starts(size: int, tile: int, overlap: float) -> list[int]:
    if not 0.0 <= overlap < 1.0:
        raise InferenceError(f"overlap must be in [0, 1), got {overlap}")
    if tile >= size:
        return [0]
    step = max(int(tile * (1 - overlap)), 1)
    count = math.ceil((size - tile) / step) + 1
    return [min(i * step, size - tile) for i in range(count)]


def window_starts(
    size: Sequence[int], tile: Sequence[int], overlap: Sequence[float]
) -> list[tuple[int, ...]]:
    """All window origins, first axis slowest (MONAI's order)."""
    per_axis = [axis_starts(s, t, o) for s, t, o in zip(size, tile, overlap, strict=True)]
    return list(itertools.product(*per_axis))


@lru_cache(maxsize=16)
def _importance_map_cpu(
    tile: tuple[int, ...], mode: BlendMode, sigma_scale: tuple[float, ...]
) -> torch.Tensor:
    if mode == "constant":
        return torch.ones(tile, dtype=torch.float32)
    if mode != "gaussian":
        raise InferenceError(f"blend mode must be 'gaussian' or 'constant', got {mode!r}")
    weights = torch.ones((), dtype=torch.float32)
    for axis, (n, scale) in enumerate(zip(tile, sigma_scale, strict=True)):
        sigma = n * scale
        if sigma <= 0:
            raise InferenceError(f"sigma_scale must be > 0, got {scale}")
        x = torch.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=torch.float32)
        g = torch.exp(x**2 / (-2 * sigma**2))
        weights = weights.unsqueeze(-1) * g[(None,) * axis] if axis > 0 else g
    # Far corners of large tiles underflow; a floor keeps every voxel's weight positive (as MONAI does).
    floor = max(float(weights.min()), 1e-3)
    return weights.clamp_(min=floor)


_DEVICE_MAPS: dict[tuple[tuple[int, ...], str, tuple[float, ...], torch.device], torch.Tensor] = {}


def importance_map(
    tile: Sequence[int],
    mode: BlendMode = "gaussian",
    sigma_scale: float | Sequence[float] = 0.125,
    device: torch.device | None = None,
) -> torch.Tensor:
    """The blending weights of one window (float32, computed once per tile, mode and device, then cached).

    Gaussian: ``exp(-x^2 / (2 (sigma_scale * T)^2))`` per axis, centred, multiplied over axes, with a
    floor of ``max(min, 1e-3)``. Callers must not modify the returned tensor.
    """
    t = tuple(int(n) for n in tile)
    scales = (
        (float(sigma_scale),) * len(t)
        if isinstance(sigma_scale, int | float)
        else tuple(float(s) for s in sigma_scale)
    )
    if len(scales) != len(t):
        raise InferenceError(f"sigma_scale {scales} does not match tile {t}")
    cpu = _importance_map_cpu(t, mode, scales)
    dev = device or torch.device("cpu")
    if dev.type == "cpu":
        return cpu
    key = (t, mode, scales, dev)
    cached = _DEVICE_MAPS.get(key)
    if cached is None:
        if len(_DEVICE_MAPS) >= 16:
            _DEVICE_MAPS.clear()
        cached = _DEVICE_MAPS[key] = cpu.to(dev)
    return cached
