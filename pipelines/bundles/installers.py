"""What ``segnode models install TARGET`` knows how to install, loaded lazily by entry point.

An installer is a function ``install(models_dir: Path, cache_dir: Path, log: Callable[[str], None])
-> list[Bundle]`` that fetches, converts and publishes the bundles of one target, then verifies them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pipelines.bundles.store import Bundle, BundleError


class Installer(Protocol):
    def __call__(self, models_dir: Path, cache_dir: Path, log: Callable[[str], None]) -> list[Bundle]: ...


@dataclass(frozen=True)
class InstallerInfo:
    target: str
    entry_point: str  # "module:function"
    bundles: tuple[str, ...]
    description: str


INSTALLERS: dict[str, InstallerInfo] = {
    info.target: info
    for info in (
        InstallerInfo(
            "ct-liver",
            "pipelines.liver.install:install_ct_liver",
            ("pyliverlesionseg-liver", "pyliverlesionseg-liver-lesion"),
            "liver (CT/MR, 3 mm) and liver-lesion (1 x 1 x 3 mm) nets of pyliverlesionseg==0.3 "
            "(PyPI, Apache-2.0, KU Leuven), converted to PyTorch and ONNX",
        ),
        InstallerInfo(
            "mri-cardiac",
            "pipelines.bundles.repository:install_mri_cardiac",
            ("mri-cardiac",),
            "RV, LV myocardium and LV cavity on cine short-axis MRI: 2D DynUNet trained by segnode-train on "
            "ACDC (CC BY-NC-SA 4.0, research use), committed in models/mri-cardiac",
        ),
    )
}


def installer_targets() -> list[str]:
    return sorted(INSTALLERS)


def load_installer(target: str) -> Installer:
    info = INSTALLERS.get(target)
    if info is None:
        raise BundleError(
            "unknown_target", f"no installer for {target!r}; known: {', '.join(installer_targets())}"
        )
    module_name, _, attr = info.entry_point.partition(":")
    installer: Installer = getattr(importlib.import_module(module_name), attr)
    return installer
