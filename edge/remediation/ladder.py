"""The remediation ladder as a pure planner: one GPU's ladder state and this cycle's facts (or a
step's result) in, the new state and the steps to take out. No I/O, no clock: time is `now`.

The ladder, per GPU:

    in service --fault--> fence + draining --no process left--> diagnosing --> resetting
        --> validating --pass--> back in service (edge.health.validated: no quiet period)
                       --fail--> resetting again (up to max_resets; 1 for a RESTART_BM fault)
                              --> the reboot step: request (wait for the cloud's grant) -> rebooting
                                  | advise (held, fenced) | off (held, fenced)
    heat: fence + draining --> cooling (below criticalTempC - hysteresisC) --> validating --> back

* A drain that outlasts `drain_timeout_s` with processes still on the GPU holds the ladder
  ("held: ..."), fenced; it goes on as soon as the processes are gone. A lost GPU cannot list its
  processes: it is drained once none of its pods is left, or at the timeout (the reset command
  refuses a GPU in use by itself, as nvidia-smi does).
* Heat never resets: a drain timeout goes on to cooling (the power policy throttles meanwhile).
* A fault with a stronger remedy while the ladder runs raises it (cool < reset < reboot).
* After a restart of the daemon (`resume`), a ladder that was rebooting, waiting for a reboot or
  held for one validates at once: the restart may have been the reboot.
* Steps that need I/O (diagnose, reset, validate, reboot) are run by the manager, which feeds
  their result back through `settle`; `plan` is not called for a GPU while one of them runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any, Literal

from edge.remediation.catalogue import Remedy, lookup
from shared.protocol import ActionOutcome

RULE = "remediation"
# After a reboot command that returned while this process kept running (the node did not go
# down: a simulated reboot, a command that only schedules it), validate after this long.
REBOOT_SETTLE_S = 60.0

RebootMode = Literal["request", "advise", "off"]


class Stage(StrEnum):
    IN_SERVICE = "in-service"
    DRAINING = "draining"
    DIAGNOSING = "diagnosing"
    RESETTING = "resetting"
    VALIDATING = "validating"
    COOLING = "cooling"
    REBOOT_REQUESTED = "reboot-requested"
    REBOOTING = "rebooting"
    HELD = "held"


class Hold(StrEnum):
    """Why a ladder is held (fenced, waiting)."""

    NONE = ""
    DRAIN = "drain"  # processes did not leave: goes on once they do
    REBOOT = "reboot"  # a reboot is advised or needed and not requested: validates after a restart
    FAILED = "failed"  # still failing after a reboot: needs a person


class StepKind(StrEnum):
    RECORD = "record"
    FENCE = "fence"
    DRAIN = "drain"
    DIAGNOSE = "diagnose"
    RESET = "reset"
    VALIDATE = "validate"
    RESTORE = "restore"
    REQUEST_REBOOT = "request_reboot"
    ADVISE_REBOOT = "advise_reboot"
    REBOOT = "reboot"
    HOLD = "hold"


_RANK = {Remedy.RECORD: 0, Remedy.COOL: 1, Remedy.RESET: 2, Remedy.REBOOT: 3}


@dataclass(frozen=True)
class Fault:
    """Something found this cycle: an XID (an event), or a condition NVML shows (every cycle)."""

    label: str  # "xid 79", "row remap pending", "critical temperature", ...
    remedy: Remedy
    detail: str


def xid_fault(xid: int, index: int) -> Fault:
    """An XID as a fault, with the catalogue's remedy (an unknown XID: record only)."""
    entry = lookup(xid)
    if entry is None:
        return Fault(f"xid {xid}", Remedy.RECORD, f"xid {xid} on GPU {index} (not in NVIDIA's Xid catalogue here)")
    return Fault(f"xid {xid}", entry.remedy, f"xid {xid} {entry.mnemonic} on GPU {index} (catalogue: {entry.bucket})")


@dataclass(frozen=True)
class Facts:
    """One GPU this cycle, as the planner needs it."""

    faults: tuple[Fault, ...] = ()
    processes: int | None = 0  # compute processes on the GPU; None: unknown (lost)
    pods: int = 0  # pods known to use it (the pod map)
    temperature_c: float | None = None
    cool_below_c: float = 0.0


@dataclass(frozen=True)
class LadderSettings:
    drain_timeout_s: float = 300.0
    max_resets: int = 2
    reset_available: bool = True  # a reset command is configured (and the device has a reset: Capability.RESET)
    no_reset_reason: str = "no GPU reset available"  # said when it is not: e.g. "Jetson has no GPU reset"
    reboot: RebootMode = "request"
    reboot_settle_s: float = REBOOT_SETTLE_S  # still up this long after the reboot command: validate


@dataclass(frozen=True)
class Step:
    """One thing to do or record; every step becomes a decision (rule `remediation`)."""

    kind: StepKind
    reason: str
    outcome: ActionOutcome = ActionOutcome.RECORDED
    inputs: dict[str, Any] = field(default_factory=dict)
    run: bool = False  # the manager runs it (diagnose, reset, validate, reboot) and settles its result


@dataclass(frozen=True)
class StepResult:
    """What a step the manager ran came to."""

    kind: StepKind
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class LadderState:
    stage: Stage = Stage.IN_SERVICE
    fault: str = ""  # the fault labels of this episode, "; "-joined
    remedy: Remedy = Remedy.RECORD
    started_at: float | None = None
    since: float | None = None  # when the stage began
    resets: int = 0
    attempt: int = 0  # reboot requests made for this fault
    hold: Hold = Hold.NONE
    why: str = ""  # the hold's reason, shown in the stage label
    rebooted: bool = False

    @property
    def label(self) -> str | None:
        """GpuSummary.remediation: None in service, "held: <why>" when held, else the stage."""
        if self.stage is Stage.IN_SERVICE:
            return None
        if self.stage is Stage.HELD:
            return f"held: {self.why}"[:500]
        return self.stage.value

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> LadderState:
        """Raises ValueError/TypeError/KeyError on a record this code cannot read."""
        return cls(stage=Stage(raw["stage"]), fault=str(raw.get("fault", "")), remedy=Remedy(raw["remedy"]),
                   started_at=_float(raw.get("started_at")), since=_float(raw.get("since")),
                   resets=int(raw.get("resets", 0)), attempt=int(raw.get("attempt", 0)),
                   hold=Hold(raw.get("hold", "")), why=str(raw.get("why", "")),
                   rebooted=bool(raw.get("rebooted", False)))


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


Plan = tuple[LadderState, list[Step]]


def _inputs(state: LadderState, **more: Any) -> dict[str, Any]:
    return {"fault": state.fault, "remedy": state.remedy.value, "resets": state.resets, **more}


def _at(state: LadderState, stage: Stage, now: float, **changes: Any) -> LadderState:
    return replace(state, stage=stage, since=now, **changes)


def plan(state: LadderState, facts: Facts, settings: LadderSettings, now: float) -> Plan:
    """This cycle's steps for one GPU (none of its steps is running)."""
    steps: list[Step] = []
    record_only = [f for f in facts.faults if f.remedy is Remedy.RECORD]
    acting = [f for f in facts.faults if f.remedy is not Remedy.RECORD]
    for fault in record_only:
        where = "in service" if state.stage is Stage.IN_SERVICE else f"the ladder stays at {state.stage.value}"
        steps.append(Step(StepKind.RECORD, f"{fault.detail}: no GPU action ({where})",
                          inputs={"fault": fault.label, "remedy": Remedy.RECORD.value}))
    strongest = max(acting, key=lambda f: _RANK[f.remedy], default=None)
    if state.stage is Stage.IN_SERVICE:
        if strongest is None:
            return state, steps
        labels = "; ".join(dict.fromkeys(f.label for f in acting))
        state = LadderState(stage=Stage.DRAINING, fault=labels, remedy=strongest.remedy, started_at=now, since=now)
        steps.append(Step(StepKind.FENCE, f"{strongest.detail}: fenced (advertised unhealthy, nothing new is "
                                          f"placed on it); remedy {strongest.remedy.value}", ActionOutcome.APPLIED,
                          _inputs(state)))
    elif strongest is not None and _RANK[strongest.remedy] > _RANK[state.remedy]:
        state = replace(state, remedy=strongest.remedy, fault=f"{state.fault}; {strongest.label}")
        steps.append(Step(StepKind.RECORD, f"{strongest.detail}: the remedy rises to {strongest.remedy.value}",
                          inputs=_inputs(state)))
        if state.stage is Stage.COOLING:
            state = _at(state, Stage.DIAGNOSING, now)
    return _advance(state, facts, settings, now, steps)


def _advance(state: LadderState, facts: Facts, settings: LadderSettings, now: float, steps: list[Step]) -> Plan:
    since = state.since if state.since is not None else now
    if state.stage is Stage.DRAINING:
        held = facts.processes
        if held == 0 or (held is None and facts.pods == 0):
            steps.append(Step(StepKind.DRAIN, "no process holds the GPU any more" if held == 0 else
                              "the GPU cannot list its processes (lost) and none of its pods is left",
                              ActionOutcome.APPLIED, _inputs(state, waited_s=now - since)))
            state = _at(state, Stage.COOLING if state.remedy is Remedy.COOL else Stage.DIAGNOSING, now)
        elif now - since >= settings.drain_timeout_s:
            waited = _inputs(state, processes=held, pods=facts.pods, waited_s=now - since)
            if state.remedy is Remedy.COOL or held is None:
                what = "cooling" if state.remedy is Remedy.COOL else "diagnosing (the reset refuses a GPU in use)"
                steps.append(Step(StepKind.DRAIN, f"drain timed out after {now - since:.0f} s; going on to {what}",
                                  ActionOutcome.FAILED, waited))
                state = _at(state, Stage.COOLING if state.remedy is Remedy.COOL else Stage.DIAGNOSING, now)
            else:
                why = f"drain timed out: {held} process(es) still hold the GPU; no reset while they run"
                steps.append(Step(StepKind.HOLD, why, ActionOutcome.FAILED, waited))
                return _at(state, Stage.HELD, now, hold=Hold.DRAIN, why=why), steps
        else:
            return state, steps
    if state.stage is Stage.HELD:
        if state.hold is Hold.DRAIN and facts.processes == 0:
            steps.append(Step(StepKind.DRAIN, "the processes left after the drain timeout; going on",
                              ActionOutcome.APPLIED, _inputs(state)))
            state = _at(state, Stage.DIAGNOSING, now, hold=Hold.NONE, why="")
        else:
            return state, steps
    if state.stage is Stage.COOLING:
        temperature = facts.temperature_c
        if temperature is None or temperature >= facts.cool_below_c:
            return state, steps
        steps.append(Step(StepKind.RECORD, f"cooled to {temperature:.1f} °C, below {facts.cool_below_c:.1f} °C",
                          inputs=_inputs(state, temperature_c=temperature)))
        state = _at(state, Stage.VALIDATING, now)
    if state.stage is Stage.DIAGNOSING:
        steps.append(Step(StepKind.DIAGNOSE, "local diagnostics", inputs=_inputs(state), run=True))
    elif state.stage is Stage.RESETTING:
        if facts.processes:
            if now - since >= settings.drain_timeout_s:
                why = f"{facts.processes} process(es) came back on the fenced GPU; no reset while they run"
                steps.append(Step(StepKind.HOLD, why, ActionOutcome.FAILED, _inputs(state)))
                return _at(state, Stage.HELD, now, hold=Hold.DRAIN, why=why), steps
            return state, steps
        steps.append(Step(StepKind.RESET, f"GPU reset, attempt {state.resets + 1}", inputs=_inputs(state), run=True))
    elif state.stage is Stage.VALIDATING:
        steps.append(Step(StepKind.VALIDATE, "validation", inputs=_inputs(state), run=True))
    elif state.stage is Stage.REBOOTING and now - since >= settings.reboot_settle_s:
        steps.append(Step(StepKind.RECORD, f"the node is still up {now - since:.0f} s after the reboot command; "
                                           "validating", inputs=_inputs(state)))
        state = _at(state, Stage.VALIDATING, now)
        steps.append(Step(StepKind.VALIDATE, "validation after the reboot", inputs=_inputs(state), run=True))
    return state, steps


def _reset_limit(state: LadderState, settings: LadderSettings) -> int:
    if not settings.reset_available:
        return 0
    return min(1, settings.max_resets) if state.remedy is Remedy.REBOOT else settings.max_resets


def _reboot_step(state: LadderState, settings: LadderSettings, now: float, why: str, steps: list[Step]) -> Plan:
    if state.rebooted:
        text = f"still failing after a reboot ({why}); needs a person"
        steps.append(Step(StepKind.HOLD, text, ActionOutcome.FAILED, _inputs(state)))
        return _at(state, Stage.HELD, now, hold=Hold.FAILED, why=text), steps
    if settings.reboot == "request":
        state = _at(state, Stage.REBOOT_REQUESTED, now, attempt=state.attempt + 1)
        steps.append(Step(StepKind.REQUEST_REBOOT, f"asking the cloud for a node reboot: {why}",
                          inputs=_inputs(state, attempt=state.attempt)))
        return state, steps
    if settings.reboot == "advise":
        text = f"a node reboot is advised: {why}"
        steps.append(Step(StepKind.ADVISE_REBOOT, text, ActionOutcome.ADVISORY, _inputs(state)))
    else:
        text = f"a node reboot is needed (remediation_reboot is off): {why}"
        steps.append(Step(StepKind.HOLD, text, ActionOutcome.ADVISORY, _inputs(state)))
    return _at(state, Stage.HELD, now, hold=Hold.REBOOT, why=text), steps


def settle(state: LadderState, result: StepResult, settings: LadderSettings, now: float) -> Plan:
    """A step the manager ran has ended: record it and move on."""
    steps: list[Step] = []
    outcome = ActionOutcome.APPLIED if result.ok else ActionOutcome.FAILED
    detail = result.detail or ("passed" if result.ok else "failed")
    kind = result.kind
    if kind is StepKind.DIAGNOSE:
        steps.append(Step(kind, f"diagnostics {'passed' if result.ok else 'failed'}: {detail}", outcome,
                          _inputs(state)))
        if _reset_limit(state, settings) > state.resets:
            return _at(state, Stage.RESETTING, now), steps
        return _reboot_step(state, settings, now, f"{state.fault}; {settings.no_reset_reason}", steps)
    if kind is StepKind.RESET:
        state = replace(state, resets=state.resets + 1)
        steps.append(Step(kind, f"GPU reset {'done' if result.ok else 'failed'}: {detail}", outcome, _inputs(state)))
        if result.ok:
            return _at(state, Stage.VALIDATING, now), steps
        if _reset_limit(state, settings) > state.resets:
            return _at(state, Stage.RESETTING, now), steps
        return _reboot_step(state, settings, now, f"{state.fault}; {state.resets} reset(s) failed: {detail}", steps)
    if kind is StepKind.VALIDATE:
        steps.append(Step(kind, f"validation {'passed' if result.ok else 'failed'}: {detail}", outcome,
                          _inputs(state)))
        if result.ok:
            took = now - state.started_at if state.started_at is not None else 0.0
            steps.append(Step(StepKind.RESTORE, f"back in service {took:.0f} s after {state.fault}",
                              ActionOutcome.APPLIED, _inputs(state, took_s=took)))
            return LadderState(), steps
        if state.remedy is Remedy.COOL:
            return _at(state, Stage.COOLING, now), steps
        if not state.rebooted and _reset_limit(state, settings) > state.resets:
            return _at(state, Stage.RESETTING, now), steps
        return _reboot_step(state, settings, now, f"{state.fault}; validation failed after {state.resets} "
                                                  f"reset(s): {detail}", steps)
    if kind is StepKind.REBOOT:
        if result.ok:
            steps.append(Step(kind, f"reboot command ran: {detail}", outcome, _inputs(state)))
            return state, steps
        text = f"the reboot command failed: {detail}"
        steps.append(Step(kind, text, outcome, _inputs(state)))
        return _at(state, Stage.HELD, now, hold=Hold.REBOOT, why=text), steps
    return state, steps


def grant(state: LadderState, now: float) -> Plan:
    """The cloud granted the reboot this GPU's ladder asked for: reboot (persist first)."""
    if state.stage is not Stage.REBOOT_REQUESTED:
        return state, []
    state = _at(state, Stage.REBOOTING, now, rebooted=True)
    return state, [Step(StepKind.REBOOT, "the cloud granted the reboot; rebooting the node", inputs=_inputs(state),
                        run=True)]


def resume(state: LadderState, now: float) -> Plan:
    """After a restart of the daemon: a reboot may have happened, so a ladder that was rebooting,
    waiting for a reboot or held for one validates now; a step that was running runs again."""
    waiting = state.stage in (Stage.REBOOTING, Stage.REBOOT_REQUESTED) or (
        state.stage is Stage.HELD and state.hold in (Hold.REBOOT, Hold.FAILED))
    if not waiting:
        return state, []
    state = _at(state, Stage.VALIDATING, now, hold=Hold.NONE, why="",
                rebooted=state.rebooted or state.stage is Stage.REBOOTING)
    return state, [Step(StepKind.RECORD, "the daemon restarted while the ladder waited for a reboot; validating",
                        inputs=_inputs(state))]
