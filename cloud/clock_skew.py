"""How far each edge's clock is from the controller's, estimated from arrival times.

An edge's `ts` is on its own clock. An edge whose clock is hours off (no NTP on a remote site, a
clock reset at reboot) must not have its lag read as hours, nor, after its clock jumps back, have
every newer status and sample refused as "older than the one we have". So the ingest keeps, per
node, an estimate of `edge clock - cloud clock`, and the fleet store compares and keeps status
and sample times corrected by it (`ts - skew`: when the edge made them, on the cloud's clock).

A message's `ts - received_at` is the skew minus its transit delay. Delay only makes it smaller,
so every message is a lower bound of the skew, and the estimate is the largest value seen over a
short window (the least delayed message), the way NTP's clock filter picks its least delayed
sample. Any message may raise the estimate: an edge whose clock jumped forward is followed at its
first message. Only telemetry may lower it: telemetry is made just before it is sent, at QoS 0,
so the broker never holds it back, whereas an outbox event may be re-sent hours later and a
status (QoS 1) may be queued for a controller that was down, retained, or a last will made at
connect. The window (`window_s`, two buckets) lets a slowly drifting clock be followed; a
telemetry message more than `jump_s` below the estimate is a clock that jumped back and is
followed at once. Within `tolerance_s` the clocks are taken to agree (skew 0), so a node in step
is stored exactly as it reports.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_WINDOW_S = 10.0
DEFAULT_JUMP_S = 30.0
DEFAULT_TOLERANCE_S = 2.0


@dataclass
class _Window:
    started: float  # cloud time the current bucket began
    current: float  # largest ts - received_at in the current bucket
    previous: float | None  # ... in the bucket before it, if it ended less than a window ago

    @property
    def estimate(self) -> float:
        return self.current if self.previous is None else max(self.current, self.previous)


class ClockSkewEstimator:
    """Per node: the edge's clock minus ours, in seconds (positive: the edge is ahead)."""

    def __init__(self, window_s: float = DEFAULT_WINDOW_S, jump_s: float = DEFAULT_JUMP_S,
                 tolerance_s: float = DEFAULT_TOLERANCE_S) -> None:
        self.window_s = window_s
        self.jump_s = jump_s
        self.tolerance_s = tolerance_s
        self._windows: dict[str, _Window] = {}
        self.skew: dict[str, float] = {}  # node -> the skew in effect (0.0 within the tolerance)

    def observe(self, node: str, edge_ts: float, received_at: float, *, telemetry: bool) -> float:
        """Take one message into account; answer the node's skew now (0.0 if unknown)."""
        offset = edge_ts - received_at
        window = self._windows.get(node)
        if window is None:
            if not telemetry:
                return 0.0  # e.g. a retained status from days ago: no estimate from that
            window = self._windows[node] = _Window(started=received_at, current=offset, previous=None)
        elif telemetry and offset < window.estimate - self.jump_s:
            window.started, window.current, window.previous = received_at, offset, None  # jumped back
        elif telemetry and received_at - window.started >= self.window_s:
            recent = received_at - window.started < 2 * self.window_s
            window.previous = window.current if recent else None
            window.started, window.current = received_at, offset
        else:
            window.current = max(window.current, offset)
        estimate = window.estimate
        skew = 0.0 if abs(estimate) < self.tolerance_s else round(estimate, 3)
        self.skew[node] = skew
        return skew
