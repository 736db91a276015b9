"""The I/O around edge/partitioning/plan.py and sharing.py: one node's partitioning, kept and applied.

- `accept` takes the cloud's `NodePartitioning` (from the retained `partitioning` topic), keeps it
  in the edge store (so a reboot with no cloud re-applies it) and plans again at the next cycle.
- After every sampling cycle (`after_cycle`, a daemon cycle listener) each GPU's MIG side is
  compared with what is asked: a GPU to change is fenced (its devices are advertised unhealthy,
  so the kubelet places nothing new on it) and the layout is applied through NVML on the driver
  thread once no compute process is left. Every step is a decision in the outbox (rule
  `mig_layout`), recorded once per change of step, not once per cycle.
- Time-sliced GPUs: each pod's memory against its share (`sharing.check_shares`); going over is a
  decision (rule `memory_share`, action `record` or `evict_pod` as the partitioning says).
- `devices()` is what the device plugin advertises (edge/deviceplugin): the GPU, its replicas or its
  MIG devices; `changed` is set whenever that list may have changed.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from edge.deviceplugin.devices import PluginDevice, replica_id
from edge.devices.base import DriverError
from edge.driver.mig import NOT_SUPPORTED, MigDeviceInfo, MigDriver, MigState
from edge.driver.nvml import NvmlDriver
from edge.driver.runner import DriverRunner
from edge.partitioning.plan import (
    GpuMigFacts,
    GpuPlan,
    Sharing,
    Step,
    plan_gpu,
    sharing_for,
    wanted_layout,
)
from edge.partitioning.sharing import PodUse, ShareState, check_shares
from edge.pods import PodRef
from shared.dcgm import MIB, MigOnGpu
from shared.gpu import GpuInventory, GpuSample, Health
from shared.logs import get_logger
from shared.mig import COMPUTE_SLICES, ImpossibleLayout, compute_slices, mig_resource
from shared.partitioning import NodePartitioning
from shared.protocol import ActionOutcome, DecisionBody, Kind, MigDeviceSummary
from shared.wire import WireModel

log = get_logger(__name__)

MIG_CALL_TIMEOUT_S = 120.0  # creating seven instances takes seconds on a real A100


class GpuLike(Protocol):
    """What the manager reads of the daemon's GpuView."""

    inventory: GpuInventory
    sample: GpuSample | None
    draining: bool
    remediation: str | None  # the remediation ladder's stage: fenced while set
    device_nodes: tuple[str, ...]  # AMD, Intel: the GPU's /dev/dri nodes, for the device plugin's Allocate

    @property
    def health(self) -> Any: ...


class PartitioningStore(Protocol):
    """The edge store's methods the manager uses (edge/store/local.py)."""

    def cache_partitioning(self, partitioning: NodePartitioning) -> bool: ...

    def cached_partitioning(self) -> NodePartitioning | None: ...


Record = Callable[[list[tuple[Kind, WireModel]]], Awaitable[None]]
Resolve = Callable[[int], PodRef | None]


@dataclass
class GpuPartition:
    """One GPU's partitioning state."""

    mig: MigState | None = None
    plan: GpuPlan | None = None
    fenced: bool = False
    shares: ShareState = field(default_factory=ShareState)
    mig_used: dict[str, int] = field(default_factory=dict)  # MIG device uuid -> memory used (bytes)
    mig_energy_j: dict[str, float] = field(default_factory=dict)  # MIG device uuid -> joules since start
    last_energy_mj: int | None = None


class PartitionManager:
    def __init__(self, runner: DriverRunner, store: PartitioningStore, record: Record, *,
                 default_resource: str = "nvidia.com/gpu", resolve_pod: Resolve | None = None) -> None:
        self.runner = runner
        # MIG is NVML's (NVIDIA data-centre GPUs); on another backend no MIG call is made and a MIG
        # layout asked for is refused as "not on this backend" (time-slicing works on every backend)
        self.mig = MigDriver(runner.driver) if isinstance(runner.driver, NvmlDriver) else None
        self.backend_name = runner.driver.backend
        self.store = store
        self.record = record
        self.default_resource = default_resource
        self.resolve_pod = resolve_pod
        self.wanted: NodePartitioning | None = None
        self.gpus: dict[int, GpuPartition] = defaultdict(GpuPartition)
        self.changed = asyncio.Event()  # the device plugin's cue (edge/deviceplugin)
        self._views: dict[int, GpuLike] = {}
        self._advertised: list[PluginDevice] = []

    async def load(self) -> None:
        """The partitioning kept from before a restart: applied again with no cloud."""
        try:
            self.wanted = await asyncio.to_thread(self.store.cached_partitioning)
        except Exception as exc:  # noqa: BLE001 - a store problem must not stop the daemon
            log.error("cannot read the kept partitioning: %s", exc)
        if self.wanted is not None and self.wanted.name:
            log.info("partitioning %s v%d kept from before the restart: re-applied if the GPUs lost it",
                     self.wanted.name, self.wanted.version)

    async def accept(self, partitioning: NodePartitioning) -> bool:
        """A partitioning from the cloud; False when it is not newer than ours (ignored)."""
        try:
            newer = await asyncio.to_thread(self.store.cache_partitioning, partitioning)
        except Exception as exc:  # noqa: BLE001 - apply it anyway; it is re-sent retained
            log.error("cannot keep partitioning %s v%d, applying it anyway: %s", partitioning.name,
                      partitioning.version, exc)
            newer = True
        if not newer:
            return False
        self.wanted = partitioning
        for state in self.gpus.values():
            state.plan = None  # plan again, and record the new first step
        self.changed.set()
        log.info("partitioning %s v%d now applies", partitioning.name or "(none)", partitioning.version)
        return True

    # ---- every cycle -----------------------------------------------------------------------------

    async def after_cycle(self, views: Mapping[int, GpuLike]) -> None:
        self._views = dict(views)
        events: list[tuple[Kind, WireModel]] = []
        pods = await self._pods_of_shared_gpus(views)
        answering = not self.runner.not_answering  # no MIG call into a hung driver
        for index, view in sorted(views.items()):
            if not answering or view.sample is None or view.sample.lost:
                continue
            state = self.gpus[index]
            if state.mig is None:
                state.mig = await self._read(index)
                self.changed.set()
            await self._reconcile_mig(index, view, state, events)
            await self._read_mig_memory(index, state)
            self._split_energy(view, state)
            events += self._check_shares(index, view, state, pods)
        if events:
            await self.record(events)
        devices = self.devices()
        if devices != self._advertised:  # health, a drain, a fence, a new layout: the plugin says so
            self._advertised = devices
            self.changed.set()

    async def _pods_of_shared_gpus(self, views: Mapping[int, GpuLike]) -> dict[int, PodRef | None]:
        """pid -> its pod, for the processes of time-sliced GPUs (/proc reads: in a thread)."""
        resolve = self.resolve_pod
        if resolve is None:
            return {}
        pids = {p.pid for v in views.values() if v.sample is not None and self.sharing(v).replicas > 1
                for p in v.sample.processes}
        if not pids:
            return {}
        return await asyncio.to_thread(lambda: {pid: resolve(pid) for pid in pids})

    async def _read_mig_memory(self, index: int, state: GpuPartition) -> None:
        if self.mig is None or state.mig is None or not state.mig.enabled or not state.mig.devices:
            state.mig_used = {}
            return
        try:
            state.mig_used = await self.runner.call(self.mig.memory_used, index)
        except DriverError as exc:
            log.debug("cannot read the memory of GPU %d's MIG devices: %s", index, exc)
            state.mig_used = {}

    @staticmethod
    def _split_energy(view: GpuLike, state: GpuPartition) -> None:
        """The GPU's energy since the last cycle, shared among its MIG devices by compute slices
        (NVML measures power per board only: an estimate, as docs/partitioning.md says)."""
        energy = view.sample.energy_mj if view.sample is not None else None
        last, state.last_energy_mj = state.last_energy_mj, energy
        mig = state.mig
        if energy is None or last is None or energy < last or mig is None or not mig.enabled:
            return
        joules = (energy - last) / 1000.0
        for device in mig.devices:
            share = (compute_slices(device.profile) or 1) / COMPUTE_SLICES
            state.mig_energy_j[device.uuid] = state.mig_energy_j.get(device.uuid, 0.0) + joules * share

    def mig_energy(self) -> list[tuple[int, MigDeviceInfo, float]]:
        """(GPU index, MIG device, joules since the daemon started) of every MIG device."""
        out = []
        for index, state in sorted(self.gpus.items()):
            if state.mig is not None and state.mig.enabled:
                out += [(index, d, state.mig_energy_j.get(d.uuid, 0.0)) for d in state.mig.devices]
        return out

    async def _read(self, index: int) -> MigState | None:
        if self.mig is None:
            return NOT_SUPPORTED
        try:
            return await self.runner.call(self.mig.read, index)
        except DriverError as exc:
            log.warning("cannot read the MIG state of GPU %d: %s", index, exc)
            return None

    async def _reconcile_mig(self, index: int, view: GpuLike, state: GpuPartition,
                             events: list[tuple[Kind, WireModel]]) -> None:
        mig = state.mig
        if mig is None:
            return
        facts = GpuMigFacts(name=view.inventory.name, supported=mig.supported, enabled=mig.enabled,
                            profiles=tuple(d.profile for d in mig.devices),
                            processes=len(view.sample.processes) if view.sample else 0)
        plan = plan_gpu(facts, wanted_layout(self.wanted, view.inventory.name))
        if self.mig is None and plan.step is Step.REFUSE and plan.layout is None:
            layout = wanted_layout(self.wanted, view.inventory.name)
            plan = GpuPlan(Step.REFUSE, f"MIG is not on this backend ({self.backend_name}): layout "
                                        f"{layout.label() if layout else '?'} refused; time-slicing works here")
        if plan.step is Step.APPLY and plan.layout is not None:
            if not state.fenced:  # fence for one cycle first: the kubelet must stop placing pods
                state.fenced = True
                self.changed.set()
                plan = GpuPlan(Step.WAIT_DRAIN, "fenced: applying at the next cycle if the GPU is still idle",
                               plan.layout)
            else:
                await self._apply(index, view, state, plan, events)
                return
        first_quiet = state.plan is None and plan.step is Step.NONE  # nothing asked, nothing done: no event
        if not first_quiet and (state.plan is None or (state.plan.step, state.plan.reason) != (plan.step, plan.reason)):
            events.append(self._decision(index, view, plan, ActionOutcome.RECORDED))
            log.info("GPU %d: %s", index, plan.reason, extra={"gpu": view.inventory.uuid, "step": plan.step.value})
        fenced = plan.step is Step.WAIT_DRAIN
        if fenced != state.fenced:
            state.fenced = fenced
            self.changed.set()
        state.plan = plan

    async def _apply(self, index: int, view: GpuLike, state: GpuPartition, plan: GpuPlan,
                     events: list[tuple[Kind, WireModel]]) -> None:
        assert plan.layout is not None and self.mig is not None
        try:
            state.mig = await self.runner.call(self.mig.apply, index, view.inventory.name, plan.layout,
                                               timeout_s=MIG_CALL_TIMEOUT_S)
            done = GpuPlan(Step.NONE, f"layout {plan.layout.label()} applied", plan.layout)
            outcome = ActionOutcome.APPLIED
        except ImpossibleLayout as exc:
            done = GpuPlan(Step.REFUSE, f"layout {plan.layout.label()} refused: {exc}", plan.layout)
            outcome = ActionOutcome.ADVISORY
        except DriverError as exc:
            done = GpuPlan(Step.REFUSE, f"layout {plan.layout.label()} failed: {exc}", plan.layout)
            outcome = ActionOutcome.FAILED
            state.mig = await self._read(index)
        events.append(self._decision(index, view, done, outcome))
        log.info("GPU %d: %s", index, done.reason, extra={"gpu": view.inventory.uuid})
        state.plan, state.fenced = done, False
        self.changed.set()

    def _decision(self, index: int, view: GpuLike, plan: GpuPlan, outcome: ActionOutcome) -> tuple[Kind, WireModel]:
        action = {Step.NONE: "apply_mig_layout", Step.APPLY: "apply_mig_layout", Step.WAIT_DRAIN: "wait_for_drain",
                  Step.REFUSE: "refuse_mig_layout"}[plan.step]
        wanted = self.wanted
        return Kind.DECISION, DecisionBody(
            gpu_index=index, gpu_uuid=view.inventory.uuid, rule="mig_layout", action=action, outcome=outcome,
            reason=plan.reason,
            inputs={"layout": plan.layout.label() if plan.layout else None,
                    "partitioning": wanted.name if wanted else None,
                    "partitioning_version": wanted.version if wanted else None})

    def _check_shares(self, index: int, view: GpuLike, state: GpuPartition,
                      pods: dict[int, PodRef | None]) -> list[tuple[Kind, WireModel]]:
        sharing = self.sharing(view)
        if sharing.replicas <= 1 or view.sample is None:
            state.shares = ShareState()
            return []
        used: dict[tuple[str, str], int] = defaultdict(int)
        for process in view.sample.processes:
            ref = pods.get(process.pid)
            if ref is not None and process.used_memory_bytes:
                used[(ref.namespace, ref.pod)] += process.used_memory_bytes
        uses = [PodUse(namespace, pod, amount) for (namespace, pod), amount in used.items()]
        state.shares, over, _back = check_shares(state.shares, view.inventory.memory_total_bytes,
                                                 sharing.replicas, uses)
        action = "evict_pod" if sharing.memory_enforcement == "evict" else "record"
        return [(Kind.DECISION, DecisionBody(
            gpu_index=index, gpu_uuid=view.inventory.uuid, rule="memory_share", action=action,
            value=float(pod.used_bytes), outcome=ActionOutcome.RECORDED,
            reason=f"pod {pod.namespace}/{pod.pod} uses {pod.used_bytes / 2**20:.0f} MiB of GPU memory, over its "
                   f"share of {pod.share_bytes / 2**20:.0f} MiB (1 of {sharing.replicas} replicas)",
            inputs={"namespace": pod.namespace, "pod": pod.pod, "used_bytes": pod.used_bytes,
                    "share_bytes": pod.share_bytes})) for pod in over]

    # ---- reads: the device plugin, the status, metrics -------------------------------------------

    def sharing(self, view: GpuLike) -> Sharing:
        return sharing_for(self.wanted, view.inventory.name, self.default_resource)

    def devices(self) -> list[PluginDevice]:
        """Every device the plugin advertises now, of every resource."""
        devices: list[PluginDevice] = []
        for index, view in sorted(self._views.items()):
            state = self.gpus.get(index)
            healthy = (view.health.health is Health.HEALTHY and not view.draining and view.remediation is None
                       and not (state is not None and state.fenced))
            uuid, numa = view.inventory.uuid, view.inventory.numa_node
            backend, nodes = view.inventory.backend, view.device_nodes
            mig = state.mig if state is not None else None
            if mig is not None and mig.enabled:
                devices += [PluginDevice(id=d.uuid, gpu_uuid=uuid, visible_id=d.uuid, healthy=healthy,
                                         numa_node=numa, resource=mig_resource(d.profile)) for d in mig.devices]
                continue
            sharing = self.sharing(view)
            if sharing.replicas > 1:
                devices += [PluginDevice(id=replica_id(uuid, n), gpu_uuid=uuid, visible_id=uuid, healthy=healthy,
                                         numa_node=numa, resource=sharing.resource, backend=backend,
                                         device_nodes=nodes)
                            for n in range(sharing.replicas)]
            else:
                devices.append(PluginDevice(id=uuid, gpu_uuid=uuid, visible_id=uuid, healthy=healthy,
                                            numa_node=numa, resource=self.default_resource, backend=backend,
                                            device_nodes=nodes))
        return devices

    def summary(self, index: int, view: GpuLike) -> dict[str, Any]:
        """The GpuSummary fields of a GPU's partitioning (mig_mode, mig_devices, replicas)."""
        state = self.gpus.get(index)
        mig = state.mig if state is not None else None
        fields: dict[str, Any] = {}
        if mig is not None:
            fields["mig_mode"] = mig.enabled if mig.supported else None
            health = view.health.health
            fields["mig_devices"] = [MigDeviceSummary(uuid=d.uuid, profile=d.profile, gi_id=d.gi_id, ci_id=d.ci_id,
                                                      memory_total_bytes=d.memory_total_bytes, health=health)
                                     for d in mig.devices] if mig.enabled else []
        if not (mig is not None and mig.enabled):
            fields["replicas"] = self.sharing(view).replicas
        return fields

    def mig_devices(self, index: int) -> list[MigOnGpu]:
        """The GPU's MIG devices with their memory, for dcgm-exporter's per-instance series."""
        state = self.gpus.get(index)
        if state is None or state.mig is None or not state.mig.enabled:
            return []
        return [MigOnGpu(profile=d.profile, gi_id=d.gi_id,
                         used_mib=state.mig_used[d.uuid] / MIB if d.uuid in state.mig_used else None,
                         total_mib=d.memory_total_bytes / MIB) for d in state.mig.devices]

    def status_fields(self) -> dict[str, Any]:
        """StatusBody's partitioning_name, _version and _state."""
        wanted = self.wanted
        if wanted is None or not wanted.name:
            return {}
        steps = [f"GPU {i}: {s.plan.reason}" for i, s in sorted(self.gpus.items())
                 if s.plan is not None and s.plan.step is not Step.NONE]
        return {"partitioning_name": wanted.name, "partitioning_version": wanted.version,
                "partitioning_state": ("; ".join(steps) if steps else "applied")[:1000]}
