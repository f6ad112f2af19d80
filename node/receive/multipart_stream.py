"""An incremental MIME multipart parser (RFC 2046 section 5.1) for request bodies streamed to disk.

Feed it the body in chunks of any size; it calls ``on_part_begin(headers)`` when a part's header block
is complete, ``on_part_data(view)`` with consecutive slices of the part's content, and
``on_part_end()`` once the delimiter after the part has been seen. It never holds more than one fed
chunk plus a delimiter's length of look-behind, whatever the size of a part. A preamble before the
first delimiter, transport padding after a delimiter and an epilogue after the closing delimiter are
skipped as the RFC requires; anything else that breaks the syntax raises ``MultipartError``, as does a
body that ends before its closing delimiter (``close``).

The views passed to ``on_part_data`` are only valid during the call: copy what must be kept.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["MultipartError", "MultipartStream", "PartHeaders", "check_boundary"]

PartHeaders = dict[str, str]
"""A part's header fields, names lower-cased; a repeated field keeps its values joined by ", "."""

_HEADER_NAME = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_PADDING = frozenset(b" \t")
MAX_BOUNDARY_LENGTH = 200  # RFC 2046 says 70; be lenient with what peers send

_PREAMBLE, _AFTER_DELIMITER, _HEADERS, _BODY, _EPILOGUE = range(5)


class MultipartError(ValueError):
    """The body is not a well-formed multipart entity."""


def check_boundary(boundary: str | bytes) -> bytes:
    """The boundary as bytes; ``MultipartError`` if no body could be delimited by it."""
    try:
        raw = boundary.encode("latin-1") if isinstance(boundary, str) else bytes(boundary)
    except UnicodeEncodeError:
        raise MultipartError("boundary must be ASCII") from None
    if not 1 <= len(raw) <= MAX_BOUNDARY_LENGTH:
        raise MultipartError(f"boundary must be 1 to {MAX_BOUNDARY_LENGTH} characters long")
    if b"\r" in raw or b"\n" in raw:
        raise MultipartError("boundary must not contain CR or LF")
    return raw


def _parse_headers(block: bytes) -> PartHeaders:
    headers: PartHeaders = {}
    name: str | None = None
    for line in block.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):  # obsolete line folding: continue the previous field
            if name is None:
                raise MultipartError("a part's header block starts with a continuation line")
            headers[name] = f"{headers[name]} {line.strip().decode('latin-1')}".strip()
            continue
        raw_name, colon, raw_value = line.partition(b":")
        raw_name = raw_name.strip()
        if not colon or not _HEADER_NAME.match(raw_name):
            raise MultipartError(f"malformed part header line {line[:80]!r}")
        name = raw_name.decode("ascii").lower()
        value = raw_value.strip().decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


class MultipartStream:
    """Push parser for one multipart body delimited by ``boundary``."""

    def __init__(
        self,
        boundary: str | bytes,
        *,
        on_part_begin: Callable[[PartHeaders], None],
        on_part_data: Callable[[memoryview], None],
        on_part_end: Callable[[], None],
        max_header_bytes: int = 16 * 1024,
    ) -> None:
        self._delimiter = b"\r\n--" + check_boundary(boundary)
        self._on_begin = on_part_begin
        self._on_data = on_part_data
        self._on_end = on_part_end
        self._max_header_bytes = max_header_bytes
        # The first delimiter may open the body without a preceding CRLF: pretend there was one.
        self._buf = bytearray(b"\r\n")
        self._state = _PREAMBLE
        self.parts = 0
        """Number of parts whose headers have been read so far."""

    @property
    def complete(self) -> bool:
        """True once the closing delimiter has been read."""
        return self._state == _EPILOGUE

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._state == _EPILOGUE or not data:
            return
        self._buf += data
        self._process()

    def close(self) -> None:
        """Declare the end of the body; raise ``MultipartError`` if the closing delimiter was missing."""
        if self._state == _EPILOGUE:
            return
        if self._state == _PREAMBLE:
            raise MultipartError("no multipart boundary delimiter found in the body")
        if self._state == _BODY:
            raise MultipartError(f"the body ended inside part {self.parts} (no closing boundary delimiter)")
        raise MultipartError("the body ended before the closing boundary delimiter")

    # -- internals ---------------------------------------------------------------------------------
    def _emit(self, length: int) -> None:
        """Pass the first ``length`` buffered bytes to ``on_part_data`` and drop them."""
        if length <= 0:
            return
        view = memoryview(self._buf)
        try:
            chunk = view[:length]
            try:
                self._on_data(chunk)
            finally:
                chunk.release()
        finally:
            view.release()
        del self._buf[:length]

    def _process(self) -> None:
        buf = self._buf
        delimiter = self._delimiter
        keep = len(delimiter) - 1  # bytes that may be the start of a delimiter split across chunks
        while True:
            if self._state == _PREAMBLE:
                at = buf.find(delimiter)
                if at < 0:
                    if len(buf) > keep:
                        del buf[: len(buf) - keep]
                    return
                del buf[: at + len(delimiter)]
                self._state = _AFTER_DELIMITER
            elif self._state == _AFTER_DELIMITER:
                if len(buf) < 2:
                    return
                if buf.startswith(b"--"):
                    buf.clear()
                    self._state = _EPILOGUE
                    return
                eol = buf.find(b"\r\n")
                if eol < 0:
                    if len(buf) > 1024 or any(b not in _PADDING for b in buf.rstrip(b"\r")):
                        raise MultipartError("a boundary delimiter is followed by something other than CRLF")
                    return
                if any(b not in _PADDING for b in buf[:eol]):
                    raise MultipartError("a boundary delimiter is followed by something other than CRLF")
                del buf[: eol + 2]
                self._state = _HEADERS
            elif self._state == _HEADERS:
                if buf.startswith(b"\r\n"):  # a part without header fields
                    end, skip = 0, 2
                else:
                    end, skip = buf.find(b"\r\n\r\n"), 4
                if end < 0:
                    if len(buf) > self._max_header_bytes:
                        raise MultipartError(f"a part's header block exceeds {self._max_header_bytes} bytes")
                    return
                if end > self._max_header_bytes:
                    raise MultipartError(f"a part's header block exceeds {self._max_header_bytes} bytes")
                headers = _parse_headers(bytes(buf[:end]))
                del buf[: end + skip]
                self.parts += 1
                self._state = _BODY
                self._on_begin(headers)
            elif self._state == _BODY:
                at = buf.find(delimiter)
                if at < 0:
                    self._emit(len(buf) - keep)
                    return
                self._emit(at)
                del buf[: len(delimiter)]
                self._state = _AFTER_DELIMITER
                self._on_end()
            else:  # epilogue: ignored
                buf.clear()
                return
