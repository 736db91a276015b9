"""What the power policy (edge/policy.py, edge/clock_policy.py) remembers per GPU between cycles,
the names of its rules, and power saving's entry and exit, shared by both ways of acting (the
power limit, or the clocks on a device without one)."""

from dataclasses import dataclass

from shared.policy import PowerSaving

RULE_THERMAL_STEP_DOWN = "thermal_step_down"
RULE_THERMAL_CRITICAL = "thermal_critical"
RULE_THERMAL_RESTORE = "thermal_restore"
RULE_POWER_SAVING = "power_saving"
RULE_POWER_SAVING_EXIT = "power_saving_exit"
RULE_POWER_CAP = "power_cap"
RULE_POLICY_CHANGE = "policy_change"



@dataclass(frozen=True)
class GpuPolicyState:
    """What the policy remembers about one GPU between two cycles."""

    thermal_steps: int = 0  # steps of the thermal step-down currently applied
    clocks_locked_mhz: int | None = None  # SM clock cap we locked, None = not locked
    last_thermal_change_at: float | None = None
    cool_since: float | None = None  # continuously below maxTempC - hysteresis since
    low_util_since: float | None = None
    saving_active: bool = False
    target_limit_w: float | None = None  # the last limit we asked for; None = never touched
    # What settles the thermal loop (see "Settling" above):
    change_temp_c: float | None = None  # the temperature at the last thermal change
    hot_limit_w: float | None = None  # the lowest limit the GPU was too hot at, remembered
    hot_limit_at: float | None = None  # since when (it is forgotten after HOT_LIMIT_MEMORY_S)
    unsettled_restores: int = 0  # restores whose heat has not shown yet (within the response wait)


def initial_state() -> GpuPolicyState:
    """The state of a GPU the policy has never seen."""
    return GpuPolicyState()


@dataclass(frozen=True)
class Saving:
    low_util_since: float | None
    active: bool
    event: str | None  # RULE_POWER_SAVING when entered this cycle, RULE_POWER_SAVING_EXIT on exit


def next_saving(prev: GpuPolicyState, utilization: float | None, saving: PowerSaving,
                 hot: bool, now: float) -> Saving:
    """Power saving starts after sustained low utilisation and stops at the first busy sample
    that is not hot: a hot GPU's limit may not rise, so its exit waits until it is below
    maxTempC (and is then named for what it is, a power-saving exit)."""
    if not saving.enabled:
        return Saving(low_util_since=None, active=False, event=None)
    if utilization is None:  # no evidence either way: keep what we had
        return Saving(low_util_since=prev.low_util_since, active=prev.saving_active, event=None)
    if utilization >= saving.utilization_threshold:
        if hot:
            return Saving(low_util_since=None, active=prev.saving_active, event=None)
        event = RULE_POWER_SAVING_EXIT if prev.saving_active else None
        return Saving(low_util_since=None, active=False, event=event)
    since = prev.low_util_since if prev.low_util_since is not None else now
    active = prev.saving_active or now - since >= saving.sustain_period
    event = RULE_POWER_SAVING if active and not prev.saving_active else None
    return Saving(low_util_since=since, active=active, event=event)
