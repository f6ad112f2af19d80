"""Direct encoding of the two DIMSE command sets a C-STORE SCP handles by the thousand.

pynetdicom builds every command set as a pydicom ``Dataset`` and encodes or decodes it with pydicom:
about a millisecond per C-STORE on a slow core, more than receiving a 512 KB data set. The command
sets of a C-STORE request (decoded) and of a C-STORE response (encoded) are a handful of fixed
elements in implicit VR little endian (PS3.7 9.3.1), so they are done here directly. Anything out of
the ordinary (an unknown element, an odd length, text that is not ASCII) returns None and the caller
uses pynetdicom's own codec, so the result is always what pynetdicom would produce.
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

from pydicom.uid import UID
from pydicom.values import convert_AE_string, convert_UI
from pynetdicom.dimse_primitives import C_STORE

_ELEMENT = struct.Struct("<HHL")
_US = struct.Struct("<H")
_UL = struct.Struct("<L")

C_STORE_RQ_FIELD = 0x0001
C_STORE_RSP_FIELD = 0x8001
NO_DATA_SET = 0x0101

# (0000,eeee) elements a C-STORE-RQ may carry, by element number.
_RQ_ELEMENTS = {0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000, 0x1030, 0x1031}
_US_ELEMENTS = {0x0100, 0x0110, 0x0700, 0x0800, 0x1031}


def decode_c_store_rq(command: bytes) -> C_STORE | None:
    """The C-STORE request primitive for an encoded command set that announces a data set, or None.

    None when the command set is anything else (another command, no data set) or carries anything
    unusual: the caller then hands it to pynetdicom.
    """
    values: dict[int, bytes] = {}
    offset, end = 0, len(command)
    try:
        while offset < end:
            group, element, length = _ELEMENT.unpack_from(command, offset)
            offset += 8
            if group != 0x0000 or element not in _RQ_ELEMENTS or element in values or offset + length > end:
                return None
            values[element] = command[offset : offset + length]
            offset += length
        us = {}
        for element in _US_ELEMENTS & values.keys():
            if len(values[element]) != 2:
                return None
            us[element] = _US.unpack(values[element])[0]
        if us.get(0x0100) != C_STORE_RQ_FIELD or us.get(0x0800, NO_DATA_SET) == NO_DATA_SET:
            return None
        if 0x0110 not in us or 0x0700 not in us or 0x0002 not in values or 0x1000 not in values:
            return None
        primitive = C_STORE()
        primitive.MessageID = us[0x0110]
        primitive.AffectedSOPClassUID = _uid(values[0x0002])
        primitive.AffectedSOPInstanceUID = _uid(values[0x1000])
        primitive.Priority = us[0x0700]
        if 0x1030 in values:
            primitive.MoveOriginatorApplicationEntityTitle = _ae(values[0x1030])
        if 0x1031 in us:
            primitive.MoveOriginatorMessageID = us[0x1031]
    except (struct.error, UnicodeDecodeError, ValueError, TypeError):
        return None
    primitive.DataSet = BytesIO()
    return primitive


def _uid(raw: bytes) -> UID:
    value = convert_UI(raw, True)
    if not isinstance(value, UID):
        raise ValueError("multi-valued UID")
    return value


def _ae(raw: bytes) -> str:
    value = convert_AE_string(raw, True)
    if not isinstance(value, str):
        raise ValueError("multi-valued AE title")
    return value


def _text(tag: int, value: str, pad: bytes) -> bytes:
    encoded = value.encode("ascii")
    if len(encoded) % 2:
        encoded += pad
    return _UL.pack(tag) + _UL.pack(len(encoded)) + encoded


def _us(tag: int, value: int) -> bytes:
    return _UL.pack(tag) + b"\x02\x00\x00\x00" + _US.pack(value)


def encode_c_store_rsp(primitive: Any) -> bytes | None:
    """The encoded command set of a C-STORE response primitive, or None to let pynetdicom do it."""
    if primitive.OffendingElement is not None:
        return None
    try:
        status = int(primitive.Status)
        parts = []
        # Tags as little endian (group 0000 in the low half once packed as <L of element<<16).
        if primitive.AffectedSOPClassUID is not None:
            parts.append(_text(0x0002 << 16, str(primitive.AffectedSOPClassUID), b"\x00"))
        parts.append(_us(0x0100 << 16, C_STORE_RSP_FIELD))
        parts.append(_us(0x0120 << 16, int(primitive.MessageIDBeingRespondedTo)))
        parts.append(_us(0x0800 << 16, NO_DATA_SET))
        parts.append(_us(0x0900 << 16, status))
        if primitive.ErrorComment is not None:
            parts.append(_text(0x0902 << 16, str(primitive.ErrorComment), b" "))
        if primitive.AffectedSOPInstanceUID is not None:
            parts.append(_text(0x1000 << 16, str(primitive.AffectedSOPInstanceUID), b"\x00"))
    except (UnicodeEncodeError, struct.error, TypeError, ValueError):
        return None
    body = b"".join(parts)
    return b"\x00\x00\x00\x00\x04\x00\x00\x00" + _UL.pack(len(body)) + body
