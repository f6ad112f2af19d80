"""``segnode destinations ...``: where results can be sent."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from node.cli_options import ConfigOpt

destinations_app = typer.Typer(no_args_is_help=True, help="Result destinations (from the configuration).")


@destinations_app.command("list")
def destinations_list(
    config: ConfigOpt = None, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
) -> None:
    """List configured destinations, plus the built-in 'sender'."""
    from node.cli import settings_from

    settings = settings_from(config)
    rows = [
        {
            "name": "sender",
            "type": "reply",
            "target": "the calling AE / host that sent the study",
            "description": "",
        }
    ]
    for name, d in sorted(settings.destinations.items()):
        target = (
            f"{d.ae_title}@{d.host}:{d.port}{' (TLS)' if d.tls else ''}" if d.type == "dimse" else str(d.url)
        )
        rows.append({"name": name, "type": d.type, "target": target, "description": d.description})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        typer.echo(f"{r['name']:<20} {r['type']:<9} {r['target']}  {r['description']}")


def register(app: typer.Typer) -> None:
    app.add_typer(destinations_app, name="destinations")
