"""A fast scanner for the header attributes ``read_header`` extracts, for the C-STORE hot path.

``node.receive.header.read_header`` (pydicom ``dcmread`` with ``specific_tags``) costs about 1.2 ms per
instance, most of it pydicom machinery around a handful of values. ``scan_header`` walks the Part 10 bytes
with ``struct`` instead: the file meta group for the transfer syntax, then the top-level data set elements up
to Pixel Data, skipping values it does not need without copying them, and decodes the few it does need.

It mirrors what pydicom does with the same bytes, and wherever it is not certain of that (big endian or
deflated data, an unusual character set, non-ASCII text it cannot decode the same way, multi-valued or
malformed values, a VR that differs from the dictionary, truncated or inconsistent structure, repeated or
unordered tags, pydicom settings other than the defaults...) it returns None and the caller parses with
``read_header``. So a header it returns is always field for field the one ``read_header`` would return.
"""

from __future__ import annotations

from pathlib import Path
from struct import Struct

from pydicom import config, hooks
from pydicom.datadict import dictionary_VR
from pydicom.uid import PrivateTransferSyntaxes

from node.receive.header import WANTED_TAGS, InstanceHeader, expected_count, read_header

__all__ = ["header_of_file", "scan_header"]

#: How much of a file ``header_of_file`` scans before it leaves the file to read_header.
FILE_SCAN_BYTES = 1024 * 1024

_EXPLICIT = Struct("<HH2sH")  # tag, VR, 16-bit length
_IMPLICIT = Struct("<HHL")  # tag, 32-bit length (also items and delimiters)
_U32 = Struct("<L")
_U16 = Struct("<H")
_TAG = Struct("<HH")

_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # pydicom's stop_before_pixels

# Explicit VR header size: 12 for the VRs with 2 reserved bytes and a 32-bit length, 8 for the others.
_LONG_VRS = b"OB OD OF OL OV OW SQ UC UN UR UT SV UV".split()
_SHORT_VRS = b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split()
_HEADER_SIZE = {vr: 12 for vr in _LONG_VRS} | {vr: 8 for vr in _SHORT_VRS}

_IMPLICIT_LE = "1.2.840.10008.1.2"
# Data set encodings other than explicit VR little endian (or pydicom reads them differently).
_NOT_HANDLED = frozenset({"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"})

_CHARSET = 0x00080005
_SOP_CLASS = 0x00080016
_SOP_INSTANCE = 0x00080018
_STUDY_DATE = 0x00080020
_ACCESSION = 0x00080050
_MODALITY = 0x00080060
_STUDY_DESCRIPTION = 0x00081030
_SERIES_DESCRIPTION = 0x0008103E
_PATIENT_NAME = 0x00100010
_PATIENT_ID = 0x00100020
_STUDY_UID = 0x0020000D
_SERIES_UID = 0x0020000E
_SERIES_NUMBER = 0x00200011
_TEMPORAL_POSITIONS = 0x00200105
_IMAGES_IN_ACQUISITION = 0x00201002
_NUMBER_OF_SLICES = 0x00540081

# read_header's WANTED_TAGS and Specific Character Set, with their dictionary VR.
_WANTED_VR = {tag: dictionary_VR(tag).encode() for tag in [_CHARSET, *map(int, WANTED_TAGS)]}

# Specific Character Set values whose decoding of text is plain latin-1 or UTF-8 in pydicom.
_ENCODINGS = {"": "latin_1", "ISO_IR 6": "latin_1", "ISO_IR 100": "latin_1", "ISO_IR 192": "utf_8"}


class _Unsure(Exception):
    """The bytes hold something the scanner does not mirror pydicom on: the caller uses read_header."""


def scan_header(data: bytes | bytearray | memoryview, complete: bool) -> InstanceHeader | None:
    """Return the InstanceHeader read_header would return for `data`, or None where not certain of it.

    `data` is a Part 10 byte string: preamble, file meta and the data set, all of it when `complete`, or
    its first bytes otherwise (then a header is returned only when the walk reaches Pixel Data in them).
    Never raises.
    """
    try:
        return _scan(memoryview(data).cast("B"), complete)
    except Exception:  # _Unsure, or anything malformed this did not foresee
        return None


def header_of_file(path: Path) -> InstanceHeader:
    """``read_header(path)``, scanning the first FILE_SCAN_BYTES of the file first.

    Raises what read_header raises, where it raises it (the fallback reads the file again)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(FILE_SCAN_BYTES)
    except OSError:
        return read_header(path)
    scanned = scan_header(head, complete=len(head) < FILE_SCAN_BYTES)
    return scanned if scanned is not None else read_header(path)


def _pydicom_defaults() -> bool:
    """Whether pydicom reads with the settings this scanner mirrors."""
    return (
        config.settings.reading_validation_mode != config.RAISE
        and config.settings.infer_sq_for_un_vr
        and config.assume_implicit_vr_switch
        and not config.datetime_conversion
        and not config.use_IS_numpy
        and not config.use_none_as_empty_text_VR_value
        and config.data_element_callback is None
        and not hooks.hooks.raw_element_kwargs
        and hooks.hooks.raw_element_vr is hooks.raw_element_vr
        and hooks.hooks.raw_element_value is hooks.raw_element_value
    )


def _scan(buf: memoryview, complete: bool) -> InstanceHeader:
    if not _pydicom_defaults() or len(buf) < 132 or buf[128:132].tobytes() != b"DICM":
        raise _Unsure
    transfer_syntax, pos = _file_meta(buf)
    if transfer_syntax in _NOT_HANDLED or transfer_syntax in PrivateTransferSyntaxes:
        raise _Unsure
    found = _data_set(buf, pos, transfer_syntax == _IMPLICIT_LE, complete)
    return _header(found, transfer_syntax)


def _file_meta(buf: memoryview) -> tuple[str, int]:
    """Walk the group 0002 elements (explicit VR little endian); return the transfer syntax and its end."""
    end = len(buf)
    pos = 132
    previous = -1
    group_length_end = -1
    transfer_syntax = ""
    while end - pos >= 8:
        group, elem, vr, length = _EXPLICIT.unpack_from(buf, pos)
        if group != 2:
            break
        tag = 0x20000 | elem
        size = _HEADER_SIZE.get(vr)
        if size is None or tag <= previous or end - pos < size:
            raise _Unsure
        if size == 12:
            (length,) = _U32.unpack_from(buf, pos + 8)
        value = pos + size
        pos = value + length
        if length == _UNDEFINED or pos > end:
            raise _Unsure
        if previous < 0 and (tag, vr) not in ((0x20000, b"UL"), (0x20001, b"OB")):
            raise _Unsure  # pydicom converts the first element to check the encoding: keep it simple
        previous = tag
        if tag == 0x20000:
            if vr != b"UL" or length != 4:
                raise _Unsure
            group_length_end = pos + _U32.unpack_from(buf, value)[0]
        elif tag == 0x20010:
            if vr != b"UI":
                raise _Unsure
            transfer_syntax = _uid(buf[value:pos].tobytes())
    if not transfer_syntax or group_length_end not in (-1, pos):
        raise _Unsure
    return transfer_syntax, pos


def _data_set(buf: memoryview, pos: int, implicit: bool, complete: bool) -> dict[int, bytes]:
    """Walk the top-level elements up to Pixel Data; return the raw values of the wanted ones."""
    end = len(buf)
    # pydicom guesses explicit or implicit VR from the first element and may switch: only follow agreement.
    if end - pos >= 6 and _looks_like_vr(buf, pos + 4) == implicit:
        raise _Unsure
    found: dict[int, bytes] = {}
    at_pixel_data = (_walk_implicit if implicit else _walk_explicit)(buf, pos, end, found)
    if not (at_pixel_data or complete):
        raise _Unsure  # the rest of the data set may hold attributes
    return found


# The two walks are the hot loop, hence the local names and the common case first. They end where pydicom
# stops: at Pixel Data (returning True), or where fewer than 8 bytes are left (False), also when a skipped
# value ran past the end. Tags must ascend, which also refuses group 0000 (a command set) and repeats.


def _walk_implicit(buf: memoryview, pos: int, end: int, found: dict[int, bytes]) -> bool:
    unpack = _IMPLICIT.unpack_from
    wanted = _WANTED_VR
    previous = 0xFFFF
    last = end - 8
    while pos <= last:
        group, elem, length = unpack(buf, pos)
        tag = group << 16 | elem
        if tag <= previous:
            raise _Unsure
        previous = tag
        pos += 8
        if tag in wanted:
            value = pos
            pos += length
            if length == 0xFFFFFFFF or pos > end:
                raise _Unsure  # read_header reports the truncation
            found[tag] = buf[value:pos].tobytes()
        elif length != 0xFFFFFFFF and tag < 0x7FE00008:
            pos += length
        elif tag in _PIXEL_TAGS:
            return True
        elif group == 0xFFFE:
            raise _Unsure
        elif length == 0xFFFFFFFF:
            pos = _skip_undefined(buf, pos, end, tag, None, implicit=True)
        else:
            pos += length
    return False


def _walk_explicit(buf: memoryview, pos: int, end: int, found: dict[int, bytes]) -> bool:
    unpack = _EXPLICIT.unpack_from
    header_size = _HEADER_SIZE.get
    wanted = _WANTED_VR
    previous = 0xFFFF
    last = end - 8
    while pos <= last:
        group, elem, vr, length = unpack(buf, pos)
        tag = group << 16 | elem
        if tag <= previous:
            raise _Unsure
        previous = tag
        size = header_size(vr, 0)  # 0: not a VR; pydicom reads it otherwise
        if size == 12:
            if end - pos < 12:
                raise _Unsure  # pydicom fails on the missing length
            (length,) = _U32.unpack_from(buf, pos + 8)
        pos += size
        if tag in wanted:
            value = pos
            pos += length
            if vr != wanted[tag] or pos > end:
                raise _Unsure  # read_header reads another type, or reports the truncation
            found[tag] = buf[value:pos].tobytes()
        elif size and length != 0xFFFFFFFF and tag < 0x7FE00008:
            pos += length
        elif tag in _PIXEL_TAGS:
            return True
        elif not size or group == 0xFFFE:
            raise _Unsure
        elif length == 0xFFFFFFFF:
            pos = _skip_undefined(buf, pos, end, tag, vr, implicit=False)
        else:
            pos += length
    return False


def _looks_like_vr(buf: memoryview, pos: int) -> bool:
    """pydicom's test for explicit VR: two upper case letters."""
    return 0x40 < buf[pos] < 0x5B and 0x40 < buf[pos + 1] < 0x5B


def _skip_undefined(buf: memoryview, pos: int, end: int, tag: int, vr: bytes | None, implicit: bool) -> int:
    """Skip an undefined length value (a sequence, or encapsulated data) as pydicom parses it."""
    if vr is not None:
        is_sequence = vr in (b"SQ", b"UN")
    else:
        try:
            is_sequence = dictionary_VR(tag) == "SQ"
        except KeyError:  # pydicom looks ahead for an item
            if end - pos < 4:
                raise _Unsure from None
            group, elem = _TAG.unpack_from(buf, pos)
            is_sequence = group << 16 | elem == _ITEM
    if is_sequence:
        return _skip_sequence(buf, pos, end, implicit)
    while True:  # encapsulated: items of defined length up to the sequence delimiter
        if end - pos < 8:
            raise _Unsure
        group, elem, length = _IMPLICIT.unpack_from(buf, pos)
        pos += 8
        if group << 16 | elem == _SEQUENCE_END and length == 0:
            return pos
        pos += length
        if group << 16 | elem != _ITEM or pos > end:
            raise _Unsure


def _skip_sequence(buf: memoryview, pos: int, end: int, implicit: bool) -> int:
    """Skip the items of an undefined length sequence and its delimiter; return the position after it."""
    while True:
        if end - pos < 8:
            raise _Unsure
        group, elem, length = _IMPLICIT.unpack_from(buf, pos)
        pos += 8
        tag = group << 16 | elem
        if tag == _SEQUENCE_END and length == 0:
            return pos
        if tag != _ITEM:
            raise _Unsure
        if length == _UNDEFINED:
            pos = _skip_item(buf, pos, end, implicit, defined=False)
        elif pos + length > end:
            raise _Unsure
        else:
            pos = _skip_item(buf, pos, pos + length, implicit, defined=True)


def _skip_item(buf: memoryview, pos: int, end: int, implicit: bool, defined: bool) -> int:
    """Skip the elements of one sequence item (up to `end` if `defined`, else to its delimiter)."""
    # As pydicom: an item in an explicit VR sequence may be encoded in implicit VR.
    if not implicit and end - pos >= 6 and not _looks_like_vr(buf, pos + 4):
        implicit = True
    while True:
        if defined and pos == end:
            return pos
        if end - pos < 8:
            raise _Unsure
        group, elem, length = _IMPLICIT.unpack_from(buf, pos)
        tag = group << 16 | elem
        if tag == _ITEM_END and length == 0 and not defined:
            return pos + 8
        if group == 0xFFFE or tag == _CHARSET:
            raise _Unsure  # a stray delimiter, or a character set pydicom converts while reading
        vr = None
        value = pos + 8
        if not implicit:
            group, elem, vr, length = _EXPLICIT.unpack_from(buf, pos)
            size = _HEADER_SIZE.get(vr)
            if size is None or end - pos < size:
                raise _Unsure
            if size == 12:
                (length,) = _U32.unpack_from(buf, pos + 8)
            value = pos + size
        if length == _UNDEFINED:
            pos = _skip_undefined(buf, value, end, tag, vr, implicit)
        else:
            pos = value + length
            if pos > end:
                raise _Unsure


def _ascii(raw: bytes) -> str:
    if not raw.isascii():
        raise _Unsure
    return raw.decode("ascii")


def _uid(raw: bytes) -> str:
    """A UI value as pydicom reads it: without the trailing padding, then whitespace (UID() strips it)."""
    text = _ascii(raw).rstrip("\x00 ")
    if "\\" in text:
        raise _Unsure  # multi-valued
    return text.strip()


def _required_uid(raw: bytes | None) -> str:
    uid = _uid(raw).strip("\x00 ") if raw is not None else ""
    if not uid:
        raise _Unsure  # read_header reports it missing
    return uid


def _stripped(value: str) -> str | None:
    """As read_header's _text, for a single value as pydicom decodes it."""
    if "\\" in value:
        raise _Unsure  # multi-valued: read_header would record str() of a MultiValue
    return value.strip("\x00 ")[:256] or None


def _plain_text(raw: bytes | None) -> str | None:
    """CS and DA: decoded with pydicom's default encoding whatever the character set; ASCII only here."""
    return None if raw is None else _stripped(_ascii(raw))


def _coded_text(raw: bytes | None, encoding: str) -> str | None:
    """SH and LO: decoded with the Specific Character Set."""
    if raw is None:
        return None
    if b"\x1b" in raw:
        raise _Unsure  # escape sequences switch the encoding in pydicom
    if raw.isascii():
        return _stripped(raw.decode("ascii"))
    try:
        return _stripped(raw.decode(encoding))
    except UnicodeDecodeError:
        raise _Unsure from None  # pydicom decodes with replacement characters


def _person_name(raw: bytes | None, encoding: str) -> str | None:
    if raw is None:
        return None
    raw = raw.rstrip(b"\x00 ")
    if b"=" in raw:
        raise _Unsure  # name groups: str(PersonName) drops empty ones
    return _coded_text(raw, encoding)


def _integer_string(raw: bytes | None) -> tuple[str | None, int | None]:
    """An IS value as read_header's _text and _positive_int see it; plain integers only."""
    if raw is None:
        return None, None
    text = _ascii(raw).rstrip(" \x00").lstrip(" ")
    if not text:
        return None, None
    digits = text[1:] if text[0] in "+-" else text
    if not (digits.isdigit() and len(digits) < 10):
        raise _Unsure  # pydicom may read a float, a MultiValue, or fail
    number = int(text)
    return text, number if number > 0 else None


def _header(found: dict[int, bytes], transfer_syntax: str) -> InstanceHeader:
    charset = found.get(_CHARSET)
    encoding = _ENCODINGS.get(_ascii(charset).rstrip(" \x00") if charset is not None else "")
    if encoding is None:
        raise _Unsure
    series_number, _ = _integer_string(found.get(_SERIES_NUMBER))
    _, temporal = _integer_string(found.get(_TEMPORAL_POSITIONS))
    _, images = _integer_string(found.get(_IMAGES_IN_ACQUISITION))
    slices = None
    raw_slices = found.get(_NUMBER_OF_SLICES, b"")
    if len(raw_slices) == 2:
        slices = _U16.unpack(raw_slices)[0] or None
    elif raw_slices:
        raise _Unsure
    expected, source = expected_count(temporal, slices, images)
    return InstanceHeader(
        sop_class_uid=_required_uid(found.get(_SOP_CLASS)),
        sop_instance_uid=_required_uid(found.get(_SOP_INSTANCE)),
        study_uid=_required_uid(found.get(_STUDY_UID)),
        series_uid=_required_uid(found.get(_SERIES_UID)),
        transfer_syntax=transfer_syntax,
        modality=_plain_text(found.get(_MODALITY)),
        patient_id=_coded_text(found.get(_PATIENT_ID), encoding),
        patient_name=_person_name(found.get(_PATIENT_NAME), encoding),
        study_date=_plain_text(found.get(_STUDY_DATE)),
        accession_number=_coded_text(found.get(_ACCESSION), encoding),
        study_description=_coded_text(found.get(_STUDY_DESCRIPTION), encoding),
        series_number=series_number,
        series_description=_coded_text(found.get(_SERIES_DESCRIPTION), encoding),
        expected_count=expected,
        expected_source=source,
    )
