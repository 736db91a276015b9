"""The power policy on a device without a power limit, acting through the GPU's maximum clock: a
pure function beside edge/policy.py, which calls it for such a GPU.

A Jetson (edge/devices/jetson/) has no GPU power cap, but its devfreq maximum frequency caps the
GPU's clock, and with it its power and heat. Here the clock cap in force is
`GpuPolicyState.clocks_locked_mhz` (None: the device's whole range) and `thermal_steps` counts
the thermal steps taken down the supported clock table. Nothing happens unless the inventory lists
supported SM clocks and the device has the `clock_limit` capability.

Rules, per GPU:

* A lost sample, or one without a temperature, changes nothing.
* One step is `stepPercent` % of the top clock (at least one entry of the table); the cap of n
  steps is the highest supported clock at or below `top - n x step`, never below the lowest.
* Thermal throttling (when enabled), on the temperature `t`:
  - `t >= criticalTempC`: the lowest supported clock at once (`thermal_critical`);
  - `maxTempC <= t`: one step further down, at most once per `stepInterval` (`thermal_step_down`);
  - `maxTempC - hysteresisC <= t < maxTempC`: hold; the cool-down clock is stopped;
  - below that for `coolDownPeriod`: one step back up every `stepInterval` (`thermal_restore`).
  - Thermal disabled: its steps are dropped.
* Power saving (when enabled): sustained low utilisation caps the clock at `capPercent` % of the
  top clock (`power_saving`); the first busy sample that is not hot removes it
  (`power_saving_exit`), as with the power limit (edge/policy_state.py `next_saving`).
* The cap asked is the lower of the two; `LOCK_CLOCKS` (the lowest clock up to the cap) when it
  changes, `RESET_CLOCKS` once neither constrains the clock any more.

`powerCapWatts` has no clock equivalent: the edge cycle asks the backend for it once per policy
version (edge/cycle.py) and the backend's refusal is recorded as advisory with its reason.
"""

import math
from dataclasses import replace

from edge.actions import Action, ActionKind
from edge.policy_state import (
    RULE_POLICY_CHANGE,
    RULE_THERMAL_CRITICAL,
    RULE_THERMAL_RESTORE,
    RULE_THERMAL_STEP_DOWN,
    GpuPolicyState,
    next_saving,
)
from shared.gpu import GpuInventory, GpuSample
from shared.policy import PowerPolicy

CLOCK_LIMIT = "clock_limit"  # edge/devices/base.py Capability.CLOCK_LIMIT (shared/ cannot import edge/)


def _table(inventory: GpuInventory | None) -> list[int]:
    """The supported SM clocks, highest first; empty when the clocks cannot be capped."""
    if inventory is None or CLOCK_LIMIT not in inventory.capabilities:
        return []
    return sorted(set(inventory.supported_sm_clocks_mhz), reverse=True)


def _at_or_below(table: list[int], mhz: float) -> int:
    """The highest supported clock at or below `mhz`, never below the lowest."""
    return next((clock for clock in table if clock <= mhz + 1e-9), table[-1])


def _step_cap(table: list[int], steps: int, step_mhz: float) -> int:
    return _at_or_below(table, table[0] - steps * step_mhz)


def _max_steps(table: list[int], step_mhz: float) -> int:
    return max(0, math.ceil((table[0] - table[-1]) / step_mhz))


def _thermal_steps(sample: GpuSample, policy: PowerPolicy, prev: GpuPolicyState, table: list[int],
                   step_mhz: float, now: float) -> tuple[int, float | None, float | None, str | None]:
    """(steps, last change, cool since, the thermal rule that acted or None)."""
    tt = policy.thermal_throttling
    if not tt.enabled:
        return 0, prev.last_thermal_change_at, None, None
    t = sample.temperature_c
    assert t is not None
    top = _max_steps(table, step_mhz)
    steps, last, cool_since = min(prev.thermal_steps, top), prev.last_thermal_change_at, prev.cool_since
    due = last is None or now - last >= tt.step_interval
    if t >= tt.critical_temp_c:
        return (top, now, None, RULE_THERMAL_CRITICAL) if steps < top else (steps, last, None, None)
    if t >= tt.max_temp_c:
        if due and steps < top:
            return steps + 1, now, None, RULE_THERMAL_STEP_DOWN
        return steps, last, None, None
    if t >= tt.max_temp_c - tt.hysteresis_c:
        return steps, last, None, None
    cool_since = cool_since if cool_since is not None else now
    if steps > 0 and due and now - cool_since >= tt.cool_down_period:
        return steps - 1, now, cool_since, RULE_THERMAL_RESTORE
    return steps, last, cool_since, None


def evaluate_by_clocks(sample: GpuSample, inventory: GpuInventory | None, policy: PowerPolicy,
                       prev: GpuPolicyState, now: float) -> tuple[list[Action], GpuPolicyState]:
    """One GPU's clock actions and next state (see the module docstring)."""
    table = _table(inventory)
    if sample.lost or sample.temperature_c is None or not table:
        return [], prev
    tt = policy.thermal_throttling
    step_mhz = max(table[0] * tt.step_percent / 100, 1.0)
    hot = tt.enabled and sample.temperature_c >= tt.max_temp_c
    saving = next_saving(prev, sample.utilization_pct, policy.power_saving, hot, now)
    steps, last_change, cool_since, thermal_event = _thermal_steps(sample, policy, prev, table, step_mhz, now)

    caps: dict[str, int] = {}
    if steps > 0:
        caps["thermal"] = _step_cap(table, steps, step_mhz)
    if saving.active:
        caps["power_saving"] = _at_or_below(table, table[0] * policy.power_saving.cap_percent / 100)
    cap = min(caps.values()) if caps else None
    if hot and cap is not None and prev.clocks_locked_mhz is not None and cap > prev.clocks_locked_mhz:
        cap = prev.clocks_locked_mhz  # a hot GPU's clock never rises, whatever else changed
    state = replace(prev, thermal_steps=steps, last_thermal_change_at=last_change, cool_since=cool_since,
                    low_util_since=saving.low_util_since, saving_active=saving.active, clocks_locked_mhz=cap)
    if cap == prev.clocks_locked_mhz:
        return [], state

    rule = thermal_event or saving.event or RULE_POLICY_CHANGE  # policy_change: a new policy moved it
    inputs = {"temperature_c": sample.temperature_c, "utilization_pct": sample.utilization_pct,
              "thermal_steps": steps, "saving_active": saving.active, "max_temp_c": tt.max_temp_c,
              "critical_temp_c": tt.critical_temp_c, "top_clock_mhz": table[0], "step_mhz": round(step_mhz, 1)}
    where = f"GPU {sample.index} at {sample.temperature_c:.1f} °C, {_utilization(sample)}"
    if cap is None:
        reason = f"{where}: no thermal step or power saving left; SM clock cap removed (no power limit on this device)"
        kind, value = ActionKind.RESET_CLOCKS, None
    else:
        why = {"thermal": f"{steps} thermal step(s) of {step_mhz:.0f} MHz",
               "power_saving": f"power saving ({policy.power_saving.cap_percent:g} % of {table[0]} MHz)"}
        binding = [why[name] for name, mhz in caps.items() if mhz == cap]
        reason = (f"{where}: SM clock capped at {cap} MHz for {' and '.join(binding)} "
                  f"(the device has no power limit; its clock is the knob)")
        kind, value = ActionKind.LOCK_CLOCKS, float(cap)
    return [Action(kind=kind, gpu_index=sample.index, gpu_uuid=sample.uuid, rule=rule, reason=reason,
                   value=value, inputs=inputs)], state


def _utilization(sample: GpuSample) -> str:
    return "utilisation unknown" if sample.utilization_pct is None else f"utilisation {sample.utilization_pct:.0f} %"
