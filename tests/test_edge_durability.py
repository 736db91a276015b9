"""kill -9 of the whole daemon: every decision it committed is there after a restart, and the
outbox sequence goes on without a gap or a repeat."""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path

import pytest

from kgpu.lab.processes import wait_for
from tests.helpers.edge_process import EdgeProcess

pytestmark = pytest.mark.slow

FLAPPING = {"policy": {"version": 1, "powerSaving": {"enabled": True, "utilizationThreshold": 50,
                                                    "capPercent": 60, "sustainPeriod": 0}}}


def outbox_seqs(db: Path) -> list[int]:
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT seq FROM outbox ORDER BY seq")]


def test_kill_9_loses_no_committed_decision(tmp_path: Path) -> None:
    edge = EdgeProcess(tmp_path, gpus=4, config=FLAPPING)
    seen_seqs: set[int] = set()
    for _round in range(3):
        edge.start()
        # utilisation jumping across the threshold makes a decision nearly every cycle
        for _step in range(4):
            for gpu in range(4):
                edge.inject(gpu, utilization=random.choice([0, 100]), xid=random.choice([31, 48, 79]))
            time.sleep(random.uniform(0.2, 0.6))
        committed = {d["seq"] for d in edge.decisions(limit=10000)}
        assert committed, edge.log()
        edge.kill9()
        after = outbox_seqs(edge.db)
        assert committed <= set(after), "every decision the API showed is still in the outbox"
        assert after == list(range(1, len(after) + 1)), "consecutive seqs, no gap, no repeat"
        assert seen_seqs <= set(after)
        seen_seqs = set(after)
    edge.start()
    edge.inject(0, xid=48)
    wait_for(lambda: max(outbox_seqs(edge.db)) > max(seen_seqs), what="new events after the restarts")
    final = outbox_seqs(edge.db)
    assert final == list(range(1, len(final) + 1))
    edge.stop()
