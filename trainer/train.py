"""The training loop: patch sampling with foreground oversampling, batch augmentation, Dice+CE (or
Dice+Focal, Tversky), AdamW/SGD with a poly schedule over iterations or wall time, held-out patient
validation, resumable checkpoints, a progress bar and a PNG of the curves."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss, DiceFocalLoss, TverskyLoss

from trainer.augment import AugmentConfig, intensity, spatial
from trainer.checkpoint import initial_weights
from trainer.curves import write_curves
from trainer.data import RawDataset, split_groups
from trainer.infer import dice_per_class, predict_case
from trainer.networks import build_network, count_parameters
from trainer.plan import Plan
from trainer.prepare import PatchSampler, Prepared, prepare_case
from trainer.progress import Progress


@dataclass
class TrainConfig:
    out_dir: Path
    seed: int = 0
    max_iterations: int | None = None
    time_limit_minutes: float | None = None
    lr: float = 2e-3
    weight_decay: float = 3e-5
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.99
    warmup_iterations: int = 50
    loss: str = "dice_ce"  # dice_ce | dice_focal | tversky
    val_fraction: float = 0.2
    folds: int = 0
    fold: int = 0
    val_every: int = 250
    val_mode: str = "sliding"
    val_overlap: float = 0.25
    checkpoint_minutes: float = 5.0
    threads: int | None = None
    device: str = "cpu"
    amp: bool = True  # used on CUDA only
    augment: bool = True
    max_cases: int | None = None
    log_every: int = 10
    stop_after: int | None = None  # iterations in this session, then checkpoint and stop (resume later)
    init_weights: Path | None = None  # start from these network weights (fresh optimiser and schedule)
    extra: dict[str, Any] = field(default_factory=dict)


def make_loss(name: str) -> torch.nn.Module:
    if name == "dice_ce":
        return DiceCELoss(
            to_onehot_y=True, softmax=True, include_background=False, batch=True, smooth_nr=1e-5
        )
    if name == "dice_focal":
        return DiceFocalLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True, gamma=2.0)
    if name == "tversky":
        return TverskyLoss(
            to_onehot_y=True, softmax=True, include_background=False, batch=True, alpha=0.3, beta=0.7
        )
    raise ValueError(f"unknown loss {name!r} (dice_ce, dice_focal, tversky)")


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay
        )
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (adamw, sgd)")


def split_cases(ds: RawDataset, cfg: TrainConfig) -> tuple[list[str], list[str]]:
    cases = [c for c in ds.cases if c.label is not None]
    groups = [c.group for c in cases]
    train_g, val_g = split_groups(groups, cfg.val_fraction, cfg.seed, cfg.folds, cfg.fold)
    return train_g, val_g


def write_split(path: Path, ds: RawDataset, train_g: list[str], val_g: list[str]) -> None:
    vset = set(val_g)
    path.write_text(
        json.dumps(
            {
                "train_groups": sorted(train_g),
                "val_groups": sorted(val_g),
                "train_cases": [c.case_id for c in ds.cases if c.label is not None and c.group not in vset],
                "val_cases": [c.case_id for c in ds.cases if c.label is not None and c.group in vset],
            },
            indent=2,
        )
        + "\n"
    )


def poly_lr(cfg: TrainConfig, it: int, fraction: float) -> float:
    warm = min(1.0, (it + 1) / cfg.warmup_iterations) if cfg.warmup_iterations > 0 else 1.0
    return cfg.lr * warm * max(0.0, 1.0 - fraction) ** 0.9


def _fraction(cfg: TrainConfig, it: int, elapsed: float) -> float:
    parts = []
    if cfg.max_iterations:
        parts.append(it / cfg.max_iterations)
    if cfg.time_limit_minutes:
        parts.append(elapsed / (cfg.time_limit_minutes * 60.0))
    return min(1.0, max(parts)) if parts else 0.0


def validate(model: torch.nn.Module, cases: list[Prepared], plan: Plan, cfg: TrainConfig) -> dict[str, Any]:
    model.eval()
    per_case: dict[str, list[float]] = {}
    dev = torch.device(cfg.device)

    def pred(x: torch.Tensor) -> torch.Tensor:
        if dev.type == "cuda" and cfg.amp:
            with torch.autocast("cuda", dtype=torch.float16):
                return model(x).float()
        return model(x)

    for c in cases:
        assert c.original.label is not None
        seg = predict_case(pred, c, plan, cfg.val_mode, cfg.val_overlap, plan.batch_size, cfg.device)
        per_case[c.case_id] = dice_per_class(seg, c.original.label, plan.num_classes)
    model.train()
    arr = np.asarray(list(per_case.values()), dtype=np.float64)
    names = [n for n, v in sorted(plan.labels.items(), key=lambda kv: kv[1]) if v != 0]
    per_class = {n: float(np.nanmean(arr[:, i])) for i, n in enumerate(names)}
    return {
        "mean_dice": float(np.nanmean(list(per_class.values()))),
        "per_class": per_class,
        "per_case": per_case,
    }


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    return rng.bit_generator.state  # type: ignore[no-any-return]


def train(
    ds: RawDataset, plan: Plan, cfg: TrainConfig, resume: bool = True, progress: Progress | None = None
) -> dict[str, Any]:
    if ds.ignore_value is not None:
        raise ValueError(f"{ds.root}: training with an 'ignore' label is not supported (evaluation is)")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = torch.device(cfg.device)
    use_amp = dev.type == "cuda" and cfg.amp
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)
    ckpt = out / "checkpoint_last.pt"
    resuming = resume and ckpt.is_file()
    # checked before the data is prepared: a wrong --init-weights fails at once
    initial = (
        None if resuming or cfg.init_weights is None else initial_weights(Path(cfg.init_weights), plan, dev)
    )
    plan.save(out / "plan.json")
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str) + "\n")

    if cfg.max_cases:
        ds = RawDataset(
            ds.root,
            ds.meta,
            [c for c in ds.cases if c.label is not None][: cfg.max_cases],
            ds.channel_names,
            ds.labels,
            ds.file_ending,
            ds.case_meta,
        )
    train_g, val_g = split_cases(ds, cfg)
    write_split(out / "split.json", ds, train_g, val_g)
    tset, vset = set(train_g), set(val_g)
    labelled = [c for c in ds.cases if c.label is not None]
    t0 = time.monotonic()
    train_cases = [prepare_case(c, plan) for c in labelled if c.group in tset]
    val_cases = [prepare_case(c, plan) for c in labelled if c.group in vset]
    prog = progress or Progress(cfg.max_iterations, every=cfg.log_every)
    prog.message(
        f"prepared {len(train_cases)} training and {len(val_cases)} validation cases "
        f"({len(train_g)}/{len(val_g)} patients) in {time.monotonic() - t0:.1f}s"
    )

    model = build_network(plan).to(dev)
    opt = make_optimizer(model, cfg)
    loss_fn = make_loss(cfg.loss)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    aug = AugmentConfig() if cfg.augment else AugmentConfig.none()
    crop = [int(math.ceil(p * 1.5 / 2) * 2) if cfg.augment else p for p in plan.patch_size]
    sampler = PatchSampler(train_cases, plan, crop)

    it, elapsed = 0, 0.0
    history: dict[str, Any] = {"loss": [], "val": [], "lr": []}
    best = -1.0
    if resuming:
        state = torch.load(ckpt, map_location=dev, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        rng.bit_generator.state = state["np_rng"]
        gen.set_state(state["torch_gen"])
        torch.set_rng_state(state["torch_rng"])
        it, elapsed, history, best = state["iteration"], state["elapsed"], state["history"], state["best"]
        prog.message(f"resumed from {ckpt} at iteration {it} ({elapsed / 60:.1f} min trained)")
    elif initial is not None:
        model.load_state_dict(initial)
        prog.message(f"initialised the network from {cfg.init_weights}")
    prog.message(
        f"network {plan.network} {count_parameters(model) / 1e6:.2f} M parameters, "
        f"patch {plan.patch_size}, batch {plan.batch_size}, device {dev}"
    )

    def save(path: Path) -> None:
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(),
                "np_rng": _rng_state(rng),
                "torch_gen": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "iteration": it,
                "elapsed": elapsed,
                "history": history,
                "best": best,
                "plan": asdict(plan),
                "config": asdict(cfg),
            },
            str(path) + ".tmp",
        )
        Path(str(path) + ".tmp").replace(path)

    def run_validation() -> None:
        nonlocal best
        if not val_cases:
            return
        v = validate(model, val_cases, plan, cfg)
        history["val"].append(
            {"iteration": it, "elapsed": elapsed, "mean_dice": v["mean_dice"], "per_class": v["per_class"]}
        )
        if v["mean_dice"] > best:
            best = v["mean_dice"]
            torch.save(
                {"model": model.state_dict(), "plan": asdict(plan), "iteration": it, "val": v},
                out / "checkpoint_best.pt",
            )
        prog.message(
            f"validation it {it}: mean Dice {v['mean_dice']:.4f} "
            + " ".join(f"{k} {x:.4f}" for k, x in v["per_class"].items())
        )

    model.train()
    start = time.monotonic() - elapsed
    last_ckpt = time.monotonic()
    frac = _fraction(cfg, it, elapsed)
    session_start = it
    while frac < 1.0 and (cfg.max_iterations or cfg.time_limit_minutes):
        if cfg.stop_after is not None and it - session_start >= cfg.stop_after:
            save(ckpt)
            prog.message(f"stopped after {cfg.stop_after} iterations at iteration {it}; checkpoint {ckpt}")
            return {"iterations": it, "elapsed_s": elapsed, "stopped": True}
        lr = poly_lr(cfg, it, frac)
        for gparam in opt.param_groups:
            gparam["lr"] = lr
        img_np, lab_np = sampler.sample(rng, plan.batch_size)
        img = torch.from_numpy(img_np).to(dev, non_blocking=True)
        lab = torch.from_numpy(lab_np.astype(np.int64)).to(dev, non_blocking=True)
        img, lab = spatial(img, lab, plan.patch_size, aug, gen)  # augmentation runs on the device
        img = intensity(img, aug, gen)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.float16, enabled=use_amp):
            logits = model(img)
        loss = loss_fn(logits.float(), lab)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
        scaler.step(opt)
        scaler.update()
        it += 1
        elapsed = time.monotonic() - start
        lv = float(loss.detach())
        history["loss"].append([it, lv])
        history["lr"].append([it, lr])
        frac = _fraction(cfg, it, elapsed)
        last_val = history["val"][-1]["mean_dice"] if history["val"] else float("nan")
        prog.update(it, frac, loss=lv, val_dice=last_val, lr=lr)
        if cfg.val_every and it % cfg.val_every == 0 and frac < 1.0:
            run_validation()
            elapsed = time.monotonic() - start
            frac = _fraction(cfg, it, elapsed)
        if time.monotonic() - last_ckpt > cfg.checkpoint_minutes * 60:
            save(ckpt)
            _curves(out, history)
            last_ckpt = time.monotonic()
    run_validation()
    elapsed = time.monotonic() - start
    save(ckpt)
    torch.save(
        {"model": model.state_dict(), "plan": asdict(plan), "iteration": it}, out / "checkpoint_final.pt"
    )
    _curves(out, history)
    summary = {
        "iterations": it,
        "elapsed_s": elapsed,
        "best_mean_dice": best,
        "final": history["val"][-1] if history["val"] else None,
        "parameters": count_parameters(model),
        "train_groups": len(train_g),
        "val_groups": len(val_g),
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    prog.message(f"done: {it} iterations in {elapsed / 60:.1f} min; best validation mean Dice {best:.4f}")
    return summary


def _curves(out: Path, history: dict[str, Any]) -> None:
    loss = [(float(a), float(b)) for a, b in history["loss"]]
    val: dict[str, list[tuple[float, float]]] = {"mean": []}
    for v in history["val"]:
        val["mean"].append((float(v["iteration"]), float(v["mean_dice"])))
        for k, x in v["per_class"].items():
            val.setdefault(k, []).append((float(v["iteration"]), float(x)))
    write_curves(out / "training_curves.png", loss, val)
