"""Inference on a prepared volume: per slice (2D plans) or 3D, sliding window (Gaussian, overlap) or
whole slice, then back to the original grid."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from numpy.typing import NDArray

from trainer.plan import Plan
from trainer.prepare import Prepared

Predictor = Callable[[torch.Tensor], torch.Tensor]


def _pad_to_multiple(x: torch.Tensor, mult: list[int]) -> tuple[torch.Tensor, list[int]]:
    nd = len(mult)
    size = list(x.shape[-nd:])
    target = [((s + m - 1) // m) * m for s, m in zip(size, mult, strict=True)]
    pad: list[int] = []
    for a in reversed(range(nd)):
        extra = target[a] - size[a]
        pad += [extra // 2, extra - extra // 2]
    return F.pad(x, pad), pad


@torch.no_grad()
def predict_logits(
    predictor: Predictor,
    image: NDArray[np.float32],
    plan: Plan,
    mode: str = "sliding",
    overlap: float = 0.5,
    sw_batch: int = 8,
    device: str = "cpu",
) -> NDArray[np.float32]:
    """``image`` (C, X, Y, Z) in plan space -> softmax probabilities (K, X, Y, Z) float32."""
    x = torch.from_numpy(np.ascontiguousarray(image)).to(device)
    total = [int(np.prod([s[a] for s in plan.strides])) for a in range(plan.dim)]
    if plan.network == "swinunetr":  # five 2x patch-merging stages: every axis a multiple of 32
        total = [int(np.lcm(t, 32)) for t in total]
    if plan.dim == 2:
        assert plan.slice_axis is not None
        # (C, X, Y, Z) -> (N_slices, C, H, W)
        xs = x.movedim(plan.slice_axis + 1, 0)
    else:
        xs = x[None]
    if mode == "whole":
        xp, pad = _pad_to_multiple(xs, total)
        outs = [predictor(xp[i : i + sw_batch]) for i in range(0, xp.shape[0], sw_batch)]
        logits = torch.cat(outs)
        nd = plan.dim
        sl = [slice(None), slice(None)]
        for a in range(nd):
            lo = pad[2 * (nd - 1 - a)]
            sl.append(slice(lo, lo + xs.shape[2 + a]))
        logits = logits[tuple(sl)]
    else:
        logits = sliding_window_inference(
            xs,
            roi_size=plan.patch_size,
            sw_batch_size=sw_batch,
            predictor=predictor,
            overlap=overlap,
            mode="gaussian",
        )
        assert isinstance(logits, torch.Tensor)
    probs = torch.softmax(logits.float(), dim=1)
    if plan.dim == 2:
        assert plan.slice_axis is not None
        probs = probs.movedim(0, plan.slice_axis + 1)  # (N, K, H, W) -> (K, X, Y, Z)
    else:
        probs = probs[0]
    return probs.cpu().numpy().astype(np.float32)


def predict_case(
    predictor: Predictor,
    case: Prepared,
    plan: Plan,
    mode: str = "sliding",
    overlap: float = 0.5,
    sw_batch: int = 8,
    device: str = "cpu",
) -> NDArray[np.uint8]:
    """Label map in the case's original grid."""
    probs = predict_logits(predictor, case.image, plan, mode, overlap, sw_batch, device)
    shape = case.original.image.shape[1:]
    if tuple(probs.shape[1:]) != tuple(shape):
        t = torch.from_numpy(probs)[None]
        t = F.interpolate(t, size=list(shape), mode="trilinear", align_corners=False)
        probs = t[0].numpy()
    return np.asarray(probs.argmax(0), dtype=np.uint8)


def dice_per_class(pred: NDArray[np.uint8], ref: NDArray[np.uint8], num_classes: int) -> list[float]:
    """Dice per foreground class; NaN where both are empty."""
    out = []
    for c in range(1, num_classes):
        p, r = pred == c, ref == c
        denom = int(p.sum()) + int(r.sum())
        out.append(float("nan") if denom == 0 else 2.0 * int((p & r).sum()) / denom)
    return out
