"""Evaluate rules against series facts, explaining every condition: value found, held or not, and why."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from node.route.facts import SeriesFacts
from node.route.own_outputs import own_output_reason
from node.route.rules import All, AnyOf, Condition, Node, Not, Range, Rule


@dataclass
class Explanation:
    text: str
    held: bool
    found: Any = None
    why: str = ""
    children: list[Explanation] = field(default_factory=list)

    def lines(self, indent: int = 0) -> list[str]:
        mark = "PASS" if self.held else "FAIL"
        found = "" if self.found is None and not self.why else f"  found={self.found!r}"
        why = f"  ({self.why})" if self.why else ""
        out = [f"{'  ' * indent}{mark} {self.text}{found}{why}"]
        for child in self.children:
            out.extend(child.lines(indent + 1))
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "condition": self.text,
            "held": self.held,
            "found": _jsonable(self.found),
            "why": self.why,
            "children": [c.as_dict() for c in self.children],
        }

    def first_failure(self) -> Explanation | None:
        if self.held:
            return None
        for child in self.children:
            failing = child.first_failure()
            if failing is not None:
                return failing
        return self


def _jsonable(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


@dataclass
class RuleResult:
    rule: Rule
    matched: bool
    explanation: Explanation

    def reason(self) -> str:
        failing = self.explanation.first_failure()
        if failing is None:
            return "matched"
        return f"{failing.text}: {failing.why or 'did not hold'}"


def _flatten(values: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if isinstance(v, list):
            out.extend(_flatten(v))
        else:
            out.append(v)
    return out


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _same(found: Any, wanted: Any, ignore_case: bool) -> bool:
    if isinstance(wanted, bool):
        return found is wanted or str(found).lower() == str(wanted).lower()
    if isinstance(wanted, int | float):
        number = _as_number(found)
        return number is not None and number == float(wanted)
    a, b = str(found), str(wanted)
    return a.lower() == b.lower() if ignore_case else a == b


def _evaluate_condition(cond: Condition, facts: SeriesFacts) -> Explanation:
    text = cond.text()
    if cond.attribute is not None:
        values = cond.attribute.values(facts.first)
        shown: Any = None if values is None else (values[0] if len(values) == 1 else values)
    else:
        assert cond.fact is not None
        fact = facts.fact(cond.fact)
        values = None if fact is None else [fact]
        shown = fact
    if cond.op == "exists":
        return Explanation(text, values is not None, shown, "present" if values is not None else "absent")
    if cond.op == "missing":
        return Explanation(text, values is None, shown, "absent" if values is None else "present")
    if values is None:
        return Explanation(text, False, None, f"{cond.subject} is absent, so the condition is false")
    if cond.op == "equals":
        wanted = cond.operand
        if isinstance(wanted, list):
            held = any(
                isinstance(v, list)
                and len(v) == len(wanted)
                and all(_same(a, b, cond.ignore_case) for a, b in zip(v, wanted, strict=True))
                for v in values
            )
        else:
            held = any(_same(v[0] if isinstance(v, list) and len(v) == 1 else v, wanted, cond.ignore_case)
                       for v in values)  # fmt: skip
        return Explanation(text, held, shown, "equal" if held else "not equal")
    if cond.op == "in":
        flat = [v[0] if isinstance(v, list) and len(v) == 1 else v for v in values]
        held = any(_same(v, w, cond.ignore_case) for v in flat for w in cond.operand)
        return Explanation(
            text, held, shown, "one of the listed values" if held else "not among the listed values"
        )
    if cond.op == "contains":
        flat = _flatten(values)
        held = any(_same(v, cond.operand, cond.ignore_case) for v in flat)
        return Explanation(text, held, shown, "contained" if held else "not contained")
    if cond.op == "regex":
        assert cond.pattern is not None
        flat = [str(v) for v in _flatten(values)]
        held = any(cond.pattern.search(v) for v in flat)
        return Explanation(text, held, shown, "pattern found" if held else "pattern not found")
    if cond.op == "range":
        assert isinstance(cond.operand, Range)
        numbers = [n for n in (_as_number(v) for v in _flatten(values)) if n is not None]
        if not numbers:
            return Explanation(text, False, shown, "value is not a number")
        held = any(cond.operand.holds(n) for n in numbers)
        return Explanation(text, held, shown, "within range" if held else "outside range")
    raise AssertionError(f"unhandled operator {cond.op}")


def evaluate_node(node: Node, facts: SeriesFacts) -> Explanation:
    if isinstance(node, Condition):
        return _evaluate_condition(node, facts)
    if isinstance(node, Not):
        inner = evaluate_node(node.item, facts)
        return Explanation("not", not inner.held, children=[inner])
    children = [evaluate_node(item, facts) for item in node.items]
    if isinstance(node, All):
        return Explanation("all of", all(c.held for c in children), children=children)
    assert isinstance(node, AnyOf)
    return Explanation("any of", any(c.held for c in children), children=children)


def evaluate_rule(rule: Rule, facts: SeriesFacts) -> RuleResult:
    guard = own_output_reason(facts.first)
    if guard is not None:
        return RuleResult(rule, False, Explanation("not segnode's own output", False, None, guard))
    explanation = evaluate_node(rule.match, facts)
    return RuleResult(rule, explanation.held, explanation)


def order_rules(rules: Iterable[Rule]) -> list[Rule]:
    """Priority order: higher priority first, then by name."""
    return sorted(rules, key=lambda r: (-r.priority, r.name))


def evaluate_all(rules: Sequence[Rule], facts: SeriesFacts, level: str | None = None) -> list[RuleResult]:
    chosen = [r for r in order_rules(rules) if r.enabled and (level is None or r.level == level)]
    return [evaluate_rule(r, facts) for r in chosen]
