"""Fetch one pinned wheel from the package index with ``pip download``, cached and checked by sha256."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipelines.bundles.store import sha256_file


class WheelUnavailable(Exception):
    """The package index could not be reached or did not serve the wheel."""


class WheelMismatch(Exception):
    """The index served a wheel whose sha256 is not the pinned one."""


@dataclass(frozen=True)
class PinnedWheel:
    package: str
    version: str
    filename: str
    sha256: str
    pip_args: tuple[str, ...] = ()  # e.g. ("--python-version", "3.6") for a wheel tagged for old Pythons


def fetch_pinned_wheel(pin: PinnedWheel, cache_dir: Path, log: Callable[[str], None], timeout: float) -> Path:
    """The verified wheel, from ``cache_dir/downloads`` or downloaded there by ``pip download``."""
    downloads = cache_dir / "downloads"
    wheel = downloads / pin.filename
    if wheel.is_file():
        if sha256_file(wheel) == pin.sha256:
            log(f"using cached {wheel}")
            return wheel
        wheel.unlink()
    downloads.mkdir(parents=True, exist_ok=True)
    spec = f"{pin.package}=={pin.version}"
    log(f"downloading {spec} from the package index (pip download --no-deps)")
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *pin.pip_args,
            "--cache-dir", str(cache_dir / "pip"), "-d", tmp, spec,
        ]  # fmt: skip
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise WheelUnavailable(
                f"pip download {spec} took longer than {timeout:.0f} s; is the package index reachable?"
            ) from None
        if done.returncode != 0:
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise WheelUnavailable(f"pip download {spec} failed (exit {done.returncode}): {tail}")
        got = Path(tmp) / pin.filename
        if not got.is_file():
            raise WheelUnavailable(
                f"pip download did not produce {pin.filename} (got {sorted(os.listdir(tmp))})"
            )
        actual = sha256_file(got)
        if actual != pin.sha256:
            raise WheelMismatch(f"{pin.filename}: sha256 {actual}, expected {pin.sha256}")
        shutil.move(str(got), wheel)
    return wheel
