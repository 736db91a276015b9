"""Thermal control settles: the pure policy (`edge.policy.evaluate`) against the simulated GPU's
physics, in simulated time (the driver is kgpu/lab/thermal.py, which bench/thermal_settling.py
uses too)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.sim.physics import SimFault
from kgpu.lab.thermal import DEMO_THERMAL, EIGHT_MINUTES, QUIET_TAIL, start


@pytest.mark.parametrize("start_c", [None, 86.0], ids=["from an idle board", "from 86 °C (demo)"])
@pytest.mark.parametrize("model", ["H100", "A100"])
def test_full_load_in_a_hot_cabinet_settles_just_under_max(model: str, start_c: float | None) -> None:
    run = start(model, DEMO_THERMAL, ambient_c=55, load_pct=100, temperature_c=start_c).until(
        EIGHT_MINUTES)
    story = run.story()
    assert run.thermal(), f"a GPU at 100 % in a 55 °C cabinet must be throttled\n{story}"
    assert run.restores() <= 1, f"more than one overshoot corrected\n{story}"
    assert run.turns() <= 1, f"down, up and down again\n{story}"
    assert not run.thermal(since=EIGHT_MINUTES - QUIET_TAIL), f"not settled\n{story}"
    assert 80 - 5 - 3 <= run.gpu.temperature_c < 80, f"{run.gpu.temperature_c:.1f} °C\n{story}"
    assert run.gpu.power_limit_w > run.gpu.profile.power_min_w, f"pinned to the floor\n{story}"
    assert run.gpu.locked_clocks is None, story


@pytest.mark.parametrize("change", [
    SimFault(utilization=30),  # the job ends, a light one remains
    SimFault(ambient_c=30),  # the cabinet's cooling comes back, still at full load
], ids=["load drops", "cabinet cools"])
def test_when_the_heat_goes_the_default_limit_comes_back(change: SimFault) -> None:
    run = start("H100", DEMO_THERMAL, ambient_c=55, load_pct=100).until(240)
    throttled = run.gpu.power_limit_w
    assert throttled < 700, run.story()
    run.gpu.apply(change)
    run.until(240 + EIGHT_MINUTES)
    after = run.thermal(since=241)
    assert run.gpu.power_limit_w == 700, run.story()
    assert after and all(d.rule == "thermal_restore" for d in after), run.story()
    assert run.gpu.temperature_c < 80


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=st.sampled_from(["H100", "A100"]),
       ambient_c=st.floats(25, 55), load_pct=st.floats(0, 100),
       max_temp_c=st.floats(75, 85), hysteresis_c=st.floats(3, 8),
       critical_margin_c=st.floats(7, 15), step_percent=st.sampled_from([5, 10, 15, 20]),
       step_interval=st.sampled_from([1, 5, 10]), cool_down=st.sampled_from([60, 90, 120]),
       interval=st.sampled_from([1.0, 5.0]))
def test_constant_load_converges_with_at_most_one_overshoot(
        model: str, ambient_c: float, load_pct: float, max_temp_c: float, hysteresis_c: float,
        critical_margin_c: float, step_percent: int, step_interval: int, cool_down: int,
        interval: float) -> None:
    thermal = {"maxTempC": max_temp_c, "criticalTempC": max_temp_c + critical_margin_c,
               "hysteresisC": hysteresis_c, "stepPercent": step_percent,
               "stepInterval": step_interval, "coolDownPeriod": cool_down}
    run = start(model, thermal, ambient_c, load_pct, interval=interval).until(EIGHT_MINUTES)
    story = run.story()
    assert run.seconds_above_critical <= 60, f"above criticalTempC too long\n{story}"
    assert run.turns() <= 1, f"down, up and down again\n{story}"
    assert not run.thermal(since=EIGHT_MINUTES * 2 / 3), f"not settled\n{story}"
    at_floor = run.gpu.power_limit_w <= run.gpu.profile.power_min_w
    assert run.gpu.temperature_c < max_temp_c + 1 or at_floor, f"settled hot\n{story}"
