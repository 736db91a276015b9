"""kill -9 while the store is writing: nothing the child saw committed may be lost, and seqs stay
consecutive (no gap, no duplicate) across crashes and restarts."""

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge.store import EdgeStore
from shared.protocol import ActionOutcome, DecisionBody, Kind

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[1]
WRITER = REPO / "tests" / "helpers" / "store_writer.py"
NODE = "durable-node"
ROUNDS = 5
FIRST_LINE_TIMEOUT_S = 10.0
EXIT_TIMEOUT_S = 5.0


def _reader(stream, lines: "queue.Queue[str | None]") -> None:
    """Pump the child's stdout into a queue (so every wait in the test has a bound)."""
    for line in iter(stream.readline, ""):
        lines.put(line)
    lines.put(None)


def _run_and_kill(db: Path, rng: random.Random) -> list[int]:
    """Start a writer, SIGKILL it at a random moment while it writes, return the seqs it
    reported as committed (complete lines only)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen(
        [sys.executable, str(WRITER), str(db), NODE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    pump = threading.Thread(target=_reader, args=(child.stdout, lines), daemon=True)
    pump.start()
    try:
        try:
            first = lines.get(timeout=FIRST_LINE_TIMEOUT_S)  # it is writing now
        except queue.Empty:
            pytest.fail("the writer printed nothing in time: " + _stderr(child))
        if first is None:
            pytest.fail("the writer died before writing: " + _stderr(child))
        time.sleep(rng.uniform(0.05, 0.5))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=EXIT_TIMEOUT_S)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=EXIT_TIMEOUT_S)
    assert child.returncode == -signal.SIGKILL, _stderr(child)
    pump.join(timeout=EXIT_TIMEOUT_S)
    assert not pump.is_alive()

    reported = [first]
    while (line := lines.get_nowait()) is not None:
        reported.append(line)
    # a line cut by the kill (no newline) was never a complete report
    return [int(line) for line in reported if line.endswith("\n")]


def _stderr(child: subprocess.Popen) -> str:
    if child.poll() is None:
        return "(still running)"
    return (child.stderr.read() if child.stderr else "")[-2000:]


def test_kill_9_while_writing_loses_nothing_committed(tmp_path: Path) -> None:
    db = tmp_path / "edge.db"
    rng = random.Random()
    started = time.monotonic()
    everything_reported: list[int] = []
    last = 0

    for round_no in range(ROUNDS):
        reported = _run_and_kill(db, rng)
        assert reported, f"round {round_no}: the writer reported no commit"
        assert reported == list(range(last + 1, last + 1 + len(reported))), (
            f"round {round_no}: the writer did not continue after seq {last}"
        )
        everything_reported += reported

        store = EdgeStore(db, NODE)
        try:
            outbox = [e.seq for e in store.outbox_pending(limit=10**7)]
            decisions = sorted(d["seq"] for d in store.decisions(limit=10**7))
            high = store.last_seq()
            # consecutive from 1, no gap, no duplicate (nothing was acked)
            assert outbox == list(range(1, high + 1))
            assert decisions == outbox
            assert store.outbox_depth() == high
            # everything the child reported committed is there
            assert set(everything_reported) <= set(outbox)
            assert high >= everything_reported[-1]
            # the decision log and the outbox hold the same envelopes
            ids = {e.seq: e.id for e in store.outbox_pending(limit=10**7)}
            assert all(ids[d["seq"]] == d["id"] for d in store.decisions(limit=10**7))
            # and the next record continues right after the highest
            (env,) = store.record([(Kind.DECISION, _parent_decision(round_no))])
            assert env.seq == high + 1
            last = env.seq
        finally:
            store.close()

    assert time.monotonic() - started < 30


def _parent_decision(round_no: int) -> DecisionBody:
    return DecisionBody(
        rule="restart",
        action="record",
        outcome=ActionOutcome.RECORDED,
        reason=f"parent after kill {round_no}",
    )
