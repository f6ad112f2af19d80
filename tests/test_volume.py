"""Series -> volume: geometry, phases, cine, decoding and every refusal reason.

Generated series (small, written to tmp_path) cover each rule; real archives from ../shared/data
(Sunnybrook cine, the TotalSegmentator J2K CT, codec and enhanced multi-frame samples) check that real
quirks load, or are refused for the right reason.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from pipelines.base import PipelineError
from pipelines.volume import Reason, Volume, load_series, load_volume, plan_series
from pipelines.volume.headers import read_headers
from pipelines.volume.pixels import read_frames
from tests.conftest import need_shared
from tests.factories import SeriesSpec, ct_instance, write_series

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def _ds(values: Sequence[float] | np.ndarray) -> list[str]:
    return [f"{v:.6f}" for v in values]


def oblique_orientation() -> tuple[float, ...]:
    """A double-oblique orientation (rotations about z then x), rounded as a scanner writes it."""
    a, b = math.radians(20.0), math.radians(-35.0)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    m = rx @ rz
    return tuple(round(float(v), 6) for v in (*m[:, 0], *m[:, 1]))


def ct_stack(
    n: int = 6,
    *,
    size: int = 16,
    step: float = 2.5,
    iop: Sequence[float] = AXIAL,
    origin: Sequence[float] = (-100.0, -120.0, 50.0),
    seed: int = 0,
    spec: SeriesSpec | None = None,
) -> list[Dataset]:
    """n CT slices stepping ``step`` mm along the normal of ``iop``."""
    spec = spec or SeriesSpec(n=n, size=size)
    row, col = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row, col)
    slices = []
    for k in range(n):
        ds = ct_instance(spec, k, seed)
        ds.ImageOrientationPatient = _ds(iop)
        ds.ImagePositionPatient = _ds(np.array(origin) + k * step * normal)
        slices.append(ds)
    return slices


def write(datasets: Sequence[Dataset], folder: Path, *, shuffle: bool = True) -> list[Path]:
    items = list(datasets)
    if shuffle:
        random.Random(7).shuffle(items)
    return write_series(items, folder)


def raw_pixels(path: Path) -> np.ndarray:
    return np.asarray(pydicom.dcmread(path).pixel_array)


def modality_values(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return np.asarray(ds.pixel_array).astype(np.float64) * slope + intercept


def refused(reason: Reason, call: Callable[[], object]) -> PipelineError:
    with pytest.raises(PipelineError) as info:
        call()
    assert info.value.reason == reason.value, info.value
    return info.value


def assert_affine_matches_files(volume: Volume) -> None:
    """Every slice's corner voxels map to the ImagePositionPatient-based corners of its source file."""
    rows, columns = volume.voxels.shape[-2:]
    for k, source in enumerate(volume.slice_sources):
        ds = pydicom.dcmread(source.path, stop_before_pixels=True)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        dr, dc = (float(v) for v in ds.PixelSpacing)
        corners = {
            (0, 0): ipp,
            (rows - 1, 0): ipp + (rows - 1) * dr * iop[3:],
            (0, columns - 1): ipp + (columns - 1) * dc * iop[:3],
            (rows - 1, columns - 1): ipp + (rows - 1) * dr * iop[3:] + (columns - 1) * dc * iop[:3],
        }
        for (i, j), expected in corners.items():
            got = volume.affine @ np.array([k, i, j, 1.0])
            np.testing.assert_allclose(got[:3], expected, atol=1e-3, err_msg=f"slice {k} corner {(i, j)}")


# --- geometry and the affine ------------------------------------------------------------------


def test_axial_series_in_shuffled_files_is_sorted_and_rescaled(tmp_path: Path) -> None:
    files = write(ct_stack(6), tmp_path)
    volume = load_volume(files)
    assert volume.voxels.shape == (6, 16, 16) and volume.voxels.dtype == np.float32
    assert volume.spacing == pytest.approx((2.5, 0.7, 0.7))
    np.testing.assert_allclose(volume.slice_direction, [0, 0, 1])
    z = [float(pydicom.dcmread(s.path).ImagePositionPatient[2]) for s in volume.slice_sources]
    assert z == sorted(z)
    for k, source in enumerate(volume.slice_sources):
        np.testing.assert_array_equal(volume.voxels[k], modality_values(source.path))
    assert volume.voxels.min() < -900  # intercept -1024 applied
    assert_affine_matches_files(volume)
    assert volume.sources[0][0].frame_number is None
    assert (
        volume.sources[0][0].sop_instance_uid == pydicom.dcmread(volume.slice_sources[0].path).SOPInstanceUID
    )
    assert not [n for n in volume.notes if "Rescale" in n]


def test_oblique_series_affine_maps_corners_to_patient_positions(tmp_path: Path) -> None:
    iop = oblique_orientation()
    volume = load_volume(write(ct_stack(7, iop=iop, step=3.0), tmp_path))
    assert volume.spacing[0] == pytest.approx(3.0, abs=1e-4)
    np.testing.assert_allclose(volume.row_direction, iop[:3], atol=1e-5)
    np.testing.assert_allclose(volume.column_direction, iop[3:], atol=1e-5)
    np.testing.assert_allclose(volume.slice_direction, np.cross(iop[:3], iop[3:]), atol=1e-5)
    assert_affine_matches_files(volume)
    np.testing.assert_allclose(volume.index_to_lps([[6, 0, 0]])[0], volume.slice_position(6))


def test_reversed_file_order_gives_the_same_volume(tmp_path: Path) -> None:
    slices = ct_stack(5, iop=oblique_orientation())
    forward = load_volume(write_series(slices, tmp_path / "forward"))
    backward = load_volume(write_series(slices[::-1], tmp_path / "backward"))
    np.testing.assert_array_equal(forward.voxels, backward.voxels)
    np.testing.assert_allclose(forward.affine, backward.affine)
    assert [s.sop_instance_uid for s in forward.slice_sources] == [ds.SOPInstanceUID for ds in slices]


def test_descending_normal_sorts_along_the_normal_not_along_z(tmp_path: Path) -> None:
    iop = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # normal (0, 0, -1): slice index grows towards the feet
    volume = load_volume(write(ct_stack(4, iop=iop), tmp_path))
    np.testing.assert_allclose(volume.slice_direction, [0, 0, -1])
    z = [float(pydicom.dcmread(s.path).ImagePositionPatient[2]) for s in volume.slice_sources]
    assert z == sorted(z, reverse=True)
    assert_affine_matches_files(volume)


def test_nifti_affine_is_ras_for_column_row_slice_order(tmp_path: Path) -> None:
    volume = load_volume(write(ct_stack(4), tmp_path))
    ras = volume.nifti_affine()
    lps = volume.affine
    for k, i, j in [(0, 0, 0), (3, 15, 0), (2, 5, 11)]:
        expected = lps @ [k, i, j, 1]
        got = ras @ [j, i, k, 1]
        np.testing.assert_allclose(got[:3], [-expected[0], -expected[1], expected[2]])
    assert volume.nifti_voxels()[3, 5, 2] == volume.voxels[2, 5, 3]


def test_missing_rescale_is_identity_and_noted(tmp_path: Path) -> None:
    slices = ct_stack(4)
    for ds in slices:
        del ds.RescaleSlope
        del ds.RescaleIntercept
    volume = load_volume(write(slices, tmp_path))
    for k, source in enumerate(volume.slice_sources):
        np.testing.assert_array_equal(volume.voxels[k], raw_pixels(source.path))
    assert any("RescaleSlope/RescaleIntercept missing on 4 of 4 frames: identity" in n for n in volume.notes)


def test_per_slice_rescale_is_applied_per_slice(tmp_path: Path) -> None:
    slices = ct_stack(4)
    for k, ds in enumerate(slices):
        ds.RescaleSlope = f"{0.5 * (k + 1):g}"
        ds.RescaleIntercept = str(-1000 - k)
    volume = load_volume(write(slices, tmp_path))
    for k, source in enumerate(volume.slice_sources):
        np.testing.assert_allclose(volume.voxels[k], modality_values(source.path), rtol=1e-6)


@pytest.mark.parametrize("signed", [True, False])
def test_unused_high_bits_are_cleared_like_pydicom(tmp_path: Path, signed: bool) -> None:
    rng = np.random.default_rng(3)
    slices = ct_stack(3)
    expected = []
    for ds in slices:
        values = rng.integers(-2048 if signed else 0, 2048 if signed else 4096, (16, 16))
        garbage = rng.integers(0, 16, (16, 16)) << 12
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, int(signed)
        ds.PixelData = ((values & 0xFFF) | garbage).astype(np.uint16).tobytes()
        expected.append(values - 1024)
    volume = load_volume(write(slices, tmp_path, shuffle=False))
    for k, source in enumerate(volume.slice_sources):
        np.testing.assert_array_equal(volume.voxels[k], expected[k])
        np.testing.assert_array_equal(volume.voxels[k], modality_values(source.path))


def test_transfer_syntaxes_mixed_in_one_series_decode_to_the_same_voxels(tmp_path: Path) -> None:
    slices = ct_stack(5)
    reference = load_volume(write_series(slices, tmp_path / "plain"))
    mixed = ct_stack(5)  # same pixels: same spec seed and indices
    for ds in mixed:
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    mixed[1].compress(RLELossless)
    mixed[2].file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    mixed[3].file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    mixed[4].file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    mixed[4].PixelData = np.frombuffer(mixed[4].PixelData, "<i2").astype(">i2").tobytes()
    files = write(mixed, tmp_path / "mixed")
    syntaxes = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in files}
    assert syntaxes == {
        str(u)
        for u in (
            ExplicitVRLittleEndian,
            RLELossless,
            DeflatedExplicitVRLittleEndian,
            ImplicitVRLittleEndian,
            ExplicitVRBigEndian,
        )
    }
    volume = load_volume(files)
    np.testing.assert_array_equal(volume.voxels, reference.voxels)


# --- phases and cine --------------------------------------------------------------------------


def two_phase_ct(content_time_only: bool = False) -> list[Dataset]:
    spec = SeriesSpec(n=5, size=16)
    arterial = ct_stack(5, spec=spec, seed=0)
    venous = ct_stack(5, spec=spec, seed=1)
    for number, phase in ((1, arterial), (2, venous)):
        for k, ds in enumerate(phase):
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.AcquisitionNumber = 1 if content_time_only else number
            ds.ContentTime = f"1{number}00{k:02d}.000"
    return arterial + venous


def test_multiphase_ct_is_split_by_acquisition_number(tmp_path: Path) -> None:
    slices = two_phase_ct()
    files = write(slices, tmp_path)
    series = load_series(files)
    assert series.phase_labels == ["AcquisitionNumber=1", "AcquisitionNumber=2"]
    assert [v.voxels.shape for v in series.volumes] == [(5, 16, 16), (5, 16, 16)]
    by_uid = {ds.SOPInstanceUID: ds for ds in slices}
    for volume, number in zip(series.volumes, (1, 2), strict=True):
        assert volume.phase_label == f"AcquisitionNumber={number}"
        assert {by_uid[s.sop_instance_uid].AcquisitionNumber for s in volume.slice_sources} == {number}
        for k, source in enumerate(volume.slice_sources):
            np.testing.assert_array_equal(volume.voxels[k], modality_values(source.path))
        assert_affine_matches_files(volume)
    assert any("split into 2 phases" in n for n in series.notes)
    only = load_series(files, phase="last")
    assert len(only.volumes) == 1 and only.volumes[0].phase_label == "AcquisitionNumber=2"
    np.testing.assert_array_equal(only.select().voxels, series.select(1).voxels)
    assert load_volume(files, phase="AcquisitionNumber=1").phase_label == "AcquisitionNumber=1"
    error = refused(Reason.MULTIPLE_PHASES, lambda: load_volume(files))
    assert "AcquisitionNumber=2" in error.message
    refused(Reason.UNKNOWN_PHASE, lambda: load_volume(files, phase="portal"))
    refused(Reason.UNKNOWN_PHASE, lambda: load_volume(files, phase=2))


def test_multiphase_ct_without_acquisition_numbers_is_split_by_content_time(tmp_path: Path) -> None:
    files = write(two_phase_ct(content_time_only=True), tmp_path)
    series = load_series(files)
    assert series.phase_labels == ["ContentTime#1", "ContentTime#2"]
    first = {pydicom.dcmread(s.path).ContentTime[:2] for s in series.volumes[0].slice_sources}
    assert first == {"11"}


def mr_cine(times: int = 4, slices: int = 3, *, temporal_ids: bool = False) -> list[Dataset]:
    spec = SeriesSpec(n=slices, size=16, modality="MR")
    result = []
    for t in range(times):
        for ds in ct_stack(slices, spec=spec, seed=t, iop=oblique_orientation(), step=8.0):
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            k = int(ds.InstanceNumber) - 1
            ds.InstanceNumber = t * slices + k + 1
            ds.TriggerTime = f"{t * 40 + 0.37 * k:.2f}"  # each slice location has its own trigger times
            ds.FrameOfReferenceUID = generate_uid()  # as Sunnybrook: a different one on every image
            if temporal_ids:
                ds.TemporalPositionIdentifier = t + 1
            del ds.RescaleSlope
            del ds.RescaleIntercept
            result.append(ds)
    return result


def test_mr_cine_in_single_frame_instances_becomes_time_slice_row_column(tmp_path: Path) -> None:
    datasets = mr_cine()
    volume = load_volume(write(datasets, tmp_path))
    assert volume.is_cine and volume.voxels.shape == (4, 3, 16, 16)
    assert volume.trigger_times == pytest.approx([0.37, 40.37, 80.37, 120.37])
    trigger = {ds.SOPInstanceUID: float(ds.TriggerTime) for ds in datasets}
    for t in range(4):
        for k, source in enumerate(volume.sources[t]):
            assert trigger[source.sop_instance_uid] == pytest.approx(t * 40 + 0.37 * k)
            np.testing.assert_array_equal(volume.voxels[t, k], raw_pixels(source.path))
    assert_affine_matches_files(volume.time_point(2))
    assert volume.time_point(2).voxels.shape == (3, 16, 16)
    assert any("FrameOfReferenceUIDs in one cine stack" in n for n in volume.notes)
    assert any("separated by TriggerTime" in n for n in volume.notes)
    with pytest.raises(ValueError):
        _ = volume.slice_sources


def test_cine_with_a_missing_frame_is_refused(tmp_path: Path) -> None:
    datasets = mr_cine(temporal_ids=True)
    del datasets[7]  # time point 3, slice 2
    error = refused(Reason.INCONSISTENT_TIME_POINTS, lambda: load_series(write(datasets, tmp_path)))
    assert "time point 3" in error.message


def enhanced_ct(order: Sequence[int] = (2, 0, 3, 1), size: int = 16) -> tuple[Dataset, np.ndarray]:
    """An enhanced CT whose frames are stored out of order, each with its own rescale."""
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 3000, (len(order), size, size)).astype(np.int16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (
        generate_uid(),
        generate_uid(),
        generate_uid(),
    )
    ds.Modality = "CT"
    ds.NumberOfFrames = len(order)
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    shared = Dataset()
    orientation, measures = Dataset(), Dataset()
    orientation.ImageOrientationPatient = _ds(AXIAL)
    measures.PixelSpacing, measures.SliceThickness = ["0.8", "0.8"], "3"
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    items = []
    for frame, position in enumerate(order):
        item, plane, content, transform = Dataset(), Dataset(), Dataset(), Dataset()
        plane.ImagePositionPatient = _ds((-50.0, -60.0, 10.0 + 3.0 * position))
        content.StackID, content.InStackPositionNumber = "1", position + 1
        transform.RescaleSlope, transform.RescaleIntercept = str(frame + 1), "-1024"
        item.PlanePositionSequence = DicomSequence([plane])
        item.FrameContentSequence = DicomSequence([content])
        item.PixelValueTransformationSequence = DicomSequence([transform])
        items.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(items)
    ds.PixelData = raw.tobytes()
    expected = np.empty(raw.shape, np.float64)
    for frame, position in enumerate(order):
        expected[position] = raw[frame] * (frame + 1) - 1024
    return ds, expected


@pytest.mark.parametrize("compressed", [False, True])
def test_enhanced_multiframe_uses_per_frame_groups(tmp_path: Path, compressed: bool) -> None:
    ds, expected = enhanced_ct()
    if compressed:
        ds.compress(RLELossless)
    files = write_series([ds], tmp_path)
    volume = load_volume(files)
    np.testing.assert_array_equal(volume.voxels, expected)
    assert [s.frame_number for s in volume.slice_sources] == [2, 4, 1, 3]
    assert {s.sop_instance_uid for s in volume.slice_sources} == {ds.SOPInstanceUID}
    assert volume.spacing == pytest.approx((3.0, 0.8, 0.8))
    np.testing.assert_allclose(volume.origin, [-50, -60, 10])


# --- refusals ---------------------------------------------------------------------------------


def _edit(n: int, edit: Callable[[list[Dataset]], None], **stack: object) -> Callable[[Path], list[Path]]:
    def make(folder: Path) -> list[Path]:
        slices = ct_stack(n, **stack)  # type: ignore[arg-type]
        edit(slices)
        return write(slices, folder)

    return make


def _set(index: int, **values: object) -> Callable[[list[Dataset]], None]:
    def edit(slices: list[Dataset]) -> None:
        for key, value in values.items():
            setattr(slices[index], key, value)

    return edit


def _delete(index: int, keyword: str) -> Callable[[list[Dataset]], None]:
    def edit(slices: list[Dataset]) -> None:
        delattr(slices[index], keyword)

    return edit


def _positions(z: Sequence[float]) -> Callable[[list[Dataset]], None]:
    def edit(slices: list[Dataset]) -> None:
        for ds, value in zip(slices, z, strict=True):
            ds.ImagePositionPatient = _ds((-100.0, -120.0, value))

    return edit


def _tilt(degrees: float) -> Callable[[list[Dataset]], None]:
    def edit(slices: list[Dataset]) -> None:
        for k, ds in enumerate(slices):
            ds.ImagePositionPatient = _ds(
                (-100.0, -120.0 + k * 2.5 * math.tan(math.radians(degrees)), k * 2.5)
            )
            ds.GantryDetectorTilt = f"{degrees:g}"

    return edit


def _rgb(slices: list[Dataset]) -> None:
    ds = slices[2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = bytes(16 * 16 * 3)


def _one_bit(slices: list[Dataset]) -> None:
    ds = slices[0]
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit, ds.PixelRepresentation = 0, 0
    ds.PixelData = bytes(16 * 16 // 8)


def _modality_lut(slices: list[Dataset]) -> None:
    lut = Dataset()
    lut.add_new(0x00283002, "US", [4, 0, 16])  # LUTDescriptor
    lut.ModalityLUTType = "HU"
    lut.add_new(0x00283006, "US", [0, 1, 2, 3])  # LUTData
    slices[1].ModalityLUTSequence = DicomSequence([lut])


def _other_series(slices: list[Dataset]) -> None:
    slices[3].SeriesInstanceUID = generate_uid()


def _duplicate(slices: list[Dataset]) -> None:
    slices[3].ImagePositionPatient = slices[2].ImagePositionPatient


def _truncated(slices: list[Dataset]) -> None:
    slices[1].PixelData = slices[1].PixelData[:100]


def _not_orthogonal(slices: list[Dataset]) -> None:
    for ds in slices:
        ds.ImageOrientationPatient = _ds((1, 0, 0, 0.3, 0.95, 0))


def _resent_instance(folder: Path) -> list[Path]:
    files = write(ct_stack(4), folder)
    copy = files[2].with_name(files[2].stem + ".v2.dcm")
    copy.write_bytes(files[2].read_bytes())
    return [*files, copy]


def _text_file(folder: Path) -> list[Path]:
    files = write(ct_stack(4), folder)
    files[1].write_text("this is not DICOM\n")
    return files


REFUSALS: list[tuple[Reason, Callable[[Path], list[Path]], str]] = [
    (
        Reason.MIXED_ORIENTATIONS,
        _edit(5, _set(2, ImageOrientationPatient=_ds((0, 1, 0, 0, 0, -1)))),
        "[0, 1, 0,",
    ),
    (Reason.DUPLICATE_POSITIONS, _edit(5, _duplicate), "occur more than once"),
    (Reason.DUPLICATE_POSITIONS, _resent_instance, "given more than once"),
    (Reason.NON_UNIFORM_SPACING, _edit(5, _positions([0, 2.5, 5.0, 8.1, 10.6])), "3.1 mm"),
    (Reason.MISSING_SLICES, _edit(5, _positions([0, 2.5, 5.0, 10.0, 12.5])), "1 slice(s) missing"),
    (Reason.GANTRY_TILT, _edit(6, _tilt(15.0)), "15.00 degrees"),
    (Reason.TOO_FEW_SLICES, _edit(2, lambda s: None), "at least 3"),
    (Reason.UNSUPPORTED_PHOTOMETRIC, _edit(4, _rgb), "'RGB'"),
    (Reason.UNSUPPORTED_PIXEL_FORMAT, _edit(4, _one_bit), "BitsAllocated 1"),
    (Reason.UNSUPPORTED_MODALITY_LUT, _edit(4, _modality_lut), "Modality LUT"),
    (Reason.UNREADABLE_INSTANCE, _text_file, "cannot be read as DICOM"),
    (Reason.NO_PIXEL_DATA, _edit(4, _delete(1, "PixelData")), "no Pixel Data"),
    (Reason.UNDECODABLE_PIXEL_DATA, _edit(4, _truncated), "holds 100 bytes"),
    (Reason.MIXED_SIZES, _edit(4, _set(0, Rows=8, Columns=8, PixelData=bytes(128))), "8x8"),
    (Reason.MIXED_PIXEL_SPACING, _edit(4, _set(3, PixelSpacing=["0.9", "0.9"])), "[0.9, 0.9]"),
    (Reason.MIXED_FRAMES_OF_REFERENCE, _edit(4, _set(1, FrameOfReferenceUID=generate_uid())), "2 Frame"),
    (Reason.MIXED_SERIES, _edit(4, _other_series), "2 series"),
    (Reason.NO_GEOMETRY, _edit(4, _delete(2, "ImagePositionPatient")), "ImagePositionPatient"),
    (Reason.INVALID_GEOMETRY, _edit(4, _not_orthogonal), "orthogonal unit"),
    (Reason.INVALID_GEOMETRY, _edit(4, _set(1, ImagePositionPatient=["1", "2"])), "3 are required"),
]


@pytest.mark.parametrize(
    ("reason", "make", "fragment"), REFUSALS, ids=[f"{r.value}-{i}" for i, (r, _, _) in enumerate(REFUSALS)]
)
def test_refusals_name_the_reason_and_the_value(
    tmp_path: Path, reason: Reason, make: Callable[[Path], list[Path]], fragment: str
) -> None:
    files = make(tmp_path)
    error = refused(reason, lambda: load_series(files))
    assert fragment in error.message, error.message


def test_no_files_is_refused() -> None:
    refused(Reason.NO_FILES, lambda: load_series([]))


def test_header_checks_refuse_before_any_pixel_is_read(tmp_path: Path) -> None:
    files = _edit(5, _positions([0, 2.5, 5.0, 10.0, 12.5]))(tmp_path)
    plan = plan_series(files)  # headers are fine: positions are only judged per phase
    assert plan.phase_labels == [""]
    refused(Reason.MISSING_SLICES, lambda: load_volume(files))


def test_tilt_tag_with_orthogonal_positions_is_accepted_with_a_note(tmp_path: Path) -> None:
    slices = ct_stack(4)
    for ds in slices:
        ds.GantryDetectorTilt = "12"
    volume = load_volume(write(slices, tmp_path))
    assert any("GantryDetectorTilt 12 degrees" in n for n in volume.notes)


def test_small_tilt_within_a_quarter_pixel_is_accepted(tmp_path: Path) -> None:
    files = _edit(5, _tilt(0.5))(tmp_path)  # 0.09 mm in-plane over 10 mm: below 0.25 x 0.7 mm
    volume = load_volume(files)
    assert volume.n_slices == 5


# --- real archives ----------------------------------------------------------------------------


def test_sunnybrook_cine_is_20_phases_of_12_slices() -> None:
    folder = need_shared("cardiac", "sunnybrook", "SCD0000101", "dicom")
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == 240
    volume = load_volume(files)
    assert volume.voxels.shape == (20, 12, 256, 256)
    assert volume.modality == "MR"
    assert len(volume.trigger_times) == 20 and list(volume.trigger_times) == sorted(volume.trigger_times)
    assert volume.spacing == pytest.approx((10.0, 1.367188, 1.367188), abs=1e-3)
    notes = " | ".join(volume.notes)
    assert "different FrameOfReferenceUIDs in one cine stack" in notes
    assert "leading-zero components" in notes
    assert "RescaleSlope/RescaleIntercept missing on 240 of 240" in notes
    assert_affine_matches_files(volume.time_point(0))
    assert_affine_matches_files(volume.time_point(19))
    for t, k in ((0, 0), (7, 5), (19, 11)):
        source = volume.sources[t][k]
        np.testing.assert_array_equal(volume.voxels[t, k], raw_pixels(source.path))
        assert int(pydicom.dcmread(source.path, stop_before_pixels=True).InstanceNumber) % 20 == (t + 1) % 20


def test_totalsegmentator_j2k_series_matches_its_nifti_geometry_and_liver_hu() -> None:
    nib = pytest.importorskip("nibabel")
    folder = need_shared("liver", "totalsegmentator_example", "example_ct_dicom")
    segmentation = need_shared("liver", "totalsegmentator_example", "example_seg_dicom.nii.gz")
    volume = load_volume(sorted(folder.iterdir()))
    assert volume.voxels.shape == (20, 512, 512)
    assert volume.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    np.testing.assert_allclose(volume.image_orientation, AXIAL)
    assert volume.study_instance_uid == "" and volume.series_instance_uid == ""
    assert all(s.sop_instance_uid.startswith("1.3.12.2.1107.5.1.4.60064") for s in volume.slice_sources)
    notes = " | ".join(volume.notes)
    assert "SOPInstanceUID empty in 20 of 20 instances" in notes and "StudyInstanceUID empty" in notes
    image = nib.load(segmentation)
    labels = np.asarray(image.dataobj)
    assert labels.shape == (512, 512, 20)
    # The NIfTI (LAS) flips the row axis: its voxel (x, y, z) is our (slice z, row 511 - y, column x).
    for x, y, z in [(0, 0, 0), (511, 511, 19), (100, 300, 7)]:
        ours = volume.nifti_affine() @ [x, 511 - y, z, 1]
        np.testing.assert_allclose(image.affine @ [x, y, z, 1], ours, atol=1e-3)
    liver = labels[:, ::-1, :].transpose(2, 1, 0) == 5
    assert liver.sum() > 10_000
    mean_liver = float(volume.voxels[liver].mean())
    assert 30.0 < mean_liver < 120.0, mean_liver  # liver parenchyma in HU: voxels and mask line up
    np.testing.assert_array_equal(volume.voxels[3], modality_values(volume.slice_sources[3].path))


def test_codec_samples_in_nine_transfer_syntaxes_give_identical_voxels() -> None:
    folder = need_shared("dicom", "dcm_qa_ts", "In")
    volumes = {path.name: load_volume([path], min_slices=1) for path in sorted(folder.glob("*.dcm"))}
    assert len(volumes) == 9
    reference = volumes["1.dcm"]
    assert reference.voxels.shape == (1, 384, 384) and float(reference.voxels.max()) > 0
    for name, volume in volumes.items():
        np.testing.assert_array_equal(volume.voxels, reference.voxels, err_msg=name)
        np.testing.assert_allclose(volume.affine, reference.affine, err_msg=name)
    np.testing.assert_array_equal(reference.voxels[0], raw_pixels(folder / "3.dcm"))


def test_enhanced_siemens_time_series_in_four_files_is_4d() -> None:
    folder = need_shared("dicom", "dcm_qa_enh", "In", "Siemens", "XA10")
    volume = load_volume(sorted(folder.glob("*.dcm")))
    assert volume.voxels.shape == (4, 6, 64, 64)
    assert [s.path.name for s in volume.sources[2]] == ["6_3.dcm"] * 6
    assert [s.frame_number for s in volume.sources[0]] == [1, 2, 3, 4, 5, 6]
    assert_affine_matches_enhanced(volume.time_point(1))


def assert_affine_matches_enhanced(volume: Volume) -> None:
    for k, source in enumerate(volume.slice_sources):
        ds = pydicom.dcmread(source.path, stop_before_pixels=True)
        assert source.frame_number is not None
        item = ds.PerFrameFunctionalGroupsSequence[source.frame_number - 1]
        ipp = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose((volume.affine @ [k, 0, 0, 1])[:3], ipp, atol=1e-2)


def test_enhanced_philips_magnitude_and_field_map_are_refused_as_duplicates() -> None:
    path = need_shared("dicom", "dcm_qa_enh", "In", "Philips", "IM_0027_fMAP.dcm")
    error = refused(Reason.DUPLICATE_POSITIONS, lambda: load_series([path]))
    assert "FIELD_MAP" in error.message


def test_enhanced_ct_supplemental_two_frames_sorted_along_the_normal() -> None:
    path = need_shared("dicom", "pydicom_data_subset", "eCT_Supplemental.dcm")
    refused(Reason.TOO_FEW_SLICES, lambda: load_series([path]))
    volume = load_volume([path], min_slices=2)
    assert volume.voxels.shape == (2, 512, 512)
    assert [s.frame_number for s in volume.slice_sources] == [2, 1]
    assert_affine_matches_enhanced(volume)
    frames = np.asarray(pydicom.dcmread(path).pixel_array)
    np.testing.assert_array_equal(volume.voxels[0], frames[1] * 1.0 - 1024.0)


def test_emri_small_without_geometry_is_refused_but_decodes_alike_in_five_syntaxes() -> None:
    folder = need_shared("dicom", "pydicom_data_subset")
    names = ["emri_small.dcm", "emri_small_RLE.dcm", "emri_small_big_endian.dcm"]
    names += ["emri_small_jpeg_2k_lossless.dcm", "emri_small_jpeg_ls_lossless.dcm"]
    decoded = {}
    for name in names:
        refused(Reason.NO_GEOMETRY, functools.partial(load_series, [folder / name]))
        frames = read_headers([folder / name], [])
        out = np.empty((len(frames), 64, 64), np.float32)
        read_frames(frames, out, [])
        decoded[name] = out
    for name in names:
        np.testing.assert_array_equal(decoded[name], decoded["emri_small.dcm"], err_msg=name)
    np.testing.assert_array_equal(decoded["emri_small.dcm"], pydicom.dcmread(folder / names[0]).pixel_array)


def test_seg_instance_is_not_an_image_volume() -> None:
    path = need_shared("dicom", "pydicom_data_subset", "liver.dcm")
    refused(Reason.UNSUPPORTED_PIXEL_FORMAT, lambda: load_series([path]))
