"""``segnode jobs ...``: the jobs the router created."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from sqlalchemy import select

from node.cli_options import ConfigOpt, JsonOpt

jobs_app = typer.Typer(no_args_is_help=True, help="Jobs: pipeline runs requested by the rules.")

STATES = ("queued", "running", "written", "dispatching", "done", "failed", "cancelled", "superseded")


def _job_dict(job: Any) -> dict[str, Any]:
    return {
        "id": job.id,
        "uid": job.uid,
        "state": job.state,
        "level": job.level,
        "rule": job.rule_name,
        "rule_version": job.rule_version,
        "pipeline": job.pipeline,
        "parameters": job.parameters,
        "destinations": job.destinations,
        "lane": job.lane,
        "study_uid": job.study_uid,
        "series_uids": job.series_uids,
        "series_generations": job.series_generations,
        "sender_ae": job.sender_ae,
        "sender_host": job.sender_host,
        "supersedes_job_id": job.supersedes_job_id,
        "error": job.error,
        "created_at": job.created_at.isoformat(),
        "updated_at": job.updated_at.isoformat(),
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "claimed_by": job.claimed_by,
        "cancel_requested": job.cancel_requested,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }


@jobs_app.command("list")
def jobs_list(
    state: Annotated[
        str | None, typer.Option("--state", help=f"Only jobs in this state: {', '.join(STATES)}.")
    ] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List jobs, newest first."""
    from node.cli import _open_db, fail, settings_from
    from node.db.models import Job

    if state is not None and state not in STATES:
        fail(f"--state {state!r} is not a job state; allowed: {', '.join(STATES)}")
    db = _open_db(settings_from(config))
    with db.sessions() as s:
        q = select(Job).order_by(Job.id.desc())
        if state:
            q = q.where(Job.state == state)
        jobs = [_job_dict(j) for j in s.scalars(q).all()]
    if as_json:
        typer.echo(json.dumps(jobs, indent=2))
        return
    if not jobs:
        typer.echo("no jobs" + (f" in state {state}" if state else ""))
    for j in jobs:
        typer.echo(
            f"{j['id']:>5}  {j['state']:<11} {j['lane']:<8} {j['rule']} v{j['rule_version']} "
            f"-> {j['pipeline']}  "
            f"{j['level']} {', '.join(j['series_uids'])}  {j['created_at']}"
        )


@jobs_app.command("show")
def jobs_show(
    job_id: Annotated[str, typer.Argument(metavar="ID", help="Job id (number) or uid.")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one job with its audit trail."""
    from node.cli import _open_db, fail, settings_from
    from node.db.models import AuditEvent, Job, JobResult

    db = _open_db(settings_from(config))
    with db.sessions() as s:
        q = (
            select(Job).where(Job.id == int(job_id))
            if job_id.isdigit()
            else select(Job).where(Job.uid == job_id)
        )
        job = s.scalar(q)
        if job is None:
            fail(f"no job {job_id!r}; see 'segnode jobs list'", 1)
        data = _job_dict(job)
        data["results"] = [
            {"kind": r.kind, "path": r.path, "sop_instance_uid": r.sop_instance_uid, "size": r.size}
            for r in s.scalars(select(JobResult).where(JobResult.job_id == job.id).order_by(JobResult.id))
        ]
        trail = s.scalars(
            select(AuditEvent)
            .where(
                AuditEvent.event_type.like("job.%")
                | AuditEvent.event_type.like("delivery.%")
                | AuditEvent.event_type.like("executor.%")
            )
            .order_by(AuditEvent.id)
        ).all()
        data["events"] = [
            {"at": e.at.isoformat(), "event": e.event_type, "details": e.details}
            for e in trail
            if job.uid in (e.details.get("job_uid"), e.details.get("by_job_uid"))
        ]
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        if key != "events":
            typer.echo(f"{key:<19} {value}")
    typer.echo("events:")
    for e in data["events"]:
        typer.echo(f"  {e['at']}  {e['event']}")


@jobs_app.command("retry")
def jobs_retry(
    job_id: Annotated[str, typer.Argument(metavar="ID", help="Job id (number) or uid.")],
    config: ConfigOpt = None,
) -> None:
    """Retry a failed job: resend its results when they exist, else run it again."""
    import getpass

    from node.cli import _open_db, fail, settings_from
    from node.dispatch.retry import RetryError, retry_job

    settings = settings_from(config)
    db = _open_db(settings)
    try:
        done = retry_job(db.sessions, settings.storage.path, job_id, author=getpass.getuser())
    except RetryError as exc:
        fail(str(exc), 1)
    what = "results will be sent again" if done.to == "written" else "no results on disk: it runs again"
    typer.echo(f"job {done.job_id} -> {done.to}: {what}")


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: Annotated[str, typer.Argument(metavar="ID", help="Job id (number) or uid.")],
    config: ConfigOpt = None,
) -> None:
    """Cancel a job that has not finished; a running job's worker is stopped."""
    import getpass

    from node.cli import _open_db, fail, settings_from
    from node.execute.cancel import CancelError, cancel_job

    db = _open_db(settings_from(config))
    try:
        done = cancel_job(db.sessions, job_id, author=getpass.getuser())
    except CancelError as exc:
        fail(str(exc), 1)
    if done.state == "running":
        typer.echo(f"job {done.job_id} is running: cancel requested; its worker will be stopped")
    else:
        typer.echo(f"job {done.job_id} cancelled")


def register(app: typer.Typer) -> None:
    app.add_typer(jobs_app, name="jobs")
