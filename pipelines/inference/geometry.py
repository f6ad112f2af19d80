"""Where a network's output lies inside its input.

A network with 'same' padding returns an output of its input's spatial size. A network with 'valid'
padding (convolutions without padding) returns a smaller output: output voxel ``i`` along an axis is the
prediction for input voxel ``i + crop_before`` and the output is ``crop_before + crop_after`` shorter
than the input. The engine pads the volume by those amounts, so that every voxel gets a prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipelines.inference.errors import InferenceError


@dataclass(frozen=True)
class OutputGeometry:
    """Per spatial axis: input voxels lost before and after the output. Empty tuples mean 'same'."""

    crop_before: tuple[int, ...] = ()
    crop_after: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.crop_before) != len(self.crop_after):
            raise InferenceError(
                f"crop_before {self.crop_before} and crop_after {self.crop_after} differ in length"
            )
        if any(c < 0 for c in (*self.crop_before, *self.crop_after)):
            raise InferenceError(f"crops must be >= 0, got {self.crop_before} / {self.crop_after}")

    @classmethod
    def same(cls) -> OutputGeometry:
        return cls()

    @classmethod
    def valid(cls, shrink: Sequence[int]) -> OutputGeometry:
        """Output ``shrink[i]`` voxels shorter than the input, centred (the extra voxel, if odd, after)."""
        before = tuple(int(s) // 2 for s in shrink)
        return cls(before, tuple(int(s) - b for s, b in zip(shrink, before, strict=True)))

    @classmethod
    def from_shapes(cls, input_shape: Sequence[int], output_shape: Sequence[int]) -> OutputGeometry:
        """The centred geometry that maps ``input_shape`` to ``output_shape`` (spatial sizes)."""
        if len(input_shape) != len(output_shape):
            raise InferenceError(
                f"input {tuple(input_shape)} and output {tuple(output_shape)} differ in rank"
            )
        shrink = [int(i) - int(o) for i, o in zip(input_shape, output_shape, strict=True)]
        if any(s < 0 for s in shrink):
            raise InferenceError(
                f"output {tuple(output_shape)} is larger than input {tuple(input_shape)}: not supported"
            )
        return cls.valid(shrink)

    @property
    def is_same(self) -> bool:
        return not any(self.crop_before) and not any(self.crop_after)

    @property
    def is_centred(self) -> bool:
        """True when the output is centred in the input (needed to mirror windows for TTA)."""
        return self.crop_before == self.crop_after

    def _crops(self, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if not self.crop_before:
            return (0,) * ndim, (0,) * ndim
        if len(self.crop_before) != ndim:
            raise InferenceError(f"geometry has {len(self.crop_before)} spatial axes, the input has {ndim}")
        return self.crop_before, self.crop_after

    def offset(self, ndim: int) -> tuple[int, ...]:
        """Input index of output voxel 0, per spatial axis."""
        return self._crops(ndim)[0]

    def shrink(self, ndim: int) -> tuple[int, ...]:
        before, after = self._crops(ndim)
        return tuple(b + a for b, a in zip(before, after, strict=True))

    def output_shape_for(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial output size for a spatial input size."""
        out = tuple(int(i) - s for i, s in zip(input_shape, self.shrink(len(input_shape)), strict=True))
        if any(o < 1 for o in out):
            raise InferenceError(f"input {tuple(input_shape)} is too small for this network ({self})")
        return out
