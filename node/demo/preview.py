"""A PNG of a DICOM-SEG over its source series: a few slices, each segment's outline in its own colour.

The SEG's frames are put back on the source volume's slices through their Source Image references (or,
failing that, their Image Position along the slice normal). Slices shown: the one where the first
segment is largest, and evenly spaced ones across the segments' extent. Drawn with Pillow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from pipelines.volume import Volume, load_volume

COLOURS = ((0, 230, 0), (255, 40, 40), (40, 140, 255), (255, 200, 0), (220, 0, 220), (0, 220, 220))
TILE = 320


class PreviewError(Exception):
    """The SEG cannot be laid over the source volume; the message says why."""


@dataclass(frozen=True)
class SegMasks:
    labels: list[str]
    masks: NDArray[np.bool_]  # (segment, slice, row, column) on the source volume's grid
    referenced_series_uid: str


def seg_masks(seg_path: Path, volume: Volume) -> SegMasks:
    """The SEG's segments as boolean masks on ``volume``'s (slice, row, column) grid."""
    seg = pydicom.dcmread(seg_path)
    if str(seg.get("SOPClassUID", "")) != "1.2.840.10008.5.1.4.1.1.66.4":
        raise PreviewError(f"{seg_path} is not a DICOM Segmentation")
    labels = [str(s.SegmentLabel) for s in seg.SegmentSequence]
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    frames = np.asarray(seg.pixel_array, dtype=bool)
    if frames.ndim == 2:
        frames = frames[None]
    rows, cols = volume.voxels.shape[-2:]
    if frames.shape[1:] != (rows, cols):
        raise PreviewError(f"SEG frames are {frames.shape[1:]}, the source images {(rows, cols)}")
    by_uid = {src.sop_instance_uid: k for k, src in enumerate(volume.slice_sources)}
    positions = np.array([volume.slice_position(k) @ volume.slice_direction for k in range(volume.n_slices)])
    masks = np.zeros((len(labels), *volume.voxels.shape), dtype=bool)
    for index, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        k = _slice_of(item, by_uid, positions, volume)
        if k is None or segment not in numbers:
            raise PreviewError(f"SEG frame {index + 1} does not match any slice of the source series")
        masks[numbers.index(segment), k] |= frames[index]
    ref = seg.ReferencedSeriesSequence[0].SeriesInstanceUID if "ReferencedSeriesSequence" in seg else ""
    return SegMasks(labels=labels, masks=masks, referenced_series_uid=str(ref))


def _slice_of(
    item: pydicom.Dataset, by_uid: dict[str, int], positions: NDArray[np.float64], volume: Volume
) -> int | None:
    for derivation in item.get("DerivationImageSequence", []):
        for source in derivation.get("SourceImageSequence", []):
            k = by_uid.get(str(source.ReferencedSOPInstanceUID))
            if k is not None:
                return k
    plane = item.get("PlanePositionSequence")
    if plane:
        where = np.asarray(plane[0].ImagePositionPatient, dtype=np.float64) @ volume.slice_direction
        k = int(np.argmin(np.abs(positions - where)))
        if abs(positions[k] - where) <= volume.spacing[0] / 2:
            return k
    return None


def pick_slices(masks: NDArray[np.bool_], count: int = 4) -> list[int]:
    """Slice indices worth showing: the largest area of segment 1 and evenly spaced ones over all segments."""
    n = masks.shape[1]
    any_seg = masks.reshape(masks.shape[0], n, -1).any(axis=(0, 2))
    if not any_seg.any():
        return sorted({round(x) for x in np.linspace(0, n - 1, min(count, n))})
    present = np.flatnonzero(any_seg)
    first, last = int(present[0]), int(present[-1])
    areas = masks[0].reshape(n, -1).sum(axis=1)
    chosen = {int(np.argmax(areas))}
    for x in np.linspace(first, last, count + 2)[1:-1]:
        if len(chosen) >= count:
            break
        chosen.add(round(x))
    return sorted(chosen)


def _window(values: NDArray[np.float32], modality: str) -> NDArray[np.uint8]:
    if modality == "CT":
        low, high = -160.0, 240.0
    else:
        low, high = (float(v) for v in np.percentile(values, (1, 99.5)))
        high = max(high, low + 1.0)
    scaled = np.clip((values - low) / (high - low), 0.0, 1.0) * 255.0
    result: NDArray[np.uint8] = scaled.astype(np.uint8)
    return result


def _outline(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    result: NDArray[np.bool_] = mask & ~inner
    return result


def render_tile(
    image: NDArray[np.float32],
    masks: NDArray[np.bool_],
    modality: str,
    spacing: tuple[float, float],
    title: str,
) -> Image.Image:
    """One slice (rows, columns) with the outline of each mask, scaled to TILE px keeping the aspect."""
    grey = _window(image, modality)
    height_mm, width_mm = image.shape[0] * spacing[0], image.shape[1] * spacing[1]
    scale = TILE / max(height_mm, width_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    canvas = np.stack(
        [np.asarray(Image.fromarray(grey).resize(size, Image.Resampling.BILINEAR))] * 3, axis=-1
    )
    for index, mask in enumerate(masks):
        big = (
            np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST))
            > 0
        )
        edge = _outline(big)
        edge[1:, :] |= edge[:-1, :]  # two pixels wide
        canvas[edge] = COLOURS[index % len(COLOURS)]
    tile = Image.fromarray(np.ascontiguousarray(canvas))
    ImageDraw.Draw(tile).text((6, 4), title, fill=(255, 255, 0))
    return tile


def write_preview(
    volume: Volume, seg: SegMasks, out_path: Path, slices: Sequence[int] | None = None
) -> list[int]:
    """Write the PNG; returns the slice indices shown."""
    if volume.is_cine:
        volume = volume.time_point(0)
        seg = SegMasks(
            seg.labels, seg.masks[:, 0] if seg.masks.ndim == 5 else seg.masks, seg.referenced_series_uid
        )
    chosen = list(slices) if slices is not None else pick_slices(seg.masks)
    tiles = []
    for k in chosen:
        z = float(volume.slice_position(k) @ volume.slice_direction)
        tiles.append(
            render_tile(
                volume.voxels[k],
                seg.masks[:, k],
                volume.modality,
                (volume.spacing[1], volume.spacing[2]),
                f"slice {k + 1}/{volume.n_slices}  {z:.1f} mm",
            )
        )
    legend_h = 22
    width = sum(t.width for t in tiles)
    height = max(t.height for t in tiles) + legend_h
    sheet = Image.new("RGB", (width, height), (0, 0, 0))
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, 0))
        x += tile.width
    draw = ImageDraw.Draw(sheet)
    x = 6
    for index, label in enumerate(seg.labels):
        colour = COLOURS[index % len(COLOURS)]
        draw.rectangle((x, height - 16, x + 12, height - 6), fill=colour)
        draw.text((x + 16, height - 18), label, fill=(255, 255, 255))
        x += 24 + 7 * len(label)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_path, format="PNG")
    return chosen


def preview_from_files(seg_path: Path, source_files: Sequence[Path], out_path: Path) -> list[int]:
    """Load the source series, lay the SEG over it, write the PNG."""
    volume = load_volume(list(source_files), phase="last")
    return write_preview(volume, seg_masks(seg_path, volume), out_path)
