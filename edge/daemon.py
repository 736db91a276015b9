"""The edge daemon's main loop: sample → health → policy → act → record.

Everything blocking (NVML, SQLite, /proc, the probe command) runs off the event loop: NVML on
the driver runner's dedicated thread, SQLite and /proc through `asyncio.to_thread`. The
decision functions (`edge.health.assess`, `edge.policy.evaluate`) are pure; this module is
the I/O around them.

If the store cannot be written (disk full, read-only), the daemon keeps enforcing its policy,
holds the events it could not write in memory and writes them once the store accepts writes
again; `/healthz` reports it degraded meanwhile. A broken database file is moved aside and a
fresh store starts; a file that cannot be opened at all leaves the daemon on a temporary store
(edge/store/recovery.py): either way enforcement goes on and `degraded` says what happened.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from edge import health as health_rules
from edge.actions import DRIVER_ACTIONS, Action, ActionKind
from edge.config import EdgeSettings
from edge.cycle import GpuView, decide
from edge.deviceplugin.devices import drm_nodes
from edge.devices.base import Capability, DeviceBackend, DriverError, DriverRefused, DriverUnavailable
from edge.devices.select import make_backend
from edge.driver.nvml import NvmlDriver
from edge.driver.runner import DriverRunner, DriverTimeout
from edge.driver.xid import XidWatcher
from edge.energy import EnergyAccountant
from edge.partitioning.manager import PartitionManager
from edge.podresources import GpuPodMap
from edge.pods import PodRef, PodResolver
from edge.probe import run_probe
from edge.remediation.manager import RemediationManager
from edge.sampling import Sampler
from edge.store import StoreError, open_edge_store
from shared import __version__
from shared.aio import wait_event
from shared.gpu import GpuInventory, GpuSample, XidEvent
from shared.logs import get_logger
from shared.policy import PowerPolicy
from shared.protocol import (
    ActionOutcome,
    CommandBody,
    DecisionBody,
    GpuSummary,
    Kind,
    StatusBody,
)
from shared.wire import WireModel

log = get_logger(__name__)

# Events that could not be written while the store was failing are held in memory up to this
# many; beyond it the oldest are dropped and counted (kgpu_events_dropped_total).
MAX_HELD_EVENTS = 50_000
PRUNE_EVERY_S = 60.0
POD_ENERGY_IDLE_S = 24 * 3600.0  # a pod's energy counter is dropped after a day without GPU work


@dataclass
class DaemonCounters:
    decisions: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # rule, action, outcome
    xids: Counter[tuple[int, int]] = field(default_factory=Counter)  # gpu index, xid
    store_errors: int = 0
    events_dropped: int = 0
    cycles: int = 0
    cycle_seconds_sum: float = 0.0
    last_cycle_seconds: float = 0.0


class EdgeDaemon:
    def __init__(self, settings: EdgeSettings, *, sim: Any | None = None, backend: DeviceBackend | None = None) -> None:
        self.settings = settings
        self.node: str = settings.node or ""
        self.sim = sim  # the simulation when --backend sim (SimulatedNvml or a vendor's): the fault endpoint
        # the device backend (edge/devices/): NVML, Jetson, AMD or Intel; chosen by edge/devices/select.py
        self.backend: DeviceBackend = backend if backend is not None else make_backend(settings, sim)
        self.runner = DriverRunner(self.backend, timeout_s=settings.nvml_timeout)
        self.sampler = Sampler(self.runner, settings.lost_probe_interval,
                               note_reachable=self._note_reachable, on_back=self._gpu_back)
        self.store, self.store_recovery = open_edge_store(settings.db, self.node)
        self.store.set_outbox_bound(settings.outbox_max_bytes, settings.outbox_max_events)
        self.energy = EnergyAccountant()
        self.pods = PodResolver(settings.proc_root, settings.pod_list_url)
        self.counters = DaemonCounters()
        self.log_rows_pruned = 0
        self.gpus: dict[int, GpuView] = {}
        self.driver_reachable = False
        self.driver_version: str | None = None
        self._driver_problem: str | None = None  # what the last failed open said (said once, not per retry)
        self.probe_ok: bool | None = None
        self.probe_detail = ""
        self.store_problem: str | None = None
        self.outbox_depth = 0
        self.policy, self.policy_source = self._initial_policy()
        self._drained_at_start = self._initial_draining()
        self.started_at = time.time()
        self._steady_anchor = self.started_at - time.monotonic()
        self._held: list[tuple[Kind, WireModel]] = []
        self._xids: asyncio.Queue[XidEvent] = asyncio.Queue()
        self._xid_watcher: XidWatcher | None = None
        self._last_prune = 0.0
        self._cycle_pods: dict[int, PodRef | None] = {}  # this cycle's PIDs -> pods (energy, then the pod map)
        self._stop = asyncio.Event()
        # Set whenever new events reach the outbox, so the sync can drain at once.
        self.outbox_changed = asyncio.Event()
        self._cycle_lock = asyncio.Lock()
        self._wake = asyncio.Event()  # an XID arrived: run a cycle before the interval is up
        # Called after every sampling cycle with its samples (the sync publishes telemetry).
        self.sync: Any = None  # the EdgeSync when --mqtt is given (read by metrics)
        self.cycle_listeners: list[Callable[[dict[int, GpuSample | None]], Awaitable[None]]] = []
        # MIG layouts and time-slicing from the cloud; the device plugin's device list (edge/partitioning/)
        # the remediation ladder: fence, drain, diagnose, reset, validate, reboot (edge/remediation/);
        # before the partitions' listener, which notices the fence and tells the device plugin
        self.pod_map = GpuPodMap(settings.pod_resources_socket, self.pods.resolve)
        self.remediation = RemediationManager(
            settings, self.runner, self.store, self.record, pods_of=self.pod_map.pods_of,
            api_url=settings.local_api_url, policy_of=lambda: self.policy, clock=self.steady_now)
        if settings.remediation:
            self.cycle_listeners.append(lambda _samples: self.remediation.after_cycle(self.gpus))
        self.partitions = PartitionManager(self.runner, self.store, self.record,
                                           default_resource=self.resource_name, resolve_pod=self.pods.resolve)
        self.cycle_listeners.append(lambda _samples: self.partitions.after_cycle(self.gpus))
        # which pod uses which GPU (the kubelet's pod-resources API, else NVML's processes): the
        # status lists them, so that a fault moves only that GPU's pods (edge/podresources/)
        self.cycle_listeners.append(lambda _samples: self._refresh_pod_map())

    # ---- set-up -------------------------------------------------------------------------

    @property
    def resource_name(self) -> str:
        """The extended resource whole GPUs are advertised as: --resource-name, else the backend's."""
        return self.settings.resource_name or self.backend.resource_name

    def _initial_policy(self) -> tuple[PowerPolicy, str]:
        """The cached policy (last one from the cloud) wins over the config file's when newer."""
        configured = self.settings.policy
        try:
            cached = self.store.cached_policy()
        except StoreError as exc:
            log.error("cannot read the cached policy, using the configured one: %s", exc)
            cached = None
        if cached is not None and cached.version >= configured.version:
            return cached, "cache"
        return configured, "config"

    def _initial_draining(self) -> set[str]:
        """The GPUs left draining by the cloud before a restart: a drain lasts until `undrain`."""
        try:
            return self.store.draining()
        except StoreError as exc:
            log.error("cannot read which GPUs are draining; none until the cloud says again: %s", exc)
            return set()

    def draining_uuids(self) -> set[str]:
        """The GPUs draining now, plus those drained before a restart that the driver has not
        shown again yet (so that a command run meanwhile does not forget them)."""
        known = {v.inventory.uuid for v in self.gpus.values()}
        return {v.inventory.uuid for v in self.gpus.values() if v.draining} | (self._drained_at_start - known)

    async def start(self) -> None:
        await self.runner.start()
        await self.partitions.load()
        await self.remediation.load()
        await self._open_driver()
        await self._refresh_outbox_depth()
        log.info(
            "edge daemon started",
            extra={"gpus": len(self.gpus), "policy": self.policy.name, "policy_version": self.policy.version,
                   "policy_source": self.policy_source, "backend": self.backend.backend,
                   "resource": self.resource_name},
        )

    async def _open_driver(self) -> None:
        try:
            await self.runner.call(self.runner.driver.open)
            inventory: list[GpuInventory] = await self.runner.call(self.runner.driver.inventory)
        except (DriverError, DriverUnavailable, DriverTimeout) as exc:
            self.driver_reachable = False
            if str(exc) != self._driver_problem:  # a new cause is said; the retries of the same one are quiet
                log.error("GPU driver not reachable: %s; retrying every cycle", exc)
            else:
                log.debug("GPU driver still not reachable: %s", exc)
            self._driver_problem = str(exc)
            return
        if self._driver_problem is not None:
            log.info("GPU driver reachable again")
            self._driver_problem = None
        self.driver_reachable = True
        self.driver_version = inventory[0].driver_version if inventory else None
        self.partitions.default_resource = self.resource_name  # a backend may learn its name on open (i915/xe)
        self._start_xid_watcher(inventory)
        nodes = await asyncio.to_thread(lambda: {gpu.index: drm_nodes(self.settings.sysfs_root, gpu.pci_bus_id)
                                                 for gpu in inventory if gpu.vendor != "nvidia"})
        for gpu in inventory:
            view = self.gpus.get(gpu.index)
            if view is None:
                view = self.gpus[gpu.index] = GpuView(inventory=gpu, draining=gpu.uuid in self._drained_at_start)
            else:
                view.inventory = gpu
            view.device_nodes = nodes.get(gpu.index, ())
        try:
            await asyncio.to_thread(self.store.save_inventory, inventory)
        except StoreError as exc:
            log.warning("cannot save the inventory: %s", exc)

    def _start_xid_watcher(self, inventory: list[GpuInventory]) -> None:
        """XIDs arrive on the watcher's own thread; hand each to the loop's queue. Only NVML has
        them (Capability.XID_EVENTS); the other backends' faults show in their samples."""
        if self._xid_watcher is not None or not isinstance(self.backend, NvmlDriver):
            return
        if inventory and not any(Capability.XID_EVENTS in gpu.capabilities for gpu in inventory):
            return
        loop = asyncio.get_running_loop()
        def on_xid(event: XidEvent) -> None:  # on the watcher's thread
            loop.call_soon_threadsafe(self._xids.put_nowait, event)
            loop.call_soon_threadsafe(self._wake.set)  # act on it now, not at the next interval

        self._xid_watcher = XidWatcher(self.backend, on_xid)
        self._xid_watcher.start()

    async def stop(self) -> None:
        self._stop.set()
        await self.remediation.stop()  # a running diagnostic or reset command is ended
        if self._xid_watcher is not None:
            await asyncio.to_thread(self._xid_watcher.stop)
        await self._flush_held()
        try:
            await self.runner.call(self.runner.driver.close)
        except Exception as exc:  # noqa: BLE001 - shutting down: report and go on
            log.warning("driver close failed: %s", exc)
        await self.runner.stop()
        await asyncio.to_thread(self.store.close)

    # ---- the loop -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Sample every `interval` seconds until `stop` is set; a failing cycle never ends it."""
        probe_task = asyncio.create_task(self._probe_loop(stop)) if self.settings.probe_command else None
        next_at = time.monotonic()
        while not stop.is_set():
            try:
                await self.cycle()
            except Exception:
                log.exception("sampling cycle failed")
            next_at += self.settings.interval
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind (slow driver): skip, do not burst
                next_at = time.monotonic()
                delay = 0
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
            await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waits:
                waiter.cancel()
        if probe_task is not None:
            probe_task.cancel()

    async def cycle(self) -> None:
        """One sampling cycle; cycles never overlap (a restart_check command also runs one)."""
        async with self._cycle_lock:
            await self._cycle()

    def steady_now(self) -> float:
        """Unix time as of the daemon's start plus the monotonic time since: the clock the policy
        and health rules measure durations with (cool-down, sustain, quiet period, probe delay).
        An NTP step or a clock reset while the daemon runs cannot stretch or skip them."""
        return self._steady_anchor + time.monotonic()

    async def _cycle(self) -> None:
        started = time.perf_counter()
        now = self.steady_now()
        if not self.driver_reachable:
            await self._open_driver()
        self._wake.clear()  # before draining: an XID arriving after the drain wakes the next cycle
        samples = await self.sampler.sample_all(self.gpus, now)
        xids = self._drain_xids()
        self.remediation.note_xids(xids)
        actions, events = decide(self.gpus, samples, xids, self.policy, self.settings.health_quiet_period,
                                 self.counters.xids, now)
        for action in actions:
            outcome, detail = await self._apply(action)
            events.append((Kind.DECISION, self._decision_body(action, outcome, detail)))
        await self._record(events)
        await self._account_energy(samples)
        await self._keep_history(samples, time.time())
        for listener in self.cycle_listeners:
            try:
                await listener(samples)
            except Exception:
                log.exception("cycle listener failed")
        elapsed = time.perf_counter() - started
        self.counters.cycles += 1
        self.counters.cycle_seconds_sum += elapsed
        self.counters.last_cycle_seconds = elapsed

    def _note_reachable(self, answered: bool) -> None:
        self.driver_reachable = answered

    def _gpu_back(self) -> None:
        """A lost GPU answers again: register it for XIDs again."""
        if self._xid_watcher is not None:
            self._xid_watcher.refresh()

    def _drain_xids(self) -> list[XidEvent]:
        xids: list[XidEvent] = []
        while not self._xids.empty():
            xids.append(self._xids.get_nowait())
        return xids

    async def _apply(self, action: Action) -> tuple[ActionOutcome, str]:
        """Carry out a driver action; health marks and requests are only recorded."""
        if action.kind not in DRIVER_ACTIONS:
            return ActionOutcome.RECORDED, ""
        index = action.gpu_index
        assert index is not None
        driver = self.runner.driver
        try:
            if action.kind is ActionKind.SET_POWER_LIMIT:
                await self.runner.call(driver.set_power_limit, index, float(action.value or 0))
            elif action.kind is ActionKind.LOCK_CLOCKS:
                lowest = min(self.gpus[index].inventory.supported_sm_clocks_mhz or [0])
                await self.runner.call(driver.lock_clocks, index, lowest, int(action.value or 0))
            else:
                await self.runner.call(driver.reset_clocks, index)
        except DriverRefused as exc:
            log.warning("driver refused %s on GPU %d, recorded as advisory: %s", action.kind, index, exc,
                        extra={"gpu": action.gpu_uuid})
            return ActionOutcome.ADVISORY, str(exc)
        except (DriverError, DriverUnavailable, DriverTimeout) as exc:
            log.error("%s on GPU %d failed: %s", action.kind, index, exc, extra={"gpu": action.gpu_uuid})
            return ActionOutcome.FAILED, str(exc)
        log.info("%s on GPU %d: %s", action.kind, index, action.reason, extra={"gpu": action.gpu_uuid})
        return ActionOutcome.APPLIED, ""

    def _decision_body(self, action: Action, outcome: ActionOutcome, detail: str) -> DecisionBody:
        self.counters.decisions[(action.rule, action.kind.value, outcome.value)] += 1
        reason = action.reason if not detail else f"{action.reason} [driver: {detail}]"
        return DecisionBody(
            gpu_index=action.gpu_index, gpu_uuid=action.gpu_uuid, rule=action.rule, action=action.kind.value,
            value=action.value, outcome=outcome, reason=reason, inputs=dict(action.inputs),
            policy_version=self.policy.version,
        )

    # ---- durability -----------------------------------------------------------------------

    async def record(self, events: list[tuple[Kind, WireModel]]) -> None:
        """Write events to the outbox (public: the sync layer records command results here)."""
        await self._record(events)

    async def _record(self, events: list[tuple[Kind, WireModel]]) -> None:
        batch = self._held + events
        if not batch:
            return
        try:
            await asyncio.to_thread(self.store.record, batch)
        except StoreError as exc:
            self.counters.store_errors += 1
            if self.store_problem is None:
                log.error("store not writable, holding %d events in memory: %s", len(batch), exc)
            self.store_problem = str(exc)
            overflow = len(batch) - MAX_HELD_EVENTS
            if overflow > 0:
                self.counters.events_dropped += overflow
                log.error("dropped the %d oldest held events: memory bound reached", overflow)
                batch = batch[overflow:]
            self._held = batch
            return
        if self.store_problem is not None:
            log.info("store writable again; wrote %d held events", len(self._held))
        self.store_problem = None
        self._held = []
        self.outbox_changed.set()
        await self._refresh_outbox_depth()

    @property
    def held_events(self) -> int:
        """Events kept in memory because the store refused them (written once it accepts)."""
        return len(self._held)

    async def _flush_held(self) -> None:
        if self._held:
            await self._record([])

    async def refresh_outbox_depth(self) -> None:
        await self._refresh_outbox_depth()

    async def _refresh_outbox_depth(self) -> None:
        try:
            self.outbox_depth = self.store.outbox_depth()  # a counter in memory, no query
        except StoreError as exc:
            self.store_problem = str(exc)

    async def _keep_history(self, samples: dict[int, GpuSample | None], now: float) -> None:
        present = [s for s in samples.values() if s is not None and not s.lost]
        try:
            await asyncio.to_thread(self._write_history, present)
            if now - self._last_prune >= PRUNE_EVERY_S:
                self._last_prune = now
                self.energy.forget_idle_pods(POD_ENERGY_IDLE_S)
                await asyncio.to_thread(self.store.prune_samples, now - self.settings.telemetry_retention)
                self.log_rows_pruned += await asyncio.to_thread(
                    self.store.prune_logs, now - self.settings.log_retention, self.settings.log_max_rows)
        except StoreError as exc:
            self.counters.store_errors += 1
            if self.store_problem is None:
                log.error("store not writable: %s", exc)
            self.store_problem = str(exc)
            return
        if present and self.store_problem is not None and not self._held:
            # a cycle with no event to write: the history write is what shows the store is back
            log.info("store writable again")
            self.store_problem = None

    def _write_history(self, present: list[GpuSample]) -> None:
        """The cycle's samples and the generation sidecar, in one hop to a thread."""
        if present:
            self.store.add_samples(present)
        self.store.note_generation()

    async def _account_energy(self, samples: dict[int, GpuSample | None]) -> None:
        present = [s for s in samples.values() if s is not None]
        pids = {p.pid for s in present for p in s.processes}
        refs: dict[int, PodRef | None] = {}
        if pids:
            refs = await asyncio.to_thread(lambda: {pid: self.pods.resolve(pid) for pid in pids})
        self._cycle_pods = refs  # the pod map reads the same PIDs after the cycle
        self.energy.update(present, refs.get)
        for index, sample in samples.items():  # the split travels with the telemetry (the fleet exporter)
            if sample is not None:
                samples[index] = split = self.energy.with_split(sample)
                view = self.gpus.get(index)
                if view is not None and view.sample is sample:
                    view.sample = split

    async def _refresh_pod_map(self) -> None:
        """Every device the node advertises (MIG devices, time-slicing replicas) folded into its GPU;
        a GPU not read this cycle (lost) keeps its last known pods."""
        devices = {v.inventory.uuid: v.inventory.uuid for v in self.gpus.values()}
        devices.update({d.id: d.gpu_uuid for d in self.partitions.devices()})
        processes = {v.inventory.uuid: None if v.sample is None or v.sample.lost
                     else [p.pid for p in v.sample.processes] for v in self.gpus.values()}
        await self.pod_map.refresh(devices, processes, self._cycle_pods)

    # ---- policy ---------------------------------------------------------------------------

    async def apply_policy(self, policy: PowerPolicy, source: str) -> bool:
        """Adopt a newer policy (from the cloud); cached so that it survives restarts offline."""
        if policy.version <= self.policy.version and self.policy_source != "config":
            log.info("ignoring policy %s v%d: not newer than v%d", policy.name, policy.version, self.policy.version)
            return False
        try:
            await asyncio.to_thread(self.store.cache_policy, policy)
        except StoreError as exc:
            log.error("cannot cache policy v%d, applying it anyway: %s", policy.version, exc)
        self.policy, self.policy_source = policy, source
        log.info("policy %s v%d now applies (from %s)", policy.name, policy.version, source)
        return True

    # ---- commands from the cloud ----------------------------------------------------------

    async def execute_command(self, command: CommandBody) -> tuple[bool, str]:
        """Carry out a cloud command; returns (ok, detail) for the result event."""
        if command.command == "reboot":  # refused unless this node asked for it (edge/remediation/)
            return await self.remediation.on_reboot_granted(command)
        targets = [v for v in self.gpus.values() if command.gpu_uuid in (None, v.inventory.uuid)]
        if not targets:
            return False, f"no GPU {command.gpu_uuid} on this node"
        if command.command in ("drain", "migrate_away", "undrain"):
            for view in targets:
                view.draining = command.command != "undrain"
            names = ", ".join(f"GPU {v.inventory.index}" for v in targets)
            if command.command == "migrate_away":
                pids = sorted({p.pid for v in targets if v.sample for p in v.sample.processes})
                return True, f"draining {names}; processes on them: {pids or 'none'}"
            return True, f"{'draining' if command.command != 'undrain' else 'undrained'} {names}"
        # restart_check: probe lost GPUs now and run the probe command, then report
        for view in targets:
            view.next_probe_at = 0.0
        await self.cycle()
        if self.settings.probe_command:
            self.probe_ok, self.probe_detail = await run_probe(self.settings.probe_command, self.settings.probe_timeout)
        report = "; ".join(f"GPU {v.inventory.index} {v.health.health.value}" for v in targets)
        healthy, reasons, _ = self.health_report()
        return healthy, report + ("" if healthy else " | " + "; ".join(reasons))

    # ---- the application-level probe ------------------------------------------------------

    async def _probe_loop(self, stop: asyncio.Event) -> None:
        command = self.settings.probe_command
        assert command
        while not stop.is_set():
            self.probe_ok, self.probe_detail = await run_probe(command, self.settings.probe_timeout)
            if not self.probe_ok:
                log.warning("health probe failed: %s", self.probe_detail)
            await wait_event(stop, self.settings.probe_interval)

    # ---- views ----------------------------------------------------------------------------

    def health_report(self) -> tuple[bool, list[str], list[str]]:
        """(healthy, reasons it is not, degraded conditions) for /healthz."""
        # any NVML call that timed out (a sample, a MIG read) leaves the driver unreachable until one returns
        reachable = self.driver_reachable and not self.runner.not_answering
        healthy, reasons = health_rules.node_health(
            reachable, {i: v.health for i, v in self.gpus.items()}, self.probe_ok
        )
        if self.probe_ok is False and self.probe_detail:
            reasons = [*reasons, f"probe: {self.probe_detail}"]
        degraded = self.degraded_conditions()
        if self.store_problem:
            held = f"; {len(self._held)} events held in memory" if self._held else ""
            degraded.append(f"store not writable: {self.store_problem}{held}")
        if self.runner.not_answering:
            # until a call returns again; kgpu_driver_call_timeouts keeps the count for good
            last = self.runner.last_timeout.message if self.runner.last_timeout else ""
            degraded.append(f"GPU driver not answering: {last} ({self.runner.timeouts} "
                            f"{'NVML' if self.backend.backend == 'nvml' else self.backend.backend} calls timed out)")
        return healthy, reasons, degraded

    def degraded_conditions(self) -> list[str]:
        """What opening the store had to do, a subscription the broker refused, the outbox bound:
        `degraded` entries that start with a fixed word (store_recovered, store_unavailable,
        store_repaired, store_rolled_back, mqtt_subscription_refused, outbox_over_bound) and do not
        change with every event (the status is re-sent on every change)."""
        found = [self.store_recovery.summary()] if self.store_recovery is not None else []
        found += self.store.notices
        mqtt = self.sync.mqtt if self.sync is not None else None
        if mqtt is not None and mqtt.refused_subscriptions:  # shared/mqtt.py: the SUBACKs that said no
            refused = ", ".join(f"{topic} ({code})" for topic, code in sorted(mqtt.refused_subscriptions.items()))
            found.append(f"mqtt_subscription_refused: the broker refused {refused}; nothing arrives on it")
        if self.store.outbox_over_bound():
            found.append("outbox_over_bound: the unacked events exceed outbox_max_events or outbox_max_bytes; "
                         "still recording (kgpu_outbox_over_bound_events_total counts them)")
        return found

    def _device_fields(self, inventory: GpuInventory) -> dict[str, Any]:
        """GpuSummary's device-layer fields (issue 16), from the inventory."""
        return {"vendor": inventory.vendor, "backend": inventory.backend, "platform": inventory.platform,
                "resource_name": self.settings.resource_name or inventory.resource_name or self.resource_name,
                "capabilities": list(inventory.capabilities)}

    def status_body(self) -> StatusBody:
        _, _, degraded = self.health_report()
        return StatusBody(
            state="online",
            version=self.settings.sim_daemon_version or __version__,
            gpus=[
                GpuSummary(index=i, uuid=v.inventory.uuid, name=v.inventory.name, health=v.health.health,
                           power_limit_w=v.sample.power_limit_w if v.sample else None, draining=v.draining,
                           pci_bus_id=v.inventory.pci_bus_id, driver_version=v.inventory.driver_version,
                           memory_total_bytes=v.inventory.memory_total_bytes, cuda_version=v.inventory.cuda_version,
                           architecture=v.inventory.architecture, pods=self.pod_map.pods_of(v.inventory.uuid),
                           remediation=self.remediation.stage(v.inventory.uuid), **self._device_fields(v.inventory),
                           **self.partitions.summary(i, v))
                for i, v in sorted(self.gpus.items())
            ],
            **self.partitions.status_fields(),
            pod_map_source=self.pod_map.source,
            policy_name=self.policy.name,
            policy_version=self.policy.version,
            outbox_depth=self.outbox_depth,
            outbox_epoch=self.store.epoch,
            degraded=degraded,
            # every seq up to here was stored by a cloud: a restored fleet database resumes from it
            outbox_acked=self.sync.acked_upto if self.sync is not None else None,
        )
