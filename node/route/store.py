"""Rules in the database, versioned: every add/edit/enable/disable/remove is a new version row."""

from __future__ import annotations

import getpass
import os
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path

import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.audit import events as ev
from node.audit.recorder import record, utcnow
from node.db.models import Rule as RuleRow
from node.db.models import RuleVersion
from node.route.rules import Rule, RuleError, load_rule_documents, parse_rule


def default_author() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER", "unknown")


def known_pipelines() -> list[str]:
    from pipelines.registry import pipeline_names

    return pipeline_names()


def default_rule_texts() -> list[tuple[str, str]]:
    folder = resources.files("node.route").joinpath("default_rules")
    return sorted(
        (p.name, p.read_text(encoding="utf-8")) for p in folder.iterdir() if p.name.endswith(".yaml")
    )


class RuleStoreError(ValueError):
    """A user error in a rules command: the message says what, which value and what is allowed."""


@dataclass(frozen=True)
class StoredRule:
    rule: Rule
    version: int
    removed: bool
    updated_at: datetime


@dataclass(frozen=True)
class VersionInfo:
    version: int
    action: str
    author: str
    created_at: datetime
    definition: str


class RuleStore:
    def __init__(self, sessions: sessionmaker[Session], destinations: Collection[str]) -> None:
        self.sessions = sessions
        self.destinations = list(destinations)
        self.pipelines = known_pipelines()

    # -- parsing ---------------------------------------------------------------------------------
    def parse(self, data: object) -> Rule:
        return parse_rule(data, pipelines=self.pipelines, destinations=self.destinations)

    def parse_text(self, text: str, source: str) -> list[Rule]:
        docs = load_rule_documents(text, source)
        if not docs:
            raise RuleStoreError(f"{source}: no rule found")
        rules = [self.parse(d) for d in docs]
        names = [r.name for r in rules]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise RuleStoreError(f"{source}: rule name(s) {', '.join(sorted(dup))} appear more than once")
        return rules

    def parse_file(self, path: Path) -> list[Rule]:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RuleStoreError(f"cannot read {path}: {exc.strerror}") from None
        return self.parse_text(text, str(path))

    # -- reading ---------------------------------------------------------------------------------
    def _row(self, s: Session, name: str) -> RuleRow | None:
        return s.scalar(select(RuleRow).where(RuleRow.name == name))

    def _current(self, s: Session, row: RuleRow) -> StoredRule:
        definition = s.scalar(
            select(RuleVersion.definition).where(
                RuleVersion.rule_id == row.id, RuleVersion.version == row.current_version
            )
        )
        assert definition is not None
        rule = parse_rule(
            yaml.safe_load(definition), pipelines=self.pipelines, destinations=self.destinations
        )
        return StoredRule(rule, row.current_version, row.removed, row.updated_at)

    def stored(self, include_removed: bool = False) -> list[StoredRule]:
        with self.sessions() as s:
            rows = s.scalars(select(RuleRow).order_by(RuleRow.name)).all()
            out = []
            for row in rows:
                if row.removed and not include_removed:
                    continue
                try:
                    out.append(self._current(s, row))
                except RuleError as exc:
                    # e.g. a destination removed from the config since: listed, never evaluated
                    raise RuleStoreError(
                        f"stored rule {row.name!r} v{row.current_version} is now invalid: {exc}"
                    ) from None
            return out

    def signature(self) -> tuple[object, ...]:
        """Changes whenever any rule changes (cheap: one aggregate query, no parsing)."""
        from sqlalchemy import func

        with self.sessions() as s:
            row = s.execute(select(func.count(RuleRow.id), func.sum(RuleRow.current_version))).one()
            return tuple(row)

    def active(self) -> list[Rule]:
        return [r.rule for r in self.stored() if r.rule.enabled]

    def get(self, name: str) -> StoredRule:
        with self.sessions() as s:
            row = self._row(s, name)
            if row is None or row.removed:
                raise RuleStoreError(f"no rule named {name!r}; see 'segnode rules list'")
            return self._current(s, row)

    def history(self, name: str) -> list[VersionInfo]:
        with self.sessions() as s:
            row = self._row(s, name)
            if row is None:
                raise RuleStoreError(f"no rule named {name!r} (ever); see 'segnode rules list'")
            versions = s.scalars(
                select(RuleVersion).where(RuleVersion.rule_id == row.id).order_by(RuleVersion.version)
            ).all()
            return [VersionInfo(v.version, v.action, v.author, v.created_at, v.definition) for v in versions]

    # -- changing --------------------------------------------------------------------------------
    def _write(self, s: Session, row: RuleRow, rule: Rule, action: str, author: str) -> int:
        now = utcnow()
        row.current_version = (row.current_version or 0) + 1
        row.enabled = rule.enabled
        row.removed = action == "remove"
        row.updated_at = now
        s.flush()
        s.add(
            RuleVersion(
                rule_id=row.id,
                version=row.current_version,
                action=action,
                definition=rule.to_yaml(),
                author=author,
                created_at=now,
            )
        )
        record(s, ev.RuleChanged(rule=rule.name, version=row.current_version, action=action, author=author))
        return row.current_version

    def add(self, rule: Rule, author: str, action: str = "add") -> int:
        with self.sessions.begin() as s:
            row = self._row(s, rule.name)
            if row is not None and not row.removed:
                raise RuleStoreError(
                    f"a rule named {rule.name!r} exists already (v{row.current_version}); "
                    f"use 'segnode rules edit {rule.name} FILE'"
                )
            if row is None:
                row = RuleRow(
                    name=rule.name,
                    current_version=0,
                    enabled=rule.enabled,
                    removed=False,
                    updated_at=utcnow(),
                )
                s.add(row)
                s.flush()
            return self._write(s, row, rule, action, author)

    def edit(self, name: str, rule: Rule, author: str) -> int:
        if rule.name != name:
            raise RuleStoreError(
                f"the file defines rule {rule.name!r}, not {name!r}; "
                "a rule keeps its name (add a new one instead)"
            )
        with self.sessions.begin() as s:
            row = self._row(s, name)
            if row is None or row.removed:
                raise RuleStoreError(f"no rule named {name!r}; use 'segnode rules add FILE'")
            return self._write(s, row, rule, "edit", author)

    def _change(self, name: str, author: str, action: str) -> int:
        with self.sessions.begin() as s:
            row = self._row(s, name)
            if row is None or row.removed:
                raise RuleStoreError(f"no rule named {name!r}; see 'segnode rules list'")
            current = self._current(s, row).rule
            definition = dict(current.definition)
            if action in ("enable", "disable"):
                definition["enabled"] = action == "enable"
            return self._write(s, row, self.parse(definition), action, author)

    def enable(self, name: str, author: str) -> int:
        return self._change(name, author, "enable")

    def disable(self, name: str, author: str) -> int:
        return self._change(name, author, "disable")

    def remove(self, name: str, author: str) -> int:
        return self._change(name, author, "remove")

    def seed_defaults(self) -> list[str]:
        """Install the shipped default rules once, on a database that never had any rule."""
        with self.sessions() as s:
            if s.scalar(select(RuleRow.id).limit(1)) is not None:
                return []
        seeded = []
        for name, text in default_rule_texts():
            for rule in self.parse_text(text, f"default rule {name}"):
                self.add(rule, "segnode", action="seed")
                seeded.append(rule.name)
        return seeded
