"""GPU health with recovery, as one pure function.

NVIDIA's device plugin marks a GPU unhealthy until the plugin restarts. Here a GPU recovers: it
is healthy again once it has been quiet (no failed check, no counted XID) for a quiet period and
its latest sample passes every check. `assess` does no I/O and reads no clock: time is `now`.

Rules, per GPU and per cycle:

* XIDs, by `policy.xid_policy.action_for(xid)`:
  ignored (None) -> a RECORD action saying so, health unchanged (the decision log shows it);
  RECORD -> a RECORD action; MARK_UNHEALTHY -> MARK_UNHEALTHY ("xid 48");
  REQUEST_MIGRATION -> MARK_UNHEALTHY and REQUEST_MIGRATION.
* Double-bit ECC: the volatile DBE counter rising over the last value seen -> MARK_UNHEALTHY and
  REQUEST_MIGRATION (`ecc_dbe`). The first value only sets the baseline; a counter that went
  down (a GPU reset clears volatile counters) only moves the baseline.
* `remap_failure` set -> MARK_UNHEALTHY (`row_remap_failure`). It fails every cycle while the
  flag is set, as the hardware keeps it until a GPU reset, so it also holds off recovery.
* temperature >= criticalTempC -> MARK_UNHEALTHY and REQUEST_MIGRATION (`critical_temperature`).
* No sample, or a lost one -> MARK_LOST once (health LOST). The first good sample afterwards ->
  UNHEALTHY, reason "returned after loss" (`returned_after_loss`): a fresh quiet period starts.
  While LOST, counted XIDs are recorded (RECORD) and their reasons kept; LOST stays LOST.
* Recovery (`recovered`): an UNHEALTHY GPU becomes HEALTHY (MARK_HEALTHY) when nothing failed
  this cycle, `now - last_bad_at >= quiet_period_s`, and the sample passes every check: not
  lost, temperature below criticalTempC - hysteresisC (an unknown temperature does not fail),
  no remap failure, no new DBE. The migration request is then re-armed.
* Actions only on change: a condition already among the reasons emits nothing while it holds
  (it only extends `last_bad_at`); a repeated XID or DBE rise is RECORDed, since it is a new
  event. A new reason while unhealthy emits one MARK_UNHEALTHY with it. REQUEST_MIGRATION is
  asked at most once per unhealthy episode.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from edge.actions import Action, ActionKind
from shared.gpu import GpuSample, Health, XidEvent
from shared.policy import PowerPolicy, XidAction

RULE_XID = "xid"
RULE_ECC_DBE = "ecc_dbe"
RULE_ROW_REMAP_FAILURE = "row_remap_failure"
RULE_CRITICAL_TEMPERATURE = "critical_temperature"
RULE_LOST = "lost"
RULE_RETURNED_AFTER_LOSS = "returned_after_loss"
RULE_RECOVERED = "recovered"
RULE_VALIDATED = "validated"

REASON_LOST = "lost"
REASON_RETURNED = "returned after loss"
REASON_ECC_DBE = "double-bit ECC errors"
REASON_ROW_REMAP_FAILURE = "row remap failure"
REASON_CRITICAL_TEMPERATURE = "critical temperature"


@dataclass(frozen=True)
class GpuHealthState:
    """What health remembers about one GPU between two cycles."""

    health: Health = Health.HEALTHY
    reasons: tuple[str, ...] = ()  # short labels of this unhealthy episode, e.g. "xid 79"
    since: float | None = None  # when health last changed
    last_bad_at: float | None = None  # last time a check failed or a counted XID came
    ecc_dbe_baseline: int | None = None  # last DBE counter seen (volatile counters only grow)
    migration_requested: bool = False  # so we ask once per episode, not every cycle


@dataclass(frozen=True)
class _Failure:
    """One failed check or counted XID of this cycle."""

    rule: str
    label: str  # kept in GpuHealthState.reasons
    detail: str  # the sentence for the decision log
    migrate: bool
    event: bool  # a one-off event (XID, DBE rise), not a condition that holds across cycles
    inputs: dict[str, Any]


def _xid_failures(index: int, uuid: str, xids: Sequence[XidEvent],
                  policy: PowerPolicy) -> tuple[list[Action], list[_Failure]]:
    """Sort the XIDs into records (health unchanged) and counted failures."""
    records: list[Action] = []
    failures: list[_Failure] = []
    for event in xids:
        if event.index != index and event.uuid != uuid:
            continue  # another GPU's
        decision = policy.xid_policy.action_for(event.xid)
        inputs = {"xid": event.xid, "xid_ts": event.ts,
                  "xid_action": decision.value if decision is not None else "ignored"}
        if decision is None:
            records.append(Action(
                kind=ActionKind.RECORD, gpu_index=index, gpu_uuid=uuid, rule=RULE_XID,
                reason=f"xid {event.xid} on GPU {index} ignored: the policy lists it as an "
                       f"application error, not a GPU fault; health unchanged",
                inputs=inputs))
        elif decision is XidAction.RECORD:
            records.append(Action(
                kind=ActionKind.RECORD, gpu_index=index, gpu_uuid=uuid, rule=RULE_XID,
                reason=f"xid {event.xid} on GPU {index} recorded (policy: record); "
                       f"health unchanged",
                inputs=inputs))
        else:
            migrate = decision is XidAction.REQUEST_MIGRATION
            failures.append(_Failure(
                rule=RULE_XID, label=f"xid {event.xid}",
                detail=f"xid {event.xid} on GPU {index} (policy: {decision.value})",
                migrate=migrate, event=True, inputs=inputs))
    return records, failures


def _sample_failures(index: int, sample: GpuSample, baseline: int | None,
                     policy: PowerPolicy) -> list[_Failure]:
    """The checks a good (not lost) sample can fail."""
    failures: list[_Failure] = []
    dbe = sample.ecc_dbe_volatile
    if dbe is not None and baseline is not None and dbe > baseline:
        failures.append(_Failure(
            rule=RULE_ECC_DBE, label=REASON_ECC_DBE,
            detail=f"GPU {index} volatile double-bit ECC errors rose from {baseline} to {dbe}",
            migrate=True, event=True,
            inputs={"ecc_dbe_volatile": dbe, "ecc_dbe_baseline": baseline}))
    if sample.remap_failure:
        failures.append(_Failure(
            rule=RULE_ROW_REMAP_FAILURE, label=REASON_ROW_REMAP_FAILURE,
            detail=f"GPU {index} reports a row remapping failure (kept until a GPU reset)",
            migrate=False, event=False,
            inputs={"remap_failure": True,
                    "remapped_rows_uncorrectable": sample.remapped_rows_uncorrectable}))
    critical = policy.thermal_throttling.critical_temp_c
    if sample.temperature_c is not None and sample.temperature_c >= critical:
        failures.append(_Failure(
            rule=RULE_CRITICAL_TEMPERATURE, label=REASON_CRITICAL_TEMPERATURE,
            detail=f"GPU {index} at {sample.temperature_c:.1f} °C >= criticalTempC "
                   f"{critical:.1f}",
            migrate=True, event=False,
            inputs={"temperature_c": sample.temperature_c, "critical_temp_c": critical}))
    return failures


def sample_passes(sample: GpuSample | None, baseline: int | None, policy: PowerPolicy) -> bool:
    """Whether a sample is good enough to recover on: every check passes, with hysteresis."""
    if sample is None or sample.lost or sample.remap_failure:
        return False
    if (sample.ecc_dbe_volatile is not None and baseline is not None
            and sample.ecc_dbe_volatile > baseline):
        return False
    tt = policy.thermal_throttling
    temperature = sample.temperature_c
    return temperature is None or temperature < tt.critical_temp_c - tt.hysteresis_c


def assess(index: int, uuid: str, prev: GpuHealthState, sample: GpuSample | None,
           xids: Sequence[XidEvent], policy: PowerPolicy, now: float,
           quiet_period_s: float) -> tuple[GpuHealthState, list[Action]]:
    """One GPU's health for this cycle, from its latest sample and the XIDs since the last."""

    def action(kind: ActionKind, rule: str, reason: str, inputs: dict[str, Any]) -> Action:
        return Action(kind=kind, gpu_index=index, gpu_uuid=uuid, rule=rule, reason=reason,
                      inputs=inputs)

    actions, failures = _xid_failures(index, uuid, xids, policy)
    state = prev
    lost = sample is None or sample.lost

    if lost:
        if state.health is not Health.LOST:
            kept = state.reasons if state.health is Health.UNHEALTHY else ()
            state = replace(state, health=Health.LOST, since=now,
                            reasons=kept + (REASON_LOST,))
            why = "no sample" if sample is None else "the driver reports it lost"
            actions.append(action(ActionKind.MARK_LOST, RULE_LOST,
                                  f"GPU {index} is lost: {why}", {"sample": sample is not None}))
        state = replace(state, last_bad_at=now)
    else:
        assert sample is not None
        if state.health is Health.LOST:
            lost_for = now - state.since if state.since is not None else 0.0
            reasons = tuple(r for r in state.reasons if r != REASON_LOST) + (REASON_RETURNED,)
            state = replace(state, health=Health.UNHEALTHY, since=now, reasons=reasons,
                            last_bad_at=now)
            actions.append(action(
                ActionKind.MARK_UNHEALTHY, RULE_RETURNED_AFTER_LOSS,
                f"GPU {index} answers again after {lost_for:.0f} s lost; unhealthy until quiet "
                f"for {quiet_period_s:.0f} s", {"lost_for_s": lost_for}))
        failures += _sample_failures(index, sample, state.ecc_dbe_baseline, policy)
        if sample.ecc_dbe_volatile is not None:
            state = replace(state, ecc_dbe_baseline=sample.ecc_dbe_volatile)

    for failure in failures:
        state = replace(state, last_bad_at=now)
        is_new = failure.label not in state.reasons
        if state.health is Health.LOST:
            if is_new:
                state = replace(state, reasons=state.reasons + (failure.label,))
            actions.append(action(ActionKind.RECORD, failure.rule,
                                  f"{failure.detail}; the GPU is lost, health stays lost",
                                  failure.inputs))
        elif is_new:
            if state.health is Health.HEALTHY:
                state = replace(state, health=Health.UNHEALTHY, since=now, reasons=())
            state = replace(state, reasons=state.reasons + (failure.label,))
            actions.append(action(ActionKind.MARK_UNHEALTHY, failure.rule,
                                  f"{failure.detail}: unhealthy", failure.inputs))
        elif failure.event:
            actions.append(action(ActionKind.RECORD, failure.rule,
                                  f"{failure.detail} again; already unhealthy for it, the quiet "
                                  f"period starts over", failure.inputs))
        if failure.migrate and not state.migration_requested:
            state = replace(state, migration_requested=True)
            actions.append(action(ActionKind.REQUEST_MIGRATION, failure.rule,
                                  f"{failure.detail}: work on it is at risk, asking to move it",
                                  failure.inputs))

    bad_this_cycle = lost or bool(failures) or prev.health is Health.LOST
    if (state.health is Health.UNHEALTHY and not bad_this_cycle
            and sample_passes(sample, prev.ecc_dbe_baseline, policy)):
        quiet_for = now - state.last_bad_at if state.last_bad_at is not None else None
        if quiet_for is None or quiet_for >= quiet_period_s:
            quiet = "ever" if quiet_for is None else f"{quiet_for:.0f} s"
            actions.append(action(
                ActionKind.MARK_HEALTHY, RULE_RECOVERED,
                f"GPU {index} passed every check and was quiet for {quiet} (quiet period "
                f"{quiet_period_s:.0f} s) after: {', '.join(state.reasons)}; healthy again",
                {"quiet_for_s": quiet_for, "quiet_period_s": quiet_period_s,
                 "reasons": list(state.reasons)}))
            state = replace(state, health=Health.HEALTHY, reasons=(), since=now,
                            migration_requested=False)
    return state, actions


def validated(state: GpuHealthState, now: float, *, index: int | None = None,
              uuid: str | None = None) -> tuple[GpuHealthState, Action]:
    """The remediation ladder validated the GPU (reset or reboot, then every check passed): it is
    back in service at once, without the quiet period, which is for faults nobody repaired. The
    DBE baseline is dropped (a reset clears the volatile counters; the next sample sets it) and the
    migration request is re-armed. An already healthy GPU only gets a RECORD."""
    if state.health is Health.HEALTHY:
        return state, Action(kind=ActionKind.RECORD, gpu_index=index, gpu_uuid=uuid, rule=RULE_VALIDATED,
                             reason="validated by the remediation ladder; already healthy", inputs={})
    reasons = ", ".join(state.reasons) or state.health.value
    action = Action(kind=ActionKind.MARK_HEALTHY, gpu_index=index, gpu_uuid=uuid, rule=RULE_VALIDATED,
                    reason=f"validated by the remediation ladder after: {reasons}; healthy again without "
                           f"the quiet period", inputs={"reasons": list(state.reasons), "was": state.health.value})
    return GpuHealthState(health=Health.HEALTHY, since=now), action


def node_health(driver_reachable: bool, gpu_states: Mapping[int, GpuHealthState],
                probe_ok: bool | None) -> tuple[bool, list[str]]:
    """For /healthz: only a dead driver or a failed app probe make the node unhealthy.

    A bad GPU is the scheduler's business (it is marked unhealthy on its own), so it is listed
    for information but does not fail the node.
    """
    healthy = True
    reasons: list[str] = []
    if not driver_reachable:
        healthy = False
        reasons.append("driver unreachable")
    if probe_ok is False:
        healthy = False
        reasons.append("application probe failed")
    for index in sorted(gpu_states):
        gpu = gpu_states[index]
        if gpu.health is Health.HEALTHY:
            continue
        shown = [reason for reason in gpu.reasons if reason != REASON_LOST]
        detail = f": {', '.join(shown)}" if shown else ""
        reasons.append(f"gpu {index} {gpu.health.value}{detail}")
    return healthy, reasons
