"""Attribute paths in rules: a keyword or a tag, optionally through sequences.

Accepted forms, segments separated by ``/`` or ``.``:
``SeriesDescription``, ``(0018,0050)``, ``00180050``, ``0018,0050``,
``SharedFunctionalGroupsSequence/PixelMeasuresSequence/SliceThickness`` (every item is searched),
``ReferencedImageSequence[0]/ReferencedSOPClassUID`` (one item).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import PersonName

_TAG_FORMS = (
    re.compile(r"^\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)$"),
    re.compile(r"^([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})$"),
    re.compile(r"^([0-9A-Fa-f]{4})([0-9A-Fa-f]{4})$"),
)
_INDEX = re.compile(r"^(.*)\[(\d+)\]$")


class AttributePathError(ValueError):
    pass


@dataclass(frozen=True)
class Step:
    tag: BaseTag
    name: str
    index: int | None


@dataclass(frozen=True)
class AttributePath:
    text: str
    steps: tuple[Step, ...]

    def values(self, ds: Dataset) -> list[Any] | None:
        """All values found along the path (None when the attribute is absent everywhere)."""
        found: list[Any] = []
        present = _walk(ds, self.steps, found)
        return found if present else None


def _parse_step(segment: str, text: str) -> Step:
    index: int | None = None
    m = _INDEX.match(segment)
    if m:
        segment, index = m.group(1), int(m.group(2))
    for form in _TAG_FORMS:
        tm = form.match(segment)
        if tm:
            tag = Tag(int(tm.group(1), 16), int(tm.group(2), 16))
            return Step(tag, keyword_for_tag(tag) or str(tag), index)
    tag_value = tag_for_keyword(segment)
    if tag_value is None:
        raise AttributePathError(
            f"{segment!r} in {text!r} is neither a DICOM keyword nor a tag like (0018,0050)"
        )
    return Step(Tag(tag_value), segment, index)


def parse_path(text: str) -> AttributePath:
    if not isinstance(text, str) or not text.strip():
        raise AttributePathError("attribute must be a non-empty keyword, tag or path")
    raw = text.strip()
    # a tag written "(0018,0050)" contains no separators we split on; keep commas inside parentheses
    segments = [s for s in re.split(r"/|\.(?![^(]*\))", raw) if s]
    steps = tuple(_parse_step(s, raw) for s in segments)
    for step in steps[:-1]:
        try:
            vr = dictionary_VR(step.tag)
        except KeyError:
            vr = "SQ"  # private tags: trust the author
        if vr != "SQ":
            raise AttributePathError(f"{step.name} in {raw!r} is not a sequence, so nothing can follow it")
    return AttributePath(raw, steps)


def _plain(value: Any) -> Any:
    if isinstance(value, MultiValue | list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, PersonName):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("latin-1", "replace").strip("\x00 ")
    if isinstance(value, str):
        return value.strip("\x00 ")
    return value


def _walk(ds: Dataset, steps: tuple[Step, ...], out: list[Any]) -> bool:
    step, rest = steps[0], steps[1:]
    if step.tag not in ds:
        return False
    elem = ds[step.tag]
    if not rest:
        value = elem.value
        if value is None or value == "" or (isinstance(value, MultiValue | list) and len(value) == 0):
            return False
        out.append(_plain(value))
        return True
    items = list(elem.value or [])
    if step.index is not None:
        items = items[step.index : step.index + 1]
    present = False
    for item in items:
        present = _walk(item, rest, out) or present
    return present
