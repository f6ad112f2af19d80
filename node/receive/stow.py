"""DICOMweb STOW-RS listener (PS3.18 section 10.5) and ``/healthz``, as a Starlette app.

``POST /dicomweb/studies[/{study}]`` takes ``multipart/related; type="application/dicom"``. The body is
streamed: chunks from the socket are fed to an incremental multipart parser in a worker thread, each
part goes straight into a temp file under the spool's ``incoming/`` (hashed while written),
and as soon as a part is complete it is recorded by ``Ingestor.store``: the same durable write path,
database rows and audit events as a DIMSE C-STORE. Memory use is bounded by the batch size, whatever
the size of an instance. The response is a Store Instances Response Module (PS3.18 Annex I) in DICOM
JSON: 200 when every instance was stored, 202 when some were, 409 when none was. Requests refused as a
whole (401 token, 415 media type, 400 malformed, 413 too large) get an ``http.rejected`` audit row.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import io
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import anyio
import pydicom
from pydicom.tag import BaseTag, Tag
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from node import __version__
from node.audit import events as ev
from node.receive.header import HeaderError
from node.receive.header_scan import header_of_file
from node.receive.ingest import Carrier, Ingestor, StoreResult
from node.receive.multipart_stream import MultipartError, MultipartStream, PartHeaders, check_boundary
from node.receive.spool import OutOfSpace, Spool, TempFile
from node.receive.status import Status
from node.settings import Settings

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
BATCH_BYTES = 1024 * 1024  # socket chunks are coalesced to this size before a worker thread parses them
HEAD_BYTES = 64 * 1024  # the start of each part is kept to name the instance if the part fails
SPACE_CHECK_BYTES = 8 * 1024 * 1024  # free space is re-checked after this much of a part is written

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PARAMETER = re.compile(rf'\s*;\s*({_TOKEN})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;"\s]+))\s*')
_MEDIA_TYPE = re.compile(rf"^\s*({_TOKEN}/{_TOKEN})\s*")
_PLAIN_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_PEEK_TAGS = [Tag(k) for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")]


# -- media types -----------------------------------------------------------------------------------
def parse_media_type(value: str | None) -> tuple[str, dict[str, str]] | None:
    """``type/subtype`` (lower case) and its parameters (names lower case, values unquoted), or None."""
    if not value:
        return None
    match = _MEDIA_TYPE.match(value)
    if match is None:
        return None
    params: dict[str, str] = {}
    pos = match.end()
    while pos < len(value):
        param = _PARAMETER.match(value, pos)
        if param is None:
            break  # lenient: ignore what cannot be parsed after the last good parameter
        name, quoted, bare = param.groups()
        params.setdefault(
            name.lower(), re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare.strip()
        )
        pos = param.end()
    return match.group(1).lower(), params


# -- per-part bookkeeping --------------------------------------------------------------------------
@dataclass(frozen=True)
class InstanceRef:
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None


@dataclass(frozen=True)
class PartResult:
    index: int
    status: int
    outcome: str  # stored | duplicate | new_version | rejected
    reason: str
    ref: InstanceRef

    @property
    def ok(self) -> bool:
        return self.status == Status.SUCCESS


def _uid(value: Any) -> str | None:
    if value is None:
        return None
    uid = str(value).strip("\x00 ")
    return uid if len(uid) <= 64 and _PLAIN_UID.match(uid) else None


def peek_instance(source: bytes | Path) -> InstanceRef:
    """Whatever UIDs can be read from a (possibly truncated or invalid) Part 10 stream; never raises."""
    found: dict[str, str | None] = {}
    fh: BinaryIO
    try:
        if isinstance(source, Path):
            fh = open(source, "rb")  # noqa: SIM115 - closed below
        else:
            fh = io.BytesIO(bytes(128) + b"DICM" + source if needs_preamble(source) else source)
    except OSError:
        return InstanceRef()
    with fh:
        try:
            ds = pydicom.dcmread(fh, stop_before_pixels=True, specific_tags=list[BaseTag](_PEEK_TAGS))
        except Exception:
            return InstanceRef()
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            try:
                found[keyword] = _uid(ds.get(keyword))
            except Exception:
                found[keyword] = None
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            try:
                found["SOPClassUID"] = found["SOPClassUID"] or _uid(meta.get("MediaStorageSOPClassUID"))
                found["SOPInstanceUID"] = found["SOPInstanceUID"] or _uid(
                    meta.get("MediaStorageSOPInstanceUID")
                )
            except Exception:
                pass
    return InstanceRef(
        found.get("SOPClassUID"),
        found.get("SOPInstanceUID"),
        found.get("StudyInstanceUID"),
        found.get("SeriesInstanceUID"),
    )


def needs_preamble(head: bytes | bytearray) -> bool:
    """True for a data set that starts with its file meta group but lacks the 128-byte preamble and
    ``DICM`` prefix of a Part 10 file (what pydicom, and so dicomweb-client, write by default)."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return False
    # (0002,eeee) little endian followed by an explicit VR: the File Meta Information group.
    return len(head) >= 6 and head[0:2] == b"\x02\x00" and head[4:6].isalpha() and head[4:6].isupper()


class _TempWriter:
    """One part's temp file under ``incoming/``: hashed while written (``Spool.commit`` fsyncs it).

    A data set sent without the Part 10 preamble gets one (128 zero bytes and ``DICM``), so that what
    lands in the spool is always a Part 10 file, whichever client sent it.
    """

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.path = spool.new_temp_path()
        try:
            self._fh = open(self.path, "wb", buffering=0)  # noqa: SIM115 - closed in finish/abort
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        self._digest = hashlib.sha256()
        self.size = 0
        self._next_check = SPACE_CHECK_BYTES
        self._start: bytearray | None = bytearray()  # held until the preamble question is settled

    def write(self, data: memoryview) -> None:
        if self._start is not None:
            self._start += data
            if len(self._start) >= 132:
                self._settle_start()
            return
        self._write(data)

    def _settle_start(self) -> None:
        start, self._start = self._start, None
        if start is None:
            return
        if needs_preamble(start):
            self._write(memoryview(bytes(128) + b"DICM"))
        self._write(memoryview(start))

    def _write(self, data: memoryview) -> None:
        try:
            view = data
            while view:
                written = self._fh.write(view)
                if not written:
                    raise OSError(errno.EIO, "short write")
                view = view[written:]
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutOfSpace(f"disk full while writing to {self.spool.incoming}: {exc.strerror}") from exc
            raise
        self._digest.update(data)
        self.size += len(data)
        if self.size >= self._next_check:
            self._next_check = self.size + SPACE_CHECK_BYTES
            self.spool.check_space(0)

    def finish(self) -> TempFile:
        try:
            self._settle_start()
            self.spool.flush_early(self._fh.fileno(), self.size)
            self._fh.close()
        except OSError as exc:
            self.abort()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutOfSpace(f"disk full while writing to {self.spool.incoming}: {exc.strerror}") from exc
            raise
        except BaseException:
            self.abort()
            raise
        return TempFile(path=self.path, size=self.size, sha256=self._digest.hexdigest())

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._fh.close()
        self.path.unlink(missing_ok=True)


@dataclass
class _Part:
    index: int
    head: bytearray
    writer: _TempWriter | None = None
    failure: tuple[int, str] | None = None


class PartReceiver:
    """Receives the parts of one STOW-RS request; every method runs in a worker thread."""

    def __init__(
        self, ingestor: Ingestor, spool: Spool, carrier: Carrier, expected_study: str | None
    ) -> None:
        self.ingestor = ingestor
        self.spool = spool
        self.carrier = carrier
        self.expected_study = expected_study
        self.results: list[PartResult] = []
        self.out_of_space: str | None = None
        self._part: _Part | None = None

    # -- parser callbacks ------------------------------------------------------------------------
    def begin(self, headers: PartHeaders) -> None:
        part = _Part(index=len(self.results) + 1, head=bytearray())
        self._part = part
        content_type = headers.get("content-type")
        media = parse_media_type(content_type)
        if content_type is not None and (media is None or media[0] != "application/dicom"):
            # A part without Content-Type is taken as the request's type="application/dicom".
            part.failure = (
                Status.CANNOT_UNDERSTAND,
                f"media type {content_type!r} is not application/dicom",
            )
            return
        if self.out_of_space is not None:
            part.failure = (Status.OUT_OF_RESOURCES, self.out_of_space)
            return
        try:
            hint = int(headers.get("content-length", "0"))
        except ValueError:
            hint = 0
        try:
            self.spool.check_space(max(hint, 0))
            part.writer = _TempWriter(self.spool)
        except OutOfSpace as exc:
            self.out_of_space = str(exc)
            part.failure = (Status.OUT_OF_RESOURCES, str(exc))
        except OSError as exc:
            log.exception("cannot open a temp file in %s", self.spool.incoming)
            part.failure = (Status.OUT_OF_RESOURCES, f"cannot write spool: {exc}")

    def data(self, chunk: memoryview) -> None:
        part = self._part
        if part is None:  # pragma: no cover - the parser always begins a part first
            return
        if len(part.head) < HEAD_BYTES:
            part.head += chunk[: HEAD_BYTES - len(part.head)]
        if part.writer is None:
            return
        try:
            part.writer.write(chunk)
        except OutOfSpace as exc:
            part.writer.abort()
            part.writer = None
            self.out_of_space = str(exc)
            part.failure = (Status.OUT_OF_RESOURCES, str(exc))
        except OSError as exc:
            log.exception("cannot write a temp file in %s", self.spool.incoming)
            part.writer.abort()
            part.writer = None
            part.failure = (Status.OUT_OF_RESOURCES, f"cannot write spool: {exc}")

    def end(self) -> None:
        part, self._part = self._part, None
        if part is None:  # pragma: no cover
            return
        self.results.append(self._finish(part))

    def abort(self) -> None:
        """The request ended early: drop the part being received (it was never complete)."""
        part, self._part = self._part, None
        if part is not None and part.writer is not None:
            part.writer.abort()

    # -- recording -------------------------------------------------------------------------------
    def _finish(self, part: _Part) -> PartResult:
        if part.failure is None and part.writer is not None:
            try:
                temp = part.writer.finish()
            except OutOfSpace as exc:
                self.out_of_space = str(exc)
                part.failure = (Status.OUT_OF_RESOURCES, str(exc))
            except OSError as exc:
                part.failure = (Status.OUT_OF_RESOURCES, f"cannot write spool: {exc}")
            else:
                return self._store(part, temp)
        status, reason = part.failure or (Status.PROCESSING_FAILURE, "part was not written")
        return self._reject(part.index, status, reason, peek_instance(bytes(part.head)))

    def _store(self, part: _Part, temp: TempFile) -> PartResult:
        try:
            header = header_of_file(temp.path)
        except HeaderError as exc:
            ref = peek_instance(temp.path)
            self.spool.discard(temp)
            return self._reject(part.index, exc.status, exc.reason, ref)
        except Exception as exc:  # a reader bug must not leave the temp file or take the request down
            log.exception("cannot read the header of part %d", part.index)
            ref = peek_instance(temp.path)
            self.spool.discard(temp)
            return self._reject(part.index, Status.CANNOT_UNDERSTAND, f"cannot read the data set: {exc}", ref)
        ref = InstanceRef(header.sop_class_uid, header.sop_instance_uid, header.study_uid, header.series_uid)
        try:
            result: StoreResult = self.ingestor.store(
                temp, self.carrier, expected_study_uid=self.expected_study, header=header
            )
        except Exception as exc:  # the database went away: fail this part, keep serving
            log.exception("cannot record instance %s", header.sop_instance_uid)
            self.spool.discard(temp)
            return self._reject(part.index, Status.PROCESSING_FAILURE, f"cannot record instance: {exc}", ref)
        return PartResult(part.index, result.status, result.outcome, result.comment, ref)

    def _reject(self, index: int, status: int, reason: str, ref: InstanceRef) -> PartResult:
        try:
            self.ingestor.reject(
                self.carrier, status, f"part {index}: {reason}", sop_instance_uid=ref.sop_instance_uid
            )
        except Exception:
            log.exception("cannot audit the rejection of part %d", index)
        return PartResult(index, int(status), "rejected", reason, ref)


def _feed(parser: MultipartStream, chunks: list[bytes]) -> None:
    for chunk in chunks:
        parser.feed(chunk)


# -- DICOM JSON response -----------------------------------------------------------------------------
def _element(vr: str, value: Any | None) -> dict[str, Any]:
    return {"vr": vr, "Value": [value]} if value is not None else {"vr": vr}


def _q(component: str | None) -> str:
    return quote(component or "", safe="")


def store_response(results: list[PartResult], base_url: str, study_url_uid: str | None) -> dict[str, Any]:
    """A Store Instances Response Module (PS3.18 Annex I) in DICOM JSON."""
    stored = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    studies = {r.ref.study_uid for r in stored}
    study = study_url_uid or (next(iter(studies)) if len(studies) == 1 else None)
    body: dict[str, Any] = {"00081190": _element("UR", f"{base_url}/studies/{_q(study)}" if study else None)}
    if failed:
        body["00081198"] = {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": _element("UI", r.ref.sop_class_uid),
                    "00081155": _element("UI", r.ref.sop_instance_uid),
                    "00081197": _element("US", int(r.status)),
                }
                for r in failed
            ],
        }
    if stored:
        body["00081199"] = {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": _element("UI", r.ref.sop_class_uid),
                    "00081155": _element("UI", r.ref.sop_instance_uid),
                    "00081190": _element(
                        "UR",
                        f"{base_url}/studies/{_q(r.ref.study_uid)}/series/{_q(r.ref.series_uid)}"
                        f"/instances/{_q(r.ref.sop_instance_uid)}",
                    ),
                }
                for r in stored
            ],
        }
    return body


def _http_status(results: list[PartResult]) -> int:
    stored = sum(1 for r in results if r.ok)
    if stored == len(results):
        return 200
    return 202 if stored else 409


# -- the app -----------------------------------------------------------------------------------------
class RequestRejection(Exception):
    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


class StowService:
    def __init__(self, settings: Settings, ingestor: Ingestor, spool: Spool) -> None:
        self.settings = settings
        self.ingestor = ingestor
        self.spool = spool
        token = settings.dicomweb.token
        # Compared as digests so that neither content nor length leaks through timing.
        self._token = _digest(token.get_secret_value().encode("utf-8")) if token is not None else None

    # -- request-level checks --------------------------------------------------------------------
    def _check_token(self, request: Request) -> None:
        if self._token is None:
            return
        header = request.headers.get("authorization")
        if not header:
            raise RequestRejection(
                401, "missing bearer token", {"WWW-Authenticate": 'Bearer realm="segnode"'}
            )
        scheme, _, credentials = header.strip().partition(" ")
        given = _digest(credentials.strip().encode("utf-8", "surrogateescape"))
        if not (scheme.lower() == "bearer" and hmac.compare_digest(given, self._token)):
            raise RequestRejection(
                401,
                "wrong bearer token"
                if scheme.lower() == "bearer"
                else f"unsupported authorization scheme {scheme!r}",
                {"WWW-Authenticate": 'Bearer realm="segnode", error="invalid_token"'},
            )

    def _check_body(self, request: Request) -> str:
        """Media type and size of the request; return the multipart boundary."""
        content_type = request.headers.get("content-type")
        media = parse_media_type(content_type)
        if media is None or media[0] != "multipart/related":
            raise RequestRejection(
                415, f'media type {content_type!r} is not multipart/related; type="application/dicom"'
            )
        root_type = media[1].get("type")
        if root_type is not None and root_type.strip().lower() != "application/dicom":
            raise RequestRejection(
                415, f"multipart/related type {root_type!r} is not supported (application/dicom)"
            )
        boundary = media[1].get("boundary")
        if not boundary:
            raise RequestRejection(400, "multipart/related without a boundary parameter")
        length = request.headers.get("content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                raise RequestRejection(400, f"invalid Content-Length {length!r}") from None
            limit = self.settings.dicomweb.max_request_bytes
            if size > limit:
                raise RequestRejection(
                    413, f"request body of {size} bytes exceeds dicomweb.max_request_bytes ({limit})"
                )
        return boundary

    async def _rejected(self, request: Request, rejection: RequestRejection) -> Response:
        host = request.client.host if request.client else None
        log.warning(
            "%s %s from %s refused (%d): %s",
            request.method,
            request.url.path,
            host,
            rejection.status,
            rejection.reason,
        )
        event = ev.RequestRejected(
            method=request.method,
            path=request.url.path,
            status=rejection.status,
            reason=rejection.reason,
            remote_host=host,
        )
        try:
            await run_in_threadpool(self.ingestor.audit, event)
        except Exception:
            log.exception("cannot audit a refused request")
        return JSONResponse(
            {"error": rejection.reason, "status": rejection.status},
            status_code=rejection.status,
            headers=rejection.headers,
        )

    # -- endpoints -------------------------------------------------------------------------------
    async def store(self, request: Request) -> Response:
        study = request.path_params.get("study")
        try:
            self._check_token(request)
            boundary = self._check_body(request)
            check_boundary(boundary)
        except RequestRejection as rejection:
            return await self._rejected(request, rejection)
        except MultipartError as exc:
            return await self._rejected(request, RequestRejection(400, f"unusable boundary: {exc}"))

        client = request.client
        try:
            carrier = await run_in_threadpool(
                self.ingestor.open_carrier,
                "stow",
                calling_ae=None,
                called_ae=None,
                remote_host=client.host if client else None,
                remote_port=client.port if client else None,
            )
        except Exception as exc:  # nothing can be recorded, so nothing is accepted
            log.exception("cannot record a STOW-RS request: database unavailable")
            return JSONResponse({"error": f"database unavailable: {type(exc).__name__}", "status": 503}, 503)
        receiver = PartReceiver(self.ingestor, self.spool, carrier, study)
        try:
            await self._receive(request, boundary, receiver)
        except MultipartError as exc:
            await self._abandon(receiver)
            return await self._rejected(request, RequestRejection(400, f"malformed multipart body: {exc}"))
        except RequestRejection as rejection:
            await self._abandon(receiver)
            return await self._rejected(request, rejection)
        except ClientDisconnect:
            log.warning("STOW-RS %s: the client went away before the end of the body", carrier.uid)
            await self._abandon(receiver)
            return Response(status_code=400)
        except BaseException:
            await self._abandon(receiver)
            raise

        results = receiver.results
        stored = sum(1 for r in results if r.ok)
        try:
            await run_in_threadpool(self.ingestor.close_carrier, carrier, "released", stored)
        except Exception:  # the instances are recorded; the stale carrier is closed at the next start
            log.exception("cannot record the end of STOW-RS request %s", carrier.uid)
        status = _http_status(results)
        log.info(
            "STOW-RS %s from %s: %d part(s), %d stored, %d failed -> HTTP %d",
            carrier.uid,
            carrier.remote_host,
            len(results),
            stored,
            len(results) - stored,
            status,
        )
        base = str(request.base_url).rstrip("/") + "/dicomweb"
        body = store_response(results, base, study)
        return Response(json.dumps(body).encode("utf-8"), status_code=status, media_type=DICOM_JSON)

    async def _receive(self, request: Request, boundary: str, receiver: PartReceiver) -> None:
        """Stream the body through the parser into the spool, parsing and writing in worker threads."""
        parser = MultipartStream(
            boundary, on_part_begin=receiver.begin, on_part_data=receiver.data, on_part_end=receiver.end
        )
        limit = self.settings.dicomweb.max_request_bytes
        total = 0
        pending: list[bytes] = []
        pending_bytes = 0
        async for chunk in request.stream():
            if not chunk:
                continue
            total += len(chunk)
            if total > limit:
                raise RequestRejection(
                    413, f"request body exceeds dicomweb.max_request_bytes ({limit}) after {total} bytes"
                )
            pending.append(chunk)
            pending_bytes += len(chunk)
            if pending_bytes >= BATCH_BYTES:
                await run_in_threadpool(_feed, parser, pending)
                pending, pending_bytes = [], 0
        if pending:
            await run_in_threadpool(_feed, parser, pending)
        parser.close()
        if not receiver.results:
            raise RequestRejection(400, "the multipart body contains no parts")

    async def _abandon(self, receiver: PartReceiver) -> None:
        """The request ends without a store response: drop the unfinished part, close the carrier."""
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(receiver.abort)
            stored = sum(1 for r in receiver.results if r.ok)
            try:
                await run_in_threadpool(self.ingestor.close_carrier, receiver.carrier, "aborted", stored)
            except Exception:
                log.exception("cannot record the end of STOW-RS request %s", receiver.carrier.uid)

    async def healthz(self, request: Request) -> Response:
        facts = await run_in_threadpool(self._health)
        return JSONResponse(facts, status_code=200 if facts["database"]["reachable"] else 503)

    def _health(self) -> dict[str, Any]:
        database: dict[str, Any] = {"reachable": True}
        try:
            with self.ingestor.sessions() as s:
                s.execute(text("SELECT 1"))
        except Exception as exc:
            database = {
                "reachable": False,
                "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            }
        spool: dict[str, Any]
        try:
            free = shutil.disk_usage(self.spool.incoming).free
            spool = {
                "free_bytes": free,
                "min_free_bytes": self.spool.min_free_bytes,
                "accepting": free > self.spool.min_free_bytes,
            }
        except OSError as exc:
            spool = {"error": str(exc), "accepting": False}
        return {
            "status": "ok" if database["reachable"] else "unavailable",
            "version": __version__,
            "database": database,
            "spool": spool,
        }


def build_app(settings: Settings, ingestor: Ingestor, spool: Spool) -> Starlette:
    service = StowService(settings, ingestor, spool)
    return Starlette(
        routes=[
            Route("/dicomweb/studies", service.store, methods=["POST"]),
            Route("/dicomweb/studies/{study}", service.store, methods=["POST"]),
            Route("/healthz", service.healthz, methods=["GET"]),
        ]
    )
