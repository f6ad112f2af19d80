"""A minimal Explicit VR Little Endian encoder for the repetitive parts of a multi-frame object.

pydicom encodes one element at a time through several layers of Python; for a SEG with hundreds of
frames the Per-Frame Functional Groups Sequence costs more to write than everything else. The items
of that sequence have a fixed shape, so they are built here from bytes: each element is
``tag, VR, length, value`` (PS3.5 7.1.2), sequences and items with explicit lengths (7.5).
Values are padded to even length as PS3.5 6.2 requires (UI with NUL, text with a space).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_ITEM = struct.Struct("<HHI")
_SHORT = struct.Struct("<HH2sH")
_LONG = struct.Struct("<HH2sHI")


def element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One data element; ``value`` must already have even length."""
    return element_header(tag, vr, len(value)) + value


def element_header(tag: int, vr: bytes, length: int) -> bytes:
    """Tag, VR and length of an element whose (even-length) value is written separately."""
    if length % 2:
        raise ValueError(f"odd value length for ({tag >> 16:04X},{tag & 0xFFFF:04X})")
    if vr in _LONG_VRS:
        return _LONG.pack(tag >> 16, tag & 0xFFFF, vr, 0, length)
    return _SHORT.pack(tag >> 16, tag & 0xFFFF, vr, length)


def item(content: bytes) -> bytes:
    return _ITEM.pack(0xFFFE, 0xE000, len(content)) + content


def sequence(tag: int, items: Iterable[bytes]) -> bytes:
    """A sequence element of already encoded item contents."""
    return element(tag, b"SQ", b"".join(item(content) for content in items))


def ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def text(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


def ul(values: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(values)}I", *values)


def us(values: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(values)}H", *values)


def dataset_bytes(ds: Dataset) -> bytes:
    """The elements of ``ds`` encoded by pydicom (for the few constant items, e.g. code items)."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return fp.getvalue()
