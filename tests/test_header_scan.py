"""scan_header returns read_header's InstanceHeader exactly, or None: never another header, never raises."""

from __future__ import annotations

import io
import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import Dataset, FileMetaDataset
from pydicom.datadict import dictionary_VR
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from node.receive.header import WANTED_TAGS, HeaderError, InstanceHeader, read_header
from node.receive.header_scan import _WANTED_VR, scan_header
from tests.conftest import SHARED

# pydicom warns about the odd values several cases use on purpose (invalid VR values, odd encodings)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PROBE = 64 * 1024 + 132
MAX_SHARED_FILES = 400


def reference(data: bytes | bytearray | memoryview) -> InstanceHeader | None:
    """read_header's result, None where it refuses the bytes (HeaderError, or anything it lets escape)."""
    try:
        return read_header(bytes(data))
    except Exception:
        return None


def check(data: bytes | bytearray | memoryview, complete: bool) -> InstanceHeader | None:
    """Assert parity and return what scan_header returned."""
    got = scan_header(data, complete)
    if got is not None:
        assert got == reference(data)
    return got


def instance(**attributes: object) -> Dataset:
    """A small CT instance with every attribute read_header records, then `attributes` (None deletes)."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.StudyDate = "20240102"
    ds.AccessionNumber = "ACC123"
    ds.Modality = "CT"
    ds.StudyDescription = "ABDOMEN ROUTINE"
    ds.SeriesDescription = "AXIAL 3.0"
    ds.PatientName = "Doe^John"
    ds.PatientID = "PID-7"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.SeriesNumber = "4"
    ds.Rows = 16
    ds.Columns = 16
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\x01\x02" * 256
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def encode(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID("1.2.826.0.1.3680043.8.498.1")
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def code_item(value: str, nested: Sequence | None = None) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = f"meaning {value}"
    if nested is not None:
        item.PurposeOfReferenceCodeSequence = nested
    return item


def undefined_lengths(ds: Dataset) -> None:
    """Have every sequence and item in `ds` written with undefined length."""
    for elem in ds.iterall():
        if elem.VR == "SQ":
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True


def explicit_header(tag: int, vr: bytes, length: int) -> bytes:
    group, elem = tag >> 16, tag & 0xFFFF
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2s2xL", group, elem, vr, length)
    return struct.pack("<HH2sH", group, elem, vr, length)


def offset_of(data: bytes, tag: int, vr: bytes | None) -> int:
    """Where the element `tag` starts (its first top-level occurrence is the only one in these tests)."""
    pattern = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + (vr or b"")
    at = data.find(pattern, 132)
    assert at > 0
    return at


def with_value(data: bytes, tag: int, raw: bytes, ts: str) -> bytes:
    """`data` with the value of the top-level short-VR element `tag` replaced by `raw`."""
    group, elem = tag >> 16, tag & 0xFFFF
    if ts == ImplicitVRLittleEndian:
        at = offset_of(data, tag, None)
        old = struct.unpack_from("<L", data, at + 4)[0]
        head = struct.pack("<HHL", group, elem, len(raw))
    else:
        at = offset_of(data, tag, dictionary_VR(tag).encode())
        old = struct.unpack_from("<H", data, at + 6)[0]
        head = data[at : at + 6] + struct.pack("<H", len(raw))
    return data[:at] + head + raw + data[at + 8 + old :]


TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


def test_the_wanted_table_is_read_headers() -> None:
    assert set(_WANTED_VR) == {int(t) for t in WANTED_TAGS} | {0x00080005}
    for tag, vr in _WANTED_VR.items():
        assert dictionary_VR(tag) == vr.decode()


@pytest.mark.parametrize("ts", TRANSFER_SYNTAXES)
def test_plain_instance(ts: str) -> None:
    data = encode(instance(), ts)
    header = check(data, complete=True)
    assert header is not None and header.transfer_syntax == ts
    assert header.series_number == "4" and header.patient_name == "Doe^John"
    assert check(data, complete=False) == header  # Pixel Data is in the bytes
    assert check(bytearray(data), complete=True) == header
    assert check(memoryview(data), complete=True) == header


@pytest.mark.parametrize("ts", [JPEG2000Lossless, RLELossless, "1.2.840.10008.1.2.4.80"])
def test_encapsulated_transfer_syntaxes_are_explicit_vr(ts: str) -> None:
    ds = instance()
    ds.PixelData = encapsulate([b"\x11" * 100, b"\x22" * 50])
    ds["PixelData"].VR = "OB"
    data = encode(ds, ts)
    header = check(data, complete=True)
    assert header is not None and header.transfer_syntax == ts
    assert check(data[: offset_of(data, 0x7FE00010, b"OB") + 12], complete=False) == header


@pytest.mark.parametrize("ts", TRANSFER_SYNTAXES)
@pytest.mark.parametrize("undefined", [True, False])
def test_sequences_before_the_wanted_tags(ts: str, undefined: bool) -> None:
    ds = instance()
    # (0008,1032) lies between StudyDescription and SeriesDescription; nested sequences in its items
    ds.ProcedureCodeSequence = Sequence(
        [
            code_item("A", Sequence([code_item("A1"), code_item("A2", Sequence([code_item("A21")]))])),
            code_item("B"),
        ]
    )
    ds.ReferencedStudySequence = Sequence([])  # (0008,1110), empty
    private = Dataset()
    private.CodeValue = "P"
    ds.add_new(0x00090010, "LO", "ACME")  # a private sequence: found by looking ahead in implicit VR
    ds.add_new(0x00091001, "SQ", Sequence([private]))
    if undefined:
        undefined_lengths(ds)
    data = encode(ds, ts)
    assert (b"\xfe\xff\xdd\xe0" in data) == undefined
    header = check(data, complete=True)
    assert header is not None and header.series_description == "AXIAL 3.0"
    assert check(data, complete=False) == header


@pytest.mark.parametrize("ts", TRANSFER_SYNTAXES)
@pytest.mark.parametrize(("tag", "vr"), [(0x00091010, "OB"), (0x00281201, "OW")])
def test_encapsulated_value_before_the_wanted_tags(ts: str, tag: int, vr: str) -> None:
    ds = instance(NumberOfTemporalPositions="2", NumberOfSlices=5)  # (0054,0081) follows (0028,1201)
    ds.add_new(tag, vr, b"\xaa" * 40)
    data = encode(ds, ts)
    implicit = ts == ImplicitVRLittleEndian
    at = offset_of(data, tag, None)
    head = 8 if implicit else 12
    assert struct.unpack_from("<L", data, at + head - 4)[0] == 40
    frames = b"\xfe\xff\x00\xe0" + struct.pack("<L", 8) + b"\xbb" * 8
    frames += b"\xfe\xff\x00\xe0" + struct.pack("<L", 8) + b"\xcc" * 8 + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    assert len(frames) == 40
    data = data[: at + head - 4] + b"\xff\xff\xff\xff" + frames + data[at + head + 40 :]
    header = check(data, complete=True)
    if implicit and tag == 0x00091010:
        assert header is None  # pydicom takes an unknown tag whose value starts with an item for a sequence
    else:
        assert header is not None and header.expected_count == 10  # the walk went on past the value


def test_an_item_in_implicit_vr_inside_an_explicit_vr_sequence() -> None:
    ds = instance()
    ds.ProcedureCodeSequence = Sequence([code_item("A")])
    undefined_lengths(ds)
    data = encode(ds, ExplicitVRLittleEndian)
    at = offset_of(data, 0x00081032, b"SQ")
    item = at + 12 + 8  # past the sequence header and the item header
    elements = b"".join(
        struct.pack("<HHL", 0x0008, elem, len(value)) + value
        for elem, value in ((0x0100, b"A "), (0x0102, b"DCM "), (0x0104, b"meaning A "))
    )
    end = data.index(b"\xfe\xff\x0d\xe0", item)
    data = data[:item] + elements + data[end:]
    assert check(data, complete=True) is not None


def test_missing_required_uid() -> None:
    data = encode(instance(SOPInstanceUID=None))
    assert scan_header(data, complete=True) is None
    with pytest.raises(HeaderError):
        read_header(data)


def test_empty_required_uid() -> None:
    data = encode(instance(SeriesInstanceUID=""))
    assert scan_header(data, complete=True) is None
    with pytest.raises(HeaderError):
        read_header(data)


@pytest.mark.parametrize(
    "raw",
    [b"1.2.3\x0c", b"\t1.2.3", b" 1.2.3 ", b"1.2.3\x00", b"1.2.3\x00\t", b"1.2.3 \n", b"\x0c", b"1.2\\3.4"],
)
def test_uid_padding_and_whitespace(raw: bytes) -> None:
    """pydicom drops trailing NULs and spaces, then UID() strips whitespace."""
    for ts in TRANSFER_SYNTAXES:
        header = check(with_value(encode(instance(), ts), Tag("SeriesInstanceUID"), raw, ts), complete=True)
        assert (header is not None) == (raw.strip(b"\x00 \t\n\x0c") not in (b"", b"1.2\\3.4"))


@pytest.mark.parametrize(
    "ts", [b"1.2.840.10008.1.2 ", b" 1.2.840.10008.1.2", b"1.2.840.10008.1.2\t", b"1.2.840.10008.1.2\x00"]
)
def test_transfer_syntax_with_padding(ts: bytes) -> None:
    """A padded implicit VR UID is implicit VR for pydicom too (and recorded without the padding)."""
    data = encode(instance(), ImplicitVRLittleEndian)
    data = with_meta_value(data, 0x00020010, ts + b" " * (len(ts) % 2))
    header = check(data, complete=True)
    assert header is not None and header.transfer_syntax == ImplicitVRLittleEndian


def with_meta_value(data: bytes, tag: int, raw: bytes) -> bytes:
    """`data` with the value of the file meta element `tag` (short VR) replaced; group length fixed."""
    at = offset_of(data, tag, None)
    old = struct.unpack_from("<H", data, at + 6)[0]
    data = data[:at] + data[at : at + 6] + struct.pack("<H", len(raw)) + raw + data[at + 8 + old :]
    return (
        data[:140] + struct.pack("<L", struct.unpack_from("<L", data, 140)[0] + len(raw) - old) + data[144:]
    )


def test_backslash_in_study_description() -> None:
    data = encode(instance(StudyDescription=["ABDOMEN", "PELVIS"]))
    assert scan_header(data, complete=True) is None
    assert read_header(data).study_description not in (None, "ABDOMEN")


@pytest.mark.parametrize(
    ("charset", "name", "handled"),
    [
        ("ISO_IR 100", "Müller^Jürgen", True),
        ("ISO_IR 192", "Müller^Jürgen", True),
        ("ISO_IR 192", "山田^太郎", True),
        ("", "Doe^John", True),
        ("ISO_IR 6", "Doe^John", True),
        ("ISO 2022 IR 100", "Doe^John", False),
        ("ISO_IR 101", "Doe^John", False),
        (["ISO_IR 100", "ISO_IR 192"], "Doe^John", False),
    ],
)
def test_character_sets(charset: str | list[str], name: str, handled: bool) -> None:
    ds = instance(SpecificCharacterSet=charset, PatientName=name, StudyDescription=name.replace("^", " "))
    data = encode(ds)
    header = check(data, complete=True)
    assert (header is not None) == handled
    if header is not None:
        assert header.patient_name == name


def test_latin1_bytes_without_a_character_set() -> None:
    """No (0008,0005): pydicom decodes with its default (latin-1); so does the scanner."""
    data = encode(instance(PatientName="Doe^John"))
    data = data.replace(b"Doe^John", b"D\xf6e^John")
    assert check(data, complete=True) is not None


def test_invalid_utf8_is_left_to_pydicom() -> None:
    data = encode(instance(SpecificCharacterSet="ISO_IR 192", PatientID="QQ"))
    data = data.replace(b"QQ", b"\xc3\x28")
    assert scan_header(data, complete=True) is None
    assert read_header(data).patient_id is not None  # decoded with a replacement character


TEXT_VALUES = [
    b"PLAIN",
    b" LEADING",
    b"TRAILING  ",
    b"NUL\x00",
    b"\x00\x00",
    b"  ",
    b"",
    b"A\\B",
    b"TAB\tINSIDE",
    b"X" * 300,
    b"A=B",
    b"A^B=C^D",
    b"=",
    b"ESC\x1b(B",
    b"LATIN\xe9",
]


@pytest.mark.parametrize("ts", TRANSFER_SYNTAXES)
@pytest.mark.parametrize("keyword", ["Modality", "PatientID", "PatientName", "StudyDate", "AccessionNumber"])
@pytest.mark.parametrize("raw", TEXT_VALUES)
def test_text_values(ts: str, keyword: str, raw: bytes) -> None:
    data = with_value(encode(instance(), ts), Tag(keyword), raw, ts)
    header = check(data, complete=True)
    if raw.isascii() and not any(c in raw for c in (b"\\", b"=", b"\x1b")):
        assert header is not None


IS_VALUES = [b"12", b" 12", b"007", b"+5", b"-3", b"0", b"-0", b"1.0", b"1.5", b"abc", b"", b"  ", b"1\\2"]
IS_VALUES += [b"1e3", b"12345678901", b"\t5", b"5\x00", b"\x005", b"1_000"]


@pytest.mark.parametrize("ts", TRANSFER_SYNTAXES)
@pytest.mark.parametrize("keyword", ["SeriesNumber", "ImagesInAcquisition", "NumberOfTemporalPositions"])
@pytest.mark.parametrize("raw", IS_VALUES)
def test_integer_strings(ts: str, keyword: str, raw: bytes) -> None:
    ds = instance(NumberOfSlices=3, ImagesInAcquisition="9", NumberOfTemporalPositions="2")
    data = with_value(encode(ds, ts), Tag(keyword), raw, ts)
    header = check(data, complete=True)
    if raw.strip() in (b"12", b"007", b"-3", b"0", b""):
        assert header is not None


def test_invalid_integer_string_is_never_a_different_header() -> None:
    data = with_value(encode(instance()), Tag("SeriesNumber"), b"abc ", ExplicitVRLittleEndian)
    assert scan_header(data, complete=True) is None
    check(data, complete=True)


@pytest.mark.parametrize("ts", TRANSFER_SYNTAXES)
def test_expected_count(ts: str) -> None:
    both = check(
        encode(instance(NumberOfTemporalPositions="20", NumberOfSlices=12, ImagesInAcquisition="5"), ts), True
    )
    assert both is not None and both.expected_count == 240
    assert both.expected_source == "NumberOfTemporalPositions x NumberOfSlices"
    images = check(encode(instance(ImagesInAcquisition="5", NumberOfSlices=12), ts), True)
    assert images is not None and (images.expected_count, images.expected_source) == (
        5,
        "ImagesInAcquisition",
    )
    zero = check(encode(instance(NumberOfTemporalPositions="0", NumberOfSlices=12), ts), True)
    assert zero is not None and zero.expected_count is None
    none = check(encode(instance(), ts), True)
    assert none is not None and none.expected_count is None and none.expected_source is None


@pytest.mark.parametrize("length", [0, 1, 4])
def test_number_of_slices_of_another_length(length: int) -> None:
    data = encode(instance(NumberOfTemporalPositions="2", NumberOfSlices=7))
    at = offset_of(data, 0x00540081, b"US")
    data = data[:at] + explicit_header(0x00540081, b"US", length) + b"\x07" * length + data[at + 10 :]
    header = check(data, complete=True)
    if length == 0:
        assert header is not None and header.expected_count is None  # an empty value: absent


def test_vr_other_than_the_dictionarys() -> None:
    ds = instance()
    ds.add_new(0x00200011, "LO", "4")  # SeriesNumber as LO: pydicom keeps the VR it reads
    data = encode(ds)
    assert scan_header(data, complete=True) is None
    un = encode(instance(SeriesNumber="44"))
    un = un.replace(b"\x20\x00\x11\x00IS\x02\x0044", b"\x20\x00\x11\x00UN\x00\x00\x02\x00\x00\x0044", 1)
    assert check(un, complete=True) is None  # pydicom reads it as IS all the same: the scanner leaves it


@pytest.mark.parametrize("ts", TRANSFER_SYNTAXES)
def test_truncated_wanted_value(ts: str) -> None:
    data = encode(instance(), ts)
    cut = data.index(b"ABDOMEN ROUTINE") + 4
    assert scan_header(data[:cut], complete=True) is None
    assert scan_header(data[:cut], complete=False) is None
    with pytest.raises(HeaderError):
        read_header(data[:cut])


@pytest.mark.parametrize("ts", TRANSFER_SYNTAXES)
def test_data_cut_before_number_of_slices(ts: str) -> None:
    data = encode(instance(NumberOfTemporalPositions="3", NumberOfSlices=10), ts)
    cut = offset_of(data, 0x00540081, b"US" if ts == ExplicitVRLittleEndian else None)
    assert scan_header(data[:cut], complete=False) is None  # NumberOfSlices may follow
    whole = check(data[:cut], complete=True)
    assert whole is not None and whole == read_header(data[:cut]) and whole.expected_count is None
    assert check(data, complete=True) is not None and read_header(data).expected_count == 30


@pytest.mark.parametrize("ts", TRANSFER_SYNTAXES)
def test_probe_that_ends_before_pixel_data(ts: str) -> None:
    data = encode(instance(), ts)
    pixel = offset_of(data, 0x7FE00010, b"OW" if ts == ExplicitVRLittleEndian else None)
    assert check(data[: pixel + 12], complete=False) is not None
    for cut in (pixel, pixel + 4, pixel - 1):
        assert scan_header(data[:cut], complete=False) is None


@pytest.mark.parametrize("ts", [ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian])
def test_big_endian_and_deflated(ts: str) -> None:
    data = encode(instance(), ts)
    assert read_header(data).transfer_syntax == ts
    assert scan_header(data, complete=True) is None


def test_file_meta_without_group_length_or_with_a_wrong_one() -> None:
    data = encode(instance())
    wrong = data[:140] + struct.pack("<L", struct.unpack_from("<L", data, 140)[0] + 2) + data[144:]
    assert scan_header(wrong, complete=True) is None
    without = data[:132] + data[144:]
    assert check(without, complete=True) is not None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"DICM",
        b"\x00" * 128 + b"DICM",
        b"\x00" * 128 + b"DICN" + b"\x00" * 100,
        b"\x00" * 4096,
        bytes(range(256)) * 4,
        b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00",
        b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff1.2",
    ],
)
def test_garbage(data: bytes) -> None:
    for complete in (True, False):
        assert scan_header(data, complete) is None


def test_random_bytes() -> None:
    rng = random.Random(7)
    for size in (0, 1, 131, 132, 140, 500, 5000):
        for _ in range(20):
            noise = bytes(rng.getrandbits(8) for _ in range(size))
            for data in (noise, b"\x00" * 128 + b"DICM" + noise):
                for complete in (True, False):
                    check(data, complete)


def _fuzz_sources() -> list[bytes]:
    plain = encode(instance(NumberOfTemporalPositions="3", NumberOfSlices=10))
    seq = instance(ImagesInAcquisition="12")
    seq.ProcedureCodeSequence = Sequence([code_item("A", Sequence([code_item("A1")])), code_item("B")])
    undefined_lengths(seq)
    return [plain, encode(seq, ImplicitVRLittleEndian), encode(seq, ExplicitVRLittleEndian)]


@pytest.mark.parametrize("source", range(3))
def test_fuzz_truncations_and_flips(source: int) -> None:
    data = _fuzz_sources()[source]
    rng = random.Random(1000 + source)
    mutations: list[Callable[[bytes], bytes]] = [
        lambda d: d[: rng.randrange(len(d))],
        lambda d: _flip(d, rng, 1),
        lambda d: _flip(d, rng, 4),
        lambda d: _flip(d[: rng.randrange(132, len(d))], rng, 2),
    ]
    handled = 0
    for _ in range(200):
        mutated = rng.choice(mutations)(data)
        for complete in (True, False):
            handled += check(mutated, complete) is not None
    assert handled > 0  # not everything is refused: many flips hit values the header does not use


def _flip(data: bytes, rng: random.Random, count: int) -> bytes:
    out = bytearray(data)
    for _ in range(count):
        at = rng.randrange(132, len(out))
        out[at] = rng.choice((0x00, 0xFF, 0x5C, 0x20, rng.getrandbits(8)))
    return bytes(out)


def _shared_files() -> list[Path]:
    found = []
    for path in sorted(SHARED.rglob("*")):
        if path.suffix.lower() not in (".dcm", "") or not path.is_file():
            continue
        with path.open("rb") as fh:
            head = fh.read(132)
        if len(head) == 132 and head[128:] == b"DICM":
            found.append(path)
    return found[:MAX_SHARED_FILES]


def test_shared_data_parity() -> None:
    if not SHARED.is_dir():
        pytest.skip(f"real data {SHARED} is absent (../shared/data is provided in CI and dev machines)")
    files = _shared_files()
    if not files:
        pytest.skip(f"no Part 10 files under {SHARED}")
    little_endian = handled = 0
    for path in files:
        data = path.read_bytes()
        whole = reference(data)
        header = check(data, complete=True)
        probe = check(data[:PROBE], complete=False)
        if probe is not None:
            assert probe == whole  # what the caller relies on: the probe's header is the whole file's
        if whole is not None and whole.transfer_syntax not in (
            ExplicitVRBigEndian,
            DeflatedExplicitVRLittleEndian,
        ):
            little_endian += 1
            handled += header is not None
    assert little_endian > 0
    assert handled > 0.8 * little_endian, f"scanned only {handled} of {little_endian} readable files"


def test_header_of_file(tmp_path: Path) -> None:
    """header_of_file gives read_header's result for a file, scanned or not, and its errors."""
    from node.receive.header_scan import FILE_SCAN_BYTES, header_of_file

    small = tmp_path / "small.dcm"
    small.write_bytes(encode(instance()))
    assert header_of_file(small) == read_header(small)
    big = tmp_path / "big.dcm"
    ds = instance()
    ds.PixelData = b"\x00\x01" * FILE_SCAN_BYTES  # the scan sees Pixel Data in the first bytes
    big.write_bytes(encode(ds))
    assert header_of_file(big) == read_header(big)
    unsure = tmp_path / "big-endian.dcm"
    unsure.write_bytes(encode(instance(), ExplicitVRBigEndian))
    assert scan_header(unsure.read_bytes(), complete=True) is None
    assert header_of_file(unsure) == read_header(unsure)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00")
    with pytest.raises(HeaderError):
        read_header(broken)
    with pytest.raises(HeaderError):
        header_of_file(broken)
    with pytest.raises(FileNotFoundError):  # as read_header
        header_of_file(tmp_path / "missing.dcm")
