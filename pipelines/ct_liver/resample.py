"""Axis-wise resampling that keeps the field of view, as ``pymirc.image_operations.zoom3d`` does.

Along each axis, zooming ``n`` voxels by ``z`` gives ``ceil(n * z)`` voxels centred on the same field
of view. Up-sampling (``z > 1``) interpolates linearly between neighbouring voxel centres (0 beyond the
edges); down-sampling (``z < 1``) averages the covered fraction of each input voxel (box integration).
Each axis is one sparse matrix product, so large CT volumes resample in a few seconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import numpy.typing as npt
from scipy import sparse  # type: ignore[import-untyped]

FloatArray = npt.NDArray[np.float32]


@lru_cache(maxsize=64)
def _axis_matrix(n_in: int, zoom: float) -> sparse.csr_matrix:
    """(n_out, n_in) weights of one axis."""
    delta = 1.0 / zoom
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    if zoom > 1:
        n_out = math.ceil(n_in / delta)
        for i in range(n_out):
            centre = delta * (i - 0.5 * n_out + 0.5) + 0.5 * n_in - 0.5
            left = math.floor(centre)
            right = left + 1
            if left >= 0:
                rows.append(i)
                cols.append(left)
                vals.append(right - centre)
            if right < n_in:
                rows.append(i)
                cols.append(right)
                vals.append(centre - left)
    else:
        n_out = math.ceil(n_in / delta)
        for i in range(n_in):
            lo = zoom * (i - 0.5 * n_in) + 0.5 * n_out
            hi = zoom * (i + 1 - 0.5 * n_in) + 0.5 * n_out
            left_bin = math.floor(lo)
            right_bin = math.ceil(hi) - 1
            if left_bin == right_bin:
                rows.append(left_bin)
                cols.append(i)
                vals.append(zoom)
            else:
                edge = math.ceil(lo)
                rows += [left_bin, right_bin]
                cols += [i, i]
                vals += [edge - lo, hi - edge]
    matrix = sparse.coo_matrix(
        (np.asarray(vals, dtype=np.float32), (np.asarray(rows), np.asarray(cols))), shape=(n_out, n_in)
    )
    return matrix.tocsr()


def zoomed_size(n: int, zoom: float) -> int:
    if zoom == 1:
        return n
    return math.ceil(n / (1.0 / zoom))


def zoom3d(volume: npt.NDArray[np.generic], zoom: Sequence[float]) -> FloatArray:
    """Resample a 3-D array by per-axis ``zoom`` factors (``old voxel size / new voxel size``)."""
    if volume.ndim != 3 or len(zoom) != 3:
        raise ValueError(f"zoom3d takes a 3-D array and 3 factors, got {volume.shape} and {tuple(zoom)}")
    out: FloatArray = np.asarray(volume, dtype=np.float32)
    for axis, factor in enumerate(float(z) for z in zoom):
        if factor <= 0 or not math.isfinite(factor):
            raise ValueError(f"zoom factors must be positive and finite, got {tuple(zoom)}")
        if factor == 1:
            continue
        matrix = _axis_matrix(out.shape[axis], factor)
        moved = np.moveaxis(out, axis, 0)
        flat = moved.reshape(moved.shape[0], -1)
        result = np.asarray(matrix @ flat, dtype=np.float32)
        out = np.moveaxis(result.reshape((matrix.shape[0], *moved.shape[1:])), 0, axis)
    return np.ascontiguousarray(out)
