"""Issue 14, the remediation ladder's pure parts: the XID catalogue (edge/remediation/catalogue.py),
the planner (edge/remediation/ladder.py) for every fault class, and edge.health.validated. The
manager over the simulated driver and the real edge store is in tests/test_remediation_edge.py."""

from __future__ import annotations

from edge import health
from edge.actions import ActionKind
from edge.remediation.catalogue import XID_CATALOGUE, Remedy, remedy_for
from edge.remediation.ladder import (
    REBOOT_SETTLE_S,
    Facts,
    Fault,
    Hold,
    LadderSettings,
    LadderState,
    Stage,
    StepKind,
    StepResult,
    grant,
    plan,
    resume,
    settle,
    xid_fault,
)
from shared.gpu import GpuSample, Health
from shared.policy import PowerPolicy
from shared.protocol import ActionOutcome

RULES = LadderSettings(drain_timeout_s=300.0, max_resets=2, reset_available=True, reboot="request")
IDLE = Facts()
HOT = Fault("critical temperature", Remedy.COOL, "GPU 0 at 95.0 °C >= criticalTempC 90.0")
REMAP = Fault("row remap pending", Remedy.RESET, "GPU 0 has a row remap pending")


def kinds(steps: list) -> list[StepKind]:
    return [s.kind for s in steps]


def test_the_catalogue_follows_nvidias_immediate_action_buckets() -> None:
    resets = (48, 62, 64, 95, 109, 119, 120, 140, 143)
    records = (13, 31, 43, 45, 61, 63, 68, 69, 74, 92, 94, 121, 154)
    assert {x: remedy_for(x) for x in resets} == dict.fromkeys(resets, Remedy.RESET)
    assert {x: remedy_for(x) for x in records} == dict.fromkeys(records, Remedy.RECORD)
    assert remedy_for(79) is Remedy.REBOOT and XID_CATALOGUE[79].bucket == "RESTART_BM"
    assert XID_CATALOGUE[13].bucket == "RESTART_APP" and XID_CATALOGUE[95].bucket == "RESET_GPU"
    assert remedy_for(999) is Remedy.RECORD  # unknown: recorded, no remedy
    assert "not in NVIDIA's Xid catalogue" in xid_fault(999, 0).detail


def test_restart_app_xids_only_record_and_the_gpu_stays_in_service() -> None:
    faults = tuple(xid_fault(x, 0) for x in (13, 31, 43, 94, 999))
    state, steps = plan(LadderState(), Facts(faults=faults, processes=2), RULES, 100.0)
    assert state == LadderState() and state.label is None
    assert kinds(steps) == [StepKind.RECORD] * 5
    assert all("no GPU action (in service)" in s.reason for s in steps)


def test_a_resettable_xid_is_fenced_drained_diagnosed_reset_validated_and_back() -> None:
    fault = (xid_fault(95, 0),)
    state, steps = plan(LadderState(), Facts(faults=fault, processes=1, pods=1), RULES, 0.0)
    assert state.stage is Stage.DRAINING and state.label == "draining" and state.remedy is Remedy.RESET
    assert kinds(steps) == [StepKind.FENCE] and steps[0].outcome is ActionOutcome.APPLIED
    state, steps = plan(state, Facts(processes=1), RULES, 10.0)
    assert state.stage is Stage.DRAINING and steps == []  # waits while a process holds the GPU
    state, steps = plan(state, IDLE, RULES, 20.0)
    assert state.stage is Stage.DIAGNOSING and kinds(steps) == [StepKind.DRAIN, StepKind.DIAGNOSE]
    assert steps[-1].run and not steps[0].run  # the manager runs the diagnostics, records the drain
    state, steps = settle(state, StepResult(StepKind.DIAGNOSE, False, "nvml: lost"), RULES, 25.0)
    assert state.stage is Stage.RESETTING and steps[0].outcome is ActionOutcome.FAILED
    assert not any(s.run for s in steps)  # a settled step is recorded, never run again
    state, steps = plan(state, IDLE, RULES, 30.0)
    assert kinds(steps) == [StepKind.RESET] and state.stage is Stage.RESETTING
    state, steps = settle(state, StepResult(StepKind.RESET, True, "exited 0"), RULES, 35.0)
    assert state.stage is Stage.VALIDATING and state.resets == 1
    state, steps = plan(state, IDLE, RULES, 40.0)
    assert kinds(steps) == [StepKind.VALIDATE]
    state, steps = settle(state, StepResult(StepKind.VALIDATE, True, "all checks pass"), RULES, 45.0)
    assert state == LadderState() and kinds(steps) == [StepKind.VALIDATE, StepKind.RESTORE]
    assert steps[1].inputs["took_s"] == 45.0


def test_a_fault_a_reset_does_not_clear_goes_to_the_reboot_request_then_validates_after_it() -> None:
    state, _ = plan(LadderState(), Facts(faults=(xid_fault(79, 0),), processes=None, pods=0), RULES, 0.0)
    assert state.stage is Stage.DIAGNOSING and state.remedy is Remedy.REBOOT  # lost, no pod left: drained
    state, _ = settle(state, StepResult(StepKind.DIAGNOSE, False), RULES, 1.0)
    state, _ = settle(state, StepResult(StepKind.RESET, True), RULES, 2.0)
    state, steps = settle(state, StepResult(StepKind.VALIDATE, False, "nvml: lost"), RULES, 3.0)
    # RESTART_BM: one failed reset is enough
    assert state.stage is Stage.REBOOT_REQUESTED and state.label == "reboot-requested" and state.attempt == 1
    assert kinds(steps) == [StepKind.VALIDATE, StepKind.REQUEST_REBOOT]
    assert plan(state, IDLE, RULES, 100.0) == (state, [])  # waits for the cloud's grant
    state, steps = grant(state, 200.0)
    assert state.stage is Stage.REBOOTING and state.rebooted and kinds(steps) == [StepKind.REBOOT]
    assert grant(LadderState(), 200.0) == (LadderState(), [])  # only a ladder that asked
    state, steps = settle(state, StepResult(StepKind.REBOOT, True), RULES, 201.0)
    assert state.stage is Stage.REBOOTING
    # the daemon restarts (the reboot): the state read back validates at once
    restored = LadderState.from_json(state.to_json())
    assert restored == state
    state, steps = resume(restored, 500.0)
    assert state.stage is Stage.VALIDATING and state.rebooted and kinds(steps) == [StepKind.RECORD]
    state, steps = settle(state, StepResult(StepKind.VALIDATE, False, "nvml: lost"), RULES, 510.0)
    assert state.stage is Stage.HELD and state.hold is Hold.FAILED and "needs a person" in (state.label or "")


def test_a_node_that_did_not_go_down_after_the_reboot_command_validates_later() -> None:
    state = LadderState(stage=Stage.REBOOTING, remedy=Remedy.REBOOT, fault="xid 79", since=0.0, rebooted=True)
    assert plan(state, IDLE, RULES, REBOOT_SETTLE_S - 1) == (state, [])
    state, steps = plan(state, IDLE, RULES, REBOOT_SETTLE_S + 1)
    assert state.stage is Stage.VALIDATING and kinds(steps) == [StepKind.RECORD, StepKind.VALIDATE]


def test_max_resets_then_the_reboot_step_as_the_settings_say() -> None:
    for mode, stage, last in (("request", Stage.REBOOT_REQUESTED, StepKind.REQUEST_REBOOT),
                              ("advise", Stage.HELD, StepKind.ADVISE_REBOOT), ("off", Stage.HELD, StepKind.HOLD)):
        rules = LadderSettings(max_resets=2, reboot=mode)  # type: ignore[arg-type]
        state, _ = plan(LadderState(), Facts(faults=(REMAP,)), rules, 0.0)
        state, _ = settle(state, StepResult(StepKind.DIAGNOSE, False), rules, 1.0)
        state, _ = settle(state, StepResult(StepKind.RESET, True), rules, 2.0)
        state, _ = settle(state, StepResult(StepKind.VALIDATE, False), rules, 3.0)
        assert state.stage is Stage.RESETTING and state.resets == 1  # a second reset
        state, _ = settle(state, StepResult(StepKind.RESET, True), rules, 4.0)
        state, steps = settle(state, StepResult(StepKind.VALIDATE, False, "row remap pending"), rules, 5.0)
        assert state.stage is stage and steps[-1].kind is last, mode
        if mode != "request":
            assert state.hold is Hold.REBOOT and "reboot" in (state.label or "")
            assert steps[-1].outcome is ActionOutcome.ADVISORY
            # held for a reboot: a restart of the daemon (maybe the reboot by hand) validates
            assert resume(state, 9.0)[0].stage is Stage.VALIDATING
    # no reset command: a fault that needs one goes to the reboot step after the diagnostics
    rules = LadderSettings(reset_available=False, reboot="advise")
    state, _ = plan(LadderState(), Facts(faults=(REMAP,)), rules, 0.0)
    state, steps = settle(state, StepResult(StepKind.DIAGNOSE, False), rules, 1.0)
    assert state.stage is Stage.HELD and steps[-1].kind is StepKind.ADVISE_REBOOT
    # a reset command that fails counts as a reset
    state, _ = plan(LadderState(), Facts(faults=(REMAP,)), RULES, 0.0)
    state, _ = settle(state, StepResult(StepKind.DIAGNOSE, True), RULES, 1.0)
    state, _ = settle(state, StepResult(StepKind.RESET, False, "in use"), RULES, 2.0)
    assert state.stage is Stage.RESETTING and state.resets == 1
    state, steps = settle(state, StepResult(StepKind.RESET, False, "in use"), RULES, 3.0)
    assert state.stage is Stage.REBOOT_REQUESTED and "2 reset(s) failed" in steps[-1].reason


def test_heat_is_fenced_drained_cooled_and_validated_without_a_reset() -> None:
    state, steps = plan(LadderState(), Facts(faults=(HOT,), processes=1, temperature_c=95.0, cool_below_c=85.0),
                        RULES, 0.0)
    assert state.stage is Stage.DRAINING and state.remedy is Remedy.COOL and kinds(steps) == [StepKind.FENCE]
    state, steps = plan(state, Facts(faults=(HOT,), processes=0, temperature_c=92.0, cool_below_c=85.0), RULES, 5.0)
    assert state.stage is Stage.COOLING and kinds(steps) == [StepKind.DRAIN]
    state, steps = plan(state, Facts(processes=0, temperature_c=86.0, cool_below_c=85.0), RULES, 10.0)
    assert state.stage is Stage.COOLING and steps == []  # below critical, not yet below the hysteresis
    state, steps = plan(state, Facts(processes=0, temperature_c=80.0, cool_below_c=85.0), RULES, 15.0)
    assert state.stage is Stage.VALIDATING and kinds(steps) == [StepKind.RECORD, StepKind.VALIDATE]
    state, steps = settle(state, StepResult(StepKind.VALIDATE, True), RULES, 16.0)
    assert state.stage is Stage.IN_SERVICE and kinds(steps) == [StepKind.VALIDATE, StepKind.RESTORE]
    # a heat drain that times out goes on to cooling (no reset, so processes do not block it)
    state, _ = plan(LadderState(), Facts(faults=(HOT,), processes=1, temperature_c=95.0), RULES, 0.0)
    state, steps = plan(state, Facts(processes=1, temperature_c=95.0, cool_below_c=85.0), RULES, 301.0)
    assert state.stage is Stage.COOLING and steps[0].outcome is ActionOutcome.FAILED
    # an XID needing a reset while cooling raises the remedy
    state, steps = plan(state, Facts(faults=(xid_fault(95, 0),), processes=0, temperature_c=95.0), RULES, 310.0)
    assert state.remedy is Remedy.RESET and state.stage is Stage.DIAGNOSING
    assert kinds(steps) == [StepKind.RECORD, StepKind.DIAGNOSE] and "xid 95" in state.fault


def test_row_remap_pending_needs_a_reset() -> None:
    state, steps = plan(LadderState(), Facts(faults=(REMAP,), processes=0), RULES, 0.0)
    assert state.remedy is Remedy.RESET and kinds(steps) == [StepKind.FENCE, StepKind.DRAIN, StepKind.DIAGNOSE]
    state, _ = settle(state, StepResult(StepKind.DIAGNOSE, False, "row remap pending"), RULES, 1.0)
    assert kinds(plan(state, Facts(faults=(REMAP,)), RULES, 2.0)[1]) == [StepKind.RESET]


def test_a_drain_that_times_out_holds_the_gpu_fenced_until_the_processes_leave() -> None:
    state, _ = plan(LadderState(), Facts(faults=(REMAP,), processes=3), RULES, 0.0)
    state, steps = plan(state, Facts(processes=3), RULES, 299.0)
    assert state.stage is Stage.DRAINING and steps == []
    state, steps = plan(state, Facts(processes=3), RULES, 300.0)
    assert state.stage is Stage.HELD and state.hold is Hold.DRAIN
    assert state.label is not None and state.label.startswith("held: drain timed out: 3 process(es)")
    assert steps[0].kind is StepKind.HOLD and steps[0].outcome is ActionOutcome.FAILED
    assert plan(state, Facts(processes=1), RULES, 400.0) == (state, [])
    assert resume(state, 401.0) == (state, [])  # a restart does not reset a GPU still in use
    state, steps = plan(state, IDLE, RULES, 500.0)
    assert state.stage is Stage.DIAGNOSING and kinds(steps) == [StepKind.DRAIN, StepKind.DIAGNOSE]
    # a lost GPU (processes unknown) with pods still listed: at the timeout, on to the reset
    state, _ = plan(LadderState(), Facts(faults=(xid_fault(79, 1),), processes=None, pods=2), RULES, 0.0)
    assert state.stage is Stage.DRAINING
    state, steps = plan(state, Facts(processes=None, pods=2), RULES, 300.0)
    assert state.stage is Stage.DIAGNOSING and steps[0].outcome is ActionOutcome.FAILED


def test_the_kept_state_is_read_back_and_a_bad_record_is_refused() -> None:
    state = LadderState(stage=Stage.HELD, fault="xid 95", remedy=Remedy.RESET, started_at=1.0, since=2.0,
                        resets=2, attempt=1, hold=Hold.REBOOT, why="a node reboot is advised", rebooted=False)
    assert LadderState.from_json(state.to_json()) == state
    for bad in ({}, {"stage": "dancing", "remedy": "reset"}, {"stage": "held", "remedy": "reset", "resets": "x"}):
        try:
            LadderState.from_json(bad)
        except (ValueError, KeyError, TypeError):
            continue
        raise AssertionError(f"accepted {bad}")


def test_validated_puts_a_gpu_back_in_service_without_the_quiet_period() -> None:
    policy = PowerPolicy()
    sample = GpuSample(index=0, uuid="GPU-0", ts=100.0, temperature_c=50.0, ecc_dbe_volatile=0)
    unhealthy = health.GpuHealthState(health=Health.UNHEALTHY, reasons=("returned after loss",), since=90.0,
                                      last_bad_at=99.0, ecc_dbe_baseline=3, migration_requested=True)
    # the ordinary rule waits for the quiet period
    assert health.assess(0, "GPU-0", unhealthy, sample, [], policy, 100.0, 300.0)[0].health is Health.UNHEALTHY
    state, action = health.validated(unhealthy, 100.0, index=0, uuid="GPU-0")
    assert state.health is Health.HEALTHY and state.reasons == () and not state.migration_requested
    assert action.kind is ActionKind.MARK_HEALTHY and action.rule == health.RULE_VALIDATED
    assert "returned after loss" in action.reason and action.gpu_uuid == "GPU-0"
    # the next cycle keeps it healthy: the reset cleared the DBE counter, the baseline starts again
    after, actions = health.assess(0, "GPU-0", state, sample, [], policy, 105.0, 300.0)
    assert after.health is Health.HEALTHY and actions == []
    same, record = health.validated(state, 106.0)
    assert same is state and record.kind is ActionKind.RECORD
