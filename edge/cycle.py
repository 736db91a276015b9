"""What the daemon knows about each GPU (`GpuView`) and one cycle's decisions over it (`decide`).

`decide` runs the pure rules (edge.health.assess per GPU, edge.policy.evaluate over all) on the
cycle's samples and XIDs, keeps their new state in the views, and returns the actions and the
events they imply. It does no I/O: the daemon (edge/daemon.py) samples before and applies and
records after.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from edge import health as health_rules
from edge import policy as policy_rules
from edge.actions import Action, ActionKind
from shared.gpu import GpuInventory, GpuSample, XidEvent
from shared.logs import get_logger
from shared.policy import PowerPolicy
from shared.protocol import HealthBody, Kind, MigrationRequestBody, XidBody
from shared.wire import WireModel

log = get_logger(__name__)


@dataclass
class GpuView:
    """Everything the daemon currently knows about one GPU (read by the API and metrics)."""

    inventory: GpuInventory
    sample: GpuSample | None = None
    health: health_rules.GpuHealthState = field(default_factory=health_rules.GpuHealthState)
    policy_state: policy_rules.GpuPolicyState = field(default_factory=policy_rules.GpuPolicyState)
    last_xid: int | None = None
    next_probe_at: float = 0.0
    draining: bool = False  # set by the cloud's drain / migrate_away commands
    # Where the remediation ladder stands (edge/remediation/); None: in service. While set, the
    # device plugin advertises the GPU unhealthy (fenced), whatever its health says.
    remediation: str | None = None
    # The policy (name, version) whose powerCapWatts was put to a GPU that reports no power limit
    # range (a Jetson): once per policy, the backend applies it its own way or refuses with its reason.
    cap_put: tuple[str, int] | None = None
    # AMD and Intel: the GPU's /dev/dri nodes (from sysfs at start-up), which the device plugin hands
    # to a container (edge/deviceplugin/allocation.py); () for NVIDIA, whose runtime does that
    device_nodes: tuple[str, ...] = ()


def decide(views: Mapping[int, GpuView], samples: Mapping[int, GpuSample | None], xids: list[XidEvent],
           policy: PowerPolicy, quiet_period_s: float, xid_counts: Counter[tuple[int, int]], now: float,
           ) -> tuple[list[Action], list[tuple[Kind, WireModel]]]:
    """Run the pure health and policy rules; return the actions and the events they imply."""
    events: list[tuple[Kind, WireModel]] = []
    actions: list[Action] = []
    for xid in xids:
        xid_counts[(xid.index, xid.xid)] += 1
        if xid.index in views:
            views[xid.index].last_xid = xid.xid
        taken = policy.xid_policy.action_for(xid.xid)
        events.append((Kind.XID, XidBody(gpu_index=xid.index, gpu_uuid=xid.uuid, xid=xid.xid,
                                         action=taken.value if taken else "ignored")))
    for index, view in views.items():
        previous = view.health
        state, health_actions = health_rules.assess(
            index, view.inventory.uuid, previous, samples.get(index),
            [x for x in xids if x.index == index], policy, now, quiet_period_s,
        )
        view.health = state
        actions.extend(health_actions)
        if state.health is not previous.health:
            events.append((Kind.HEALTH, HealthBody(level="gpu", gpu_index=index, gpu_uuid=view.inventory.uuid,
                                                   previous=previous.health, current=state.health,
                                                   reasons=list(state.reasons))))
            log.warning("GPU %d %s -> %s: %s", index, previous.health, state.health, "; ".join(state.reasons),
                        extra={"gpu": view.inventory.uuid})
    usable = [s for s in samples.values() if s is not None]
    inventory = {index: view.inventory for index, view in views.items()}
    state_in = {index: view.policy_state for index, view in views.items()}
    power_actions, state_out = policy_rules.evaluate(usable, inventory, policy, state_in, now)
    for index, policy_state in state_out.items():
        if index in views:
            views[index].policy_state = policy_state
    actions.extend(power_actions)
    actions.extend(caps_without_range(views, usable, policy))
    for action in actions:
        if action.kind is ActionKind.REQUEST_MIGRATION:
            events.append((Kind.MIGRATION_REQUEST, MigrationRequestBody(
                gpu_index=action.gpu_index, gpu_uuid=action.gpu_uuid, trigger=action.rule, reason=action.reason)))
    return actions, events


def caps_without_range(views: Mapping[int, GpuView], samples: list[GpuSample], policy: PowerPolicy) -> list[Action]:
    """The policy's powerCapWatts for the GPUs the power rules cannot act on (the inventory has no
    power limit range: a Jetson's integrated GPU), once per policy version: the backend applies it
    its own way or refuses it, and the decision is advisory with the device's reason (issue 16)."""
    cap = policy.power_cap_watts
    if cap is None:
        return []
    actions = []
    for sample in samples:
        view = views.get(sample.index)
        if view is None or sample.lost or (policy.name, policy.version) == view.cap_put:
            continue
        inventory = view.inventory
        if None not in (inventory.power_limit_min_w, inventory.power_limit_max_w, inventory.power_limit_default_w):
            continue  # the power rules act on it (edge/policy.py)
        view.cap_put = (policy.name, policy.version)
        actions.append(Action(
            kind=ActionKind.SET_POWER_LIMIT, gpu_index=sample.index, gpu_uuid=sample.uuid,
            rule=policy_rules.RULE_POWER_CAP, value=cap, inputs={"power_cap_w": cap, "policy_name": policy.name,
                                                                 "policy_version": policy.version},
            reason=f"GPU {sample.index}: powerCapWatts {cap:.0f} W of policy {policy.name!r} v{policy.version}; "
                   f"the {inventory.backend} backend reports no power limit range"))
    return actions
