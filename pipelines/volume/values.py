"""Fast, tolerant access to a few element values of a pydicom data set.

pydicom keeps elements it has read as raw bytes until they are accessed; converting them through
``Dataset.__getattr__`` (value validation, multi-value objects) costs more than the whole header read.
The loader needs a dozen simple values per instance, so they are decoded here from the raw bytes:
strings (ASCII VRs) and the binary integer / float VRs. Anything else, or an element pydicom has
already converted, goes through pydicom. Invalid values come back as None instead of raising.
"""

from __future__ import annotations

import struct
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

_STRING_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "SH", "ST", "TM", "UI", "UT", "UC"}
)
_BINARY = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d", "UV": "Q", "SV": "q"}


def _vr(raw: RawDataElement) -> str | None:
    if raw.VR is not None:
        return str(raw.VR)
    try:
        return str(dictionary_VR(raw.tag))
    except KeyError:
        return None


def raw_strings(ds: Dataset | None, tag: int) -> list[str] | None:
    """The value(s) of a string element as stripped strings; None when absent or empty."""
    values = _values(ds, tag)
    if values is None:
        return None
    result = [str(v).strip(" \x00") for v in values]
    return result if any(result) else None


def text(ds: Dataset | None, tag: int) -> str:
    values = raw_strings(ds, tag)
    return "\\".join(values) if values else ""


def numbers(ds: Dataset | None, tag: int) -> list[float] | None:
    """Numeric value(s) (DS, IS, US, FD, ...); None when absent, empty or not numeric."""
    values = _values(ds, tag)
    if values is None:
        return None
    try:
        result = [float(str(v).strip(" \x00")) if isinstance(v, str | bytes) else float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return result or None


def number(ds: Dataset | None, tag: int) -> float | None:
    values = numbers(ds, tag)
    return values[0] if values else None


def integer(ds: Dataset | None, tag: int) -> int | None:
    value = number(ds, tag)
    if value is None or not value.is_integer():
        return None
    return int(value)


def raw_text_or_numbers(ds: Dataset | None, tag: int) -> list[str] | None:
    """Values as written, for messages about values that could not be used."""
    values = _values(ds, tag)
    return None if values is None else [str(v).strip(" \x00") for v in values]


def _values(ds: Dataset | None, tag: int) -> list[Any] | None:
    if ds is None:
        return None
    elem = ds.get_item(Tag(tag))
    if elem is None:
        return None
    if isinstance(elem, RawDataElement):
        value = elem.value
        if value is None:
            return None
        vr = _vr(elem)
        if vr in _STRING_VRS:
            if not value:
                return None
            return value.decode("latin-1").split("\\")
        code = _BINARY.get(vr or "")
        if code is not None:
            size = struct.calcsize(code)
            count = len(value) // size
            if count == 0:
                return None
            order = "<" if elem.is_little_endian else ">"
            return list(struct.unpack(f"{order}{count}{code}", value[: count * size]))
    try:
        converted = ds[Tag(tag)].value
    except (ValueError, TypeError, KeyError):
        return None
    if converted is None or converted == "":
        return None
    if isinstance(converted, list | tuple) or type(converted).__name__ == "MultiValue":
        return list(converted)
    return [converted]
