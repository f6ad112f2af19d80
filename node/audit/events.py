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

    @classmethod
    def fields_from_details(cls, details: dict[str, Any]) -> dict[str, Any]:
        """The inverse of ``details`` (an event whose stored keys differ from its fields overrides it)."""
        return details


def event_from_row(event_type: str, keys: dict[str, str | None], details: dict[str, Any]) -> Event:
    cls = REGISTRY[event_type]
    details = cls.fields_from_details(dict(details))
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


# -- dispatch (node/dispatch) ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DeliveryQueued(Event):
    """A job's results are due at one destination (one outbox row)."""

    type: ClassVar[str] = "delivery.queued"
    job_uid: str
    destination: str
    target: str
    instances: int


@dataclass(frozen=True, kw_only=True)
class DeliveryAttempted(Event):
    type: ClassVar[str] = "delivery.attempted"
    job_uid: str
    destination: str
    target: str
    attempt: int
    instances: int  # sent in this attempt (those not delivered before)


@dataclass(frozen=True, kw_only=True)
class DeliverySucceeded(Event):
    type: ClassVar[str] = "delivery.succeeded"
    job_uid: str
    destination: str
    target: str
    attempt: int
    # sop_instance_uid -> the peer's final status (0 success, 0xB000 etc. warnings), all attempts
    statuses: dict[str, int]
    warnings: dict[str, str]


@dataclass(frozen=True, kw_only=True)
class DeliveryRetryScheduled(Event):
    type: ClassVar[str] = "delivery.retry_scheduled"
    job_uid: str
    destination: str
    target: str
    attempt: int
    delay_seconds: float
    status: str  # the peer's answer: "0xA700", "HTTP 503", "association rejected ..." etc.
    error: str


@dataclass(frozen=True, kw_only=True)
class DeliveryFailed(Event):
    """Permanent: the peer refused for good, or max_attempts were used up."""

    type: ClassVar[str] = "delivery.failed"
    job_uid: str
    destination: str
    target: str
    attempt: int
    status: str
    error: str
    permanent: bool  # true: the answer itself was final; false: attempts were used up


@dataclass(frozen=True, kw_only=True)
class DestinationBreakerOpened(Event):
    type: ClassVar[str] = "destination.breaker_opened"
    destination: str
    target: str
    failures: int
    cooldown_seconds: float


@dataclass(frozen=True, kw_only=True)
class DestinationBreakerClosed(Event):
    type: ClassVar[str] = "destination.breaker_closed"
    destination: str
    target: str


@dataclass(frozen=True, kw_only=True)
class DestinationChanged(Event):
    """A run-time destination added, replaced or removed (``segnode destinations add|remove``)."""

    type: ClassVar[str] = "destination.changed"
    destination: str
    action: str  # add | replace | remove
    destination_type: str
    target: str


# -- job state machine (node/jobs/transitions.py) ----------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class JobTransition(Event):
    """A job moved from one state to another; stored details: job_uid, from, to, reason, attempt, extra."""

    type: ClassVar[str] = "job.transition"
    job_uid: str
    from_state: str
    to_state: str
    reason: str | None = None
    attempt: int = 0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def details(self) -> dict[str, Any]:
        base = {
            "job_uid": self.job_uid,
            "from": self.from_state,
            "to": self.to_state,
            "reason": self.reason,
            "attempt": self.attempt,
        }
        return {**{k: v for k, v in self.extra.items() if k not in base}, **base}

    @classmethod
    def fields_from_details(cls, details: dict[str, Any]) -> dict[str, Any]:
        known = {"job_uid", "from", "to", "reason", "attempt"}
        return {
            "job_uid": details.get("job_uid", ""),
            "from_state": details.get("from", ""),
            "to_state": details.get("to", ""),
            "reason": details.get("reason"),
            "attempt": int(details.get("attempt") or 0),
            "extra": {k: v for k, v in details.items() if k not in known},
        }


@dataclass(frozen=True, kw_only=True)
class JobQueued(JobTransition):
    """Back in the queue: a worker crashed or timed out (attempts left), or the node restarted mid-run."""

    type: ClassVar[str] = "job.queued"


@dataclass(frozen=True, kw_only=True)
class JobRunning(JobTransition):
    type: ClassVar[str] = "job.running"


@dataclass(frozen=True, kw_only=True)
class JobWritten(JobTransition):
    """Result files are durably in storage and listed in job_results."""

    type: ClassVar[str] = "job.written"


@dataclass(frozen=True, kw_only=True)
class JobDispatching(JobTransition):
    type: ClassVar[str] = "job.dispatching"


@dataclass(frozen=True, kw_only=True)
class JobDone(JobTransition):
    type: ClassVar[str] = "job.done"


@dataclass(frozen=True, kw_only=True)
class JobFailed(JobTransition):
    type: ClassVar[str] = "job.failed"


@dataclass(frozen=True, kw_only=True)
class JobCancelled(JobTransition):
    type: ClassVar[str] = "job.cancelled"


@dataclass(frozen=True, kw_only=True)
class JobRetried(JobTransition):
    """A failed job sent round again (``segnode jobs retry``): to queued, or to written to resend."""

    type: ClassVar[str] = "job.retried"


@dataclass(frozen=True, kw_only=True)
class JobCancelRequested(Event):
    """``segnode jobs cancel`` on a running job: its worker is stopped, then the job is cancelled."""

    type: ClassVar[str] = "job.cancel_requested"
    job_uid: str
    by: str


@dataclass(frozen=True, kw_only=True)
class WorkerExited(Event):
    """An executor worker process ended other than by the executor's own stop (crash, kill, timeout)."""

    type: ClassVar[str] = "executor.worker_exited"
    worker: str
    pid: int
    exitcode: int | None
    job_uid: str | None
    reason: str
