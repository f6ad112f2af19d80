#!/usr/bin/env python3
"""Accuracy and timing of the converted pyliverlesionseg nets on the real data in ../shared/data.

    python bench/liver_accuracy.py [--models DIR | --config segnode.yaml] [--backend onnxruntime|torch]
                                   [--chaos 1,2,3 | --chaos all] [--no-ct] [--figures] [--out bench/out]

- CT: TotalSegmentator's example CT (3 mm), liver Dice against its (silver) v1 liver; the lesion net
  inside the liver (count, volume, blocks run).
- MR: CHAOS T2-SPIR patients (manual labels, label 1 = liver, 4 = spleen), liver Dice per patient and
  the mean, with precision/recall and volumes (the misses are under-segmentations: precision stays
  high where recall drops) and the reference liver's T2 signal (median over the volume's maximum, and
  over the spleen's median): a liver as dark as the spleen is the iron-overload pattern the net fails on.

Everything runs through ``pipelines.ct_liver.segment`` (the pipeline's own pre/post-processing) on
RAS-canonical NIfTI volumes. Models come from ``--models`` (a folder of bundles), from the storage of
``--config``, or are installed into a temporary folder first (``segnode models install ct-liver``).
Writes ``<out>/liver_accuracy.json`` after every case; with ``--figures`` also ``<out>/chaos_<id>.png``:
six axial slices across the reference liver, anterior up, patient right on the image's right, with the
outlines of the reference liver (green), the predicted liver (red) and the reference spleen (blue).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage  # type: ignore[import-untyped]

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.bundles import models_dir  # noqa: E402
from pipelines.ct_liver.models import open_networks  # noqa: E402
from pipelines.ct_liver.processing import count_components  # noqa: E402
from pipelines.ct_liver.segment import segment, segment_liver  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "liver"


def canonical(path: Path) -> tuple[np.ndarray[Any, Any], tuple[float, float, float]]:
    image = nib.as_closest_canonical(nib.load(str(path)))  # type: ignore[no-untyped-call]
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    return np.asarray(image.dataobj, dtype=np.float32), (zooms[0], zooms[1], zooms[2])


def dice(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def _outline(mask: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return np.asarray(mask & ~ndimage.binary_erosion(mask), dtype=bool)


def write_figure(
    path: Path,
    image: np.ndarray[Any, Any],
    masks: list[tuple[np.ndarray[Any, Any], tuple[int, int, int]]],
    reference: np.ndarray[Any, Any],
) -> None:
    """Six axial slices across ``reference`` side by side, each mask drawn as an outline."""
    from PIL import Image

    slices = np.where(reference.any(axis=(0, 1)))[0]
    chosen = np.linspace(slices[0], slices[-1], 6).round().astype(int) if len(slices) else [0]
    tiles = []
    for z in chosen:
        plane = image[:, :, z].astype(np.float64)
        span = float(plane.max() - plane.min()) or 1.0
        grey = np.clip((plane - plane.min()) / span, 0, 1) * 255
        rgb = np.stack([grey, grey, grey], axis=-1)
        for mask, colour in masks:
            rgb[_outline(mask[:, :, z])] = colour
        tiles.append(np.flipud(rgb.transpose(1, 0, 2)))  # rows: y, anterior up
    Image.fromarray(np.concatenate(tiles, axis=1).astype(np.uint8)).save(path)


def resolve_models(args: argparse.Namespace) -> Path:
    if args.models:
        return Path(args.models)
    if args.config:
        from node.settings import load_settings

        return models_dir(load_settings(Path(args.config)).storage.path)
    from pipelines.liver.install import install_ct_liver

    root = Path(tempfile.mkdtemp(prefix="liver-bench-")) / "models"
    install_ct_liver(
        root, Path(tempfile.gettempdir()) / "segnode-test-cache", lambda m: print(m, file=sys.stderr)
    )
    return root


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models")
    parser.add_argument("--config")
    parser.add_argument("--backend", choices=["onnxruntime", "torch"], default="onnxruntime")
    parser.add_argument("--chaos", default="all", help="comma-separated patient IDs, or 'all'")
    parser.add_argument("--no-ct", action="store_true")
    parser.add_argument("--figures", action="store_true", help="write chaos_<id>.png per patient")
    parser.add_argument("--out", default=str(REPO / "bench" / "out"))
    args = parser.parse_args()

    nets = open_networks(resolve_models(args), args.backend)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"backend": nets.backend, "ct": None, "chaos": {}}

    def save() -> None:
        (out / "liver_accuracy.json").write_text(json.dumps(report, indent=2))

    if not args.no_ct:
        image, voxel = canonical(DATA / "totalsegmentator_example" / "example_ct.nii.gz")
        reference, _ = canonical(DATA / "totalsegmentator_example" / "example_seg_v1" / "liver.nii.gz")
        started = time.perf_counter()
        result = segment(image, voxel, "CT", nets)
        voxel_ml = float(np.prod(voxel)) / 1000
        lesions = result.lesions if result.lesions is not None else np.zeros_like(result.liver)
        count, sizes = count_components(lesions)
        report["ct"] = {
            "case": "TotalSegmentator example_ct.nii.gz",
            "liver_dice": round(dice(result.liver, reference > 0.5), 4),
            "liver_ml": round(float(result.liver.sum()) * voxel_ml, 1),
            "reference_ml": round(float((reference > 0.5).sum()) * voxel_ml, 1),
            "lesion_count": count,
            "lesion_ml": round(float(lesions.sum()) * voxel_ml, 2),
            "lesion_volumes_ml": [round(s * voxel_ml, 2) for s in sizes],
            "lesion_blocks_run_skipped": [result.lesion_blocks_run, result.lesion_blocks_skipped],
            "timings": result.timings,
            "seconds": round(time.perf_counter() - started, 1),
            "notes": result.notes,
        }
        print(json.dumps(report["ct"]), flush=True)
        save()

    chaos = DATA / "chaos_t2_mr"
    if args.chaos == "all":
        ids = sorted(
            (p.name[len("image_") : -len(".nii.gz")] for p in (chaos / "images").glob("image_*.nii.gz")),
            key=int,
        )
    else:
        ids = [s.strip() for s in args.chaos.split(",") if s.strip()]
    for pid in ids:
        image, voxel = canonical(chaos / "images" / f"image_{pid}.nii.gz")
        labels, _ = canonical(chaos / "labels" / f"label_{pid}.nii.gz")
        started = time.perf_counter()
        timings: dict[str, float] = {}
        with nets.open("liver") as liver_net:
            liver, _notes = segment_liver(image, voxel, "MR", liver_net, timings)
        reference = np.rint(labels) == 1
        spleen = np.rint(labels) == 4
        both = float((liver & reference).sum())
        voxel_ml = float(np.prod(voxel)) / 1000
        liver_signal = float(np.median(image[reference]))
        report["chaos"][pid] = {
            "liver_dice": round(dice(liver, reference), 4),
            "precision": round(both / max(1.0, float(liver.sum())), 4),
            "recall": round(both / max(1.0, float(reference.sum())), 4),
            "liver_ml": round(float(liver.sum()) * voxel_ml, 1),
            "reference_ml": round(float(reference.sum()) * voxel_ml, 1),
            "liver_signal_over_max": round(liver_signal / float(image.max()), 3),
            "liver_over_spleen_signal": (
                round(liver_signal / float(np.median(image[spleen])), 3) if spleen.any() else None
            ),
            "seconds": round(time.perf_counter() - started, 1),
            "timings": timings,
        }
        if args.figures:
            write_figure(
                out / f"chaos_{pid}.png",
                image,
                [(reference, (0, 255, 0)), (liver, (255, 0, 0)), (spleen, (0, 0, 255))],
                reference,
            )
        scores = [c["liver_dice"] for c in report["chaos"].values()]
        report["chaos_mean_dice"] = round(float(np.mean(scores)), 4)
        print(
            f"CHAOS {pid}: {json.dumps(report['chaos'][pid])}  (mean so far {report['chaos_mean_dice']})",
            flush=True,
        )
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
