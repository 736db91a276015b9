"""Faults, with nothing lost: a campaign over a real mosquitto, with the edge and the cloud as real
processes.

Each scenario drives the edge's policy with injected load, heat and XIDs (through the simulated
driver's endpoint) while a fault strikes, then checks the guarantee: every event the edge
committed to its outbox reaches the cloud exactly once (same seq, same message id, no gap, no
repeat) and the outbox drains. Each scenario adds a row to the summary table printed at the end
of the run (tests/helpers/fault_report.py). The randomness is seeded: the seed is in every row's
note, and `KGPU_FAULT_SEED=<seed>` repeats a run.

tests/test_sync.py holds the single-shot versions of the link faults; the controller killed
mid-migration and mid-rollout are tests/test_workload_migration.py and tests/test_rollout.py,
which add their rows to the same table.
"""

from __future__ import annotations

import errno
import functools
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud.clock_skew import ClockSkewEstimator
from edge.devices.base import DriverTimeout
from edge.driver.nvml import NvmlDriver
from edge.driver.runner import DriverRunner
from edge.sim import install
from kgpu.lab.broker import Mosquitto, mosquitto_binary
from kgpu.lab.processes import TimedOut, wait_for
from tests.helpers import fault_report
from tests.helpers.cloud_process import CloudProcess
from tests.helpers.edge_process import BUSY_POLICY, EdgeProcess, outbox_depth
from tests.helpers.faketime import faketime_library, fixed_offset_env
from tests.helpers.fault_report import Tally, cloud_record, compare, edge_record

SEED = int(os.environ.get("KGPU_FAULT_SEED") or random.SystemRandom().randrange(2**31))
NOTE = f"seed {SEED}"
EDGE_KILLS = 50
BROKER_RESTARTS = 20

# The edge re-sends unacked events after ack_timeout (its floor is 1 s): short, so that events
# lost with a killed broker come again quickly; and never more than ack_timeout_max later, however
# late the last ack came (a controller reconnecting after the broker restarts acks late).
CAMPAIGN_CONFIG = {**BUSY_POLICY, "ack_timeout": 2, "ack_timeout_max": 10, "status_interval": 2,
                   "lost_probe_interval": 1}

needs_broker = pytest.mark.skipif(mosquitto_binary() is None,
                                  reason="mosquitto not installed (scripts/test.sh installs it)")


# ---- the campaign's broker, controller and edges --------------------------------------------


class Campaign:
    """One broker and one controller shared by every scenario; each scenario its own edge node."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.broker = Mosquitto(workdir / "broker").start()
        self.cloud = CloudProcess(workdir / "cloud", self.broker.url).start()
        self.edges: list[EdgeProcess] = []
        print(f"fault campaign seed {SEED} (KGPU_FAULT_SEED={SEED} repeats it)")

    def edge(self, node: str, *, config: dict[str, Any] | None = None, env: dict[str, str] | None = None,
             db: Path | None = None) -> EdgeProcess:
        """Start `kgpu edge run` for `node`; `db` puts its database elsewhere (a small tmpfs)."""
        process = EdgeProcess(self.workdir / node, node=node, mqtt=self.broker.url,
                              config={**CAMPAIGN_CONFIG, **(config or {})}, env=env)
        if db is not None:
            process.db = db
            process.args[process.args.index("--db") + 1] = str(db)
        self.edges.append(process)
        return process.start()

    def stop_edges(self) -> None:
        """Kill the edges of a finished scenario (idle daemons would only load the machine)."""
        for process in self.edges:
            if process.proc is not None and process.proc.poll() is None:
                process.kill9()
        self.edges.clear()

    def close(self) -> None:
        self.stop_edges()
        if self.cloud.proc is not None and self.cloud.proc.poll() is None:
            self.cloud.kill9()
        self.broker.stop()


@pytest.fixture(scope="module")
def shared_campaign(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Campaign]:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto not installed (scripts/test.sh installs it)")
    made = Campaign(tmp_path_factory.mktemp("faults"))
    yield made
    made.close()


@pytest.fixture
def campaign(shared_campaign: Campaign) -> Iterator[Campaign]:
    """The campaign for one scenario; the scenario's edges are killed when it ends."""
    yield shared_campaign
    shared_campaign.stop_edges()


def make_decide(edge: EdgeProcess, rng: random.Random) -> str:
    """One injected cause for the policy to decide on: a load swing across the power-saving
    threshold, a hot GPU, or an XID (the edge acts on an XID at once, not at the next cycle)."""
    gpu = rng.randrange(2)
    cause = rng.choice(["load", "load", "heat", "xid"])
    if cause == "load":
        edge.inject(gpu, utilization=rng.choice([0, 100]))
    elif cause == "heat":
        edge.inject(gpu, temperature_c=round(rng.uniform(80, 95), 1))
    else:
        edge.inject(gpu, xid=rng.choice([13, 31, 43, 48, 79]))
    return cause


def settle(edge: EdgeProcess, cloud: CloudProcess, timeout: float = 60.0) -> Tally:
    """Wait until the cloud holds what the edge committed and the outbox is empty, seen twice in a
    row 1.5 s apart: a cause injected just before is decided on at the edge's next cycle (1 s), so
    one look could fall before its events exist. Then compare the two records. On a timeout the
    tally shows what is missing (the caller asserts)."""
    previous: list[Any] = [None]

    def snapshot() -> tuple[int, ...] | None:
        if outbox_depth(edge) != 0:
            return None
        seqs = cloud.event_seqs(edge.node)
        return tuple(seqs) if seqs == sorted(edge_record(edge.db)) else None

    def settled_twice() -> bool:
        now = snapshot()
        steady = now is not None and now == previous[0]
        previous[0] = now
        return steady

    try:
        wait_for(settled_twice, timeout=timeout, interval=1.5,
                 what=f"the cloud to hold every event of {edge.node}")
    except AssertionError:
        pass
    events = cloud.get(f"/api/v1/events?node={edge.node}&limit=10000")["events"]
    return compare(edge_record(edge.db), cloud_record(events))


def assert_nothing_lost(tally: Tally, edge: EdgeProcess, scenario: str) -> None:
    assert tally.written > 0, f"{scenario}: the edge committed no event; nothing was tested"
    assert (tally.lost, tally.duplicated) == (0, 0), (
        f"{scenario} ({NOTE}): {tally}; outbox depth {outbox_depth(edge)}\n{edge.log()[-2000:]}")
    assert outbox_depth(edge) == 0, f"{scenario} ({NOTE}): acks did not empty the outbox"


def healthz(edge: EdgeProcess) -> dict[str, Any]:
    """GET /healthz, whatever its status (503 while unhealthy); it must answer (10 s bound)."""
    _, body = edge.request("GET", "/healthz")
    return body


def degraded_at_cloud(cloud: CloudProcess, node: str) -> list[str]:
    """The node's `degraded` list as its last MQTT status told the controller."""
    state = cloud.node_state(node)
    return list(state["degraded"]) if state else []


# ---- 1. the edge killed with kill -9 --------------------------------------------------------


# Fifty restarts of a real daemon: 80-85 s on a 2-core CI machine, several minutes when that
# machine is busy; the suite-wide 120 s would fail it for the machine's load, not for a loss.
@pytest.mark.timeout(480)
@needs_broker
def test_the_edge_killed_with_kill_9_fifty_times_loses_nothing(campaign: Campaign) -> None:
    rng = random.Random(f"{SEED}-kill")
    edge = campaign.edge("kill-nine")
    for _ in range(EDGE_KILLS):
        for _ in range(rng.randint(1, 3)):
            make_decide(edge, rng)
        # anywhere from "not yet decided" through "written, not sent" and "sent, not acked"
        time.sleep(rng.uniform(0.0, 0.5))
        edge.kill9()
        edge.start()
    make_decide(edge, rng)
    tally = settle(edge, campaign.cloud)
    fault_report.record("edge kill -9 at random moments", EDGE_KILLS, tally, NOTE)
    assert_nothing_lost(tally, edge, "edge kill -9")
    assert tally.written >= EDGE_KILLS, "decisions were being written all along"


# ---- 2. the broker restarted, and stopped -----------------------------------------------------


@pytest.mark.timeout(300)  # ~30 s; the settle may wait out both links' 30 s backoff
@needs_broker
def test_the_broker_restarted_twenty_times_then_paused_loses_nothing(campaign: Campaign) -> None:
    rng = random.Random(f"{SEED}-broker")
    broker, cloud = campaign.broker, campaign.cloud
    edge = campaign.edge("broker-restarts")
    kills = 0
    for _ in range(BROKER_RESTARTS):
        for _ in range(rng.randint(1, 2)):
            make_decide(edge, rng)
        time.sleep(rng.uniform(0.1, 0.6))
        if rng.random() < 0.5:
            broker.restart()  # SIGTERM: mosquitto saves its queues
        else:
            broker.kill()  # kill -9: whatever it had not autosaved (1 s) is gone; the edge re-sends
            broker.start()
            kills += 1
    make_decide(edge, rng)
    # Twenty connections closed within seconds of each other grow both links' reconnect backoff
    # to its 30 s ceiling (shared/mqtt.py): the edge and the controller may each wait that long.
    tally = settle(edge, cloud, timeout=120.0)
    fault_report.record("broker restarted", BROKER_RESTARTS, tally, f"{kills} of them kill -9; {NOTE}")
    assert_nothing_lost(tally, edge, "broker restarts")

    # A partition: the broker stops answering but keeps every socket open.
    paused = campaign.edge("broker-paused")
    make_decide(paused, rng)
    pause_s = round(rng.uniform(3.0, 5.0), 1)
    broker.pause()
    try:
        deadline = time.monotonic() + pause_s
        while time.monotonic() < deadline:  # the edge keeps deciding with no one listening
            make_decide(paused, rng)
            time.sleep(0.5)
    finally:
        broker.resume()
    tally = settle(paused, cloud)
    fault_report.record("broker stopped (SIGSTOP)", 1, tally, f"{pause_s} s; {NOTE}")
    assert_nothing_lost(tally, paused, "broker SIGSTOP")


# ---- 4. the edge's clock skewed by hours ----------------------------------------------------


def test_the_clock_skew_estimate_follows_jumps_both_ways_and_ignores_delay() -> None:
    clock = ClockSkewEstimator(window_s=10, jump_s=30, tolerance_s=2)
    t = 1_000_000.0
    assert clock.observe("n", t - 5000, t, telemetry=False) == 0.0  # a retained status: no estimate
    assert clock.observe("n", t - 0.05, t, telemetry=True) == 0.0  # in step, within the tolerance
    assert clock.observe("n", t + 1 - 900, t + 1, telemetry=False) == 0.0  # a re-sent event: delay
    assert clock.observe("n", t + 2 - 10_800, t + 2, telemetry=True) == -10_800  # jumped back 3 h
    assert clock.observe("n", t + 3 + 10_800, t + 3, telemetry=False) == 10_800  # forward: at once
    assert clock.observe("n", t + 4 + 10_790, t + 4, telemetry=True) == 10_800  # 10 s late: ignored
    # a clock drifting back by less than the jump threshold is followed within two windows
    for step in range(1, 25):
        skew = clock.observe("n", t + 4 + step + 10_780, t + 4 + step, telemetry=True)
    assert skew == 10_780


def phase_applied(cloud: CloudProcess, name: str, offset_s: int, bad_gpu: int, load: float) -> dict[str, Any] | None:
    """The node once the cloud shows this phase: the skew measured, GPU `bad_gpu` unhealthy and the
    other healthy (statuses applied), the other's latest sample at `load` (telemetry applied)."""
    node = cloud.node_state(name)
    if node is None or node["clockSkewSeconds"] is None:
        return None
    gpus = {g["index"]: g for g in node["gpus"]}
    fresh = (gpus[bad_gpu]["health"] == "unhealthy" and gpus[1 - bad_gpu]["health"] == "healthy"
             and (gpus[1 - bad_gpu]["sample"] or {}).get("utilization_pct") == load)
    return node if fresh and abs(node["clockSkewSeconds"] - offset_s) < 30 else None


@needs_broker
def test_an_edge_clock_hours_off_either_way_is_ordered_by_seq_and_reported_as_skew(campaign: Campaign) -> None:
    library = faketime_library()
    if library is None:
        pytest.skip("libfaketime not installed (Debian package faketime; scripts/test.sh installs it)")
    cloud = campaign.cloud
    edge = campaign.edge("skewed")  # in step first
    wait_for(lambda: (n := cloud.node_state("skewed")) and n["clockSkewSeconds"] == 0.0 and n,
             what="the in-step node measured")
    # Each phase restarts the edge with its clock moved: back 3 h, forward 6 h, back 3 h again.
    # A fresh daemon starts with healthy GPUs; the phase then marks one GPU unhealthy (XID 48):
    # the cloud must take both statuses although their ts went back by hours.
    for offset_s, bad_gpu, load in ((-10_800, 0, 11.0), (10_800, 1, 22.0), (0, 0, 33.0)):
        edge.kill9()
        edge.env = {**edge.env, **fixed_offset_env(library, offset_s)}  # asyncio keeps the true monotonic clock
        edge.start()
        sampled = wait_for(lambda: edge.gpu(0)["sample"], what="a first sample")
        assert abs(sampled["ts"] - time.time() - offset_s) < 60, "the daemon runs on the moved clock"
        # A remediation ladder the kill -9 interrupted resumes at start and resets its GPU, which
        # clears what is injected (the XID, the load): the phase starts once both are in service.
        wait_for(lambda: all(edge.gpu(i)["remediation"] is None for i in (0, 1)), timeout=60,
                 what="the ladders resumed from the last phase to put both GPUs back in service")
        edge.inject(bad_gpu, xid=48)
        edge.inject(1 - bad_gpu, utilization=load)
        try:
            node = wait_for(functools.partial(phase_applied, cloud, "skewed", offset_s, bad_gpu, load), timeout=30,
                            what=f"statuses and samples of an edge {offset_s:+d} s off applied")
        except TimedOut as exc:  # say what the cloud held instead
            seen = cloud.node_state("skewed") or {}
            gpus = [(g["index"], g["health"], (g["sample"] or {}).get("utilization_pct"), (g["sample"] or {}).get("ts"))
                    for g in seen.get("gpus", [])]
            skew_lines = [line for line in cloud.log_path.read_text(errors="replace").splitlines()[-4000:]
                          if "skewed" in line and ("skew" in line or "late" in line or "older" in line)][-10:]
            raise AssertionError(f"{exc}; the cloud held skew {seen.get('clockSkewSeconds')}, status_ts "
                                 f"{seen.get('status_ts')} (now {time.time():.1f}), GPUs (index, health, util, "
                                 f"sample ts) {gpus}; its log: {skew_lines}") from exc
        assert node["online"] is True and time.time() - node["last_seen"] < 15, "not taken for offline or stale"
        assert abs(node["status_ts"] - time.time()) < 60, "status time kept on the cloud's clock"
        assert abs(cloud.metric("kgpu_node_clock_skew_seconds", node="skewed") - offset_s) < 30
        lag = cloud.metric("kgpu_node_lag_seconds", node="skewed")
        assert abs(lag) < 30, f"the clock skew reported as lag: {lag} s"
    tally = settle(edge, cloud)
    fault_report.record("edge clock -3 h, +3 h, back", 3, tally, NOTE)
    assert_nothing_lost(tally, edge, "clock skew")
    events = cloud.get("/api/v1/events?node=skewed&limit=10000")["events"]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs, reverse=True), "newest first by seq"
    stamps = [e["ts"] for e in events]
    assert stamps != sorted(stamps, reverse=True), "their ts went back and forth by hours"


# ---- 5. the edge's disk full, or its database unwritable -------------------------------------


THERMAL_ONLY = {"policy": {"version": 1}}  # default policy: thermal step-down, no power saving


def store_outage(campaign: Campaign, edge: EdgeProcess, scenario: str, break_store: Callable[[], None],
                 mend_store: Callable[[], None], reason: str) -> None:
    """Break the edge's store while it runs; the policy must keep acting (a thermal step-down),
    /healthz and the MQTT status must say degraded, and everything decided meanwhile must reach
    the cloud once the store takes writes again."""
    cloud = campaign.cloud
    edge.inject(1, xid=13)
    wait_for(lambda: edge.decisions(), what="a first decision written")
    limit_before = wait_for(lambda: edge.gpu(0)["sample"], what="a sample")["power_limit_w"]
    break_store()
    try:
        before = edge_record(edge.db)
        edge.inject(1, xid=13)  # an event to write now: the write fails and it is held in memory
        degraded = wait_for(lambda: [d for d in healthz(edge)["degraded"] if "store not writable" in d],
                            timeout=20, what="/healthz degraded")
        assert reason in degraded[0], degraded
        wait_for(lambda: any("store not writable" in d for d in degraded_at_cloud(cloud, edge.node)),
                 what="degraded in the MQTT status")
        edge.inject(0, temperature_c=88.0)  # over maxTempC 83: step the power limit down
        wait_for(lambda: edge.gpu(0)["sample"]["power_limit_w"] < limit_before, timeout=20,
                 what="the thermal step-down enforced while the store is down")
        for xid in (31, 43, 13):
            edge.inject(1, xid=xid)
        assert not edge.decisions(rule="thermal_step_down"), "the decision is held in memory, not written"
        assert edge_record(edge.db) == before, "nothing reached the broken store"
    finally:
        mend_store()
    wait_for(lambda: not healthz(edge)["degraded"], timeout=20, what="/healthz no longer degraded")
    wait_for(lambda: not degraded_at_cloud(cloud, edge.node), what="the status no longer degraded")
    tally = settle(edge, cloud)
    decided = [d["rule"] for d in cloud.get(f"/api/v1/decisions?node={edge.node}&limit=1000")["decisions"]]
    fault_report.record(scenario, 1, tally, f"{tally.written - len(before)} events held in memory; {NOTE}")
    assert_nothing_lost(tally, edge, scenario)
    assert tally.written > len(before), "events decided during the outage were written afterwards"
    assert "thermal_step_down" in decided


@needs_broker
def test_a_full_disk_keeps_the_policy_enforced_reports_degraded_and_loses_nothing(
        campaign: Campaign, tmp_path: Path) -> None:
    if shutil.which("mount") is None:
        pytest.skip("no mount command to make a small tmpfs (the fsize test covers an unwritable database)")
    disk = tmp_path / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)],
                             check=False, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root with CAP_SYS_ADMIN; the fsize test covers "
                    f"an unwritable database): {mounted.stderr.strip()}")
    try:
        edge = campaign.edge("disk-full", config=THERMAL_ONLY, db=disk / "edge.db")
        filler = disk / "filler"

        def fill() -> None:
            with open(filler, "wb", buffering=0) as out:
                try:
                    while out.write(b"\0" * (256 * 1024)):
                        pass
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc

        store_outage(campaign, edge, "edge disk full (tmpfs)", fill, filler.unlink, "database or disk is full")
    finally:
        campaign.stop_edges()  # before the unmount: its database lives there
        subprocess.run(["umount", "-l", str(disk)], check=False, capture_output=True)


@needs_broker
def test_an_unwritable_database_file_size_limit_keeps_the_policy_and_loses_nothing(campaign: Campaign) -> None:
    """RLIMIT_FSIZE set on the running daemon (prlimit): every write past 1 byte into any file
    fails with EFBIG (CPython ignores SIGXFSZ), so SQLite can no longer write its WAL (nor the
    daemon its log, meanwhile)."""
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit (util-linux) not installed")
    edge = campaign.edge("fsize-limit", config=THERMAL_ONLY)
    assert edge.proc is not None
    pid = str(edge.proc.pid)

    def limit(value: str) -> None:
        done = subprocess.run(["prlimit", "--pid", pid, f"--fsize={value}"], check=False, capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"prlimit refused to change the daemon's limit: {done.stderr.strip()}")

    # only the soft limit: raising a hard limit back needs CAP_SYS_RESOURCE, which containers drop
    store_outage(campaign, edge, "edge database unwritable (fsize)", lambda: limit("1:unlimited"),
                 lambda: limit("unlimited:unlimited"), "disk I/O error")


# ---- 6. a lost GPU and a driver that stops answering ------------------------------------------


def test_a_hung_simulated_driver_times_out_then_answers_again() -> None:
    """The simulated driver's `hung` fault, through the real pynvml and the bounded runner."""
    import asyncio

    async def scenario() -> None:
        sim = install(1, "H100")
        runner = DriverRunner(NvmlDriver(), timeout_s=0.3)
        try:
            await runner.call(runner.driver.open)
            assert not runner.not_answering
            sim.inject(0, {"hung": True})
            assert sim.state(0)["driver_answering"] is False
            with pytest.raises(DriverTimeout):
                await runner.call(runner.driver.sample, 0)
            assert runner.timeouts == 1 and runner.not_answering
            sim.inject(0, {"hung": False})
            sample = await runner.call(runner.driver.sample, 0)
            assert sample.index == 0 and not runner.not_answering
        finally:
            await runner.stop()
            sim.uninstall()

    asyncio.run(scenario())


@needs_broker
def test_a_lost_gpu_and_a_hung_driver_do_not_hang_the_daemon(campaign: Campaign) -> None:
    cloud = campaign.cloud
    edge = campaign.edge("hung-driver", config={"nvml_timeout": 0.5})
    edge.inject(1, lost=True)
    wait_for(lambda: edge.gpu(1)["health"]["state"] == "lost", what="GPU 1 lost")
    assert healthz(edge)["status"] == "ok", "a lost GPU is the scheduler's business, not the daemon's"

    hung_at = time.time()
    edge.inject(0, hung=True)  # every NVML call now blocks
    try:
        seen = wait_for(lambda: (h := healthz(edge)) and any("not answering" in d for d in h["degraded"]) and h,
                        timeout=20, what="/healthz degraded: driver not answering")
        assert seen["status"] == "unhealthy" and "driver unreachable" in seen["reasons"]
        wait_for(lambda: any("not answering" in d for d in degraded_at_cloud(cloud, edge.node)),
                 what="degraded in the MQTT status")
        for _ in range(3):  # the API keeps answering while the driver hangs: each within its bound
            assert healthz(edge)["node"] == "hung-driver"
            assert edge.get("/api/v1/policy")["policy"] is not None
            time.sleep(0.3)
        assert CloudProcess.metric(edge, "kgpu_driver_call_timeouts_total") >= 1  # type: ignore[arg-type]
    finally:
        edge.inject(0, hung=False)
    edge.inject(1, lost=False)
    wait_for(lambda: not healthz(edge)["degraded"] and healthz(edge)["status"] == "ok", timeout=20,
             what="the daemon recovered once the driver answered")
    wait_for(lambda: all(g["health"]["state"] != "lost" and g["sample"]["ts"] > hung_at
                         for g in edge.get("/api/v1/gpus")["gpus"]), timeout=20, what="both GPUs sampled again")
    wait_for(lambda: not degraded_at_cloud(cloud, edge.node), what="the status no longer degraded")
    timeouts = CloudProcess.metric(edge, "kgpu_driver_call_timeouts_total")  # type: ignore[arg-type]
    tally = settle(edge, cloud)
    fault_report.record("GPU lost, then driver hung", 2, tally, f"{timeouts:.0f} NVML calls timed out; {NOTE}")
    assert_nothing_lost(tally, edge, "lost GPU and hung driver")
