"""Auto-planned U-Net vs a fixed hand-configured U-Net vs SwinUNETR on ACDC: same patient split, same
wall-clock budget each; Dice per class, HD95 (mm), parameters, CPU inference seconds per volume (and GPU
when run with --device cuda). Writes bench/cardiac_models.md (or --report).

    .venv/bin/python bench/cardiac_models.py --minutes 8 [--device cuda] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import load_model
from trainer.data import read_dataset
from trainer.evaluate import evaluate
from trainer.networks import count_parameters
from trainer.plan import Plan, fingerprint, make_plan
from trainer.prepare import prepare_case
from trainer.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


def candidates(fp: dict[str, Any], cpu: bool) -> dict[str, Plan]:
    """The three contenders. On CPU the auto plan keeps its topology but a CPU-sized patch/width."""
    auto_over: dict[str, Any] = {}
    if cpu:
        auto_over = {"patch_size": [128, 128], "base_filters": 16, "max_filters": 256, "batch_size": 10}
    auto = make_plan(fp, "MR", auto_over)
    # hand-configured: the classic 4-level U-Net, 32 filters, 128x128 patches, no data-driven choices
    fixed = make_plan(
        fp,
        "MR",
        {"patch_size": [128, 128], "max_levels": 4, "base_filters": 32, "max_filters": 256, "batch_size": 8},
    )
    swin = make_plan(fp, "MR", {"patch_size": [128, 128], "network": "swinunetr", "batch_size": 8})
    swin.extra["feature_size"] = 12 if cpu else 24
    return {"auto-planned DynUNet": auto, "fixed U-Net (4 levels, 32 filters)": fixed, "SwinUNETR": swin}


def inference_seconds(checkpoint: Path, ds_cases: list[Any], device: str, mode: str = "sliding") -> float:
    from trainer.infer import predict_case

    plan, model, _ = load_model(checkpoint, device)
    prepared = [prepare_case(c, plan) for c in ds_cases]

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)  # type: ignore[no-any-return]

    t0 = time.perf_counter()
    for p in prepared:
        predict_case(run, p, plan, mode, 0.5, plan.batch_size, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / len(prepared)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cardiac" / "acdc")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "cardiac_models")
    ap.add_argument("--report", type=Path, default=REPO / "bench" / "cardiac_models.md")
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-cases", type=int, default=None, help="smoke runs: first N labelled cases")
    ap.add_argument("--max-iterations", type=int, default=None, help="smoke runs: iteration cap")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ds = read_dataset(a.data)
    fp = fingerprint(ds, a.max_cases)
    rows = []
    for name, plan in candidates(fp, a.device == "cpu").items():
        slug = name.split()[0].lower().replace("-", "_")
        out = a.out / slug
        cfg = TrainConfig(
            out_dir=out,
            seed=0,
            time_limit_minutes=a.minutes,
            max_iterations=a.max_iterations,
            device=a.device,
            threads=a.threads,
            val_every=0,
            val_mode="whole",
            max_cases=a.max_cases,
            val_fraction=0.2,
        )
        summary = train(ds, plan, cfg, resume=False)
        split = json.loads((out / "split.json").read_text())
        cases = [c for c in ds.cases if c.case_id in set(split["val_cases"])]
        plan_l, model, _ = load_model(out / "checkpoint_final.pt", a.device)

        def run(x: torch.Tensor, model: torch.nn.Module = model) -> torch.Tensor:
            with torch.no_grad():
                return model(x)  # type: ignore[no-any-return]

        ev = evaluate(
            ds, cases, plan_l, run, out / "eval", "sliding", 0.5, 2, device=a.device, log=lambda _: None
        )
        o = ev["overall"]
        rows.append(
            {
                "name": name,
                "params": count_parameters(model),
                "iterations": summary["iterations"],
                "patch": plan.patch_size,
                "dice": {k: o[k]["dice_mean"] for k in ev["classes"]},
                "hd95": {k: o[k]["hd95_mm_mean"] for k in ev["classes"]},
                "mean_dice": o["mean_dice"],
                "s_per_volume_cpu": inference_seconds(out / "checkpoint_final.pt", cases[:4], "cpu"),
                "s_per_volume_gpu": inference_seconds(out / "checkpoint_final.pt", cases[:4], a.device)
                if a.device.startswith("cuda")
                else None,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    best = max(rows, key=lambda r: r["mean_dice"])
    lines = [
        "# Cardiac models: auto-planned U-Net vs fixed U-Net vs SwinUNETR (ACDC)",
        "",
        f"Produced by `bench/cardiac_models.py --minutes {a.minutes} --device {a.device}`; "
        f"same patient-level split (seed 0, 20 % of patients held out), {a.minutes} min of training each, "
        f"{a.threads} CPU threads. "
        "Dice and HD95 (mm) on the held-out ED/ES volumes, sliding window (overlap 0.5), no post-processing.",
        "",
        "| model | params (M) | iterations | patch | Dice RV | Dice MYO | Dice LV | mean Dice "
        "| HD95 RV | HD95 MYO | HD95 LV | CPU s/volume | GPU s/volume |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d, h = r["dice"], r["hd95"]
        gpu = f"{r['s_per_volume_gpu']:.2f}" if r["s_per_volume_gpu"] is not None else "not measured"
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.2f} | {r['iterations']} | {r['patch']} | {d['RV']:.3f} | "
            f"{d['MYO']:.3f} | {d['LV']:.3f} | {r['mean_dice']:.3f} | {h['RV']:.1f} | {h['MYO']:.1f} | "
            f"{h['LV']:.1f} | {r['s_per_volume_cpu']:.2f} | {gpu} |"
        )
    lines += [
        "",
        f"Best under this budget: **{best['name']}** (mean Dice {best['mean_dice']:.3f}).",
        "",
        "The shipped mri-cardiac model is the auto-planned DynUNet: it is what the trainer produces without "
        "hand tuning, it exports to ONNX/TensorRT without custom ops (SwinUNETR's window attention is "
        "slower on CPU), and its plan is data-driven. See the numbers above for this budget.",
    ]
    a.report.write_text("\n".join(lines) + "\n")
    print(f"wrote {a.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
