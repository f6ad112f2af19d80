"""Model bundles on disk: ``<models>/<name>/<version>/manifest.yaml`` plus the files it names.

Loading a bundle re-hashes every file the manifest names and refuses (``BundleError``) when one is
missing or altered, naming the file with the expected and actual sha256. Bundles are published
atomically: built in a staging folder next to their final place, hashed, then renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipelines.bundles.manifest import MANIFEST_NAME, Manifest, format_validation_error


class BundleError(Exception):
    """A bundle that cannot be used. ``reason``: ``bundle_missing``, ``manifest_invalid``,
    ``file_missing``, ``hash_mismatch`` or ``backend_missing``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def models_dir(storage_path: Path) -> Path:
    """Where the node keeps its bundles: ``storage.path/models``."""
    return Path(storage_path) / "models"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileCheck:
    file: str
    expected: str
    actual: str | None  # None: missing

    @property
    def ok(self) -> bool:
        return self.actual == self.expected

    def problem(self) -> str:
        if self.actual is None:
            return f"{self.file}: missing (expected sha256 {self.expected})"
        return f"{self.file}: sha256 mismatch: expected {self.expected}, actual {self.actual}"


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def file(self, name: str) -> Path:
        return self.path / name

    def backend_file(self, backend: str) -> Path:
        entry = self.manifest.backend(backend)
        if entry is None:
            have = ", ".join(b.name for b in self.manifest.backends)
            raise BundleError(
                "backend_missing",
                f"bundle {self.name} {self.version} has no {backend!r} backend (it has {have})",
            )
        return self.path / entry.file


def read_manifest(bundle_path: Path) -> Manifest:
    """Parse and validate ``manifest.yaml`` of the bundle folder (no hashing)."""
    source = bundle_path / MANIFEST_NAME
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BundleError("bundle_missing", f"{source} does not exist") from None
    except OSError as exc:
        raise BundleError("manifest_invalid", f"cannot read {source}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BundleError("manifest_invalid", f"{source} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleError("manifest_invalid", f"{source} must hold a mapping, not {type(data).__name__}")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise BundleError("manifest_invalid", format_validation_error(exc, str(source))) from None
    expected_dir = (manifest.name, manifest.version)
    actual_dir = (bundle_path.parent.name, bundle_path.name)
    if actual_dir != expected_dir:
        raise BundleError(
            "manifest_invalid",
            f"{source}: name/version {'/'.join(expected_dir)} does not match "
            f"its folder {'/'.join(actual_dir)}",
        )
    return manifest


def check_files(bundle_path: Path, manifest: Manifest) -> list[FileCheck]:
    checks = []
    for name, expected in manifest.expected_hashes().items():
        path = bundle_path / name
        actual = sha256_file(path) if path.is_file() else None
        checks.append(FileCheck(name, expected, actual))
    return checks


def verify(bundle_path: Path) -> tuple[Manifest, list[FileCheck]]:
    """Validate the manifest and hash every file; never raises for a bad file, only for a bad manifest."""
    manifest = read_manifest(bundle_path)
    return manifest, check_files(bundle_path, manifest)


def open_bundle(bundle_path: Path) -> Bundle:
    """A verified bundle from its folder: every file present with the sha256 the manifest gives."""
    manifest, checks = verify(bundle_path)
    bad = [c for c in checks if not c.ok]
    if bad:
        reason = "file_missing" if any(c.actual is None for c in bad) else "hash_mismatch"
        details = "; ".join(c.problem() for c in bad)
        raise BundleError(reason, f"bundle {manifest.name} {manifest.version} at {bundle_path}: {details}")
    return Bundle(bundle_path, manifest)


def _version_key(version: str) -> tuple[Any, ...]:
    parts = re.split(r"[.+_-]", version)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def versions(root: Path, name: str) -> list[str]:
    """Installed versions of a bundle (folders holding a manifest), oldest first."""
    base = root / name
    if not base.is_dir():
        return []
    found = [p.name for p in base.iterdir() if p.is_dir() and (p / MANIFEST_NAME).is_file()]
    return sorted(found, key=_version_key)


def load_bundle(root: Path, name: str, version: str | None = None) -> Bundle:
    """The named bundle (newest installed version unless ``version``), verified."""
    available = versions(root, name)
    if not available:
        raise BundleError("bundle_missing", f"model bundle {name!r} is not installed under {root}")
    if version is None:
        version = available[-1]
    elif version not in available:
        raise BundleError(
            "bundle_missing",
            f"model bundle {name!r} version {version!r} is not installed under {root} "
            f"(installed: {', '.join(available)})",
        )
    return open_bundle(root / name / version)


@dataclass(frozen=True)
class Listing:
    name: str
    version: str
    path: Path
    manifest: Manifest | None
    error: str | None


def list_bundles(root: Path) -> list[Listing]:
    """Every bundle folder under ``root``, with its manifest or the reason it cannot be read."""
    out: list[Listing] = []
    if not root.is_dir():
        return out
    for name_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for version in versions(root, name_dir.name):
            path = name_dir / version
            try:
                out.append(Listing(name_dir.name, version, path, read_manifest(path), None))
            except BundleError as exc:
                out.append(Listing(name_dir.name, version, path, None, exc.message))
    return out


def dump_manifest(manifest: Manifest) -> str:
    data = manifest.model_dump(mode="json", exclude_none=True)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


def staging_dir(root: Path, name: str, version: str) -> Path:
    """An empty folder on the same filesystem as the bundle's final place."""
    staging = root / ".staging" / f"{name}-{version}-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path, manifest: Manifest, root: Path) -> Bundle:
    """Write ``manifest.yaml`` into ``staging`` (which holds the files it names), check every hash,
    then move it to ``root/name/version`` (replacing an earlier copy) and return it verified."""
    bad = [c for c in check_files(staging, manifest) if not c.ok]
    if bad:
        raise BundleError("hash_mismatch", "; ".join(c.problem() for c in bad))
    text = dump_manifest(manifest)
    Manifest.model_validate(yaml.safe_load(text))  # what is written reads back
    (staging / MANIFEST_NAME).write_text(text, encoding="utf-8")
    target = root / manifest.name / manifest.version
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return open_bundle(target)
