"""Bundles committed to the repository (``<repo>/models/<name>/<version>/``), installed by copying.

``segnode models install mri-cardiac`` needs no network: the trained weights are small enough to live
in git. The source copy is verified (every sha256 in its manifest) before anything is copied, and the
installed copy is verified again when it is published.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from pipelines.bundles.manifest import MANIFEST_NAME
from pipelines.bundles.store import Bundle, BundleError, open_bundle, publish, staging_dir, versions

REPOSITORY_MODELS = Path(__file__).resolve().parents[2] / "models"


def install_committed(
    name: str, models_dir: Path, log: Callable[[str], None], source_root: Path = REPOSITORY_MODELS
) -> list[Bundle]:
    """Install the newest committed version of bundle ``name`` from ``source_root`` into ``models_dir``."""
    available = versions(source_root, name)
    if not available:
        raise BundleError(
            "bundle_missing",
            f"no committed bundle {name!r} under {source_root} (a source checkout of segnode has models/)",
        )
    version = available[-1]
    source = open_bundle(source_root / name / version)  # refuses altered or missing files
    log(f"verified {name} {version} at {source.path} ({len(source.manifest.files())} files, sha256 ok)")
    staging = staging_dir(models_dir, name, version)
    try:
        for file in source.manifest.files():
            shutil.copyfile(source.path / file, staging / file)
        for extra in sorted(source.path.iterdir()):
            if extra.is_file() and extra.name != MANIFEST_NAME and not (staging / extra.name).exists():
                shutil.copyfile(extra, staging / extra.name)
        bundle = publish(staging, source.manifest, models_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"installed {bundle.name} {bundle.version} at {bundle.path}")
    return [bundle]


def install_mri_cardiac(models_dir: Path, cache_dir: Path, log: Callable[[str], None]) -> list[Bundle]:
    """``segnode models install mri-cardiac``: the ACDC-trained cardiac bundle committed in models/."""
    del cache_dir  # nothing to download
    return install_committed("mri-cardiac", models_dir, log)
