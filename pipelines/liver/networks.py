"""The two U-Nets of ``pyliverlesionseg==0.3``, rebuilt layer by layer in PyTorch.

Conventions (see ``../shared/models/pyliverlesionseg.md``): tensors are ``(N, C, X, Y, Z)`` with the
spatial axes RAS-canonical; a kernel ``(3, 3, 1)`` is 3x3 in-plane and 1 along Z. Every convolution
except the very first is preceded by instance normalisation without affine parameters
(``(x - mean) / (std + 1e-7)``, biased std over the whole patch) and LeakyReLU(0.01). Skip joins
concatenate the centre-cropped skip *first*. The convolutions are kept in one ``ModuleList`` in the
order of the Keras file's ``layer_names`` so that weights load by position.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

KERAS_EPSILON = 1e-7
LEAKY_SLOPE = 0.01


def norm_act(x: torch.Tensor) -> torch.Tensor:
    """Keras ``(x - mean) / (std + epsilon)`` over X, Y, Z per sample and channel, then LeakyReLU."""
    mean = x.mean(dim=(2, 3, 4), keepdim=True)
    centred = x - mean
    std = torch.sqrt((centred * centred).mean(dim=(2, 3, 4), keepdim=True))
    return F.leaky_relu(centred / (std + KERAS_EPSILON), LEAKY_SLOPE)


def center_crop(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Crop ``x`` symmetrically to the spatial size of ``like`` (Keras ``Cropping3D``)."""
    # No int() here: while exporting to ONNX the sizes are traced values, so the crop stays dynamic.
    slices = [slice(None), slice(None)]
    for axis in range(2, 5):
        have, want = x.shape[axis], like.shape[axis]
        margin = (have - want) // 2
        slices.append(slice(margin, margin + want))
    return x[tuple(slices)]


def upsample3_linear(x: torch.Tensor) -> torch.Tensor:
    """The liver net's "linear" upsampling: nearest x3, then a 3x3x3 mean, stride 1, no padding."""
    return F.avg_pool3d(F.interpolate(x, scale_factor=3.0, mode="nearest"), kernel_size=3, stride=1)


def _conv(cin: int, cout: int, kernel: tuple[int, int, int], same: bool) -> nn.Conv3d:
    padding = (kernel[0] // 2, kernel[1] // 2, kernel[2] // 2) if same else (0, 0, 0)
    return nn.Conv3d(cin, cout, kernel, stride=1, padding=padding, bias=True)


# (in, out, kernel) of each convolution, in the Keras file's order.
ConvSpec = tuple[int, int, tuple[int, int, int]]

K331 = (3, 3, 1)
K333 = (3, 3, 3)
K111 = (1, 1, 1)

LIVER_CONVS: tuple[ConvSpec, ...] = (
    (1, 20, K331),
    (20, 40, K333),
    (40, 40, K331),
    (40, 80, K333),
    (80, 80, K331),
    (80, 160, K333),
    (160, 160, K333),
    (160, 160, K333),
    (320, 160, K333),
    (160, 80, K331),
    (160, 80, K333),
    (80, 40, K331),
    (80, 40, K333),
    (40, 20, K331),
    (20, 1, K111),
)

LESION_CONVS: tuple[ConvSpec, ...] = (
    (1, 20, K331),
    (20, 40, K333),
    (1, 40, K111),
    (40, 40, K331),
    (40, 80, K333),
    (40, 80, K111),
    (80, 80, K331),
    (80, 160, K333),
    (80, 160, K111),
    (160, 160, K331),
    (160, 160, K333),
    (320, 160, K333),
    (160, 80, K331),
    (320, 80, K111),
    (160, 80, K333),
    (80, 40, K331),
    (160, 40, K111),
    (80, 40, K333),
    (40, 20, K331),
    (80, 20, K111),
    (20, 1, K111),
)


class _KerasUNet(nn.Module):
    specs: tuple[ConvSpec, ...] = ()
    same_padding = True
    # Spatial input and output sizes of the patch the network was built for, and the offset of
    # output voxel 0 inside the input patch.
    input_patch: tuple[int, int, int] = (0, 0, 0)
    output_patch: tuple[int, int, int] = (0, 0, 0)
    output_offset: tuple[int, int, int] = (0, 0, 0)

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(_conv(i, o, k, self.same_padding) for i, o, k in self.specs)

    def conv_shapes(self) -> list[tuple[int, ...]]:
        """Keras kernel shapes ``(k1, k2, k3, Cin, Cout)`` expected in file order."""
        return [(*k, i, o) for i, o, k in self.specs]

    def c(self, index: int, x: torch.Tensor) -> torch.Tensor:
        conv: nn.Module = self.convs[index]
        out: torch.Tensor = conv(x)
        return out


class LiverNet(_KerasUNet):
    """3 mm liver net: padding 'same', max-pool 3, "linear" x3 upsampling; 3,874,961 parameters."""

    specs = LIVER_CONVS
    same_padding = True
    input_patch = (189, 162, 162)
    output_patch = (163, 136, 136)
    output_offset = (13, 13, 13)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.c
        skip0 = c(1, norm_act(c(0, x)))
        p = F.max_pool3d(skip0, 3)
        skip1 = c(3, norm_act(c(2, norm_act(p))))
        p = F.max_pool3d(skip1, 3)
        skip2 = c(5, norm_act(c(4, norm_act(p))))
        p = F.max_pool3d(skip2, 3)
        path = c(7, norm_act(c(6, norm_act(p))))
        for skip, first in ((skip2, 8), (skip1, 10), (skip0, 12)):
            up = upsample3_linear(path)
            path = torch.cat([center_crop(skip, up), up], dim=1)
            path = c(first + 1, norm_act(c(first, norm_act(path))))
        return torch.sigmoid(c(14, norm_act(path)))


class LesionNet(_KerasUNet):
    """1 x 1 x 3 mm lesion net: padding 'valid', max-pool 2, nearest x2 upsampling, residual blocks;
    3,464,221 parameters."""

    specs = LESION_CONVS
    same_padding = False
    input_patch = (180, 172, 86)
    output_patch = (92, 84, 42)
    output_offset = (44, 44, 22)

    def _block(self, x: torch.Tensor, first: int, project: bool, norm_first: bool) -> torch.Tensor:
        c = self.c
        path = c(first, norm_act(x) if norm_first else x)
        path = c(first + 1, norm_act(path))
        shortcut = center_crop(x, path)
        if project:
            shortcut = c(first + 2, shortcut)
        return path + shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip0 = self._block(x, 0, project=True, norm_first=False)
        skip1 = self._block(F.max_pool3d(skip0, 2), 3, project=True, norm_first=True)
        skip2 = self._block(F.max_pool3d(skip1, 2), 6, project=True, norm_first=True)
        path = self._block(F.max_pool3d(skip2, 2), 9, project=False, norm_first=True)
        for skip, first in ((skip2, 11), (skip1, 14), (skip0, 17)):
            up = F.interpolate(path, scale_factor=2.0, mode="nearest")
            path = self._block(torch.cat([center_crop(skip, up), up], dim=1), first, True, True)
        return torch.sigmoid(self.c(20, norm_act(path)))


NETWORKS: dict[str, type[_KerasUNet]] = {"liver": LiverNet, "lesion": LesionNet}


def build(kind: str) -> _KerasUNet:
    try:
        return NETWORKS[kind]()
    except KeyError:
        raise ValueError(f"unknown network {kind!r}; known: {', '.join(sorted(NETWORKS))}") from None


def count_parameters(model: nn.Module) -> int:
    return sum(int(p.numel()) for p in model.parameters())


def output_size(kind: str, input_size: Sequence[int]) -> tuple[int, ...]:
    """Spatial output size of a network for a given input size (runs on the meta device)."""
    model = build(kind).to("meta")
    with torch.no_grad():
        out = model(torch.empty((1, 1, *input_size), device="meta"))
    return tuple(int(s) for s in out.shape[2:])
