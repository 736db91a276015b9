"""The sample history's tiers and which one answers a read: pure, no I/O (cloud/store/history.py
does the reading and the rolling up).

Tier 0 is the raw one: the samples as the edges sent them, kept `raw_retention_s`. Each coarser
tier keeps, per GPU, the mean of every `resolution_s` bucket for its `retention_s`. A read names a
range and a point budget; the finest tier that holds the whole range within the budget answers it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_RAW_RETENTION_S = 3600.0
DEFAULT_ROLLUPS: tuple[tuple[int, float], ...] = ((60, 86_400.0), (600, 30 * 86_400.0))


@dataclass(frozen=True)
class Tier:
    resolution_s: int  # 0: the raw tier (every sample stored)
    retention_s: float

    @property
    def raw(self) -> bool:
        return self.resolution_s == 0

    @property
    def name(self) -> str:
        return "raw" if self.raw else f"{self.resolution_s}s"


@dataclass(frozen=True)
class HistoryTiers:
    """The raw tier's retention and the roll-up tiers, finest first."""

    raw_retention_s: float = DEFAULT_RAW_RETENTION_S
    rollups: tuple[tuple[int, float], ...] = DEFAULT_ROLLUPS

    def __post_init__(self) -> None:
        if self.raw_retention_s <= 0:
            raise ValueError("the raw history's retention must be positive")
        previous_res, previous_keep = 0, self.raw_retention_s
        for resolution, retention in self.rollups:
            if int(resolution) != resolution or resolution < 1:
                raise ValueError(f"a history tier's resolution is whole seconds >= 1, not {resolution!r}")
            if resolution <= previous_res:
                raise ValueError("history tiers go from the finest resolution to the coarsest")
            if retention < previous_keep:
                raise ValueError(f"the {resolution} s tier keeps less ({retention:g} s) than a finer one "
                                 f"({previous_keep:g} s): a coarser tier keeps at least as long")
            previous_res, previous_keep = resolution, retention

    @property
    def tiers(self) -> tuple[Tier, ...]:
        return (Tier(0, self.raw_retention_s), *(Tier(int(r), float(k)) for r, k in self.rollups))


# A range that starts up to this fraction of a tier's retention before what the tier keeps is still
# answered by it: a dashboard asking for "the last hour" computes `since` a moment before the
# controller's `now`, and would otherwise get 1-minute means instead of every sample. The oldest
# seconds of such a range may be blank (pruned); the rest keeps its resolution.
REACH_SLACK = 0.05


def candidate_tiers(tiers: HistoryTiers, *, now: float, since: float | None) -> list[Tier]:
    """The tiers that can answer a read starting at `since`, finest first: those that still keep
    data that old (within REACH_SLACK). Without `since` (the newest points): every tier. Never
    empty: when no tier reaches back that far, the coarsest (it holds what is left)."""
    every = list(tiers.tiers)
    if since is None:
        return every
    reaching = [t for t in every if since >= now - t.retention_s * (1 + REACH_SLACK)]
    return reaching or every[-1:]


def bucket_mean(total: float | None, count: int | None) -> float | None:
    """A figure's mean over a bucket, or None when no sample in it had the figure."""
    if total is None or not count:
        return None
    return total / count


def observed_spacing(rows: list[dict[str, Any]]) -> float | None:
    """The median time between consecutive points of the same GPU (the raw tier's resolution is
    the edges' sampling interval, which the cloud is not told), or None with too few points."""
    last: dict[str, float] = {}
    gaps: list[float] = []
    for row in rows:
        previous = last.get(row["uuid"])
        if previous is not None and row["ts"] > previous:
            gaps.append(row["ts"] - previous)
        last[row["uuid"]] = row["ts"]
    if not gaps:
        return None
    gaps.sort()
    return round(gaps[len(gaps) // 2], 3)
