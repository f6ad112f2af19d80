"""Load a trained network (and its plan) from a checkpoint written by ``train``."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from trainer.networks import build_network
from trainer.plan import Plan


def load_model(checkpoint: Path, device: str = "cpu") -> tuple[Plan, torch.nn.Module, int]:
    state = torch.load(checkpoint, map_location=device, weights_only=False)
    if "model" not in state or "plan" not in state:
        raise ValueError(f"{checkpoint}: not a segnode-train checkpoint (no model/plan)")
    plan = Plan(**state["plan"])
    model = build_network(plan).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    return plan, model, int(state.get("iteration", 0))


TOPOLOGY_KEYS = ("network", "dim", "kernels", "strides", "filters", "num_classes", "channels", "norm")


def initial_weights(checkpoint: Path, plan: Plan, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint's network weights to start training ``plan`` from (``train --init-weights``).

    The checkpoint's plan must describe the same network: one that differs in any of ``TOPOLOGY_KEYS`` is
    refused, naming the first difference.
    """
    if not checkpoint.is_file():
        raise ValueError(f"--init-weights {checkpoint}: no such checkpoint file")
    state = torch.load(checkpoint, map_location=device, weights_only=False)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"--init-weights {checkpoint}: not a segnode-train checkpoint (no 'model' weights)")
    theirs, mine = state.get("plan") or {}, asdict(plan)
    for key in TOPOLOGY_KEYS:
        if key in theirs and theirs[key] != mine[key]:
            raise ValueError(
                f"--init-weights {checkpoint}: its plan has {key}={theirs[key]!r}, this plan has "
                f"{mine[key]!r}; initial weights must come from the same network topology"
            )
    weights: dict[str, Any] = state["model"]
    return weights
