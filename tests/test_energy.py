"""Energy attribution: splits, idle learning, counter trouble, and conservation as a property."""

import json
import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.energy import EnergyAccountant, KeplerPodKey, PodKey, ProcessKey
from edge.pods import PodRef
from shared.gpu import GpuSample, ProcessSample

GPU0, GPU1 = "GPU-00000000-0000-0000-0000-000000000000", "GPU-11111111-1111-1111-1111-111111111111"

TRAIN = PodRef("ml", "train-0", "trainer", "uid-a", "c" * 64)
TRAIN_SIDECAR = PodRef("ml", "train-0", "sidecar", "uid-a", "d" * 64)
INFER = PodRef("serving", "infer-1", "server", "uid-b", "e" * 64)
PODS: dict[int, PodRef] = {1: TRAIN, 2: TRAIN, 3: INFER, 4: TRAIN_SIDECAR}  # 5, 6: host processes


def resolve(pid: int) -> PodRef | None:
    return PODS.get(pid)


def key(ref: PodRef) -> PodKey:
    return PodKey(ref.namespace, ref.pod, ref.container)


def sample(
    ts: float,
    energy_mj: int | None,
    *procs: tuple[int, float | None],
    power_w: float | None = None,
    uuid: str = GPU0,
    lost: bool = False,
    util: float | None = None,
) -> GpuSample:
    return GpuSample(
        index=0 if uuid == GPU0 else 1,
        uuid=uuid,
        ts=ts,
        lost=lost,
        energy_mj=energy_mj,
        power_w=power_w,
        utilization_pct=util,
        processes=[ProcessSample(pid=pid, sm_util_pct=util) for pid, util in procs],
    )


def total(acc: EnergyAccountant) -> float:
    return acc.idle_joules + acc.unattributed_joules + math.fsum(acc.pod_joules.values())


def test_first_sample_only_sets_baseline() -> None:
    acc = EnergyAccountant()
    acc.update([sample(0.0, 5_000_000, (1, 100.0))], resolve)
    assert acc.pod_joules == {} and acc.idle_joules == 0 and acc.unattributed_joules == 0


def test_split_by_sm_utilisation() -> None:
    acc = EnergyAccountant()
    acc.update([sample(0.0, 1_000_000, (1, 75.0), (3, 25.0))], resolve)
    acc.update([sample(1.0, 1_100_000, (1, 75.0), (3, 25.0))], resolve)  # 100 J, no idle known
    assert acc.pod_joules[key(TRAIN)] == pytest.approx(75.0)
    assert acc.pod_joules[key(INFER)] == pytest.approx(25.0)
    assert acc.idle_joules == 0.0
    assert acc.gpu_joules == {GPU0: pytest.approx(100.0)}


def test_idle_learned_then_taken_off_the_top() -> None:
    acc = EnergyAccountant()
    acc.update([sample(0.0, 0, power_w=60.0)], resolve)  # empty GPU: idle is at most 60 W
    acc.update([sample(10.0, 500_000, power_w=50.0)], resolve)  # lower: 50 W; all 500 J idle
    assert acc.idle_power_w == {GPU0: 50.0}
    assert acc.idle_joules == pytest.approx(500.0)
    assert acc.pod_joules == {}

    # 10 s at 250 W with work on it: 500 J idle (50 W x 10 s), 2000 J active split 75/25.
    acc.update([sample(20.0, 3_000_000, (1, 60.0), (3, 20.0), power_w=250.0)], resolve)
    assert acc.idle_power_w == {GPU0: 50.0}  # a busy sample teaches nothing about idle
    assert acc.idle_joules == pytest.approx(1000.0)
    assert acc.pod_joules[key(TRAIN)] == pytest.approx(1500.0)
    assert acc.pod_joules[key(INFER)] == pytest.approx(500.0)
    assert acc.pod_power_w[key(TRAIN)] == pytest.approx(150.0)


def test_idle_share_capped_at_the_delta() -> None:
    acc = EnergyAccountant()
    acc.update([sample(0.0, 0, power_w=80.0)], resolve)
    acc.update([sample(1.0, 50_000, (1, 10.0))], resolve)  # 50 J < 80 W x 1 s
    assert acc.idle_joules == pytest.approx(50.0)
    assert acc.pod_joules[key(TRAIN)] == 0.0


def test_no_idle_known_means_no_idle_share() -> None:
    acc = EnergyAccountant()
    acc.update([sample(0.0, 0, (1, 50.0), power_w=300.0)], resolve)
    acc.update([sample(1.0, 300_000, (1, 50.0), power_w=300.0)], resolve)
    assert acc.idle_power_w == {}
    assert acc.idle_joules == 0.0
    assert acc.pod_joules[key(TRAIN)] == pytest.approx(300.0)


@pytest.mark.parametrize("util", [None, 0.0])
def test_even_split_without_utilisation(util: float | None) -> None:
    acc = EnergyAccountant()
    procs = ((1, util), (3, util), (5, util))
    acc.update([sample(0.0, 0, *procs)], resolve)
    acc.update([sample(1.0, 90_000, *procs)], resolve)
    assert acc.pod_joules[key(TRAIN)] == pytest.approx(30.0)
    assert acc.pod_joules[key(INFER)] == pytest.approx(30.0)
    assert acc.unattributed_joules == pytest.approx(30.0)


def test_single_process_gets_all_active_energy() -> None:
    acc = EnergyAccountant()
    acc.update([sample(0.0, 0, (3, None))], resolve)
    acc.update([sample(2.0, 400_000, (3, None))], resolve)
    assert acc.pod_joules == {key(INFER): pytest.approx(400.0)}


def test_processes_of_one_container_sum_and_containers_stay_apart() -> None:
    acc = EnergyAccountant()
    procs = ((1, 30.0), (2, 30.0), (4, 40.0))
    acc.update([sample(0.0, 0, *procs)], resolve)
    acc.update([sample(1.0, 100_000, *procs)], resolve)
    assert acc.pod_joules == {
        key(TRAIN): pytest.approx(60.0),
        key(TRAIN_SIDECAR): pytest.approx(40.0),
    }


def test_host_processes_are_unattributed() -> None:
    acc = EnergyAccountant()
    acc.update([sample(0.0, 0, (5, 50.0), (1, 50.0))], resolve)
    acc.update([sample(1.0, 100_000, (5, 50.0), (1, 50.0))], resolve)
    assert acc.unattributed_joules == pytest.approx(50.0)
    assert acc.pod_joules == {key(TRAIN): pytest.approx(50.0)}


def test_same_pod_on_two_gpus_sums_and_resolves_once() -> None:
    calls: list[int] = []

    def counting(pid: int) -> PodRef | None:
        calls.append(pid)
        return resolve(pid)

    acc = EnergyAccountant()
    acc.update([sample(0.0, 0, (1, 90.0)), sample(0.0, 0, (1, 90.0), uuid=GPU1)], counting)
    calls.clear()
    acc.update(
        [sample(1.0, 100_000, (1, 90.0)), sample(1.0, 200_000, (1, 90.0), uuid=GPU1)], counting
    )
    assert acc.pod_joules == {key(TRAIN): pytest.approx(300.0)}
    assert acc.pod_power_w == {key(TRAIN): pytest.approx(300.0)}
    assert calls == [1]


def test_no_processes_all_idle() -> None:
    acc = EnergyAccountant()
    acc.update([sample(0.0, 0)], resolve)
    acc.update([sample(5.0, 250_000)], resolve)
    assert acc.idle_joules == pytest.approx(250.0)
    assert acc.idle_power_w == {}  # no power reading: nothing learned, energy still booked


# --- idle as Kepler means it, per GPU ------------------------------------------------------------


def test_busy_gpu_without_processes_is_active_not_idle() -> None:
    """The issue's case: a board that idles at 140 W, kept busy at 229.8 W by work NVML lists no
    process for. Idle is 140 W of it; the rest is active, attributed to no pod."""
    acc = EnergyAccountant()
    acc.update([sample(0.0, 0, power_w=140.0, util=0.0)], resolve)
    acc.update([sample(10.0, 2_298_000, power_w=229.8, util=100.0)], resolve)
    gpu = acc.gpus[GPU0]
    assert acc.idle_power_w == {GPU0: 140.0}  # the busy reading taught nothing
    assert gpu.idle_joules == pytest.approx(1400.0) and acc.idle_joules == pytest.approx(1400.0)
    assert gpu.unattributed_joules == pytest.approx(898.0) and gpu.attributed_joules == 0.0
    assert gpu.active_joules == pytest.approx(898.0)
    assert (gpu.power_w, gpu.idle_power_w, gpu.active_power_w) == (229.8, 140.0, pytest.approx(89.8))
    assert acc.pod_joules == {}


def test_busy_without_processes_teaches_no_idle_and_is_all_active() -> None:
    acc = EnergyAccountant()
    acc.update([sample(0.0, 0, power_w=229.8, util=90.0)], resolve)
    acc.update([sample(1.0, 229_800, power_w=229.8, util=90.0)], resolve)
    assert acc.idle_power_w == {}  # never seen idle: idle power 0, as Kepler's fallback
    assert acc.idle_joules == 0.0 and acc.unattributed_joules == pytest.approx(229.8)
    assert acc.gpus[GPU0].idle_power_w == 0.0


def test_idle_is_kept_per_gpu() -> None:
    acc = EnergyAccountant()
    acc.update([sample(0.0, 0, power_w=70.0), sample(0.0, 0, power_w=60.0, uuid=GPU1)], resolve)
    acc.update([sample(1.0, 70_000, power_w=70.0),
                sample(1.0, 300_000, (1, 50.0), power_w=300.0, uuid=GPU1)], resolve)
    g0, g1 = acc.gpus[GPU0], acc.gpus[GPU1]
    assert (g0.idle_joules, g0.active_joules) == (pytest.approx(70.0), 0.0)
    assert (g1.idle_joules, g1.active_joules) == (pytest.approx(60.0), pytest.approx(240.0))
    assert g1.attributed_joules == pytest.approx(240.0)
    assert (g0.idle_power_w, g1.idle_power_w) == (70.0, 60.0)  # idling: all of it; busy: the learned
    assert (g0.index, g1.index) == (0, 1)
    assert acc.idle_joules == pytest.approx(130.0)


def test_idle_power_in_force() -> None:
    acc = EnergyAccountant()
    acc.update([sample(0.0, 0, power_w=50.0)], resolve)
    assert acc.idle_power_for(sample(1.0, 0, power_w=55.0)) == 55.0  # idling: all it draws
    assert acc.idle_power_for(sample(1.0, 0, (1, 9.0), power_w=300.0)) == 50.0
    assert acc.idle_power_for(sample(1.0, 0, power_w=40.0, util=5.0)) == 40.0  # never above the reading
    assert acc.idle_power_for(sample(1.0, 0, power_w=None)) is None
    assert acc.idle_power_for(sample(1.0, 0, power_w=60.0, lost=True)) is None


def test_the_split_travels_with_the_sample() -> None:
    """What the telemetry carries to the fleet exporter: the idle power in force at the sample
    and the GPU's cumulative idle and active joules; a GPU not yet accounted is left as it is."""
    acc = EnergyAccountant()
    assert acc.with_split(sample(0.0, 0, power_w=50.0)).idle_joules is None
    acc.update([sample(0.0, 0, power_w=50.0)], resolve)
    acc.update([sample(1.0, 50_000, power_w=50.0)], resolve)
    busy = sample(2.0, 350_000, (1, 90.0), power_w=300.0)
    acc.update([busy], resolve)
    split = acc.with_split(busy)
    assert (split.idle_power_w, split.idle_joules, split.active_joules) == (50.0, pytest.approx(100.0),
                                                                          pytest.approx(250.0))
    assert split.idle_joules + split.active_joules == pytest.approx(acc.gpus[GPU0].joules)  # type: ignore[operator]
    assert split.model_copy(update={"idle_power_w": None, "idle_joules": None, "active_joules": None}) == busy
    assert busy.idle_joules is None  # a copy: the sample itself is unchanged
    lost = acc.with_split(sample(3.0, None, lost=True))
    assert lost.idle_power_w is None and lost.idle_joules == split.idle_joules  # no reading: counters only
    assert GpuSample.model_validate_json(split.model_dump_json()) == split  # crosses the wire as it is


def test_process_container_and_pod_levels() -> None:
    acc = EnergyAccountant()
    procs = ((1, 30.0), (2, 30.0), (4, 20.0), (5, 20.0))
    acc.update([sample(0.0, 0, *procs)], resolve)
    acc.update([sample(2.0, 200_000, *procs)], resolve)  # 200 J over 2 s, no idle known
    assert acc.processes.joules == {
        ProcessKey(1, TRAIN): pytest.approx(60.0), ProcessKey(2, TRAIN): pytest.approx(60.0),
        ProcessKey(4, TRAIN_SIDECAR): pytest.approx(40.0), ProcessKey(5, None): pytest.approx(40.0),
    }
    assert acc.containers.joules == {TRAIN: pytest.approx(120.0), TRAIN_SIDECAR: pytest.approx(40.0)}
    assert acc.kepler_pods.joules == {KeplerPodKey("uid-a", "ml", "train-0"): pytest.approx(160.0)}
    assert acc.kepler_pods.power_w == {KeplerPodKey("uid-a", "ml", "train-0"): pytest.approx(80.0)}
    assert acc.processes.power_w[ProcessKey(5, None)] == pytest.approx(20.0)
    assert acc.gpus[GPU0].unattributed_joules == pytest.approx(40.0)
    acc.update([sample(3.0, 200_000)], resolve)  # idle round: no power for anyone
    assert acc.processes.power_w == {} and acc.pod_power_w == {}
    assert acc.forget_idle_pods(0.0, now=float("inf")) == 2
    assert acc.processes.joules == {} and acc.containers.joules == {} and acc.kepler_pods.joules == {}


def test_counter_reset_rebaselines() -> None:
    acc = EnergyAccountant()
    acc.update([sample(0.0, 9_000_000, (1, None))], resolve)
    acc.update([sample(1.0, 9_100_000, (1, None))], resolve)  # 100 J
    acc.update([sample(2.0, 20_000, (1, None))], resolve)  # driver reload: not counted
    assert acc.pod_joules[key(TRAIN)] == pytest.approx(100.0)
    acc.update([sample(3.0, 70_000, (1, None))], resolve)  # counts from the new baseline
    assert acc.pod_joules[key(TRAIN)] == pytest.approx(150.0)


def test_lost_sample_skipped() -> None:
    acc = EnergyAccountant()
    acc.update([sample(0.0, 0, (1, None))], resolve)
    acc.update([sample(1.0, None, lost=True)], resolve)
    assert acc.pod_joules == {} and acc.idle_joules == 0.0
    # The baseline survived the loss: the energy of the gap still counts once.
    acc.update([sample(2.0, 200_000, (1, None))], resolve)
    assert acc.pod_joules == {key(TRAIN): pytest.approx(200.0)}


def test_lost_sample_teaches_no_idle() -> None:
    acc = EnergyAccountant()
    acc.update([sample(0.0, None, power_w=5.0, lost=True)], resolve)
    assert acc.idle_power_w == {}


def test_missing_counter_falls_back_to_power() -> None:
    acc = EnergyAccountant()
    acc.update([sample(0.0, None, (3, None), power_w=200.0)], resolve)
    acc.update([sample(2.0, None, (3, None), power_w=150.0)], resolve)  # 150 W x 2 s
    assert acc.pod_joules == {key(INFER): pytest.approx(300.0)}


def test_missing_counter_and_power_skipped() -> None:
    acc = EnergyAccountant()
    acc.update([sample(0.0, None, (3, None))], resolve)
    acc.update([sample(1.0, None, (3, None))], resolve)
    assert total(acc) == 0.0 and acc.gpu_joules == {}


def test_power_fallback_not_stretched_over_a_long_gap() -> None:
    acc = EnergyAccountant(max_power_interval_s=60.0)
    acc.update([sample(0.0, None, (3, None), power_w=200.0)], resolve)
    acc.update([sample(600.0, None, (3, None), power_w=200.0)], resolve)
    assert total(acc) == 0.0
    acc.update([sample(601.0, None, (3, None), power_w=200.0)], resolve)
    assert total(acc) == pytest.approx(200.0)


def test_out_of_order_sample_skipped() -> None:
    acc = EnergyAccountant()
    acc.update([sample(10.0, 1_000_000, (1, None))], resolve)
    acc.update([sample(10.0, 1_000_000, (1, None))], resolve)  # same tick twice
    acc.update([sample(11.0, 1_100_000, (1, None))], resolve)
    assert acc.pod_joules == {key(TRAIN): pytest.approx(100.0)}


def test_resolver_failure_counts_as_unattributed() -> None:
    def broken(pid: int) -> PodRef | None:
        raise PermissionError("/proc/1/cgroup")

    acc = EnergyAccountant()
    acc.update([sample(0.0, 0, (1, None))], broken)
    acc.update([sample(1.0, 10_000, (1, None))], broken)
    assert acc.unattributed_joules == pytest.approx(10.0)


def test_snapshot_is_json_ready() -> None:
    acc = EnergyAccountant()
    acc.update([sample(0.0, 0, power_w=40.0)], resolve)
    acc.update([sample(1.0, 100_000, (1, 75.0), (3, 25.0), power_w=100.0)], resolve)
    snap = json.loads(json.dumps(acc.snapshot()))
    assert snap["idle_joules"] == pytest.approx(40.0)
    assert snap["total_joules"] == pytest.approx(100.0)
    assert snap["idle_power_w"] == {GPU0: 40.0}
    assert [(p["pod"], p["container"]) for p in snap["pods"]] == [
        ("train-0", "trainer"),
        ("infer-1", "server"),
    ]
    assert snap["pods"][0]["joules"] == pytest.approx(45.0)
    assert snap["pods"][0]["power_w"] == pytest.approx(45.0)


# --- conservation, as a property ---------------------------------------------------------------


@dataclass
class Step:
    lost: bool
    dt: float
    energy: str  # "inc", "reset", "missing"
    amount_mj: int
    power_w: float | None
    procs: list[tuple[int, float | None]]
    util: float | None = None


steps = st.builds(
    Step,
    lost=st.integers(0, 4).map(lambda n: n == 0),  # one in five lost
    dt=st.sampled_from([0.0, 0.5, 1.0, 5.0]) | st.floats(0.01, 90.0),
    energy=st.sampled_from(["inc", "inc", "inc", "reset", "missing"]),
    amount_mj=st.integers(0, 2_000_000),
    power_w=st.none() | st.floats(0.0, 700.0),
    procs=st.lists(
        st.tuples(st.integers(1, 6), st.none() | st.floats(0.0, 100.0)), max_size=4
    ),
    util=st.none() | st.sampled_from([0.0, 0.0, 35.0, 100.0]),
)


def expected_joules(history: list[GpuSample], max_power_interval_s: float) -> float:
    """The energy the counters moved by, computed the plain way, as the oracle."""
    counted = 0.0
    prev: GpuSample | None = None
    for s in history:
        if s.lost:
            continue
        if prev is not None and s.ts > prev.ts:
            if s.energy_mj is not None and prev.energy_mj is not None:
                if s.energy_mj >= prev.energy_mj:
                    counted += (s.energy_mj - prev.energy_mj) / 1000
            elif s.power_w is not None and s.ts - prev.ts <= max_power_interval_s:
                counted += s.power_w * (s.ts - prev.ts)
        prev = s
    return counted


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(steps, steps), min_size=1, max_size=25))
def test_energy_conserved_and_counters_monotonic(rounds: list[tuple[Step, Step]]) -> None:
    acc = EnergyAccountant(max_power_interval_s=60.0)
    history: dict[str, list[GpuSample]] = {GPU0: [], GPU1: []}
    clock = {GPU0: 0.0, GPU1: 0.0}
    counter = {GPU0: 0, GPU1: 0}
    for pair in rounds:
        batch: list[GpuSample] = []
        for uuid, step in zip((GPU0, GPU1), pair, strict=True):
            clock[uuid] += step.dt
            energy: int | None
            if step.energy == "inc":
                counter[uuid] += step.amount_mj
                energy = counter[uuid]
            elif step.energy == "reset":
                counter[uuid] = step.amount_mj // 1000
                energy = counter[uuid]
            else:
                energy = None
            s = sample(
                clock[uuid],
                None if step.lost else energy,
                *step.procs,
                power_w=None if step.lost else step.power_w,
                uuid=uuid,
                lost=step.lost,
                util=step.util,
            )
            history[uuid].append(s)
            batch.append(s)

        before_pods = dict(acc.pod_joules)
        before_idle, before_unattr = acc.idle_joules, acc.unattributed_joules
        before_gpus = {u: (g.joules, g.idle_joules, g.attributed_joules, g.unattributed_joules)
                       for u, g in acc.gpus.items()}
        acc.update(batch, resolve)

        assert acc.idle_joules >= before_idle
        assert acc.unattributed_joules >= before_unattr
        for k, joules in before_pods.items():
            assert acc.pod_joules[k] >= joules
        assert all(j >= 0 for j in acc.pod_joules.values())

        expected = math.fsum(expected_joules(h, 60.0) for h in history.values())
        assert math.isclose(total(acc), expected, rel_tol=1e-9, abs_tol=1e-6)
        counted = math.fsum(acc.gpu_joules.values())
        assert math.isclose(counted, expected, rel_tol=1e-9, abs_tol=1e-6)

        # per GPU: its own oracle, idle + attributed + unattributed = its total, all monotonic
        for uuid, gpu in acc.gpus.items():
            assert math.isclose(gpu.joules, expected_joules(history[uuid], 60.0), rel_tol=1e-9, abs_tol=1e-6)
            parts = gpu.idle_joules + gpu.attributed_joules + gpu.unattributed_joules
            assert math.isclose(parts, gpu.joules, rel_tol=1e-9, abs_tol=1e-6)
            now = (gpu.joules, gpu.idle_joules, gpu.attributed_joules, gpu.unattributed_joules)
            assert all(b <= a for a, b in zip(now, before_gpus.get(uuid, (0.0,) * 4), strict=True))
            assert min(now) >= 0
            if gpu.power_w is not None:
                assert 0 <= gpu.idle_power_w <= gpu.power_w
        # the levels agree: every process share is in one container and one pod, or unattributed
        attributed = math.fsum(g.attributed_joules for g in acc.gpus.values())
        for level in (acc.pod_joules, acc.containers.joules, acc.kepler_pods.joules):
            assert math.isclose(math.fsum(level.values()), attributed, rel_tol=1e-9, abs_tol=1e-6)
        by_process = math.fsum(acc.processes.joules.values())  # pods' and host processes' shares
        unattributed = math.fsum(g.unattributed_joules for g in acc.gpus.values())
        assert attributed - 1e-6 <= by_process <= attributed + unattributed + 1e-6
        # a busy GPU (processes, or utilisation without any) is idle for its learned idle power
        # only: never more idle energy than that power over the interval
        for uuid in (GPU0, GPU1):
            s, prev = history[uuid][-1], history[uuid][-2] if len(history[uuid]) > 1 else None
            if s.lost or not (s.processes or (s.utilization_pct or 0) > 0):
                continue
            learned = acc.idle_power_w.get(uuid, 0.0)
            assert acc.gpus[uuid].idle_power_w <= learned
            if prev is not None and not prev.lost and s.ts > prev.ts:
                idle_delta = acc.gpus[uuid].idle_joules - before_gpus.get(uuid, (0.0,) * 4)[1]
                assert idle_delta <= learned * (s.ts - prev.ts) * (1 + 1e-9) + 1e-6


def test_counters_of_long_idle_pods_are_forgotten() -> None:
    """A node running many short jobs must not keep a counter for every pod it ever ran."""
    from edge.energy import EnergyAccountant, PodKey

    accountant = EnergyAccountant()
    old, recent = PodKey("ns", "old-job", "main"), PodKey("ns", "serving", "main")
    accountant.pod_joules.update({old: 10.0, recent: 5.0})
    accountant.pod_last_active.update({old: 100.0, recent: 90_000.0})
    assert accountant.forget_idle_pods(86_400.0, now=100_000.0) == 1
    assert accountant.pod_joules == {recent: 5.0} and old not in accountant.pod_last_active
