"""The one durable write path for every received instance, whichever protocol carried it.

``Ingestor.store`` takes a temp file, reads its header, and in one database transaction records
study, series, instance and audit row; the rename into the spool and the instance's one fsync
(``Spool.commit``) happen inside that transaction after the instance row is written, so an
acknowledged instance is always both on disk and in the database. The fsynced spool file is the
durability point: with SQLite the ingest commits run at ``synchronous=NORMAL`` (they survive a crash
of the node; ``make_ingest_engine``), and should a power cut lose the last commits, start-up recovery
(``node.recovery``) records every spool file that has no row. Carriers (DIMSE associations, STOW-RS
requests) are recorded too: series completion waits for the carriers of a series to end.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, Table, bindparam, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from node.audit import events as ev
from node.audit.recorder import record, record_on, utcnow
from node.db.models import Association, Instance, Series, SeriesAssociation, Study
from node.receive.header import HeaderError, InstanceHeader
from node.receive.header_scan import header_of_file
from node.receive.spool import Spool, TempFile
from node.receive.status import Status

log = logging.getLogger(__name__)

#: ``studies.last_received_at`` is written at most this often per study (see Ingestor._touch_study).
STUDY_TOUCH_SECONDS = 1.0

_STUDIES: Table = Study.__table__  # type: ignore[assignment]
_SERIES: Table = Series.__table__  # type: ignore[assignment]
_INSTANCES: Table = Instance.__table__  # type: ignore[assignment]
_SERIES_ASSOCIATIONS: Table = SeriesAssociation.__table__  # type: ignore[assignment]

# The hot path's statements, built once: executing a prebuilt statement with parameters skips
# statement construction and hits SQLAlchemy's compiled cache directly.
_LOCK_SERIES = (
    select(_SERIES.c.study_id, _SERIES.c.state, _SERIES.c.generation, _SERIES.c.expected_count)
    .where(_SERIES.c.id == bindparam("series_id"))
    # FOR NO KEY UPDATE (PostgreSQL), the lock the counter's UPDATE takes: FOR UPDATE would also
    # conflict with the KEY SHARE locks that concurrent instance inserts take on the series row
    # (foreign key), and deadlock with them.
    .with_for_update(key_share=True)
)
_TOUCH_STUDY = (
    update(_STUDIES).where(_STUDIES.c.id == bindparam("study_id")).values(last_received_at=bindparam("now"))
)
_LATEST_VERSION = (
    select(_INSTANCES.c.version, _INSTANCES.c.sha256)
    .where(_INSTANCES.c.sop_instance_uid == bindparam("sop_instance_uid"))
    .order_by(_INSTANCES.c.version.desc())
    .limit(1)
)
_INSERT_INSTANCE = insert(_INSTANCES)


def _first_version(dialect: Any) -> Any:
    """Version 1 of an instance, or nothing (no row returned) when its SOP Instance UID is stored."""
    return dialect.insert(_INSTANCES).on_conflict_do_nothing().returning(_INSTANCES.c.id)


_INSERT_FIRST_VERSION = {"sqlite": _first_version(sqlite), "postgresql": _first_version(postgresql)}
_TOUCH_SERIES = (
    update(_SERIES).where(_SERIES.c.id == bindparam("series_id")).values(last_received_at=bindparam("now"))
)
_COUNT_INSTANCE = (
    update(_SERIES)
    .where(_SERIES.c.id == bindparam("series_id"))
    .values(last_received_at=bindparam("now"), instance_count=_SERIES.c.instance_count + 1)
    .returning(_SERIES.c.study_id, _SERIES.c.state, _SERIES.c.generation, _SERIES.c.expected_count)
)


@dataclass(frozen=True)
class Carrier:
    """Who brought an instance: one association or one HTTP request."""

    uid: str
    db_id: int
    protocol: str  # dimse | stow
    calling_ae: str | None
    remote_host: str | None


@dataclass(frozen=True)
class StoreResult:
    status: int
    outcome: str  # stored | duplicate | new_version | rejected
    comment: str
    header: InstanceHeader | None = None
    version: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == Status.SUCCESS


def _instance_row(
    temp: TempFile,
    carrier: Carrier,
    h: InstanceHeader,
    series_id: int,
    version: int,
    relative: str,
    now: datetime,
) -> dict[str, Any]:
    return {
        "series_id": series_id,
        "association_id": carrier.db_id,
        "sop_instance_uid": h.sop_instance_uid,
        "sop_class_uid": h.sop_class_uid,
        "version": version,
        "path": relative,
        "size": temp.size,
        "sha256": temp.sha256,
        "transfer_syntax": h.transfer_syntax,
        "calling_ae": carrier.calling_ae,
        "remote_host": carrier.remote_host,
        "received_at": now,
    }


class Ingestor:
    def __init__(self, sessions: sessionmaker[Session], spool: Spool) -> None:
        self.sessions = sessions
        self.spool = spool
        bind = sessions.kw.get("bind")
        if bind is None:
            raise ValueError("the session factory must be bound to an engine")
        self._engine: Engine = bind
        self._series_ids: dict[str, int] = {}
        self._links: set[tuple[int, int]] = set()
        self._study_touched: dict[int, float] = {}
        self._lock = threading.Lock()

    # -- carriers --------------------------------------------------------------------------------
    def open_carrier(
        self,
        protocol: str,
        *,
        calling_ae: str | None,
        called_ae: str | None,
        remote_host: str | None,
        remote_port: int | None,
        tls: bool = False,
    ) -> Carrier:
        uid = uuid.uuid4().hex
        with self.sessions.begin() as s:
            row = Association(
                uid=uid,
                protocol=protocol,
                calling_ae=calling_ae,
                called_ae=called_ae,
                remote_host=remote_host,
                remote_port=remote_port,
                started_at=utcnow(),
            )
            s.add(row)
            s.flush()
            record(
                s,
                ev.AssociationAccepted(
                    association_uid=uid,
                    protocol=protocol,
                    calling_ae=calling_ae,
                    called_ae=called_ae,
                    remote_host=remote_host,
                    remote_port=remote_port,
                    tls=tls,
                ),
            )
            return Carrier(uid, row.id, protocol, calling_ae, remote_host)

    def close_carrier(self, carrier: Carrier, how: str, instances: int) -> None:
        with self.sessions.begin() as s:
            s.execute(
                update(Association)
                .where(Association.id == carrier.db_id, Association.ended_at.is_(None))
                .values(ended_at=utcnow(), end_reason=how)
            )
            record(s, ev.AssociationEnded(association_uid=carrier.uid, how=how, instances=instances))

    def audit(self, event: ev.Event) -> None:
        with self.sessions.begin() as s:
            record(s, event)

    # -- instances -------------------------------------------------------------------------------
    def reject(
        self,
        carrier: Carrier | None,
        status: int,
        reason: str,
        *,
        header: InstanceHeader | None = None,
        sop_instance_uid: str | None = None,
        protocol: str = "dimse",
        calling_ae: str | None = None,
        remote_host: str | None = None,
    ) -> StoreResult:
        log.warning("instance rejected (0x%04X): %s", status, reason)
        self.audit(
            ev.InstanceRejected(
                association_uid=carrier.uid if carrier else None,
                study_uid=header.study_uid if header else None,
                series_uid=header.series_uid if header else None,
                sop_instance_uid=header.sop_instance_uid if header else sop_instance_uid,
                status=int(status),
                reason=reason,
                protocol=carrier.protocol if carrier else protocol,
                calling_ae=carrier.calling_ae if carrier else calling_ae,
                remote_host=carrier.remote_host if carrier else remote_host,
            )
        )
        return StoreResult(int(status), "rejected", reason, header)

    def store(
        self,
        temp: TempFile,
        carrier: Carrier,
        *,
        expected_sop_instance_uid: str | None = None,
        expected_sop_class_uid: str | None = None,
        expected_study_uid: str | None = None,
        header: InstanceHeader | None = None,
    ) -> StoreResult:
        """Record ``temp`` (a complete Part 10 file) durably, or reject it with a status."""
        try:
            if header is None:
                header = header_of_file(temp.path)
        except HeaderError as exc:
            self.spool.discard(temp)
            return self.reject(carrier, exc.status, exc.reason, sop_instance_uid=expected_sop_instance_uid)
        mismatch = None
        if expected_sop_instance_uid and header.sop_instance_uid != expected_sop_instance_uid.strip("\x00 "):
            mismatch = (
                Status.DATASET_DOES_NOT_MATCH,
                f"SOPInstanceUID {header.sop_instance_uid!r} in the data set differs from "
                f"{expected_sop_instance_uid!r} in the request",
            )
        elif expected_sop_class_uid and header.sop_class_uid != expected_sop_class_uid.strip("\x00 "):
            mismatch = (
                Status.DATASET_DOES_NOT_MATCH,
                f"SOPClassUID {header.sop_class_uid!r} in the data set differs from "
                f"{expected_sop_class_uid!r} in the request",
            )
        elif expected_study_uid and header.study_uid != expected_study_uid:
            mismatch = (
                Status.STUDY_UID_MISMATCH,
                f"StudyInstanceUID {header.study_uid!r} differs from {expected_study_uid!r} in the URL",
            )
        if mismatch:
            self.spool.discard(temp)
            return self.reject(carrier, mismatch[0], mismatch[1], header=header)

        for attempt in range(5):
            try:
                return self._record(temp, carrier, header)
            except (IntegrityError, OperationalError) as exc:
                # A concurrent writer stored the same SOP Instance UID or created the same series.
                self._forget(header.series_uid)
                if attempt == 4:
                    self.spool.discard(temp)
                    return self.reject(
                        carrier, Status.PROCESSING_FAILURE, f"database conflict: {exc.orig}", header=header
                    )
                log.debug("retrying store of %s after %s", header.sop_instance_uid, exc.orig)
            except OSError as exc:
                self.spool.discard(temp)
                return self.reject(
                    carrier, Status.OUT_OF_RESOURCES, f"cannot place file in spool: {exc}", header=header
                )
        raise AssertionError("unreachable")

    def _forget(self, series_uid: str) -> None:
        with self._lock:
            sid = self._series_ids.pop(series_uid, None)
            if sid is not None:
                self._links = {link for link in self._links if link[0] != sid}

    def _insert_ignore(self, conn: Connection, table: Table, values: dict[str, Any]) -> None:
        stmt: Any
        if conn.dialect.name == "postgresql":
            stmt = postgresql.insert(table).values(**values).on_conflict_do_nothing()
        else:
            stmt = sqlite.insert(table).values(**values).on_conflict_do_nothing()
        conn.execute(stmt)

    def _series_id(self, conn: Connection, h: InstanceHeader, carrier: Carrier, now: datetime) -> int:
        with self._lock:
            cached = self._series_ids.get(h.series_uid)
        if cached is not None:
            return cached
        self._insert_ignore(
            conn,
            _STUDIES,
            {
                "study_uid": h.study_uid,
                "patient_id": h.patient_id,
                "patient_name": h.patient_name,
                "study_date": h.study_date,
                "accession_number": h.accession_number,
                "study_description": h.study_description,
                "first_received_at": now,
                "last_received_at": now,
            },
        )
        study_id = conn.scalar(select(_STUDIES.c.id).where(_STUDIES.c.study_uid == h.study_uid))
        assert study_id is not None
        self._insert_ignore(
            conn,
            _SERIES,
            {
                "study_id": study_id,
                "series_uid": h.series_uid,
                "modality": h.modality,
                "series_number": h.series_number,
                "series_description": h.series_description,
                "state": "receiving",
                "generation": 1,
                "instance_count": 0,
                "expected_count": h.expected_count,
                "expected_source": h.expected_source,
                "first_received_at": now,
                "last_received_at": now,
                "sender_ae": carrier.calling_ae,
                "sender_host": carrier.remote_host,
                "routed_generation": 0,
            },
        )
        series_id = conn.scalar(select(_SERIES.c.id).where(_SERIES.c.series_uid == h.series_uid))
        assert series_id is not None
        return int(series_id)

    def _record(self, temp: TempFile, carrier: Carrier, h: InstanceHeader) -> StoreResult:
        """One short transaction in SQLAlchemy Core (the hot path: no ORM unit of work).

        The common case, an instance not seen before, costs four statements: the instance row
        (inserted as version 1 unless that SOP Instance UID exists), the series counter (returning
        what the series row says), the audit row and, at most once a second per study, the study's
        ``last_received_at``. A SOP Instance UID already stored takes ``_record_again``."""
        now = utcnow()
        with self._engine.begin() as conn:
            series_id = self._series_id(conn, h, carrier, now)
            self._link(conn, series_id, carrier)
            relative = self.spool.place(h.study_uid, h.series_uid, h.sop_instance_uid, 1)
            inserted = conn.execute(
                _INSERT_FIRST_VERSION[conn.dialect.name],
                _instance_row(temp, carrier, h, series_id, 1, relative, now),
            ).first()
            if inserted is None:
                return self._record_again(conn, temp, carrier, h, series_id, now)
            series = conn.execute(_COUNT_INSTANCE, {"series_id": series_id, "now": now}).first()
            if series is None:  # cache went stale (database reset under us)
                raise IntegrityError("series vanished", None, Exception("series row missing"))
            self._touch_study(conn, series.study_id, now)
            self._series_changes(conn, series_id, series, h, carrier, now)
            record_on(
                conn,
                ev.InstanceStored(
                    **self._keys(h, carrier),
                    sop_class_uid=h.sop_class_uid,
                    version=1,
                    size=temp.size,
                    sha256=temp.sha256,
                    transfer_syntax=h.transfer_syntax,
                    path=relative,
                    protocol=carrier.protocol,
                ),
                at=now,
            )
            # Conflicts (same SOP stored concurrently) surfaced above, before the file is placed;
            # the rename happens inside the transaction, so a crash before COMMIT leaves a spool
            # file without a row, which start-up recovery records.
            self.spool.commit(temp, relative)
        self._remember(h, series_id, carrier)
        return StoreResult(Status.SUCCESS, "stored", "stored", h, 1)

    def _record_again(
        self,
        conn: Connection,
        temp: TempFile,
        carrier: Carrier,
        h: InstanceHeader,
        series_id: int,
        now: datetime,
    ) -> StoreResult:
        """The SOP Instance UID is stored already: an identical copy, or a new version of it."""
        series = conn.execute(_LOCK_SERIES, {"series_id": series_id}).first()
        if series is None:  # cache went stale (database reset under us)
            raise IntegrityError("series vanished", None, Exception("series row missing"))
        self._touch_study(conn, series.study_id, now)
        previous = conn.execute(_LATEST_VERSION, {"sop_instance_uid": h.sop_instance_uid}).first()
        if previous is None:  # the row that blocked version 1 went away: let store() retry
            raise IntegrityError("instance vanished", None, Exception("instance row missing"))
        keys = self._keys(h, carrier)
        if previous.sha256 == temp.sha256:
            record_on(
                conn,
                ev.InstanceDuplicate(
                    **keys, sha256=temp.sha256, version=previous.version, protocol=carrier.protocol
                ),
                at=now,
            )
            conn.execute(_TOUCH_SERIES, {"series_id": series_id, "now": now})
            self.spool.discard(temp)
            self._remember(h, series_id, carrier)
            return StoreResult(
                Status.SUCCESS, "duplicate", "identical copy already stored", h, previous.version
            )

        version = previous.version + 1
        relative = self.spool.place(h.study_uid, h.series_uid, h.sop_instance_uid, version)
        conn.execute(
            _INSERT_INSTANCE,
            _instance_row(temp, carrier, h, series_id, version, relative, now),
        )
        conn.execute(_TOUCH_SERIES, {"series_id": series_id, "now": now})
        self._series_changes(conn, series_id, series, h, carrier, now)
        record_on(
            conn,
            ev.InstanceNewVersion(
                **keys,
                version=version,
                previous_sha256=previous.sha256,
                sha256=temp.sha256,
                protocol=carrier.protocol,
            ),
            at=now,
        )
        self.spool.commit(temp, relative)
        self._remember(h, series_id, carrier)
        return StoreResult(Status.SUCCESS, "new_version", "stored", h, version)

    def _series_changes(
        self,
        conn: Connection,
        series_id: int,
        series: Any,
        h: InstanceHeader,
        carrier: Carrier,
        now: datetime,
    ) -> None:
        """Rare: an instance re-opens a completed series, or brings its first count hint."""
        reopened = series.state == "complete"
        new_expected = series.expected_count is None and bool(h.expected_count)
        if not (reopened or new_expected):
            return
        changes: dict[str, Any] = {}
        if new_expected:
            changes["expected_count"] = h.expected_count
            changes["expected_source"] = h.expected_source
        if reopened:
            changes.update(
                state="receiving",
                generation=series.generation + 1,
                completed_at=None,
                completion_reason=None,
            )
        conn.execute(update(_SERIES).where(_SERIES.c.id == series_id).values(**changes))
        if reopened:
            record_on(
                conn,
                ev.SeriesReopened(
                    study_uid=h.study_uid,
                    series_uid=h.series_uid,
                    association_uid=carrier.uid,
                    generation=series.generation + 1,
                    reason=f"instance {h.sop_instance_uid} arrived after completion",
                ),
                at=now,
            )

    def _touch_study(self, conn: Connection, study_id: int, now: datetime) -> None:
        """The study's ``last_received_at``, written at most once a second per study (it is shown by
        ``segnode studies list``; series completion reads the series' own, exact, timestamp)."""
        tick = time.monotonic()
        with self._lock:
            last = self._study_touched.get(study_id)
            if last is not None and tick - last < STUDY_TOUCH_SECONDS:
                return
            self._study_touched[study_id] = tick
        conn.execute(_TOUCH_STUDY, {"study_id": study_id, "now": now})

    @staticmethod
    def _keys(h: InstanceHeader, carrier: Carrier) -> dict[str, str]:
        return {
            "study_uid": h.study_uid,
            "series_uid": h.series_uid,
            "sop_instance_uid": h.sop_instance_uid,
            "association_uid": carrier.uid,
        }

    def _remember(self, h: InstanceHeader, series_id: int, carrier: Carrier) -> None:
        with self._lock:
            self._series_ids[h.series_uid] = series_id
            self._links.add((series_id, carrier.db_id))

    def _link(self, conn: Connection, series_id: int, carrier: Carrier) -> None:
        link = (series_id, carrier.db_id)
        with self._lock:
            if link in self._links:
                return
        self._insert_ignore(
            conn, _SERIES_ASSOCIATIONS, {"series_id": series_id, "association_id": carrier.db_id}
        )
