"""The ct-liver pipeline: its pre/post-processing pieces, refusals, and the real DICOM series through
``segnode run-pipeline`` (DICOM-SEG with Liver and Liver lesion, TID 1500 SR)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from scipy import ndimage  # type: ignore[import-untyped]

from pipelines.base import PipelineError, PipelineRequest
from pipelines.ct_liver import processing
from pipelines.ct_liver.cropping import crop_mr
from pipelines.ct_liver.orientation import to_ras
from pipelines.ct_liver.pipeline import CtLiverPipeline, parse_parameters
from pipelines.ct_liver.processing import LIVER_PATCH, PatchGeometry, tile_centres
from pipelines.ct_liver.resample import zoom3d
from pipelines.registry import load_pipeline
from tests.factories import SeriesSpec, ct_series, write_series
from tests.liver_support import (
    CHAOS,
    CT_DICOM,
    CT_DICOM_LABELS,
    ct_image,
    ct_result,
    dice,
    dicom_run,
    installed,
    make_storage,
    need,
    networks,
)

# --- resampling: the same numbers as pymirc's zoom3d (written out as plain loops here) -------------


def _zoom_axis_reference(values: np.ndarray[Any, Any], zoom: float) -> np.ndarray[Any, Any]:
    delta = 1.0 / zoom
    nb = len(values)
    if zoom > 1:
        ns = math.ceil(nb / delta)
        out = np.zeros(ns)
        for i in range(ns):
            c = delta * (i - 0.5 * ns + 0.5) + 0.5 * nb - 0.5
            left = math.floor(c)
            a = values[left] * (left + 1 - c) if left >= 0 else 0.0
            b = values[left + 1] * (c - left) if left + 1 < nb else 0.0
            out[i] = a + b
        return out
    ns, nb = nb, math.ceil(nb / delta)
    out = np.zeros(nb)
    for i in range(ns):
        lo = (1.0 / delta) * (i - 0.5 * ns) + 0.5 * nb
        hi = (1.0 / delta) * (i + 1 - 0.5 * ns) + 0.5 * nb
        left, right = math.floor(lo), math.ceil(hi) - 1
        if left == right:
            out[left] += values[i] / delta
        else:
            edge = math.ceil(lo)
            out[left] += values[i] * (edge - lo)
            out[right] += values[i] * (hi - edge)
    return out


@pytest.mark.parametrize("zoom", [(2.0, 0.5, 1.0), (0.9765625 / 1.5, 7.7 / 1.5, 0.5), (3.0, 1 / 3, 1.25)])
def test_zoom3d_matches_the_reference(zoom: tuple[float, float, float]) -> None:
    rng = np.random.default_rng(3)
    volume = rng.normal(size=(11, 9, 7)).astype(np.float32)
    expected = volume.astype(np.float64)
    for axis, factor in enumerate(zoom):
        if factor != 1:
            expected = np.apply_along_axis(_zoom_axis_reference, axis, expected, factor)
    got = zoom3d(volume, zoom)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_zoom3d_keeps_the_mean_when_downsampling() -> None:
    volume = np.random.default_rng(0).uniform(size=(12, 12, 12)).astype(np.float32)
    assert zoom3d(volume, (0.5, 0.5, 0.5)).shape == (6, 6, 6)
    assert float(zoom3d(volume, (0.5, 0.5, 0.5)).mean()) == pytest.approx(float(volume.mean()), rel=1e-5)


# --- patch placement and tiling (DeepVoxNet's sampling) ---------------------------------------------


def test_tiles_cover_with_the_last_block_aligned_to_the_end() -> None:
    centres = tile_centres((200, 84, 20), (92, 84, 42))
    xs = sorted({c[0] for c in centres})
    assert xs == [46, 138, 154]  # blocks [0, 92), [92, 184), [108, 200)
    assert {c[1] for c in centres} == {42}
    assert {c[2] for c in centres} == {10}  # shorter than a block: one block on the centre
    assert len(centres) == 3


@pytest.mark.parametrize("n", [1, 41, 42, 43, 84, 92, 150, 200, 276, 277])
def test_tiles_give_what_deepvoxnet_gives(n: int) -> None:
    """Every voxel ends up with the output of the same block as in DeepVoxNet's loop (last one wins)."""
    block = 92
    seg = min(block, n)
    original = [*range(0, n, seg), n - seg] if n % seg else list(range(0, n, seg))
    expected = np.full(n, -1)
    for start in original:
        expected[start : start + seg] = start + seg // 2
    got = np.full(n, -1)
    for centre, _, _ in tile_centres((n, 1, 1), (block, 1, 1)):
        got[max(0, centre - seg // 2) : centre - seg // 2 + seg] = centre
    np.testing.assert_array_equal(got, expected)


def test_patch_offsets_put_each_output_voxel_on_its_input_voxel() -> None:
    """With a network that returns its input's centre crop, the prediction is the image itself."""
    geometry = PatchGeometry((21, 18, 18), (15, 12, 12), (3, 3, 3))

    def centre_crop(patch: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return patch[3:18, 3:15, 3:15].copy()

    image = np.random.default_rng(1).uniform(size=(13, 11, 10)).astype(np.float32)
    out = np.full(image.shape, np.nan, dtype=np.float32)
    centre = [math.ceil((n - 1) / 2) for n in image.shape]
    processing.predict_at(image, centre, centre_crop, geometry, out)
    np.testing.assert_array_equal(out, image)
    # the real geometries: output voxel k is input voxel k + offset
    assert LIVER_PATCH.offset == (13, 13, 13)


def test_liver_postprocessing_keeps_the_largest_component() -> None:
    shape = (40, 40, 30)
    liver_input = processing.LiverInput(
        np.zeros((20, 20, 15), np.float32), (slice(0, 40), slice(0, 40), slice(0, 30)), shape
    )
    probability = np.zeros((20, 20, 15), np.float32)
    probability[2:12, 3:13, 2:10] = 0.9  # the liver
    probability[15:18, 15:18, 11:14] = 0.8  # a smaller blob
    liver = processing.postprocess_liver(probability, liver_input)
    assert liver.shape == shape
    # the blob is gone, the liver is back on the original grid (2x), in RAS like the input
    assert not liver[30:36, 30:36, 22:28].any()
    assert 0.85 < liver.sum() / (20 * 20 * 16) < 1.15
    assert not processing.postprocess_liver(np.zeros_like(probability), liver_input).any()


@pytest.mark.parametrize("patient", ["1", "2", "3", "8", "10", "13", "15", "20", "21", "22", "32", "33"])
def test_mr_body_crop_keeps_the_whole_body(patient: str) -> None:
    """The MR body crop drops background only: on the tightly framed CHAOS T2 scans the original's
    y-profile edge detector cut up to 35 mm of body wall next to the liver (patient 1: 20 rows in front, 27
    behind). The body here: the largest connected region above 5 % of the maximum, found independently of
    the crop's own (1 %, eroded) mask. Kept now: 98.7-99.9 % of it; with the cut: 95.3 % (patient 1)."""
    import nibabel as nib

    path = need(CHAOS / "images" / f"image_{patient}.nii.gz")
    image = nib.as_closest_canonical(nib.load(str(path)))  # type: ignore[no-untyped-call]
    voxels = np.asarray(processing.to_lps(np.asarray(image.dataobj, dtype=np.float32)), dtype=np.float32)
    voxel = tuple(float(z) for z in image.header.get_zooms()[:3])
    box = crop_mr(voxels, voxel).bbox
    labels, _count = ndimage.label(voxels > 0.05 * float(voxels.max()))
    body = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    inside, total = int(body[box].sum()), int(body[:, :, box[2]].sum())
    assert inside >= 0.98 * total, f"the crop {box} keeps {inside / total:.3f} of the body"


def test_orientation_round_trip() -> None:
    voxels = np.random.default_rng(2).normal(size=(4, 5, 6)).astype(np.float32)
    affine = np.array([[0, 0, -0.8, 10], [0, 1.2, 0, 20], [3.0, 0, 0, 30], [0, 0, 0, 1]], dtype=float)
    reoriented = to_ras(voxels, affine)
    assert reoriented.image.shape == (6, 5, 4)
    assert reoriented.voxel == (0.8, 1.2, 3.0)
    mask = reoriented.image > 0
    np.testing.assert_array_equal(reoriented.back(mask), voxels > 0)


def test_parameters_are_checked() -> None:
    assert parse_parameters({}).backend is None
    assert parse_parameters({"backend": "torch", "lesions": "false", "threads": 2}).lesions is False
    for bad, message in (
        ({"backend": "tensorflow"}, "backend must be one of onnxruntime, torch"),
        ({"threads": 0}, "threads must be a positive integer"),
        ({"lesions": "maybe"}, "lesions must be true or false"),
        ({"colour": "red"}, "unknown parameter"),
    ):
        with pytest.raises(PipelineError, match=message) as info:
            parse_parameters(bad)
        assert info.value.reason == "invalid_parameter"


# --- refusals -----------------------------------------------------------------------------------


def test_refuses_other_modalities(tmp_path: Path) -> None:
    files = write_series(ct_series(SeriesSpec(n=4, modality="PT")), tmp_path / "pet")
    request = PipelineRequest(series_files=files, output_dir=tmp_path / "out", models_dir=tmp_path / "models")
    with pytest.raises(PipelineError) as info:
        load_pipeline("ct-liver").run(request)
    assert info.value.reason == "unsupported_modality"
    assert "'PT'" in info.value.message


def test_refuses_without_models_with_the_install_command(tmp_path: Path) -> None:
    need(CT_DICOM)
    storage = make_storage("segnode-no-models-")
    done = storage.cli(
        "run-pipeline",
        "ct-liver",
        str(CT_DICOM),
        "--out",
        str(tmp_path / "out"),
        "--config",
        str(storage.config),
    )
    assert done.returncode == 3, done.stderr
    assert "refused (model_missing)" in done.stderr
    assert "segnode models install ct-liver" in done.stderr
    assert not (tmp_path / "out").exists()


def test_refuses_an_altered_model(tmp_path: Path) -> None:
    need(CT_DICOM)
    models = installed().storage.models
    copy = tmp_path / "models"
    shutil.copytree(models, copy)
    onnx = copy / "pyliverlesionseg-liver-lesion" / "0.3.0" / "lesion.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-10])
    request = PipelineRequest(
        series_files=sorted(CT_DICOM.iterdir()), output_dir=tmp_path / "out", models_dir=copy
    )
    with pytest.raises(PipelineError) as info:
        CtLiverPipeline().run(request)
    assert info.value.reason == "model_invalid"
    assert "lesion.onnx: sha256 mismatch" in info.value.message


# --- backends -------------------------------------------------------------------------------------


def test_torch_and_onnxruntime_backends_agree() -> None:
    """Both backends the pipeline can choose, opened from the installed bundles, on one input."""
    ort_nets, torch_nets = networks("onnxruntime"), networks("torch")
    rng = np.random.default_rng(5)
    for kind, shape in (("liver", (81, 54, 54)), ("lesion", (100, 92, 54))):
        patch = rng.uniform(-0.5, 0.5, size=shape).astype(np.float32)
        with ort_nets.open(kind) as a, torch_nets.open(kind) as b:
            assert a.name.startswith("onnxruntime") and b.name.startswith("torch")
            np.testing.assert_allclose(a(patch), b(patch), atol=1e-4)


# --- the real data -------------------------------------------------------------------------------


def _resampled_index(j: np.ndarray[Any, Any], n: int, zoom: float) -> np.ndarray[Any, Any]:
    """Where original voxel ``j`` of an axis of ``n`` lies on the zoom3d grid (centres aligned)."""
    return (j + 0.5 - n / 2) * zoom + math.ceil(n * zoom) / 2 - 0.5


def _place_lesion(
    liver: np.ndarray[Any, Any],
    voxel: tuple[float, float, float],
    bbox: Any,
    crop: tuple[int, ...],
    radius: float,
) -> tuple[tuple[int, int, int], int]:
    """A liver voxel at least ``radius + 4`` mm inside the liver whose sphere touches the fewest lesion
    blocks (the deepest among those), and that number of blocks."""
    zooms = [v / s for v, s in zip(voxel, processing.LESION_SPACING, strict=True)]
    depth = ndimage.distance_transform_edt(np.pad(liver, 1), sampling=voxel)[1:-1, 1:-1, 1:-1]
    candidates = np.argwhere(depth >= radius + 4.0)
    assert len(candidates), "no place in the liver for the synthetic lesion"
    blocks = np.ones(len(candidates), dtype=int)
    for axis in range(3):
        step = min(processing.LESION_PATCH.output_patch[axis], crop[axis])
        starts = sorted(
            {c[axis] - step // 2 for c in tile_centres(crop, processing.LESION_PATCH.output_patch)}
        )
        p = _resampled_index(candidates[:, axis], liver.shape[axis], zooms[axis]) - bbox[axis].start
        r = radius / processing.LESION_SPACING[axis] + 2
        blocks *= np.stack([(p + r >= s) & (p - r < s + step) for s in starts]).sum(axis=0)
    fewest = blocks == blocks.min()
    best = candidates[fewest][np.argmax(depth[tuple(candidates[fewest].T)])]
    return (int(best[0]), int(best[1]), int(best[2])), int(blocks.min())


def test_lesion_net_finds_a_lesion_in_the_liver() -> None:
    """No liver in ../shared/data has a lesion reference, so one is made: a sphere of 7 mm radius,
    60 HU darker than the liver around it (its noise kept, soft 3 mm edge), put where the liver is
    thickest in TotalSegmentator's example CT. The lesion net is fed exactly as in the pipeline (the
    pipeline's liver mask, crop, normalisation and block grid) and run on the block(s) holding the
    sphere: it finds the lesion; on the unaltered CT it finds nothing there."""
    radius, contrast = 7.0, 60.0
    image, voxel = ct_image()
    liver = ct_result().liver
    plain = processing.preprocess_lesions(image, voxel, "CT", liver)
    centre, blocks = _place_lesion(liver, voxel, plain.bbox, plain.network_input.shape, radius)
    grid = np.indices(image.shape, dtype=np.float32)
    distance = np.sqrt(sum(((grid[a] - centre[a]) * voxel[a]) ** 2 for a in range(3)))
    truth = distance <= radius
    altered = image - contrast * np.clip((radius + 1.5 - distance) / 3.0, 0.0, 1.0)

    zooms = [v / s for v, s in zip(voxel, processing.LESION_SPACING, strict=True)]
    where = zoom3d(truth.astype(np.float32), zooms) > 0.01
    found: dict[str, np.ndarray[Any, Any]] = {}
    for name, volume in (("with", altered), ("without", image)):
        lesion_input = processing.preprocess_lesions(volume, voxel, "CT", liver)
        assert lesion_input.bbox == plain.bbox
        lesion_input.region = np.ascontiguousarray(where[lesion_input.bbox])  # run only these blocks
        with networks().open("lesion") as lesion_net:
            probability, run, _skipped = processing.predict_lesions(lesion_input, lesion_net)
        assert run <= blocks <= 4
        found[name] = processing.postprocess_lesions(probability, lesion_input) & liver
    score = dice(found["with"], truth)
    print(
        f"synthetic lesion at {centre}: {int(truth.sum())} voxels; found {int(found['with'].sum())} "
        f"(Dice {score:.3f}); without it: {int(found['without'].sum())}"
    )
    assert score >= 0.7
    assert found["without"].sum() <= 0.05 * truth.sum()


def _read_seg_masks(seg_path: Path, volume: Any) -> np.ndarray[Any, Any]:
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    uids = [frame.sop_instance_uid for frame in volume.slice_sources]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1, 2], skip_overlap_checks=True
    )
    return np.moveaxis(pixels.astype(bool), -1, 0)  # (segments, slice, row, column)


def test_run_pipeline_on_the_real_dicom_series() -> None:
    """The 20-slice JPEG 2000 CT series with empty Study/Series UIDs, through the real CLI."""
    import nibabel as nib

    from pipelines.volume import load_volume

    run = dicom_run()
    assert run.returncode == 0, run.stderr
    result = run.result
    seg_path, sr_path = (Path(p) for p in result["files"])
    assert seg_path.parent == run.out_dir and seg_path.is_file() and sr_path.is_file()
    assert any("SeriesInstanceUID is empty" in n and "stand-in" in n for n in result["notes"])
    measurements = result["measurements"]
    assert measurements["modality"] == "CT" and measurements["backend"] == "onnxruntime-cpu"
    for stage in ("load_volume", "liver_net", "lesion_net", "write_outputs", "total"):
        assert result["timings"][stage] > 0

    seg = pydicom.dcmread(seg_path)
    assert (
        seg.Modality == "SEG" and seg.Manufacturer == "segnode" and seg.SeriesInstanceUID.startswith("2.25.")
    )
    described = [
        (
            s.SegmentLabel,
            s.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
            s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
        )
        for s in seg.SegmentSequence
    ]
    assert described == [("Liver", "91723000", "10200004"), ("Liver lesion", "49755003", "52988006")]
    assert seg.SegmentSequence[1].AnatomicRegionSequence[0].CodeValue == "10200004"

    volume = load_volume(sorted(CT_DICOM.iterdir()))
    masks = _read_seg_masks(seg_path, volume)
    voxel_ml = float(np.prod(volume.spacing)) / 1000
    assert int(masks[0].sum()) == measurements["liver_voxels"]
    assert masks[0].sum() * voxel_ml == pytest.approx(measurements["liver_volume_ml"], abs=0.01)
    assert not (masks[1] & ~masks[0]).any()  # lesions only inside the liver
    assert masks[1].sum() * voxel_ml == pytest.approx(measurements["lesion_volume_ml"], abs=0.01)

    sr = pydicom.dcmread(sr_path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    values = _sr_numbers(sr)
    volumes, lesion_counts = values["118565006"], values["246206008"]  # SCT Volume, Number of lesions
    assert volumes[0] == pytest.approx(measurements["liver_volume_ml"], abs=0.01)
    assert volumes[1] == pytest.approx(measurements["lesion_volume_ml"], abs=0.01)
    assert lesion_counts == [measurements["lesion_count"]]

    # Dice against TotalSegmentator's liver (label 5) on this grid; 20 slices (40 mm) is a thin slab
    # for a net that sees the whole abdomen, so the liver is under-segmented but what it marks is liver.
    labels = nib.as_closest_canonical(nib.load(str(need(CT_DICOM_LABELS))))  # type: ignore[no-untyped-call]
    reference = np.rint(np.asarray(labels.dataobj)) == 5
    predicted = to_ras(masks[0].astype(np.float32), volume.affine).image > 0.5
    score = dice(predicted, reference)
    precision = float((predicted & reference).sum() / predicted.sum())
    print(
        f"DICOM series: liver Dice {score:.3f}, precision {precision:.3f}; "
        f"{measurements}; {run.seconds:.0f} s"
    )
    assert precision >= 0.9
    assert score >= 0.4


def _sr_numbers(sr: Any) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {}

    def walk(items: Any) -> None:
        for item in items:
            if item.get("ValueType") == "NUM":
                name = item.ConceptNameCodeSequence[0].CodeValue
                found.setdefault(name, []).append(float(item.MeasuredValueSequence[0].NumericValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return found


def test_cli_reports_unknown_pipelines_and_folders(tmp_path: Path) -> None:
    storage = make_storage("segnode-run-cli-")
    done = storage.cli(
        "run-pipeline",
        "ct-spleen",
        str(tmp_path),
        "--out",
        str(tmp_path / "o"),
        "--config",
        str(storage.config),
    )
    assert done.returncode == 2 and "unknown pipeline 'ct-spleen'" in done.stderr
    done = storage.cli(
        "run-pipeline",
        "ct-liver",
        str(tmp_path / "nope"),
        "--out",
        str(tmp_path / "o"),
        "--config",
        str(storage.config),
    )
    assert done.returncode == 2 and "does not exist" in done.stderr
