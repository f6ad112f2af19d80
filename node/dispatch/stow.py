"""STOW-RS client (PS3.18 10.5): one multipart/related POST per attempt, the response parsed.

Per instance: listed in ReferencedSOPSequence -> delivered (a WarningReason makes it a warning);
listed in FailedSOPSequence -> failed with its FailureReason. Request level: HTTP 408/429 and 5xx,
connection errors and timeouts are transient; any other 4xx is permanent (the peer's answer kept).
"""

from __future__ import annotations

import json
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from typing import Any

import requests

from node.dispatch.destinations import Target
from node.dispatch.outcome import AttemptResult, InstanceStatus, ResultFile
from node.settings import DispatchSection

_FAILED_SOP_SEQ = "00081198"
_REFERENCED_SOP_SEQ = "00081199"
_REF_SOP_INSTANCE = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"
_TRANSIENT_HTTP = {408, 425, 429}
USER_AGENT = "segnode-dispatch"


def _auth(target: Target) -> tuple[dict[str, str], tuple[str, str] | None]:
    headers = {"User-Agent": USER_AGENT}
    if target.token:
        headers["Authorization"] = f"Bearer {target.token}"
        return headers, None
    if target.username is not None:
        return headers, (target.username, target.password or "")
    return headers, None


def multipart_body(files: Sequence[ResultFile]) -> tuple[bytes, str]:
    boundary = f"segnode-{uuid.uuid4().hex}"
    chunks: list[bytes] = []
    for f in files:
        chunks.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii"))
        chunks.append(f.path.read_bytes())
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(chunks), boundary


# -- the Store Instances Response, JSON or XML -------------------------------------------------------
def _json_items(body: dict[str, Any], tag: str) -> Iterator[dict[str, Any]]:
    element = body.get(tag) or {}
    for item in element.get("Value", []) or []:
        if isinstance(item, dict):
            yield item


def _json_value(item: dict[str, Any], tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def _xml_items(root: ET.Element, tag: str) -> Iterator[dict[str, Any]]:
    for attr in root.iter():
        if attr.tag.endswith("DicomAttribute") and attr.get("tag", "").upper() == tag:
            for item in attr:
                if not item.tag.endswith("Item"):
                    continue
                values: dict[str, Any] = {}
                for child in item:
                    if child.tag.endswith("DicomAttribute"):
                        value = next((v.text for v in child if v.tag.endswith("Value")), None)
                        values[child.get("tag", "").upper()] = {"Value": [value]} if value is not None else {}
                yield values


def parse_store_response(content: bytes, content_type: str) -> tuple[dict[str, int], dict[str, int | None]]:
    """(failed: uid -> FailureReason, referenced: uid -> WarningReason or None) of a STOW response."""
    failed: dict[str, int] = {}
    referenced: dict[str, int | None] = {}
    if not content.strip():
        return failed, referenced
    items: dict[str, list[dict[str, Any]]]
    if "xml" in content_type:
        root = ET.fromstring(content)
        items = {t: list(_xml_items(root, t)) for t in (_FAILED_SOP_SEQ, _REFERENCED_SOP_SEQ)}
    else:
        body = json.loads(content)
        if isinstance(body, list):  # some servers answer a list holding the one dataset
            body = body[0] if body else {}
        if not isinstance(body, dict):
            return failed, referenced
        items = {t: list(_json_items(body, t)) for t in (_FAILED_SOP_SEQ, _REFERENCED_SOP_SEQ)}
    for item in items[_FAILED_SOP_SEQ]:
        uid = _json_value(item, _REF_SOP_INSTANCE)
        if uid:
            reason = _json_value(item, _FAILURE_REASON)
            failed[str(uid)] = int(reason) if reason is not None else 0xC000
    for item in items[_REFERENCED_SOP_SEQ]:
        uid = _json_value(item, _REF_SOP_INSTANCE)
        if uid:
            warning = _json_value(item, _WARNING_REASON)
            referenced[str(uid)] = int(warning) if warning is not None else None
    return failed, referenced


def _peer_text(response: requests.Response, limit: int = 500) -> str:
    text = response.text.strip().replace("\n", " ")
    return text[:limit] + ("..." if len(text) > limit else "")


def send(target: Target, files: Sequence[ResultFile], settings: DispatchSection) -> AttemptResult:
    assert target.url is not None
    body, boundary = multipart_body(files)
    headers, auth = _auth(target)
    headers["Content-Type"] = f'multipart/related; type="application/dicom"; boundary={boundary}'
    headers["Accept"] = "application/dicom+json, application/json;q=0.9, application/dicom+xml;q=0.5"
    try:
        response = requests.post(
            f"{target.url}/studies",
            data=body,
            headers=headers,
            auth=auth,
            timeout=(settings.connect_timeout_seconds, settings.timeout_seconds),
        )
    except requests.RequestException as exc:
        return AttemptResult(error=f"{type(exc).__name__}: {exc}", status="no HTTP response")
    status = f"HTTP {response.status_code}"
    content_type = response.headers.get("content-type", "")
    try:
        failed, referenced = parse_store_response(response.content, content_type)
    except (ValueError, ET.ParseError, TypeError, KeyError, IndexError):
        failed, referenced = {}, {}
    code = response.status_code
    if not failed and not referenced and code >= 400:
        # refused as a whole (authentication, media type, size) or a server error
        transient = code >= 500 or code in _TRANSIENT_HTTP
        return AttemptResult(
            error=f"{status}: {_peer_text(response)}", status=status, permanent=not transient
        )
    result = AttemptResult(status=status)
    for f in files:
        uid = f.sop_instance_uid
        if uid in failed:
            reason = failed[uid]
            result.instances[uid] = InstanceStatus(
                reason, "failed", f"{status}, FailureReason 0x{reason:04X}"
            )
        elif uid in referenced:
            warning = referenced[uid]
            if warning is None:
                result.instances[uid] = InstanceStatus(0, "delivered", status)
            else:
                result.instances[uid] = InstanceStatus(
                    warning, "warning", f"{status}, WarningReason 0x{warning:04X}"
                )
        elif code == 200 and not failed:
            result.instances[uid] = InstanceStatus(0, "delivered", f"{status} (not listed in the response)")
        else:
            result.instances[uid] = InstanceStatus(None, "failed", f"{status}: not listed in the response")
    if code >= 500:
        result.error, result.permanent = f"{status}: {_peer_text(response)}", False
    return result


def echo(target: Target, settings: DispatchSection) -> tuple[bool, str]:
    """An authenticated QIDO-RS search for one study; a server without QIDO-RS is probed with
    OPTIONS on /studies (reachable, credentials unverified). (success, the peer's answer)."""
    assert target.url is not None
    headers, auth = _auth(target)
    timeout = (settings.connect_timeout_seconds, settings.timeout_seconds)
    try:
        r = requests.get(
            f"{target.url}/studies",
            params={"limit": "1"},
            headers={**headers, "Accept": "application/dicom+json"},
            auth=auth,
            timeout=timeout,
        )
    except requests.RequestException as exc:
        return False, f"no answer from {target.url}: {type(exc).__name__}: {exc}"
    if r.status_code in (200, 204):
        return True, f"QIDO-RS GET /studies: HTTP {r.status_code} (authenticated search answered)"
    if r.status_code in (401, 403):
        return False, f"QIDO-RS GET /studies: HTTP {r.status_code} (credentials refused): {_peer_text(r)}"
    if r.status_code in (404, 405, 501):
        try:
            o = requests.options(f"{target.url}/studies", headers=headers, auth=auth, timeout=timeout)
        except requests.RequestException as exc:
            return False, f"OPTIONS /studies: {type(exc).__name__}: {exc}"
        allow = o.headers.get("allow", "")
        if o.status_code in (401, 403):
            return False, f"OPTIONS /studies: HTTP {o.status_code} (credentials refused)"
        if o.status_code < 500 and ("POST" in allow.upper() or o.status_code < 300):
            return True, (
                f"no QIDO-RS (GET HTTP {r.status_code}); OPTIONS /studies: HTTP {o.status_code}, "
                f"Allow: {allow or '-'} (reachable; credentials are checked on the first STOW-RS)"
            )
        return False, f"GET HTTP {r.status_code}, OPTIONS HTTP {o.status_code}: {_peer_text(o)}"
    return False, f"QIDO-RS GET /studies: HTTP {r.status_code}: {_peer_text(r)}"
