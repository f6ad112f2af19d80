"""What ``segnode demo`` prints once the run is over: timeline, volumes, where the results are, the
preview, and (for the LiTS case) the agreement with the reference labels shipped with it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from node.demo.lits import LitsCase
from node.demo.peer import Received
from node.demo.preview import PreviewError, seg_masks, write_preview
from node.demo.report import dice, format_measurements, sr_measurements
from node.demo.run import Outcome
from node.demo.send import DicomFile
from node.demo.timeline import format_timeline
from pipelines.base import PipelineError
from pipelines.volume import load_volume

Log = Callable[[str], None]


def print_summary(
    outcome: Outcome, files: Sequence[DicomFile], run_dir: Path, case: LitsCase | None, log: Log
) -> bool:
    """Print the results; True when every job finished and at least one SEG reached the PACS."""
    origin = datetime.fromtimestamp(outcome.send.last_response_at, UTC)
    log("")
    for study_uid, timeline in outcome.timelines.items():
        log(f"timeline of study {study_uid} (job {timeline.job_uid or '-'}):")
        log(format_timeline(timeline, origin, "the last C-STORE response"))
        written = outcome.job_written(timeline.job_uid) if timeline.job_uid else None
        timings = written.details.get("timings") if written is not None else None
        if isinstance(timings, dict) and timings:
            log("pipeline timings (s): " + ", ".join(f"{k}={v}" for k, v in timings.items()))
        for seg in outcome.segs:
            if seg.study_uid == study_uid:
                secs = seg.responded_at - outcome.send.last_response_at
                log(f"SEG at the PACS {secs:.2f} s after the last C-STORE response")
    for series_uid, reasons in outcome.no_match.items():
        log(f"series {series_uid}: no rule matched")
        for rule, why in reasons.items():
            log(f"  {rule}: {why}")
    failed = [j for j in outcome.jobs if j.state != "done"]
    for job in failed:
        log(f"job {job.uid} ({job.pipeline}) ended {job.state}: {job.error or 'no reason recorded'}")
    log("")
    for sr in outcome.srs:
        log(f"measurements (from the SR {sr.path.name}):")
        log(format_measurements(sr_measurements(sr.path)))
    if not outcome.srs:
        for job in outcome.jobs:
            written = outcome.job_written(job.uid)
            if written is not None and written.details.get("measurements"):
                log(f"measurements of job {job.uid} (pipeline): {written.details['measurements']}")
    for seg in outcome.segs:
        log(f"DICOM-SEG at the PACS: {seg.path}")
    for sr in outcome.srs:
        log(f"DICOM SR at the PACS:  {sr.path}")
    for seg in outcome.segs[:1]:
        _preview(seg, files, run_dir / "preview.png", case, log)
    log(f"this run: {run_dir} (node storage, PACS folder 'pacs', log 'segnode.log')")
    if outcome.study_uids:
        log(f"audit trail: segnode audit {outcome.study_uids[0]} --config {outcome.config_path}")
    ok = bool(outcome.segs) and not failed
    log("demo finished" if ok else "demo finished without a complete result (see above)")
    return ok


def _preview(seg: Received, files: Sequence[DicomFile], out: Path, case: LitsCase | None, log: Log) -> None:
    import pydicom

    referenced = pydicom.dcmread(seg.path, stop_before_pixels=True)
    series_uid = str(referenced.ReferencedSeriesSequence[0].SeriesInstanceUID)
    sources = [f.path for f in files if f.series_uid == series_uid]
    if not sources:
        log(f"no preview: the SEG references series {series_uid}, which was not sent")
        return
    try:
        volume = load_volume(sources, phase="last")
        masks = seg_masks(seg.path, volume)
        shown = write_preview(volume, masks, out)
    except (PreviewError, PipelineError) as exc:
        log(f"no preview: {exc}")
        return
    log(f"preview: {out} (slices {', '.join(str(k + 1) for k in shown)}; {', '.join(masks.labels)})")
    if case is None or not np.allclose(volume.nifti_affine(), case.ras_affine, atol=1e-3):
        return
    # The wrapped grid is the LiTS grid: compare with the reference labels shipped in the package.
    grid = masks.masks.transpose(0, 3, 2, 1)  # (segment, slice, row, column) -> (segment, i, j, k)
    liver = grid[0] if grid.shape[0] else np.zeros(case.labels.shape, bool)
    lesion = grid[1] if grid.shape[0] > 1 else np.zeros(case.labels.shape, bool)
    log(
        "agreement with the LiTS reference labels: Dice liver (incl. lesions) "
        f"{dice(liver | lesion, case.labels >= 1):.3f}, lesions {dice(lesion, case.labels == 2):.3f}"
    )
