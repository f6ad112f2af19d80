"""mri-cardiac without a model: the cine volume from the real Sunnybrook series (one series, and one
series per slice location), its manual contours, function (volumes, EF, mass) from contour masks,
ED/ES choice, post-processing, the manifest checks, and the SEGs + SR written from contour masks
(dciodvfy). The end-to-end run with the trained bundle is in tests/test_mri_cardiac_e2e.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from scipy import ndimage

from pipelines.base import PipelineError, PipelineRequest
from pipelines.bundles import Bundle
from pipelines.bundles.manifest import Manifest
from pipelines.mri_cardiac import sunnybrook
from pipelines.mri_cardiac.function import (
    MYOCARDIAL_DENSITY_G_PER_ML,
    PhaseVolumes,
    cardiac_function,
    clean_labels,
    largest_component,
    phase_volumes,
    pick_ed_es,
    voxel_volume_ml,
)
from pipelines.mri_cardiac.labels import SEGMENT_ORDER, Structure, structure_labels
from pipelines.mri_cardiac.model import first_argmax, model_spec, normalise, resample_image
from pipelines.mri_cardiac.pipeline import MriCardiacPipeline, load_cine, parse_parameters, write_outputs
from pipelines.outputs import Algorithm, OutputIdentity
from pipelines.outputs.uids import is_valid_uid
from pipelines.volume import Reason, Volume, load_series
from tests.conftest import need_shared

pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),
    pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name"),
    pytest.mark.filterwarnings("ignore:.*is not a valid value for VR DA"),
]

CASE = ("cardiac", "sunnybrook", "SCD0000101")
RV, MYO, LV = 1, 2, 3  # ACDC's label values, as the ACDC-trained bundle has them
VALUES = {Structure.RV: RV, Structure.MYO: MYO, Structure.LV: LV}


def code(scheme: str, value: str, meaning: str) -> dict[str, str]:
    return {"scheme": scheme, "value": value, "meaning": meaning}


STRUCTURE = code("SCT", "91723000", "Anatomical Structure")
ACDC_LABELS = [
    {"value": RV, "name": "RV", "category": STRUCTURE, "type": code("SCT", "53085002", "Right ventricle")},
    {
        "value": MYO,
        "name": "MYO",
        "category": STRUCTURE,
        "type": code("SCT", "49848007", "Left Ventricle Myocardium"),
    },
    {"value": LV, "name": "LV", "category": STRUCTURE, "type": code("SCT", "87878005", "Left ventricle")},
]
SHA = "0" * 64


def manifest(**changes: object) -> Manifest:
    data: dict[str, object] = {
        "name": "mri-cardiac",
        "version": "1.0.0",
        "task": "segmentation",
        "description": "test manifest (no weights are loaded)",
        "modality": ["MR"],
        "architecture": {"name": "DynUNet 2D", "parameters": 1, "description": "nnU-Net-like"},
        "labels": ACDC_LABELS,
        "input": {
            "spacing_mm": [1.5625, 1.5625, 10.0],
            "orientation": "RAS",
            "patch_size": [224, 224, 1],
            "normalisation": {"MR": {"method": "zscore", "description": "per volume"}},
        },
        "output": {"channels": 4, "activation": "softmax", "patch_size": [224, 224, 1], "offset": [0, 0, 0]},
        "backends": [{"name": "onnxruntime", "file": "model.onnx", "sha256": SHA, "format": "onnx"}],
        "licence": {
            "spdx": "CC-BY-NC-SA-4.0",
            "text": {"file": "LICENCE", "sha256": SHA},
            "attribution": "ACDC",
            "authors": ["Bernard et al."],
            "source_url": "https://www.creatis.insa-lyon.fr/Challenge/acdc/",
        },
        "training_data": {"description": "ACDC", "public": True},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            data[section] = {**dict(data[section]), field: value}  # type: ignore[arg-type]
        else:
            data[key] = value
    return Manifest.model_validate(data)


@pytest.fixture(scope="module")
def case_dir() -> Path:
    return need_shared(*CASE)


@pytest.fixture(scope="module")
def files(case_dir: Path) -> list[Path]:
    return sorted((case_dir / "dicom").glob("*.dcm"))


@pytest.fixture(scope="module")
def cine(files: list[Path]) -> Volume:
    return load_cine(files, min_phases=5, min_slices=3)


@pytest.fixture(scope="module")
def contours(case_dir: Path) -> list[sunnybrook.ContouredImage]:
    return sunnybrook.read_case(case_dir)


@pytest.fixture(scope="module")
def reference(cine: Volume, contours: list[sunnybrook.ContouredImage]) -> dict[int, np.ndarray]:
    """Label maps (slice, row, column) from the manual contours at the contoured time points."""
    where = sunnybrook.locate(cine, contours)
    out: dict[int, np.ndarray] = {}
    for image in contours:
        t, k = where[image.image_number]
        labels = out.setdefault(t, np.zeros(cine.voxels.shape[1:], dtype=np.uint8))
        cavity, myocardium = sunnybrook.reference_labels(image, labels.shape[1:])
        labels[k][cavity] = LV
        if myocardium is not None:
            labels[k][myocardium] = MYO
    return out


def shoelace(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


# -- volume -------------------------------------------------------------------------------------------


def test_sunnybrook_cine_volume(cine: Volume) -> None:
    assert cine.is_cine and cine.voxels.shape == (20, 12, 256, 256)
    assert cine.spacing[0] == pytest.approx(10.0, abs=0.01)
    assert cine.spacing[1:] == pytest.approx((1.367188, 1.367188))
    assert list(cine.trigger_times) == sorted(cine.trigger_times) and len(cine.trigger_times) == 20
    assert any("FrameOfReferenceUIDs in one cine stack" in n for n in cine.notes)
    # every time point references 12 distinct instances, no instance twice over the cine
    uids = [f.sop_instance_uid for frames in cine.sources for f in frames]
    assert len(set(uids)) == 240
    # slices follow the normal, at every time point the same positions
    for t in (0, 7, 19):
        z = [
            float(
                np.dot(
                    pydicom.dcmread(f.path, stop_before_pixels=True).ImagePositionPatient,
                    cine.slice_direction,
                )
            )
            for f in cine.sources[t]
        ]
        assert np.all(np.diff(z) > 9.9)


def _write_copies(files: Sequence[Path], out: Path, edit: object = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in files:
        ds = pydicom.dcmread(path)
        if callable(edit):
            edit(ds)
        target = out / path.name
        ds.save_as(target)
        written.append(target)
    return written


def test_one_series_per_slice_location(files: list[Path], cine: Volume, tmp_path: Path) -> None:
    """A cine acquired as one series per slice location, gathered by a study-level rule."""
    by_location: dict[str, str] = {}

    def split(ds: Dataset) -> None:
        key = f"{float(ds.SliceLocation):.2f}"
        by_location.setdefault(key, f"1.2.826.0.1.3680043.8.498.7{len(by_location) + 1}")
        ds.SeriesInstanceUID = by_location[key]

    copies = _write_copies(files, tmp_path / "split", split)
    assert len(by_location) == 12
    with pytest.raises(PipelineError) as refused:
        load_series(copies)
    assert refused.value.reason == Reason.MIXED_SERIES
    gathered = load_cine(copies, min_phases=5, min_slices=3)
    assert gathered.voxels.shape == cine.voxels.shape
    assert np.array_equal(gathered.voxels, cine.voxels)
    assert [f.path.name for f in gathered.sources[7]] == [f.path.name for f in cine.sources[7]]
    assert any("12 series of one study gathered" in n for n in gathered.notes)


def test_refusals(files: list[Path], tmp_path: Path) -> None:
    def reason(paths: Sequence[Path], **kwargs: int) -> str:
        with pytest.raises(PipelineError) as refused:
            load_cine(paths, kwargs.get("min_phases", 5), 3)
        return refused.value.reason

    # one time point: images 1, 21, 41, ... (phase 1 of each slice)
    first_phase = [p for p in files if (int(p.stem) - 1) % 20 == 0]
    assert len(first_phase) == 12
    assert reason(first_phase) == "not_cine"
    three_phases = [p for p in files if (int(p.stem) - 1) % 20 < 3]
    assert reason(three_phases) == "too_few_phases"
    assert load_cine(three_phases, 3, 3).n_times == 3
    ct = _write_copies(files[:40], tmp_path / "ct", lambda ds: setattr(ds, "Modality", "CT"))
    assert reason(ct) == "unsupported_modality"
    other_study = _write_copies(
        files[:20],
        tmp_path / "study",
        lambda ds: setattr(ds, "StudyInstanceUID", "1.2.826.0.1.3680043.8.498.99"),
    )
    assert reason(files[20:60] + other_study) == Reason.MIXED_SERIES


def test_parameters() -> None:
    p = parse_parameters({"phases": "ed_es", "ed_phase": "3", "tta": "yes"})
    assert (p.phases, p.ed_phase, p.es_phase, p.tta, p.min_phases) == ("ed_es", 3, None, True, 5)
    for bad in (
        {"phases": "some"},
        {"ed_phase": -1},
        {"overlap": 1.0},
        {"backend": "x"},
        {"colour": 1},
        {"ed_phase": 3, "es_phase": "3"},
    ):
        with pytest.raises(PipelineError) as refused:
            parse_parameters(bad)
        assert refused.value.reason == "invalid_parameter"


# -- contours -----------------------------------------------------------------------------------------


def test_contours_located(cine: Volume, contours: list[sunnybrook.ContouredImage]) -> None:
    assert len(contours) == 18 and sum(c.outer is not None for c in contours) == 9
    where = sunnybrook.locate(cine, contours)
    # Sunnybrook contours ED (endo + epicardium) at time point 19 and ES (endocardium) at 8, slices 2-10
    assert {where[c.image_number][0] for c in contours if c.outer is not None} == {18}
    assert {where[c.image_number][0] for c in contours if c.outer is None} == {7}
    assert sorted(where[c.image_number][1] for c in contours if c.outer is None) == list(range(1, 10))


def test_rasterise_matches_polygon_area(contours: list[sunnybrook.ContouredImage]) -> None:
    for image in contours:
        mask = sunnybrook.rasterise(image.inner, (256, 256))
        area = shoelace(image.inner)
        assert abs(int(mask.sum()) - area) <= 0.05 * area + 10, image.image_number
    square = np.array([[10.0, 10.0], [19.0, 10.0], [19.0, 19.0], [10.0, 19.0]])
    assert sunnybrook.rasterise(square, (32, 32)).sum() == 9 * 9  # centres 10..18 inside, 19 on the edge


# -- function -----------------------------------------------------------------------------------------


def test_function_from_contours(
    cine: Volume, contours: list[sunnybrook.ContouredImage], reference: dict[int, np.ndarray]
) -> None:
    voxel_ml = voxel_volume_ml(cine.spacing)
    assert voxel_ml == pytest.approx(10.0 * 1.367188**2 / 1000, rel=1e-4)
    volumes = [phase_volumes(labels, VALUES, voxel_ml, t) for t, labels in sorted(reference.items())]
    assert pick_ed_es(volumes) == (18, 7)
    for labels in reference.values():  # the post-processing leaves a plausible heart (nearly) as it is
        changed = clean_labels(labels, VALUES) != labels
        assert changed.sum() <= 10 and set(np.unique(labels[changed])) <= {MYO}  # specks of a thin ring
    f = cardiac_function(volumes)
    where = sunnybrook.locate(cine, contours)
    pixel_ml = cine.spacing[1] * cine.spacing[2] * cine.spacing[0] / 1000
    edv = sum(shoelace(c.inner) for c in contours if where[c.image_number][0] == 18) * pixel_ml
    esv = sum(shoelace(c.inner) for c in contours if where[c.image_number][0] == 7) * pixel_ml
    epi = sum(shoelace(c.outer) for c in contours if c.outer is not None) * pixel_ml
    print(f"Sunnybrook SC-HF-I-1 from manual contours: {f.as_dict()}")
    assert f.lv_edv_ml == pytest.approx(edv, rel=0.03)
    assert f.lv_esv_ml == pytest.approx(esv, rel=0.03)
    assert f.lv_sv_ml == pytest.approx(f.lv_edv_ml - f.lv_esv_ml)
    assert f.lv_ef_percent == pytest.approx(100 * (edv - esv) / edv, abs=1.5)
    assert 15 < f.lv_ef_percent < 40  # a heart-failure patient with infarction
    assert f.lv_mass_g == pytest.approx((epi - edv) * MYOCARDIAL_DENSITY_G_PER_ML, rel=0.05)
    assert f.lv_mass_g == pytest.approx(f.lv_myocardium_ed_ml * 1.05)
    assert (f.rv_edv_ml, f.rv_esv_ml) == (0.0, 0.0) and np.isnan(f.rv_ef_percent)  # no RV contours


def test_ed_es_choice() -> None:
    curve = [120, 125, 110, 80, 60, 55, 58, 70, 100, 118]
    volumes = [PhaseVolumes(t, rv_ml=v * 0.9, myo_ml=90, lv_ml=v) for t, v in enumerate(curve)]
    assert pick_ed_es(volumes) == (1, 5)
    f = cardiac_function(volumes)
    assert (f.lv_edv_ml, f.lv_esv_ml, f.rv_edv_ml) == (125, 55, pytest.approx(112.5))
    assert f.lv_ef_percent == pytest.approx(56.0)
    assert cardiac_function(volumes, ed=0, es=4).lv_esv_ml == 60
    flat = [PhaseVolumes(t, 1, 1, 50) for t in range(5)]
    with pytest.raises(PipelineError) as refused:
        pick_ed_es(flat)
    assert refused.value.reason == "no_contraction"
    with pytest.raises(PipelineError) as refused:
        pick_ed_es([PhaseVolumes(t, 0, 0, 0) for t in range(5)])
    assert refused.value.reason == "no_left_ventricle"


def test_clean_labels() -> None:
    labels = np.zeros((4, 32, 32), dtype=np.uint8)
    labels[1:3, 8:20, 8:20] = MYO
    labels[1:3, 10:18, 10:18] = LV
    labels[1:3, 13:15, 13:15] = MYO  # a papillary muscle inside the cavity: belongs to the blood pool
    labels[0, 28:30, 28:30] = LV  # a stray island
    labels[0:4, 0:6, 22:32] = LV  # larger than the cavity, but away from the myocardium (chest-wall fat)
    labels[3, 0:3, 0:3] = RV
    labels[1, 25:28, 0:4] = RV  # the larger RV component
    cleaned = clean_labels(labels, VALUES)
    assert cleaned[0, 28, 28] == 0 and not cleaned[:, 0:6, 22:32].any()
    assert (cleaned == LV).sum() == 2 * 8 * 8
    assert (cleaned[1:3, 13:15, 13:15] == LV).all()
    assert cleaned[3, 1, 1] == 0 and (cleaned[1, 25:28, 0:4] == RV).all()
    assert (cleaned[1:3, 8, 8:20] == MYO).all()
    assert largest_component(np.zeros((3, 3), dtype=bool)).sum() == 0
    assert not clean_labels(np.zeros((2, 8, 8), dtype=np.uint8), VALUES).any()


def test_clean_labels_on_the_bounding_box_equals_the_whole_image() -> None:
    """clean_labels works on the labelled voxels' bounding box; the result is what the whole image gives."""
    from pipelines.mri_cardiac.function import _clean_box

    rng = np.random.default_rng(3)
    _zz, yy, xx = np.mgrid[:6, :96, :96]
    for trial in range(12):
        cy, cx = (int(v) for v in rng.integers(20, 76, 2))
        r = np.hypot(yy - cy, xx - cx)
        labels = np.zeros((6, 96, 96), dtype=np.uint8)
        labels[r < 8] = LV
        labels[(r >= 8) & (r < 12)] = MYO
        labels[(np.hypot(yy - cy, xx - cx - 16) < 10) & (labels == 0)] = RV
        speckle = (rng.random(labels.shape) < 0.05) & (r < 24)  # holes and islands near the heart
        labels[speckle] = rng.integers(0, 4, int(speckle.sum()))
        if trial % 3 == 0:  # islands far away, up to the image border
            far = rng.random(labels.shape) < 0.001
            labels[far] = rng.integers(1, 4, int(far.sum()))
        if trial == 1:
            labels[:, :4, :4] = LV
        assert (clean_labels(labels, VALUES) == _clean_box(labels, VALUES)).all(), trial


# -- model contract (manifest) ------------------------------------------------------------------------


def test_model_spec_from_manifest(tmp_path: Path) -> None:
    spec = model_spec(Bundle(tmp_path, manifest()))
    assert (spec.slice_axis, spec.patch, spec.spacing) == (2, (224, 224), (1.5625, 1.5625, 10.0))
    assert spec.values == VALUES and spec.normalisation == "zscore" and spec.activation == "softmax"
    three_d = model_spec(
        Bundle(tmp_path, manifest(input__patch_size=[160, 160, 16], output__patch_size=[160, 160, 16]))
    )
    assert (three_d.slice_axis, three_d.patch) == (None, (160, 160, 16))
    for bad in (
        {"modality": ["CT"], "input__normalisation": {"CT": {"method": "zscore", "description": "x"}}},
        {"output__activation": "sigmoid"},
        {"input__normalisation": {"MR": {"method": "percentile", "description": "x"}}},
        {"output__channels": 3},
        {"labels": ACDC_LABELS[:2]},
    ):
        with pytest.raises(PipelineError) as refused:
            model_spec(Bundle(tmp_path, manifest(**bad)))
        assert refused.value.reason == "model_incompatible", bad


def test_labels_by_name_when_codes_differ() -> None:
    labels = manifest(
        labels=[
            {"value": 1, "name": "RV", "category": STRUCTURE, "type": code("SCT", "80891009", "Heart")},
            {"value": 2, "name": "MYO", "category": STRUCTURE, "type": code("SCT", "80891009", "Heart")},
            {
                "value": 3,
                "name": "LV",
                "category": STRUCTURE,
                "type": code("SCT", "87878005", "Left ventricle"),
            },
        ]
    ).labels
    found = structure_labels(labels)
    assert {s: f.value for s, f in found.items()} == VALUES
    assert found[Structure.MYO].spec.type.value == "80891009"  # the manifest's code is what the SEG gets


def test_normalise_and_resample() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(300, 40, (50, 40, 6)).astype(np.float32)
    z = normalise(image, "zscore")
    assert float(z.mean()) == pytest.approx(0, abs=1e-5) and float(z.std()) == pytest.approx(1, abs=1e-4)
    try:
        from trainer.data import normalise as trainer_normalise  # the reference this reimplements
    except ImportError:
        pass
    else:
        ref = trainer_normalise(image[None], {"channels": [{"method": "zscore"}]})[0]
        assert np.allclose(z, ref, atol=1e-5)
    out = resample_image(image, (1.367188, 1.367188, 10.0), (1.5625, 1.5625, 10.0), (0, 1))
    assert out.shape == (round(50 * 1.367188 / 1.5625), round(40 * 1.367188 / 1.5625), 6)
    # slice by slice (the slice axis is not resampled) gives the cubic 3D zoom the trainer uses
    zoom = [n / s for n, s in zip(out.shape, image.shape, strict=True)]
    reference = ndimage.zoom(image, zoom, order=3, mode="nearest")
    assert out.dtype == np.float32 and np.allclose(out, reference, atol=1e-3)
    both = resample_image(image, (1.367188, 1.367188, 10.0), (1.5625, 1.5625, 8.0), (0, 1, 2))
    assert both.shape == (*out.shape[:2], round(6 * 10.0 / 8.0))
    both_zoom = [n / s for n, s in zip(both.shape, image.shape, strict=True)]
    assert np.allclose(both, ndimage.zoom(image, both_zoom, order=3, mode="nearest"), atol=1e-3)


def test_first_argmax_is_numpy_argmax() -> None:
    rng = np.random.default_rng(1)
    scores = rng.random((4, 5, 6, 7)).astype(np.float32)
    scores[2, :2] = scores[1, :2]  # ties: the first channel wins, as with numpy
    scores[3, 4] = scores[0, 4]
    labels = first_argmax(scores)
    assert labels.dtype == np.uint8 and (labels == scores.argmax(axis=0)).all()


# -- SEG and SR from the contour masks ----------------------------------------------------------------


def dciodvfy(path: Path) -> list[str]:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy is not installed (make test installs dicom3tools with apt-get)")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def unexplained(errors: list[str]) -> list[str]:
    """Errors other than those about Sunnybrook's source UIDs with leading zeros, which a result must
    reference as the archive holds them."""
    out = []
    for line in errors:
        match = re.search(r"UI \[\d+\] = <([^>]*)> - Leading zeroes", line)
        if match and not is_valid_uid(match.group(1)):
            continue
        if line == "Error - Dicom dataset contains invalid data values for Value Representations":
            continue
        out.append(line)
    return out


def test_seg_and_sr_from_contours(cine: Volume, reference: dict[int, np.ndarray], tmp_path: Path) -> None:
    voxel_ml = voxel_volume_ml(cine.spacing)
    volumes = [phase_volumes(labels, VALUES, voxel_ml, t) for t, labels in sorted(reference.items())]
    function = cardiac_function(volumes)
    found = structure_labels(manifest().labels)
    identity = OutputIdentity(cine.series_instance_uid, "mri-cardiac", "mri-cardiac=test", "1")
    algorithm = Algorithm(name="manual contours (test)", version="0")
    notes: list[str] = []

    def write(out: Path) -> list[Path]:
        return write_outputs(
            cine,
            reference,
            function,
            VALUES,
            {s: found[s].spec for s in SEGMENT_ORDER},
            algorithm=algorithm,
            identity=identity,
            output_dir=out,
            notes=notes,
        )

    files = write(tmp_path / "a")
    assert [p.name for p in files] == [
        "mri-cardiac-seg-ed.dcm",
        "mri-cardiac-seg-es.dcm",
        "mri-cardiac-sr.dcm",
    ]
    assert any("not valid UI values" in n for n in notes)
    for path in files:
        assert unexplained(dciodvfy(path)) == [], path.name

    for path, t in zip(files[:2], (18, 7), strict=True):
        seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(path))
        sources = {f.sop_instance_uid for f in cine.sources[t]}
        referenced = {
            item.ReferencedSOPInstanceUID
            for s in seg.ReferencedSeriesSequence
            for item in s.ReferencedInstanceSequence
        }
        assert referenced == sources  # that phase's 12 instances, and only those
        assert [s.SegmentLabel for s in seg.SegmentSequence] == [
            "Right ventricle",
            "LV myocardium",
            "LV cavity",
        ]
        types = [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence]
        assert types == ["53085002", "49848007", "87878005"]
        assert str(seg.StudyInstanceUID) == cine.study_instance_uid
        # voxel-exact read-back, in the volume's slice order
        uids = [(f.sop_instance_uid,) for f in cine.sources[t]]
        labelmap = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[u[0] for u in uids], segment_numbers=[1, 2, 3], combine_segments=True
        )
        assert np.array_equal(labelmap, reference[t])

    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(files[2]))
    values: dict[str, tuple[float, str]] = {}
    for item in sr.ContentSequence:
        for group in getattr(item, "ContentSequence", []):
            for entry in getattr(group, "ContentSequence", []):
                if entry.ValueType == "NUM":
                    name = entry.ConceptNameCodeSequence[0].CodeMeaning
                    value = entry.MeasuredValueSequence[0]
                    key = (
                        f"{next(g.TextValue for g in group.ContentSequence if g.ValueType == 'TEXT')}: {name}"
                    )
                    values[key] = (float(value.NumericValue), value.MeasurementUnitsCodeSequence[0].CodeValue)
    print(*sorted(values.items()), sep="\n")
    assert values["Left ventricle function: Left Ventricular ED Volume"] == (
        pytest.approx(function.lv_edv_ml, abs=1e-3),
        "ml",
    )
    assert values["Left ventricle function: Left Ventricular ES Volume"] == (
        pytest.approx(function.lv_esv_ml, abs=1e-3),
        "ml",
    )
    assert values["Left ventricular myocardium: Left Ventricle Mass"] == (
        pytest.approx(function.lv_mass_g, abs=1e-3),
        "g",
    )
    assert values["Left ventricle function: Left ventricular ejection fraction by MR"] == (
        pytest.approx(function.lv_ef_percent, abs=1e-3),
        "%",
    )
    assert values["Left ventricle function: Stroke Volume"][0] == pytest.approx(function.lv_sv_ml, abs=1e-3)
    assert values["LV cavity at ED: Volume"] == (pytest.approx(function.lv_edv_ml, abs=1e-3), "ml")
    assert values["LV myocardium at ED: Volume"] == (
        pytest.approx(function.lv_myocardium_ed_ml, abs=1e-3),
        "ml",
    )
    assert values["Right ventricle at ES: Volume"] == (0.0, "ml")
    groups = sr.content.get_volumetric_roi_measurement_groups()
    refs = {
        (g.referenced_segment.referenced_sop_instance_uid, g.referenced_segment.referenced_segment_numbers[0])
        for g in groups
    }  # type: ignore[union-attr]
    seg_uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files[:2]]
    assert refs == {(u, n) for u in seg_uids for n in (1, 2, 3)}

    again = write(tmp_path / "b")  # deterministic UIDs: a re-run replaces, never duplicates
    for first, second in zip(files, again, strict=True):
        a, b = (pydicom.dcmread(p, stop_before_pixels=True) for p in (first, second))
        assert (a.SeriesInstanceUID, a.SOPInstanceUID) == (b.SeriesInstanceUID, b.SOPInstanceUID)


def test_pipeline_refusals(files: list[Path], tmp_path: Path) -> None:
    def run(paths: Sequence[Path], **parameters: object) -> str:
        request = PipelineRequest(
            series_files=paths,
            output_dir=tmp_path / "out",
            models_dir=tmp_path / "models",
            parameters=parameters,
        )
        with pytest.raises(PipelineError) as refused:
            MriCardiacPipeline().run(request)
        return refused.value.reason

    assert run([p for p in files if (int(p.stem) - 1) % 20 == 0]) == "not_cine"
    assert run(files, ed_phase=20) == "invalid_parameter"
    request = PipelineRequest(series_files=files, output_dir=tmp_path / "out", models_dir=tmp_path / "models")
    with pytest.raises(PipelineError) as refused:
        MriCardiacPipeline().run(request)
    assert refused.value.reason == "model_missing"
    assert "segnode models install mri-cardiac" in refused.value.message
    assert not (tmp_path / "out").exists()


def test_agreement_mechanics(
    cine: Volume, contours: list[sunnybrook.ContouredImage], reference: dict[int, np.ndarray]
) -> None:
    """The Dice computation on the contoured images: 1 for the contours themselves, lower when the
    cavity is eroded by a pixel, and the myocardium gains what the cavity lost."""
    from scipy import ndimage

    stack = np.zeros(cine.voxels.shape, dtype=np.uint8)
    for t, labels in reference.items():
        stack[t] = labels
    exact = sunnybrook.agreement(cine, stack, contours, lv_value=LV, myo_value=MYO)
    assert len(exact.images) == 18 and exact.lv_dice == 1.0 and exact.myo_dice == 1.0
    eroded = stack.copy()
    for t in reference:
        for k in range(stack.shape[1]):
            cavity = stack[t, k] == LV
            shrunk = ndimage.binary_erosion(cavity)
            eroded[t, k][cavity & ~shrunk] = MYO
    worse = sunnybrook.agreement(cine, eroded, contours, lv_value=LV, myo_value=MYO)
    assert 0.8 < worse.lv_dice < 0.97 and 0.8 < worse.myo_dice < 0.99
    at_es = [row for row in worse.images if row.time_point == 7]
    assert len(at_es) == 9 and all(row.myo_dice is None for row in at_es)


def test_outputs_for_one_series_per_slice_location(
    files: list[Path], reference: dict[int, np.ndarray], tmp_path: Path
) -> None:
    """Slices from 12 series: one SEG per series and phase (a SEG references one series), one SR."""
    by_location: dict[str, str] = {}

    def split(ds: Dataset) -> None:
        key = f"{float(ds.SliceLocation):.2f}"
        by_location.setdefault(key, f"1.2.826.0.1.3680043.8.498.8{len(by_location) + 1}")
        ds.SeriesInstanceUID = by_location[key]

    gathered = load_cine(_write_copies(files, tmp_path / "split", split), min_phases=5, min_slices=3)
    volumes = [
        phase_volumes(labels, VALUES, voxel_volume_ml(gathered.spacing), t) for t, labels in reference.items()
    ]
    function = cardiac_function(volumes)
    found = structure_labels(manifest().labels)
    notes: list[str] = []
    written = write_outputs(
        gathered,
        reference,
        function,
        VALUES,
        {s: found[s].spec for s in SEGMENT_ORDER},
        algorithm=Algorithm(name="manual contours (test)", version="0"),
        identity=OutputIdentity(gathered.series_instance_uid, "mri-cardiac", "mri-cardiac=test", "1"),
        output_dir=tmp_path / "out",
        notes=notes,
    )
    assert len(written) == 2 * 12 + 1 and written[-1].name == "mri-cardiac-sr.dcm"
    assert "ED: the slices come from 12 series, one SEG each" in notes
    seg_uids = set()
    for path in written[:-1]:
        seg = pydicom.dcmread(path, stop_before_pixels=True)
        assert (
            len(seg.ReferencedSeriesSequence) == 1
            and len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 1
        )
        seg_uids.add(str(seg.SOPInstanceUID))
    assert len(seg_uids) == 24
    assert unexplained(dciodvfy(written[0])) == [] and unexplained(dciodvfy(written[-1])) == []
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(written[-1]))
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert {g.referenced_segment.referenced_sop_instance_uid for g in groups} == seg_uids  # type: ignore[union-attr]
    lv_ed = sum(
        float(m.value)
        for g in groups
        if g.tracking_identifier.startswith("LV cavity at ED")  # type: ignore[union-attr]
        for m in g.get_measurements()
    )
    assert lv_ed == pytest.approx(function.lv_edv_ml, abs=0.01)
