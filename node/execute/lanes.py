"""Priority lanes with ageing: stat before routine before research, and nothing starves.

A job's rank is its creation time plus ``LANE_RANK[lane] * ageing_seconds``: the earliest rank runs first.
So a routine job that has waited ``ageing_seconds`` ranks with a stat job arriving now, and a research job
catches up with a new stat job after twice that. Within a lane, first come first served.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Protocol, TypeVar

LANE_RANK: dict[str, int] = {"stat": 0, "routine": 1, "research": 2}


class Queued(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def lane(self) -> str: ...
    @property
    def created_at(self) -> datetime: ...


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def rank(lane: str, created_at: datetime, ageing_seconds: float) -> datetime:
    """When the job counts as 'due': the earlier, the sooner it runs."""
    return _aware(created_at) + timedelta(seconds=LANE_RANK.get(lane, LANE_RANK["routine"]) * ageing_seconds)


T = TypeVar("T", bound=Queued)


def in_claim_order(jobs: Iterable[T], ageing_seconds: float) -> Sequence[T]:
    return sorted(jobs, key=lambda j: (rank(j.lane, j.created_at, ageing_seconds), j.id))
