#!/usr/bin/env python3
"""Volume load benchmark: ``pipelines.volume.load_volume`` against a plain pydicom loader.

    python bench/volume.py [--dir SERIES_DIR] [--images 300] [--size 512] [--repeats 5] [--out bench/out]

1. Generates ``--images`` uncompressed (Explicit VR Little Endian) ``--size`` x ``--size`` int16 CT
   slices with CT-like headers into a temp dir, written in shuffled order (or uses ``--dir``).
2. Pins the process to one core (``os.sched_setaffinity(0, {0})``; numpy's threads limited to one).
3. Times, best of ``--repeats`` (interleaved, after one untimed warm-up of each so that both find the
   files in the page cache and the allocator warm):
   * baseline: per file ``pydicom.dcmread`` + ``pixel_array`` + rescale to float32, sorted along the
     slice normal, ``np.stack`` -- the naive loader (0.53 s on the reference machine);
   * segnode: ``load_volume`` (header-only reads, sorting and all validation, pixel data read straight
     into the preallocated float32 volume).
4. Checks that both give identical voxels, prints the figures with PASS/FAIL against the 0.6 s target
   and writes ``<out>/volume.json``.

Timings belong here and nowhere in the test suite.
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.volume import load_volume  # noqa: E402

TARGET_S = 0.6
REFERENCE_BASELINE_S = 0.53  # the pydicom baseline on the machine the target was set on


def make_series(folder: Path, n: int, size: int) -> list[Path]:
    """n CT slices with a realistic header (~2.5 KB: patient/study/equipment/acquisition attributes)."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    order = list(range(n))
    random.Random(0).shuffle(order)
    paths = []
    for position, index in enumerate(order):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20260101"
        ds.StudyTime = ds.SeriesTime = "101500"
        ds.AcquisitionTime = ds.ContentTime = f"1016{index // 60:02d}.{index % 60:06d}"
        ds.AccessionNumber = "BENCH0001"
        ds.Modality = "CT"
        ds.Manufacturer = "SEGNODE"
        ds.InstitutionName = "Bench Hospital"
        ds.ReferringPhysicianName = "Referrer^Bench"
        ds.StationName = "CT01"
        ds.StudyDescription = "CT ABDOMEN WITH CONTRAST"
        ds.SeriesDescription = "ABD 1.0 B30f PORTAL"
        ds.ManufacturerModelName = "Bench CT"
        ds.PatientName = "Bench^Volume"
        ds.PatientID = "SEGNODE-BENCH"
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "O"
        ds.PatientAge = "066Y"
        ds.BodyPartExamined = "ABDOMEN"
        ds.SliceThickness = "1.0"
        ds.KVP = "120"
        ds.DataCollectionDiameter = "500"
        ds.SoftwareVersions = "bench 1.0"
        ds.ReconstructionDiameter = "358"
        ds.DistanceSourceToDetector = "1085.6"
        ds.DistanceSourceToPatient = "595"
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "160"
        ds.RotationDirection = "CW"
        ds.ExposureTime = "500"
        ds.XRayTubeCurrent = "210"
        ds.Exposure = "105"
        ds.FilterType = "FLAT"
        ds.GeneratorPower = "25"
        ds.FocalSpots = "1.2"
        ds.ConvolutionKernel = "B30f"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.StudyID = "1"
        ds.SeriesNumber = 3
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = ["-179.300", "-179.300", f"{-200.0 + index * 1.0:.3f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{-200.0 + index * 1.0:.3f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.PixelSpacing = ["0.700", "0.700"]
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = rng.integers(0, 2400, (size, size), dtype=np.int16).tobytes()
        path = folder / f"IM{position:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def baseline(files: Sequence[Path]) -> np.ndarray:
    """The naive loader: full dcmread + pixel_array + rescale per file, sorted, stacked."""
    slices = []
    for path in files:
        ds = pydicom.dcmread(path)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        normal = np.cross(iop[:3], iop[3:])
        position = float(np.dot([float(v) for v in ds.ImagePositionPatient], normal))
        hu = ds.pixel_array.astype(np.float32) * np.float32(ds.RescaleSlope) + np.float32(ds.RescaleIntercept)
        slices.append((position, hu))
    slices.sort(key=lambda item: item[0])
    return np.stack([hu for _, hu in slices])


def segnode(files: Sequence[Path]) -> np.ndarray:
    return load_volume(files).voxels


def timed(fn: Callable[[Sequence[Path]], np.ndarray], files: Sequence[Path]) -> float:
    start = time.perf_counter()
    result = fn(files)
    elapsed = time.perf_counter() - start
    del result
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", type=Path, help="an existing uncompressed series (default: generate one)")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = parser.parse_args()

    pinned = False
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
        pinned = True

    with tempfile.TemporaryDirectory(prefix="segnode-bench-volume-") as tmp:
        if args.dir:
            files = sorted(p for p in args.dir.iterdir() if p.is_file())
        else:
            print(f"generating {args.images} slices of {args.size}x{args.size} in {tmp} ...", flush=True)
            files = make_series(Path(tmp), args.images, args.size)
        header_bytes = files[0].stat().st_size - args.size * args.size * 2 if not args.dir else None

        reference = baseline(files)  # warm-up (page cache, allocator) and the correctness reference
        ours = segnode(files)
        identical = bool(np.array_equal(reference, ours))
        shape = list(ours.shape)
        del reference, ours

        times: dict[str, list[float]] = {"baseline": [], "segnode": []}
        for _ in range(args.repeats):
            times["baseline"].append(timed(baseline, files))
            times["segnode"].append(timed(segnode, files))

    best = {name: min(values) for name, values in times.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    ok = identical and best["segnode"] <= TARGET_S
    projected = best["segnode"] * REFERENCE_BASELINE_S / best["baseline"]
    result = {
        "images": len(files),
        "shape": shape,
        "header_bytes_per_file": header_bytes,
        "repeats": args.repeats,
        "pinned_to_one_core": pinned,
        "segnode_best_s": round(best["segnode"], 4),
        "segnode_median_s": round(median["segnode"], 4),
        "baseline_best_s": round(best["baseline"], 4),
        "baseline_median_s": round(median["baseline"], 4),
        "speedup_vs_baseline": round(best["baseline"] / best["segnode"], 2),
        "projected_on_reference_machine_s": round(projected, 4),
        "target_s": TARGET_S,
        "identical_voxels": identical,
        "pass": ok,
        "cpu": platform.processor() or platform.machine(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pydicom": pydicom.__version__,
        "all_times_s": {name: [round(v, 4) for v in values] for name, values in times.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "volume.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"series: {len(files)} x {shape[1]}x{shape[2]} uncompressed, one core, best of {args.repeats}")
    print(f"  pydicom baseline  {best['baseline']:.3f} s (median {median['baseline']:.3f} s)")
    print(f"  segnode loader    {best['segnode']:.3f} s (median {median['segnode']:.3f} s)")
    print(
        f"  speed-up {best['baseline'] / best['segnode']:.1f}x; scaled to the reference machine's 0.53 s "
        f"baseline: {projected:.3f} s"
    )
    print(f"  identical voxels: {identical}")
    print(f"{'PASS' if ok else 'FAIL'}: segnode {best['segnode']:.3f} s vs target {TARGET_S} s")
    print(f"written {args.out / 'volume.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
