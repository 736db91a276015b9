"""The edge's power policy (`edge.policy.evaluate`): every rule, table-driven, plus properties.

Defaults used throughout: an H100-like GPU (limits 200..700 W, default 700 W, SM clocks
1980..345 MHz) and the default thermal policy (maxTempC 83, criticalTempC 90, hysteresis 5,
coolDownPeriod 120 s, stepPercent 10 -> 70 W a step, stepInterval 10 s).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.actions import Action, ActionKind
from edge.policy import GpuPolicyState, evaluate, initial_state
from shared.gpu import GpuInventory, GpuSample
from shared.policy import PowerPolicy

H100_SM_CLOCKS = list(range(1980, 344, -15))  # 1980, 1965, ..., 345: 110 clocks, as NVML lists
MIDDLE_CLOCK = 1155  # H100_SM_CLOCKS[55]
THERMAL_RULES = {"thermal_step_down", "thermal_critical", "thermal_restore"}


def make_inventory(index: int = 0, minimum: float | None = 200.0, maximum: float | None = 700.0,
                   default: float | None = 700.0,
                   clocks: list[int] | None = None) -> GpuInventory:
    return GpuInventory(
        index=index, uuid=f"GPU-{index}", name="NVIDIA H100 80GB HBM3",
        pci_bus_id=f"0000:0{index}:00.0",
        memory_total_bytes=80 * 2**30, driver_version="550.54.15",
        power_limit_min_w=minimum, power_limit_max_w=maximum, power_limit_default_w=default,
        supported_sm_clocks_mhz=H100_SM_CLOCKS if clocks is None else clocks)


def make_sample(temp: float | None = 60.0, util: float | None = 50.0, limit: float | None = 700.0,
                index: int = 0, lost: bool = False, ts: float = 0.0) -> GpuSample:
    return GpuSample(index=index, uuid=f"GPU-{index}", ts=ts, lost=lost, temperature_c=temp,
                     utilization_pct=util, power_limit_w=limit)


def make_policy(version: int = 1, thermal: dict[str, Any] | None = None,
                saving: dict[str, Any] | None = None, cap: float | None = None) -> PowerPolicy:
    return PowerPolicy.model_validate({
        "name": "test", "version": version, "powerCapWatts": cap,
        "thermalThrottling": thermal or {}, "powerSaving": saving or {}})


SAVING = {"enabled": True, "utilizationThreshold": 10, "capPercent": 70, "sustainPeriod": 60}


@dataclass
class Gpu:
    """Drives one GPU through `evaluate` like the daemon: the driver follows every limit asked."""

    policy: PowerPolicy = field(default_factory=make_policy)
    inventory: GpuInventory = field(default_factory=make_inventory)
    enforced: float | None = 700.0
    state: dict[int, GpuPolicyState] = field(default_factory=dict)

    def step(self, now: float, temp: float | None = 60.0, util: float | None = 50.0,
             lost: bool = False) -> list[Action]:
        sample = make_sample(temp, util, self.enforced, lost=lost, ts=now)
        actions, self.state = evaluate([sample], {0: self.inventory}, self.policy, self.state, now)
        for action in actions:
            if action.kind is ActionKind.SET_POWER_LIMIT:
                self.enforced = action.value
        return actions

    @property
    def gpu_state(self) -> GpuPolicyState:
        return self.state.get(0, initial_state())


SET, LOCK, RESET = ActionKind.SET_POWER_LIMIT, ActionKind.LOCK_CLOCKS, ActionKind.RESET_CLOCKS
# now, temperature, utilisation, the actions wanted as (kind, rule, value)
Row = tuple[float, float, float, list[tuple[ActionKind, str, float | None]]]


def _hot_run(temp: float, times: list[float]) -> list[Row]:
    return [(t, temp, 50.0, []) for t in times]


SCENARIOS: dict[str, tuple[dict[str, Any], list[Row]]] = {
    "nothing to do at the default limit": ({}, [
        (0, 60, 50, []), (10, 75, 90, []), (20, 82.9, 100, [])]),
    "hot: one step down": ({}, [
        (0, 60, 50, []), (10, 83, 50, [(SET, "thermal_step_down", 630)])]),
    "stepInterval is respected": ({}, [
        (0, 85, 50, [(SET, "thermal_step_down", 630)]),
        (5, 85, 50, []),
        (9.9, 89, 50, []),
        (10, 86, 50, [(SET, "thermal_step_down", 560)]),  # still rising: step again at once
        (12, 88, 50, []),
        (20, 88, 50, [(SET, "thermal_step_down", 490)])]),
    "a step that is working is given time to show (coolDownPeriod)": ({}, [
        (0, 86, 50, [(SET, "thermal_step_down", 630)]),
        (10, 86, 50, []),  # not rising any more: the step is taking hold, wait for it
        (30, 85, 50, []),
        (119.9, 84, 50, []),
        (120, 84, 50, [(SET, "thermal_step_down", 560)]),  # shown, still hot: one more step
        (130, 84, 50, []),
        (140, 85, 50, [(SET, "thermal_step_down", 490)])]),  # rising past 84 again: no waiting
    "far above maxTempC, the step is in proportion": (
        {"thermal": {"maxTempC": 70, "criticalTempC": 95}}, [
            (0, 88, 50, [(SET, "thermal_step_down", 420)]),  # (88 - 67.5) / 5 °C: 4 steps
            (10, 80, 50, []),
            (120, 72, 50, [(SET, "thermal_step_down", 350)])]),  # (72 - 67.5) / 5: at least 1
    "critical goes to the minimum at once, then locks the clock once": ({}, [
        (0, 60, 50, []),
        (1, 95, 50, [(SET, "thermal_critical", 200)]),
        (2, 95, 50, [(LOCK, "thermal_critical", MIDDLE_CLOCK)]),
        (3, 99, 50, [])]),
    "critical does not wait for stepInterval": ({}, [
        (0, 85, 50, [(SET, "thermal_step_down", 630)]),
        (1, 90, 50, [(SET, "thermal_critical", 200)])]),
    "at the minimum and still hot: lock the clock after stepInterval, once": ({}, [
        *[(10.0 * i, 83 + 0.5 * i, 50, [(SET, "thermal_step_down", w)])  # rising all along
          for i, w in enumerate([630, 560, 490, 420, 350, 280, 210, 200])],
        (75, 87, 50, []),
        (80, 87, 50, [(LOCK, "thermal_step_down", MIDDLE_CLOCK)]),
        (100, 88, 50, []), (200, 88, 50, [])]),
    "restore only after coolDownPeriod, then one step per stepInterval": ({}, [
        (0, 85, 50, [(SET, "thermal_step_down", 630)]),
        (10, 86, 50, [(SET, "thermal_step_down", 560)]),
        (20, 70, 50, []), (100, 70, 50, []), (139.9, 70, 50, []),
        (140, 70, 50, [(SET, "thermal_restore", 630)]),
        (145, 70, 50, []),
        (150, 70, 50, [(SET, "thermal_restore", 700)]),  # 70 + 2 steps of 5 °C: 80 < 83
        (160, 70, 50, []), (500, 40, 50, [])]),
    "a restore waits while it and those not yet shown could reach maxTempC": ({}, [
        (0, 85, 50, [(SET, "thermal_step_down", 630)]),
        (10, 86, 50, [(SET, "thermal_step_down", 560)]),
        (20, 72, 50, []),
        (140, 72, 50, [(SET, "thermal_restore", 630)]),  # 72 + 5 °C: 77, under the band even
        (150, 74, 50, []),  # 74 + 2 x 5 °C would reach 84: wait for the first to show
        (259.9, 75, 50, []),
        (260, 75, 50, [(SET, "thermal_restore", 700)]),  # shown (coolDownPeriod): 80 fits
        (270, 79, 50, [])]),
    "no restore that the GPU's heat says would be hot again": ({}, [
        (0, 85, 50, [(SET, "thermal_step_down", 630)]),
        (10, 77, 50, []),
        (200, 77.9, 50, [])]),  # cool since 10, but 77.9 + 5 °C reaches 83
    "a limit found too hot is not restored to while it would still be too hot": ({}, [
        (0, 85, 50, [(SET, "thermal_step_down", 630)]),  # 700 W was too hot
        (120, 84, 50, [(SET, "thermal_step_down", 560)]),  # 630 W too
        (180, 74, 50, []),  # an overshoot: 74 < 78, cool since here
        (300, 74, 50, []),  # 74 + 5 °C for 630 W reaches 78: hold 560 W, just under the band
        (900, 74, 50, []),
        (1320, 74, 50, [(SET, "thermal_restore", 630)])]),  # forgotten after 10 x coolDown
    "the hysteresis band holds and restarts the cool-down": ({}, [
        (0, 85, 50, [(SET, "thermal_step_down", 630)]),
        (10, 70, 50, []),
        (100, 78, 50, []),  # maxTempC - hysteresis exactly: in the band
        (110, 82.9, 50, []),
        (120, 77.9, 50, []),  # cool again: the cool-down starts over here
        (200, 60, 50, []),
        (239.9, 60, 50, []),
        (240, 60, 50, [(SET, "thermal_restore", 700)])]),
    "restore unlocks the clock first, then removes steps": ({}, [
        (0, 95, 50, [(SET, "thermal_critical", 200)]),
        (1, 95, 50, [(LOCK, "thermal_critical", MIDDLE_CLOCK)]),
        (2, 60, 50, []),
        (122, 60, 50, [(RESET, "thermal_restore", None)]),
        (131, 60, 50, []),
        (132, 60, 50, [(SET, "thermal_restore", 210)]),
        (142, 60, 50, [(SET, "thermal_restore", 280)])]),
    "a clock locked at the minimum stays locked while unlocking would heat it back": ({}, [
        (0, 95, 50, [(SET, "thermal_critical", 200)]),
        (1, 95, 50, [(LOCK, "thermal_critical", MIDDLE_CLOCK)]),  # 200 W alone was too hot
        (2, 74, 50, []),
        (200, 74, 50, []),  # 74 + 5 °C for the unlock reaches the band (78)
        (1201, 74, 50, [(RESET, "thermal_restore", None)])]),  # forgotten after 10 x coolDown
    "heat during the cool-down stops the restore": ({}, [
        (0, 85, 50, [(SET, "thermal_step_down", 630)]),
        (10, 60, 50, []),
        (100, 86, 50, [(SET, "thermal_step_down", 560)]),  # hotter than at the last step
        (110, 60, 50, []),
        (200, 60, 50, []),
        (230, 60, 50, [(SET, "thermal_restore", 630)])]),
    "thermal disabled: nothing happens when hot": ({"thermal": {"enabled": False}}, [
        (0, 88, 50, []), (10, 95, 50, []), (20, 120, 50, [])]),
    "power saving after sustainPeriod, exit at once": ({"saving": SAVING}, [
        (0, 60, 5, []), (30, 60, 9.9, []), (59, 60, 0, []),
        (60, 60, 5, [(SET, "power_saving", 490)]),
        (70, 60, 5, []),
        (80, 60, 10, [(SET, "power_saving_exit", 700)]),
        (90, 60, 5, [])]),
    "busy sample restarts the sustain period": ({"saving": SAVING}, [
        (0, 60, 5, []), (30, 60, 50, []), (60, 60, 5, []), (119, 60, 5, []),
        (120, 60, 5, [(SET, "power_saving", 490)])]),
    "powerCapWatts is a ceiling": ({"cap": 300}, [
        (0, 60, 50, [(SET, "power_cap", 300)]), (10, 60, 50, []), (20, 80, 0, [])]),
    "powerCapWatts below the minimum is clamped to it": ({"cap": 100}, [
        (0, 60, 50, [(SET, "power_cap", 200)])]),
    "powerCapWatts above the maximum changes nothing": ({"cap": 900}, [
        (0, 60, 50, []), (10, 84, 50, [(SET, "thermal_step_down", 630)])]),
    "a hot GPU under a cap steps below the cap at once": ({"cap": 300}, [
        (0, 60, 50, [(SET, "power_cap", 300)]),
        (10, 85, 50, [(SET, "thermal_step_down", 280)]),
        (20, 86, 50, [(SET, "thermal_step_down", 210)]),
        (30, 60, 50, []),
        (150, 60, 50, [(SET, "thermal_restore", 280)]),  # 7 -> 6 steps
        (160, 60, 50, [(SET, "thermal_restore", 300)]),  # 6 -> 5 steps: 350 W, the cap binds
        (170, 60, 50, []),  # 5 -> 4 steps: 420 W, under the cap: a silent restore
    ]),
    "a hot GPU in power saving steps below the saving limit": ({"saving": SAVING}, [
        (0, 60, 5, []), (60, 60, 5, [(SET, "power_saving", 490)]),
        (70, 85, 5, [(SET, "thermal_step_down", 420)]),
        (80, 86, 90, [(SET, "thermal_step_down", 350)]),  # busy and hot: no rise, a step down
        (85, 82, 90, []),
        (90, 82, 90, []),
    ]),
    "power saving exit in the hysteresis band keeps the thermal steps": ({"saving": SAVING}, [
        (0, 60, 5, []), (60, 60, 5, [(SET, "power_saving", 490)]),
        (70, 85, 5, [(SET, "thermal_step_down", 420)]),
        (75, 80, 90, []),  # saving is off, but 4 thermal steps keep 420 W: nothing to ask
        (200, 60, 90, []),  # cool since 200
        (320, 60, 90, [(SET, "thermal_restore", 490)])]),
    "a hot GPU's limit does not rise, even when power saving ends": (
        {"saving": {**SAVING, "sustainPeriod": 0}}, [
            (0, 85, 50, [(SET, "thermal_step_down", 630)]),
            (10, 60, 50, []),
            (130, 60, 50, [(SET, "thermal_restore", 700)]),
            (131, 60, 5, [(SET, "power_saving", 490)]),
            (135, 85, 90, []),  # hot and busy, no step allowed yet: hold 490 W
            (140, 85, 90, [(SET, "thermal_step_down", 420)]),
            (141, 80, 90, [])]),
    "power saving exit waits while hot, then is named for what it is": (
        {"saving": {**SAVING, "sustainPeriod": 0}}, [
            (0, 85, 50, [(SET, "thermal_step_down", 630)]),
            (1, 60, 5, [(SET, "power_saving", 490)]),
            (2, 85, 90, []),  # busy, but hot and no step due: saving holds 490 W
            (3, 80, 90, [(SET, "power_saving_exit", 630)])]),
    "leaving power saving in the hysteresis band raises the limit": (
        {"saving": {**SAVING, "sustainPeriod": 0}}, [
            (0, 80, 5, [(SET, "power_saving", 490)]),
            (1, 82, 50, [(SET, "power_saving_exit", 700)])]),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(name: str) -> None:
    options, rows = SCENARIOS[name]
    gpu = Gpu(policy=make_policy(thermal=options.get("thermal"), saving=options.get("saving"),
                                 cap=options.get("cap")))
    for now, temp, util, want in rows:
        got = [(a.kind, a.rule, a.value) for a in gpu.step(now, temp, util)]
        assert got == [(k, r, None if v is None else float(v)) for k, r, v in want], \
            f"{name}: at t={now} ({temp} °C, {util} %)"


def test_unknown_utilisation_neither_starts_nor_stops_saving() -> None:
    gpu = Gpu(policy=make_policy(saving=SAVING))
    gpu.step(0, util=5)
    assert gpu.step(60, util=None) == [] and not gpu.gpu_state.saving_active
    assert gpu.step(61, util=5)[0].rule == "power_saving"  # low since 0, the gap did not reset it
    assert gpu.step(70, util=None) == [] and gpu.gpu_state.saving_active


def test_reason_names_the_figures() -> None:
    gpu = Gpu()
    gpu.step(0, 85)
    (action,) = gpu.step(10, 88)
    assert action.reason == (
        "GPU 0 at 88.0 °C >= maxTempC 83.0: power limit 630 W -> 560 W (step 2)")
    assert action.inputs["temperature_c"] == 88
    assert action.inputs["utilization_pct"] == 50
    assert action.inputs["enforced_limit_w"] == 630
    assert action.inputs["thermal_steps"] == 2
    assert action.inputs["policy_version"] == 1
    assert action.gpu_index == 0 and action.gpu_uuid == "GPU-0"


@pytest.mark.parametrize("make_unusable", [
    lambda: make_sample(temp=95, lost=True),
    lambda: make_sample(temp=None),
])
def test_lost_or_temperatureless_sample_changes_nothing(make_unusable: Any) -> None:
    gpu = Gpu()
    gpu.step(0, 85)
    before = gpu.state
    actions, after = evaluate([make_unusable()], {0: make_inventory()}, gpu.policy, before, 5000)
    assert actions == [] and after == before


def test_lost_sample_of_an_unseen_gpu_adds_no_state() -> None:
    actions, state = evaluate([make_sample(lost=True)], {0: make_inventory()}, make_policy(), {}, 0)
    assert actions == [] and state == {}


@pytest.mark.parametrize("missing", ["minimum", "maximum", "default"])
def test_gpu_without_known_limits_gets_no_power_action(missing: str) -> None:
    inventory = make_inventory(**{missing: None})
    for now, temp in [(0, 95), (10, 95), (20, 85)]:
        actions, state = evaluate([make_sample(temp)], {0: inventory}, make_policy(cap=300), {},
                                  now)
        assert actions == [] and state == {}


def test_gpu_missing_from_inventory_gets_nothing() -> None:
    actions, _ = evaluate([make_sample(95)], {}, make_policy(), {}, 0)
    assert actions == []


def test_no_supported_clocks_means_no_lock() -> None:
    gpu = Gpu(inventory=make_inventory(clocks=[]))
    assert [a.value for a in gpu.step(0, 95)] == [200]
    assert gpu.step(1, 95) == [] and gpu.gpu_state.clocks_locked_mhz is None


def test_first_touch_compares_with_the_enforced_limit() -> None:
    gpu = Gpu(enforced=650)  # someone set 650 W before us
    (action,) = gpu.step(0)
    assert (action.rule, action.value) == ("policy_change", 700)
    assert "650 W -> 700 W" in action.reason
    unknown = Gpu(enforced=None)
    (action,) = unknown.step(0)
    assert action.value == 700 and "unknown -> 700 W" in action.reason


def test_cleared_target_is_asked_again() -> None:
    """The daemon may clear target_limit_w when the driver refused; we then ask once more."""
    gpu = Gpu(policy=make_policy(cap=300))
    gpu.step(0)
    gpu.enforced = 700  # the driver refused: the enforced limit did not move
    assert gpu.step(10) == []  # we asked for 300 W already; no retry every cycle
    gpu.state = {0: GpuPolicyState(target_limit_w=None)}
    assert [a.value for a in gpu.step(20)] == [300]


def test_new_policy_version_with_lower_cap_then_removed() -> None:
    gpu = Gpu()
    assert gpu.step(0) == []
    gpu.policy = make_policy(version=2, cap=400)
    (lower,) = gpu.step(10)
    assert (lower.rule, lower.value) == ("power_cap", 400)
    assert "powerCapWatts 400 W" in lower.reason and "v2" in lower.reason
    assert lower.inputs["policy_version"] == 2
    gpu.policy = make_policy(version=3)
    (back,) = gpu.step(20)
    assert (back.rule, back.value) == ("policy_change", 700)


def test_new_policy_with_larger_step_is_a_policy_change() -> None:
    gpu = Gpu()
    gpu.step(0, 85)  # one 10 % step: 630 W
    gpu.policy = make_policy(version=2, thermal={"stepPercent": 20})
    (action,) = gpu.step(1, 80)  # hold band, no thermal event: one step is now 140 W
    assert (action.rule, action.value) == ("policy_change", 560)


def test_policy_change_while_hot_is_held_until_not_hot() -> None:
    gpu = Gpu(policy=make_policy(cap=100))
    assert [(a.rule, a.value) for a in gpu.step(0, 60)] == [("power_cap", 200)]
    assert [(a.kind, a.rule) for a in gpu.step(10, 85)] == [(LOCK, "thermal_step_down")]
    gpu.policy = make_policy(version=2)  # the cap is gone
    assert gpu.step(11, 85) == []  # hot: the limit may not rise
    assert [(a.kind, a.rule, a.value) for a in gpu.step(12, 60)] == [(SET, "policy_change", 700)]
    assert gpu.step(131, 60) == []
    assert [(a.kind, a.rule) for a in gpu.step(132, 60)] == [(RESET, "thermal_restore")]


def test_disabling_thermal_drops_steps_and_unlocks() -> None:
    gpu = Gpu()
    gpu.step(0, 95)
    gpu.step(1, 95)
    assert gpu.gpu_state.clocks_locked_mhz == MIDDLE_CLOCK
    gpu.policy = make_policy(version=2, thermal={"enabled": False})
    got = [(a.kind, a.rule, a.value) for a in gpu.step(2, 95)]
    assert got == [(RESET, "policy_change", None), (SET, "policy_change", 700)]
    assert gpu.gpu_state.thermal_steps == 0 and gpu.gpu_state.clocks_locked_mhz is None


def test_disabling_power_saving_restores_the_default() -> None:
    gpu = Gpu(policy=make_policy(saving=SAVING))
    gpu.step(0, util=0)
    gpu.step(60, util=0)
    gpu.policy = make_policy(version=2)
    (action,) = gpu.step(70, util=0)
    assert (action.rule, action.value) == ("policy_change", 700)


def test_gpus_are_independent_and_unsampled_gpus_keep_their_state() -> None:
    inventory = {0: make_inventory(0), 1: make_inventory(1)}
    policy = make_policy()
    kept = GpuPolicyState(thermal_steps=3, target_limit_w=490)
    actions, state = evaluate([make_sample(85, index=0)], inventory, policy, {2: kept}, 0)
    assert [(a.gpu_index, a.value) for a in actions] == [(0, 630)]
    assert state[2] is kept and 1 not in state
    actions, state = evaluate([make_sample(60, index=0, limit=630), make_sample(95, index=1)],
                              inventory, policy, state, 5)
    assert [(a.gpu_index, a.rule, a.value) for a in actions] == [(1, "thermal_critical", 200)]
    assert state[0].thermal_steps == 1 and state[1].thermal_steps == 8


def test_steps_never_go_beyond_the_minimum() -> None:
    gpu = Gpu()
    for i in range(20):
        gpu.step(60.0 * i, 88)  # one step per response wait (half the cool-down)
    assert gpu.gpu_state.thermal_steps == 8  # 140 W, clamped to 200: the last useful step
    assert gpu.enforced == 200


def test_fractional_constraints_round_inside_them() -> None:
    gpu = Gpu(inventory=make_inventory(minimum=150.4, maximum=350.6, default=333.3), enforced=333.3)
    assert gpu.step(0) == []  # 333 W: within half a watt of the enforced limit
    values = [a.value for t in range(0, 200, 10) for a in gpu.step(t, 95)
              if a.kind is ActionKind.SET_POWER_LIMIT]
    assert values == [151]


# ---- properties -----------------------------------------------------------------------------

@st.composite
def policies(draw: st.DrawFn) -> PowerPolicy:
    max_temp = draw(st.floats(50, 95))
    return make_policy(
        version=draw(st.integers(0, 5)),
        thermal={
            "enabled": draw(st.booleans() | st.just(True)),
            "maxTempC": max_temp,
            "criticalTempC": max_temp + draw(st.floats(0.5, 20)),
            "hysteresisC": draw(st.floats(0, 10)),
            "coolDownPeriod": draw(st.sampled_from([0, 5, 30, 120])),
            "stepPercent": draw(st.floats(1, 50)),
            "stepInterval": draw(st.sampled_from([0, 5, 10, 30])),
        },
        saving={
            "enabled": draw(st.booleans()),
            "utilizationThreshold": draw(st.floats(0, 100)),
            "capPercent": draw(st.floats(10, 100)),
            "sustainPeriod": draw(st.sampled_from([0, 10, 60])),
        },
        cap=draw(st.none() | st.floats(50, 900)),
    )


@st.composite
def inventories(draw: st.DrawFn) -> GpuInventory:
    minimum = draw(st.floats(50, 400))
    maximum = minimum + draw(st.floats(0, 600))
    default = draw(st.floats(minimum, maximum))
    return make_inventory(minimum=minimum, maximum=maximum, default=default,
                          clocks=draw(st.sampled_from([H100_SM_CLOCKS, [], [1410]])))


Reading = tuple[float, float | None, float | None, bool]  # dt, temperature, utilisation, lost



def _sometimes_none(values: st.SearchStrategy[float]) -> st.SearchStrategy[float | None]:
    """None one time in eight: a figure the driver did not give."""
    return st.tuples(st.integers(0, 7), values).map(lambda pair: None if pair[0] == 0 else pair[1])


_reading = st.tuples(
    st.sampled_from([0.0, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),  # time since the previous sample
    _sometimes_none(st.floats(20, 110)),  # temperature
    _sometimes_none(st.floats(0, 100)),  # utilisation
    st.integers(0, 19).map(lambda n: n == 0),  # lost, one time in twenty
)


@st.composite
def readings(draw: st.DrawFn, max_size: int) -> list[Reading]:
    """Runs of similar readings, so that heat, cool-downs and low load last long enough to act."""
    out: list[Reading] = []
    while len(out) < max_size and (not out or draw(st.integers(0, 5)) > 0):
        dt, temp, util, lost = draw(_reading)
        for _ in range(draw(st.integers(1, 12))):
            jitter = draw(st.sampled_from([0.0, 0.0, -1.0, 1.0, 3.0]))
            out.append((dt, None if temp is None else temp + jitter, util, lost))
    return out[:max_size]


@dataclass
class Trace:
    """One evaluate call: what it saw and what it asked."""

    now: float
    temp: float | None
    usable: bool
    actions: list[Action]
    limit_before: float | None


def _run(policy: PowerPolicy, inventory: GpuInventory,
         steps: list[Reading]) -> tuple[list[Trace], Gpu]:
    gpu = Gpu(policy=policy, inventory=inventory, enforced=inventory.power_limit_default_w)
    traces = []
    now = 1000.0
    for dt, temp, util, lost in steps:
        now += dt
        before = gpu.enforced
        actions = gpu.step(now, temp, util, lost)
        traces.append(Trace(now, temp, not lost and temp is not None, actions, before))
    return traces, gpu


PROPERTY_SETTINGS = settings(max_examples=150, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(policies(), inventories(), readings(60))
def test_properties_of_evaluate(policy: PowerPolicy, inventory: GpuInventory,
                                steps: list[Reading]) -> None:
    traces, gpu = _run(policy, inventory, steps)
    tt = policy.thermal_throttling
    assert inventory.power_limit_min_w is not None and inventory.power_limit_max_w is not None
    last_set: float | None = None
    last_thermal_at: float | None = None
    cool_run_start: float | None = None  # first of the usable samples below max - hysteresis
    for trace in traces:
        if trace.usable:
            assert trace.temp is not None
            if trace.temp < tt.max_temp_c - tt.hysteresis_c:
                cool_run_start = trace.now if cool_run_start is None else cool_run_start
            else:
                cool_run_start = None
        for action in trace.actions:
            # (d) every action explains itself
            assert action.rule and action.reason
            assert trace.usable, "an unusable sample made a decision"
            if action.kind is ActionKind.SET_POWER_LIMIT:
                assert action.value is not None
                # (a) within the constraints
                assert inventory.power_limit_min_w <= action.value <= inventory.power_limit_max_w
                if action.rule == "thermal_step_down":
                    assert trace.limit_before is None or action.value < trace.limit_before
                last_set = action.value
            if action.rule == "thermal_restore":
                # (b) up for thermal reasons only after a full cool-down
                assert cool_run_start is not None, "restore while not cool"
                assert trace.now - cool_run_start >= tt.cool_down_period
                if action.kind is ActionKind.SET_POWER_LIMIT:
                    assert trace.limit_before is None or action.value > trace.limit_before
            if action.rule in THERMAL_RULES:
                # (c) one thermal change per stepInterval, unless critical
                assert trace.temp is not None
                if action.rule == "thermal_critical":
                    assert trace.temp >= tt.critical_temp_c
                elif last_thermal_at is not None:
                    assert trace.now - last_thermal_at >= tt.step_interval
                last_thermal_at = trace.now
        kinds = [a.kind for a in trace.actions]
        assert kinds.count(ActionKind.SET_POWER_LIMIT) <= 1
        assert kinds.count(ActionKind.LOCK_CLOCKS) + kinds.count(ActionKind.RESET_CLOCKS) <= 1
    # (e) the state remembers the last limit asked
    assert gpu.gpu_state.target_limit_w == last_set


@PROPERTY_SETTINGS
@given(policies(), readings(40))
def test_clock_lock_and_reset_alternate(policy: PowerPolicy,
                                        steps: list[Reading]) -> None:
    traces, gpu = _run(policy, make_inventory(), steps)
    locked = False
    for trace in traces:
        for action in trace.actions:
            if action.kind is ActionKind.LOCK_CLOCKS:
                assert not locked and action.value in H100_SM_CLOCKS
                locked = True
            elif action.kind is ActionKind.RESET_CLOCKS:
                assert locked
                locked = False
    assert (gpu.gpu_state.clocks_locked_mhz is not None) == locked


@PROPERTY_SETTINGS
@given(policies(), inventories(), readings(40))
def test_no_rise_while_hot(policy: PowerPolicy, inventory: GpuInventory,
                           steps: list[Reading]) -> None:
    """A sample at or above maxTempC never raises the limit, whatever else changed."""
    traces, _gpu = _run(policy, inventory, steps)
    tt = policy.thermal_throttling
    for trace in traces:
        if trace.temp is None or not tt.enabled or trace.temp < tt.max_temp_c:
            continue
        for action in trace.actions:
            if action.kind is ActionKind.SET_POWER_LIMIT and trace.limit_before is not None:
                assert action.value is not None
                assert action.value <= trace.limit_before, action.reason
            assert action.kind is not ActionKind.RESET_CLOCKS


@PROPERTY_SETTINGS
@given(inventories(), st.lists(st.tuples(policies(), readings(15)), min_size=1, max_size=5))
def test_policy_changes_keep_limits_valid(inventory: GpuInventory,
                                          phases: list[tuple[PowerPolicy, list[Reading]]]) -> None:
    """New policies mid-run: limits stay valid, reasons present, the state tracks the last ask."""
    gpu = Gpu(inventory=inventory, enforced=inventory.power_limit_default_w)
    assert inventory.power_limit_min_w is not None and inventory.power_limit_max_w is not None
    now, last_set = 0.0, None
    for policy, steps in phases:
        gpu.policy = policy
        for dt, temp, util, lost in steps:
            now += dt
            for action in gpu.step(now, temp, util, lost):
                assert action.rule and action.reason
                if action.kind is ActionKind.SET_POWER_LIMIT:
                    assert action.value is not None
                    assert (inventory.power_limit_min_w <= action.value
                            <= inventory.power_limit_max_w)
                    last_set = action.value
    assert gpu.gpu_state.target_limit_w == last_set
