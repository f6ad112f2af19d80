"""Model bundles: a folder with ``manifest.yaml`` and the weight files it names, checked by sha256.

``segnode models list|verify|install`` manage them under ``storage.path/models``; pipelines load them
with ``load_bundle`` (which refuses a missing or altered file) and never import ``trainer/``.
"""

from pipelines.bundles.manifest import Manifest
from pipelines.bundles.store import (
    Bundle,
    BundleError,
    FileCheck,
    Listing,
    list_bundles,
    load_bundle,
    models_dir,
    open_bundle,
    publish,
    read_manifest,
    sha256_file,
    staging_dir,
    verify,
)

__all__ = [
    "Bundle",
    "BundleError",
    "FileCheck",
    "Listing",
    "Manifest",
    "list_bundles",
    "load_bundle",
    "models_dir",
    "open_bundle",
    "publish",
    "read_manifest",
    "sha256_file",
    "staging_dir",
    "verify",
]
