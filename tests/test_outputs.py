"""DICOM-SEG and SR outputs (pipelines/outputs), read back by the readers that viewers use.

Every SEG written here is checked with dciodvfy (dicom3tools), read back voxel by voxel with dcmqi's
``segimage2itkimage`` (3D Slicer's reader) and with ``@cornerstonejs/adapters`` in node (OHIF's
reader), and compared element by element with what plain ``highdicom.seg.Segmentation`` makes of
the same input. Sources: generated CT series and real data from ../shared/data (GE CT slices with a
manual liver SEG, a Brainlab SEG on 23x38 crops, the Sunnybrook cine MR with its UID/date quirks).
"""

from __future__ import annotations

import copy
import gzip
import json
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pipelines.base import PipelineError
from pipelines.outputs import (
    LIVER,
    LIVER_LESION,
    SEGNODE_MANUFACTURER,
    Algorithm,
    OutputIdentity,
    SegmentMeasurement,
    SegmentSpec,
    SegResult,
    derive_uid,
    is_segnode_output,
    write_measurement_report,
    write_seg,
)
from pipelines.outputs.uids import is_valid_uid
from tests.conftest import REPO, SHARED
from tests.factories import SeriesSpec, ct_series

pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),  # Sunnybrook's UIDs, as pydicom reads them
    pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name"),
]

JS = REPO / "tests" / "js"
ALGORITHM = Algorithm(name="test-net", version="1.2.3")
LEFT_VENTRICLE = SegmentSpec("Left ventricle", codes.cid7150.AnatomicalStructure, codes.cid7151.LeftVentricle)
RIGHT_VENTRICLE = SegmentSpec(
    "Right ventricle", codes.cid7150.AnatomicalStructure, codes.cid7151.RightVentricle
)
# Times and one highdicom timestamp legitimately differ between two constructions of one object.
_VOLATILE = {
    "ContentTime",
    "ContentDate",
    "InstanceCreationTime",
    "InstanceCreationDate",
    "ContributionDateTime",
}


def identity(rule_version: str = "1", series: str = "1.2.826.0.1.3680043.8.498.1") -> OutputIdentity:
    return OutputIdentity(
        source_series_uid=series, pipeline="ct-liver", model_version="0.3", rule_version=rule_version
    )


# -- cases: every SEG the reader tests check --------------------------------------------------------


@dataclass
class Case:
    name: str
    result: SegResult
    sources: list[Dataset]  # in the order given to write_seg
    masks: np.ndarray  # (segments, slices, rows, cols) bool, slices in that order
    labels: list[str]
    kwargs: dict[str, Any]  # what write_seg got, to rebuild with method="highdicom"


def _headers(datasets: Sequence[Dataset]) -> list[Dataset]:
    out = []
    for ds in datasets:
        header = copy.copy(ds)
        if "PixelData" in header:
            del header.PixelData
        out.append(header)
    return out


def _ball(
    shape: tuple[int, int, int], centre: tuple[float, float, float], radii: tuple[float, float, float]
) -> np.ndarray:
    z, y, x = np.indices(shape)
    return ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + (
        (x - centre[2]) / radii[2]
    ) ** 2 <= 1


def _write(
    name: str,
    folder: Path,
    sources: list[Dataset],
    masks: np.ndarray,
    segments: list[SegmentSpec],
    expected: np.ndarray,
    **kwargs: Any,
) -> Case:
    args = dict(algorithm=ALGORITHM, identity=identity(series=str(sources[0].SeriesInstanceUID)), **kwargs)
    result = write_seg(sources, masks, segments, out_path=folder / f"{name}.dcm", **args)
    return Case(
        name,
        result,
        sources,
        expected,
        [s.label for s in segments],
        dict(args, segments=segments, masks=masks),
    )


def _synthetic(folder: Path) -> Iterator[Case]:
    sources = _headers(ct_series(SeriesSpec(n=10, size=32)))
    liver = _ball((10, 32, 32), (4.5, 15, 16), (4, 10, 12))
    lesion = _ball((10, 32, 32), (5, 13, 18), (2, 3, 3))
    stack = np.stack([liver, lesion])  # the lesion lies in the liver: segments overlap
    yield _write(
        "synthetic_overlap",
        folder,
        sources,
        stack,
        [LIVER, LIVER_LESION],
        stack,
        series_number=42,
        series_description="AI liver",
    )
    # A label map, sources in reverse file order (masks reversed with them).
    sources = _headers(ct_series(SeriesSpec(n=9, size=24)))
    labels = np.zeros((9, 24, 24), np.uint8)
    labels[_ball((9, 24, 24), (4, 12, 12), (3, 8, 9))] = 1
    labels[_ball((9, 24, 24), (4, 10, 14), (1, 2, 2))] = 2
    reverse = list(reversed(sources))
    expected = np.stack([labels == 1, labels == 2])[:, ::-1]
    yield _write("labelmap_reversed", folder, reverse, labels[::-1].copy(), [LIVER, LIVER_LESION], expected)
    # The lesion segment is empty; then both are.
    sources = _headers(ct_series(SeriesSpec(n=6, size=16)))
    stack = np.zeros((2, 6, 16, 16), bool)
    stack[0, 2:5, 4:12, 3:10] = True
    yield _write("empty_lesion", folder, sources, stack, [LIVER, LIVER_LESION], stack)
    sources = _headers(ct_series(SeriesSpec(n=4, size=16)))
    stack = np.zeros((2, 4, 16, 16), bool)
    yield _write("all_empty", folder, sources, stack, [LIVER, LIVER_LESION], stack)


def _read_headers(paths: Sequence[Path]) -> list[Dataset]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def _reference_masks(seg_path: Path, sources: Sequence[Dataset]) -> np.ndarray:
    """(segments, slices, rows, cols) of an existing SEG, slices in the order of ``sources``."""
    seg = hd.seg.segread(seg_path)
    pixels = seg.get_pixels_by_source_instance(
        [str(s.SOPInstanceUID) for s in sources], combine_segments=False, ignore_spatial_locations=True
    )
    return np.moveaxis(pixels, -1, 0).astype(bool)


def _real(folder: Path) -> Iterator[tuple[str, Case | str]]:
    data = SHARED / "liver" / "dcmqi_ct3slice_seg" / "data" / "segmentations"
    if data.exists():
        # Three real GE CT slices with a manual liver SEG: the same liver segment, written by us.
        sources = _read_headers(sorted((data / "ct-3slice").glob("*.dcm")))
        masks = _reference_masks(data / "liver.dcm", sources)
        yield "ct3slice_liver", _write("ct3slice_liver", folder, sources, masks, [LIVER], masks)
        # 23 x 38 crops (frames do not end on a byte boundary) with a Brainlab SEG.
        sources = _read_headers(sorted((data / "23x38x3" / "image").glob("*.dcm")))
        masks = _reference_masks(data / "23x38x3" / "seg" / "label.seg", sources)
        yield "crop_23x38", _write("crop_23x38", folder, sources, masks, [LIVER], masks)
    else:
        absent = f"real data {data} is absent (../shared/data is provided in CI and dev machines)"
        yield "ct3slice_liver", absent
        yield "crop_23x38", absent
    sunnybrook = SHARED / "cardiac" / "sunnybrook" / "SCD0000101" / "dicom"
    if sunnybrook.exists():
        yield "sunnybrook", _write_sunnybrook(folder, sunnybrook)
    else:
        yield (
            "sunnybrook",
            f"real data {sunnybrook} is absent (../shared/data is provided in CI and dev machines)",
        )


def sunnybrook_stack(folder: Path) -> list[Dataset]:
    """The first cine phase: at each slice position the image with the earliest trigger time."""
    by_position: dict[tuple[float, ...], Dataset] = {}
    for header in _read_headers(sorted(folder.glob("*.dcm"))):
        key = tuple(round(float(v), 2) for v in header.ImagePositionPatient)
        if key not in by_position or float(header.TriggerTime) < float(by_position[key].TriggerTime):
            by_position[key] = header
    return sorted(by_position.values(), key=lambda h: int(h.InstanceNumber))


def _write_sunnybrook(folder: Path, sunnybrook: Path) -> Case:
    sources = sunnybrook_stack(sunnybrook)
    n = len(sources)
    labels = np.zeros((n, 256, 256), np.uint8)
    labels[2 : n - 2][:, 100:140, 110:150] = 1
    labels[3 : n - 3][:, 100:130, 160:190] = 2
    expected = np.stack([labels == 1, labels == 2])
    return _write("sunnybrook", folder, sources, labels, [LEFT_VENTRICLE, RIGHT_VENTRICLE], expected)


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case | str]:
    folder = tmp_path_factory.mktemp("seg")
    out: dict[str, Case | str] = {case.name: case for case in _synthetic(folder)}
    out.update(_real(folder))
    return out


CASES = [
    "synthetic_overlap",
    "labelmap_reversed",
    "empty_lesion",
    "all_empty",
    "ct3slice_liver",
    "crop_23x38",
    "sunnybrook",
]


def get_case(cases: dict[str, Case | str], name: str) -> Case:
    case = cases[name]
    if isinstance(case, str):
        pytest.skip(case)
    return case


# -- dciodvfy -----------------------------------------------------------------------------------------


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy is not installed (make test installs dicom3tools with apt-get)")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")], [
        line for line in lines if line.startswith("Warning")
    ]


def invalid_source_uid_errors(errors: list[str], sources: Sequence[Dataset]) -> list[str]:
    """Errors that are only about source UIDs the SEG must reference as the archive holds them."""
    uids = {
        str(s.get(k)) for s in sources for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    }
    invalid = {uid for uid in uids if not is_valid_uid(uid)}
    allowed = []
    for line in errors:
        match = re.search(r"UI \[\d+\] = <([^>]*)> - Leading zeroes", line)
        if (match and match.group(1) in invalid) or line == (
            "Error - Dicom dataset contains invalid data values for Value Representations"
        ):
            allowed.append(line)
    return allowed


@pytest.mark.parametrize("name", CASES)
def test_seg_passes_dciodvfy(cases: dict[str, Case | str], name: str) -> None:
    case = get_case(cases, name)
    errors, warnings_ = dciodvfy(case.result.path)
    print(f"dciodvfy {name}: {len(warnings_)} warning(s)", *sorted(set(warnings_)), sep="\n  ")
    unexplained = sorted(set(errors) - set(invalid_source_uid_errors(errors, case.sources)))
    assert unexplained == []
    if errors:  # only the Sunnybrook sources carry invalid UIDs, and the notes say so
        assert any("not valid UI values" in note for note in case.result.notes)


# -- dcmqi (3D Slicer's reader) ---------------------------------------------------------------------


def read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(voxels [k, j, i], origin, axis vectors) of a NRRD as dcmqi writes them (LPS, gzip or raw)."""
    head, _, data = path.read_bytes().partition(b"\n\n")
    fields: dict[str, str] = {}
    for line in head.decode().splitlines()[1:]:
        if line.startswith("#") or ":=" in line or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    assert fields["space"] == "left-posterior-superior"
    dtype = {"short": "<i2", "unsigned short": "<u2", "ushort": "<u2", "unsigned char": "u1", "uchar": "u1"}[
        fields["type"]
    ]
    if fields.get("encoding") == "gzip":
        data = gzip.decompress(data)
    sizes = [int(v) for v in fields["sizes"].split()]
    voxels = np.frombuffer(data, dtype).reshape(sizes[::-1])
    vectors = [
        [float(v) for v in vec.split(",")] for vec in re.findall(r"\(([^)]*)\)", fields["space directions"])
    ]
    origin = [float(v) for v in re.findall(r"\(([^)]*)\)", fields["space origin"])[0].split(",")]
    return voxels, np.array(origin), np.array(vectors)


def to_source_grid(
    voxels: np.ndarray, origin: np.ndarray, vectors: np.ndarray, sources: Sequence[Dataset], value: int
) -> np.ndarray:
    """Voxels equal to ``value``, mapped by their patient coordinates onto the sources' grid."""
    first = sources[0]
    out = np.zeros((len(sources), int(first.Rows), int(first.Columns)), bool)
    k, j, i = np.nonzero(voxels == value)
    world = origin + np.outer(i, vectors[0]) + np.outer(j, vectors[1]) + np.outer(k, vectors[2])
    iop = np.array([float(v) for v in first.ImageOrientationPatient])
    row_cosines, column_cosines = iop[:3], iop[3:]
    normal = np.cross(row_cosines, column_cosines)
    positions = np.array([[float(v) for v in s.ImagePositionPatient] for s in sources])
    distance = np.abs((world @ normal)[:, None] - (positions @ normal)[None, :])
    slices = distance.argmin(axis=1)
    assert (distance.min(axis=1) < 0.01).all(), "dcmqi put voxels between source slices"
    relative = world - positions[slices]
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    columns = relative @ row_cosines / column_spacing
    rows = relative @ column_cosines / row_spacing
    assert np.abs(columns - columns.round()).max(initial=0) < 0.01
    assert np.abs(rows - rows.round()).max(initial=0) < 0.01
    out[slices, rows.round().astype(int), columns.round().astype(int)] = True
    return out


def dcmqi_read(path: Path, sources: Sequence[Dataset], labels: list[str], folder: Path) -> np.ndarray:
    tool = shutil.which("segimage2itkimage") or str(Path(sys.executable).parent / "segimage2itkimage")
    if not Path(tool).exists():
        pytest.skip("dcmqi's segimage2itkimage is not installed (pip package dcmqi, in the dev extra)")
    folder.mkdir(parents=True)
    proc = subprocess.run(
        [tool, "--inputDICOM", str(path), "--outputDirectory", str(folder), "--outputType", "nrrd"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    meta = json.loads((folder / "meta.json").read_text())
    first = sources[0]
    read = np.zeros((len(labels), len(sources), int(first.Rows), int(first.Columns)), bool)
    for index, attributes in enumerate(meta["segmentAttributes"], start=1):
        voxels, origin, vectors = read_nrrd(folder / f"{index}.nrrd")
        for attribute in attributes:
            segment = labels.index(attribute["SegmentLabel"])
            read[segment] |= to_source_grid(voxels, origin, vectors, sources, int(attribute["labelID"]))
    return read


@pytest.mark.parametrize("name", CASES)
def test_dcmqi_reads_back_voxel_exact(cases: dict[str, Case | str], name: str, tmp_path: Path) -> None:
    case = get_case(cases, name)
    read = dcmqi_read(case.result.path, case.sources, case.labels, tmp_path / "dcmqi")
    for segment, label in enumerate(case.labels):
        assert np.array_equal(read[segment], case.masks[segment]), f"segment {label} differs"


# -- @cornerstonejs/adapters (OHIF's reader) ---------------------------------------------------------


def image_metadata(ds: Dataset) -> dict[str, Any]:
    return {
        "sopInstanceUID": str(ds.SOPInstanceUID),
        "sopClassUID": str(ds.SOPClassUID),
        "seriesInstanceUID": str(ds.SeriesInstanceUID),
        "studyInstanceUID": str(ds.StudyInstanceUID),
        "frameOfReferenceUID": str(ds.get("FrameOfReferenceUID", "")),
        "modality": str(ds.Modality),
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "imagePositionPatient": [float(v) for v in ds.ImagePositionPatient],
        "imageOrientationPatient": [float(v) for v in ds.ImageOrientationPatient],
        "pixelSpacing": [float(v) for v in ds.PixelSpacing],
        "sliceThickness": float(ds.get("SliceThickness", 0) or 0),
    }


@pytest.fixture(scope="module")
def cornerstone(cases: dict[str, Case | str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every case read in one node process (importing the adapters takes seconds)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    if not (JS / "node_modules" / "@cornerstonejs" / "adapters").exists():
        pytest.skip("tests/js/node_modules is absent: run `npm ci --prefix tests/js --no-audit --no-fund`")
    folder = tmp_path_factory.mktemp("cornerstone")
    jobs = [
        {
            "name": case.name,
            "seg": str(case.result.path),
            "out": str(folder / case.name),
            "images": [image_metadata(s) for s in case.sources],
        }
        for case in cases.values()
        if isinstance(case, Case)
    ]
    (folder / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run(
        [node, str(JS / "read_seg.mjs"), str(folder / "jobs.json")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=JS,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(json.loads(proc.stdout))


@pytest.mark.parametrize("name", CASES)
def test_cornerstone_reads_back_voxel_exact(
    cases: dict[str, Case | str], cornerstone: dict[str, Any], name: str
) -> None:
    case = get_case(cases, name)
    result = cornerstone[name]
    assert "error" not in result, result.get("error")
    assert [s["label"] for s in result["segments"]] == case.labels
    dtype = {1: np.uint8, 2: np.uint16}[result["bytesPerVoxel"]]
    layers = [np.fromfile(f, dtype).reshape(case.masks.shape[1:]) for f in result["files"]]
    for segment in range(len(case.labels)):
        read = np.zeros(case.masks.shape[1:], bool)
        for layer in layers:
            read |= layer == segment + 1
        assert np.array_equal(read, case.masks[segment]), f"segment {case.labels[segment]} differs"
    assert result["overlapping"] == case.result.segments_overlap


# -- the same object as plain highdicom ----------------------------------------------------------------


def differences(a: Dataset, b: Dataset, path: str = "") -> list[str]:
    out = [
        f"{path}{tag} only in {'ours' if tag in a else 'highdicom'}"
        for tag in sorted(set(a.keys()) ^ set(b.keys()))
    ]
    for tag in sorted(set(a.keys()) & set(b.keys())):
        ea, eb = a[tag], b[tag]
        if ea.keyword in _VOLATILE:
            continue
        if ea.VR == "SQ":
            if len(ea.value) != len(eb.value):
                out.append(f"{path}{ea.keyword}: {len(ea.value)} != {len(eb.value)} items")
                continue
            for index, (x, y) in enumerate(zip(ea.value, eb.value, strict=True)):
                out += differences(x, y, f"{path}{ea.keyword}[{index}].")
        elif ea.keyword == "PixelData":
            # highdicom pads odd-length pixel data with b"0"; PS3.5 wants (and we write) b"\0".
            same_length = len(ea.value) == len(eb.value)
            if (
                not same_length
                or ea.value[: len(ea.value) // 2 * 2 - 1] != eb.value[: len(eb.value) // 2 * 2 - 1]
            ):
                out.append(f"{path}PixelData differs")
        elif ea.value != eb.value:
            out.append(f"{path}{ea.keyword}: {str(ea.value)[:60]!r} != {str(eb.value)[:60]!r}")
    return out


@pytest.mark.parametrize("name", CASES)
def test_same_content_as_plain_highdicom(cases: dict[str, Case | str], name: str, tmp_path: Path) -> None:
    case = get_case(cases, name)
    kwargs = dict(case.kwargs)
    reference = write_seg(
        case.sources,
        kwargs.pop("masks"),
        kwargs.pop("segments"),
        out_path=tmp_path / "hd.dcm",
        method="highdicom",
        **kwargs,
    )
    assert reference.sop_instance_uid == case.result.sop_instance_uid
    assert differences(pydicom.dcmread(case.result.path), pydicom.dcmread(reference.path)) == []


# -- content ------------------------------------------------------------------------------------------


def test_seg_content(cases: dict[str, Case | str]) -> None:
    case = get_case(cases, "synthetic_overlap")
    ds = pydicom.dcmread(case.result.path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and ds.Modality == "SEG"
    assert (ds.SegmentationType, ds.BitsAllocated, ds.SegmentsOverlap) == ("BINARY", 1, "YES")
    assert (ds.SeriesNumber, ds.SeriesDescription) == (42, "AI liver")
    assert (ds.Manufacturer, ds.ManufacturerModelName) == (SEGNODE_MANUFACTURER, "ct-liver")
    assert ds.SoftwareVersions and is_segnode_output(ds) and not is_segnode_output(case.sources[0])
    assert ds.StudyInstanceUID == case.sources[0].StudyInstanceUID
    assert ds.FrameOfReferenceUID == case.sources[0].FrameOfReferenceUID
    # Every source instance is referenced, once.
    (series,) = ds.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == case.sources[0].SeriesInstanceUID
    assert sorted(i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence) == sorted(
        s.SOPInstanceUID for s in case.sources
    )
    liver, lesion = ds.SegmentSequence
    code = lambda item: (item.CodingSchemeDesignator, item.CodeValue)  # noqa: E731
    assert code(liver.SegmentedPropertyCategoryCodeSequence[0]) == ("SCT", "91723000")  # Anatomical Structure
    assert code(liver.SegmentedPropertyTypeCodeSequence[0]) == ("SCT", "10200004")  # Liver
    assert code(lesion.SegmentedPropertyCategoryCodeSequence[0]) == ("SCT", "49755003")  # Morph. abnormal
    assert code(lesion.SegmentedPropertyTypeCodeSequence[0]) == ("SCT", "52988006")  # Lesion
    assert code(lesion.AnatomicRegionSequence[0]) == ("SCT", "10200004")
    assert list(liver.RecommendedDisplayCIELabValue) == list(
        hd.color.CIELabColor.from_rgb(221, 130, 101).value
    )
    assert liver.SegmentAlgorithmType == "AUTOMATIC" and liver.SegmentAlgorithmName == "test-net"
    algorithm = liver.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("test-net", "1.2.3")
    assert code(algorithm.AlgorithmFamilyCodeSequence[0]) == ("DCM", "123110")  # Artificial Intelligence
    # Only frames with voxels are stored: one per (segment, slice) that has any.
    expected_frames = int(case.masks.reshape(2, 10, -1).any(axis=2).sum())
    assert ds.NumberOfFrames == expected_frames == case.result.number_of_frames
    assert len(ds.PerFrameFunctionalGroupsSequence) == expected_frames


def test_empty_segments(cases: dict[str, Case | str]) -> None:
    lesion_empty = get_case(cases, "empty_lesion").result
    assert lesion_empty.empty_segments == (2,) and lesion_empty.number_of_frames == 3
    all_empty = get_case(cases, "all_empty").result
    # Nothing to omit when everything is empty: every frame of every segment is stored (as highdicom).
    assert all_empty.empty_segments == (1, 2) and all_empty.number_of_frames == 2 * 4


def test_source_order_does_not_change_the_object(tmp_path: Path) -> None:
    sources = _headers(ct_series(SeriesSpec(n=7, size=16)))
    stack = np.zeros((2, 7, 16, 16), bool)
    stack[0, 1:6, 2:12, 3:9] = True
    stack[1, 3, 5:7, 5:7] = True
    forward = write_seg(
        sources,
        stack,
        [LIVER, LIVER_LESION],
        algorithm=ALGORITHM,
        identity=identity(),
        out_path=tmp_path / "f.dcm",
    )
    shuffle = [3, 0, 6, 2, 5, 1, 4]
    shuffled = write_seg(
        [sources[i] for i in shuffle],
        stack[:, shuffle],
        [LIVER, LIVER_LESION],
        algorithm=ALGORITHM,
        identity=identity(),
        out_path=tmp_path / "s.dcm",
    )
    assert differences(pydicom.dcmread(forward.path), pydicom.dcmread(shuffled.path)) == []


def test_uids_are_deterministic(tmp_path: Path) -> None:
    sources = _headers(ct_series(SeriesSpec(n=3, size=16)))
    stack = np.zeros((1, 3, 16, 16), bool)
    stack[0, 1, 4:8, 4:8] = True
    series = str(sources[0].SeriesInstanceUID)

    def write(rule_version: str, name: str) -> Dataset:
        result = write_seg(
            sources,
            stack,
            [LIVER],
            algorithm=ALGORITHM,
            identity=identity(rule_version, series),
            out_path=tmp_path / name,
        )
        return pydicom.dcmread(result.path)

    first, again, other_rule = write("1", "a.dcm"), write("1", "b.dcm"), write("2", "c.dcm")
    for keyword in ("SeriesInstanceUID", "SOPInstanceUID"):
        assert first[keyword].value == again[keyword].value != other_rule[keyword].value
        assert is_valid_uid(first[keyword].value) and first[keyword].value.startswith("2.25.")
    assert (
        first.DimensionOrganizationSequence[0].DimensionOrganizationUID
        == again.DimensionOrganizationSequence[0].DimensionOrganizationUID
    )
    assert differences(first, again) == []
    for other in (
        OutputIdentity(series, "ct-liver", "0.4", "1"),
        OutputIdentity(series, "mri-cardiac", "0.3", "1"),
        OutputIdentity(series + ".1", "ct-liver", "0.3", "1"),
    ):
        assert other.instance_uid("seg") != identity("1", series).instance_uid("seg")
    assert derive_uid("ab", "c") != derive_uid("a", "bc")
    assert all(len(derive_uid(str(i))) <= 64 and is_valid_uid(derive_uid(str(i))) for i in range(200))


def test_sunnybrook_quirks_are_repaired_and_noted(cases: dict[str, Case | str]) -> None:
    case = get_case(cases, "sunnybrook")
    notes = "\n".join(case.result.notes)
    assert (
        "FrameOfReferenceUID" in notes and "'00000000' is not a valid DA" in notes and "'20120000'" in notes
    )
    assert "not valid UI values" in notes
    ds = pydicom.dcmread(case.result.path, stop_before_pixels=True)
    assert ds.PatientBirthDate == "" and ds.StudyDate == ""
    assert ds.StudyInstanceUID == case.sources[0].StudyInstanceUID  # kept, invalid as it is
    assert ds.FrameOfReferenceUID == case.sources[0].FrameOfReferenceUID
    # The caller's data sets are untouched.
    assert case.sources[0].PatientBirthDate == "00000000"
    assert len({s.FrameOfReferenceUID for s in case.sources}) == len(case.sources)


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # the quirks this test sets up
def test_source_quirks_are_repaired_without_touching_the_sources(tmp_path: Path) -> None:
    sources = _headers(ct_series(SeriesSpec(n=4, size=16)))
    for ds in sources:
        ds.PatientSex, ds.PatientAge, ds.SpecificCharacterSet = "m", "45 years", "ISO_IR 999"
        ds.PatientName = "Müller^Jürgen"
        del ds.FrameOfReferenceUID
    stack = np.zeros((1, 4, 16, 16), bool)
    stack[0, 1:3, 4:9, 4:9] = True
    result = write_seg(
        sources, stack, [LIVER], algorithm=ALGORITHM, identity=identity(), out_path=tmp_path / "q.dcm"
    )
    notes = "\n".join(result.notes)
    assert "PatientAge '45 years' is not a valid AS" in notes and "ISO_IR 192" in notes
    assert "no FrameOfReferenceUID; a derived one is used" in notes
    ds = pydicom.dcmread(result.path)
    assert (ds.PatientSex, ds.PatientAge, ds.SpecificCharacterSet) == ("M", "", "ISO_IR 192")
    assert ds.PatientName == "Müller^Jürgen" and ds.FrameOfReferenceUID == result.frame_of_reference_uid
    assert is_valid_uid(ds.FrameOfReferenceUID)
    assert (sources[0].PatientSex, sources[0].SpecificCharacterSet) == ("m", "ISO_IR 999")
    assert "FrameOfReferenceUID" not in sources[0]
    errors, _ = dciodvfy(result.path)
    assert errors == []


def test_ct3slice_liver_equals_the_manual_seg(cases: dict[str, Case | str]) -> None:
    case = get_case(cases, "ct3slice_liver")
    ours = _reference_masks(case.result.path, case.sources)
    assert np.array_equal(ours, case.masks) and ours.sum() > 100_000
    assert pydicom.dcmread(case.result.path, stop_before_pixels=True).DimensionOrganizationType == "3D"


@pytest.mark.parametrize(
    ("reason", "mutate"),
    [
        ("mixed_series", lambda s, m: ([*s[:2], _other_series(s[2])], m)),
        ("mask_shape", lambda s, m: (s, m[:, :2])),
        ("mask_labels", lambda s, m: (s, m.astype(np.uint8) * 2)),
        ("duplicate_slice_positions", lambda s, m: ([*s[:2], _moved(s[2], s[1])], m)),
        ("source_uid_missing", lambda s, m: ([_without(s[0], "SOPInstanceUID"), *s[1:]], m)),
        ("mixed_orientations", lambda s, m: ([*s[:2], _tilted(s[2])], m)),
    ],
)
def test_input_no_seg_can_be_made_of_is_refused(reason: str, mutate: Any, tmp_path: Path) -> None:
    sources = _headers(ct_series(SeriesSpec(n=3, size=16)))
    stack = np.zeros((1, 3, 16, 16), bool)
    stack[0, 1, 2:5, 2:5] = True
    bad_sources, bad_masks = mutate(sources, stack)
    with pytest.raises(PipelineError) as err:
        write_seg(
            bad_sources,
            bad_masks,
            [LIVER],
            algorithm=ALGORITHM,
            identity=identity(),
            out_path=tmp_path / "x.dcm",
        )
    assert err.value.reason == reason
    assert not any(tmp_path.iterdir())


def _other_series(ds: Dataset) -> Dataset:
    ds = copy.deepcopy(ds)
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    return ds


def _moved(ds: Dataset, to: Dataset) -> Dataset:
    ds = copy.deepcopy(ds)
    ds.ImagePositionPatient = list(to.ImagePositionPatient)
    return ds


def _without(ds: Dataset, keyword: str) -> Dataset:
    ds = copy.deepcopy(ds)
    delattr(ds, keyword)
    return ds


def _tilted(ds: Dataset) -> Dataset:
    ds = copy.deepcopy(ds)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0.6]
    return ds


# -- SR -----------------------------------------------------------------------------------------------


def test_measurement_report(cases: dict[str, Case | str], tmp_path: Path) -> None:
    case = get_case(cases, "synthetic_overlap")
    first = case.sources[0]
    voxel_ml = float(first.PixelSpacing[0]) * float(first.PixelSpacing[1]) * 2.5 / 1000.0
    volumes = [float(case.masks[k].sum()) * voxel_ml for k in range(2)]
    measurements = [SegmentMeasurement(1, volumes[0]), SegmentMeasurement(2, volumes[1], lesion_count=1)]
    series = str(first.SeriesInstanceUID)

    def write(name: str, rule_version: str = "1") -> Path:
        result = write_measurement_report(
            case.result.path,
            case.sources,
            measurements,
            algorithm=ALGORITHM,
            identity=identity(rule_version, series),
            out_path=tmp_path / name,
        )
        return result.path

    path = write("sr.dcm")
    errors, warnings_ = dciodvfy(path)
    print("dciodvfy SR:", *sorted(set(warnings_)), sep="\n  ")
    assert errors == []

    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(path))
    assert is_segnode_output(sr) and sr.Modality == "SR"
    assert (sr.StudyInstanceUID, sr.PatientID) == (first.StudyInstanceUID, first.PatientID)
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series_item in study.ReferencedSeriesSequence
        for item in series_item.ReferencedSOPSequence
    }
    assert evidence == {case.result.sop_instance_uid} | {str(s.SOPInstanceUID) for s in case.sources}
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    for number, group in enumerate(groups, start=1):
        segment = group.referenced_segment
        assert segment is not None and segment.referenced_segment_numbers == [number]
        assert segment.referenced_sop_instance_uid == case.result.sop_instance_uid
        assert segment.source_series_for_segmentation.value == first.SeriesInstanceUID
        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        assert volume.value == pytest.approx(volumes[number - 1]) and volume.unit.value == "ml"
    (count,) = groups[1].get_measurements(name=codes.SCT.NumberOfLesions)
    assert count.value == 1 and count.unit.value == "{lesions}"
    assert groups[0].finding_type.value == "10200004" and groups[1].finding_type.value == "52988006"

    again, other = pydicom.dcmread(write("again.dcm")), pydicom.dcmread(write("other.dcm", "2"))
    assert sr.SOPInstanceUID == again.SOPInstanceUID != other.SOPInstanceUID
    assert sr.SeriesInstanceUID == again.SeriesInstanceUID != case.result.series_instance_uid
