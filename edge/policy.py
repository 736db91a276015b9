"""The edge's local power policy (Kepler-style), as one pure function.

`evaluate(samples, inventory, policy, state, now)` looks at the latest sample of each GPU and
returns the driver actions to take plus the next per-GPU state. It does no I/O and reads no
clock: time is `now` (unix seconds), so the same inputs always give the same decision and the
rules can be tested exhaustively.

Rules, per GPU:

* A lost sample, or one without a temperature, changes nothing (its state is kept). A GPU whose
  inventory lacks the default, minimum or maximum power limit has no limit to act on: the same
  rules act on its maximum clock instead where the device can cap it (edge/clock_policy.py, a
  Jetson), else nothing is done.
* One thermal step is `default * stepPercent / 100` watts.
* Thermal throttling (when enabled), on the temperature `t`:
  - `t >= criticalTempC`: go to the minimum power limit at once (`thermal_critical`), without
    waiting for `stepInterval`. Already at the minimum: lock the SM clock at once.
  - `maxTempC <= t < criticalTempC`: at most once per `stepInterval` (since any thermal change),
    step down (`thermal_step_down`) in proportion to the excess: one step per
    `0.5 °C x stepPercent` above the middle of the hold band (`maxTempC - hysteresisC / 2`), at
    least one. A step always bites: if the thermal limit does not bind yet (power saving or
    powerCapWatts is lower, or, once stepping, the GPU draws clearly less), the step count
    jumps to the first one that lowers the limit in force, so a hot GPU is never left waiting
    on steps that change nothing.
    Already at the minimum and still hot: lock the SM clock to a supported clock around the
    middle of the supported list (`LOCK_CLOCKS`, asked once, not repeated while locked).
  - Waiting for the response: within `coolDownPeriod` (at least `stepInterval`) of the last
    thermal change, a further step down comes only if the temperature rose above what it was
    at that change (the limit in force cannot hold it) or the GPU draws clearly less than the
    limit (the step bit nothing). A step that is working is given time to show.
  - `maxTempC - hysteresisC <= t < maxTempC`: hold; the cool-down clock is stopped.
  - `t < maxTempC - hysteresisC`: the cool-down clock runs (`cool_since`). The first restore
    comes only after `coolDownPeriod` of continuous cool, further ones every `stepInterval` while
    still cool. A restore first unlocks the clock (`RESET_CLOCKS`), then removes one step at a
    time (`thermal_restore`). A step that no longer binds is removed silently, at the same pace.
  - Settling, while the limit binds (the GPU draws about the limit): a restore comes only if
    `t + 1 + 0.5 °C x stepPercent x (1 + restores not yet shown)` stays below maxTempC (whole
    degrees; the heat of this restore and of those within the last coolDownPeriod). And the
    lowest limit at which a step down was taken is remembered as too hot: no restore goes back
    up to it (nor unlocks the clock taken at the minimum) while going there would, by the same
    estimate, end at or above maxTempC - hysteresisC. The memory ends after
    max(600 s, 10 x coolDownPeriod), or as soon as the limit no longer binds (the load fell).
    So a GPU under constant heat steps down, overshoots at most once, and holds just under
    maxTempC instead of restoring into heat.
  - While `t >= maxTempC` the limit never rises, whatever else changed (power saving ending, a
    new policy): it holds until a step is due, which then goes below the held limit.
  - Thermal disabled: steps are dropped and a locked clock is reset (`policy_change`).
  - Steps never exceed the number that brings the limit to the minimum.
* Power saving (when enabled): utilisation below `utilizationThreshold` continuously for
  `sustainPeriod` lowers the limit to `default * capPercent / 100` (`power_saving`);
  utilisation at or above the threshold leaves saving at once (`power_saving_exit`,
  performance first), unless the GPU is at or above maxTempC: then the exit waits until it is
  not (a hot GPU's limit never rises). An unknown utilisation keeps the saving state as is.
* `powerCapWatts` is an absolute ceiling (`power_cap`).
* target = min(default - steps * step, saving limit if active, powerCapWatts), clamped to the
  [min, max] constraints and rounded to whole watts.
* One `SET_POWER_LIMIT` is asked when the target differs from the last limit we asked for, or,
  before we ever asked, from the limit the driver reports as enforced. Its rule says what moved
  the limit: a rise is `thermal_restore` (only when a removed step raised it),
  `power_saving_exit` or `policy_change` (a new policy, or one held while hot); a fall is named
  after the constraint that now binds (`thermal_step_down`, `thermal_critical`, `power_saving`,
  `power_cap`, or `policy_change` when the binding constraint did not change this cycle, e.g. a
  new policy with a larger step).

If the driver refuses a limit, the caller may set `target_limit_w` back to None in the state:
the next cycle then compares with the enforced limit again and asks once more.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from edge.actions import Action, ActionKind
from edge.clock_policy import evaluate_by_clocks
from edge.policy_state import (
    RULE_POLICY_CHANGE,
    RULE_POWER_CAP,
    RULE_POWER_SAVING,
    RULE_POWER_SAVING_EXIT,
    RULE_THERMAL_CRITICAL,
    RULE_THERMAL_RESTORE,
    RULE_THERMAL_STEP_DOWN,
    GpuPolicyState,
    initial_state,
    next_saving,
)
from shared.gpu import GpuInventory, GpuSample
from shared.policy import PowerPolicy, ThermalThrottling

__all__ = ["GpuPolicyState", "evaluate", "initial_state"]

ASSUMED_C_PER_STEP_PERCENT = 0.5  # °C one step of 1 % of the default limit is assumed to make
READING_RESOLUTION_C = 1.0  # NVML reports whole degrees: the GPU may be up to this much warmer
HOT_LIMIT_MEMORY_S = 600.0  # a limit found too hot is not restored to for this long (at least)

@dataclass(frozen=True)
class _Limits:
    """A GPU's power-limit constraints; `fit` turns any wattage into one the driver accepts."""

    minimum: float
    maximum: float
    default: float

    @property
    def lowest(self) -> float:
        """The lowest limit `fit` can give: the minimum, in whole watts."""
        return self.fit(-math.inf)

    def fit(self, watts: float) -> float:
        low, high = math.ceil(self.minimum), math.floor(self.maximum)
        if low > high:  # constraints narrower than one watt: only the minimum is safe
            return float(self.minimum)
        if watts == -math.inf:
            return float(low)
        return float(min(max(math.floor(watts + 0.5), low), high))


def _limits_of(inventory: GpuInventory | None) -> _Limits | None:
    """None when the inventory lacks a constraint we need to compute a limit."""
    if inventory is None:
        return None
    minimum = inventory.power_limit_min_w
    maximum = inventory.power_limit_max_w
    default = inventory.power_limit_default_w
    if minimum is None or maximum is None or default is None or default <= 0:
        return None
    return _Limits(minimum=minimum, maximum=maximum, default=default)


def _steps_to_go_below(ceiling_w: float, default_w: float, step_w: float) -> int:
    """Fewest thermal steps whose limit, rounded to whole watts, is below `ceiling_w`."""
    bound = math.ceil(ceiling_w) - 0.5  # round(x) < ceiling  <=>  x < ceil(ceiling) - 0.5
    steps = max(0, math.floor((default_w - bound) / step_w) + 1)
    while steps > 0 and default_w - (steps - 1) * step_w < bound:  # float error, one way
        steps -= 1
    while default_w - steps * step_w >= bound:  # or the other
        steps += 1
    return steps


def _middle_clock(inventory: GpuInventory | None) -> int | None:
    """A supported SM clock around the middle of the list: slow enough to cool, still useful."""
    if inventory is None or not inventory.supported_sm_clocks_mhz:
        return None
    clocks = sorted(set(inventory.supported_sm_clocks_mhz), reverse=True)
    return clocks[len(clocks) // 2]


@dataclass(frozen=True)
class _Thermal:
    steps: int
    clocks_locked_mhz: int | None
    last_change_at: float | None
    cool_since: float | None
    event: str | None  # the thermal rule that acted this cycle, if any
    clock_action: Action | None
    change_temp_c: float | None = None
    hot_limit_w: float | None = None
    hot_limit_at: float | None = None
    unsettled_restores: int = 0


@dataclass(frozen=True)
class _Context:
    """Everything one GPU's decision looks at, so the rules and the reasons read the same data."""

    sample: GpuSample
    inventory: GpuInventory | None
    policy: PowerPolicy
    limits: _Limits
    step_w: float
    max_steps: int
    other_limits: dict[str, float]  # "default", "power_saving", "power_cap": watts before fitting
    reference_w: float | None  # the limit in force as far as we know
    now: float

    @property
    def temperature(self) -> float:
        assert self.sample.temperature_c is not None
        return self.sample.temperature_c

    def target_for(self, steps: int) -> float:
        thermal = self.limits.default - steps * self.step_w
        return self.limits.fit(min(thermal, *self.other_limits.values()))

    def inputs(self, steps: int) -> dict[str, Any]:
        return {
            "temperature_c": self.sample.temperature_c,
            "utilization_pct": self.sample.utilization_pct,
            "enforced_limit_w": self.sample.power_limit_w,
            "previous_limit_w": self.reference_w,
            "thermal_steps": steps,
            "step_w": self.step_w,
            "saving_active": "power_saving" in self.other_limits,
            "power_cap_w": self.policy.power_cap_watts,
            "min_w": self.limits.minimum,
            "max_w": self.limits.maximum,
            "default_w": self.limits.default,
            "policy_name": self.policy.name,
            "policy_version": self.policy.version,
        }


def _clock_action(ctx: _Context, kind: ActionKind, rule: str, reason: str, steps: int,
                  value: float | None = None) -> Action:
    return Action(kind=kind, gpu_index=ctx.sample.index, gpu_uuid=ctx.sample.uuid, rule=rule,
                  reason=reason, value=value, inputs=ctx.inputs(steps))


def _lock_clocks(ctx: _Context, rule: str, threshold_name: str, threshold: float,
                 steps: int) -> tuple[int, Action] | None:
    """Lock the SM clock once the power limit cannot go lower; None if no clock is known."""
    clock = _middle_clock(ctx.inventory)
    if clock is None:
        return None
    reason = (f"GPU {ctx.sample.index} at {ctx.temperature:.1f} °C >= {threshold_name} "
              f"{threshold:.1f} with the power limit already at its minimum "
              f"{ctx.limits.lowest:.0f} W: SM clock locked to at most {clock} MHz")
    return clock, _clock_action(ctx, ActionKind.LOCK_CLOCKS, rule, reason, steps, float(clock))


def _response_wait(tt: ThermalThrottling) -> float:
    """How long a thermal change takes to show in the temperature, as far as the policy knows:
    the cool-down period (the operator's figure for the board's thermal lag), at least one
    stepInterval."""
    return max(tt.step_interval, tt.cool_down_period)


def _c_per_step(tt: ThermalThrottling) -> float:
    """The temperature change one step is assumed to make at full load: a little more than a
    data-centre board's (about 40 °C over the inlet at its default limit, 0.4 °C per %), so that
    a proportional step down errs on the small side and a restore on the cautious one."""
    return ASSUMED_C_PER_STEP_PERCENT * tt.step_percent


def _limit_binds(ctx: _Context) -> bool:
    """False when the GPU draws clearly less than the limit in force: the heat then comes from
    the load, not the limit, and raising the limit adds none (unknown draw: assume it binds)."""
    if ctx.sample.power_w is None or ctx.reference_w is None:
        return True
    return ctx.sample.power_w >= ctx.reference_w - ctx.step_w / 2


def _remembered_hot_limit(ctx: _Context, prev: GpuPolicyState, tt: ThermalThrottling,
                          unsettled: int) -> float | None:
    """The hot limit still worth respecting: None once it is old, once the limit no longer
    binds (the load fell), or once the GPU is so cool that even going back up to it would stay
    below maxTempC - hysteresisC (the cabinet cooled down). A locked clock, not the limit, holds
    the draw down: unlocking it counts as the steps from the draw up to the limit (at least one)."""
    if prev.hot_limit_w is None or prev.hot_limit_at is None:
        return None
    if ctx.now - prev.hot_limit_at >= max(HOT_LIMIT_MEMORY_S, 10 * tt.cool_down_period):
        return None
    locked = prev.clocks_locked_mhz is not None
    if not locked and not _limit_binds(ctx):
        return None
    current = ctx.target_for(min(prev.thermal_steps, ctx.max_steps))
    steps_to_hot = max(0.0, (prev.hot_limit_w - current) / ctx.step_w)
    if locked:  # unlocking lets the draw rise back to the limit
        below = 0.0 if ctx.sample.power_w is None else current - ctx.sample.power_w
        steps_to_hot += max(1.0, below / ctx.step_w)
    predicted = ctx.temperature + _c_per_step(tt) * (steps_to_hot + unsettled)
    return prev.hot_limit_w if predicted >= tt.max_temp_c - tt.hysteresis_c else None


def _next_thermal(ctx: _Context, prev: GpuPolicyState, tt: ThermalThrottling) -> _Thermal:
    """Apply the thermal rules: step down when hot (in proportion, waiting for the response),
    hold in the band, restore after cool-down (paced, never back up to a remembered hot limit)."""
    if not tt.enabled:
        action = None
        if prev.clocks_locked_mhz is not None:
            action = _clock_action(
                ctx, ActionKind.RESET_CLOCKS, RULE_POLICY_CHANGE,
                f"thermal throttling is disabled by policy {ctx.policy.name!r} "
                f"v{ctx.policy.version}: SM clock lock removed", 0)
        return _Thermal(steps=0, clocks_locked_mhz=None, last_change_at=prev.last_thermal_change_at,
                        cool_since=None, event=None, clock_action=action)

    now, temperature = ctx.now, ctx.temperature
    steps = min(prev.thermal_steps, ctx.max_steps)
    clocks = prev.clocks_locked_mhz
    last_change = prev.last_thermal_change_at
    interval_passed = last_change is None or now - last_change >= tt.step_interval
    settled = last_change is None or now - last_change >= _response_wait(tt)
    unsettled = 0 if settled else prev.unsettled_restores
    in_force = ctx.target_for(steps)
    if ctx.reference_w is not None:
        in_force = min(in_force, ctx.reference_w)

    def held(cool_since: float | None = None) -> _Thermal:
        return _Thermal(steps=steps, clocks_locked_mhz=clocks, last_change_at=last_change,
                        cool_since=cool_since, event=None, clock_action=None,
                        change_temp_c=prev.change_temp_c, hot_limit_w=prev.hot_limit_w,
                        hot_limit_at=prev.hot_limit_at, unsettled_restores=unsettled)

    def cooled(rule: str, new_steps: int, new_clocks: int | None,
               clock_action: Action | None = None) -> _Thermal:
        """A change down: the limit in force was too hot; remember it."""
        hot = in_force if prev.hot_limit_w is None else min(prev.hot_limit_w, in_force)
        return _Thermal(steps=new_steps, clocks_locked_mhz=new_clocks, last_change_at=now,
                        cool_since=None, event=rule, clock_action=clock_action,
                        change_temp_c=temperature, hot_limit_w=hot, hot_limit_at=now)

    if temperature >= tt.critical_temp_c:  # no waiting for stepInterval
        if ctx.target_for(steps) > ctx.limits.lowest:
            return cooled(RULE_THERMAL_CRITICAL, ctx.max_steps, clocks)
        if clocks is None and (locked := _lock_clocks(
                ctx, RULE_THERMAL_CRITICAL, "criticalTempC", tt.critical_temp_c, steps)):
            return cooled(RULE_THERMAL_CRITICAL, steps, locked[0], locked[1])
        return held()

    if temperature >= tt.max_temp_c:
        # Until the last change has had time to show, step again only if the temperature still
        # rises past where it was then (the limit in force cannot hold it, whatever the lag), or
        # if the GPU draws clearly less than the limit (the step did not bite: nothing to wait for).
        rising = prev.change_temp_c is None or temperature > prev.change_temp_c
        if not interval_passed or not (settled or rising or not _limit_binds(ctx)):
            return held()
        if steps > 0 and not _limit_binds(ctx):
            # Already stepped and still drawing clearly less than the limit (a load change is
            # over by now): steps above the draw would bite nothing, so step from the draw.
            assert ctx.sample.power_w is not None
            in_force = max(min(in_force, ctx.sample.power_w), ctx.limits.lowest)
        if in_force > ctx.limits.lowest:
            goal = tt.max_temp_c - tt.hysteresis_c / 2  # the middle of the hold band
            proportional = max(1, math.floor((temperature - goal) / _c_per_step(tt)))
            biting = _steps_to_go_below(in_force, ctx.limits.default, ctx.step_w)
            new_steps = max(steps + proportional, biting + proportional - 1)
            return cooled(RULE_THERMAL_STEP_DOWN, min(new_steps, ctx.max_steps), clocks)
        if clocks is None and (locked := _lock_clocks(
                ctx, RULE_THERMAL_STEP_DOWN, "maxTempC", tt.max_temp_c, steps)):
            return cooled(RULE_THERMAL_STEP_DOWN, steps, locked[0], locked[1])
        return held()

    if temperature >= tt.max_temp_c - tt.hysteresis_c:  # the hysteresis band: hold
        return held()

    cool_since = prev.cool_since if prev.cool_since is not None else now
    cooled_long_enough = now - cool_since >= tt.cool_down_period
    if (steps == 0 and clocks is None) or not cooled_long_enough or not interval_passed:
        return held(cool_since)
    binds = _limit_binds(ctx)
    if binds and (temperature + READING_RESOLUTION_C + _c_per_step(tt) * (unsettled + 1)
                  >= tt.max_temp_c):
        # A restore only while the heat of this one, and of those not yet shown, still fits
        # below maxTempC: a restore never heads back into a step down.
        return held(cool_since)
    hot_limit = _remembered_hot_limit(ctx, prev, tt, unsettled)

    def restored(new_steps: int, clock_action: Action | None = None) -> _Thermal:
        return _Thermal(steps=new_steps, clocks_locked_mhz=None, last_change_at=now,
                        cool_since=cool_since, event=RULE_THERMAL_RESTORE,
                        clock_action=clock_action, change_temp_c=temperature,
                        hot_limit_w=hot_limit,
                        hot_limit_at=None if hot_limit is None else prev.hot_limit_at,
                        unsettled_restores=unsettled + 1 if binds else 0)

    if clocks is not None:  # unlock the clock first, then give back steps
        if hot_limit is not None:
            return held(cool_since)  # the limit alone was too hot: keep the clock locked
        reason = (f"GPU {ctx.sample.index} at {temperature:.1f} °C, below "
                  f"{tt.max_temp_c - tt.hysteresis_c:.1f} °C (maxTempC {tt.max_temp_c:.1f} - "
                  f"hysteresis {tt.hysteresis_c:.1f}) for {now - cool_since:.0f} s: "
                  f"SM clock lock at {clocks} MHz removed")
        action = _clock_action(ctx, ActionKind.RESET_CLOCKS, RULE_THERMAL_RESTORE, reason, steps)
        return restored(steps, action)
    if hot_limit is not None and ctx.target_for(steps - 1) >= hot_limit - 0.5:
        return held(cool_since)  # one step up would be the limit that was too hot: stay
    return restored(steps - 1)


def _binding_rule(ctx: _Context, steps: int, thermal_event: str | None,
                  saving_event: str | None) -> str:
    """Name a fall of the limit after the constraint that now binds it."""
    terms = dict(ctx.other_limits)
    if steps > 0:
        terms["thermal"] = ctx.limits.default - steps * ctx.step_w
    lowest = min(terms.values())
    binding = {name for name, watts in terms.items() if watts == lowest}
    if "thermal" in binding and thermal_event in (RULE_THERMAL_STEP_DOWN, RULE_THERMAL_CRITICAL):
        return thermal_event
    if "power_saving" in binding and saving_event == RULE_POWER_SAVING:
        return RULE_POWER_SAVING
    if "power_cap" in binding:
        return RULE_POWER_CAP
    return RULE_POLICY_CHANGE


def _limit_reason(ctx: _Context, rule: str, old: float | None, new: float, steps: int,
                  prev: GpuPolicyState) -> str:
    """A sentence for a person, with the figures that moved the limit."""
    gpu = f"GPU {ctx.sample.index}"
    tt = ctx.policy.thermal_throttling
    saving = ctx.policy.power_saving
    change = f"power limit {'unknown' if old is None else f'{old:.0f} W'} -> {new:.0f} W"
    if rule == RULE_THERMAL_STEP_DOWN:
        return (f"{gpu} at {ctx.temperature:.1f} °C >= maxTempC {tt.max_temp_c:.1f}: "
                f"{change} (step {steps})")
    if rule == RULE_THERMAL_CRITICAL:
        return (f"{gpu} at {ctx.temperature:.1f} °C >= criticalTempC {tt.critical_temp_c:.1f}: "
                f"{change}, the minimum, at once")
    if rule == RULE_THERMAL_RESTORE:
        cool_for = ctx.now - prev.cool_since if prev.cool_since is not None else 0.0
        return (f"{gpu} at {ctx.temperature:.1f} °C, below {tt.max_temp_c - tt.hysteresis_c:.1f}"
                f" °C (maxTempC {tt.max_temp_c:.1f} - hysteresis {tt.hysteresis_c:.1f}) for "
                f"{cool_for:.0f} s: {change} ({steps} step{'s' if steps != 1 else ''} left)")
    if rule == RULE_POWER_SAVING:
        low_for = ctx.now - prev.low_util_since if prev.low_util_since is not None else 0.0
        return (f"{gpu} utilisation {ctx.sample.utilization_pct:.1f} % below "
                f"{saving.utilization_threshold:.1f} % for {low_for:.0f} s "
                f"(sustainPeriod {saving.sustain_period:.0f} s): {change} "
                f"({saving.cap_percent:.0f} % of the default {ctx.limits.default:.0f} W)")
    if rule == RULE_POWER_SAVING_EXIT:
        return (f"{gpu} utilisation {ctx.sample.utilization_pct:.1f} % >= "
                f"{saving.utilization_threshold:.1f} %: leaving power saving, {change}")
    if rule == RULE_POWER_CAP:
        return (f"{gpu}: powerCapWatts {ctx.policy.power_cap_watts:.0f} W of policy "
                f"{ctx.policy.name!r} v{ctx.policy.version}: {change}")
    return (f"{gpu}: policy {ctx.policy.name!r} v{ctx.policy.version} (default "
            f"{ctx.limits.default:.0f} W, {steps} thermal step{'s' if steps != 1 else ''}"
            f"{', power saving' if 'power_saving' in ctx.other_limits else ''}"
            f"{f', cap {ctx.policy.power_cap_watts:.0f} W' if ctx.policy.power_cap_watts else ''}"
            f"): {change}")


def _differs(a: float, b: float) -> bool:
    """Driver limits are milliwatts; half a watt apart is the same whole-watt limit."""
    return abs(a - b) >= 0.5


def _evaluate_gpu(sample: GpuSample, inventory: GpuInventory | None, policy: PowerPolicy,
                  prev: GpuPolicyState, now: float) -> tuple[list[Action], GpuPolicyState]:
    if sample.lost or sample.temperature_c is None:
        return [], prev
    limits = _limits_of(inventory)
    if limits is None:  # no power limit to act on (a Jetson): the clocks, where the device has them
        return evaluate_by_clocks(sample, inventory, policy, prev, now)

    tt = policy.thermal_throttling
    step_w = limits.default * tt.step_percent / 100
    hot = tt.enabled and sample.temperature_c >= tt.max_temp_c
    saving = next_saving(prev, sample.utilization_pct, policy.power_saving, hot, now)
    other_limits = {"default": limits.default}
    if saving.active:
        other_limits["power_saving"] = limits.default * policy.power_saving.cap_percent / 100
    if policy.power_cap_watts is not None:
        other_limits["power_cap"] = policy.power_cap_watts
    reference = prev.target_limit_w if prev.target_limit_w is not None else sample.power_limit_w
    ctx = _Context(
        sample=sample, inventory=inventory, policy=policy, limits=limits, step_w=step_w,
        max_steps=_steps_to_go_below(limits.lowest + 1, limits.default, step_w),
        other_limits=other_limits, reference_w=reference, now=now)

    thermal = _next_thermal(ctx, prev, tt)
    actions = [thermal.clock_action] if thermal.clock_action is not None else []
    target = ctx.target_for(thermal.steps)
    if hot and reference is not None and target > reference:
        target = reference  # a hot GPU's limit never rises, whatever else changed
    next_state = GpuPolicyState(
        thermal_steps=thermal.steps, clocks_locked_mhz=thermal.clocks_locked_mhz,
        last_thermal_change_at=thermal.last_change_at, cool_since=thermal.cool_since,
        low_util_since=saving.low_util_since, saving_active=saving.active,
        target_limit_w=prev.target_limit_w, change_temp_c=thermal.change_temp_c,
        hot_limit_w=thermal.hot_limit_w, hot_limit_at=thermal.hot_limit_at,
        unsettled_restores=thermal.unsettled_restores)

    if reference is not None and not _differs(target, reference):
        return actions, next_state
    if reference is not None and target > reference:
        steps_before = min(prev.thermal_steps, ctx.max_steps) if tt.enabled else 0
        if thermal.event == RULE_THERMAL_RESTORE and ctx.target_for(steps_before) < target:
            rule = RULE_THERMAL_RESTORE
        elif saving.event == RULE_POWER_SAVING_EXIT:
            rule = RULE_POWER_SAVING_EXIT
        else:
            rule = RULE_POLICY_CHANGE
    else:
        rule = _binding_rule(ctx, thermal.steps, thermal.event, saving.event)
    actions.append(Action(
        kind=ActionKind.SET_POWER_LIMIT, gpu_index=sample.index, gpu_uuid=sample.uuid, rule=rule,
        reason=_limit_reason(ctx, rule, reference, target, thermal.steps, prev), value=target,
        inputs=ctx.inputs(thermal.steps)))
    return actions, replace(next_state, target_limit_w=target)


def evaluate(samples: Sequence[GpuSample], inventory: Mapping[int, GpuInventory],
             policy: PowerPolicy, state: Mapping[int, GpuPolicyState],
             now: float) -> tuple[list[Action], dict[int, GpuPolicyState]]:
    """Decide this cycle's driver actions; GPUs without a sample keep their state."""
    next_state = dict(state)
    actions: list[Action] = []
    for sample in samples:
        prev = next_state.get(sample.index, GpuPolicyState())
        gpu_actions, gpu_state = _evaluate_gpu(
            sample, inventory.get(sample.index), policy, prev, now)
        actions.extend(gpu_actions)
        if gpu_state is not prev:
            next_state[sample.index] = gpu_state
    return actions, next_state
