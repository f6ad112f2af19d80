"""Find the DICOM files of a folder, and send them by C-STORE over one association, timing each answer."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pynetdicom import AE

from node.dispatch.reactor_guard import guard_responses

MAX_CONTEXTS = 128


class SendError(Exception):
    """The folder holds no usable DICOM, or the node refused the association or instances."""


@dataclass(frozen=True)
class DicomFile:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    study_uid: str
    series_uid: str
    modality: str
    series_description: str


@dataclass
class Scan:
    files: list[DicomFile]
    skipped: list[Path] = field(default_factory=list)  # not DICOM, DICOMDIR, or without SOP UIDs

    @property
    def studies(self) -> list[str]:
        return sorted({f.study_uid for f in self.files})

    @property
    def series(self) -> dict[str, list[DicomFile]]:
        out: dict[str, list[DicomFile]] = {}
        for f in self.files:
            out.setdefault(f.series_uid, []).append(f)
        return out


def scan_folder(folder: Path) -> Scan:
    """Every DICOM Part-10 file (or bare data set with SOP UIDs) below ``folder``, hidden files skipped."""
    if not folder.is_dir():
        raise SendError(f"{folder} is not a folder")
    files: list[DicomFile] = []
    skipped: list[Path] = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(p.startswith(".") for p in path.relative_to(folder).parts):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=False)
        except (InvalidDicomError, OSError, ValueError, EOFError, TypeError, KeyError, AttributeError):
            skipped.append(path)
            continue
        sop_class = str(ds.get("SOPClassUID", "") or "")
        sop_uid = str(ds.get("SOPInstanceUID", "") or "")
        meta = getattr(ds, "file_meta", None)
        ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
        if not sop_class or not sop_uid or sop_class == "1.2.840.10008.1.3.10":  # DICOMDIR
            skipped.append(path)
            continue
        files.append(
            DicomFile(
                path=path,
                sop_class_uid=sop_class,
                sop_instance_uid=sop_uid,
                transfer_syntax=ts or "1.2.840.10008.1.2",
                study_uid=str(ds.get("StudyInstanceUID", "") or ""),
                series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
                modality=str(ds.get("Modality", "") or ""),
                series_description=str(ds.get("SeriesDescription", "") or ""),
            )
        )
    return Scan(files=files, skipped=skipped)


@dataclass(frozen=True)
class SendResult:
    statuses: dict[str, int]  # SOP Instance UID -> C-STORE status
    started_at: float  # time.time() before associating
    last_response_at: float  # time.time() when the last C-STORE response arrived
    errors: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> why it was not sent

    @property
    def failed(self) -> dict[str, int]:
        return {uid: s for uid, s in self.statuses.items() if s not in (0x0000, 0xB000, 0xB006, 0xB007)}


def send_files(
    files: Sequence[DicomFile], host: str, port: int, called_ae: str, calling_ae: str, timeout: float = 120
) -> SendResult:
    """C-STORE every file over one association (each in its own transfer syntax)."""
    if not files:
        raise SendError("nothing to send")
    contexts = sorted({(f.sop_class_uid, f.transfer_syntax) for f in files})
    if len(contexts) > MAX_CONTEXTS:
        raise SendError(f"{len(contexts)} SOP class / transfer syntax pairs; one association holds 128")
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class, ts in contexts:
        ae.add_requested_context(sop_class, ts)
    started = time.time()
    assoc = ae.associate(host, port, ae_title=called_ae)
    guard_responses(assoc)
    if not assoc.is_established:
        raise SendError(f"segnode at {host}:{port} did not accept an association from {calling_ae}")
    statuses: dict[str, int] = {}
    last = started
    errors: dict[str, str] = {}
    try:
        for f in files:
            if not assoc.is_established:
                errors[f.sop_instance_uid] = "the association was aborted"
                statuses[f.sop_instance_uid] = -1
                continue
            try:
                rsp = assoc.send_c_store(f.path)
            except (ValueError, RuntimeError) as exc:  # no accepted context for its class / syntax
                errors[f.sop_instance_uid] = f"{f.path.name}: {exc}"
                statuses[f.sop_instance_uid] = -1
                continue
            last = time.time()
            statuses[f.sop_instance_uid] = int(rsp.Status) if "Status" in rsp else -1
            if "Status" not in rsp:
                errors[f.sop_instance_uid] = "no C-STORE response (timeout or abort)"
    finally:
        if assoc.is_established:
            assoc.release()
    return SendResult(statuses=statuses, started_at=started, last_response_at=last, errors=errors)
