"""Start-up reconciliation after a crash: nothing acknowledged is lost, nothing half-written lingers.

- Temp files under ``incoming/`` were never acknowledged: removed.
- A file in the spool without an instance row was renamed, and then either the node died before its
  transaction committed (never acknowledged), or a power cut lost an ingest commit that SQLite had
  not yet written through (``synchronous=NORMAL``: the fsynced spool file is the durability point).
  Either way it is recorded (audited as ``instance.recovered``) rather than thrown away.
- Carriers still open belonged to the previous process: ended with reason ``restart`` so that
  series completion can proceed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from node.audit import events as ev
from node.audit.recorder import record, utcnow
from node.db.models import Association, Instance
from node.receive.header import HeaderError, read_header
from node.receive.ingest import Carrier, Ingestor
from node.receive.spool import Spool, TempFile

log = logging.getLogger(__name__)


def close_stale_carriers(sessions: sessionmaker[Session]) -> int:
    with sessions.begin() as s:
        stale = s.execute(select(Association.id, Association.uid).where(Association.ended_at.is_(None))).all()
        if not stale:
            return 0
        s.execute(
            update(Association)
            .where(Association.id.in_([row.id for row in stale]))
            .values(ended_at=utcnow(), end_reason="restart")
        )
        for row in stale:
            record(s, ev.AssociationEnded(association_uid=row.uid, how="restart", instances=-1))
    return len(stale)


def reconcile_spool(sessions: sessionmaker[Session], spool: Spool, ingestor: Ingestor) -> int:
    for leftover in spool.leftover_temps():
        log.info("removing unacknowledged partial file %s", leftover)
        leftover.unlink(missing_ok=True)
    with sessions() as s:
        known = set(s.scalars(select(Instance.path)).all())
    orphans = [p for p in spool.root.rglob("*.dcm") if spool.relative(p) not in known]
    if not orphans:
        return 0
    carrier = ingestor.open_carrier(
        "recovery", calling_ae=None, called_ae=None, remote_host=None, remote_port=None
    )
    recovered = 0
    for path in orphans:
        recovered += _recover_one(path, spool, ingestor, carrier)
    ingestor.close_carrier(carrier, "released", recovered)
    return recovered


def _recover_one(path: Path, spool: Spool, ingestor: Ingestor, carrier: Carrier) -> int:
    try:
        header = read_header(path)
    except HeaderError as exc:
        log.warning("spool file %s is unreadable (%s); left in place", path, exc.reason)
        return 0
    temp_path = spool.new_temp_path()
    path.replace(temp_path)
    temp: TempFile = spool.adopt_temp(temp_path)
    result = ingestor.store(temp, carrier, header=header)
    ingestor.audit(
        ev.InstanceRecovered(
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            sop_instance_uid=header.sop_instance_uid,
            association_uid=carrier.uid,
            path=str(path),
            reason=f"in spool without a database row at start-up; {result.outcome}",
        )
    )
    return 1 if result.ok else 0
