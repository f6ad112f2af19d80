"""The ``segnode`` command line."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from node.cli_options import ConfigOpt, JsonOpt
from node.settings import ConfigError, Settings, load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="segnode: DICOM-native AI node.")
config_app = typer.Typer(no_args_is_help=True, help="Configuration.")
db_app = typer.Typer(no_args_is_help=True, help="Tracking database.")
studies_app = typer.Typer(no_args_is_help=True, help="Studies received.")
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")
app.add_typer(studies_app, name="studies")


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def settings_from(config: Path | None) -> Settings:
    if config is None and os.environ.get("SEGNODE_CONFIG"):
        config = Path(os.environ["SEGNODE_CONFIG"])
    try:
        return load_settings(config)
    except ConfigError as exc:
        fail(str(exc))


def _logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.node.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    quiet = max(logging.WARNING, logging.getLevelName(settings.node.log_level))
    for noisy in ("pynetdicom", "alembic", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(quiet)


@app.command()
def serve(config: ConfigOpt = None) -> None:
    """Run the node in the foreground until SIGTERM/SIGINT; in-flight associations finish first."""
    settings = settings_from(config)
    _logging(settings)
    from node.service import Node

    stop = threading.Event()
    received: list[str] = []

    def _on_signal(signum: int, _frame: Any) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        node = Node(settings)
        node.start()
    except (OSError, SQLAlchemyError, RuntimeError) as exc:
        fail(f"cannot start the node: {exc}", 1)
    _write_ready_file(settings, node.dimse_port, node.dicomweb_port)
    _print_banner(settings, node.dimse_port, node.dicomweb_port)
    while not stop.wait(1.0):
        pass
    typer.echo(f"segnode: {received[0] if received else 'stop'} received, finishing in-flight work", err=True)
    node.stop(reason=received[0] if received else "stop")
    (settings.storage.path / "run" / "ready.json").unlink(missing_ok=True)
    typer.echo("segnode: stopped", err=True)


def _write_ready_file(settings: Settings, dimse_port: int | None, dicomweb_port: int | None) -> None:
    run = settings.storage.path / "run"
    run.mkdir(parents=True, exist_ok=True)
    tmp = run / "ready.json.tmp"
    tmp.write_text(
        json.dumps(
            {
                "pid": os.getpid(),
                "ae_title": settings.node.ae_title,
                "dimse": {"host": settings.dimse.host, "port": dimse_port},
                "dicomweb": {"host": settings.dicomweb.host, "port": dicomweb_port},
            }
        )
    )
    tmp.replace(run / "ready.json")


def _print_banner(settings: Settings, dimse_port: int | None, dicomweb_port: int | None) -> None:
    host = "127.0.0.1" if settings.dimse.host in ("0.0.0.0", "") else settings.dimse.host
    lines = [
        f"segnode ready: AE {settings.node.ae_title} on {settings.dimse.host}:{dimse_port}",
        f"  storage: {settings.storage.path.resolve()}   database: {settings.database_url.split('@')[-1]}",
        "  send a study by DIMSE:",
        f"    TCP_NODELAY=1 storescu -aec {settings.node.ae_title} -aet MYSCU +sd +r "
        f"{host} {dimse_port} DICOM_DIR",
    ]
    if dicomweb_port:
        web = "127.0.0.1" if settings.dicomweb.host in ("0.0.0.0", "") else settings.dicomweb.host
        auth = ' -H "Authorization: Bearer $TOKEN"' if settings.dicomweb.token else ""
        lines += [
            "  or by STOW-RS (dicomweb-client, or curl with a multipart/related body):",
            f"    http://{web}:{dicomweb_port}/dicomweb/studies{'  (bearer token required)' if auth else ''}",
        ]
    lines.append("  see what arrived: segnode studies list; segnode audit STUDY_UID. Stop with Ctrl-C.")
    typer.echo("\n".join(lines))
    sys.stdout.flush()


@config_app.command("example")
def config_example() -> None:
    """Print a complete, commented configuration file."""
    from node.config_example import example_config

    typer.echo(example_config())


@config_app.command("check")
def config_check(config: ConfigOpt = None) -> None:
    """Validate a configuration and print the effective values (secrets hidden)."""
    settings = settings_from(config)
    typer.echo(json.dumps(settings.model_dump(mode="json"), indent=2))


@db_app.command("upgrade")
def db_upgrade(config: ConfigOpt = None) -> None:
    """Apply the database migrations (serve does this too)."""
    settings = settings_from(config)
    from node.db.migrate import current_revision
    from node.service import Database

    try:
        db = Database.open(settings, migrate=True)
    except SQLAlchemyError as exc:
        fail(f"cannot migrate {settings.database_url.split('@')[-1]}: {exc}", 1)
    typer.echo(f"database at revision {current_revision(db.engine)}")


def _open_db(settings: Settings) -> Any:
    from node.service import Database

    try:
        return Database.open(settings, migrate=True)
    except SQLAlchemyError as exc:
        fail(f"cannot open the database {settings.database_url.split('@')[-1]}: {exc}", 1)


@studies_app.command("list")
def studies_list(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """List received studies with their series."""
    from node.db.models import Instance, Series, Study

    db = _open_db(settings_from(config))
    out: list[dict[str, Any]] = []
    with db.sessions() as s:
        for study in s.scalars(select(Study).order_by(Study.first_received_at)).all():
            series_rows = s.scalars(
                select(Series).where(Series.study_id == study.id).order_by(Series.id)
            ).all()
            n_inst = s.scalar(
                select(func.count()).select_from(Instance).join(Series).where(Series.study_id == study.id)
            )
            out.append(
                {
                    "study_uid": study.study_uid,
                    "patient_id": study.patient_id,
                    "study_date": study.study_date,
                    "accession_number": study.accession_number,
                    "first_received_at": study.first_received_at.isoformat(),
                    "last_received_at": study.last_received_at.isoformat(),
                    "instances": n_inst,
                    "series": [
                        {
                            "series_uid": se.series_uid,
                            "modality": se.modality,
                            "series_number": se.series_number,
                            "series_description": se.series_description,
                            "state": se.state,
                            "generation": se.generation,
                            "instance_count": se.instance_count,
                            "completion_reason": se.completion_reason,
                            "sender_ae": se.sender_ae,
                        }
                        for se in series_rows
                    ],
                }
            )
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    if not out:
        typer.echo("no studies received yet")
        return
    for st in out:
        typer.echo(
            f"{st['study_uid']}  patient={st['patient_id']}  date={st['study_date']}  "
            f"instances={st['instances']}  last={st['last_received_at']}"
        )
        for se in st["series"]:
            typer.echo(
                f"  {se['series_uid']}  {se['modality'] or '-':<4} #{se['series_number'] or '-':<4} "
                f"{se['instance_count']:>5} inst  {se['state']}"
                f"{' (' + se['completion_reason'] + ')' if se['completion_reason'] else ''}"
                f"  gen {se['generation']}  {se['series_description'] or ''}"
            )


@app.command("audit")
def audit(
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID.")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the audit trail of one study, oldest first."""
    from node.audit.recorder import rows_for_study

    db = _open_db(settings_from(config))
    with db.sessions() as s:
        rows = rows_for_study(s, study_uid)
        items = [
            {
                "id": r.id,
                "at": r.at.isoformat(),
                "event": r.event_type,
                "series_uid": r.series_uid,
                "sop_instance_uid": r.sop_instance_uid,
                "association_uid": r.association_uid,
                "details": r.details,
            }
            for r in rows
        ]
    if not items:
        fail(f"no audit events for study {study_uid!r}; see 'segnode studies list' for known studies", 1)
    if as_json:
        typer.echo(json.dumps(items, indent=2))
        return
    for it in items:
        details = it["details"] if isinstance(it["details"], dict) else {}
        detail = ", ".join(f"{k}={v}" for k, v in details.items() if k not in ("path", "sha256"))
        typer.echo(
            f"{it['at']}  {it['event']:<22} {it['sop_instance_uid'] or it['series_uid'] or ''}  {detail}"
        )


@app.command("version")
def version() -> None:
    """Print the version."""
    from node import __version__

    typer.echo(__version__)


def main() -> None:
    from node.commands import register_all

    register_all(app)
    app()


if __name__ == "__main__":
    main()
