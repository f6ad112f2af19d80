"""Read frames into a preallocated float32 array, applying the rescale slope and intercept.

Native little-endian pixel data (Explicit/Implicit VR Little Endian) are read straight from the file
offset recorded by ``headers.py`` into a small per-frame buffer and converted in place into the output
slice: no pydicom data set, no intermediate copy of the volume. Everything else (JPEG, JPEG-LS, JPEG
2000 through pylibjpeg, RLE natively, big endian, deflate) is decoded by pydicom, once per file.
Unused high bits (Bits Stored < Bits Allocated) are cleared or sign-extended, as pydicom does.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom import dcmread

from pipelines.base import PipelineError
from pipelines.volume.headers import FileHeader, FrameHeader
from pipelines.volume.reasons import Reason, refuse

SUPPORTED_BITS = (8, 16, 32)


def _dtype(info: FileHeader) -> np.dtype[np.integer]:
    kind = "i" if info.pixel_representation == 1 else "u"
    return np.dtype(f"<{kind}{info.bits_allocated // 8}")


def store(
    raw: NDArray[np.integer], slope: float | None, intercept: float | None, out: NDArray[np.float32]
) -> None:
    """out = raw * slope + intercept in float32 (missing slope 1, missing intercept 0)."""
    s = 1.0 if slope is None else slope
    b = 0.0 if intercept is None else intercept
    if s == 1.0:
        np.add(raw, np.float32(b), out=out, casting="unsafe")
    else:
        np.multiply(raw, np.float32(s), out=out, casting="unsafe")
        if b != 0.0:
            out += np.float32(b)


def _correct_unused_bits(raw: NDArray[np.integer], info: FileHeader) -> None:
    shift = info.bits_allocated - info.bits_stored
    if 0 < shift < info.bits_allocated:
        np.left_shift(raw, shift, out=raw)
        np.right_shift(raw, shift, out=raw)  # arithmetic for signed data: sign extension


def read_frames(frames: Sequence[FrameHeader], out: NDArray[np.float32], notes: list[str]) -> None:
    """``out[n]`` = modality values of ``frames[n]``; ``out`` has shape (len(frames), rows, columns).

    Warnings of the decoders (e.g. pixel data longer than needed) are added to ``notes``.
    """
    decode_later: dict[Path, list[int]] = defaultdict(list)
    buffers: dict[np.dtype[np.integer], NDArray[np.integer]] = {}
    for n, frame in enumerate(frames):
        info = frame.file
        if info.pixel_offset is None:
            decode_later[info.path].append(n)
            continue
        dtype = _dtype(info)
        buffer = buffers.get(dtype)
        if buffer is None or buffer.shape != out.shape[1:]:
            buffer = buffers[dtype] = np.empty(out.shape[1:], dtype=dtype)
        frame_bytes = info.frame_bytes
        if info.pixel_length < frame_bytes * info.number_of_frames:
            raise refuse(
                Reason.UNDECODABLE_PIXEL_DATA,
                f"{info.path.name}: Pixel Data holds {info.pixel_length} bytes, but {info.number_of_frames} "
                f"frame(s) of {info.rows}x{info.columns} at {info.bits_allocated} bits need "
                f"{frame_bytes * info.number_of_frames}",
            )
        try:
            with open(info.path, "rb", buffering=0) as fp:
                fp.seek(info.pixel_offset + frame.frame_index * frame_bytes)
                got = fp.readinto(buffer.data.cast("B"))
        except OSError as exc:
            raise refuse(Reason.UNREADABLE_INSTANCE, f"{info.path.name}: {exc}") from exc
        if got != frame_bytes:
            raise refuse(
                Reason.UNDECODABLE_PIXEL_DATA,
                f"{frame.describe()}: read {got} of {frame_bytes} bytes of pixel data (file truncated?)",
            )
        _correct_unused_bits(buffer, info)
        store(buffer, frame.slope, frame.intercept, out[n])
    for path, indices in decode_later.items():
        _decode_file(path, [frames[n] for n in indices], [out[n] for n in indices], notes)


def _decode_file(
    path: Path, frames: list[FrameHeader], outs: list[NDArray[np.float32]], notes: list[str]
) -> None:
    info = frames[0].file
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = dcmread(path)
            if "PixelData" not in ds:
                raise refuse(Reason.NO_PIXEL_DATA, f"{path.name} has no Pixel Data (7FE0,0010)")
            array = np.asarray(ds.pixel_array)
    except PipelineError:
        raise
    except Exception as exc:  # pydicom raises many types for bad or unsupported pixel data
        raise refuse(
            Reason.UNDECODABLE_PIXEL_DATA,
            f"{path.name}: pixel data in transfer syntax {info.transfer_syntax} could not be decoded: "
            f"{type(exc).__name__}: {exc}",
        ) from exc
    for message in sorted({str(w.message) for w in caught}):
        notes.append(f"{path.name}: decoder warning: {message}")
    array = array.reshape(info.number_of_frames, info.rows, info.columns)
    for frame, out in zip(frames, outs, strict=True):
        store(array[frame.frame_index], frame.slope, frame.intercept, out)
