"""bench/replicas.py end to end at a tiny size: replicas in a `$share` group split one backlog.

No timing is asserted (the figures come from the bench itself): only that every step counts
every message exactly once and writes it, that two replicas on PostgreSQL each take a share of it (the broker
really load-balances, nothing is delivered twice), and that the report and the table rows come out.
"""

from __future__ import annotations

import math
import os

import pytest

from bench import replicas
from kgpu.lab.broker import mosquitto_binary
from tests.helpers.postgres import find_server_binaries

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed (scripts/test.sh installs it)"),
    pytest.mark.skipif(find_server_binaries() is None, reason="PostgreSQL server binaries not installed"),
]


def test_two_replicas_on_a_shared_subscription_split_the_backlog_and_count_each_message_once() -> None:
    result = replicas.measure(nodes=6, per_node=3, gpus=2, counts=(1, 2), sqlite=False, pin_mode="on")

    assert result.messages == 18
    assert [(s.db, s.replicas) for s in result.steps] == [("postgresql", 1), ("postgresql", 2)]
    for step in result.steps:
        assert step.lost == 0
        assert step.drain.received == result.messages  # exactly once: a duplicate would push it above
        assert sum(d.received for d in step.share) == result.messages
        assert step.drain.seconds > 0 and step.broker_in_s >= 0
    two = result.steps[-1]
    assert all(d.received > 0 for d in two.share), [d.received for d in two.share]  # the group shares the load
    assert not math.isnan(two.db_cpu_s) and two.batches and min(two.batches) >= 1  # written, not just queued

    report = replicas.describe(result)
    assert "2 replicas on PostgreSQL" in report and "over 1 replica" in report and "mosquitto fills" in report
    rows = replicas.table_rows(result, "python -m bench.replicas --nodes 6 --per-node 3")
    pinned = len(os.sched_getaffinity(0)) >= 2  # --pin on: a core of its own for each replica
    if pinned:
        assert len(set(two.cores)) == 2 and None not in two.cores, result.pinning
    figure = f"2 replicas on PostgreSQL ({'pinned' if pinned else 'unpinned'}) draining it"
    assert figure in {r.figure for r in rows}
    assert all(r.value > 0 for r in rows if r.unit == "msg/s")
