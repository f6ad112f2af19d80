"""``segnode demo`` pieces: the LiTS download and its wrapping as DICOM, the receiving PACS, the PNG
preview, the SR read-back, the timeline from a real audit trail, and the demo end to end."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from node.demo import lits
from node.demo.peer import ReceivingPeer
from node.demo.preview import pick_slices, preview_from_files, seg_masks
from node.demo.report import sr_measurements
from node.demo.send import scan_folder, send_files
from node.demo.timeline import STAGES, build_timeline, format_timeline, load_trail
from node.demo.wrap import SeriesInfo, WrapError, geometry_from_affine, wrap_nifti, wrap_volume
from pipelines.volume import load_volume
from tests.conftest import REPO, SEGNODE, need_shared, need_tool, start_node, wait_for

CACHE = Path(os.environ.get("SEGNODE_TEST_CACHE", Path(tempfile.gettempdir()) / "segnode-test-cache"))


def _rotation(axis: np.ndarray[Any, Any], degrees: float) -> np.ndarray[Any, Any]:
    axis = axis / np.linalg.norm(axis)
    a = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * (k @ k)


def _oblique_affine(spacing: tuple[float, float, float], flip_slices: bool = False) -> np.ndarray[Any, Any]:
    affine = np.eye(4)
    axes = _rotation(np.array([0.3, -0.5, 1.0]), 17.0) @ np.diag(spacing)
    if flip_slices:
        axes[:, 2] *= -1
    affine[:3, :3] = axes
    affine[:3, 3] = (-120.5, 33.25, 410.0)
    return affine


def _synthetic(shape: tuple[int, int, int] = (24, 20, 12)) -> np.ndarray[Any, Any]:
    i, j, k = np.indices(shape)
    return (i * 7 - j * 3 + k * 50 - 400).astype(np.float32)  # every voxel distinct along each axis


@pytest.mark.parametrize("flip_slices", [False, True])
def test_a_nifti_becomes_a_series_with_its_geometry(tmp_path: Path, flip_slices: bool) -> None:
    import nibabel as nib

    data = _synthetic()
    affine = _oblique_affine((0.8, 1.1, 2.5), flip_slices)
    path = tmp_path / "synthetic.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    files = wrap_nifti(path, tmp_path / "dicom", SeriesInfo(uid_seed="test-geometry"))
    assert len(files) == data.shape[2]

    volume = load_volume(files)
    assert volume.modality == "CT"
    assert volume.voxels.shape == (data.shape[2], data.shape[1], data.shape[0])
    # the loader's own NIfTI view gives back the array and the affine (slices may come back reversed:
    # the loader sorts them along the image normal)
    got = volume.nifti_voxels()
    got_affine = volume.nifti_affine()
    if flip_slices:
        got = got[:, :, ::-1]
        flip = np.eye(4)
        flip[2, 2], flip[2, 3] = -1, data.shape[2] - 1
        got_affine = got_affine @ flip
    np.testing.assert_array_equal(got, np.rint(data))
    np.testing.assert_allclose(got_affine, affine, atol=1e-4)
    np.testing.assert_allclose(volume.spacing, (2.5, 1.1, 0.8), atol=1e-5)

    first = pydicom.dcmread(files[0])
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert first.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert first.RescaleType == "HU" and first.PixelRepresentation == 1
    uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    assert len(uids) == len(files)


def test_wrapping_is_deterministic(tmp_path: Path) -> None:
    data = _synthetic((8, 8, 4))
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    a = wrap_volume(data, affine, tmp_path / "a", SeriesInfo(uid_seed="same"))
    b = wrap_volume(data, affine, tmp_path / "b", SeriesInfo(uid_seed="same"))
    c = wrap_volume(data, affine, tmp_path / "c", SeriesInfo(uid_seed="other"))
    read = [[pydicom.dcmread(p) for p in files] for files in (a, b, c)]
    assert [d.SOPInstanceUID for d in read[0]] == [d.SOPInstanceUID for d in read[1]]
    assert read[0][0].SeriesInstanceUID == read[1][0].SeriesInstanceUID != read[2][0].SeriesInstanceUID
    assert read[0][0].StudyInstanceUID != read[2][0].StudyInstanceUID


def test_wrapped_series_passes_dciodvfy(tmp_path: Path) -> None:
    tool = need_tool("dciodvfy")
    files = wrap_volume(
        _synthetic((16, 16, 3)), _oblique_affine((1, 1, 3)), tmp_path, SeriesInfo(uid_seed="v")
    )
    done = subprocess.run([tool, str(files[1])], capture_output=True, text=True, timeout=60)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]
    assert errors == [], done.stdout + done.stderr


def test_wrapping_refuses_what_dicom_cannot_say(tmp_path: Path) -> None:
    info = SeriesInfo(uid_seed="x")
    sheared = np.eye(4)
    sheared[0, 2] = 0.5  # slices step sideways: a gantry tilt
    with pytest.raises(WrapError, match="not perpendicular to the image plane"):
        wrap_volume(_synthetic((4, 4, 4)), sheared, tmp_path, info)
    skewed = np.eye(4)
    skewed[0, 1] = 0.3
    with pytest.raises(WrapError, match="first two axes are not perpendicular"):
        geometry_from_affine(skewed)
    with pytest.raises(WrapError, match="3-D"):
        wrap_volume(np.zeros((4, 4)), np.eye(4), tmp_path, info)
    with pytest.raises(WrapError, match="NaN"):
        wrap_volume(np.full((2, 2, 2), np.nan), np.eye(4), tmp_path, info)
    with pytest.raises(WrapError, match="zero-length"):
        wrap_volume(np.zeros((2, 2, 2)), np.diag([1.0, 0.0, 1.0, 1.0]), tmp_path, info)
    with pytest.raises(WrapError, match="cannot read"):
        wrap_nifti(tmp_path / "absent.nii.gz", tmp_path, info)


def _mrc(values: np.ndarray[Any, Any], mode: int) -> bytes:
    header = np.zeros(256, dtype="<i4")
    header[:4] = (values.shape[2], values.shape[1], values.shape[0], mode)
    header[16:19] = (1, 2, 3)
    raw = bytearray(header.tobytes())
    raw[208:212] = b"MAP "
    raw[212:214] = b"DD"
    return bytes(raw) + values.tobytes()


def test_mrc_reader() -> None:
    values = np.arange(2 * 3 * 4, dtype="<f4").reshape(2, 3, 4)
    np.testing.assert_array_equal(lits.read_mrc(_mrc(values, 2)), values)
    np.testing.assert_array_equal(lits.read_mrc(_mrc(values.astype("<i2"), 1)), values)
    with pytest.raises(lits.FetchError, match="header"):
        lits.read_mrc(b"short")
    with pytest.raises(lits.FetchError, match="truncated"):
        lits.read_mrc(_mrc(values, 2)[:-8])
    with pytest.raises(lits.FetchError, match="mode 4"):
        lits.read_mrc(_mrc(values, 4))
    with pytest.raises(lits.FetchError, match="MAP"):
        lits.read_mrc(bytes(1024) + values.tobytes())


def _lits_case() -> lits.LitsCase:
    try:
        wheel = lits.fetch_wheel(CACHE)
    except lits.FetchError as exc:
        pytest.skip(f"the package index is unreachable and no cached wheel: {exc}")
    return lits.load_case(wheel)


def test_the_lits_case_from_pypi_wraps_into_a_series_the_rules_route(tmp_path: Path) -> None:
    case = _lits_case()
    assert case.hu.shape == case.labels.shape == (128, 128, 128)
    assert set(np.unique(case.labels)) == {0.0, 1.0, 2.0}
    assert -1100 < case.hu.min() < -900 and case.hu.max() > 1000  # HU: air to bone
    assert "MIT" in case.licence_text
    files = wrap_volume(case.hu, case.ras_affine, tmp_path / "dicom", SeriesInfo(uid_seed="lits-test"))
    volume = load_volume(files)
    assert volume.spacing == pytest.approx((1.6, 1.6, 1.6))
    np.testing.assert_allclose(volume.nifti_affine(), case.ras_affine, atol=1e-4)
    np.testing.assert_array_equal(volume.nifti_voxels(), np.rint(case.hu))
    # LPS: the liver (label 1) lies on the patient's right (low x), the spine is posterior (high y)
    liver_x = np.nonzero(case.labels == 1)[0].mean()
    bone_y = np.nonzero(case.hu > 400)[1].mean()
    assert liver_x < 64 < bone_y
    done = subprocess.run(
        [*SEGNODE, "rules", "test", str(tmp_path / "dicom"), "--json"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("SEGNODE_")},
             "SEGNODE_STORAGE__PATH": str(tmp_path / "store")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert '"ct-liver"' in done.stdout and "no_match" not in done.stdout.replace('"no_match": []', "")


def _regenerated_uids(source: Path, dest: Path) -> list[Path]:
    """The TotalSegmentator DICOM series has empty UIDs (../shared/data/README.md): give it real ones."""
    dest.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    out = []
    for path in sorted(source.iterdir()):
        ds = pydicom.dcmread(path)
        uid = path.name.removeprefix("CT.")
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        target = dest / f"{uid}.dcm"
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


def _seg_of(tmp_path: Path) -> tuple[list[Path], np.ndarray[Any, Any], Path, Path]:
    """A synthetic 24-slice CT, a two-segment SEG over it and the SR, written by segnode's own writers."""
    from pipelines.outputs import (
        LIVER,
        LIVER_LESION,
        Algorithm,
        OutputIdentity,
        SegmentMeasurement,
        write_measurement_report,
        write_seg,
    )

    shape = (40, 36, 24)
    files = wrap_volume(_synthetic(shape), _oblique_affine((1.0, 1.0, 2.0)), tmp_path / "ct", SeriesInfo("s"))
    volume = load_volume(files)
    k, r, c = np.indices(volume.voxels.shape)
    liver = ((k - 12) / 8.0) ** 2 + ((r - 18) / 12.0) ** 2 + ((c - 20) / 14.0) ** 2 <= 1
    lesion = ((k - 12) / 3.0) ** 2 + ((r - 18) / 3.0) ** 2 + ((c - 24) / 3.0) ** 2 <= 1
    headers = [pydicom.dcmread(s.path, stop_before_pixels=True) for s in volume.slice_sources]
    identity = OutputIdentity(str(headers[0].SeriesInstanceUID), "ct-liver", "test=1", "0")
    algorithm = Algorithm(name="test", version="1")
    seg = write_seg(
        headers, np.stack([liver, lesion]), [LIVER, LIVER_LESION],
        algorithm=algorithm, identity=identity, out_path=tmp_path / "seg.dcm",
    )  # fmt: skip
    voxel_ml = float(np.prod(volume.spacing)) / 1000
    sr = write_measurement_report(
        seg.path, headers,
        [SegmentMeasurement(1, float(liver.sum()) * voxel_ml),
         SegmentMeasurement(2, float(lesion.sum()) * voxel_ml, lesion_count=1)],
        algorithm=algorithm, identity=identity, out_path=tmp_path / "sr.dcm",
    )  # fmt: skip
    return files, np.stack([liver, lesion]), seg.path, sr.path


def test_seg_goes_back_onto_the_source_and_the_preview_is_drawn(tmp_path: Path) -> None:
    files, masks, seg_path, sr_path = _seg_of(tmp_path)
    volume = load_volume(files)
    got = seg_masks(seg_path, volume)
    assert got.labels == ["Liver", "Liver lesion"]
    np.testing.assert_array_equal(got.masks, masks)

    shown = pick_slices(got.masks)
    assert 12 in shown and all(got.masks[:, k].any() for k in shown)
    out = tmp_path / "preview.png"
    assert preview_from_files(seg_path, files, out) == shown
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape[1] == 320 * len(shown)
    colours = {tuple(int(v) for v in px) for px in image.reshape(-1, 3)}
    assert (0, 230, 0) in colours and (255, 40, 40) in colours  # liver and lesion outlines

    measured = {(m.group, m.name): m for m in sr_measurements(sr_path)}
    voxel_ml = float(np.prod(volume.spacing)) / 1000
    assert measured[("Liver", "Volume")].value == pytest.approx(masks[0].sum() * voxel_ml, rel=1e-6)
    assert measured[("Liver", "Volume")].unit == "ml"
    assert measured[("Liver lesion", "Volume")].value == pytest.approx(masks[1].sum() * voxel_ml, rel=1e-6)


def test_the_receiving_pacs_keeps_what_it_gets(tmp_path: Path) -> None:
    files = wrap_volume(_synthetic((8, 8, 3)), np.eye(4), tmp_path / "ct", SeriesInfo("peer"))
    with ReceivingPeer(tmp_path / "pacs", ae_title="TESTPACS") as peer:
        sent = send_files(scan_folder(tmp_path / "ct").files, "127.0.0.1", peer.port, "TESTPACS", "SCU")
        got = peer.wait_for(lambda r: len(r) == 3, timeout=30)
    assert set(sent.statuses.values()) == {0}
    assert sorted(r.sop_instance_uid for r in got) == sorted(sent.statuses)
    assert all(r.path.is_file() and r.calling_ae == "SCU" for r in got)
    assert sent.started_at <= min(r.responded_at for r in got) <= sent.last_response_at
    by_uid = {r.sop_instance_uid: r.path for r in got}
    original = pydicom.dcmread(files[0])
    np.testing.assert_array_equal(
        pydicom.dcmread(by_uid[original.SOPInstanceUID]).pixel_array, original.pixel_array
    )


def test_timeline_from_a_real_audit_trail(tmp_path: Path) -> None:
    """A real node without models: the CT is received, completes, is routed to ct-liver, runs, and the
    pipeline refuses (model_missing); the timeline shows each stage reached, in order, and the failure."""
    files = wrap_volume(
        _synthetic((32, 32, 24)), np.diag([-0.8, -0.8, 3.0, 1.0]), tmp_path / "ct", SeriesInfo("timeline")
    )
    node = start_node(tmp_path / "store", extra_env={"SEGNODE_EXECUTOR__POLL_SECONDS": "0.1"})
    try:
        scan = scan_folder(tmp_path / "ct")
        sent = send_files(scan.files, "127.0.0.1", node.dimse_port, node.ae_title, "DEMOPACS")
        assert set(sent.statuses.values()) == {0}
        study = scan.studies[0]

        def failed() -> Any:
            items = load_trail(node.sessions(), study)
            return items if any(i.event_type == "job.failed" for i in items) else None

        items = wait_for(failed, timeout=180, what="the job to fail for want of models")
    finally:
        node.stop()
    timeline = build_timeline(study, items)
    assert [s.name for s in timeline.stages] == list(STAGES)
    reached = [s for s in timeline.stages if s.at is not None]
    assert [s.name for s in reached] == ["received", "completed", "routed", "queued", "running"]
    times = [s.at for s in reached if s.at is not None]
    assert times == sorted(times)
    assert timeline.stages[0].detail.startswith(f"{len(files)} instances")
    assert "ct-liver" in timeline.stages[2].detail
    assert timeline.failure is not None and "model_missing" in timeline.failure
    text = format_timeline(timeline)
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["stage", "time"]
    assert lines[1].startswith("received") and "(not reached)" in lines[6]
    assert lines[-1].startswith("failed: job.failed") and "model_missing" in lines[-1]
    seconds = timeline.seconds("received", "completed")
    assert seconds is not None and 0 < seconds < 60


def _demo(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SEGNODE_")}
    return subprocess.run(
        [*SEGNODE, "demo", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
        env={**base, **(env or {})},
    )  # fmt: skip


def test_demo_says_what_is_wrong_with_a_folder(tmp_path: Path) -> None:
    done = _demo("--study", str(tmp_path / "absent"), "--data", str(tmp_path / "data"))
    assert done.returncode == 2 and "is not a folder" in done.stderr
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not DICOM")
    done = _demo("--study", str(tmp_path / "notes"), "--data", str(tmp_path / "data"))
    assert done.returncode == 2
    assert "no DICOM instances" in done.stderr and "1 file(s) looked at" in done.stderr


def test_demo_without_the_package_index_says_so(tmp_path: Path) -> None:
    done = _demo(
        "--data", str(tmp_path / "data"),
        env={"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2",
             "PIP_FIND_LINKS": "", "PIP_NO_INDEX": ""},
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "cannot download liver-ct-segmentation-package==1.6.0 from the package index" in done.stderr
    assert "--study DIR" in done.stderr


def _data_with_models(tmp_path: Path) -> Path:
    from tests.liver_support import installed

    data = tmp_path / "data"
    data.mkdir()
    (data / "models").symlink_to(installed().storage.models, target_is_directory=True)
    return data


def test_demo_says_when_no_rule_takes_the_study(tmp_path: Path) -> None:
    """Three CT slices: the ct-liver rule wants >= 20 images; the demo ends with each rule's reason."""
    wrap_volume(_synthetic((16, 16, 3)), np.diag([-1.0, -1.0, 2.0, 1.0]), tmp_path / "ct", SeriesInfo("few"))
    done = _demo("--study", str(tmp_path / "ct"), "--data", str(_data_with_models(tmp_path)), timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "no rule matched" in done.stdout
    assert "ct-liver: " in done.stdout and "instance_count" in done.stdout
    assert "demo finished without a complete result" in done.stdout


@pytest.mark.slow
def test_demo_with_a_real_ct_study_end_to_end(tmp_path: Path) -> None:
    """``segnode demo --study DIR`` on the real 20-slice TotalSegmentator CT (JPEG 2000): the SEG and
    SR reach the PACS, the timeline shows every stage, the preview is written. Slow: ct-liver runs on
    the CPU (the demo took about 11 minutes on the shared 2-core development VM under load, plus the
    session's one-off model install)."""
    source = need_shared("liver", "totalsegmentator_example", "example_ct_dicom")
    study = _regenerated_uids(source, tmp_path / "study")
    data = _data_with_models(tmp_path)
    done = _demo("--study", str(tmp_path / "study"), "--data", str(data), timeout=1800)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    for stage in STAGES:
        line = next(line for line in out.splitlines() if line.startswith(f"{stage} "))
        assert "(not reached)" not in line, out
    assert "Liver            Volume" in out
    seg_line = next(line for line in out.splitlines() if line.startswith("DICOM-SEG at the PACS: "))
    seg = pydicom.dcmread(seg_line.removeprefix("DICOM-SEG at the PACS: "))
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == pydicom.dcmread(study[0]).StudyInstanceUID
    previews = list((data / "demo").glob("*/preview.png"))
    assert len(previews) == 1 and Image.open(previews[0]).size[0] >= 320
    assert len(study) == 20 and sys.executable
