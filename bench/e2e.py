#!/usr/bin/env python3
"""End-to-end latency: from the last instance's C-STORE response to the SEG's C-STORE response at the
destination, split into stages, for a CT and a cine MR case on this machine (CPU by default).

    python bench/e2e.py [--cases ct,mr] [--ct lits|totalseg] [--quiet-seconds 5] [--device cpu]
                        [--data segnode-data] [--out bench/out/e2e.json]

Each case runs ``node.demo.run.run_study``: a fresh ``segnode serve`` (SQLite, local executor, shipped
rules, the models under ``--data``/models) whose destination is a pynetdicom C-STORE SCP in this
process; the series goes in by C-STORE from that destination's AE title (the rules answer ``sender``).

Splits (wall clock; audit events are stamped by the node, the two ends by this process):

- completion wait: last C-STORE response -> ``series.completed``
- routing: ``series.completed`` -> ``job.created``
- queue wait: ``job.created`` -> ``job.running``
- load: the pipeline's ``load_models`` + ``load_volume`` + ``*_open`` timings
- inference: the pipeline's network timings (``*_net``, or ``inference``)
- pre/post-processing: the pipeline's other timings (crop, resample, post-processing)
- SEG/SR write: the pipeline's ``write_outputs``
- executor overhead: ``job.running`` -> ``job.written`` minus the pipeline's own total (handing the job
  to the worker process, moving and fsyncing the results, the database commit)
- delivery: ``job.written`` -> the SEG's C-STORE response at the destination

Targets (PASS/FAIL; exit 1 when one fails): everything except inference <= 25 % of inference;
completion wait <= quiet_seconds + 1 s. Timings belong here, never in the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from node.demo import lits  # noqa: E402
from node.demo.models import ModelsError, ensure_installed  # noqa: E402
from node.demo.run import DemoError, Outcome, RunConfig, run_study  # noqa: E402
from node.demo.send import DicomFile, scan_folder  # noqa: E402
from node.demo.timeline import AuditItem  # noqa: E402
from node.demo.wrap import SeriesInfo, wrap_volume  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
TOTALSEG_CT = SHARED / "liver" / "totalsegmentator_example" / "example_ct_dicom"
SUNNYBROOK = SHARED / "cardiac" / "sunnybrook" / "SCD0000101" / "dicom"
OVERHEAD_RATIO = 0.25
COMPLETION_SLACK_S = 1.0


class Skip(Exception):
    """A case that cannot run here; the message says why."""


def _ct_lits(work: Path, cache: Path) -> tuple[list[DicomFile], str]:
    try:
        case = lits.load_case(lits.fetch_wheel(cache, print))
    except lits.FetchError as exc:
        raise Skip(str(exc)) from None
    info = SeriesInfo(uid_seed=f"segnode-bench-e2e:{lits.WHEEL_SHA256}", patient_id="LITS-117")
    wrap_volume(case.hu, case.ras_affine, work / "ct", info)
    return scan_folder(work / "ct").files, "LiTS volume 117 (PyPI liver-ct-segmentation-package 1.6.0), 128^3"


def _ct_totalseg(work: Path) -> tuple[list[DicomFile], str]:
    import pydicom
    from pydicom.uid import generate_uid

    if not TOTALSEG_CT.is_dir():
        raise Skip(f"{TOTALSEG_CT} is absent (../shared/data)")
    dest = work / "ct"
    dest.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for path in sorted(TOTALSEG_CT.iterdir()):  # its UIDs are empty: give it real ones
        ds = pydicom.dcmread(path)
        uid = path.name.removeprefix("CT.")
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.save_as(dest / f"{uid}.dcm", enforce_file_format=True)
    return scan_folder(dest).files, "TotalSegmentator example CT, 20 x 512^2 JPEG 2000 (../shared)"


def _mr(models: Path, cache: Path) -> tuple[list[DicomFile], str]:
    from pipelines.base import PipelineError
    from pipelines.bundles import list_bundles
    from pipelines.bundles.installers import INSTALLERS
    from pipelines.registry import load_pipeline

    try:
        load_pipeline("mri-cardiac")
    except PipelineError as exc:
        raise Skip(f"the mri-cardiac pipeline is not available: {exc.message}") from None
    if "mri-cardiac" in INSTALLERS:
        try:
            ensure_installed(models, cache, print, target="mri-cardiac")
        except ModelsError as exc:
            raise Skip(str(exc)) from None
    elif not any("cardiac" in item.name for item in list_bundles(models)):
        raise Skip("segnode models lists no mri-cardiac bundle and has no installer for it")
    if not SUNNYBROOK.is_dir():
        raise Skip(f"{SUNNYBROOK} is absent (../shared/data)")
    return scan_folder(SUNNYBROOK).files, "Sunnybrook SCD0000101 cine short-axis MR (../shared)"


def _last(items: list[AuditItem], kind: str, job: str | None = None) -> datetime | None:
    hits = [i.at for i in items if i.event_type == kind and (job is None or i.job_uid == job)]
    return hits[-1] if hits else None


def splits(outcome: Outcome, quiet_seconds: float) -> dict[str, Any]:
    """The stage split of one finished run (seconds), with the target verdicts."""
    study = outcome.study_uids[0]
    timeline = outcome.timelines[study]
    items = outcome.trails[study]
    job = timeline.job_uid
    if job is None or not outcome.segs:
        raise DemoError(f"no SEG came back (jobs: {[(j.uid, j.state, j.error) for j in outcome.jobs]})")
    t0 = datetime.fromtimestamp(outcome.send.last_response_at, UTC)
    seg_at = datetime.fromtimestamp(min(s.responded_at for s in outcome.segs), UTC)
    completed = _last(items, "series.completed")
    created = _last(items, "job.created", job)
    running = _last(items, "job.running", job)
    written_item = outcome.job_written(job)
    if None in (completed, created, running) or written_item is None:
        raise DemoError(f"the audit trail of {study} misses a stage")
    assert completed and created and running
    written = written_item.at
    timings: dict[str, float] = {k: float(v) for k, v in (written_item.details.get("timings") or {}).items()}
    load = sum(v for k, v in timings.items() if k in ("load_models", "load_volume") or k.endswith("_open"))
    inference = sum(v for k, v in timings.items() if k.endswith("_net") or k == "inference")
    write = sum(v for k, v in timings.items() if k.startswith("write"))
    pipeline_total = timings.get("total", load + inference + write)
    processing = max(0.0, pipeline_total - load - inference - write)
    secs = {
        "completion_wait": (completed - t0).total_seconds(),
        "routing": (created - completed).total_seconds(),
        "queue_wait": (running - created).total_seconds(),
        "load": load,
        "inference": inference,
        "pre_post_processing": processing,
        "seg_sr_write": write,
        "executor_overhead": (written - running).total_seconds() - pipeline_total,
        "delivery": (seg_at - written).total_seconds(),
    }
    total = (seg_at - t0).total_seconds()
    overhead = total - inference
    verdicts = {
        "overhead_le_25pct_of_inference": overhead <= OVERHEAD_RATIO * inference,
        "completion_wait_le_quiet_plus_1s": secs["completion_wait"] <= quiet_seconds + COMPLETION_SLACK_S,
    }
    return {
        "seconds": {k: round(v, 3) for k, v in secs.items()},
        "total": round(total, 3),
        "all_but_inference": round(overhead, 3),
        "overhead_ratio": round(overhead / inference, 4) if inference else None,
        "pipeline_timings": timings,
        "verdicts": verdicts,
        "job_uid": job,
        "instances": len(outcome.send.statuses),
        "send_seconds": round(outcome.send.last_response_at - outcome.send.started_at, 3),
    }


def _print_case(name: str, result: dict[str, Any], quiet: float) -> None:
    secs = result["seconds"]
    inference = secs["inference"]
    print(
        f"\n{name}: {result['source']} ({result['instances']} instances, sent in {result['send_seconds']} s)"
    )
    for key, value in secs.items():
        share = f"{100 * value / inference:6.1f} % of inference" if inference and key != "inference" else ""
        print(f"  {key:<22} {value:9.3f} s  {share}")
    print(f"  {'total':<22} {result['total']:9.3f} s  (last C-STORE response -> SEG C-STORE response)")
    ratio = result["overhead_ratio"]
    v = result["verdicts"]
    print(
        f"  target: all but inference {result['all_but_inference']:.2f} s = "
        f"{100 * ratio if ratio is not None else float('nan'):.1f} % of inference (<= 25 %): "
        f"{'PASS' if v['overhead_le_25pct_of_inference'] else 'FAIL'}"
    )
    print(
        f"  target: completion wait {secs['completion_wait']:.2f} s <= quiet_seconds + 1 = {quiet + 1:.1f} s:"
        " "
        f"{'PASS' if v['completion_wait_le_quiet_plus_1s'] else 'FAIL'}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="ct,mr", help="comma-separated: ct, mr")
    parser.add_argument("--ct", choices=("lits", "totalseg"), default="lits", help="which CT series")
    parser.add_argument("--quiet-seconds", type=float, default=5.0, help="completion.quiet_seconds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", type=Path, default=REPO / "segnode-data", help="models and downloads")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "e2e.json")
    args = parser.parse_args()
    models, cache = (args.data / "models").resolve(), (args.data / "cache").resolve()
    report: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg()},
        "device": args.device,
        "quiet_seconds": args.quiet_seconds,
        "cases": {},
        "skipped": {},
    }
    failed = False
    with tempfile.TemporaryDirectory(prefix="segnode-e2e-") as tmp:
        for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
            work = Path(tmp) / case
            try:
                if case == "ct":
                    ensure_installed(models, cache, print)
                    files, source = _ct_lits(work, cache) if args.ct == "lits" else _ct_totalseg(work)
                elif case == "mr":
                    files, source = _mr(models, cache)
                else:
                    raise Skip(f"unknown case {case!r} (ct, mr)")
            except (Skip, ModelsError) as exc:
                print(f"\n{case}: skipped: {exc}")
                report["skipped"][case] = str(exc)
                continue
            run = RunConfig(
                run_dir=work / "run", models_dir=models, timeout=args.timeout, device=args.device,
                quiet_seconds=args.quiet_seconds,
            )  # fmt: skip
            started = time.monotonic()
            try:
                outcome = run_study(files, run, lambda m: print(m, flush=True))
                result = splits(outcome, args.quiet_seconds)
            except DemoError as exc:
                print(f"\n{case}: FAILED: {exc}")
                report["cases"][case] = {"source": source, "error": str(exc)}
                failed = True
                continue
            result["source"] = source
            result["wall_seconds"] = round(time.monotonic() - started, 1)
            report["cases"][case] = result
            _print_case(case, result, args.quiet_seconds)
            failed |= not all(result["verdicts"].values())
    report["machine"]["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
