"""A simulated GPU under the edge's pure power policy, in simulated time: the thermal settling
of edge/policy.py measured against the simulated physics (edge/sim/physics.py: power follows load
and the limit within a second, the temperature follows power with a 30 s lag, a hot cabinet raises
it all). Used by tests/test_thermal_settling.py and bench/thermal_settling.py.

The loop is the daemon's, without its I/O: every `interval` seconds of simulated clock, read the
GPU as NVML reports it (whole degrees, milliwatts), evaluate, and apply the actions to the GPU.
Nothing sleeps; eight minutes of a GPU take a few milliseconds of physics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edge.actions import ActionKind
from edge.policy import evaluate
from edge.sim.physics import SimFault, SimGpu
from edge.sim.profiles import get_profile
from shared.gpu import GpuInventory, GpuSample
from shared.policy import PowerPolicy

Evaluate = Callable[..., tuple[list[Any], dict[int, Any]]]  # edge.policy.evaluate, or an older one

THERMAL_RULES = {"thermal_step_down", "thermal_critical", "thermal_restore"}
# The demo's policy (kgpu/demo.py), under which the issue saw 13 step-downs and 8 restores.
DEMO_THERMAL = {"maxTempC": 80, "criticalTempC": 92, "stepPercent": 10, "stepInterval": "5s",
                "coolDownPeriod": "60s", "hysteresisC": 5}
EIGHT_MINUTES = 480.0
QUIET_TAIL = 150.0  # no thermal decision in the last two and a half minutes


@dataclass
class Decision:
    at: float
    rule: str
    kind: ActionKind
    value: float | None
    temperature_c: float  # the GPU's true temperature when it was taken


class SimClock:
    """Simulated seconds: the GPU's physics integrates up to `now` whenever it is read."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Run:
    """A simulated GPU under the policy: what was decided and where the GPU ended."""

    gpu: SimGpu
    clock: SimClock
    policy: PowerPolicy
    interval: float
    evaluate: Evaluate = evaluate  # the policy under test (bench/thermal_settling.py: also an older one)
    state: dict[int, Any] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)
    seconds_above_critical: float = 0.0  # the longest unbroken stretch, seen at the samples
    _above_since: float | None = None

    @property
    def now(self) -> float:
        return self.clock.now

    @property
    def inventory(self) -> GpuInventory:
        p = self.gpu.profile
        return GpuInventory(
            index=0, uuid=self.gpu.uuid, name=p.name, pci_bus_id=self.gpu.pci_bus_id,
            memory_total_bytes=p.memory_total_mib * 2**20, driver_version="550.54.15",
            power_limit_min_w=p.power_min_w, power_limit_max_w=p.power_max_w,
            power_limit_default_w=p.power_default_w,
            supported_sm_clocks_mhz=list(p.graphics_clocks_mhz[p.memory_clocks_mhz[0]]))

    def sample(self) -> GpuSample:
        """The GPU as NVML reports it: whole degrees, milliwatts."""
        self.gpu.advance()
        return GpuSample(index=0, uuid=self.gpu.uuid, ts=self.now, utilization_pct=self.gpu.load_pct,
                         temperature_c=float(round(self.gpu.temperature_c)),
                         power_w=round(self.gpu.power_w * 1000) / 1000,
                         power_limit_w=self.gpu.enforced_power_limit_w)

    def until(self, end: float) -> Run:
        inventory = {0: self.inventory}
        critical = self.policy.thermal_throttling.critical_temp_c
        while self.now <= end:
            sample = self.sample()
            if self.gpu.temperature_c >= critical:
                self._above_since = self.now if self._above_since is None else self._above_since
                self.seconds_above_critical = max(self.seconds_above_critical,
                                                  self.now - self._above_since)
            else:
                self._above_since = None
            actions, self.state = self.evaluate([sample], inventory, self.policy, self.state, self.now)
            for action in actions:
                self.decisions.append(Decision(self.now, action.rule, action.kind, action.value,
                                               self.gpu.temperature_c))
                if action.kind is ActionKind.SET_POWER_LIMIT:
                    assert action.value is not None
                    self.gpu.set_power_limit_w(action.value)
                elif action.kind is ActionKind.LOCK_CLOCKS:
                    assert action.value is not None
                    self.gpu.lock_clocks(self.gpu.profile.min_sm_clock_mhz, int(action.value))
                elif action.kind is ActionKind.RESET_CLOCKS:
                    self.gpu.reset_clocks()
            self.clock.now += self.interval
        return self

    def thermal(self, since: float = 0.0) -> list[Decision]:
        return [d for d in self.decisions if d.rule in THERMAL_RULES and d.at >= since]

    def restores(self, since: float = 0.0) -> int:
        return sum(d.rule == "thermal_restore" for d in self.thermal(since))

    def turns(self) -> int:
        """How often the thermal decisions change direction (down -> up or up -> down)."""
        ups = [d.rule == "thermal_restore" for d in self.thermal()]
        return sum(a != b for a, b in zip(ups, ups[1:], strict=False))

    def story(self) -> str:
        """The GPU, its cabinet and the decisions, for a failure message."""
        tt = self.policy.thermal_throttling
        head = (f"{self.gpu.profile.key} at {self.gpu.load_pct:.1f} % in {self.gpu.ambient_c:.1f} °C"
                f", sampled every {self.interval:.0f} s, {tt.model_dump(by_alias=True)}; now "
                f"{self.gpu.temperature_c:.1f} °C at {self.gpu.power_limit_w:.0f} W\n")
        return head + "\n".join(f"  t={d.at:6.1f} {d.rule:18} {d.kind.value:16} {d.value} "
                         f"({d.temperature_c:.1f} °C)" for d in self.decisions)


def start(model: str, thermal: dict[str, object], ambient_c: float, load_pct: float,
          temperature_c: float | None = None, interval: float = 5.0, policy: Evaluate = evaluate) -> Run:
    """A GPU in a cabinet at `ambient_c`, put under `load_pct` at t=0."""
    clock = SimClock()
    gpu = SimGpu(0, get_profile(model), clock=clock)
    gpu.apply(SimFault(utilization=load_pct, ambient_c=ambient_c, temperature_c=temperature_c))
    rules = PowerPolicy.model_validate({"name": "settle", "version": 1, "thermalThrottling": thermal})
    return Run(gpu=gpu, clock=clock, policy=rules, interval=interval, evaluate=policy)


