"""GPU health with recovery (`edge.health.assess`) and the node's /healthz verdict."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.actions import Action, ActionKind
from edge.health import GpuHealthState, assess, node_health, sample_passes
from shared.gpu import GpuSample, Health, XidEvent
from shared.policy import PowerPolicy

UNHEALTHY, MIGRATE = ActionKind.MARK_UNHEALTHY, ActionKind.REQUEST_MIGRATION
RECORD = ActionKind.RECORD
HEALTHY_, LOST_ = ActionKind.MARK_HEALTHY, ActionKind.MARK_LOST
QUIET = 300.0  # seconds


def make_policy(**xid_policy: Any) -> PowerPolicy:
    return PowerPolicy.model_validate({"xidPolicy": xid_policy})


def good(temp: float | None = 60.0, dbe: int | None = 0, remap_failure: bool | None = False,
         index: int = 0) -> GpuSample:
    return GpuSample(index=index, uuid=f"GPU-{index}", ts=0.0, temperature_c=temp,
                     ecc_dbe_volatile=dbe, remap_failure=remap_failure)


def lost_sample(index: int = 0) -> GpuSample:
    return GpuSample(index=index, uuid=f"GPU-{index}", ts=0.0, lost=True)


def xid(number: int, index: int = 0, uuid: str | None = None) -> XidEvent:
    return XidEvent(index=index, uuid=uuid or f"GPU-{index}", xid=number, ts=0.0)


@dataclass
class Gpu:
    """One GPU driven through `assess` cycle after cycle."""

    policy: PowerPolicy = field(default_factory=make_policy)
    quiet: float = QUIET
    state: GpuHealthState = field(default_factory=GpuHealthState)

    def step(self, now: float, sample: GpuSample | None = None, xids: Sequence[XidEvent] = (),
             *, no_sample: bool = False) -> list[Action]:
        if sample is None and not no_sample:
            sample = good()
        self.state, actions = assess(0, "GPU-0", self.state, sample, list(xids), self.policy, now,
                                     self.quiet)
        for action in actions:
            assert action.rule and action.reason and action.gpu_index == 0
        return actions


def kinds(actions: list[Action]) -> list[tuple[ActionKind, str]]:
    return [(a.kind, a.rule) for a in actions]


# ---- XIDs -----------------------------------------------------------------------------------

XID_CASES: list[tuple[str, dict[str, Any], int, list[tuple[ActionKind, str]], Health]] = [
    ("13 is an application error: ignored", {}, 13, [(RECORD, "xid")], Health.HEALTHY),
    ("31 is ignored too", {}, 31, [(RECORD, "xid")], Health.HEALTHY),
    ("set to record", {"actions": {63: "record"}}, 63, [(RECORD, "xid")], Health.HEALTHY),
    ("94 marks unhealthy", {}, 94, [(UNHEALTHY, "xid")], Health.UNHEALTHY),
    ("48 asks for migration", {}, 48, [(UNHEALTHY, "xid"), (MIGRATE, "xid")], Health.UNHEALTHY),
    ("79 asks for migration", {}, 79, [(UNHEALTHY, "xid"), (MIGRATE, "xid")], Health.UNHEALTHY),
    ("an unknown XID takes the default", {}, 999, [(UNHEALTHY, "xid")], Health.UNHEALTHY),
    ("default set to record", {"defaultAction": "record"}, 999, [(RECORD, "xid")], Health.HEALTHY),
    ("13 no longer ignored", {"ignored": []}, 13, [(UNHEALTHY, "xid")], Health.UNHEALTHY),
]


@pytest.mark.parametrize(("name", "xid_policy", "number", "want", "health"), XID_CASES,
                         ids=[case[0] for case in XID_CASES])
def test_xid(name: str, xid_policy: dict[str, Any], number: int,
             want: list[tuple[ActionKind, str]], health: Health) -> None:
    gpu = Gpu(policy=make_policy(**xid_policy))
    gpu.step(0)
    actions = gpu.step(10, xids=[xid(number)])
    assert kinds(actions) == want, name
    assert gpu.state.health is health
    assert all(f"xid {number}" in a.reason for a in actions)
    assert actions[0].inputs["xid"] == number
    if health is Health.UNHEALTHY:
        assert gpu.state.reasons == (f"xid {number}",)
        assert gpu.state.since == 10 and gpu.state.last_bad_at == 10
    else:
        assert gpu.state.reasons == () and gpu.state.last_bad_at is None


def test_ignored_xid_says_so() -> None:
    (action,) = Gpu().step(0, xids=[xid(13)])
    assert "ignored" in action.reason and action.inputs["xid_action"] == "ignored"


def test_another_gpus_xid_is_skipped() -> None:
    assert Gpu().step(0, xids=[xid(79, index=3, uuid="GPU-3")]) == []


def test_migration_requested_once_per_episode() -> None:
    gpu = Gpu()
    assert kinds(gpu.step(0, xids=[xid(48)])) == [(UNHEALTHY, "xid"), (MIGRATE, "xid")]
    assert kinds(gpu.step(10, xids=[xid(79)])) == [(UNHEALTHY, "xid")]  # new reason, no new ask
    assert gpu.state.reasons == ("xid 48", "xid 79") and gpu.state.migration_requested
    assert kinds(gpu.step(10 + QUIET)) == [(HEALTHY_, "recovered")]
    assert not gpu.state.migration_requested
    assert kinds(gpu.step(1000, xids=[xid(48)])) == [(UNHEALTHY, "xid"), (MIGRATE, "xid")]


def test_repeated_xid_is_recorded_and_restarts_the_quiet_period() -> None:
    gpu = Gpu()
    gpu.step(0, xids=[xid(94)])
    assert kinds(gpu.step(200, xids=[xid(94)])) == [(RECORD, "xid")]
    assert gpu.state.last_bad_at == 200 and gpu.state.reasons == ("xid 94",)
    assert gpu.step(300) == []  # 300 s after the first, but only 100 s after the second
    assert kinds(gpu.step(500)) == [(HEALTHY_, "recovered")]


def test_two_failures_at_once() -> None:
    gpu = Gpu()
    gpu.step(0, good(dbe=0))
    actions = gpu.step(10, good(dbe=2), xids=[xid(48)])
    assert kinds(actions) == [(UNHEALTHY, "xid"), (MIGRATE, "xid"), (UNHEALTHY, "ecc_dbe")]
    assert gpu.state.reasons == ("xid 48", "double-bit ECC errors")


# ---- sample checks --------------------------------------------------------------------------

def test_dbe_first_sample_sets_the_baseline() -> None:
    gpu = Gpu()
    assert gpu.step(0, good(dbe=5)) == [] and gpu.state.ecc_dbe_baseline == 5
    assert gpu.step(10, good(dbe=5)) == []
    actions = gpu.step(20, good(dbe=7))
    assert kinds(actions) == [(UNHEALTHY, "ecc_dbe"), (MIGRATE, "ecc_dbe")]
    assert "5 to 7" in actions[0].reason and gpu.state.ecc_dbe_baseline == 7
    assert gpu.step(30, good(dbe=7)) == []  # no new errors: nothing more to say


def test_dbe_rising_again_is_recorded() -> None:
    gpu = Gpu()
    gpu.step(0, good(dbe=0))
    gpu.step(10, good(dbe=1))
    assert kinds(gpu.step(20, good(dbe=2))) == [(RECORD, "ecc_dbe")]
    assert gpu.state.last_bad_at == 20


def test_dbe_counter_reset_only_moves_the_baseline() -> None:
    gpu = Gpu()
    gpu.step(0, good(dbe=9))
    assert gpu.step(10, good(dbe=0)) == [] and gpu.state.ecc_dbe_baseline == 0
    assert gpu.state.health is Health.HEALTHY


def test_unknown_dbe_keeps_the_baseline() -> None:
    gpu = Gpu()
    gpu.step(0, good(dbe=3))
    assert gpu.step(10, good(dbe=None)) == [] and gpu.state.ecc_dbe_baseline == 3
    assert kinds(gpu.step(20, good(dbe=4)))[0] == (UNHEALTHY, "ecc_dbe")


def test_remap_failure_fails_while_the_flag_is_set() -> None:
    gpu = Gpu()
    assert kinds(gpu.step(0, good(remap_failure=True))) == [(UNHEALTHY, "row_remap_failure")]
    for now in (10, 400, 1000):
        assert gpu.step(now, good(remap_failure=True)) == []  # no repeats, no recovery
        assert gpu.state.health is Health.UNHEALTHY and gpu.state.last_bad_at == now
    assert gpu.step(1010, good(remap_failure=False)) == []  # cleared: the quiet period runs
    assert kinds(gpu.step(1000 + QUIET, good())) == [(HEALTHY_, "recovered")]


def test_critical_temperature_and_its_hysteresis() -> None:
    gpu = Gpu()  # criticalTempC 90, hysteresis 5
    assert kinds(gpu.step(0, good(temp=90))) == [(UNHEALTHY, "critical_temperature"),
                                                 (MIGRATE, "critical_temperature")]
    assert gpu.step(10, good(temp=95)) == [] and gpu.state.last_bad_at == 10
    assert gpu.step(20, good(temp=89)) == []
    assert gpu.step(20 + QUIET, good(temp=85)) == []  # quiet, but not below 90 - 5
    assert gpu.state.health is Health.UNHEALTHY
    assert kinds(gpu.step(30 + QUIET, good(temp=84.9))) == [(HEALTHY_, "recovered")]


def test_unknown_temperature_does_not_block_recovery() -> None:
    gpu = Gpu()
    gpu.step(0, xids=[xid(94)])
    assert kinds(gpu.step(QUIET, good(temp=None))) == [(HEALTHY_, "recovered")]


# ---- lost and back --------------------------------------------------------------------------

@pytest.mark.parametrize("gone", ["no sample", "lost sample"])
def test_lost_returned_recovered(gone: str) -> None:
    gpu = Gpu()
    missing: dict[str, Any] = (
        {"no_sample": True} if gone == "no sample" else {"sample": lost_sample()})
    gpu.step(0)
    assert kinds(gpu.step(10, **missing)) == [(LOST_, "lost")]
    assert gpu.state.health is Health.LOST and gpu.state.since == 10
    assert gpu.step(20, **missing) == [] and gpu.step(500, **missing) == []  # once
    actions = gpu.step(600)
    assert kinds(actions) == [(UNHEALTHY, "returned_after_loss")]
    assert gpu.state.health is Health.UNHEALTHY and gpu.state.reasons == ("returned after loss",)
    assert gpu.state.last_bad_at == 600  # a fresh quiet period
    assert gpu.step(600 + QUIET - 1) == []
    (recovered,) = gpu.step(600 + QUIET)
    assert recovered.kind is HEALTHY_ and "300 s" in recovered.reason
    assert gpu.state == GpuHealthState(health=Health.HEALTHY, since=600 + QUIET, last_bad_at=600,
                                       ecc_dbe_baseline=0)


def test_lost_while_unhealthy_keeps_the_reasons() -> None:
    gpu = Gpu()
    gpu.step(0, xids=[xid(79)])
    assert kinds(gpu.step(1, lost_sample())) == [(LOST_, "lost")]
    assert gpu.state.reasons == ("xid 79", "lost") and gpu.state.migration_requested
    gpu.step(5)
    assert gpu.state.reasons == ("xid 79", "returned after loss")


def test_xid_while_lost_is_recorded_and_lost_stays_lost() -> None:
    gpu = Gpu()
    gpu.step(0, lost_sample())
    actions = gpu.step(1, lost_sample(), xids=[xid(79)])
    assert kinds(actions) == [(RECORD, "xid"), (MIGRATE, "xid")]
    assert gpu.state.health is Health.LOST and "xid 79" in gpu.state.reasons


def test_a_failing_sample_on_return_is_reported_too() -> None:
    gpu = Gpu()
    gpu.step(0, lost_sample())
    actions = gpu.step(10, good(remap_failure=True))
    assert kinds(actions) == [(UNHEALTHY, "returned_after_loss"), (UNHEALTHY, "row_remap_failure")]


def test_zero_quiet_period_recovers_on_the_next_good_cycle_not_the_same() -> None:
    gpu = Gpu(quiet=0)
    assert kinds(gpu.step(0, xids=[xid(94)])) == [(UNHEALTHY, "xid")]
    assert kinds(gpu.step(1)) == [(HEALTHY_, "recovered")]
    gpu.step(2, lost_sample())
    assert kinds(gpu.step(3)) == [(UNHEALTHY, "returned_after_loss")]
    assert kinds(gpu.step(4)) == [(HEALTHY_, "recovered")]


def test_healthy_gpu_with_good_samples_emits_nothing() -> None:
    gpu = Gpu()
    assert all(gpu.step(float(t), good(temp=70, dbe=1)) == [] for t in range(0, 1000, 10))
    assert gpu.state.since is None


# ---- node health ----------------------------------------------------------------------------

NODE_CASES: list[tuple[str, bool, dict[int, GpuHealthState], bool | None, bool, list[str]]] = [
    ("all good", True, {0: GpuHealthState()}, True, True, []),
    ("no probe configured", True, {0: GpuHealthState()}, None, True, []),
    ("driver unreachable", False, {}, None, False, ["driver unreachable"]),
    ("probe failed", True, {}, False, False, ["application probe failed"]),
    ("an unhealthy GPU is only reported", True,
     {0: GpuHealthState(), 1: GpuHealthState(health=Health.UNHEALTHY, reasons=("xid 79",))},
     True, True, ["gpu 1 unhealthy: xid 79"]),
    ("a lost GPU is only reported", True,
     {2: GpuHealthState(health=Health.LOST, reasons=("xid 79", "lost")),
      0: GpuHealthState(health=Health.LOST, reasons=("lost",))},
     None, True, ["gpu 0 lost", "gpu 2 lost: xid 79"]),
    ("everything at once", False, {0: GpuHealthState(health=Health.UNHEALTHY, reasons=("a", "b"))},
     False, False, ["driver unreachable", "application probe failed", "gpu 0 unhealthy: a, b"]),
]


@pytest.mark.parametrize(("name", "driver", "gpus", "probe", "healthy", "reasons"), NODE_CASES,
                         ids=[case[0] for case in NODE_CASES])
def test_node_health(name: str, driver: bool, gpus: dict[int, GpuHealthState], probe: bool | None,
                     healthy: bool, reasons: list[str]) -> None:
    assert node_health(driver, gpus, probe) == (healthy, reasons)


# ---- properties -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Cycle:
    dt: float
    sample: str  # "good", "lost", "none"
    temp: float | None
    remap_failure: bool
    dbe_delta: int  # added to the DBE counter; negative: a reset to 0
    xids: tuple[int, ...]


cycles = st.builds(
    Cycle,
    dt=st.sampled_from([0.0, 1.0, 5.0, 30.0, 120.0, 400.0]),
    sample=st.sampled_from(["good"] * 6 + ["lost", "none"]),
    temp=st.none() | st.floats(20, 110),
    remap_failure=st.integers(0, 7).map(lambda n: n == 0),
    dbe_delta=st.sampled_from([0, 0, 0, 0, 1, 3, -1]),
    xids=st.lists(st.sampled_from([13, 31, 43, 48, 63, 79, 94, 95, 999]), max_size=2).map(tuple),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(cycles, min_size=1, max_size=40), st.sampled_from([0.0, 5.0, 60.0, 300.0]),
       st.floats(50, 100), st.floats(0, 20))
def test_properties_of_assess(run: list[Cycle], quiet: float, critical: float,
                              hysteresis: float) -> None:
    policy = PowerPolicy.model_validate({
        "thermalThrottling": {"maxTempC": critical - 1, "criticalTempC": critical,
                              "hysteresisC": hysteresis},
        "xidPolicy": {"actions": {48: "request_migration", 63: "record", 79: "request_migration"}}})
    state = GpuHealthState()
    now, dbe = 0.0, 0
    last_bad: float | None = None  # kept by the test, independently of the state
    migrations_this_episode = 0
    for cycle in run:
        now += cycle.dt
        prev = state
        dbe = 0 if cycle.dbe_delta < 0 else dbe + cycle.dbe_delta
        sample = None
        if cycle.sample == "good":
            sample = good(temp=cycle.temp, dbe=dbe, remap_failure=cycle.remap_failure)
        elif cycle.sample == "lost":
            sample = lost_sample()
        xids = [xid(n) for n in cycle.xids]
        state, actions = assess(0, "GPU-0", prev, sample, xids, policy, now, quiet)

        is_lost = sample is None or sample.lost
        fails = is_lost or (sample is not None and (
            bool(sample.remap_failure)
            or (sample.temperature_c is not None and sample.temperature_c >= critical)
            or (prev.ecc_dbe_baseline is not None and dbe > prev.ecc_dbe_baseline)))
        counted = any(policy.xid_policy.action_for(n) not in (None, "record") for n in cycle.xids)
        if fails or counted or prev.health is Health.LOST:
            last_bad = now

        for action in actions:
            assert action.rule and action.reason, action
        got = [a.kind for a in actions]
        assert (state.health is Health.LOST) == is_lost
        if fails or counted:
            assert state.health is not Health.HEALTHY, "healthy while a check fails"
        if HEALTHY_ in got:
            assert prev.health is Health.UNHEALTHY and state.health is Health.HEALTHY
            assert sample_passes(sample, prev.ecc_dbe_baseline, policy)
            assert sample is not None and (sample.temperature_c is None
                                           or sample.temperature_c < critical - hysteresis)
            assert last_bad is None or now - last_bad >= quiet
            migrations_this_episode = 0
        if state.health is not prev.health:
            assert state.since == now
        if LOST_ in got:
            assert prev.health is not Health.LOST
        if prev.health is Health.UNHEALTHY and state.health is Health.UNHEALTHY:
            assert got.count(UNHEALTHY) <= len(set(state.reasons) - set(prev.reasons))
        migrations_this_episode += got.count(MIGRATE)
        assert migrations_this_episode <= 1, "migration asked twice in one episode"
        assert state.migration_requested == (migrations_this_episode == 1)
