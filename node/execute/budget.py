"""Device memory budget: which idle worker takes a job, and whether the job must wait.

Each worker holds its loaded pipelines warm; each loaded pipeline counts ``need(pipeline)`` MB against the
budget, whether it is running or idle. A job goes to an idle worker that already holds its pipeline;
else to one where loading it fits; else one that first drops its warm pipelines (``evict_self``); else,
when dropping the warm pipelines of every idle worker makes room, those are dropped too
(``evict_idle``). Otherwise the job waits (``None``) until a running job ends. A pipeline that needs more
than the whole budget can never run: ``NEVER``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal


@dataclass(frozen=True)
class SlotView:
    busy: bool
    resident: frozenset[str]


@dataclass(frozen=True)
class Placement:
    slot: int
    evict_self: bool = False
    evict_idle: tuple[int, ...] = ()


NEVER: Final = "never"
Plan = Placement | Literal["never"] | None


def estimator(overrides: Mapping[str, int], default_mb: int) -> Callable[[str], int]:
    def need(pipeline: str) -> int:
        return int(overrides.get(pipeline, default_mb))

    return need


def place(
    pipeline: str, slots: Sequence[SlotView], need: Callable[[str], int], budget_mb: int | None
) -> Plan:
    idle = [i for i, s in enumerate(slots) if not s.busy]
    if not idle:
        return None
    warm = [i for i in idle if pipeline in slots[i].resident]
    if budget_mb is None:
        return Placement(warm[0] if warm else idle[0])
    n = need(pipeline)
    if n > budget_mb:
        return NEVER
    if warm:
        return Placement(warm[0])

    def held(i: int) -> int:
        return sum(need(p) for p in slots[i].resident)

    total = sum(held(i) for i in range(len(slots)))
    for i in sorted(idle, key=held):
        if total + n <= budget_mb:
            return Placement(i)
    for i in sorted(idle, key=held, reverse=True):
        if total - held(i) + n <= budget_mb:
            return Placement(i, evict_self=True)
    busy_total = sum(held(i) for i in range(len(slots)) if slots[i].busy)
    if busy_total + n <= budget_mb:
        first = idle[0]
        return Placement(first, evict_self=True, evict_idle=tuple(i for i in idle[1:] if slots[i].resident))
    return None
