"""``segnode demo [--study DIR]``: the whole loop on this machine, with a real CT study.

Installs the ct-liver models when missing, fetches a real CT (the LiTS case inside the PyPI package
``liver-ct-segmentation-package``) and wraps it as a DICOM CT series (or takes the user's DICOM folder),
starts segnode on embedded defaults in a fresh folder with a local receiving PACS as its destination,
sends the study by C-STORE, waits for the DICOM-SEG to arrive at the PACS, then prints the timeline per
stage, the segment volumes, where the results are, and writes a PNG preview of the overlay.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

EXIT_FAILED = 1


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(
    study: Annotated[
        Path | None,
        typer.Option("--study", help="Your own DICOM folder (one study) instead of the downloaded LiTS CT."),
    ] = None,
    data: Annotated[
        Path,
        typer.Option("--data", help="Folder for models, downloads and demo runs (default ./segnode-data)."),
    ] = Path("segnode-data"),
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")] = "cpu",
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for the results after sending.")
    ] = 1800.0,
) -> None:
    """Run a real CT study through segnode end to end and show what happened."""
    from node.cli import fail
    from node.demo import lits
    from node.demo.models import ModelsError, ensure_installed
    from node.demo.run import DemoError, RunConfig, run_study
    from node.demo.send import SendError, scan_folder
    from node.demo.summary import print_summary
    from node.demo.wrap import SeriesInfo, WrapError, wrap_volume
    from pipelines.bundles.installers import installer_targets

    def log(message: str) -> None:
        typer.echo(message)

    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = (data / "demo" / stamp).resolve()
    models_dir = (data / "models").resolve()
    cache = (data / "cache").resolve()
    case: lits.LitsCase | None = None
    if study is not None:
        try:
            scan = scan_folder(study)
        except SendError as exc:
            fail(str(exc))
        if not scan.files:
            fail(
                f"no DICOM instances in {study} ({len(scan.skipped)} file(s) looked at, none a DICOM file "
                "with SOP Class and Instance UIDs)"
            )
        if len(scan.studies) > 1:
            log(f"note: {study} holds {len(scan.studies)} studies; all are sent")
        log(f"study: your folder {study}: {len(scan.files)} instances in {len(scan.series)} series")
        files = scan.files
    else:
        try:
            wheel = lits.fetch_wheel(cache, log)
            case = lits.load_case(wheel)
        except lits.FetchError as exc:
            fail(str(exc), EXIT_FAILED)
        log(f"study: {lits.PROVENANCE}")
        info = SeriesInfo(
            uid_seed=f"segnode-demo:{lits.WHEEL_SHA256}",
            patient_id="LITS-117",
            patient_name="LiTS^Volume117",
            study_description="CT ABDOMEN (LiTS volume 117, via PyPI)",
            series_description="CT abdomen with contrast (LiTS 117, 128^3 crop)",
        )
        started = time.monotonic()
        try:
            wrap_volume(case.hu, case.ras_affine, run_dir / "input", info)
        except WrapError as exc:
            fail(f"cannot wrap the LiTS case as DICOM: {exc}", EXIT_FAILED)
        files = scan_folder(run_dir / "input").files
        log(
            f"wrapped as {len(files)} CT Image Storage instances in {run_dir / 'input'} "
            f"({time.monotonic() - started:.1f} s)"
        )
    # The LiTS CT needs ct-liver; a study of your own may need any installable pipeline: install what
    # can be, and let the node's rules and the pipeline's refusal say what is missing.
    targets = ["ct-liver"] if study is None else installer_targets()
    for target in targets:
        try:
            ensure_installed(models_dir, cache, log, target=target)
        except ModelsError as exc:
            if study is None:
                fail(str(exc), EXIT_FAILED)
            log(f"warning: {exc}")
    try:
        outcome = run_study(
            files, RunConfig(run_dir=run_dir, models_dir=models_dir, timeout=timeout, device=device), log
        )
    except DemoError as exc:
        fail(str(exc), EXIT_FAILED)
    ok = print_summary(outcome, files, run_dir, case, log)
    if not ok:
        raise typer.Exit(EXIT_FAILED)
