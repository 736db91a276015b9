"""The ingest's budgets (cloud/budget.py) as the controller applies them: each node's messages,
bytes, events and GPUs weighed before they are queued, its excess dropped, counted and logged once
an episode, on the MQTT network threads (`accept`) and on the loop alike, so that a flood's excess
never reaches the event loop. A mixin of `Ingestor` (cloud/ingest.py), which builds its state
(`_init_budgets`).

`budgets`, `dropped`, `_episode_drops` and `_topics` are touched by the network threads and by the
loop: always under `_budget_lock` (the ingest also keeps its clock estimate under it).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable

import msgspec

from cloud.budget import Budget, BudgetLimits, NodeBudgets, Verdict
from cloud.store import Incoming
from cloud.telemetry_peek import PeekedBody
from shared.logs import get_logger
from shared.mqtt import Received
from shared.protocol import StatusBody, TelemetryBodyStruct
from shared.topics import BadTopic, parse_topic

log = get_logger("cloud.ingest")  # its lines are the ingest's, as they always were

TOPIC_CACHE_MAX = 100_000  # three topics per node
SWEEP_EVERY_S = 1.0  # budget flags of nodes back within budget are cleared at most this often


class IngestBudgets:
    """Budget state and checks of the ingest (see the module docstring)."""

    def _init_budgets(self, budget: BudgetLimits | None, on_runaway: Callable[[str], None] | None) -> None:
        self.dropped: Counter[str] = Counter()  # by budget: messages (GPU samples/summaries for "gpus")
        self.budgets = NodeBudgets(budget if budget is not None else BudgetLimits())
        self._episode_drops: Counter[str] = Counter()  # node -> dropped since it went over
        # A node refused faster than the budget's runaway rate (cloud/budget.py): called once per
        # episode, on whichever thread refused it, under `_budget_lock`: it must only hand over.
        self.on_runaway = on_runaway
        self._budget_lock = threading.Lock()
        self._swept_at = 0.0
        self._topics: dict[str, tuple[str, str] | None] = {}  # topic -> (node, kind), see _sender

    @property
    def budget_flags(self) -> dict[str, str]:
        """node -> the budget it is over right now ("messages_per_second", "bytes_per_second",
        "events_per_minute", "gpus"); absent when within budget."""
        with self._budget_lock:
            return dict(self.budgets.flags)  # a copy: safe to read from another thread

    def accept(self, message: Received) -> bool:
        """The budget check alone: False when the message's node is over its budget (the message
        is dropped and counted). Thread-safe and cheap (a cached topic split, token buckets): the
        MQTT link calls it on its network thread (`AsyncMqtt(accept=...)`); such messages then go
        through `admit(..., budgeted=True)`."""
        with self._budget_lock:
            return self._within_budget(message, time.monotonic())

    def _within_budget(self, message: Received, now: float) -> bool:
        sender = self._sender(message.topic)
        if sender is None:
            return True  # not an edge topic: validate() rejects it
        node, kind = sender
        verdict = self.budgets.admit(node, len(message.payload), event=kind == "events", status=kind == "status",
                                     now=now)
        if verdict.refused is None:
            return True
        self._drop(node, verdict, 1)
        return False

    def _release_topic(self, topic: str) -> None:
        """A message admitted by the budget went no further: out of its node's backlog."""
        sender = self._sender(topic)
        if sender is not None:
            self.release([sender[0]])

    def release(self, nodes: Iterable[str]) -> None:
        """These messages (one node name each) were written or refused: out of their nodes' backlogs."""
        counts = Counter(nodes)
        with self._budget_lock:
            for node, count in counts.items():
                self.budgets.release(node, count)

    def _sender(self, topic: str) -> tuple[str, str] | None:
        """(node, kind) of an edge topic, None for anything else (validate() rejects it). Cached:
        a flood's excess is dropped for the cost of a dict lookup and a token bucket."""
        try:
            return self._topics[topic]
        except KeyError:
            pass
        try:
            parts = parse_topic(topic)
            sender = (parts.node, parts.kind) if parts.side == "edge" else None
        except BadTopic:
            sender = None
        if len(self._topics) >= TOPIC_CACHE_MAX:
            self._topics.clear()
        self._topics[topic] = sender
        return sender

    def _within_seq_budget(self, node: str, seq: int, now: float) -> bool:
        """An event no further past the node's last ack than an edge may send (cloud/budget.py
        `admit_seq`); False: dropped, counted, out of the node's backlog."""
        with self._budget_lock:
            verdict = self.budgets.admit_seq(node, seq, now)
            if verdict.refused is None:
                return True
            self.budgets.release(node)  # admitted by `accept`: out of its backlog again
            self._drop(node, verdict, 1)
            return False

    def _within_gpu_budget(self, incoming: Incoming, now: float) -> Incoming | None:
        """Leave out the samples (telemetry) or summaries (status) of GPUs beyond the node's
        budget; its known GPUs are kept. None when nothing is left of a telemetry message."""
        body, node = incoming.body, incoming.envelope.node
        if isinstance(body, TelemetryBodyStruct | PeekedBody):  # validate() gives telemetry as a Struct
            with self._budget_lock:
                kept, verdict = self.budgets.admit_gpus(node, (s.uuid for s in body.samples), now)
                if verdict.refused is None:
                    return incoming
                samples = [s for s in body.samples if s.uuid in kept]
                self._drop(node, verdict, len(body.samples) - len(samples))
            if not samples:
                return None
            return dataclasses.replace(incoming, body=msgspec.structs.replace(body, samples=samples))
        if isinstance(body, StatusBody) and body.gpus:
            with self._budget_lock:
                kept, verdict = self.budgets.admit_gpus(node, (g.uuid for g in body.gpus), now, inventory=True)
                if verdict.refused is None:
                    return incoming
                gpus = [g for g in body.gpus if g.uuid in kept]
                self._drop(node, verdict, len(body.gpus) - len(gpus))
            return dataclasses.replace(incoming, body=body.model_copy(update={"gpus": gpus}))
        return incoming

    def _drop(self, node: str, verdict: Verdict, count: int) -> None:
        """Count (and log once per episode) what a node lost to its budget; under `_budget_lock`."""
        assert verdict.refused is not None
        self.dropped[verdict.refused.value] += count
        self._episode_drops[node] += count
        if verdict.went_over:
            limits = self.budgets.limits
            log.warning(
                "node over its ingest budget (%s): its excess is dropped until it is back within it "
                "(unacked events are sent again by the edge)%s", verdict.refused.value,
                _HINTS.get(verdict.refused, ""),
                extra={"node": node, "budget": verdict.refused.value,
                       "limit": _limit_of(limits, verdict.refused)})
        if verdict.runaway and self.on_runaway is not None:
            self.on_runaway(node)

    def _sweep(self, now: float) -> None:
        self._swept_at = now
        if not self.budgets.flags:
            return
        with self._budget_lock:
            back = [(node, self._episode_drops.pop(node, 0)) for node in self.budgets.sweep(now)]
        for node, dropped in back:
            log.warning("node back within its ingest budget", extra={"node": node, "dropped": dropped})

# What an operator may need to know when an honest node goes over this budget.
_HINTS = {Budget.AHEAD: "; an edge whose outbox_window is over half of node_max_events_ahead is refused so: "
                        "raise node_max_events_ahead to twice its window"}


def _limit_of(limits: BudgetLimits, budget: Budget) -> float:
    return {Budget.MESSAGES: limits.messages_per_second, Budget.BYTES: limits.bytes_per_second,
            Budget.EVENTS: limits.events_per_minute, Budget.GPUS: float(limits.gpus),
            Budget.BACKLOG: float(limits.backlog), Budget.RUNAWAY: limits.runaway_drops_per_second,
            Budget.AHEAD: float(limits.events_ahead)}[budget]
