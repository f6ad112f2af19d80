"""Honest evaluation on held-out cases: per case and per class Dice and HD95 (MONAI metrics, in mm, in
the original grid), a CSV, a summary JSON (grouped by site/scanner or any case metadata the dataset
gives), and a PNG montage of the worst cases."""

from __future__ import annotations

import csv
import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from trainer.data import Case, RawDataset
from trainer.infer import predict_case
from trainer.plan import Plan
from trainer.prepare import prepare_case

Predictor = Callable[[torch.Tensor], torch.Tensor]


def case_metrics(
    pred: NDArray[np.uint8], ref: NDArray[np.uint8], num_classes: int, spacing: tuple[float, float, float]
) -> tuple[list[float], list[float]]:
    """Dice and HD95 (mm) per foreground class. NaN Dice/HD95 when the class is absent in both;
    HD95 is NaN when only one of them has the class (no distance is defined), Dice is then 0."""
    p = torch.nn.functional.one_hot(torch.from_numpy(pred.astype(np.int64)), num_classes).movedim(-1, 0)[None]
    r = torch.nn.functional.one_hot(torch.from_numpy(ref.astype(np.int64)), num_classes).movedim(-1, 0)[None]
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(p, r)
    dices = [float(x) for x in dice[0]]
    hds = []
    hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    for c in range(1, num_classes):
        pc, rc = bool(p[0, c].any()), bool(r[0, c].any())
        if not pc and not rc:
            dices[c - 1] = float("nan")
            hds.append(float("nan"))
        elif pc != rc:
            dices[c - 1] = 0.0
            hds.append(float("nan"))
        else:
            v = hd(p[:, [0, c]], r[:, [0, c]], spacing=list(spacing))
            hds.append(float(v[0, 0]))
    return dices, hds


def _group_keys(ds: RawDataset, case: Case, group_regex: str | None) -> dict[str, str]:
    keys = {
        k: v
        for k, v in ds.case_meta.get(case.case_id, {}).items()
        if k.lower() in ("site", "scanner", "vendor", "centre", "center", "field_strength", "group")
    }
    if group_regex:
        m = re.search(group_regex, case.case_id)
        if m:
            keys["group"] = m.groupdict().get("group", m.group(0))
    return keys


def _colour_overlay(gray: NDArray[np.float32], lab: NDArray[np.uint8]) -> Image.Image:
    lo, hi = np.percentile(gray, [1, 99])
    g = np.clip((gray - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = np.stack([g, g, g], -1) * 255
    colours = {1: (230, 60, 60), 2: (70, 200, 90), 3: (60, 110, 240)}
    for v, col in colours.items():
        m = lab == v
        rgb[m] = 0.5 * rgb[m] + 0.5 * np.asarray(col)
    return Image.fromarray(rgb.astype(np.uint8).transpose(1, 0, 2))  # (X, Y) -> image rows = Y


def write_montage(
    path: Path, items: list[tuple[str, NDArray[np.float32], NDArray[np.uint8], NDArray[np.uint8], float]]
) -> None:
    """items: (case id, image slice, reference slice, prediction slice, mean Dice) -> rows of 3 panels."""
    if not items:
        return
    tiles = []
    for name, img, ref, pred, d in items:
        a = _colour_overlay(img, np.zeros_like(ref))
        b = _colour_overlay(img, ref)
        c = _colour_overlay(img, pred)
        w, h = a.size
        row = Image.new("RGB", (3 * w, h + 16), (255, 255, 255))
        for i, t in enumerate((a, b, c)):
            row.paste(t, (i * w, 16))
        ImageDraw.Draw(row).text(
            (4, 2), f"{name}  mean Dice {d:.3f}   image | reference | prediction", fill=(0, 0, 0)
        )
        tiles.append(row)
    width = max(t.size[0] for t in tiles)
    out = Image.new("RGB", (width, sum(t.size[1] for t in tiles)), (255, 255, 255))
    y = 0
    for t in tiles:
        out.paste(t, (0, y))
        y += t.size[1]
    out.save(path)


def evaluate(
    ds: RawDataset,
    cases: list[Case],
    plan: Plan,
    predictor: Predictor,
    out: Path,
    mode: str = "sliding",
    overlap: float = 0.5,
    worst: int = 4,
    group_regex: str | None = None,
    device: str = "cpu",
    log: Callable[[str], None] = print,
    postprocess: Callable[[NDArray[np.uint8]], NDArray[np.uint8]] | None = None,
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n, v in sorted(plan.labels.items(), key=lambda kv: kv[1]) if v != 0]
    in_data = set(ds.foreground_labels().values())
    rows: list[dict[str, Any]] = []
    rows_post: list[dict[str, Any]] = []
    montage_src = []
    t_total = 0.0
    for case in cases:
        prep = prepare_case(case, plan)
        ref = prep.original.label
        if ref is None:
            continue
        t0 = time.perf_counter()
        raw = predict_case(predictor, prep, plan, mode, overlap, plan.batch_size, device)
        dt = time.perf_counter() - t0
        t_total += dt
        post = postprocess(raw) if postprocess is not None else None
        if ds.ignore_value is not None:
            # unknown truth: count neither prediction nor reference there
            known = ref != ds.ignore_value
            raw = np.where(known, raw, 0).astype(np.uint8)
            post = np.where(known, post, 0).astype(np.uint8) if post is not None else None
            ref = np.where(known, ref, 0).astype(np.uint8)

        def make_row(
            pred: NDArray[np.uint8],
            ref: NDArray[np.uint8] = ref,
            case: Case = case,
            spacing: tuple[float, float, float] = prep.original.spacing,
            dt: float = dt,
        ) -> dict[str, Any]:
            dices, hds = case_metrics(pred, ref, plan.num_classes, spacing)
            row: dict[str, Any] = {
                "case": case.case_id,
                "patient": case.group,
                **_group_keys(ds, case, group_regex),
            }
            for n, d, h in zip(names, dices, hds, strict=True):
                if plan.labels[n] in in_data:
                    row[f"dice_{n}"] = d
                    row[f"hd95_mm_{n}"] = h
            kept = [d for n, d in zip(names, dices, strict=True) if plan.labels[n] in in_data]
            row["mean_dice"] = (
                float(np.nanmean(kept)) if not all(math.isnan(d) for d in kept) else float("nan")
            )
            row["seconds"] = dt
            return row

        row = make_row(raw)
        rows.append(row)
        if post is not None:
            rows_post.append(make_row(post))
        pred = post if post is not None else raw
        log(
            f"{case.case_id}: "
            + " ".join(
                f"{n} {row[f'dice_{n}']:.3f}/{row[f'hd95_mm_{n}']:.1f}mm" for n in names if f"dice_{n}" in row
            )
            + (f" | post-processed mean Dice {rows_post[-1]['mean_dice']:.3f}" if post is not None else "")
        )
        # slice with the most disagreement, for the montage
        axis = plan.slice_axis if plan.slice_axis is not None else 2
        err = np.moveaxis(pred != ref, axis, 0).reshape(pred.shape[axis], -1).sum(1)
        k = int(err.argmax())
        montage_src.append(
            (
                case.case_id,
                np.take(prep.original.image[0], k, axis=axis),
                np.take(ref, k, axis=axis),
                np.take(pred, k, axis=axis),
                row["mean_dice"],
            )
        )
    if not rows:
        raise ValueError("no labelled cases to evaluate")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    for name, table in (("metrics.csv", rows), ("metrics_postprocessed.csv", rows_post)):
        if not table:
            continue
        with open(out / name, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            for r in table:
                w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})

    def summarise(subset: list[dict[str, Any]]) -> dict[str, Any]:
        s: dict[str, Any] = {"cases": len(subset)}
        for n in names:
            d = np.asarray([r[f"dice_{n}"] for r in subset], dtype=np.float64)
            h = np.asarray([r[f"hd95_mm_{n}"] for r in subset], dtype=np.float64)
            s[n] = {
                "dice_mean": float(np.nanmean(d)),
                "dice_std": float(np.nanstd(d)),
                "dice_median": float(np.nanmedian(d)),
                "hd95_mm_mean": float(np.nanmean(h)),
                "hd95_mm_median": float(np.nanmedian(h)),
                "hd95_undefined": int(np.isnan(h).sum()),
            }
        s["mean_dice"] = float(np.mean([s[n]["dice_mean"] for n in names]))
        s["mean_hd95_mm"] = float(np.mean([s[n]["hd95_mm_mean"] for n in names]))
        return s

    names = [n for n in names if plan.labels[n] in in_data]
    summary: dict[str, Any] = {
        "overall": summarise(rows),
        "classes": names,
        "mode": mode,
        "overlap": overlap,
        "seconds_per_case": t_total / len(rows),
        "patients": len({r["patient"] for r in rows}),
    }
    if rows_post:
        summary["overall_postprocessed"] = summarise(rows_post)
        summary["postprocess"] = getattr(postprocess, "__doc__", None) or "post-processed"
    group_cols = [
        k for k in keys if k in ("site", "scanner", "vendor", "centre", "center", "field_strength", "group")
    ]
    for col in group_cols:
        vals = sorted({str(r.get(col)) for r in rows})
        summary[f"by_{col}"] = {v: summarise([r for r in rows if str(r.get(col)) == v]) for v in vals}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    order = sorted(
        range(len(rows)), key=lambda i: rows[i]["mean_dice"] if not math.isnan(rows[i]["mean_dice"]) else -1
    )
    write_montage(out / "worst_cases.png", [montage_src[i] for i in order[:worst]])
    return summary


def largest_component_per_class(
    num_classes: int,
) -> Callable[
    [
        NDArray[np.uint8],
    ],
    NDArray[np.uint8],
]:
    """nnU-Net-style post-processing: keep the largest 3D connected component of each class."""
    from scipy import ndimage

    def run(pred: NDArray[np.uint8]) -> NDArray[np.uint8]:
        out = pred.copy()
        for c in range(1, num_classes):
            m = pred == c
            lab, n = ndimage.label(m, structure=np.ones((3,) * m.ndim, dtype=bool))
            if n > 1:
                sizes = ndimage.sum_labels(m, lab, index=np.arange(1, n + 1))
                keep = int(np.argmax(sizes)) + 1
                out[m & (lab != keep)] = 0
        return out

    return run
