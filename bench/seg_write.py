#!/usr/bin/env python3
"""SEG write benchmark: segnode's ``write_seg`` against plain highdicom on the same input.

    python bench/seg_write.py [--slices 200] [--size 512] [--repeats 3] [--out bench/out]

Builds headers of a ``--slices`` x ``--size`` x ``--size`` CT series (no pixel data: a SEG needs
none) and two masks like the liver pipeline's: a liver on 80 % of the slices and lesions inside it
(the segments overlap). Times build + write of the BINARY SEG, best of ``--repeats``:

- ``segnode``: ``pipelines.outputs.write_seg`` (``method="fast"``, what pipelines use);
- ``highdicom``: ``highdicom.seg.Segmentation(...)`` with its defaults + ``save_as``, from the same
  sanitised sources (``write_seg(..., method="highdicom")``).

Checks that both files hold the same frames and pixel data, prints a table with PASS/FAIL against
the 0.5 s target for ``segnode`` and writes ``<out>/seg_write.json``. Timings belong here, never in
the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.outputs import LIVER, LIVER_LESION, Algorithm, OutputIdentity, write_seg  # noqa: E402

TARGET_S = 0.5


def headers(n: int, size: int) -> list[Dataset]:
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
            "Bench^Seg",
            "SEGNODE-BENCH",
            "19700101",
            "O",
        )
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "A1"
        ds.ReferringPhysicianName = ""
        ds.SeriesNumber, ds.InstanceNumber = 1, i + 1
        ds.Rows = ds.Columns = size
        ds.PixelSpacing = [0.78125, 0.78125]
        ds.SliceThickness = 1.25
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-200.0, -200.0, -300.0 + 1.25 * i]
        out.append(ds)
    return out


def masks(n: int, size: int) -> np.ndarray:
    """(2, n, size, size): a liver ellipsoid over 80 % of the slices and three lesions inside it."""
    z, y, x = np.ogrid[:n, :size, :size]
    liver = ((z - n / 2) / (0.4 * n)) ** 2 + ((y - 0.45 * size) / (0.3 * size)) ** 2 + (
        (x - 0.4 * size) / (0.33 * size)
    ) ** 2 <= 1
    lesion = np.zeros_like(liver)
    for cz, cy, cx, r in ((0.4, 0.45, 0.35, 0.06), (0.55, 0.5, 0.45, 0.04), (0.6, 0.4, 0.3, 0.03)):
        lesion |= ((z - cz * n) / (r * 2.5 * n)) ** 2 + ((y - cy * size) / (r * size)) ** 2 + (
            (x - cx * size) / (r * size)
        ) ** 2 <= 1
    return np.stack([liver, lesion])


def timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = ap.parse_args(argv)

    sources = headers(args.slices, args.size)
    stack = masks(args.slices, args.size)
    identity = OutputIdentity(str(sources[0].SeriesInstanceUID), "ct-liver", "bench", "1")
    algorithm = Algorithm("bench", "1")
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="segnode-bench-seg-") as tmp:

        def write(method: str) -> Any:
            return write_seg(
                sources,
                stack,
                [LIVER, LIVER_LESION],
                algorithm=algorithm,
                identity=identity,
                out_path=Path(tmp) / f"{method}.dcm",
                method=method,  # type: ignore[arg-type]
            )

        write("fast")  # imports and highdicom's lazily loaded tables, outside the timing
        print(f"SEG {args.slices} x {args.size} x {args.size}, 2 segments; load {loadavg()}", flush=True)
        results = {}
        for label, method in (("segnode", "fast"), ("highdicom", "highdicom")):
            times, result = timed(lambda method=method: write(method), args.repeats)
            results[label] = result
            rows[label] = {
                "best_s": round(min(times), 4),
                "median_s": round(statistics.median(times), 4),
                "runs_s": [round(t, 4) for t in times],
                "frames": result.number_of_frames,
                "bytes": result.path.stat().st_size,
            }
        ours = pydicom.dcmread(results["segnode"].path)
        reference = pydicom.dcmread(results["highdicom"].path)
        same = (
            ours.NumberOfFrames == reference.NumberOfFrames
            and ours.PixelData == reference.PixelData
            and ours.SegmentsOverlap == reference.SegmentsOverlap
            and [
                f.FrameContentSequence[0].DimensionIndexValues for f in ours.PerFrameFunctionalGroupsSequence
            ]
            == [
                f.FrameContentSequence[0].DimensionIndexValues
                for f in reference.PerFrameFunctionalGroupsSequence
            ]
        )

    best = rows["segnode"]["best_s"]
    verdict = "PASS" if best < TARGET_S else "FAIL"
    print(f"\n{'writer':<10} {'best s':>8} {'median s':>9} {'frames':>7} {'MB':>6}")
    for label, row in rows.items():
        megabytes = row["bytes"] / 1e6
        print(
            f"{label:<10} {row['best_s']:>8.3f} {row['median_s']:>9.3f} {row['frames']:>7} {megabytes:>6.1f}"
        )
    print(f"\nsegnode build+write {best:.3f} s vs target < {TARGET_S} s: {verdict}")
    print(f"speed-up over highdicom defaults: {rows['highdicom']['best_s'] / best:.1f}x")
    print(f"same frames and pixel data as highdicom: {same}")
    result = {
        "benchmark": "seg_write",
        "shape": [2, args.slices, args.size, args.size],
        "repeats": args.repeats,
        "target_s": TARGET_S,
        "verdict": verdict,
        "same_content_as_highdicom": same,
        "load_average": loadavg(),
        "cpus": os.cpu_count(),
        "writers": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "seg_write.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out}")
    return 0 if verdict == "PASS" and same else 1


if __name__ == "__main__":
    sys.exit(main())
