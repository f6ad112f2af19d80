"""``segnode rules ...``: manage, dry-run and backtest routing rules."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from pydicom.dataset import Dataset
from sqlalchemy import select

from node.cli_options import ConfigOpt, JsonOpt
from node.route.evaluate import RuleResult, evaluate_all
from node.route.facts import SeriesFacts, compute_facts, read_headers
from node.route.own_outputs import own_output_reason
from node.route.rules import Rule, RuleError, RuleFileError
from node.route.store import RuleStore, RuleStoreError, default_author, default_rule_texts

rules_app = typer.Typer(no_args_is_help=True, help="Routing rules: which series go to which pipeline.")

AuthorOpt = Annotated[str | None, typer.Option("--author", help="Who makes the change (default: OS user).")]


def _store(config: Path | None) -> RuleStore:
    from node.cli import _open_db, settings_from

    settings = settings_from(config)
    return _open_db(settings).rules(settings)  # type: ignore[no-any-return]


def _fail(message: str) -> None:
    from node.cli import fail

    fail(message)


def _guard(fn: Any) -> Any:
    """Turn user errors into one clear line and a non-zero exit (no traceback)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (RuleError, RuleStoreError, RuleFileError) as exc:
            _fail(str(exc))

    return wrapper


def _summary(rule: Rule, version: int) -> dict[str, Any]:
    return {
        "name": rule.name,
        "version": version,
        "enabled": rule.enabled,
        "priority": rule.priority,
        "level": rule.level,
        "pipeline": rule.pipeline,
        "parameters": rule.parameters,
        "destinations": list(rule.destinations),
        "priority_lane": rule.priority_lane,
        "description": rule.description,
    }


@rules_app.command("list")
@_guard
def rules_list(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """List the rules in priority order."""
    stored = sorted(_store(config).stored(), key=lambda r: (-r.rule.priority, r.rule.name))
    if as_json:
        typer.echo(json.dumps([_summary(r.rule, r.version) for r in stored], indent=2))
        return
    if not stored:
        typer.echo("no rules; add one with 'segnode rules add FILE'")
    for r in stored:
        state = "enabled " if r.rule.enabled else "disabled"
        typer.echo(
            f"{r.rule.name:<24} v{r.version:<3} {state} prio {r.rule.priority:<5} {r.rule.level:<6} "
            f"-> {r.rule.pipeline} [{', '.join(r.rule.destinations)}] {r.rule.priority_lane}"
        )


@rules_app.command("show")
@_guard
def rules_show(name: str, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Show one rule as YAML (with its version)."""
    stored = _store(config).get(name)
    if as_json:
        out = _summary(stored.rule, stored.version) | {"definition": stored.rule.definition}
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(f"# {stored.rule.name} v{stored.version}, updated {stored.updated_at.isoformat()}")
    typer.echo(stored.rule.to_yaml().rstrip())


@rules_app.command("add")
@_guard
def rules_add(file: Path, config: ConfigOpt = None, author: AuthorOpt = None) -> None:
    """Add the rule(s) defined in FILE (validated first; nothing is added if any is invalid)."""
    store = _store(config)
    rules = store.parse_file(file)
    for rule in rules:
        version = store.add(rule, author or default_author())
        typer.echo(f"added {rule.name} v{version}")


@rules_app.command("edit")
@_guard
def rules_edit(name: str, file: Path, config: ConfigOpt = None, author: AuthorOpt = None) -> None:
    """Replace rule NAME by the definition in FILE (a new version)."""
    store = _store(config)
    rules = store.parse_file(file)
    if len(rules) != 1:
        raise RuleStoreError(f"{file} defines {len(rules)} rules; edit takes a file with exactly one")
    version = store.edit(name, rules[0], author or default_author())
    typer.echo(f"edited {name}: now v{version}")


@rules_app.command("remove")
@_guard
def rules_remove(name: str, config: ConfigOpt = None, author: AuthorOpt = None) -> None:
    """Remove rule NAME (its history is kept)."""
    version = _store(config).remove(name, author or default_author())
    typer.echo(f"removed {name} (v{version})")


@rules_app.command("enable")
@_guard
def rules_enable(name: str, config: ConfigOpt = None, author: AuthorOpt = None) -> None:
    """Enable rule NAME."""
    version = _store(config).enable(name, author or default_author())
    typer.echo(f"enabled {name}: now v{version}")


@rules_app.command("disable")
@_guard
def rules_disable(name: str, config: ConfigOpt = None, author: AuthorOpt = None) -> None:
    """Disable rule NAME."""
    version = _store(config).disable(name, author or default_author())
    typer.echo(f"disabled {name}: now v{version}")


@rules_app.command("history")
@_guard
def rules_history(name: str, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Every version of rule NAME with time, author and action."""
    versions = _store(config).history(name)
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {
                        "version": v.version,
                        "action": v.action,
                        "author": v.author,
                        "at": v.created_at.isoformat(),
                        "definition": v.definition,
                    }
                    for v in versions
                ],
                indent=2,
            )
        )
        return
    for v in versions:
        typer.echo(f"v{v.version:<3} {v.created_at.isoformat()}  {v.action:<8} by {v.author}")


# -- dry runs ------------------------------------------------------------------------------------


def _group_files(paths: list[Path]) -> tuple[dict[str, list[Dataset]], list[str]]:
    """Read headers of all files under ``paths`` and group them by SeriesInstanceUID, as the node does."""
    files: list[Path] = []
    problems: list[str] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            problems.append(f"{p}: no such file or folder")
    headers = read_headers(
        files, on_error=lambda f, e: problems.append(f"{f}: not DICOM ({e.splitlines()[0]})")
    )
    grouped: dict[str, list[Dataset]] = defaultdict(list)
    for h in headers:
        grouped[str(h.get("SeriesInstanceUID", "") or "")].append(h)
    return dict(grouped), problems


def _rules_for_test(config: Path | None, rules_file: list[Path] | None) -> list[Rule]:
    from node.cli import settings_from
    from node.route.rules import load_rule_documents, parse_rule
    from node.route.store import known_pipelines

    settings = settings_from(config)
    dests = list(settings.destinations)

    def parse_text(text: str, source: str) -> list[Rule]:
        return [
            parse_rule(d, pipelines=known_pipelines(), destinations=dests)
            for d in load_rule_documents(text, source)
        ]

    if rules_file:
        out: list[Rule] = []
        for f in rules_file:
            files = sorted(f.glob("*.yaml")) + sorted(f.glob("*.yml")) if f.is_dir() else [f]
            for one in files:
                try:
                    out += parse_text(one.read_text(encoding="utf-8"), str(one))
                except OSError as exc:
                    raise RuleStoreError(f"cannot read {one}: {exc.strerror}") from None
        return out
    # the node's rules, read-only; the shipped defaults where there is no database yet
    db_file = settings.storage.path / "segnode.db"
    if settings.database.url or db_file.exists():
        from node.db.engine import make_engine, make_session_factory

        engine = make_engine(settings.database_url)
        try:
            return [r.rule for r in RuleStore(make_session_factory(engine), dests).stored()]
        finally:
            engine.dispose()
    out = []
    for name, text in default_rule_texts():
        out += parse_text(text, name)
    return out


def _series_report(key: str, facts: SeriesFacts, results: list[RuleResult], explain: bool) -> dict[str, Any]:
    guard = own_output_reason(facts.first)
    return {
        "series_uid": key,
        "study_uid": facts.study_uid,
        "series_description": str(facts.first.get("SeriesDescription", "") or ""),
        "facts": {k: v for k, v in facts.values.items()},
        "skipped": guard,
        "matched": [r.rule.name for r in results if r.matched],
        "rules": [
            {
                "rule": r.rule.name,
                "matched": r.matched,
                "pipeline": r.rule.pipeline,
                "reason": r.reason(),
                **({"explanation": r.explanation.as_dict()} if explain else {}),
            }
            for r in results
        ],
    }


@rules_app.command("test")
@_guard
def rules_test(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders.")],
    config: ConfigOpt = None,
    explain: Annotated[
        bool, typer.Option("--explain", help="Show every condition, value found and why.")
    ] = False,
    rules_file: Annotated[
        list[Path] | None,
        typer.Option("--rules", help="Test these rule files/folders instead of the node's."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate all rules against DICOM files (grouped into series); nothing is written anywhere."""
    rules = _rules_for_test(config, rules_file)
    groups, problems = _group_files(paths)
    reports = []
    for key, headers in sorted(groups.items()):
        facts = compute_facts(headers)
        results = evaluate_all(rules, facts)
        reports.append((facts, results, _series_report(key, facts, results, explain)))
    if as_json:
        typer.echo(
            json.dumps({"series": [r[2] for r in reports], "problems": problems}, indent=2, default=str)
        )
        return
    for p in problems:
        typer.echo(f"skipped {p}")
    if not reports:
        _fail("no DICOM series found in the given paths")
    for facts, results, report in reports:
        desc = report["series_description"]
        typer.echo(
            f"series {report['series_uid'] or '(no SeriesInstanceUID)'}  {facts.fact('modality') or '-'}  "
            f"{facts.fact('instance_count')} instance(s)  {desc!r}"
        )
        if report["skipped"]:
            typer.echo(f"  no rule applies: {report['skipped']}")
        matched = report["matched"]
        typer.echo(f"  matched: {', '.join(matched) if matched else 'no rule'}")
        for r in results:
            if explain:
                typer.echo(f"  rule {r.rule.name} -> {'MATCH' if r.matched else 'no match'}")
                for line in r.explanation.lines(2):
                    typer.echo(line)
            elif not r.matched:
                typer.echo(f"  rule {r.rule.name}: no match: {r.reason()}")


_SINCE = re.compile(r"^(\d+)([smhdw])$")


def _parse_since(text: str) -> timedelta:
    m = _SINCE.match(text.strip())
    if not m:
        raise RuleStoreError(f"--since {text!r} is not a duration; write e.g. 30m, 12h, 7d or 2w")
    n, unit = int(m.group(1)), m.group(2)
    return timedelta(**{{"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[unit]: n})


@rules_app.command("backtest")
@_guard
def rules_backtest(
    since: Annotated[str, typer.Option("--since", help="How far back: 30m, 12h, 7d, 2w.")] = "7d",
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replay stored series received since --since against the current rules (creates no job)."""
    from node.audit.recorder import utcnow
    from node.cli import _open_db, settings_from
    from node.db.models import Series, Study
    from node.route.router import latest_instance_paths

    window = _parse_since(since)
    settings = settings_from(config)
    db = _open_db(settings)
    rules = [r.rule for r in db.rules(settings).stored()]
    cutoff = utcnow() - window
    out = []
    with db.sessions() as s:
        rows = s.execute(
            select(Series, Study.study_uid)
            .join(Study, Study.id == Series.study_id)
            .where(Series.last_received_at >= cutoff)
            .order_by(Series.last_received_at)
        ).all()
        for series, study_uid in rows:
            paths = latest_instance_paths(s, series.id, settings.spool_dir)
            headers = read_headers(paths)
            if not headers:
                out.append(
                    {"series_uid": series.series_uid, "study_uid": study_uid, "error": "no readable instance"}
                )
                continue
            facts = compute_facts(headers)
            results = evaluate_all(rules, facts)
            out.append(
                {
                    "series_uid": series.series_uid,
                    "study_uid": study_uid,
                    "modality": series.modality,
                    "series_description": series.series_description,
                    "received": series.last_received_at.isoformat(),
                    "would_match": [r.rule.name for r in results if r.matched],
                    "skipped": own_output_reason(facts.first),
                }
            )
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    if not out:
        typer.echo(f"no series received in the last {since}")
    for row in out:
        match = ", ".join(row.get("would_match") or []) or (
            "error: " + row["error"] if "error" in row else "no rule"
        )
        typer.echo(
            f"{row['series_uid']}  {row.get('modality') or '-':<3} "
            f"{row.get('series_description') or ''!r} -> {match}"
        )


def register(app: typer.Typer) -> None:
    app.add_typer(rules_app, name="rules")
