"""Agreement of the installed mri-cardiac model with the Sunnybrook manual contours.

    .venv/bin/python bench/sunnybrook_agreement.py [--models DIR] [--case DIR] [--backend onnxruntime]

Prints the Dice of the LV cavity and LV myocardium at every contoured image (slice and phase), their
means, and the LV volumes over the contoured slices from the contours and from the model. The models
folder defaults to ``storage.path/models`` of the default settings, else ``./models`` (the bundles as
committed in the repository).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.mri_cardiac.agreement import sunnybrook_agreement  # noqa: E402

DEFAULT_CASE = REPO.parent / "shared" / "data" / "cardiac" / "sunnybrook" / "SCD0000101"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=REPO / "models", help="models folder (bundles)")
    parser.add_argument("--case", type=Path, default=DEFAULT_CASE, help="Sunnybrook case folder")
    parser.add_argument("--backend", choices=("onnxruntime", "torch"), default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args()
    if not args.case.is_dir():
        print(f"Sunnybrook case {args.case} is absent", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")  # Sunnybrook's invalid UIDs and dates, as pydicom reads them
    result = sunnybrook_agreement(
        args.case, args.models, backend=args.backend, device=args.device, threads=args.threads
    )
    if args.json:
        rows = [vars(row) for row in result.agreement.images]
        print(json.dumps({"summary": result.summary(), "images": rows}, indent=2))
        return 0
    print(f"Sunnybrook {result.case}, model {result.model}, {result.seconds:.1f} s")
    print(f"{'image':>5} {'phase':>5} {'slice':>5} {'LV Dice':>8} {'MYO Dice':>9}")
    for row in result.agreement.images:
        myo = f"{row.myo_dice:9.3f}" if row.myo_dice is not None else f"{'-':>9}"
        print(
            f"{row.image_number:5d} {row.time_point + 1:5d} {row.slice_index + 1:5d} {row.lv_dice:8.3f} {myo}"
        )
    print(f"mean LV cavity Dice {result.agreement.lv_dice:.3f} over {len(result.agreement.images)} images")
    print(f"mean LV myocardium Dice {result.agreement.myo_dice:.3f} over the images with both contours")
    for t, (ref, got) in sorted(result.lv_ml.items()):
        print(
            f"phase {t + 1}: LV cavity over the contoured slices {ref:.1f} ml (contours), "
            f"{got:.1f} ml (model)"
        )
    for t, (ref, got) in sorted(result.myo_ml.items()):
        print(
            f"phase {t + 1}: LV myocardium over the contoured slices {ref:.1f} ml (contours), "
            f"{got:.1f} ml (model)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
