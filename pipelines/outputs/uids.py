"""Deterministic UIDs for segnode's result objects.

A result's UIDs are a function of what produced it: the source series, the pipeline, the model
version and the routing rule version, plus the kind of object (``"series", "seg"``,
``"instance", "seg"``, ...). Re-running the same pipeline with the same model and rule on the same
series therefore yields the same Series and SOP Instance UIDs, and the archive replaces the earlier
result instead of storing a duplicate; a new model or rule version yields new UIDs.

UIDs are ``2.25.<integer>`` (PS3.5 B.2: a UUID-derived UID), the integer being the first 128 bits
of a SHA-256 over the parts: at most 44 characters, no leading zeros, valid in any UI element.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

UID_PREFIX = "2.25."
_NAMESPACE = "segnode-output-uid-v1"
_VALID_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def derive_uid(*parts: str) -> str:
    """A UID determined by ``parts``; equal parts give equal UIDs, any difference gives another UID."""
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    digest = hashlib.sha256()
    digest.update(_NAMESPACE.encode())
    for part in parts:
        encoded = str(part).encode("utf-8")
        # Length-prefixed, so that ("ab", "c") and ("a", "bc") differ.
        digest.update(len(encoded).to_bytes(8, "big"))
        digest.update(encoded)
    return UID_PREFIX + str(int.from_bytes(digest.digest()[:16], "big"))


def is_valid_uid(value: str) -> bool:
    """True when ``value`` is a valid UI value (PS3.5 9.1): dotted digits, no leading zeros, <= 64."""
    return 0 < len(value) <= 64 and _VALID_UID.fullmatch(value) is not None


@dataclass(frozen=True)
class OutputIdentity:
    """What a result is derived from; every UID of the result is derived from these and a kind."""

    source_series_uid: str
    pipeline: str
    model_version: str
    rule_version: str

    def uid(self, *kind: str) -> str:
        return derive_uid(self.source_series_uid, self.pipeline, self.model_version, self.rule_version, *kind)

    def series_uid(self, series_key: str) -> str:
        return self.uid("series", series_key)

    def instance_uid(self, instance_key: str) -> str:
        return self.uid("instance", instance_key)
