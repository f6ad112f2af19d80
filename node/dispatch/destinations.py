"""Destinations: the configured ones, the ones added at run time (database), and ``sender``.

A name defined in the configuration wins over a run-time destination of the same name (the run-time
row is kept, listed as shadowed, and used again once the configuration drops the name).

``sender`` replies to the AE that sent the study: the job's calling AE title and host. Its port comes
from a DIMSE destination whose ``ae_title`` equals the calling AE title (its ``tls`` flag is used
too), else from ``dispatch.sender_port``; with neither, a ``sender`` delivery fails with a clear
reason. A study received by STOW-RS has no calling AE, so it cannot be answered through ``sender``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.audit import events as ev
from node.audit.recorder import record, utcnow
from node.db.models import DestinationRow
from node.settings import _DEST_NAME, DestinationSection

SENDER = "sender"
Source = Literal["config", "runtime"]


class DestinationError(Exception):
    """A destination cannot be used or defined; the message says why."""


@dataclass(frozen=True)
class Target:
    """A resolved place to send results to."""

    name: str
    type: Literal["dimse", "dicomweb"]
    ae_title: str | None = None
    host: str | None = None
    port: int | None = None
    tls: bool = False
    url: str | None = None
    token: str | None = None
    username: str | None = None
    password: str | None = None

    @property
    def key(self) -> str:
        """Identifies the peer (not the name): scheduling and the circuit breaker work per key."""
        if self.type == "dimse":
            return f"dimse:{self.ae_title}@{self.host}:{self.port}"
        return f"dicomweb:{self.url}"

    def describe(self) -> str:
        if self.type == "dimse":
            return f"{self.ae_title}@{self.host}:{self.port}{' (TLS)' if self.tls else ''}"
        return str(self.url)


def target_of(name: str, d: DestinationSection) -> Target:
    return Target(
        name=name,
        type=d.type,
        ae_title=d.ae_title,
        host=d.host,
        port=d.port,
        tls=d.tls,
        url=d.url.rstrip("/") if d.url else None,
        token=d.token.get_secret_value() if d.token else None,
        username=d.username,
        password=d.password.get_secret_value() if d.password else None,
    )


def describe(d: DestinationSection) -> str:
    return target_of("", d).describe()


def definition_of(d: DestinationSection) -> dict[str, Any]:
    """What the database stores: every field, secrets in clear (the database is the node's own)."""
    data = d.model_dump(mode="json", exclude_none=True)
    for key in ("token", "password"):
        secret = getattr(d, key)
        if secret is not None:
            data[key] = secret.get_secret_value()
    return data


def check_name(name: str) -> None:
    if name == SENDER or not _DEST_NAME.match(name):
        raise DestinationError(
            f"destination name {name!r} is not allowed: 1-64 letters, digits, '-', '_', '.', "
            "and not 'sender' (reserved for the AE that sent the study)"
        )


def section_from(data: Mapping[str, Any]) -> DestinationSection:
    try:
        return DestinationSection.model_validate(dict(data))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'destination'}: {e['msg']}" for e in exc.errors()
        )
        raise DestinationError(problems) from None


@dataclass(frozen=True)
class Known:
    name: str
    section: DestinationSection
    source: Source
    shadowed: bool = False  # a run-time destination hidden by a configured one of the same name


class DestinationStore:
    def __init__(self, sessions: sessionmaker[Session], configured: Mapping[str, DestinationSection]) -> None:
        self.sessions = sessions
        self.configured = dict(configured)

    # -- reading ---------------------------------------------------------------------------------
    def runtime(self) -> dict[str, DestinationSection]:
        out: dict[str, DestinationSection] = {}
        with self.sessions() as s:
            for row in s.scalars(select(DestinationRow).order_by(DestinationRow.name)).all():
                try:
                    out[row.name] = section_from(row.definition)
                except DestinationError:  # cannot happen for rows written by add(); never fatal
                    continue
        return out

    def known(self) -> list[Known]:
        rows = [Known(n, d, "config") for n, d in self.configured.items()]
        rows += [Known(n, d, "runtime", n in self.configured) for n, d in self.runtime().items()]
        return sorted(rows, key=lambda k: (k.name, k.source != "config"))

    def effective(self) -> dict[str, DestinationSection]:
        return {k.name: k.section for k in self.known() if not k.shadowed}

    def names(self) -> list[str]:
        return sorted(self.effective())

    def get(self, name: str) -> DestinationSection | None:
        if name in self.configured:
            return self.configured[name]
        return self.runtime().get(name)

    # -- changing --------------------------------------------------------------------------------
    def add(self, name: str, section: DestinationSection, *, replace: bool = False) -> str:
        """Store a run-time destination; returns "add" or "replace". Audited."""
        check_name(name)
        now = utcnow()
        with self.sessions.begin() as s:
            row = s.scalar(select(DestinationRow).where(DestinationRow.name == name))
            if row is not None and not replace:
                raise DestinationError(f"destination {name!r} exists; use --replace to change it")
            action = "replace" if row is not None else "add"
            if row is None:
                row = DestinationRow(name=name, created_at=now)
                s.add(row)
            row.type = section.type
            row.definition = definition_of(section)
            row.updated_at = now
            record(
                s,
                ev.DestinationChanged(
                    destination=name, action=action, destination_type=section.type, target=describe(section)
                ),
            )
        return action

    def remove(self, name: str) -> bool:
        with self.sessions.begin() as s:
            row = s.scalar(select(DestinationRow).where(DestinationRow.name == name))
            if row is None:
                return False
            section = section_from(row.definition)
            s.delete(row)
            record(
                s,
                ev.DestinationChanged(
                    destination=name, action="remove", destination_type=row.type, target=describe(section)
                ),
            )
        return True

    # -- resolving -------------------------------------------------------------------------------
    def resolve(
        self, name: str, *, sender_ae: str | None, sender_host: str | None, sender_port: int | None
    ) -> Target:
        """The target of a job's destination ``name``; raises ``DestinationError`` when there is none."""
        return resolve(
            self.effective(), name, sender_ae=sender_ae, sender_host=sender_host, sender_port=sender_port
        )


def resolve(
    destinations: Mapping[str, DestinationSection],
    name: str,
    *,
    sender_ae: str | None,
    sender_host: str | None,
    sender_port: int | None,
) -> Target:
    """``DestinationStore.resolve`` on an already read ``effective()`` mapping."""
    if name != SENDER:
        section = destinations.get(name)
        if section is None:
            raise DestinationError(
                f"destination {name!r} is not configured (neither in the configuration nor added)"
            )
        return target_of(name, section)
    return resolve_sender(destinations, sender_ae, sender_host, sender_port)


def resolve_sender(
    destinations: Mapping[str, DestinationSection],
    sender_ae: str | None,
    sender_host: str | None,
    sender_port: int | None,
) -> Target:
    if not sender_ae or not sender_host:
        raise DestinationError(
            "'sender' needs the calling AE title and host of the study; this study arrived without one "
            "(for example by STOW-RS): name a destination in the rule instead"
        )
    matches = [
        d
        for d in destinations.values()
        if d.type == "dimse" and (d.ae_title or "").strip() == sender_ae.strip()
    ]
    matches.sort(key=lambda d: d.host != sender_host)  # one on the sender's own host first
    if matches:
        port, tls = matches[0].port, matches[0].tls
    elif sender_port is not None:
        port, tls = sender_port, False
    else:
        raise DestinationError(
            f"no port for 'sender' {sender_ae}@{sender_host}: add a dimse destination with "
            f"ae_title {sender_ae!r} (its port is used) or set dispatch.sender_port"
        )
    return Target(name=SENDER, type="dimse", ae_title=sender_ae.strip(), host=sender_host, port=port, tls=tls)
