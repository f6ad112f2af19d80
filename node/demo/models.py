"""Make sure the bundles of an install target (``segnode models install``) are present."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipelines.bundles import BundleError, list_bundles
from pipelines.bundles.installers import INSTALLERS, load_installer


class ModelsError(Exception):
    """The models are missing and could not be installed."""


def missing_bundles(models_dir: Path, target: str = "ct-liver") -> list[str]:
    valid = {item.name for item in list_bundles(models_dir) if item.manifest is not None}
    return [name for name in INSTALLERS[target].bundles if name not in valid]


def ensure_installed(
    models_dir: Path, cache_dir: Path, log: Callable[[str], None], target: str = "ct-liver"
) -> list[str]:
    """Install ``target`` when one of its bundles is missing; returns what was installed (may be empty)."""
    missing = missing_bundles(models_dir, target)
    if not missing:
        log(f"models: {', '.join(INSTALLERS[target].bundles)} installed in {models_dir}")
        return []
    log(f"models: {', '.join(missing)} missing; installing {target} (segnode models install {target}) ...")
    try:
        bundles = load_installer(target)(models_dir, cache_dir, log)
    except BundleError as exc:
        raise ModelsError(f"cannot install the {target} models: {exc.message}") from None
    except Exception as exc:  # download, conversion and parity failures, each with its own message
        raise ModelsError(
            f"cannot install the {target} models: {type(exc).__name__}: {exc}. They come from the package "
            f"index; without network, copy an installed models folder to {models_dir}"
        ) from None
    return [f"{b.name} {b.version}" for b in bundles]
