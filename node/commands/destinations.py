"""``segnode destinations ...``: where results can be sent (configured, added at run time, 'sender')."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from node.cli_options import ConfigOpt

destinations_app = typer.Typer(
    no_args_is_help=True,
    help="Result destinations: from the configuration, added at run time, and the built-in 'sender'.",
)


def _store(config: Any) -> tuple[Any, Any]:
    from node.cli import _open_db, settings_from
    from node.dispatch.destinations import DestinationStore

    settings = settings_from(config)
    db = _open_db(settings)
    return settings, DestinationStore(db.sessions, settings.destinations)


@destinations_app.command("list")
def destinations_list(
    config: ConfigOpt = None, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
) -> None:
    """List destinations: the configured ones, the ones added at run time, and the built-in 'sender'."""
    from node.dispatch.destinations import describe

    settings, store = _store(config)
    port = settings.dispatch.sender_port
    rows: list[dict[str, Any]] = [
        {
            "name": "sender",
            "type": "reply",
            "target": "the calling AE / host that sent the study",
            "source": "built-in",
            "description": "port: a dimse destination with the same AE title, else dispatch.sender_port"
            + (f" ({port})" if port else " (unset)"),
        }
    ]
    for k in store.known():
        note = k.section.description
        if k.shadowed:
            note = f"(shadowed by the configured {k.name!r}; not used) {note}".strip()
        rows.append(
            {
                "name": k.name,
                "type": k.section.type,
                "target": describe(k.section),
                "source": k.source,
                "description": note,
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        typer.echo(f"{r['name']:<20} {r['type']:<9} {r['source']:<8} {r['target']}  {r['description']}")


@destinations_app.command("add")
def destinations_add(
    name: Annotated[str, typer.Argument(help="Name that rules use (letters, digits, '-', '_', '.').")],
    dest_type: Annotated[str, typer.Option("--type", help="dimse (C-STORE) or dicomweb (STOW-RS).")],
    ae_title: Annotated[str | None, typer.Option("--ae-title", help="dimse: the peer's AE title.")] = None,
    host: Annotated[str | None, typer.Option("--host", help="dimse: host name or address.")] = None,
    port: Annotated[int | None, typer.Option("--port", help="dimse: port.")] = None,
    tls: Annotated[bool, typer.Option("--tls", help="dimse: use TLS (dimse.tls files are used).")] = False,
    url: Annotated[str | None, typer.Option("--url", help="dicomweb: base URL (…/dicom-web).")] = None,
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="SEGNODE_DESTINATION_TOKEN", help="dicomweb: bearer token."),
    ] = None,
    username: Annotated[str | None, typer.Option("--username", help="dicomweb: basic-auth user.")] = None,
    password: Annotated[
        str | None,
        typer.Option(
            "--password", envvar="SEGNODE_DESTINATION_PASSWORD", help="dicomweb: basic-auth password."
        ),
    ] = None,
    description: Annotated[str, typer.Option("--description", help="Free text shown in listings.")] = "",
    replace: Annotated[
        bool, typer.Option("--replace", help="Change an existing run-time destination.")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Add a destination at run time (stored in the database; the running node sees it at once)."""
    from node.cli import fail
    from node.dispatch.destinations import DestinationError, check_name, describe, section_from

    if dest_type not in ("dimse", "dicomweb"):
        fail(f"--type {dest_type!r}: allowed dimse, dicomweb")
    given: dict[str, dict[str, Any]] = {
        "dimse": {"ae_title": ae_title, "host": host, "port": port, "tls": tls or None},
        "dicomweb": {"url": url, "token": token, "username": username, "password": password},
    }
    other = "dicomweb" if dest_type == "dimse" else "dimse"
    stray = [f"--{k.replace('_', '-')}" for k, v in given[other].items() if v is not None]
    if stray:
        fail(f"{', '.join(stray)} do(es) not apply to a {dest_type} destination")
    if token is not None and (username is not None or password is not None):
        fail("give either --token or --username/--password, not both")
    if (username is None) != (password is None):
        fail("basic authentication needs both --username and --password")
    data: dict[str, Any] = {"type": dest_type, "description": description}
    data.update({k: v for k, v in given[dest_type].items() if v is not None})
    settings, store = _store(config)
    try:
        check_name(name)
        section = section_from(data)
        action = store.add(name, section, replace=replace)
    except DestinationError as exc:
        fail(str(exc))
    typer.echo(f"{'added' if action == 'add' else 'replaced'} destination {name}: {describe(section)}")
    if name in settings.destinations:
        typer.echo(
            f"warning: {name!r} is also defined in the configuration; the configured one is used "
            "(the added one takes effect only if the configuration drops the name)",
            err=True,
        )


@destinations_app.command("remove")
def destinations_remove(
    name: Annotated[str, typer.Argument(help="A destination added with 'destinations add'.")],
    config: ConfigOpt = None,
) -> None:
    """Remove a run-time destination (configured ones are changed in the configuration file)."""
    from node.cli import _open_db, fail

    settings, store = _store(config)
    if name not in settings.destinations:
        users = [
            r.rule.name for r in _open_db(settings).rules(settings).stored() if name in r.rule.destinations
        ]
        if users:
            fail(f"destination {name!r} is used by rule(s) {', '.join(users)}; change those rules first", 1)
    if not store.remove(name):
        where = " (it is defined in the configuration file)" if name in settings.destinations else ""
        fail(f"no run-time destination {name!r}{where}", 1)
    typer.echo(f"removed destination {name}")


@destinations_app.command("echo")
def destinations_echo(
    name: Annotated[str, typer.Argument(help="Destination name.")],
    config: ConfigOpt = None,
) -> None:
    """Check a destination: C-ECHO (dimse) or an authenticated QIDO-RS/OPTIONS request (dicomweb).

    Prints the peer's answer; exits 1 when the peer cannot be reached or refuses."""
    from node.cli import fail
    from node.dispatch import dimse, stow
    from node.dispatch.destinations import SENDER, target_of

    settings, store = _store(config)
    if name == SENDER:
        fail("'sender' is resolved per study (the AE that sent it); echo a named destination instead")
    section = store.get(name)
    if section is None:
        fail(f"no destination {name!r}; see 'segnode destinations list'", 2)
    target = target_of(name, section)
    if target.type == "dimse":
        tls = settings.dimse.tls
        calling = dimse.Calling(settings.node.ae_title, tls if tls.certificate or tls.ca else None)
        ok, answer = dimse.echo(target, settings.dispatch, calling)
    else:
        ok, answer = stow.echo(target, settings.dispatch)
    typer.echo(f"{name} ({target.describe()}): {answer}")
    if not ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(destinations_app, name="destinations")
