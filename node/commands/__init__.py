"""Command groups of the ``segnode`` CLI. Each module here defines ``register(app: typer.Typer)``;
``node.cli`` calls every one of them, so adding a command group never edits ``node/cli.py``."""

from __future__ import annotations

import importlib
import pkgutil

import typer


def register_all(app: typer.Typer) -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(app)
