"""Converters into the nnU-Net v2 raw layout.

- ``convert_contours``: one DICOM cine series (all phases, one file per slice and phase) plus
  Sunnybrook-style contour files (``IM-0001-00NN-icontour-manual.txt``: pixel polygons on the image
  whose number is NN, ``i`` = LV endocardium, ``o`` = LV epicardium) -> one case per contoured phase:
  LV cavity inside ``i``, myocardium between ``o`` and ``i``. Slices without contours carry the
  ``ignore`` label (their truth is unknown), so do voxels of slices with only an ``i`` contour outside
  it; the right ventricle is never contoured there (RV is absent from such a dataset).
- ``convert_seg``: DICOM series + DICOM-SEG (highdicom) -> one case, segments mapped to labels.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from numpy.typing import NDArray
from PIL import Image, ImageDraw

CONTOUR_RE = re.compile(r"IM-\d+-(?P<num>\d+)-(?P<kind>[io])contour-manual\.txt$")


@dataclass
class Frame:
    path: Path
    ds: pydicom.Dataset
    position: float  # along the slice normal, mm
    time: float


def _normal(ds: pydicom.Dataset) -> NDArray[np.float64]:
    iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    return np.cross(iop[:3], iop[3:])


def read_series(folder: Path) -> dict[str, list[Frame]]:
    """Image files of ``folder`` by SeriesInstanceUID."""
    series: dict[str, list[Frame]] = defaultdict(list)
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        try:
            ds = pydicom.dcmread(p)
        except Exception:
            continue
        if "PixelData" not in ds or "ImagePositionPatient" not in ds:
            continue
        pos = float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=np.float64), _normal(ds)))
        t = float(ds.get("TriggerTime", ds.get("InstanceNumber", 0)) or 0)
        series[str(ds.SeriesInstanceUID)].append(Frame(p, ds, pos, t))
    return dict(series)


def phases(frames: list[Frame], tolerance_mm: float = 0.5) -> list[list[Frame]]:
    """Group a cine series into phases: frames at each slice position sorted by trigger time; phase k
    is the k-th frame of every position. Returns phases, each sorted by position."""
    positions: list[list[Frame]] = []
    for f in sorted(frames, key=lambda f: f.position):
        if positions and abs(positions[-1][0].position - f.position) <= tolerance_mm:
            positions[-1].append(f)
        else:
            positions.append([f])
    counts = {len(p) for p in positions}
    if len(counts) != 1:
        raise ValueError(f"slice positions have different numbers of phases: {sorted(counts)}")
    n = counts.pop()
    for p in positions:
        p.sort(key=lambda f: (f.time, int(f.ds.get("InstanceNumber", 0) or 0)))
    return [[p[k] for p in positions] for k in range(n)]


def volume(
    frames: list[Frame],
) -> tuple[NDArray[np.float32], NDArray[np.float64], tuple[float, float, float]]:
    """(X=column, Y=row, Z=slice) volume, its NIfTI (RAS) affine and spacing."""
    first = frames[0].ds
    arr = np.stack(
        [
            f.ds.pixel_array.astype(np.float32) * float(f.ds.get("RescaleSlope", 1) or 1)
            + float(f.ds.get("RescaleIntercept", 0) or 0)
            for f in frames
        ],
        axis=-1,
    )
    arr = arr.transpose(1, 0, 2)  # (rows, cols, z) -> (cols, rows, z)
    iop = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    row_sp, col_sp = (float(x) for x in first.PixelSpacing)
    dz = (
        abs(frames[1].position - frames[0].position)
        if len(frames) > 1
        else float(first.get("SliceThickness", 1))
    )
    normal = np.cross(iop[:3], iop[3:])
    if len(frames) > 1 and frames[1].position < frames[0].position:
        normal = -normal
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * col_sp
    lps[:3, 1] = iop[3:] * row_sp
    lps[:3, 2] = normal * dz
    lps[:3, 3] = np.asarray(first.ImagePositionPatient, dtype=np.float64)
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return arr, ras, (col_sp, row_sp, dz)


def rasterise(points: NDArray[np.float64], cols: int, rows: int) -> NDArray[np.bool_]:
    """Polygon in pixel coordinates (x=column, y=row) -> (X=column, Y=row) mask."""
    img = Image.new("L", (cols, rows), 0)
    ImageDraw.Draw(img).polygon([(float(x), float(y)) for x, y in points], fill=1, outline=1)
    return np.asarray(img, dtype=bool).T


IGNORE = 4


def convert_contours(
    dicom_dir: Path, contour_dir: Path, out: Path, prefix: str, file_number: str = "name"
) -> dict[str, Any]:
    """See the module docstring. ``file_number``: how a contour's image number finds its file:
    ``name`` (``NN.dcm``, the Sunnybrook package) or ``instance`` (InstanceNumber)."""
    series = read_series(dicom_dir)
    if len(series) != 1:
        raise ValueError(f"{dicom_dir}: expected one cine series, found {len(series)}")
    frames = next(iter(series.values()))
    by_phase = phases(frames)
    where: dict[int, tuple[int, int]] = {}  # image number -> (phase, slice)
    for k, ph in enumerate(by_phase):
        for z, f in enumerate(ph):
            num = (
                int(f.path.stem)
                if file_number == "name" and f.path.stem.isdigit()
                else int(f.ds.InstanceNumber)
            )
            where[num] = (k, z)
    contours: dict[int, dict[str, Path]] = defaultdict(dict)
    for p in sorted(contour_dir.rglob("*.txt")):
        m = CONTOUR_RE.search(p.name)
        if m:
            contours[int(m["num"])][m["kind"]] = p
    if not contours:
        raise ValueError(f"{contour_dir}: no IM-*-NNNN-[io]contour-manual.txt files")
    labels_by_phase: dict[int, NDArray[np.uint8]] = {}
    shape = (int(frames[0].ds.Columns), int(frames[0].ds.Rows), len(by_phase[0]))
    for num, kinds in sorted(contours.items()):
        if num not in where:
            raise ValueError(f"contour for image {num} but no such image in {dicom_dir}")
        k, z = where[num]
        lab = labels_by_phase.setdefault(k, np.full(shape, IGNORE, dtype=np.uint8))
        sl = np.full(shape[:2], IGNORE, dtype=np.uint8)
        inner = rasterise(np.loadtxt(kinds["i"]), shape[0], shape[1]) if "i" in kinds else None
        outer = rasterise(np.loadtxt(kinds["o"]), shape[0], shape[1]) if "o" in kinds else None
        if outer is not None:
            sl[:] = 0
            sl[outer] = 2
        if inner is not None:
            sl[inner] = 3
        lab[:, :, z] = sl
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    cases = []
    for k, lab in sorted(labels_by_phase.items()):
        img, affine, _ = volume(by_phase[k])
        cid = f"{prefix}_phase{k:02d}"
        nib.save(nib.Nifti1Image(img, affine), str(out / "imagesTr" / f"{cid}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(lab, affine), str(out / "labelsTr" / f"{cid}.nii.gz"))
        cases.append(cid)
    meta = {
        "channel_names": {"0": "cineMRI"},
        "labels": {"background": 0, "MYO": 2, "LV": 3, "ignore": IGNORE},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "note": "converted by segnode-train convert contours; RV not contoured; 'ignore' marks voxels "
        "whose truth is unknown (slices without contours, outside an i-contour without o-contour)",
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return {"cases": cases, "phases": len(by_phase), "slices": shape[2], "contoured_images": len(contours)}


def convert_seg(
    dicom_dir: Path, seg_path: Path, out: Path, case_id: str, label_map: dict[str, int] | None = None
) -> dict[str, Any]:
    """One image series + a DICOM-SEG on it -> ``case_id`` in the raw layout. Segments are numbered in
    the label map by segment label (``label_map``) or by segment number."""
    import highdicom as hd

    series = read_series(dicom_dir)
    seg = hd.seg.segread(str(seg_path))
    ref_series = (
        {str(s.SeriesInstanceUID) for s in seg.ReferencedSeriesSequence}
        if "ReferencedSeriesSequence" in seg
        else set(series)
    )
    uid = next((u for u in series if u in ref_series), None)
    if uid is None:
        raise ValueError(f"{seg_path}: none of the series in {dicom_dir} is referenced by the SEG")
    frames = sorted(series[uid], key=lambda f: f.position)
    img, affine, _ = volume(frames)
    sop_uids = [str(f.ds.SOPInstanceUID) for f in frames]
    numbers = list(seg.segment_numbers)
    arr = seg.get_pixels_by_source_instance(
        sop_uids,
        segment_numbers=numbers,
        combine_segments=False,
        ignore_spatial_locations=True,
        assert_missing_frames_are_empty=True,
    )
    lab = np.zeros(img.shape, dtype=np.uint8)
    names = {}
    for i, n in enumerate(numbers):
        desc = seg.get_segment_description(n)
        value = (label_map or {}).get(str(desc.segment_label), n)
        names[str(desc.segment_label)] = value
        mask = np.asarray(arr[..., i]).astype(bool).transpose(2, 1, 0)  # (z, rows, cols) -> (cols, rows, z)
        lab[mask] = value
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(img, affine), str(out / "imagesTr" / f"{case_id}_0000.nii.gz"))
    nib.save(nib.Nifti1Image(lab, affine), str(out / "labelsTr" / f"{case_id}.nii.gz"))
    meta_path = out / "dataset.json"
    meta = (
        json.loads(meta_path.read_text())
        if meta_path.is_file()
        else {
            "channel_names": {"0": str(frames[0].ds.Modality)},
            "labels": {"background": 0},
            "file_ending": ".nii.gz",
        }
    )
    meta["labels"].update(names)
    meta["numTraining"] = len(list((out / "labelsTr").glob("*.nii.gz")))
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return {"case": case_id, "segments": names, "slices": len(frames)}
