"""Memory shares of time-sliced GPUs, decided without I/O.

Time-slicing gives several pods one GPU with no isolation: one pod can take all its memory and
the others fail. As the products' sources do it (fixed memory blocks per task), each replica is
worth an equal block, `memory_total / replicas`; a pod's share is its number of replicas times
that block (one, unless it asked for several). A pod whose processes use more than its share is
reported once when it goes over (and, if the policy says `evict`, asked to be evicted), and again
only after it came back under.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PodUse:
    """One pod's use of one GPU in a cycle (its processes summed)."""

    namespace: str
    pod: str
    used_bytes: int
    replicas: int = 1  # replicas of this GPU the pod holds


@dataclass(frozen=True)
class OverShare:
    namespace: str
    pod: str
    used_bytes: int
    share_bytes: int


@dataclass
class ShareState:
    """Pods of one GPU over their share now (so that each crossing is reported once)."""

    over: set[tuple[str, str]] = field(default_factory=set)


def share_bytes(memory_total: int, replicas: int, held: int = 1) -> int:
    return memory_total * max(1, held) // max(1, replicas)


def check_shares(state: ShareState, memory_total: int | None, replicas: int,
                 uses: list[PodUse]) -> tuple[ShareState, list[OverShare], list[tuple[str, str]]]:
    """(new state, pods that went over their share now, pods back under it)."""
    if not memory_total or replicas <= 1:
        return ShareState(), [], sorted(state.over)
    went_over: list[OverShare] = []
    over_now: set[tuple[str, str]] = set()
    for use in uses:
        share = share_bytes(memory_total, replicas, use.replicas)
        key = (use.namespace, use.pod)
        if use.used_bytes > share:
            over_now.add(key)
            if key not in state.over:
                went_over.append(OverShare(use.namespace, use.pod, use.used_bytes, share))
    back = sorted(state.over - over_now)
    return ShareState(over_now), went_over, back
