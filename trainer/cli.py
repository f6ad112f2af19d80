"""``segnode-train``: plan, train, evaluate, export, package, convert."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from trainer.data import DEFAULT_GROUP_REGEX, DatasetError, read_dataset


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.replace("x", ",").split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.replace("x", ",").split(",") if x]


def cmd_plan(a: argparse.Namespace) -> int:
    from trainer.plan import fingerprint, make_plan

    ds = read_dataset(a.dataset, a.group_regex)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(ds, a.max_cases)
    (out / "fingerprint.json").write_text(json.dumps(fp, indent=2) + "\n")
    overrides: dict[str, Any] = {
        "spacing": a.spacing,
        "dim": a.dim,
        "patch_size": a.patch_size,
        "batch_size": a.batch_size,
        "base_filters": a.base_filters,
        "max_filters": a.max_filters,
        "max_levels": a.max_levels,
        "normalisation": a.normalisation,
        "network": a.network,
        "norm": a.norm,
        "foreground_oversample": a.foreground_oversample,
        "max_patch_voxels": a.max_patch_voxels,
    }
    plan = make_plan(fp, a.modality, overrides)
    if a.network == "swinunetr":
        plan.extra["feature_size"] = a.feature_size
    plan.save(out / "plan.json")
    print(
        f"fingerprint: {out / 'fingerprint.json'} ({fp['num_cases']} cases, median spacing "
        f"{fp['median_spacing']}, median shape {fp['median_shape']})"
    )
    print(
        f"plan: {out / 'plan.json'}: {plan.dim}D {plan.network}, spacing {plan.spacing}, patch "
        f"{plan.patch_size}, strides {plan.strides}, filters {plan.filters}, batch {plan.batch_size}"
    )
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from trainer.plan import Plan
    from trainer.train import TrainConfig, train

    ds = read_dataset(a.dataset, a.group_regex)
    plan = Plan.load(a.plan)
    if a.batch_size:
        plan.batch_size = a.batch_size
    if a.patch_size:
        plan.patch_size = a.patch_size
    if not a.max_iterations and not a.time_limit_minutes:
        print("give --max-iterations and/or --time-limit-minutes", file=sys.stderr)
        return 2
    cfg = TrainConfig(
        out_dir=Path(a.out),
        seed=a.seed,
        max_iterations=a.max_iterations,
        time_limit_minutes=a.time_limit_minutes,
        lr=a.lr,
        weight_decay=a.weight_decay,
        optimizer=a.optimizer,
        warmup_iterations=a.warmup,
        loss=a.loss,
        val_fraction=a.val_fraction,
        folds=a.folds,
        fold=a.fold,
        val_every=a.val_every,
        val_mode=a.val_mode,
        val_overlap=a.val_overlap,
        checkpoint_minutes=a.checkpoint_minutes,
        threads=a.threads,
        device=a.device,
        amp=not a.no_amp,
        augment=not a.no_augment,
        max_cases=a.max_cases,
        log_every=a.log_every,
        stop_after=a.stop_after,
        init_weights=a.init_weights,
    )
    summary = train(ds, plan, cfg, resume=not a.no_resume)
    print(json.dumps({k: v for k, v in summary.items() if k != "final"}, indent=None))
    return 0


def _eval_cases(a: argparse.Namespace, ds: Any) -> list[Any]:
    labelled = [c for c in ds.cases if c.label is not None]
    if a.cases == "all":
        return labelled
    split = Path(a.cases) if a.cases not in (None, "val") else Path(a.checkpoint).parent / "split.json"
    if not split.is_file():
        raise FileNotFoundError(f"{split}: no split.json (give --cases all or a split file)")
    wanted = set(json.loads(split.read_text())["val_cases"])
    return [c for c in labelled if c.case_id in wanted]


def _predictor(a: argparse.Namespace, model: Any) -> Any:
    import torch

    if getattr(a, "onnx", None):
        from trainer.export import onnx_predictor, onnx_session

        return onnx_predictor(onnx_session(a.onnx, a.threads))

    dev = next(model.parameters()).device

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=dev.type == "cuda"):
            return model(x.to(dev)).float()  # type: ignore[no-any-return]

    return run


def cmd_evaluate(a: argparse.Namespace) -> int:
    import torch

    from trainer.checkpoint import load_model
    from trainer.evaluate import evaluate, largest_component_per_class

    if a.threads:
        torch.set_num_threads(a.threads)
    ds = read_dataset(a.dataset, a.group_regex)
    plan, model, it = load_model(a.checkpoint, a.device if not a.onnx else "cpu")
    cases = _eval_cases(a, ds)
    post = largest_component_per_class(plan.num_classes) if a.postprocess == "largest" else None
    summary = evaluate(
        ds,
        cases,
        plan,
        _predictor(a, model),
        Path(a.out),
        a.mode,
        a.overlap,
        a.worst,
        a.eval_group_regex,
        device=a.device if not a.onnx else "cpu",
        postprocess=post,
    )
    o = summary["overall"]
    print(
        f"{o['cases']} cases ({summary['patients']} patients), checkpoint iteration {it}: mean Dice "
        f"{o['mean_dice']:.4f}, "
        + ", ".join(
            f"{n} Dice {o[n]['dice_mean']:.4f} HD95 {o[n]['hd95_mm_mean']:.2f} mm" for n in summary["classes"]
        )
    )
    if "overall_postprocessed" in summary:
        o = summary["overall_postprocessed"]
        print(
            "post-processed (largest component per class): mean Dice "
            f"{o['mean_dice']:.4f}, "
            + ", ".join(
                f"{n} Dice {o[n]['dice_mean']:.4f} HD95 {o[n]['hd95_mm_mean']:.2f} mm"
                for n in summary["classes"]
            )
        )
    print(f"wrote {Path(a.out) / 'metrics.csv'}, summary.json, worst_cases.png")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    import torch

    from trainer.checkpoint import load_model
    from trainer.evaluate import evaluate
    from trainer.export import example_inputs, export_all, onnx_predictor, onnx_session
    from trainer.prepare import prepare_case

    if a.threads:
        torch.set_num_threads(a.threads)
    ds = read_dataset(a.dataset, a.group_regex)
    plan, model, _ = load_model(a.checkpoint)
    a.cases = a.cases or "val"
    cases = _eval_cases(a, ds)[: a.max_eval_cases or None]
    split = Path(a.checkpoint).parent / "split.json"
    train_ids = set(json.loads(split.read_text())["train_cases"]) if split.is_file() else set()
    calib_cases = [c for c in ds.cases if c.case_id in train_ids][:: max(1, len(train_ids) // 16)] or cases
    prepared = [prepare_case(c, plan) for c in cases[:4]]
    calibration = example_inputs(plan, [prepare_case(c, plan) for c in calib_cases[:16]], 16, seed=1)[:-1]
    out = Path(a.out)
    report = export_all(model, plan, prepared, out, calibration, variants=not a.no_variants)
    if a.eval_variants and not a.no_variants:
        accuracy = {}
        for key in ("onnx", "onnx_fp16", "onnx_int8"):
            pred = onnx_predictor(onnx_session(Path(report["files"][key]), a.threads))
            s = evaluate(ds, cases, plan, pred, out / f"eval_{key}", a.mode, a.overlap, 2, log=lambda _: None)
            accuracy[key] = {
                "mean_dice": s["overall"]["mean_dice"],
                "seconds_per_case": s["seconds_per_case"],
                **{n: s["overall"][n]["dice_mean"] for n in s["classes"]},
            }
            print(
                f"{key}: mean Dice {accuracy[key]['mean_dice']:.4f} on {len(cases)} cases "
                f"({accuracy[key]['seconds_per_case']:.2f} s/case)"
            )
        for key in ("onnx_fp16", "onnx_int8"):
            accuracy[key]["dice_change_vs_fp32"] = accuracy[key]["mean_dice"] - accuracy["onnx"]["mean_dice"]
        report["accuracy"] = accuracy
    (out / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'export_report.json'}")
    return 0


def cmd_package(a: argparse.Namespace) -> int:
    import csv

    from trainer.checkpoint import load_model
    from trainer.networks import count_parameters
    from trainer.package import (
        ACDC_LICENCE,
        CARDIAC_LIMITATIONS,
        LicenceInfo,
        PackageSpec,
        metrics_from_summary,
        package,
    )

    plan, model, _ = load_model(a.checkpoint)
    if a.licence == "acdc":
        lic = ACDC_LICENCE
        limitations = list(CARDIAC_LIMITATIONS)
    else:
        if not (a.licence_file and a.spdx and a.attribution and a.source_url and a.training_data):
            raise ValueError(
                "--licence custom needs --spdx, --licence-file, --attribution, --source-url, --training-data"
            )
        lic = LicenceInfo(
            spdx=a.spdx,
            text=Path(a.licence_file).read_text(),
            notice=Path(a.notice_file).read_text() if a.notice_file else a.attribution,
            attribution=a.attribution,
            authors=a.authors or ["unknown"],
            source_url=a.source_url,
            training_description=a.training_data,
        )
        limitations = []
    metrics = []
    if a.eval_dir:
        summary = json.loads((Path(a.eval_dir) / "summary.json").read_text())
        with open(Path(a.eval_dir) / "metrics.csv") as fh:
            rows = list(csv.DictReader(fh))
        metrics = metrics_from_summary(summary, rows, a.metrics_dataset, a.metrics_reference)
        post_csv = Path(a.eval_dir) / "metrics_postprocessed.csv"
        if "overall_postprocessed" in summary and post_csv.is_file():
            with open(post_csv) as fh:
                rows_post = list(csv.DictReader(fh))
            post = dict(summary, overall=summary["overall_postprocessed"])
            metrics += metrics_from_summary(
                post, rows_post, a.metrics_dataset, a.metrics_reference, suffix="_largest_component"
            )
    spec = PackageSpec(
        name=a.name,
        version=a.version,
        description=a.description,
        modality=a.modality,
        licence=lic,
        limitations=limitations + list(a.limitation or []),
    )
    bundle = package(Path(a.onnx), plan, spec, Path(a.models_root), count_parameters(model), metrics)
    size = sum(p.stat().st_size for p in bundle.path.iterdir() if p.is_file())
    print(
        f"bundle {bundle.name} {bundle.version} at {bundle.path} ({size / 1e6:.2f} MB), every sha256 verified"
    )
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from trainer.convert import convert_contours, convert_seg

    if a.kind == "contours":
        result = convert_contours(Path(a.dicom), Path(a.labels), Path(a.out), a.case_prefix)
    else:
        result = convert_seg(Path(a.dicom), Path(a.labels), Path(a.out), a.case_prefix)
    print(json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segnode-train", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def dataset_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "dataset", type=Path, help="nnU-Net v2 raw dataset folder (dataset.json, imagesTr, labelsTr)"
        )
        sp.add_argument(
            "--group-regex",
            default=DEFAULT_GROUP_REGEX,
            help="regex with a 'group' (patient) capture over case ids; splits keep groups together",
        )
        sp.add_argument("--max-cases", type=int, default=None, help="use only the first N labelled cases")

    sp = sub.add_parser("plan", help="fingerprint the dataset and write plan.json")
    dataset_args(sp)
    sp.add_argument("--out", required=True, type=Path)
    sp.add_argument("--modality", default="MR", choices=["MR", "CT"])
    sp.add_argument("--spacing", type=_floats, help="target spacing X,Y,Z mm")
    sp.add_argument("--dim", type=int, choices=[2, 3])
    sp.add_argument("--patch-size", type=_ints, help="patch per network axis, e.g. 160,160")
    sp.add_argument("--batch-size", type=int)
    sp.add_argument("--base-filters", type=int)
    sp.add_argument("--max-filters", type=int)
    sp.add_argument("--max-levels", type=int)
    sp.add_argument("--max-patch-voxels", type=int)
    sp.add_argument("--normalisation", choices=["zscore", "ct", "none"])
    sp.add_argument("--network", choices=["dynunet", "swinunetr"], default="dynunet")
    sp.add_argument("--feature-size", type=int, default=24, help="SwinUNETR feature size")
    sp.add_argument("--norm", choices=["instance", "batch"])
    sp.add_argument("--foreground-oversample", type=float)
    sp.set_defaults(func=cmd_plan)

    sp = sub.add_parser("train", help="train a network from plan.json")
    dataset_args(sp)
    sp.add_argument("--plan", required=True, type=Path)
    sp.add_argument("--out", required=True, type=Path)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--max-iterations", type=int)
    sp.add_argument(
        "--time-limit-minutes", type=float, help="wall-clock budget; the poly schedule follows it"
    )
    sp.add_argument("--lr", type=float, default=2e-3)
    sp.add_argument("--weight-decay", type=float, default=3e-5)
    sp.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    sp.add_argument("--warmup", type=int, default=50)
    sp.add_argument("--loss", choices=["dice_ce", "dice_focal", "tversky"], default="dice_ce")
    sp.add_argument("--val-fraction", type=float, default=0.2)
    sp.add_argument("--folds", type=int, default=0, help="k-fold split by patient (0: fixed fraction)")
    sp.add_argument("--fold", type=int, default=0)
    sp.add_argument("--val-every", type=int, default=250)
    sp.add_argument("--val-mode", choices=["sliding", "whole"], default="sliding")
    sp.add_argument("--val-overlap", type=float, default=0.25)
    sp.add_argument("--checkpoint-minutes", type=float, default=5.0)
    sp.add_argument("--threads", type=int, default=None)
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--no-amp", action="store_true")
    sp.add_argument("--no-augment", action="store_true")
    sp.add_argument("--no-resume", action="store_true")
    sp.add_argument("--batch-size", type=int)
    sp.add_argument("--patch-size", type=_ints)
    sp.add_argument("--log-every", type=int, default=10)
    sp.add_argument("--stop-after", type=int, help="stop (checkpointed) after N iterations of this session")
    sp.add_argument(
        "--init-weights",
        type=Path,
        help="fine-tune: start from this checkpoint's network weights (same topology) with a fresh "
        "optimiser and schedule; ignored when resuming the output folder's own checkpoint",
    )
    sp.set_defaults(func=cmd_train)

    def model_eval_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--checkpoint", required=True, type=Path)
        sp.add_argument("--out", required=True, type=Path)
        sp.add_argument(
            "--cases", default=None, help="'val' (the run's split.json, default), 'all', or a split.json path"
        )
        sp.add_argument("--mode", choices=["sliding", "whole"], default="sliding")
        sp.add_argument("--overlap", type=float, default=0.5)
        sp.add_argument("--threads", type=int, default=None)
        sp.add_argument("--device", default="cpu")

    sp = sub.add_parser("evaluate", help="per case/class Dice and HD95 on held-out cases")
    dataset_args(sp)
    model_eval_args(sp)
    sp.add_argument("--onnx", type=Path, help="evaluate this ONNX file instead of the torch checkpoint")
    sp.add_argument("--postprocess", choices=["none", "largest"], default="none")
    sp.add_argument("--worst", type=int, default=4, help="cases in the worst-case montage")
    sp.add_argument(
        "--eval-group-regex",
        default=None,
        help="regex over case ids whose 'group' capture (or match) groups the summary, e.g. 'frame\\d+'",
    )
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("export", help="TorchScript, ONNX (+fp16, int8), TensorRT when present")
    dataset_args(sp)
    model_eval_args(sp)
    sp.add_argument("--no-variants", action="store_true", help="skip fp16/int8")
    sp.add_argument("--eval-variants", action="store_true", help="measure Dice of fp32/fp16/int8 ONNX")
    sp.add_argument("--max-eval-cases", type=int, default=None)
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("package", help="write a model bundle (manifest.yaml + files)")
    sp.add_argument("--checkpoint", required=True, type=Path)
    sp.add_argument("--onnx", required=True, type=Path)
    sp.add_argument("--eval-dir", type=Path, help="evaluate output (summary.json, metrics.csv)")
    sp.add_argument("--models-root", required=True, type=Path)
    sp.add_argument("--name", required=True)
    sp.add_argument("--version", required=True)
    sp.add_argument("--description", required=True)
    sp.add_argument("--modality", default="MR")
    sp.add_argument("--licence", choices=["acdc", "custom"], default="acdc")
    sp.add_argument("--spdx")
    sp.add_argument("--licence-file", type=Path)
    sp.add_argument("--notice-file", type=Path)
    sp.add_argument("--attribution")
    sp.add_argument("--authors", nargs="*")
    sp.add_argument("--source-url")
    sp.add_argument("--training-data")
    sp.add_argument("--limitation", action="append")
    sp.add_argument("--metrics-dataset", default="ACDC held-out patients")
    sp.add_argument("--metrics-reference", default="ACDC manual reference labels")
    sp.set_defaults(func=cmd_package)

    sp = sub.add_parser("convert", help="DICOM series + contours or DICOM-SEG -> nnU-Net raw layout")
    sp.add_argument("kind", choices=["contours", "seg"])
    sp.add_argument("dicom", type=Path, help="folder of the DICOM image series")
    sp.add_argument("labels", type=Path, help="contour folder (Sunnybrook i/o-contours) or DICOM-SEG file")
    sp.add_argument("--out", required=True, type=Path)
    sp.add_argument("--case-prefix", required=True, help="case id (seg) or prefix (contours)")
    sp.set_defaults(func=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return int(a.func(a))
    except (DatasetError, ValueError, FileNotFoundError) as exc:
        print(f"segnode-train {a.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
