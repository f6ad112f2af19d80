"""Batch augmentation in torch (cheap on CPU, runs on the training device): spatial (rotation, scaling,
elastic, flips) and intensity (noise, blur, gamma, bias field, brightness, contrast)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    p_rotate: float = 0.2
    max_rotate_deg: float = 180.0
    p_scale: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)
    p_elastic: float = 0.05
    elastic_magnitude: float = 0.04  # of the patch extent
    p_flip: float = 0.5
    p_noise: float = 0.1
    noise_std: float = 0.1
    p_blur: float = 0.2
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_bias: float = 0.1
    p_brightness: float = 0.15
    p_contrast: float = 0.15
    enabled: bool = True

    @classmethod
    def none(cls) -> AugmentConfig:
        return cls(enabled=False)


def _rand(g: torch.Generator, n: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def spatial(
    image: torch.Tensor, label: torch.Tensor, out_size: list[int], cfg: AugmentConfig, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``image`` (B, C, *S) and ``label`` (B, 1, *S) cropped larger than ``out_size`` (same centre);
    returns the transformed centre crops of ``out_size``."""
    b = image.shape[0]
    nd = image.dim() - 2
    in_size = list(image.shape[2:])
    mats = torch.eye(nd).repeat(b, 1, 1)
    if cfg.enabled:
        # rotation (2D: in plane; 3D: about the last axis, the usual through-plane axis)
        do = _rand(g, b) < cfg.p_rotate
        ang = _rand(g, b, -1, 1) * math.radians(cfg.max_rotate_deg) * do
        c, s = torch.cos(ang), torch.sin(ang)
        rot = torch.eye(nd).repeat(b, 1, 1)
        rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = c, -s, s, c
        do = _rand(g, b) < cfg.p_scale
        sc = torch.where(do, _rand(g, b, *cfg.scale_range), torch.ones(b))
        flips = torch.where(_rand(g, b * nd) < cfg.p_flip, -1.0, 1.0).view(b, nd)
        mats = rot @ torch.diag_embed(flips / sc[:, None])
    # affine_grid works in normalised coordinates of (output, input); rescale by size ratio.
    # torch's grid uses (x=W, y=H, ...) order: reverse the axes.
    rev = list(range(nd))[::-1]
    inv_in = torch.tensor([1.0 / in_size[a] for a in rev])
    out = torch.tensor([float(out_size[a]) for a in rev])
    m = torch.diag(inv_in) @ mats[:, rev][:, :, rev] @ torch.diag(out)
    theta = torch.cat([m, torch.zeros(b, nd, 1)], dim=2).to(image.device)
    grid = F.affine_grid(theta, [b, 1, *out_size], align_corners=False)
    if cfg.enabled and cfg.p_elastic > 0:
        do = (_rand(g, b) < cfg.p_elastic).float().view(b, *([1] * (nd + 1))).to(image.device)
        coarse = (torch.randn(b, nd, *([4] * nd), generator=g) * cfg.elastic_magnitude * 2).to(image.device)
        mode = "bilinear" if nd == 2 else "trilinear"
        disp = F.interpolate(coarse, size=out_size, mode=mode, align_corners=False)
        grid = grid + disp.movedim(1, -1) * do
    img = F.grid_sample(
        image, grid.to(image.dtype), mode="bilinear", padding_mode="zeros", align_corners=False
    )
    lab = F.grid_sample(label.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return img, lab.round().to(label.dtype)


def intensity(image: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    if not cfg.enabled:
        return image
    b = image.shape[0]
    nd = image.dim() - 2
    shape = (b, *([1] * (nd + 1)))
    x = image
    dev = image.device

    def rand(n: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        return _rand(g, n, lo, hi).to(dev)

    do = (rand(b) < cfg.p_noise).view(shape)
    x = x + torch.randn(x.shape, generator=g).to(dev) * cfg.noise_std * rand(b).view(shape) * do
    do_blur = rand(b) < cfg.p_blur
    if bool(do_blur.any()):
        sigma = float(_rand(g, 1, 0.5, 1.0))
        k = torch.arange(-2, 3, dtype=x.dtype, device=dev)
        w = torch.exp(-(k**2) / (2 * sigma**2))
        w = w / w.sum()
        blurred = x
        ch = x.shape[1]
        for axis in range(nd):
            kshape = [1] * nd
            kshape[axis] = 5
            kern = w.view(1, 1, *kshape).repeat(ch, 1, *([1] * nd))
            pad = [0] * (2 * nd)
            pad[2 * (nd - 1 - axis)] = pad[2 * (nd - 1 - axis) + 1] = 2
            conv = F.conv2d if nd == 2 else F.conv3d
            blurred = conv(F.pad(blurred, pad, mode="replicate"), kern, groups=ch)
        x = torch.where(do_blur.view(shape), blurred, x)
    do = (rand(b) < cfg.p_bias).view(shape)
    coarse = (torch.randn(b, 1, *([3] * nd), generator=g) * 0.15).to(dev)
    mode = "bilinear" if nd == 2 else "trilinear"
    field = torch.exp(F.interpolate(coarse, size=list(x.shape[2:]), mode=mode, align_corners=True))
    x = torch.where(do, x * field, x)
    do = (rand(b) < cfg.p_brightness).view(shape)
    x = torch.where(do, x * rand(b, 0.75, 1.25).view(shape), x)
    do = (rand(b) < cfg.p_contrast).view(shape)
    dims = tuple(range(1, nd + 2))
    mean = x.mean(dim=dims, keepdim=True)
    x = torch.where(do, (x - mean) * rand(b, 0.75, 1.25).view(shape) + mean, x)
    do = (rand(b) < cfg.p_gamma).view(shape)
    lo = x.amin(dim=dims, keepdim=True)
    hi = x.amax(dim=dims, keepdim=True)
    rng_ = (hi - lo).clamp_min(1e-6)
    gam = rand(b, *cfg.gamma_range).view(shape)
    xg = ((x - lo) / rng_).clamp_min(0) ** gam * rng_ + lo
    # keep the statistics like nnU-Net's gamma transform
    xg = (xg - xg.mean(dim=dims, keepdim=True)) / xg.std(dim=dims, keepdim=True).clamp_min(1e-6) * x.std(
        dim=dims, keepdim=True
    ) + x.mean(dim=dims, keepdim=True)
    return torch.where(do, xg, x)
