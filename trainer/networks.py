"""Networks a plan can ask for: MONAI DynUNet (nnU-Net-like, default) and SwinUNETR."""

from __future__ import annotations

import torch
from monai.networks.nets import DynUNet, SwinUNETR

from trainer.plan import Plan


def build_network(plan: Plan) -> torch.nn.Module:
    in_ch = len(plan.channels)
    if plan.network == "dynunet":
        return DynUNet(
            spatial_dims=plan.dim,
            in_channels=in_ch,
            out_channels=plan.num_classes,
            kernel_size=plan.kernels,
            strides=plan.strides,
            upsample_kernel_size=plan.strides[1:],
            filters=plan.filters,
            norm_name=(plan.norm, {"affine": True}),
            act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
            res_block=bool(plan.extra.get("res_block", False)),
            deep_supervision=False,
        )
    if plan.network == "swinunetr":
        return SwinUNETR(
            in_channels=in_ch,
            out_channels=plan.num_classes,
            feature_size=int(plan.extra.get("feature_size", 24)),
            spatial_dims=plan.dim,
            use_checkpoint=False,
        )
    raise ValueError(f"unknown network {plan.network!r} (dynunet, swinunetr)")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
