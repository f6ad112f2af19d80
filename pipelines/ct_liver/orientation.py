"""Between a volume's own axis order and the RAS-canonical ``(X, Y, Z)`` arrays the nets expect."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Reoriented:
    image: npt.NDArray[np.float32]  # RAS canonical (X, Y, Z)
    voxel: tuple[float, float, float]  # mm along X, Y, Z
    ornt: npt.NDArray[np.float64]  # nibabel orientation: source axes -> RAS

    def back(self, mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
        """A RAS-canonical mask in the source's axis order."""
        out: npt.NDArray[np.bool_] = np.ascontiguousarray(
            apply_orientation(mask, ornt_transform(axcodes2ornt("RAS"), self.ornt))  # type: ignore[no-untyped-call]
        )
        return out


def to_ras(voxels: npt.NDArray[np.float32], affine_lps: npt.NDArray[np.float64]) -> Reoriented:
    """``voxels`` with a 4x4 index -> LPS mm affine, as the closest RAS-canonical array (axis
    permutations and flips only, as ``nibabel.as_closest_canonical``)."""
    if voxels.ndim != 3:
        raise ValueError(f"a 3-D volume is needed, got shape {voxels.shape}")
    affine_ras = LPS_TO_RAS @ np.asarray(affine_lps, dtype=np.float64)
    ornt = io_orientation(affine_ras)  # type: ignore[no-untyped-call]
    image = np.ascontiguousarray(apply_orientation(voxels, ornt), dtype=np.float32)  # type: ignore[no-untyped-call]
    sizes = np.sqrt((affine_ras[:3, :3] ** 2).sum(axis=0))
    voxel = [0.0, 0.0, 0.0]
    for source_axis, (target_axis, _flip) in enumerate(ornt):
        voxel[int(target_axis)] = float(sizes[source_axis])
    return Reoriented(image, (voxel[0], voxel[1], voxel[2]), ornt)
