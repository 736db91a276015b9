"""The I/O around edge/remediation/ladder.py: a daemon cycle listener that keeps one ladder per GPU.

After every sampling cycle (`after_cycle`) each GPU's facts (the XIDs the daemon handed over with
`note_xids`, row remaps, DBE rises and temperature from the sample, processes, the pods the pod map
knows on it) go through the pure planner; the steps that need I/O (diagnostics, the reset, the
reboot) run as asyncio tasks bounded in time, and their result is settled at a later cycle, so a
two-minute diagnostic never holds the daemon's loop or its cycle. Every step is a decision in the
outbox (rule `remediation`); a reboot request is a REBOOT_REQUEST event. The ladders are kept in
the edge store's meta table after every change, so that a ladder resumes after a restart of the
daemon, including after the reboot it asked for (persisted as "rebooting" before the command).
`stage(uuid)` is where a GPU stands (GpuSummary.remediation); while it is not None the device
plugin advertises the GPU unhealthy.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Protocol

from edge import health as health_rules
from edge.config import EdgeSettings
from edge.devices.base import Capability, DriverError, DriverUnavailable
from edge.driver.runner import DriverRunner, DriverTimeout
from edge.remediation import diagnostics
from edge.remediation.catalogue import Remedy
from edge.remediation.ladder import (
    RULE,
    Facts,
    Fault,
    LadderSettings,
    LadderState,
    Stage,
    Step,
    StepKind,
    StepResult,
    grant,
    plan,
    resume,
    settle,
    xid_fault,
)
from shared.gpu import GpuInventory, GpuSample, Health, XidEvent
from shared.logs import get_logger
from shared.policy import PowerPolicy
from shared.protocol import (
    ActionOutcome,
    CommandBody,
    DecisionBody,
    HealthBody,
    Kind,
    MigrationRequestBody,
    RebootRequestBody,
)
from shared.wire import WireModel

log = get_logger(__name__)

# The reset command where --remediation-reset-command is left at its default (nvidia-smi's, for NVML).
# A backend absent here has no reset command of its own: its ladder goes from the diagnosis to the
# reboot step, and says so.
VENDOR_RESET_COMMANDS = {"amd": "amd-smi reset --gpureset -g {index}"}
INTERFACES = {"nvml": "NVML", "jetson": "sysfs", "amd": "amdsmi", "intel": "sysfs"}

Record = Callable[[list[tuple[Kind, WireModel]]], Awaitable[None]]
Events = list[tuple[Kind, WireModel]]


class GpuLike(Protocol):
    """What the manager reads and sets of the daemon's GpuView (edge/cycle.py)."""

    inventory: GpuInventory
    sample: GpuSample | None
    health: health_rules.GpuHealthState
    draining: bool
    remediation: str | None
    next_probe_at: float


class RemediationStore(Protocol):
    """The edge store's methods the manager uses (edge/store/local.py, the meta table)."""

    def save_remediation(self, state: str) -> None: ...

    def saved_remediation(self) -> str | None: ...


class RemediationManager:
    def __init__(self, settings: EdgeSettings, runner: DriverRunner, store: RemediationStore, record: Record, *,
                 pods_of: Callable[[str], list[str]], api_url: str | None,
                 policy_of: Callable[[], PowerPolicy] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.runner = runner
        self.store = store
        self.record = record
        self.pods_of = pods_of
        self.env: dict[str, str] = {}
        self.set_api_url(api_url)
        self.policy_of = policy_of or (lambda: settings.policy)
        self.clock = clock
        # the backend (edge/devices/): NVML's checks (recovery action, dcgmi, the CUDA probe) only on
        # NVML; the reset step only where the device has one (Capability.RESET) and a command for it
        self.backend = runner.driver.backend
        self.reset_command = settings.remediation_reset_command
        if self.backend != "nvml" and "remediation_reset_command" not in settings.model_fields_set:
            self.reset_command = VENDOR_RESET_COMMANDS.get(self.backend)
        self.rules = LadderSettings(drain_timeout_s=settings.remediation_drain_timeout,
                                    max_resets=settings.remediation_max_resets,
                                    reset_available=bool(self.reset_command),
                                    reboot=settings.remediation_reboot,
                                    reboot_settle_s=settings.remediation_reboot_settle,
                                    no_reset_reason="no GPU reset available" if self.backend == "nvml" else
                                    f"no reset command for the {self.backend} backend (--remediation-reset-command)")
        self.ladders: dict[str, LadderState] = {}  # GPU uuid -> its ladder (absent: in service)
        self.save_error: str | None = None
        self._tasks: dict[str, asyncio.Task[StepResult]] = {}
        self._xids: dict[str, list[XidEvent]] = {}
        self._dbe_seen: dict[str, int] = {}
        self._resumed: dict[str, list[Step]] = {}  # steps of `load` recorded at the first cycle
        self._saved: str | None = None
        self._inventories: dict[str, GpuInventory] = {}  # GPU uuid -> inventory, as of the last cycle

    def rules_for(self, inventory: GpuInventory) -> LadderSettings:
        """The ladder's settings for one GPU: without a reset on its backend (Capability.RESET, and a
        command for it), a fault that needs one goes from the diagnosis to the reboot step, saying why."""
        if self.backend == "nvml":
            return self.rules
        if Capability.RESET not in inventory.capabilities:
            return replace(self.rules, reset_available=False,
                           no_reset_reason=f"no GPU reset on this device ({self.backend} backend)")
        return self.rules

    # ---- persistence ----------------------------------------------------------------------------

    async def load(self) -> None:
        """The ladders kept from before a restart (or the reboot they asked for)."""
        if not self.settings.remediation:
            return
        try:
            text = await asyncio.to_thread(self.store.saved_remediation)
        except Exception as exc:  # noqa: BLE001 - a store problem must not stop the daemon
            log.error("cannot read the remediation ladders kept before the restart: %s", exc)
            return
        if not text:
            return
        try:
            raw = json.loads(text)
            kept = {str(uuid): LadderState.from_json(entry) for uuid, entry in raw.items()}
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            log.error("the kept remediation ladders are unreadable, starting without them: %s", exc)
            return
        now = self.clock()
        for uuid, state in kept.items():
            state, steps = resume(state, now)
            self.ladders[uuid] = state
            self._resumed[uuid] = steps
            log.info("remediation ladder of GPU %s resumed at %s", uuid, state.label, extra={"gpu": uuid})
        self._saved = text

    async def _save(self) -> bool:
        text = json.dumps({uuid: s.to_json() for uuid, s in sorted(self.ladders.items())
                           if s.stage is not Stage.IN_SERVICE}, sort_keys=True)
        if text == self._saved:
            return True
        try:
            await asyncio.to_thread(self.store.save_remediation, text)
        except Exception as exc:  # noqa: BLE001 - kept in memory; written at the next change
            if self.save_error is None:
                log.error("cannot keep the remediation ladders in the store: %s", exc)
            self.save_error = str(exc)
            return False
        self.save_error = None
        self._saved = text
        return True

    def set_api_url(self, api_url: str | None) -> None:
        """The daemon's own API, as `KGPU_EDGE_API` for the commands (known once it listens)."""
        self.env = {"KGPU_EDGE_API": api_url} if api_url else {}

    async def stop(self) -> None:
        """Cancel the steps still running (their commands are killed); a restart runs them again."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- inputs ---------------------------------------------------------------------------------

    def note_xids(self, xids: Sequence[XidEvent]) -> None:
        """The XIDs of this cycle (the daemon drains them from the NVML event set)."""
        for xid in xids:
            self._xids.setdefault(xid.uuid, []).append(xid)

    def stage(self, gpu_uuid: str) -> str | None:
        """Where the GPU's ladder stands; None: in service (GpuSummary.remediation, the fence)."""
        state = self.ladders.get(gpu_uuid) if self.settings.remediation else None
        return state.label if state is not None else None

    # ---- every cycle ----------------------------------------------------------------------------

    async def after_cycle(self, views: Mapping[int, GpuLike]) -> None:
        if not self.settings.remediation:
            self._xids.clear()
            return
        if self.runner.not_answering:  # a hung driver: no step until it answers (its XIDs wait)
            return
        now = self.clock()
        events: Events = []
        for index, view in sorted(views.items()):
            uuid = view.inventory.uuid
            self._inventories[uuid] = view.inventory
            state = self.ladders.get(uuid, LadderState())
            if state.stage in (Stage.REBOOTING, Stage.VALIDATING):
                view.next_probe_at = 0.0  # a GPU lost before the reboot or reset is probed every cycle
            steps = self._resumed.pop(uuid, [])
            task = self._tasks.get(uuid)
            if task is not None:
                if task.done():
                    del self._tasks[uuid]
                    state, settled = settle(state, task.result(), self.rules_for(view.inventory), now)
                    steps += settled
                    if task.result().kind in (StepKind.RESET, StepKind.REBOOT):
                        view.next_probe_at = 0.0  # the daemon probes a lost GPU again at the next cycle
                # a running step, or one settled now: plan again at the next cycle, on a fresh sample
                self._note_dbe(view.sample, uuid)
            else:
                facts = self._facts(view, self._xids.pop(uuid, []))
                before = state
                state, planned = plan(state, facts, self.rules_for(view.inventory), now)
                steps += planned
                if before.stage is Stage.IN_SERVICE and state.stage is not Stage.IN_SERVICE:
                    events += self._ask_to_move(index, view, state, facts)
            events += self._apply(index, view, state, steps, now)
            if state.stage is Stage.IN_SERVICE:
                self.ladders.pop(uuid, None)
            else:
                self.ladders[uuid] = state
            view.remediation = state.label
        present = {view.inventory.uuid for view in views.values()}
        for gone in set(self._xids) - present:  # XIDs of a GPU the daemon no longer shows
            del self._xids[gone]
        if events:
            await self.record(events)
        await self._save()

    def _facts(self, view: GpuLike, xids: list[XidEvent]) -> Facts:
        index, sample = view.inventory.index, view.sample
        faults: list[Fault] = [xid_fault(xid.xid, index) for xid in xids]
        thermal = self.policy_of().thermal_throttling
        lost = sample is None or sample.lost
        if sample is not None and not lost:
            if sample.remap_pending:
                faults.append(Fault("row remap pending", Remedy.RESET,
                                    f"GPU {index} has a row remap pending (a GPU reset applies it)"))
            if sample.remap_failure:
                faults.append(Fault("row remap failure", Remedy.RESET, f"GPU {index} reports a row remap failure"))
            if self._note_dbe(sample, view.inventory.uuid):
                faults.append(Fault("uncorrectable ECC", Remedy.RESET,
                                    f"GPU {index} volatile double-bit ECC errors rose to {sample.ecc_dbe_volatile}"))
            if sample.temperature_c is not None and sample.temperature_c >= thermal.critical_temp_c:
                faults.append(Fault("critical temperature", Remedy.COOL,
                                    f"GPU {index} at {sample.temperature_c:.1f} °C >= criticalTempC "
                                    f"{thermal.critical_temp_c:.1f}"))
        return Facts(faults=tuple(faults), processes=None if sample is None or lost else len(sample.processes),
                     pods=len(self.pods_of(view.inventory.uuid)),
                     temperature_c=None if sample is None or lost else sample.temperature_c,
                     cool_below_c=thermal.critical_temp_c - thermal.hysteresis_c)

    def _note_dbe(self, sample: GpuSample | None, uuid: str) -> bool:
        """Whether the volatile DBE counter rose since the last sample (the first only sets it)."""
        dbe = sample.ecc_dbe_volatile if sample is not None and not sample.lost else None
        if dbe is None:
            return False
        seen = self._dbe_seen.get(uuid)
        self._dbe_seen[uuid] = dbe
        return seen is not None and dbe > seen

    def _ask_to_move(self, index: int, view: GpuLike, state: LadderState, facts: Facts) -> Events:
        """A fenced GPU's work must leave before a reset: ask the cloud to move it, unless the
        health rules asked already for this episode."""
        busy = facts.processes if facts.processes is not None else facts.pods
        if not busy or view.health.migration_requested:
            return []
        view.health = replace(view.health, migration_requested=True)
        return [(Kind.MIGRATION_REQUEST, MigrationRequestBody(
            gpu_index=index, gpu_uuid=view.inventory.uuid, trigger=RULE,
            reason=f"GPU {index} fenced for remediation ({state.fault}); its work must move before the reset"))]

    # ---- the steps ------------------------------------------------------------------------------

    def _apply(self, index: int, view: GpuLike, state: LadderState, steps: list[Step], now: float) -> Events:
        events: Events = []
        uuid = view.inventory.uuid
        for step in steps:
            if step.run:
                self._tasks[uuid] = asyncio.create_task(self._run(step.kind, view))
                log.info("GPU %d: %s", index, step.reason, extra={"gpu": uuid, "step": step.kind.value})
                continue
            events.append(self._decision(index, uuid, step, state))
            log.info("GPU %d remediation %s: %s", index, step.kind.value, step.reason,
                     extra={"gpu": uuid, "step": step.kind.value, "outcome": step.outcome.value})
            if step.kind is StepKind.REQUEST_REBOOT:
                events.append((Kind.REBOOT_REQUEST, RebootRequestBody(
                    gpu_index=index, gpu_uuid=uuid, reason=step.reason[:2000], attempt=max(1, state.attempt))))
            elif step.kind is StepKind.RESTORE:
                events += self._restore(index, view, now)
        return events

    def _restore(self, index: int, view: GpuLike, now: float) -> Events:
        previous = view.health
        view.health, action = health_rules.validated(previous, now, index=index, uuid=view.inventory.uuid)
        events: Events = [(Kind.DECISION, DecisionBody(
            gpu_index=index, gpu_uuid=view.inventory.uuid, rule=action.rule, action=action.kind.value,
            outcome=ActionOutcome.APPLIED, reason=action.reason, inputs=dict(action.inputs)))]
        if previous.health is not Health.HEALTHY:
            events.append((Kind.HEALTH, HealthBody(level="gpu", gpu_index=index, gpu_uuid=view.inventory.uuid,
                                                   previous=previous.health, current=view.health.health,
                                                   reasons=["validated by the remediation ladder"])))
        return events

    @staticmethod
    def _decision(index: int, uuid: str, step: Step, state: LadderState) -> tuple[Kind, WireModel]:
        return Kind.DECISION, DecisionBody(
            gpu_index=index, gpu_uuid=uuid, rule=RULE, action=step.kind.value, outcome=step.outcome,
            reason=f"GPU {index}: {step.reason}"[:4000], inputs={**step.inputs, "stage": state.label})

    async def _run(self, kind: StepKind, view: GpuLike) -> StepResult:
        """A step's I/O; never raises (a failure is a failed step)."""
        try:
            if kind in (StepKind.DIAGNOSE, StepKind.VALIDATE):
                ok, detail = await self._diagnose(view, commands_always=kind is StepKind.VALIDATE)
                return StepResult(kind, ok, detail)
            s = self.settings
            template = self.reset_command if kind is StepKind.RESET else s.remediation_reboot_command
            timeout = s.remediation_reset_timeout
            if not template:
                return StepResult(kind, False, "no command configured")
            outcome = await diagnostics.run_command(diagnostics.fill(template, view.inventory), timeout, self.env)
            return StepResult(kind, outcome.ok, outcome.detail)
        except Exception as exc:  # a broken step must not end the ladder
            log.exception("remediation step %s failed", kind.value)
            return StepResult(kind, False, f"{type(exc).__name__}: {exc}")

    async def _diagnose(self, view: GpuLike, *, commands_always: bool) -> tuple[bool, str]:
        """NVML checks, then the CUDA probe and dcgmi where configured (each bounded). Before the
        reset, a GPU that already fails NVML's checks is not probed further: the reset comes next.
        On another backend: the same checks of its sample; the CUDA probe only on NVIDIA (Jetson),
        dcgmi and NVML's recovery action only on NVML."""
        index = view.inventory.index
        action: int | None = None
        nvml = self.backend == "nvml"
        if nvml and view.sample is not None and not view.sample.lost and not self.runner.not_answering:
            try:
                action = await self.runner.call(diagnostics.read_recovery_action, index)
            except (DriverError, DriverUnavailable, DriverTimeout) as exc:
                log.debug("cannot read GPU %d's recovery action: %s", index, exc)
        interface = INTERFACES.get(self.backend, self.backend)
        checks = diagnostics.nvml_checks(view.sample, self.policy_of().thermal_throttling.critical_temp_c, action,
                                         interface)
        ok, detail = diagnostics.summary(checks)
        parts = [f"{interface.lower()}: {detail}"]
        if not ok and not commands_always:
            return False, parts[0]
        s = self.settings
        commands = [("cuda probe", s.remediation_cuda_probe_command if view.inventory.vendor == "nvidia" else None),
                    ("dcgm", s.remediation_dcgm_command if nvml and s.remediation_dcgm_command
                     and diagnostics.available(s.remediation_dcgm_command) else None)]
        for name, template in commands:
            if not template:
                continue
            outcome = await diagnostics.run_command(diagnostics.fill(template, view.inventory),
                                                    s.remediation_diag_timeout, self.env)
            ok = ok and outcome.ok
            parts.append(f"{name}: {outcome.detail}")
        return ok, " | ".join(parts)

    # ---- the cloud's grant ----------------------------------------------------------------------

    async def on_reboot_granted(self, command: CommandBody) -> tuple[bool, str]:
        """The cloud's `reboot` command: refused unless a ladder of this node asked for it."""
        asked = {uuid: s for uuid, s in self.ladders.items() if s.stage is Stage.REBOOT_REQUESTED}
        if not asked:
            rebooted = sorted(uuid for uuid, s in self.ladders.items() if s.rebooted)
            if rebooted:  # the grant sent again after the reboot it caused: done, not twice
                return True, f"already rebooted for {', '.join(rebooted)}; not rebooting again"
            return False, "refused: no GPU of this node asked for a reboot"
        if command.gpu_uuid is not None and command.gpu_uuid not in asked:
            return False, f"refused: GPU {command.gpu_uuid} did not ask for a reboot"
        template = self.settings.remediation_reboot_command
        if self.settings.remediation_reboot != "request" or not template:
            return False, "refused: this node does not reboot on request (remediation_reboot, reboot command)"
        now = self.clock()
        granted: dict[str, list[Step]] = {}
        for uuid, state in asked.items():
            self.ladders[uuid], granted[uuid] = grant(state, now)
        if not await self._save():  # a reboot must find its ladders again
            self.ladders.update(asked)
            return False, f"refused: cannot keep the ladders' state before rebooting: {self.save_error}"
        await self.record(self._decisions(granted))  # on disk before the node goes down
        gpu = self._inventories.get(next(iter(asked)))
        line = diagnostics.fill(template, gpu) if gpu is not None else template
        log.warning("rebooting the node: granted by the cloud (request %s)", command.args.get("request"))
        outcome = await diagnostics.run_command(line, self.settings.remediation_reset_timeout, self.env)
        settled: dict[str, list[Step]] = {}
        for uuid in asked:
            result = StepResult(StepKind.REBOOT, outcome.ok, outcome.detail)
            self.ladders[uuid], settled[uuid] = settle(self.ladders[uuid], result, self.rules, now)
        await self.record(self._decisions(settled))
        await self._save()
        return outcome.ok, ("rebooting: " if outcome.ok else "reboot failed: ") + outcome.detail

    def _decisions(self, steps: Mapping[str, list[Step]]) -> Events:
        events: Events = []
        for uuid, some in steps.items():
            gpu = self._inventories.get(uuid)
            index = gpu.index if gpu is not None else -1
            events += [self._decision(index, uuid, step, self.ladders[uuid]) for step in some]
        return events
