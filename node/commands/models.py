"""``segnode models list|verify|install``: model bundles under ``storage.path/models``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from node.cli_options import ConfigOpt, JsonOpt

models_app = typer.Typer(
    no_args_is_help=True, help="Model bundles (manifest + weights) under storage.path/models."
)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")


def _models_dir(config: Path | None) -> Path:
    from node.cli import settings_from
    from pipelines.bundles import models_dir

    return models_dir(settings_from(config).storage.path)


def _listing_row(item: Any) -> dict[str, Any]:
    manifest = item.manifest
    row: dict[str, Any] = {"name": item.name, "version": item.version, "path": str(item.path)}
    if manifest is None:
        row["error"] = item.error
        return row
    row |= {
        "task": manifest.task,
        "modality": list(manifest.modality),
        "labels": [label.name for label in manifest.labels],
        "backends": [b.name for b in manifest.backends],
        "licence": manifest.licence.spdx,
        "description": manifest.description,
    }
    return row


@models_app.command("list")
def models_list(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """List installed bundles (manifests are validated, files are not hashed: see verify)."""
    from pipelines.bundles import list_bundles

    root = _models_dir(config)
    rows = [_listing_row(item) for item in list_bundles(root)]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no model bundles under {root}; install some with 'segnode models install ct-liver'")
        return
    for row in rows:
        if "error" in row:
            typer.echo(f"{row['name']:<32} {row['version']:<10} INVALID: {row['error']}")
            continue
        typer.echo(
            f"{row['name']:<32} {row['version']:<10} {'/'.join(row['modality']):<6} "
            f"{', '.join(row['labels']):<20} backends={','.join(row['backends'])}  {row['licence']}"
        )


@models_app.command("verify")
def models_verify(
    name: Annotated[str | None, typer.Argument(help="Bundle name (default: every installed bundle).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Re-hash every file of the bundles and compare with their manifests; exit 1 on any difference."""
    from node.cli import fail
    from pipelines.bundles import BundleError, list_bundles, verify

    root = _models_dir(config)
    items = [item for item in list_bundles(root) if name is None or item.name == name]
    if not items:
        fail(f"no model bundle {name!r} under {root}" if name else f"no model bundles under {root}", 1)
    problems = 0
    for item in items:
        try:
            manifest, checks = verify(item.path)
        except BundleError as exc:
            problems += 1
            typer.echo(f"error: {item.name} {item.version}: {exc.message}", err=True)
            continue
        bad = [c for c in checks if not c.ok]
        for check in bad:
            typer.echo(f"error: {manifest.name} {manifest.version}: {check.problem()}", err=True)
        problems += len(bad)
        if not bad:
            typer.echo(f"ok: {manifest.name} {manifest.version}: {len(checks)} files, every sha256 matches")
    if problems:
        raise typer.Exit(1)


@models_app.command("install")
def models_install(
    target: Annotated[str, typer.Argument(help="What to install, e.g. ct-liver.")],
    config: ConfigOpt = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option("--cache-dir", help="Download cache (default: storage.path/cache)."),
    ] = None,
) -> None:
    """Download, convert, publish and verify the bundles of TARGET."""
    from node.cli import fail, settings_from
    from pipelines.bundles import BundleError
    from pipelines.bundles.installers import INSTALLERS, installer_targets, load_installer

    settings = settings_from(config)
    root = _models_dir(config)
    if target not in INSTALLERS:
        fail(f"unknown install target {target!r}; known: {', '.join(installer_targets())}")
    installer = load_installer(target)
    cache = cache_dir if cache_dir is not None else settings.storage.path / "cache"

    def log(message: str) -> None:
        typer.echo(message, err=True)

    try:
        bundles = installer(root, cache, log)
    except BundleError as exc:
        fail(f"install {target} failed: {exc.message}", 1)
    except Exception as exc:  # download, conversion and parity failures, each with its own message
        fail(f"install {target} failed: {type(exc).__name__}: {exc}", 1)
    for bundle in bundles:
        typer.echo(f"installed {bundle.name} {bundle.version} at {bundle.path}")
