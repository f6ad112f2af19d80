"""What the loader returns: ``Volume`` (3D, or 3D + time for cine) and ``SeriesVolumes`` (one per phase).

Conventions (the same everywhere in segnode):

* ``Volume.voxels`` is float32 holding modality values (rescale slope/intercept applied: HU for CT).
  Axis order is ``(slice, row, column)`` for a 3D volume and ``(time, slice, row, column)`` for cine.
  ``row`` is the DICOM row index (top to bottom of the image), ``column`` the column index (left to
  right), exactly as in ``pixel_array``; nothing is flipped.
* Slices are sorted along the slice normal ``slice_direction = row_direction x column_direction``
  (ascending ``ImagePositionPatient . normal``), whatever order the files came in.
* ``affine`` is a 4x4 matrix mapping voxel indices ``(k, i, j, 1)`` = (slice, row, column) to patient
  coordinates ``(x, y, z, 1)`` in mm in DICOM LPS (x to the patient's left, y to posterior, z to head)::

      x = origin + k * spacing[0] * slice_direction
                 + i * spacing[1] * column_direction
                 + j * spacing[2] * row_direction

  so ``affine @ (k, 0, 0, 1)`` is the ImagePositionPatient of slice k (within the spacing tolerance).
  ``row_direction`` is ImageOrientationPatient[0:3] (direction of increasing column index j),
  ``column_direction`` is ImageOrientationPatient[3:6] (direction of increasing row index i),
  ``spacing`` is (slice step, PixelSpacing[0] between rows, PixelSpacing[1] between columns).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from pipelines.volume.reasons import Reason, refuse

FloatArray = NDArray[np.float64]
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class SourceFrame:
    """The source image of one slice: what a DICOM-SEG references (Referenced Series / Source Image)."""

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None  # 1-based frame of a multi-frame instance; None for a single-frame instance
    path: Path


@dataclass(frozen=True, eq=False)
class Volume:
    """A regular 3D (or 3D + time) grid of modality values; see the module docstring for conventions."""

    voxels: NDArray[np.float32]
    origin: FloatArray  # (3,) LPS mm: ImagePositionPatient of slice 0
    row_direction: FloatArray  # (3,) unit: ImageOrientationPatient[0:3]
    column_direction: FloatArray  # (3,) unit: ImageOrientationPatient[3:6]
    slice_direction: FloatArray  # (3,) unit normal, row x column: the direction of increasing slice index
    spacing: tuple[float, float, float]  # mm: (slice, row, column)
    # sources[t][k]: the source frame of slice k at time point t (one time point for a 3D volume).
    sources: tuple[tuple[SourceFrame, ...], ...]
    frame_of_reference_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    phase_label: str = ""  # "" for a single-phase series, else e.g. "AcquisitionNumber=2"
    # Per time point of a cine volume: median trigger time in ms (empty when unknown or 3D).
    trigger_times: tuple[float, ...] = ()
    notes: list[str] = field(default_factory=list)

    @property
    def is_cine(self) -> bool:
        return self.voxels.ndim == 4

    @property
    def n_slices(self) -> int:
        return int(self.voxels.shape[-3])

    @property
    def n_times(self) -> int:
        return int(self.voxels.shape[0]) if self.is_cine else 1

    @property
    def affine(self) -> FloatArray:
        """4x4: (slice, row, column, 1) indices -> LPS mm."""
        a = np.eye(4)
        a[:3, 0] = self.slice_direction * self.spacing[0]
        a[:3, 1] = self.column_direction * self.spacing[1]
        a[:3, 2] = self.row_direction * self.spacing[2]
        a[:3, 3] = self.origin
        return a

    def index_to_lps(self, indices: NDArray[np.float64] | list[list[float]]) -> FloatArray:
        """(N, 3) (slice, row, column) indices -> (N, 3) LPS mm."""
        ijk = np.asarray(indices, dtype=np.float64).reshape(-1, 3)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def slice_position(self, k: int) -> FloatArray:
        """ImagePositionPatient of slice k on the regular grid."""
        return self.origin + k * self.spacing[0] * self.slice_direction

    @property
    def image_orientation(self) -> tuple[float, float, float, float, float, float]:
        r, c = self.row_direction, self.column_direction
        return (float(r[0]), float(r[1]), float(r[2]), float(c[0]), float(c[1]), float(c[2]))

    @property
    def slice_sources(self) -> tuple[SourceFrame, ...]:
        """The source frame of each slice of a 3D volume, in slice order."""
        if self.is_cine:
            raise ValueError("a cine volume has sources per time point: use sources[t] or time_point(t)")
        return self.sources[0]

    def time_point(self, t: int) -> Volume:
        """Time point t of a cine volume as a 3D volume (a view on the same voxels)."""
        if not self.is_cine:
            if t != 0:
                raise IndexError(f"a 3D volume has only time point 0, not {t}")
            return self
        times = (self.trigger_times[t],) if self.trigger_times else ()
        return replace(
            self,
            voxels=self.voxels[t],
            sources=(self.sources[t],),
            trigger_times=times,
            notes=list(self.notes),
        )

    def nifti_affine(self) -> FloatArray:
        """RAS affine for ``nifti_voxels()`` (index order column, row, slice), as nibabel expects."""
        permute = np.zeros((4, 4))
        permute[0, 2] = permute[1, 1] = permute[2, 0] = permute[3, 3] = 1.0
        result: FloatArray = LPS_TO_RAS @ self.affine @ permute
        return result

    def nifti_voxels(self) -> NDArray[np.float32]:
        """The voxels transposed to (column, row, slice[, time]) for ``nifti_affine()`` (a view)."""
        if self.is_cine:
            return self.voxels.transpose(3, 2, 1, 0)
        return self.voxels.transpose(2, 1, 0)


@dataclass
class SeriesVolumes:
    """A series as volumes: one per phase (multi-phase CT), a single one otherwise."""

    volumes: list[Volume]
    # All phases found in the series, in order (also those not loaded because another was asked for).
    phase_labels: list[str]
    notes: list[str] = field(default_factory=list)

    def select(self, phase: int | str | None = None) -> Volume:
        """Pick one volume: None (the only one), an index, "first", "last" or a phase label."""
        return self.volumes[select_index([v.phase_label for v in self.volumes], phase)]


def select_index(labels: list[str], phase: int | str | None) -> int:
    """Index into ``labels`` for a phase request; refuses with ``multiple_phases`` / ``unknown_phase``."""
    known = ", ".join(repr(label) for label in labels)
    if phase is None:
        if len(labels) != 1:
            raise refuse(
                Reason.MULTIPLE_PHASES,
                f"the series holds {len(labels)} phases ({known}); say which one: an index, 'first', 'last' "
                "or a label",
            )
        return 0
    if isinstance(phase, int) and not isinstance(phase, bool):
        if -len(labels) <= phase < len(labels):
            return phase % len(labels)
        raise refuse(
            Reason.UNKNOWN_PHASE, f"phase index {phase} is out of range; the series has {len(labels)}"
        )
    if phase == "first":
        return 0
    if phase == "last":
        return len(labels) - 1
    if phase in labels:
        return labels.index(phase)
    raise refuse(
        Reason.UNKNOWN_PHASE, f"no phase {phase!r} in the series; allowed: an index, 'first', 'last', {known}"
    )
