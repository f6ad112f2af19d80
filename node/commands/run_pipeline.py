"""``segnode run-pipeline NAME INPUT_DIR --out OUT_DIR``: run a pipeline offline on a folder of DICOM
files, through the same ``Pipeline.run`` the executor calls, and write its SEG/SR into OUT_DIR."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from node.cli_options import ConfigOpt, JsonOpt

EXIT_REFUSED = 3


def register(app: typer.Typer) -> None:
    app.command("run-pipeline")(run_pipeline)


def _parse_param(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise typer.BadParameter(f"expected KEY=VALUE, got {text!r}", param_hint="--param")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _series_files(input_dir: Path) -> list[Path]:
    """Every regular file below ``input_dir`` except hidden ones and DICOMDIR, sorted."""
    return sorted(
        p
        for p in input_dir.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(input_dir).parts)
        and p.name.upper() != "DICOMDIR"
    )


def run_pipeline(
    name: Annotated[str, typer.Argument(help="Pipeline name, e.g. ct-liver.")],
    input_dir: Annotated[Path, typer.Argument(help="Folder holding the DICOM files of one series.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the results (created if absent).")],
    config: ConfigOpt = None,
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="Pipeline parameter KEY=VALUE (JSON values), repeatable."),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")] = "cpu",
    rule_version: Annotated[str, typer.Option("--rule-version", help="Folded into the result UIDs.")] = "0",
    as_json: JsonOpt = False,
) -> None:
    """Run a pipeline offline on a folder of DICOM files; exit 3 when the pipeline refuses the series."""
    from node.cli import fail, settings_from
    from pipelines.base import PipelineError, PipelineRequest
    from pipelines.bundles import models_dir
    from pipelines.registry import load_pipeline, pipeline_names

    settings = settings_from(config)
    if name not in pipeline_names():
        fail(f"unknown pipeline {name!r}; known: {', '.join(pipeline_names())}")
    if not input_dir.is_dir():
        fail(f"input folder {input_dir} does not exist")
    files = _series_files(input_dir)
    if not files:
        fail(f"no files in {input_dir}")
    parameters = dict(_parse_param(p) for p in param or [])
    request = PipelineRequest(
        series_files=files,
        output_dir=out,
        models_dir=models_dir(settings.storage.path),
        parameters=parameters,
        rule_version=rule_version,
        device=device,
    )
    try:
        pipeline = load_pipeline(name)
        output = pipeline.run(request)
    except PipelineError as exc:
        if as_json:
            typer.echo(json.dumps({"refused": {"reason": exc.reason, "message": exc.message}}, indent=2))
        typer.echo(f"refused ({exc.reason}): {exc.message}", err=True)
        raise typer.Exit(EXIT_REFUSED) from None
    result = {
        "pipeline": name,
        "files": [str(f) for f in output.files],
        "measurements": output.measurements,
        "timings": output.timings,
        "notes": output.notes,
    }
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    for path in output.files:
        typer.echo(f"wrote {path}")
    for key, value in output.measurements.items():
        typer.echo(f"  {key}: {value}")
    typer.echo("  timings (s): " + ", ".join(f"{k}={v}" for k, v in output.timings.items()))
    for note in output.notes:
        typer.echo(f"  note: {note}")
