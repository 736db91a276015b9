"""Per-node ingest budgets: how much one node may make the controller do, decided without I/O.

One authenticated node must not be able to take the controller down or crowd out the others, so
every message is weighed against its node's budget BEFORE it is queued (cloud/ingest.py):

- messages per second (telemetry: outbox events and statuses have budgets of their own) and bytes
  per second (everything), token buckets holding `burst_s` seconds of their rate;
- events per minute (a token bucket holding `event_burst` events: an edge catching up a long outage
  sends its backlog in windows of `outbox_window` events and is paced by the rate, not refused; a
  refused event is not acked, so the edge sends it again: paced, nothing lost);
- distinct GPUs (UUIDs in status and telemetry): the first `gpus` UUIDs a node names are its GPUs;
  the samples and summaries of any further UUID are left out, never those of its known GPUs;
- a backlog: messages admitted and not yet written (`release`d by the ingest once written or
  refused). The queues between the broker and the fleet store are first come, first served, so
  a node whose messages are admitted faster than the store writes them would otherwise fill them,
  and every other node's messages would wait behind its backlog. At `backlog` messages its
  telemetry and events are dropped (the edge re-sends unacked events) until the store has written
  half of them (so that a flood is refused in runs, not let in a message at a time as each is written):
  another node's message never waits behind more than `backlog` of them. An honest edge has at
  most one outbox window (1,000 events) and a few telemetry messages in flight.

Statuses have a small bucket of their own (`STATUS_RATE` a second), so that a node's last will and
its status after a flood are not refused for the flood it sent just before.

A node over a budget is flagged (`flags`: node -> the budget) until it has gone `RECOVER_AFTER_S`
without a refusal; `admit` and `sweep` report the transitions so the caller logs one line when a
node goes over and one when it is back, never one per message. A limit of 0 turns that budget off.

Dropping costs little here, but not nothing: a node flooding at full speed still fills the
broker's queue for the controller, and every other node's messages wait behind its excess there.
A node refused `runaway_drops_per_second` times within one second is a runaway (`Verdict.runaway`,
once per flagged episode): the caller stops it at the broker (cloud/quarantine.py). An honest edge
is refused at most one outbox window (1,000 events) per re-send wait, far below the default.
Events are also weighed against what was acked (`admit_seq`, `events_ahead`): an edge never sends
more than its outbox window past its last ack, so a flood of events is refused, and found a runaway,
as soon as it is read past that, not only once the store falls behind.
From then until its flag clears, everything it sends but its status is refused (`Budget.RUNAWAY`):
the store stops spending on the flood, and the flood's rest, still queued in the broker, is read
for the cost of a drop.

Pure: state and the time in, a verdict out (tests drive it with their own clock).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

STATUS_RATE = 1.0  # statuses per second a node may always send (an honest edge: one per ~25 s)
STATUS_BURST = 10.0
RECOVER_AFTER_S = 10.0  # a flag is cleared after this long without a refusal
EVENT_RESUME = 100  # after running dry, a node's events wait for this many tokens (one edge window)


class Budget(enum.StrEnum):
    """What a node went over (the flag's value, the dropped counter's reason)."""

    MESSAGES = "messages_per_second"
    BYTES = "bytes_per_second"
    EVENTS = "events_per_minute"
    GPUS = "gpus"
    BACKLOG = "backlog"
    AHEAD = "events_ahead"  # an event further past the node's last ack than any edge's window
    RUNAWAY = "runaway"  # everything but its status, once it is a runaway, until its flag clears


BUDGETS: tuple[str, ...] = tuple(b.value for b in Budget)


@dataclass(frozen=True)
class BudgetLimits:
    """A node's budget; 0 turns a limit off."""

    messages_per_second: float = 200.0
    bytes_per_second: float = 2 * 1024 * 1024
    events_per_minute: float = 60_000.0
    event_burst: float = 100_000.0
    gpus: int = 128
    burst_s: float = 10.0
    backlog: int = 3_000
    runaway_drops_per_second: float = 2_000.0
    events_ahead: int = 2_000


@dataclass
class TokenBucket:
    """`rate` tokens a second, at most `capacity` held; starts full."""

    rate: float
    capacity: float
    tokens: float
    updated: float
    resume_at: float = 0.0  # after running dry, refuse until this many tokens are held again
    holding: bool = False

    @classmethod
    def full(cls, rate: float, capacity: float, now: float, resume_at: float = 0.0) -> TokenBucket:
        return cls(rate=rate, capacity=capacity, tokens=capacity, updated=now, resume_at=resume_at)

    def take(self, amount: float, now: float) -> bool:
        """Take `amount` tokens if held; False (nothing taken) otherwise. A bucket with rate 0 is off."""
        if self.rate <= 0:
            return True
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
        if self.holding:
            if self.tokens < self.resume_at:
                return False
            self.holding = False
        if self.tokens >= amount:
            self.tokens -= amount
            return True
        # Run dry. With resume_at, hold back until that many tokens are back, so that what is
        # admitted comes in runs (an edge re-sends from its first refused event: few holes).
        self.holding = self.resume_at > 0
        return False


@dataclass
class NodeState:
    messages: TokenBucket
    bytes: TokenBucket
    events: TokenBucket
    statuses: TokenBucket
    gpus: set[str] = field(default_factory=set)
    queued: int = 0  # admitted and not yet released (written or refused) by the ingest
    draining: bool = False  # hit the backlog: refused until half of it is written
    over: dict[Budget, float] = field(default_factory=dict)  # budget -> last refusal (time)
    refusals_since: float = float("-inf")  # the first refusal of the second `refusals` counts
    refusals: int = 0  # refusals within that second
    runaway: bool = False  # reported as a runaway in this flagged episode


@dataclass(frozen=True)
class Verdict:
    """`refused`: the budget the message is over (drop it), None to admit it. `went_over`: this
    refusal flagged the node (log it once). `runaway`: this refusal made the node a runaway (see
    the module's docstring; reported once per episode)."""

    refused: Budget | None = None
    went_over: bool = False
    runaway: bool = False


ADMIT = Verdict()
_REFUSED = {(budget, went_over): Verdict(budget, went_over) for budget in Budget for went_over in (False, True)}


class NodeBudgets:
    """Every node's buckets and flags (one per controller process; each replica judges what it
    receives)."""

    def __init__(self, limits: BudgetLimits) -> None:
        self.limits = limits
        self.nodes: dict[str, NodeState] = {}
        self.flags: dict[str, str] = {}  # node -> the budget it is over now (the newest)
        self.acked: dict[str, int] = {}  # node -> the last ack this process published to it (`note_ack`)

    def _state(self, node: str, now: float) -> NodeState:
        state = self.nodes.get(node)
        if state is None:
            lim = self.limits
            state = self.nodes[node] = NodeState(
                messages=TokenBucket.full(lim.messages_per_second, lim.messages_per_second * lim.burst_s, now),
                bytes=TokenBucket.full(lim.bytes_per_second, lim.bytes_per_second * lim.burst_s, now),
                events=TokenBucket.full(lim.events_per_minute / 60.0, max(lim.event_burst, 1.0), now,
                                        resume_at=min(EVENT_RESUME, max(lim.event_burst, 1.0))),
                statuses=TokenBucket.full(STATUS_RATE, STATUS_BURST, now),
            )
        return state

    def admit(self, node: str, size: int, *, event: bool, status: bool, now: float) -> Verdict:
        """One message of `size` bytes from `node` (an outbox event, a status, or telemetry). An
        admitted message counts in the node's backlog until `release`d."""
        state = self._state(node, now)
        if status:  # never refused for the backlog: a last will must not wait for a flood to drain
            if state.statuses.take(1.0, now):
                state.queued += 1
                return ADMIT
            return self._refuse(node, state, Budget.MESSAGES, now)
        if state.runaway:  # nothing more of a flood is worth reading: what is queued drains faster
            return self._refuse(node, state, Budget.RUNAWAY, now)
        backlog = self.limits.backlog
        if backlog > 0 and (state.queued >= backlog or (state.draining and state.queued > backlog // 2)):
            state.draining = True  # refused until half of it is written: a flood is refused in runs
            return self._refuse(node, state, Budget.BACKLOG, now)
        state.draining = False
        if event:
            if not state.events.take(1.0, now):
                return self._refuse(node, state, Budget.EVENTS, now)
        elif not state.messages.take(1.0, now):
            return self._refuse(node, state, Budget.MESSAGES, now)
        if not state.bytes.take(float(size), now):
            return self._refuse(node, state, Budget.BYTES, now)
        state.queued += 1
        return ADMIT

    def note_ack(self, node: str, upto: int) -> None:
        """This process acked the node's events up to `upto` (published after the commit)."""
        self.acked[node] = upto

    def admit_seq(self, node: str, seq: int, now: float) -> Verdict:
        """An admitted event's seq against what was acked to its node: an edge sends at most its
        `outbox_window` past its last ack, and its last ack is one this process published (or an
        older one), so an event more than `events_ahead` past the last ack published here comes
        from something that does not wait for acks. Refused (the edge sends it again, paced: an
        honest edge ahead for another reason, e.g. a fleet database restored behind it, loses
        nothing), and refusals at a flood's rate make it a runaway within a fraction of a second,
        where the other budgets wait for the store to fall behind. Unknown until the first ack
        this process publishes to the node: a restarted controller judges no one. The acked seq
        is the fleet store's after the batch, so among replicas it counts the others' writes as of
        this one's last batch with the node's messages (the composition root doubles the margin)."""
        ahead = self.limits.events_ahead
        acked = self.acked.get(node)
        if ahead <= 0 or acked is None or seq <= acked + ahead:
            return ADMIT
        return self._refuse(node, self._state(node, now), Budget.AHEAD, now)

    def release(self, node: str, count: int = 1) -> None:
        """`count` of the node's admitted messages were written, or refused after admission."""
        state = self.nodes.get(node)
        if state is not None:
            state.queued = max(0, state.queued - count)

    def backlog_of(self, node: str) -> int:
        """The node's messages admitted and not yet released."""
        state = self.nodes.get(node)
        return state.queued if state is not None else 0

    def admit_gpus(self, node: str, uuids: Iterable[str], now: float, *, inventory: bool = False) -> tuple[
            set[str], Verdict]:
        """The UUIDs of `uuids` the node may have (its known GPUs first, then new ones while
        under the limit), and the verdict on the rest. `inventory` (a status's GPU list): the
        node's GPUs are what it lists, as the store keeps them, up to the limit."""
        limit = self.limits.gpus
        state = self._state(node, now)
        if not inventory and state.gpus.issuperset(uuids := list(uuids)):
            return set(uuids), ADMIT  # the usual telemetry: GPUs the node has had all along
        ordered = list(dict.fromkeys(uuids))
        if limit <= 0:
            return set(ordered), ADMIT
        if inventory:
            state.gpus = set(ordered[:limit])
            kept = set(state.gpus)
        else:
            kept = set()
            for uuid in ordered:
                if uuid in state.gpus:
                    kept.add(uuid)
                elif len(state.gpus) < limit:
                    state.gpus.add(uuid)
                    kept.add(uuid)
        if len(kept) < len(ordered):
            return kept, self._refuse(node, state, Budget.GPUS, now)
        return kept, ADMIT

    def _refuse(self, node: str, state: NodeState, budget: Budget, now: float) -> Verdict:
        state.over[budget] = now
        went_over = node not in self.flags
        self.flags[node] = budget.value
        if now - state.refusals_since >= 1.0:  # a new second of refusals, from this one on
            state.refusals_since, state.refusals = now, 0
        state.refusals += 1
        threshold = self.limits.runaway_drops_per_second
        if threshold > 0 and not state.runaway and state.refusals >= threshold:
            state.runaway = True
            return Verdict(budget, went_over, runaway=True)
        return _REFUSED[(budget, went_over)]

    def sweep(self, now: float) -> list[str]:
        """Clear the flags of nodes that have gone RECOVER_AFTER_S without a refusal; returns them."""
        back: list[str] = []
        for node in list(self.flags):
            state = self.nodes[node]
            for budget, at in list(state.over.items()):
                if now - at >= RECOVER_AFTER_S:
                    del state.over[budget]
            if state.over:
                self.flags[node] = max(state.over.items(), key=lambda item: item[1])[0].value
            else:
                del self.flags[node]
                state.runaway = False
                back.append(node)
        return back
