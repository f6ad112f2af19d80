"""Typed audit events. Each class is one event type; ``type`` is what lands in ``audit_events.event_type``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

_KEYS = ("study_uid", "series_uid", "sop_instance_uid", "association_uid")
REGISTRY: dict[str, type[Event]] = {}


@dataclass(frozen=True, kw_only=True)
class Event:
    type: ClassVar[str] = "event"
    study_uid: str | None = None
    series_uid: str | None = None
    sop_instance_uid: str | None = None
    association_uid: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.type in REGISTRY:
            raise TypeError(f"audit event type {cls.type!r} defined twice")
        REGISTRY[cls.type] = cls

    def details(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _KEYS}


def event_from_row(event_type: str, keys: dict[str, str | None], details: dict[str, Any]) -> Event:
    cls = REGISTRY[event_type]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(
        **{k: v for k, v in keys.items() if k in _KEYS}, **{k: v for k, v in details.items() if k in names}
    )


@dataclass(frozen=True, kw_only=True)
class NodeStarted(Event):
    type: ClassVar[str] = "node.started"
    version: str
    ae_title: str
    dimse_port: int
    dicomweb_port: int


@dataclass(frozen=True, kw_only=True)
class NodeStopped(Event):
    type: ClassVar[str] = "node.stopped"
    reason: str


@dataclass(frozen=True, kw_only=True)
class AssociationAccepted(Event):
    type: ClassVar[str] = "association.accepted"
    protocol: str
    calling_ae: str | None
    called_ae: str | None
    remote_host: str | None
    remote_port: int | None
    tls: bool = False


@dataclass(frozen=True, kw_only=True)
class AssociationRejected(Event):
    type: ClassVar[str] = "association.rejected"
    protocol: str
    calling_ae: str | None
    called_ae: str | None
    remote_host: str | None
    remote_port: int | None
    result: int  # 1 rejected-permanent, 2 rejected-transient (A-ASSOCIATE-RJ) or an HTTP status
    source: int
    reason: int
    reason_text: str


@dataclass(frozen=True, kw_only=True)
class AssociationEnded(Event):
    type: ClassVar[str] = "association.ended"
    how: str  # released | aborted | closed | restart
    instances: int


@dataclass(frozen=True, kw_only=True)
class InstanceStored(Event):
    type: ClassVar[str] = "instance.stored"
    sop_class_uid: str
    version: int
    size: int
    sha256: str
    transfer_syntax: str
    path: str
    protocol: str


@dataclass(frozen=True, kw_only=True)
class InstanceDuplicate(Event):
    type: ClassVar[str] = "instance.duplicate"
    sha256: str
    version: int
    protocol: str


@dataclass(frozen=True, kw_only=True)
class InstanceNewVersion(Event):
    type: ClassVar[str] = "instance.new_version"
    version: int
    previous_sha256: str
    sha256: str
    protocol: str


@dataclass(frozen=True, kw_only=True)
class InstanceRejected(Event):
    type: ClassVar[str] = "instance.rejected"
    status: int
    reason: str
    protocol: str
    remote_host: str | None = None
    calling_ae: str | None = None


@dataclass(frozen=True, kw_only=True)
class InstanceRecovered(Event):
    type: ClassVar[str] = "instance.recovered"
    path: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class SeriesCompleted(Event):
    type: ClassVar[str] = "series.completed"
    reason: str
    instance_count: int
    generation: int


@dataclass(frozen=True, kw_only=True)
class SeriesReopened(Event):
    type: ClassVar[str] = "series.reopened"
    generation: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class RequestRejected(Event):
    """An HTTP request refused as a whole (auth, media type, malformed body, size)."""

    type: ClassVar[str] = "http.rejected"
    method: str
    path: str
    status: int
    reason: str
    remote_host: str | None


@dataclass(frozen=True, kw_only=True)
class RuleChanged(Event):
    type: ClassVar[str] = "rule.changed"
    rule: str
    version: int
    action: str  # seed | add | edit | enable | disable | remove
    author: str


@dataclass(frozen=True, kw_only=True)
class JobCreated(Event):
    type: ClassVar[str] = "job.created"
    job_uid: str
    rule: str
    rule_version: int
    pipeline: str
    lane: str
    destinations: list[str]
    series_uids: list[str]
    level: str


@dataclass(frozen=True, kw_only=True)
class JobSuperseded(Event):
    type: ClassVar[str] = "job.superseded"
    job_uid: str
    by_job_uid: str
    previous_state: str


@dataclass(frozen=True, kw_only=True)
class RouteNoMatch(Event):
    """A completed series (or a study, for study-level rules) that no enabled rule matched."""

    type: ClassVar[str] = "route.no_match"
    level: str
    generation: int
    reasons: dict[str, str]


@dataclass(frozen=True, kw_only=True)
class RouteSkipped(Event):
    """A completed series the router did not evaluate: segnode's own output, or unreadable."""

    type: ClassVar[str] = "route.skipped"
    generation: int
    reason: str
