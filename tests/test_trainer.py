"""segnode-train on real ACDC patients (a handful, tiny plans): plan, train (loss goes down, resume is
exact), evaluate (Dice/HD95 CSV), export parity (TorchScript, ONNX), package (a verified bundle),
install from a committed copy, and the Sunnybrook contour converter."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipelines.bundles.repository import install_committed
from pipelines.bundles.store import BundleError, open_bundle
from tests.conftest import need_shared
from trainer.cli import main
from trainer.evaluate import case_metrics

TINY = [
    "--patch-size",
    "64,64",
    "--base-filters",
    "8",
    "--max-filters",
    "32",
    "--max-levels",
    "4",
    "--batch-size",
    "4",
]
CASES = "8"  # 4 patients x ED/ES


@pytest.fixture(scope="module")
def acdc() -> Path:
    return need_shared("cardiac", "acdc")


@pytest.fixture(scope="module")
def planned(acdc: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plan")
    assert main(["plan", str(acdc), "--out", str(out), "--max-cases", CASES, *TINY]) == 0
    return out


def _train(acdc: Path, plan: Path, out: Path, *extra: str) -> None:
    args = [
        "train",
        str(acdc),
        "--plan",
        str(plan / "plan.json"),
        "--out",
        str(out),
        "--max-cases",
        CASES,
        "--threads",
        "1",
        "--val-fraction",
        "0.25",
        "--val-every",
        "0",
        "--val-mode",
        "whole",
        "--warmup",
        "0",
        "--lr",
        "0.005",
        *extra,
    ]
    assert main(args) == 0


@pytest.fixture(scope="module")
def trained(acdc: Path, planned: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    _train(acdc, planned, out, "--max-iterations", "40")
    return out


def test_plan_is_2d_for_anisotropic_acdc(acdc: Path, planned: Path, tmp_path: Path) -> None:
    fp = json.loads((planned / "fingerprint.json").read_text())
    assert fp["num_cases"] == 8 and fp["num_groups"] == 4
    assert fp["median_spacing"] == pytest.approx([1.5625, 1.5625, 10.0])
    assert set(fp["class_frequency"]) == {"background", "RV", "MYO", "LV"}
    assert 0 < fp["class_frequency"]["LV"] < fp["class_frequency"]["background"]
    plan = json.loads((planned / "plan.json").read_text())
    assert plan["patch_size"] == [64, 64] and plan["batch_size"] == 4 and plan["filters"] == [8, 16, 32, 32]
    # automatic plan (no overrides): 2D in-plane, slice axis = the 10 mm axis, patch divisible by the strides
    assert main(["plan", str(acdc), "--out", str(tmp_path), "--max-cases", CASES]) == 0
    auto = json.loads((tmp_path / "plan.json").read_text())
    assert auto["dim"] == 2 and auto["slice_axis"] == 2 and auto["resample_axes"] == [0, 1]
    assert auto["normalisation"]["channels"][0]["method"] == "zscore"
    assert len(auto["kernels"]) == len(auto["strides"]) == len(auto["filters"])
    total = np.prod(np.asarray(auto["strides"]), axis=0)
    assert all(p % t == 0 and p >= 128 for p, t in zip(auto["patch_size"], total, strict=True))


def test_training_reduces_loss_and_writes_outputs(trained: Path) -> None:
    state = torch.load(trained / "checkpoint_last.pt", weights_only=False)
    losses = [v for _, v in state["history"]["loss"]]
    assert len(losses) == 40
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.05
    split = json.loads((trained / "split.json").read_text())
    assert not set(split["train_groups"]) & set(split["val_groups"])  # patient-level split
    assert len(split["val_groups"]) == 1 and len(split["val_cases"]) == 2
    assert state["history"]["val"] and 0 <= state["history"]["val"][-1]["mean_dice"] <= 1
    assert (trained / "training_curves.png").stat().st_size > 1000
    assert (trained / "checkpoint_best.pt").is_file()


def test_resume_is_exact(acdc: Path, planned: Path, tmp_path: Path) -> None:
    _train(acdc, planned, tmp_path / "straight", "--max-iterations", "6")
    _train(acdc, planned, tmp_path / "resumed", "--max-iterations", "6", "--stop-after", "3")
    half = torch.load(tmp_path / "resumed" / "checkpoint_last.pt", weights_only=False)
    assert half["iteration"] == 3
    _train(acdc, planned, tmp_path / "resumed", "--max-iterations", "6")
    a = torch.load(tmp_path / "straight" / "checkpoint_last.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint_last.pt", weights_only=False)
    assert a["iteration"] == b["iteration"] == 6
    assert a["history"]["loss"] == b["history"]["loss"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_init_weights_fine_tunes_from_a_checkpoint(
    acdc: Path, planned: Path, trained: Path, tmp_path: Path
) -> None:
    # stop before the first step: the network is exactly the checkpoint's, the schedule starts at 0
    _train(
        acdc,
        planned,
        tmp_path / "tuned",
        "--max-iterations",
        "4",
        "--stop-after",
        "0",
        "--init-weights",
        str(trained / "checkpoint_final.pt"),
    )
    start = torch.load(tmp_path / "tuned" / "checkpoint_last.pt", weights_only=False)
    source = torch.load(trained / "checkpoint_final.pt", weights_only=False)
    assert start["iteration"] == 0 and start["history"]["loss"] == []
    for k, v in source["model"].items():
        assert torch.equal(v, start["model"][k]), k
    # then it trains on from there (same topology, fresh optimiser)
    _train(acdc, planned, tmp_path / "tuned", "--max-iterations", "4")
    after = torch.load(tmp_path / "tuned" / "checkpoint_last.pt", weights_only=False)
    assert after["iteration"] == 4
    assert any(not torch.equal(v, after["model"][k]) for k, v in source["model"].items())


def test_init_weights_refuses_another_topology(
    acdc: Path, planned: Path, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "plan"
    small = [*TINY[:2], "--base-filters", "4", *TINY[4:]]
    assert main(["plan", str(acdc), "--out", str(other), "--max-cases", CASES, *small]) == 0
    ckpt = str(trained / "checkpoint_final.pt")
    common = ["--max-cases", CASES, "--threads", "1", "--max-iterations", "2", "--init-weights"]
    run = ["train", str(acdc), "--plan", str(other / "plan.json"), "--out", str(tmp_path / "a")]
    assert main([*run, *common, ckpt]) != 0
    err = capsys.readouterr().err
    assert "filters=[8, 16, 32, 32], this plan has [4, 8, 16, 32]" in err
    assert not (tmp_path / "a" / "checkpoint_last.pt").exists()
    run = ["train", str(acdc), "--plan", str(planned / "plan.json"), "--out", str(tmp_path / "b")]
    assert main([*run, *common, str(tmp_path / "missing.pt")]) != 0
    assert "missing.pt: no such checkpoint file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("plan_args", "train_args"),
    [
        (["--network", "swinunetr", "--feature-size", "12"], ["--loss", "dice_focal"]),
        ([], ["--loss", "tversky", "--optimizer", "sgd"]),
    ],
    ids=["swinunetr-dice_focal", "dynunet-tversky-sgd"],
)
def test_other_networks_losses_and_optimizers_train(
    acdc: Path, tmp_path: Path, plan_args: list[str], train_args: list[str]
) -> None:
    plan_dir = tmp_path / "plan"
    assert main(["plan", str(acdc), "--out", str(plan_dir), "--max-cases", CASES, *TINY, *plan_args]) == 0
    plan = json.loads((plan_dir / "plan.json").read_text())
    assert plan["network"] == (plan_args[1] if plan_args else "dynunet")
    _train(acdc, plan_dir, tmp_path / "run", "--max-iterations", "2", *train_args)
    state = torch.load(tmp_path / "run" / "checkpoint_last.pt", weights_only=False)
    assert state["iteration"] == 2
    assert all(np.isfinite(v) for _, v in state["history"]["loss"])


def test_case_metrics_in_millimetres() -> None:
    ref = np.zeros((20, 20, 3), np.uint8)
    ref[5:12, 5:12, 1] = 3
    same = case_metrics(ref, ref, 4, (1.5625, 1.5625, 10.0))
    assert same[0][2] == pytest.approx(1.0) and same[1][2] == pytest.approx(0.0)
    assert np.isnan(same[0][0]) and np.isnan(same[1][0])  # class absent in both
    shifted = np.roll(ref, 2, axis=0)
    dice, hd = case_metrics(shifted, ref, 4, (1.5625, 1.5625, 10.0))
    assert dice[2] == pytest.approx(2 * 5 * 7 / (2 * 49))
    assert hd[2] == pytest.approx(2 * 1.5625)


def test_evaluate_writes_csv_summary_and_montage(acdc: Path, trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                str(acdc),
                "--checkpoint",
                str(trained / "checkpoint_final.pt"),
                "--out",
                str(out),
                "--mode",
                "sliding",
                "--overlap",
                "0.25",
                "--eval-group-regex",
                r"frame\d+",
                "--postprocess",
                "largest",
            ]
        )
        == 0
    )
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    split = json.loads((trained / "split.json").read_text())
    assert sorted(r["case"] for r in rows) == sorted(split["val_cases"])
    for r in rows:
        for cls in ("RV", "MYO", "LV"):
            assert 0.0 <= float(r[f"dice_{cls}"]) <= 1.0
            assert r[f"hd95_mm_{cls}"] != ""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"] == ["RV", "MYO", "LV"]
    assert set(summary["by_group"]) == {"frame01", "frame02"}
    assert summary["overall_postprocessed"]["cases"] == len(rows)
    with open(out / "metrics_postprocessed.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)
    assert (out / "worst_cases.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def exported(acdc: Path, trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export")
    assert (
        main(
            [
                "export",
                str(acdc),
                "--checkpoint",
                str(trained / "checkpoint_final.pt"),
                "--out",
                str(out),
                "--threads",
                "1",
            ]
        )
        == 0
    )
    return out


def test_export_parity(exported: Path) -> None:
    report = json.loads((exported / "export_report.json").read_text())
    assert report["parity"]["torchscript"]["max_abs_diff"] < 1e-4
    assert report["parity"]["onnx"]["max_abs_diff"] < 1e-3
    assert report["parity"]["onnx"]["argmax_agreement"] > 0.999
    assert report["parity"]["onnx_fp16"]["max_abs_diff"] < 0.5
    for name in ("model.torchscript.pt", "model.onnx", "model.fp16.onnx", "model.int8.onnx"):
        assert (exported / name).stat().st_size > 1000
    assert "TensorRT" in report["tensorrt"]


def test_package_bundle_verifies_and_installs(
    acdc: Path, trained: Path, exported: Path, tmp_path: Path
) -> None:
    ev = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                str(acdc),
                "--checkpoint",
                str(trained / "checkpoint_final.pt"),
                "--out",
                str(ev),
                "--mode",
                "whole",
                "--postprocess",
                "largest",
            ]
        )
        == 0
    )
    root = tmp_path / "models"
    assert (
        main(
            [
                "package",
                "--checkpoint",
                str(trained / "checkpoint_final.pt"),
                "--onnx",
                str(exported / "model.onnx"),
                "--eval-dir",
                str(ev),
                "--models-root",
                str(root),
                "--name",
                "mri-cardiac",
                "--version",
                "0.0.1",
                "--description",
                "tiny test model",
            ]
        )
        == 0
    )
    bundle = open_bundle(root / "mri-cardiac" / "0.0.1")
    m = bundle.manifest
    assert [(lab.value, lab.name, lab.type.value) for lab in m.labels] == [
        (1, "RV", "53085002"),
        (2, "MYO", "49848007"),
        (3, "LV", "87878005"),
    ]
    assert m.input.patch_size == (64, 64, 1) and m.input.spacing_mm == (1.5625, 1.5625, 10.0)
    assert m.licence.spdx == "CC-BY-NC-SA-4.0" and m.training_data.licence == "CC-BY-NC-SA-4.0"
    names = {x.name for x in m.metrics}
    assert names >= {"dice_RV", "hd95_mm_LV", "dice_mean_foreground", "dice_MYO_largest_component"}
    # installing from a committed copy verifies the source and the installed copy
    installed = install_committed("mri-cardiac", tmp_path / "node-models", lambda _: None, source_root=root)
    assert installed[0].path == tmp_path / "node-models" / "mri-cardiac" / "0.0.1"
    tampered = tmp_path / "tampered"
    shutil.copytree(root, tampered)
    with open(tampered / "mri-cardiac" / "0.0.1" / "model.onnx", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(BundleError) as err:
        install_committed("mri-cardiac", tmp_path / "other", lambda _: None, source_root=tampered)
    assert err.value.reason == "hash_mismatch"
    assert not (tmp_path / "other" / "mri-cardiac").exists()


def test_convert_sunnybrook_contours(tmp_path: Path) -> None:
    src = need_shared("cardiac", "sunnybrook", "SCD0000101")
    out = tmp_path / "raw"
    assert (
        main(
            [
                "convert",
                "contours",
                str(src / "dicom"),
                str(src / "contours"),
                "--out",
                str(out),
                "--case-prefix",
                "scd",
            ]
        )
        == 0
    )
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "MYO": 2, "LV": 3, "ignore": 4}
    labels = sorted((out / "labelsTr").glob("*.nii.gz"))
    assert len(labels) == 2
    for path in labels:
        img = nib.load(str(path))
        lab = np.asarray(img.dataobj)
        assert lab.shape == (256, 256, 12)
        assert img.header.get_zooms()[:2] == pytest.approx((1.367188, 1.367188))
        contoured = [z for z in range(12) if (lab[:, :, z] != 4).any()]
        assert contoured  # slices with contours are labelled, the rest ignored
        lv = int((lab == 3).sum()) * 1.367188**2 * img.header.get_zooms()[2] / 1000
        assert 5 < lv < 400  # ml of LV cavity over the contoured slices


def test_segnode_models_install_mri_cardiac() -> None:
    """The committed bundle installs through the node's CLI, verified, without ../shared."""
    from pipelines.bundles.repository import REPOSITORY_MODELS
    from tests.liver_support import make_storage

    if not (REPOSITORY_MODELS / "mri-cardiac").is_dir():
        pytest.skip(f"no committed bundle under {REPOSITORY_MODELS / 'mri-cardiac'}")
    storage = make_storage("segnode-cardiac-models-")
    done = storage.cli("models", "install", "mri-cardiac", "--config", str(storage.config))
    assert done.returncode == 0, done.stderr
    assert "installed mri-cardiac" in done.stdout
    done = storage.cli("models", "verify", "mri-cardiac", "--config", str(storage.config))
    assert done.returncode == 0, done.stdout + done.stderr
    bundle = open_bundle(next((storage.models / "mri-cardiac").iterdir()))
    assert bundle.manifest.licence.spdx == "CC-BY-NC-SA-4.0"
    assert any("research use only" in x for x in bundle.manifest.limitations)
