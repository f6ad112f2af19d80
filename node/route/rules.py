"""Routing rules: declarative YAML, parsed and validated eagerly. No ``eval`` anywhere.

A rule::

    name: ct-liver                 # letters, digits, '-', '_' and '.'
    enabled: true
    priority: 100                  # higher is evaluated first
    level: series                  # or study: gather the matching series of one study into one job
    match:                         # all / any / not over conditions
      all:
        - fact: modality
          equals: CT
        - attribute: SliceThickness          # keyword, tag "(0018,0050)" or a path through sequences
          range: {max: 5}
        - not: {attribute: ImageType, contains: LOCALIZER}
    pipeline: {name: ct-liver, parameters: {}}
    destinations: [sender]         # names from the destinations config, or "sender"
    priority_lane: routine         # stat | routine | research

A condition names one ``attribute`` or one ``fact`` and exactly one operator:
``equals``, ``in``, ``regex``, ``range`` (min/max with min_inclusive/max_inclusive, default inclusive),
``exists: true``, ``missing: true``, ``contains`` (for multi-valued attributes such as ImageType);
``ignore_case: true`` applies to equals/in/regex/contains on text.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from node.route.attributes import AttributePath, AttributePathError, parse_path
from node.route.facts import FACTS

OPERATORS = ("equals", "in", "regex", "range", "exists", "missing", "contains")
LEVELS = ("series", "study")
LANES = ("stat", "routine", "research")
RULE_KEYS = (
    "name",
    "description",
    "enabled",
    "priority",
    "level",
    "match",
    "pipeline",
    "destinations",
    "priority_lane",
)
RANGE_KEYS = ("min", "max", "min_inclusive", "max_inclusive")
SENDER = "sender"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class RuleFileError(ValueError):
    """A rules file that cannot be read as YAML."""


class RuleError(ValueError):
    """An invalid rule: names the rule, the path of the offending field, and what is allowed."""

    def __init__(self, rule: str, path: str, message: str) -> None:
        super().__init__(f"rule {rule!r}: {path}: {message}")
        self.rule = rule
        self.path = path
        self.message = message


@dataclass(frozen=True)
class Range:
    min: float | None
    max: float | None
    min_inclusive: bool = True
    max_inclusive: bool = True

    def holds(self, x: float) -> bool:
        if self.min is not None and (x < self.min or (x == self.min and not self.min_inclusive)):
            return False
        return not (self.max is not None and (x > self.max or (x == self.max and not self.max_inclusive)))

    def text(self) -> str:
        lo = "" if self.min is None else f"{self.min} {'<=' if self.min_inclusive else '<'} "
        hi = "" if self.max is None else f" {'<=' if self.max_inclusive else '<'} {self.max}"
        return f"{lo}value{hi}"


@dataclass(frozen=True)
class Condition:
    path: str  # where in the rule, e.g. match.all[2]
    attribute: AttributePath | None
    fact: str | None
    op: str
    operand: Any
    ignore_case: bool = False
    pattern: re.Pattern[str] | None = None

    @property
    def subject(self) -> str:
        return self.attribute.text if self.attribute else f"fact {self.fact}"

    def text(self) -> str:
        if self.op in ("exists", "missing"):
            return f"{self.subject} {self.op}"
        if self.op == "range":
            assert isinstance(self.operand, Range)
            return f"{self.subject} in range {self.operand.text()}"
        case = " (ignore case)" if self.ignore_case else ""
        return f"{self.subject} {self.op} {self.operand!r}{case}"


@dataclass(frozen=True)
class All:
    path: str
    items: tuple[Node, ...]


@dataclass(frozen=True)
class AnyOf:
    path: str
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Not:
    path: str
    item: Node


Node = Condition | All | AnyOf | Not


@dataclass(frozen=True)
class Rule:
    name: str
    match: Node
    pipeline: str
    parameters: dict[str, Any] = field(default_factory=dict)
    destinations: tuple[str, ...] = (SENDER,)
    enabled: bool = True
    priority: int = 0
    level: str = "series"
    priority_lane: str = "routine"
    description: str = ""
    definition: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.definition, sort_keys=False, allow_unicode=True)


def _allowed(values: Collection[str]) -> str:
    return ", ".join(values)


def _number(rule: str, path: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RuleError(rule, path, f"{value!r} is not a number")
    return float(value)


def _parse_condition(rule: str, path: str, data: Mapping[str, Any]) -> Condition:
    subjects = [k for k in ("attribute", "fact") if k in data]
    if len(subjects) != 1:
        raise RuleError(rule, path, "a condition names exactly one of 'attribute' or 'fact'")
    ops = [k for k in data if k in OPERATORS]
    unknown = [k for k in data if k not in (*OPERATORS, "attribute", "fact", "ignore_case")]
    if unknown:
        raise RuleError(
            rule,
            f"{path}.{unknown[0]}",
            f"unknown operator or key {unknown[0]!r}; allowed operators: {_allowed(OPERATORS)} "
            "(plus ignore_case)",
        )
    if len(ops) != 1:
        raise RuleError(rule, path, f"a condition has exactly one operator, one of: {_allowed(OPERATORS)}")
    op = ops[0]
    operand = data[op]
    ignore_case = data.get("ignore_case", False)
    if not isinstance(ignore_case, bool):
        raise RuleError(rule, f"{path}.ignore_case", f"{ignore_case!r} is not true or false")
    attribute: AttributePath | None = None
    fact: str | None = None
    if "attribute" in data:
        try:
            attribute = parse_path(data["attribute"])
        except AttributePathError as exc:
            raise RuleError(rule, f"{path}.attribute", str(exc)) from None
    else:
        fact = data["fact"]
        if fact not in FACTS:
            raise RuleError(
                rule, f"{path}.fact", f"unknown fact {fact!r}; allowed: {_allowed(sorted(FACTS))}"
            )
    pattern: re.Pattern[str] | None = None
    op_path = f"{path}.{op}"
    if op in ("exists", "missing"):
        if operand is not True:
            raise RuleError(rule, op_path, f"write '{op}: true' (got {operand!r})")
    elif op == "in":
        if not isinstance(operand, list) or not operand:
            raise RuleError(rule, op_path, "'in' takes a non-empty list of values")
        if any(isinstance(v, dict | list) for v in operand):
            raise RuleError(rule, op_path, "'in' values must be plain text or numbers")
    elif op == "regex":
        if not isinstance(operand, str):
            raise RuleError(rule, op_path, f"{operand!r} is not a regular expression string")
        try:
            pattern = re.compile(operand, re.IGNORECASE if ignore_case else 0)
        except re.error as exc:
            raise RuleError(rule, op_path, f"invalid regular expression {operand!r}: {exc}") from None
    elif op == "range":
        if not isinstance(operand, dict):
            raise RuleError(rule, op_path, f"'range' takes a mapping with keys {_allowed(RANGE_KEYS)}")
        bad = [k for k in operand if k not in RANGE_KEYS]
        if bad:
            raise RuleError(rule, f"{op_path}.{bad[0]}", f"unknown key; allowed: {_allowed(RANGE_KEYS)}")
        if "min" not in operand and "max" not in operand:
            raise RuleError(rule, op_path, "'range' needs 'min', 'max' or both")
        for flag in ("min_inclusive", "max_inclusive"):
            if flag in operand and not isinstance(operand[flag], bool):
                raise RuleError(rule, f"{op_path}.{flag}", f"{operand[flag]!r} is not true or false")
        lo = _number(rule, f"{op_path}.min", operand["min"]) if "min" in operand else None
        hi = _number(rule, f"{op_path}.max", operand["max"]) if "max" in operand else None
        if lo is not None and hi is not None and lo > hi:
            raise RuleError(rule, op_path, f"min {lo} is greater than max {hi}")
        operand = Range(lo, hi, operand.get("min_inclusive", True), operand.get("max_inclusive", True))
    elif op in ("equals", "contains") and (
        isinstance(operand, dict) or operand is None or (op == "contains" and isinstance(operand, list))
    ):
        raise RuleError(rule, op_path, f"{op!r} takes plain text or a number, not {operand!r}")
    return Condition(path, attribute, fact, op, operand, ignore_case, pattern)


def _parse_node(rule: str, path: str, data: Any) -> Node:
    if not isinstance(data, dict) or not data:
        raise RuleError(rule, path, "expected a mapping: all / any / not, or a condition")
    combinators = [k for k in ("all", "any", "not") if k in data]
    if combinators:
        if len(data) != 1:
            raise RuleError(rule, path, f"'{combinators[0]}' must stand alone in its mapping")
        key = combinators[0]
        if key == "not":
            return Not(path, _parse_node(rule, f"{path}.not", data["not"]))
        items = data[key]
        if not isinstance(items, list) or not items:
            raise RuleError(rule, f"{path}.{key}", f"'{key}' takes a non-empty list")
        parsed = tuple(_parse_node(rule, f"{path}.{key}[{i}]", item) for i, item in enumerate(items))
        return All(path, parsed) if key == "all" else AnyOf(path, parsed)
    return _parse_condition(rule, path, data)


def parse_rule(
    data: Any,
    *,
    pipelines: Collection[str],
    destinations: Collection[str],
) -> Rule:
    """Validate one rule mapping; raise RuleError naming the rule, the field path and what is allowed."""
    if not isinstance(data, dict):
        raise RuleError("?", "(rule)", f"a rule is a mapping with keys {_allowed(RULE_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise RuleError(
            str(name),
            "name",
            "required: 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit",
        )
    unknown = [k for k in data if k not in RULE_KEYS]
    if unknown:
        raise RuleError(name, unknown[0], f"unknown key; allowed: {_allowed(RULE_KEYS)}")
    enabled = data.get("enabled", True)
    if not isinstance(enabled, bool):
        raise RuleError(name, "enabled", f"{enabled!r} is not true or false")
    priority = data.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise RuleError(name, "priority", f"{priority!r} is not an integer")
    level = data.get("level", "series")
    if level not in LEVELS:
        raise RuleError(name, "level", f"{level!r} is not allowed; allowed: {_allowed(LEVELS)}")
    lane = data.get("priority_lane", "routine")
    if lane not in LANES:
        raise RuleError(name, "priority_lane", f"{lane!r} is not allowed; allowed: {_allowed(LANES)}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise RuleError(name, "description", "must be text")
    if "match" not in data:
        raise RuleError(name, "match", "required: all / any / not over conditions")
    match = _parse_node(name, "match", data["match"])
    pipe = data.get("pipeline")
    if isinstance(pipe, str):
        pipe = {"name": pipe}
    if not isinstance(pipe, dict) or "name" not in pipe:
        raise RuleError(name, "pipeline", "required: {name: PIPELINE, parameters: {...}}")
    bad = [k for k in pipe if k not in ("name", "parameters")]
    if bad:
        raise RuleError(name, f"pipeline.{bad[0]}", "unknown key; allowed: name, parameters")
    if pipe["name"] not in pipelines:
        raise RuleError(
            name,
            "pipeline.name",
            f"unknown pipeline {pipe['name']!r}; allowed: {_allowed(sorted(pipelines))}",
        )
    parameters = pipe.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RuleError(name, "pipeline.parameters", "must be a mapping")
    dests = data.get("destinations", [SENDER])
    if not isinstance(dests, list) or not dests or not all(isinstance(d, str) for d in dests):
        raise RuleError(name, "destinations", "a non-empty list of destination names")
    allowed_dests = sorted({*destinations, SENDER})
    for i, dest in enumerate(dests):
        if dest not in allowed_dests:
            raise RuleError(
                name,
                f"destinations[{i}]",
                f"unknown destination {dest!r}; allowed: {_allowed(allowed_dests)}",
            )
    return Rule(
        name=name,
        match=match,
        pipeline=pipe["name"],
        parameters=dict(parameters),
        destinations=tuple(dests),
        enabled=enabled,
        priority=priority,
        level=level,
        priority_lane=lane,
        description=description,
        definition=dict(data),
    )


def load_rule_documents(text: str, source: str) -> list[Any]:
    """YAML text holding one rule, a list of rules, or several documents."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RuleFileError(f"{source}: not valid YAML{where}: {problem}") from None
    out: list[Any] = []
    for doc in docs:
        out.extend(doc if isinstance(doc, list) else [doc])
    return out
