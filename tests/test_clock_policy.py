"""The power policy on a GPU without a power limit (a Jetson): it acts on the maximum clock
(edge/clock_policy.py), through `edge.policy.evaluate` as the daemon calls it.

The GPU is an Orin NX-like table (918 MHz down to 306 MHz) with the default thermal policy
(maxTempC 83, criticalTempC 90, hysteresis 5, coolDownPeriod 120 s, stepPercent 10 -> 91.8 MHz a
step, stepInterval 10 s).
"""

from __future__ import annotations

from typing import Any

from edge.actions import ActionKind
from edge.policy import GpuPolicyState, evaluate
from shared.gpu import GpuInventory, GpuSample
from shared.policy import PowerPolicy

TABLE = [918, 816, 714, 612, 510, 408, 306]


def jetson(capabilities: tuple[str, ...] = ("clock_limit", "power_mode")) -> GpuInventory:
    return GpuInventory(index=0, uuid="JETSON-1", name="Orin (nvgpu)", pci_bus_id="", memory_total_bytes=16 * 2**30,
                        driver_version="36.4.3", vendor="nvidia", backend="jetson",
                        supported_sm_clocks_mhz=TABLE, capabilities=list(capabilities))


def sample(temp: float, util: float = 80.0) -> GpuSample:
    return GpuSample(index=0, uuid="JETSON-1", ts=0.0, temperature_c=temp, utilization_pct=util)


def policy(**spec: Any) -> PowerPolicy:
    return PowerPolicy.model_validate({"name": "p", "version": 1, **spec})


class Gpu:
    """Runs the policy cycle by cycle, remembering the state and the clock cap asked."""

    def __init__(self, inventory: GpuInventory | None = None, spec: dict[str, Any] | None = None) -> None:
        self.inventory = inventory or jetson()
        self.policy = policy(**(spec or {}))
        self.state: dict[int, GpuPolicyState] = {}
        self.cap: int | None = None

    def at(self, now: float, temp: float, util: float = 80.0) -> list[tuple[str, str, float | None]]:
        actions, self.state = evaluate([sample(temp, util)], {0: self.inventory}, self.policy, self.state, now)
        for action in actions:
            assert action.kind in (ActionKind.LOCK_CLOCKS, ActionKind.RESET_CLOCKS), action
            self.cap = None if action.kind is ActionKind.RESET_CLOCKS else int(action.value or 0)
            assert "no power limit" in action.reason
        return [(a.kind.value, a.rule, a.value) for a in actions]


def test_a_hot_gpu_steps_its_clock_down_once_per_interval_and_restores_after_cooling() -> None:
    gpu = Gpu()
    assert gpu.at(0, 70) == []  # cool: nothing to cap
    assert gpu.at(1, 85) == [("lock_clocks", "thermal_step_down", 816.0)]  # 918 - 91.8 -> 816
    assert gpu.at(5, 86) == []  # within stepInterval: wait
    assert gpu.at(11, 86) == [("lock_clocks", "thermal_step_down", 714.0)]
    assert gpu.at(30, 80) == []  # the hysteresis band holds
    assert gpu.at(40, 70) == []  # cool, but not for coolDownPeriod yet
    assert gpu.at(165, 70) == [("lock_clocks", "thermal_restore", 816.0)]
    assert gpu.at(170, 70) == []  # restores are paced by stepInterval too
    assert gpu.at(176, 70) == [("reset_clocks", "thermal_restore", None)]  # the last step: no cap left
    assert gpu.cap is None and gpu.state[0].thermal_steps == 0


def test_critical_heat_goes_to_the_lowest_clock_at_once() -> None:
    gpu = Gpu()
    assert gpu.at(0, 95) == [("lock_clocks", "thermal_critical", 306.0)]
    assert gpu.at(1, 96) == []  # already at the floor
    assert gpu.cap == 306


def test_power_saving_caps_the_clock_while_idle_and_a_hot_gpu_never_rises() -> None:
    gpu = Gpu(spec={"powerSaving": {"enabled": True, "utilizationThreshold": 10, "capPercent": 50,
                                    "sustainPeriod": 60}})
    assert gpu.at(0, 50, util=2) == []
    assert gpu.at(61, 50, util=2) == [("lock_clocks", "power_saving", 408.0)]  # 50 % of 918 -> 408
    assert gpu.at(62, 50, util=90) == [("reset_clocks", "power_saving_exit", None)]
    gpu.at(70, 85, util=90)  # hot: a thermal step
    assert gpu.cap == 816
    gpu.state = {0: GpuPolicyState(**{**gpu.state[0].__dict__, "clocks_locked_mhz": 510})}
    assert gpu.at(71, 85, util=90) == []  # hot, and the cap in force (510) is lower: it stays
    assert gpu.cap == 816 and gpu.state[0].clocks_locked_mhz == 510


def test_a_device_that_cannot_cap_its_clock_gets_no_action() -> None:
    gpu = Gpu(inventory=jetson(capabilities=()))
    assert gpu.at(0, 95) == [] and gpu.at(20, 95) == []


def test_the_power_limit_path_is_unchanged_for_a_gpu_that_has_limits() -> None:
    nvml = jetson().model_copy(update={"power_limit_min_w": 10.0, "power_limit_max_w": 25.0,
                                       "power_limit_default_w": 25.0})
    actions, _ = evaluate([sample(85).model_copy(update={"power_limit_w": 25.0})], {0: nvml}, policy(), {}, 0)
    assert [a.kind for a in actions] == [ActionKind.SET_POWER_LIMIT]
