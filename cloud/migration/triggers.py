"""Which fleet state starts, merges, defers, starts or cancels a migration: pure, no I/O, no clock.

`find_triggers` turns the fleet store's view (`World`) into reasons to move work: an edge's
`migration_request`, a GPU unhealthy or lost past the grace, a node offline past the threshold
with GPU pods that opted in to leave it (unless the zone guard holds: `zone_guards`).
`reconcile` turns those triggers and the open migrations into rows: new migrations, merged
triggers, cool-downs, cancellations and starts within the concurrency limit.
`to_recover` says which finished migrations can have their taint removed: every subject GPU
healthy and out of the edge's remediation ladder.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from cloud.migration.model import (
    ACTIVE_STATES,
    HOLDING,
    NODE_SUBJECT,
    NOT_STARTED,
    OFFLINE_SUBJECT,
    Lifecycle,
    Migration,
    MigrationState,
    Rules,
    Trigger,
    TriggerKind,
    World,
    gpu_healthy,
    in_service,
    node_level,
)
from shared.gpu import Health

# ---- the pure part: health ------------------------------------------------------------------


def unhealthy_since(events: Sequence[tuple[float, float, str]]) -> float | None:
    """Start (cloud clock) of the current non-healthy run, from one GPU's health events given as
    (edge ts, received_at, current), newest first; None if the newest says healthy."""
    since = None
    for _ts, received_at, current in events:
        if current == Health.HEALTHY:
            break
        since = received_at
    return since


def recovered(world: World, node: str, subjects: Iterable[str]) -> bool:
    """Whether every subject of a migration is back in service (`in_service`: healthy, and the
    edge's remediation ladder done with it); no subject or NODE_SUBJECT: every GPU of the node."""
    subjects = list(subjects)
    for subject in subjects or [NODE_SUBJECT]:
        if subject == OFFLINE_SUBJECT:
            if not world.nodes.get(node, (False, 0.0))[0]:
                return False
        elif subject == NODE_SUBJECT:
            gpus = world.gpus.get(node, ())
            if not gpus or not all(in_service(g) for g in gpus):
                return False
        elif not in_service(world.gpu(node, subject)):
            return False
    return True


def subjects_added(subjects: Sequence[str], subject: str | None) -> tuple[str, ...]:
    """The subjects a trigger for `subject` adds to an open migration of the same node (none: it
    is covered). A node-level request (None) makes a GPU migration node-level (NODE_SUBJECT); a
    GPU joining a node-level request's migration (no subject) keeps it node-level."""
    if subject is None:
        return () if node_level(subjects) else (NODE_SUBJECT,)
    if subject in subjects:
        return ()
    if not subjects and subject != OFFLINE_SUBJECT:
        return (NODE_SUBJECT, subject)
    return (subject,)


def find_triggers(world: World, rules: Rules, now: float,
                  first_seen_unhealthy: Mapping[tuple[str, str], float] | None = None) -> list[Trigger]:
    """Every reason to move work that the fleet shows now (duplicates are `reconcile`'s job)."""
    triggers: list[Trigger] = []
    for request in world.requests:
        uuid = request.gpu_uuid
        triggers.append(Trigger(request.node, TriggerKind.EDGE_REQUEST, uuid,
                                f"{request.trigger}: {request.reason}", request))
    first_seen = first_seen_unhealthy or {}
    for node, gpus in sorted(world.gpus.items()):
        for gpu in gpus:
            if gpu_healthy(gpu) or gpu.health is None:
                continue
            since = gpu.unhealthy_since if gpu.unhealthy_since is not None else first_seen.get((node, gpu.uuid))
            if since is None or now - since < rules.grace_s:
                continue
            triggers.append(Trigger(node, TriggerKind.GPU_UNHEALTHY, gpu.uuid,
                                    f"GPU {gpu.index} ({gpu.uuid}) {gpu.health} for {now - since:.0f} s "
                                    f"(grace {rules.grace_s:g} s)"))
    if world.offline_ready is not None:
        guards = zone_guards(world.nodes, world.zones, rules.offline_zone_max_share)
        for node, (online, last_seen) in sorted(world.nodes.items()):
            ready = world.offline_ready.get(node)
            if online or now - last_seen <= rules.offline_threshold_s or not ready:
                continue
            zone = world.zones.get(node, "")
            if zone in guards:
                continue  # a partition, not a failure: the zone guard (logged by the manager)
            triggers.append(Trigger(node, TriggerKind.NODE_OFFLINE, OFFLINE_SUBJECT,
                                    f"node offline for {now - last_seen:.0f} s (threshold "
                                    f"{rules.offline_threshold_s:g} s) with {ready} GPU pod(s) that opted in "
                                    f"to move; {zone_share(world.nodes, world.zones, zone)}"))
    return triggers


# ---- the pure part: the zone guard ----------------------------------------------------------


def zone_counts(nodes: Mapping[str, tuple[bool, float]], zones: Mapping[str, str]) -> dict[str, tuple[int, int]]:
    """Zone -> (offline nodes, nodes) over the nodes the fleet store knows; a node with no zone
    label (or not in the cluster) is in zone ""."""
    counts: dict[str, tuple[int, int]] = {}
    for node, (online, _seen) in nodes.items():
        zone = zones.get(node, "")
        offline, total = counts.get(zone, (0, 0))
        counts[zone] = (offline + (0 if online else 1), total + 1)
    return counts


def zone_guards(nodes: Mapping[str, tuple[bool, float]], zones: Mapping[str, str],
                max_share: float) -> dict[str, str]:
    """Zone -> why nothing moves off its offline nodes: more than `max_share` of its nodes are
    offline together, which looks like a partition of the site (the pods run on, cut off), not a
    failure of its nodes. A zone of one node is guarded whenever that node is offline."""
    return {zone: f"zone guard: {_zone_text(zone)} has {offline} of {total} nodes offline (more than "
                  f"{max_share:.0%}): nothing moves off its offline nodes"
            for zone, (offline, total) in sorted(zone_counts(nodes, zones).items())
            if total and offline / total > max_share}


def zone_share(nodes: Mapping[str, tuple[bool, float]], zones: Mapping[str, str], zone: str) -> str:
    offline, total = zone_counts(nodes, zones).get(zone, (0, 0))
    return f"{_zone_text(zone)}: {offline} of {total} nodes offline"


def _zone_text(zone: str) -> str:
    return f"zone {zone!r}" if zone else "the nodes without a zone label"


# ---- the pure part: reconcile ---------------------------------------------------------------


def reconcile(world: World, migrations: Sequence[Migration], last_started: Mapping[str, float],
              triggers: Sequence[Trigger], rules: Rules, now: float) -> tuple[list[Migration], list[Migration]]:
    """Triggers and lifecycle in, rows out: (new migrations, changed migrations).

    Merges triggers into a node's open migration, defers new ones in the node's cool-down,
    records them as needs-cluster without a cluster, cancels ones not started whose GPUs
    recovered, ends cool-downs, and starts pending ones while slots are free. Completed ones
    whose GPUs recovered are left to the caller (untainting is I/O); see `to_recover`."""
    open_by_node: dict[str, Migration] = {}
    changed: dict[int, Migration] = {}
    for m in migrations:
        if m.state in ACTIVE_STATES and m.id is not None:
            open_by_node.setdefault(m.node, m)
    new: list[Migration] = []

    def current(m: Migration) -> Migration:
        return changed.get(m.id, m) if m.id is not None else m

    for t in triggers:
        if t.event is not None and t.subject and _stale_request(world, t):
            fresh = _new(t, MigrationState.CANCELLED, now,
                         "the GPU reported healthy after this request was made")
            new.append(fresh)
            continue
        existing = open_by_node.get(t.node)
        if existing is not None:
            m = current(existing)
            added = subjects_added(m.subjects, t.subject)
            if not added and t.event is None:
                continue  # the same condition seen again: nothing to record
            if added:
                m = replace(m, subjects=(*m.subjects, *added))
            m = m.step(Lifecycle.TRIGGER, "merged", f"{t.kind}: {t.reason}", now, subject=t.subject)
            if added and m.state in HOLDING:
                # Its pods were moved, but the new subject has pods of its own, and the node may
                # have no healthy GPU left now (the node taint): the planner has work again.
                m = replace(m.step(Lifecycle.REOPEN, "in-progress", f"new subject {', '.join(added)}: its "
                                   "pods to move, the node taint to check", now),
                            state=MigrationState.IN_PROGRESS, next_attempt_at=None)
            if t.event is not None:
                m = replace(m, consumed=(*m.consumed, t.event.event_id))
            if m.id is not None:
                changed[m.id] = m
                open_by_node[t.node] = m
            else:
                new[new.index(existing)] = m
                open_by_node[t.node] = m
            continue
        started = last_started.get(t.node)
        if started is not None and now - started < rules.cooldown_s:
            until = started + rules.cooldown_s
            m = _new(t, MigrationState.DEFERRED, now,
                     f"cool-down: a migration from {t.node} started {now - started:.0f} s ago; "
                     f"waits {until - now:.0f} s more", outcome="deferred (cool-down)")
            m = replace(m, next_attempt_at=until)
        elif not rules.has_kube:
            m = _new(t, MigrationState.NEEDS_CLUSTER, now,
                     "the controller runs with --no-kube: recorded, nothing moved", outcome="needs-cluster")
        else:
            m = _new(t, MigrationState.PENDING, now, "recorded")
        new.append(m)
        open_by_node[t.node] = m

    # lifecycle of the open ones
    for m0 in migrations:
        if m0.id is None:
            continue
        mid, m = m0.id, current(m0)
        if m.state in NOT_STARTED and recovered(world, m.node, m.subjects):
            changed[mid] = replace(
                m.step(Lifecycle.CANCEL, "cancelled", "healthy again before the migration started", now),
                state=MigrationState.CANCELLED, next_attempt_at=None)
        elif (m.state == MigrationState.DEFERRED and m.next_attempt_at is not None
              and now >= m.next_attempt_at):
            state = MigrationState.PENDING if rules.has_kube else MigrationState.NEEDS_CLUSTER
            changed[mid] = replace(m.step(Lifecycle.COOL_DOWN, "ended", f"now {state}", now),
                                   state=state, next_attempt_at=None)
        elif m.state == MigrationState.NEEDS_CLUSTER and rules.has_kube:
            changed[mid] = replace(
                m.step(Lifecycle.CLUSTER, "available", "a controller with a cluster leads: pending", now),
                state=MigrationState.PENDING)

    # start pending ones, oldest first, while slots are free
    everything = [current(m) for m in migrations if m.id is not None]
    running = sum(1 for m in everything if m.state == MigrationState.IN_PROGRESS)
    pending = sorted((m for m in everything if m.state == MigrationState.PENDING),
                     key=lambda m: (m.created_at, m.id or 0))
    for m in pending:
        if running >= rules.max_concurrent:
            break
        running += 1
        assert m.id is not None
        changed[m.id] = replace(m.step(Lifecycle.START, "started", f"slot {running} of {rules.max_concurrent}", now),
                                state=MigrationState.IN_PROGRESS, started_at=now)
    return new, list(changed.values())


def to_recover(world: World, migrations: Sequence[Migration]) -> list[Migration]:
    """Migrations that moved the work (or gave up) and whose GPUs/node are fine again: untaint."""
    return [m for m in migrations if m.state in HOLDING and recovered(world, m.node, m.subjects)]


def _stale_request(world: World, t: Trigger) -> bool:
    """A replayed request the edge has already taken back (a newer health event says healthy)."""
    assert t.event is not None and t.subject is not None
    gpu = world.gpu(t.node, t.subject)
    return gpu is not None and gpu.healthy_event_ts is not None and gpu.healthy_event_ts > t.event.ts \
        and gpu_healthy(gpu)


def _new(t: Trigger, state: MigrationState, now: float, detail: str, *, outcome: str = "recorded") -> Migration:
    subjects = (t.subject,) if t.subject else ()
    m = Migration(id=None, node=t.node, gpu_uuid=t.subject if t.subject != OFFLINE_SUBJECT else None,
                  subjects=subjects, trigger=t.kind, reason=t.reason, state=state, created_at=now, updated_at=now,
                  consumed=(t.event.event_id,) if t.event else ())
    return m.step(Lifecycle.TRIGGER, outcome, detail, now, subject=t.subject)

