"""Sunnybrook Cardiac Data manual contours, and the agreement of a segmentation with them.

A Sunnybrook case holds ``dicom/NN.dcm`` (a cine short-axis series) and
``contours/{i,o}-contours/IM-0001-NNNN-{i,o}contour-manual.txt``: polygons in pixel coordinates, one
``x y`` pair a line (x the column, y the row, pixel centres at integer coordinates), drawn on image NN.
The i-contour is the LV endocardium (cavity with papillary muscles), the o-contour the epicardium, so
LV cavity = inside i, LV myocardium = inside o and not inside i (only where both were drawn).

``agreement`` finds each contoured image in a cine ``Volume`` by its SOP Instance UID and compares the
LV cavity and myocardium of a label map over that volume with the contours, image by image, as Dice.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom

from pipelines.volume import Volume

BoolArray = npt.NDArray[np.bool_]
_CONTOUR = re.compile(r"^IM-\d+-(?P<image>\d+)-(?P<kind>[io])contour-manual\.txt$")


@dataclass(frozen=True)
class ContouredImage:
    image_number: int  # NN of dicom/NN.dcm
    path: Path
    sop_instance_uid: str
    inner: npt.NDArray[np.float64]  # (N, 2) x, y: LV endocardium
    outer: npt.NDArray[np.float64] | None  # (M, 2) x, y: LV epicardium, where drawn


def read_polygon(path: Path) -> npt.NDArray[np.float64]:
    points = np.loadtxt(path, dtype=np.float64, ndmin=2)
    if points.shape[1] != 2 or len(points) < 3:
        raise ValueError(f"{path}: expected at least 3 'x y' lines, got shape {points.shape}")
    return points


def rasterise(polygon: npt.NDArray[np.float64], shape: tuple[int, int]) -> BoolArray:
    """Pixels (rows, columns) whose centre lies inside the polygon (x = column, y = row; even-odd rule)."""
    rows, columns = shape
    x0 = max(int(np.floor(polygon[:, 0].min())), 0)
    x1 = min(int(np.ceil(polygon[:, 0].max())), columns - 1)
    y0 = max(int(np.floor(polygon[:, 1].min())), 0)
    y1 = min(int(np.ceil(polygon[:, 1].max())), rows - 1)
    mask = np.zeros(shape, dtype=bool)
    if x1 < x0 or y1 < y0:
        return mask
    yy, xx = np.mgrid[y0 : y1 + 1, x0 : x1 + 1].astype(np.float64)
    inside = np.zeros(yy.shape, dtype=bool)
    px, py = polygon[:, 0], polygon[:, 1]
    qx, qy = np.roll(px, -1), np.roll(py, -1)
    for ax, ay, bx, by in zip(px, py, qx, qy, strict=True):
        if ay == by:
            continue
        crosses = (ay > yy) != (by > yy)
        x_at = ax + (yy - ay) * (bx - ax) / (by - ay)
        inside ^= crosses & (xx < x_at)
    mask[y0 : y1 + 1, x0 : x1 + 1] = inside
    return mask


def read_case(case_dir: Path) -> list[ContouredImage]:
    """Every contoured image of a Sunnybrook case folder (``dicom/`` and ``contours/``)."""
    found: dict[int, dict[str, Path]] = {}
    for path in sorted((case_dir / "contours").glob("*-contours/*.txt")):
        match = _CONTOUR.match(path.name)
        if match:
            found.setdefault(int(match["image"]), {})[match["kind"]] = path
    images = []
    for number, kinds in sorted(found.items()):
        if "i" not in kinds:
            continue  # an epicardium alone gives neither cavity nor myocardium
        dicom = case_dir / "dicom" / f"{number}.dcm"
        header = pydicom.dcmread(dicom, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        images.append(
            ContouredImage(
                image_number=number,
                path=dicom,
                sop_instance_uid=str(header.SOPInstanceUID),
                inner=read_polygon(kinds["i"]),
                outer=read_polygon(kinds["o"]) if "o" in kinds else None,
            )
        )
    return images


def locate(volume: Volume, images: Sequence[ContouredImage]) -> dict[int, tuple[int, int]]:
    """Image number -> (time point, slice) of the cine volume holding that instance."""
    where = {
        frame.sop_instance_uid: (t, k)
        for t, frames in enumerate(volume.sources)
        for k, frame in enumerate(frames)
    }
    missing = [i.image_number for i in images if i.sop_instance_uid not in where]
    if missing:
        raise ValueError(f"contoured images {missing} are not in the volume")
    return {i.image_number: where[i.sop_instance_uid] for i in images}


def reference_labels(image: ContouredImage, shape: tuple[int, int]) -> tuple[BoolArray, BoolArray | None]:
    """(LV cavity, LV myocardium or None where no epicardium was drawn) of one contoured image."""
    cavity = rasterise(image.inner, shape)
    if image.outer is None:
        return cavity, None
    return cavity, rasterise(image.outer, shape) & ~cavity


def dice(a: BoolArray, b: BoolArray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


@dataclass(frozen=True)
class ImageAgreement:
    image_number: int
    time_point: int
    slice_index: int
    lv_dice: float
    myo_dice: float | None


@dataclass(frozen=True)
class Agreement:
    images: list[ImageAgreement]

    @property
    def lv_dice(self) -> float:
        """Mean LV cavity Dice over the contoured images."""
        return float(np.mean([i.lv_dice for i in self.images]))

    @property
    def myo_dice(self) -> float:
        """Mean myocardium Dice over the images with both contours."""
        values = [i.myo_dice for i in self.images if i.myo_dice is not None]
        return float(np.mean(values)) if values else float("nan")


def agreement(
    volume: Volume,
    labels: npt.NDArray[np.integer],
    images: Sequence[ContouredImage],
    lv_value: int,
    myo_value: int,
) -> Agreement:
    """Dice of LV cavity and myocardium of ``labels`` (time, slice, row, column) at each contoured image.
    Phases absent from ``labels`` (all zero) count as they are: run the segmentation on every phase."""
    where = locate(volume, images)
    shape = (int(labels.shape[-2]), int(labels.shape[-1]))
    rows = []
    for image in images:
        t, k = where[image.image_number]
        cavity, myocardium = reference_labels(image, shape)
        predicted = labels[t, k]
        rows.append(
            ImageAgreement(
                image_number=image.image_number,
                time_point=t,
                slice_index=k,
                lv_dice=dice(predicted == lv_value, cavity),
                myo_dice=None if myocardium is None else dice(predicted == myo_value, myocardium),
            )
        )
    return Agreement(rows)
