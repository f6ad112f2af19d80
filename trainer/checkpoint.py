"""Load a trained network (and its plan) from a checkpoint written by ``train``."""

from __future__ import annotations

from pathlib import Path

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
