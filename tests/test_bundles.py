"""Model bundles: manifest validation, sha256 verification on load, publishing, and the
``segnode models list|verify|install`` commands (install for real, from the package index)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.bundles import BundleError, list_bundles, load_bundle, open_bundle, publish, sha256_file
from pipelines.bundles.manifest import MANIFEST_NAME, Manifest
from pipelines.bundles.store import dump_manifest, staging_dir
from tests.liver_support import installed, make_storage

LIVER = {"scheme": "SCT", "value": "10200004", "meaning": "Liver"}


def _manifest_data(files: dict[str, str]) -> dict[str, Any]:
    """A complete manifest for a small test bundle whose files hash to ``files``."""
    return {
        "schema_version": 1,
        "name": "test-liver",
        "version": "1.2.0",
        "task": "segmentation",
        "description": "bundle used by the store tests",
        "modality": ["CT"],
        "architecture": {"name": "tiny", "parameters": 10, "description": "a test network"},
        "labels": [
            {
                "value": 1,
                "name": "Liver",
                "category": {"scheme": "SCT", "value": "91723000", "meaning": "Anatomical Structure"},
                "type": LIVER,
            }
        ],
        "input": {
            "spacing_mm": [3.0, 3.0, 3.0],
            "orientation": "RAS",
            "patch_size": [9, 9, 9],
            "normalisation": {"CT": {"method": "ct_clip", "description": "clip"}},
        },
        "output": {"activation": "sigmoid", "threshold": 0.5, "patch_size": [5, 5, 5], "offset": [2, 2, 2]},
        "backends": [
            {"name": "onnxruntime", "file": "net.onnx", "sha256": files["net.onnx"], "format": "onnx"},
        ],
        "licence": {
            "spdx": "Apache-2.0",
            "text": {"file": "LICENSE", "sha256": files["LICENSE"]},
            "attribution": "test",
            "authors": ["A. Author"],
            "source_url": "https://example.org",
        },
        "training_data": {"description": "none", "public": True},
    }


def _make_bundle(root: Path, version: str = "1.2.0") -> Path:
    staging = staging_dir(root, "test-liver", version)
    (staging / "net.onnx").write_bytes(b"not really onnx, the store only hashes it " + version.encode())
    (staging / "LICENSE").write_text("Apache-2.0\n")
    data = _manifest_data({name: sha256_file(staging / name) for name in ("net.onnx", "LICENSE")})
    data["version"] = version
    return publish(staging, Manifest.model_validate(data), root).path


def test_manifest_errors_name_the_field(tmp_path: Path) -> None:
    data = _manifest_data({"net.onnx": "0" * 64, "LICENSE": "1" * 64})
    broken = copy.deepcopy(data)
    del broken["labels"][0]["category"]["value"]
    broken["backends"][0]["sha256"] = "XYZ"
    broken["backends"][0]["file"] = "../escape.onnx"
    broken["input"]["spacing_mm"] = [3.0, 0.0, 3.0]
    broken["colour"] = "red"
    bundle = tmp_path / "test-liver" / "1.2.0"
    bundle.mkdir(parents=True)
    (bundle / MANIFEST_NAME).write_text(yaml.safe_dump(broken))
    with pytest.raises(BundleError) as info:
        open_bundle(bundle)
    message = info.value.message
    assert info.value.reason == "manifest_invalid"
    for path in (
        "labels.0.category.value: required field is missing",
        "backends.0.sha256",
        "backends.0.file",
        "input.spacing_mm",
        "colour: unknown field",
    ):
        assert path in message, message


def test_manifest_consistency_rules() -> None:
    data = _manifest_data({"net.onnx": "0" * 64, "LICENSE": "1" * 64})
    torch_without_module = copy.deepcopy(data)
    torch_without_module["backends"].append(
        {
            "name": "torch",
            "file": "net.pt",
            "sha256": "2" * 64,
            "format": "torch_state_dict",
            "module": "trainer.x:Net",
        }
    )
    with pytest.raises(ValueError, match="pipelines never import trainer"):
        Manifest.model_validate(torch_without_module)
    output_too_big = copy.deepcopy(data)
    output_too_big["output"]["offset"] = [5, 5, 5]
    with pytest.raises(ValueError, match=r"exceeds input\.patch_size"):
        Manifest.model_validate(output_too_big)
    normalisation_missing = copy.deepcopy(data)
    normalisation_missing["modality"] = ["CT", "MR"]
    with pytest.raises(ValueError, match="no entry for modality 'MR'"):
        Manifest.model_validate(normalisation_missing)


def test_load_checks_every_sha256(tmp_path: Path) -> None:
    root = tmp_path / "models"
    path = _make_bundle(root)
    bundle = load_bundle(root, "test-liver")
    assert bundle.version == "1.2.0" and bundle.backend_file("onnxruntime") == path / "net.onnx"
    with pytest.raises(BundleError, match="has no 'torch' backend"):
        bundle.backend_file("torch")

    expected = sha256_file(path / "net.onnx")
    with open(path / "net.onnx", "ab") as handle:
        handle.write(b"tampered")
    actual = sha256_file(path / "net.onnx")
    with pytest.raises(BundleError) as info:
        load_bundle(root, "test-liver")
    assert info.value.reason == "hash_mismatch"
    assert f"net.onnx: sha256 mismatch: expected {expected}, actual {actual}" in info.value.message

    (path / "LICENSE").unlink()
    with pytest.raises(BundleError) as info:
        load_bundle(root, "test-liver")
    assert info.value.reason == "file_missing"
    assert "LICENSE: missing" in info.value.message

    with pytest.raises(BundleError) as info:
        load_bundle(root, "no-such-model")
    assert info.value.reason == "bundle_missing"


def test_versions_and_listing(tmp_path: Path) -> None:
    root = tmp_path / "models"
    _make_bundle(root, "1.2.0")
    _make_bundle(root, "1.10.0")
    assert load_bundle(root, "test-liver").version == "1.10.0"  # natural, not lexical, order
    assert load_bundle(root, "test-liver", "1.2.0").version == "1.2.0"
    with pytest.raises(BundleError, match=r"version '9' is not installed .*installed: 1.2.0, 1.10.0"):
        load_bundle(root, "test-liver", "9")
    wrong = root / "other" / "0.1"
    wrong.mkdir(parents=True)
    (wrong / MANIFEST_NAME).write_text((root / "test-liver" / "1.2.0" / MANIFEST_NAME).read_text())
    listing = {(item.name, item.version): item for item in list_bundles(root)}
    assert listing[("test-liver", "1.10.0")].manifest is not None
    assert "does not match its folder other/0.1" in (listing[("other", "0.1")].error or "")


def test_publish_refuses_files_that_do_not_match(tmp_path: Path) -> None:
    root = tmp_path / "models"
    staging = staging_dir(root, "test-liver", "1.2.0")
    (staging / "net.onnx").write_bytes(b"x")
    (staging / "LICENSE").write_text("y")
    manifest = Manifest.model_validate(
        _manifest_data({"net.onnx": "0" * 64, "LICENSE": sha256_file(staging / "LICENSE")})
    )
    with pytest.raises(BundleError, match=r"net\.onnx: sha256 mismatch"):
        publish(staging, manifest, root)
    assert not (root / "test-liver").exists()


def test_models_cli_list_and_verify(tmp_path: Path) -> None:
    storage = make_storage("segnode-bundles-cli-")
    done = storage.cli("models", "list", "--config", str(storage.config))
    assert done.returncode == 0 and "no model bundles" in done.stdout
    path = _make_bundle(storage.models)
    listed = json.loads(storage.cli("models", "list", "--json", "--config", str(storage.config)).stdout)
    assert [(r["name"], r["version"], r["backends"]) for r in listed] == [
        ("test-liver", "1.2.0", ["onnxruntime"])
    ]
    done = storage.cli("models", "verify", "--config", str(storage.config))
    assert done.returncode == 0 and "ok: test-liver 1.2.0: 2 files, every sha256 matches" in done.stdout
    expected = sha256_file(path / "net.onnx")
    (path / "net.onnx").write_bytes(b"altered")
    done = storage.cli("models", "verify", "test-liver", "--config", str(storage.config))
    assert done.returncode == 1
    actual = sha256_file(path / "net.onnx")
    assert f"test-liver 1.2.0: net.onnx: sha256 mismatch: expected {expected}, actual {actual}" in done.stderr
    done = storage.cli("models", "verify", "nothing-here", "--config", str(storage.config))
    assert done.returncode == 1 and "no model bundle 'nothing-here'" in done.stderr
    done = storage.cli("models", "install", "ct-spleen", "--config", str(storage.config))
    assert done.returncode == 2 and "unknown install target 'ct-spleen'; known: ct-liver" in done.stderr


def test_install_ct_liver_for_real() -> None:
    """The real install: pyliverlesionseg==0.3 from the package index (or the wheel cache), both nets
    converted, exported with a parity check, published with attribution, then verified."""
    install = installed()
    models = install.storage.models
    assert "onnxruntime vs torch: max |diff|" in install.stderr
    assert install.stderr.count("every sha256 matches") == 2
    liver = load_bundle(models, "pyliverlesionseg-liver")
    lesion = load_bundle(models, "pyliverlesionseg-liver-lesion")
    for bundle in (liver, lesion):
        m = bundle.manifest
        assert m.licence.spdx == "Apache-2.0" and m.licence.authors == ["Xikai Tang", "Georg Schramm"]
        assert "KUL-recon-lab/pyliverlesionseg" in m.licence.attribution
        assert m.training_data.description.startswith("in-house clinical CT and MR (KU Leuven)")
        assert {b.name for b in m.backends} == {"onnxruntime", "torch"}
        notice = (bundle.path / "NOTICE").read_text()
        assert "Xikai Tang and Georg Schramm" in notice and "Apache License, Version 2.0" in notice
        assert "Apache License" in (bundle.path / "LICENSE").read_text()
        assert m.provenance is not None and m.provenance.archive == "pyliverlesionseg-0.3-py3-none-any.whl"
        assert max(m.provenance.conversion_max_abs_diff.values()) < 1e-3
    assert liver.manifest.architecture.parameters == 3_874_961
    assert lesion.manifest.architecture.parameters == 3_464_221
    assert liver.manifest.metrics and liver.manifest.metrics[0].name == "dice"
    label = lesion.manifest.labels[0]
    assert (label.category.value, label.type.value) == ("49755003", "52988006")
    assert label.anatomic_region is not None and label.anatomic_region.value == "10200004"
    assert (liver.manifest.labels[0].category.value, liver.manifest.labels[0].type.value) == (
        "91723000",
        "10200004",
    )
    done = install.storage.cli("models", "verify", "--config", str(install.storage.config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("every sha256 matches") == 2
    # the manifest on disk is what was validated
    text = (liver.path / MANIFEST_NAME).read_text()
    assert text == dump_manifest(liver.manifest)


def test_warm_cache_opens_once_and_closes_what_it_evicts() -> None:
    from pipelines.bundles.warm import WarmCache

    closed: list[str] = []
    cache: WarmCache[str] = WarmCache(close=closed.append, capacity=2)
    assert cache.get("a", lambda: "model-a") == ("model-a", False)
    assert cache.get("a", lambda: "other") == ("model-a", True)
    cache.get("b", lambda: "model-b")
    cache.get("a", lambda: "unused")  # a is now the most recently used
    cache.get("c", lambda: "model-c")  # evicts b
    assert closed == ["model-b"] and cache.opened == 3 and len(cache) == 2
    cache.clear()
    assert closed == ["model-b", "model-a", "model-c"] and len(cache) == 0
    with pytest.raises(ValueError, match="capacity"):
        WarmCache(close=closed.append, capacity=0)


def test_files_signature_changes_with_the_bundle_folder(tmp_path: Path) -> None:
    from pipelines.bundles.warm import files_signature

    (tmp_path / "net" / "1.0.0").mkdir(parents=True)
    weights = tmp_path / "net" / "1.0.0" / "model.onnx"
    weights.write_bytes(b"one")
    first = files_signature(tmp_path, "net", "absent")
    assert first == files_signature(tmp_path, "net", "absent") and len(first) == 1
    weights.write_bytes(b"two!")  # replaced in place
    second = files_signature(tmp_path, "net")
    assert second != first
    (tmp_path / "net" / "1.1.0").mkdir()
    (tmp_path / "net" / "1.1.0" / "manifest.yaml").write_text("name: net\n")  # a new version
    assert len(files_signature(tmp_path, "net")) == 2
