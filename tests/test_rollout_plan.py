"""cloud/rollout/plan.py: the pure rollout planner, table by table, then hypothesis invariants.

`Sim` plays the executor (stores transitions, deletes pods), the DaemonSet controller (a deleted
pod comes back from the current template) and the edges (a responsive online node reports the
version of its pod's template), so whole rollouts run here without any I/O.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud.rollout.plan import (
    FINAL,
    IN_FLIGHT,
    Action,
    DeletePod,
    NodeState,
    NodeView,
    OpenWave,
    RolloutSpec,
    RolloutState,
    SetRolloutState,
    Transition,
    apply_merge_patch,
    assign_waves,
    merge_diff,
    parse_amount,
    plan,
    resolve_amount,
    version_from_image,
    with_image,
)

UR, PDR, VR = NodeState.UPGRADE_REQUIRED, NodeState.POD_DELETION_REQUIRED, NodeState.VALIDATION_REQUIRED
DONE, FAILED, DEFERRED = NodeState.UPGRADE_DONE, NodeState.UPGRADE_FAILED, NodeState.OFFLINE_DEFERRED
OLD, NEW = "1.0", "2.0"
T0 = 1000.0


def spec(**kw: Any) -> RolloutSpec:
    values: dict[str, Any] = {"target_version": NEW, "max_unavailable": 2, "failure_threshold": 0,
                              "health_timeout": 60.0, "wave_count": 2, "wave": 1}
    values.update(kw)
    return RolloutSpec(**values)


def view(state: NodeState = UR, **kw: Any) -> NodeView:
    values: dict[str, Any] = {"since": T0, "wave": 1, "online": True, "daemon_version": OLD, "pod": "old-pod"}
    values.update(kw)
    return NodeView(state=state, **values)


def summary(actions: list[Action]) -> list[str]:
    """Actions as short strings, for tables."""
    out = []
    for a in actions:
        if isinstance(a, Transition):
            out.append(f"{a.node}>{a.to.value}")
        elif isinstance(a, DeletePod):
            out.append(f"delete {a.node}")
        elif isinstance(a, OpenWave):
            out.append(f"wave {a.wave}")
        elif isinstance(a, SetRolloutState):
            out.append(f"rollout {a.state.value}")
    return out


# ---- tables: one plan() call --------------------------------------------------------------

CASES: list[tuple[str, RolloutSpec, dict[str, NodeView], float, list[str]]] = [
    ("max_unavailable caps the starts, earliest names first",
     spec(max_unavailable=2), {n: view() for n in "abcd"}, T0,
     ["a>pod-deletion-required", "b>pod-deletion-required", "delete a", "delete b"]),
    ("slots already taken are counted",
     spec(max_unavailable=2), {"a": view(VR, pod="new-a", marked_pod="old-pod", deleted=True), "b": view(), "c": view()},
     T0, ["b>pod-deletion-required", "delete b"]),
    ("a closed wave waits",
     spec(wave=0), {"c": view(wave=0, canary=True, state=VR, pod=None, marked_pod="old-pod", deleted=True),
                    "x": view(wave=1)}, T0, []),
    ("canary wave first, then the next wave opens when it is settled",
     spec(wave=0), {"c": view(wave=0, canary=True, state=DONE), "x": view(wave=1)}, T0,
     ["wave 1", "x>pod-deletion-required", "delete x"]),
    ("an offline node is deferred and does not hold its wave",
     spec(wave=0, wave_count=3), {"a": view(wave=0, online=False), "b": view(wave=1), "c": view(wave=2)}, T0,
     ["a>offline-deferred", "wave 1", "b>pod-deletion-required", "delete b"]),
    ("a deferred node that is back is upgraded, even after the last wave",
     spec(wave=1), {"a": view(DEFERRED, online=True), "b": view(DONE, daemon_version=NEW)}, T0,
     ["a>upgrade-required", "a>pod-deletion-required", "delete a"]),
    ("the rollout completes only when nothing is deferred",
     spec(wave=1), {"a": view(DEFERRED, online=False), "b": view(DONE, daemon_version=NEW)}, T0, []),
    ("completed when every node is done or failed within the threshold",
     spec(wave=1, failure_threshold=1), {"a": view(FAILED), "b": view(DONE)}, T0, ["rollout completed"]),
    ("validation: the target version, online, not degraded, on a new pod",
     spec(), {"a": view(VR, pod="new", marked_pod="old-pod", deleted=True, daemon_version=NEW)}, T0,
     ["a>upgrade-done", "rollout completed"]),
    ("validation: the old version is not enough",
     spec(), {"a": view(VR, pod="new", marked_pod="old-pod", deleted=True)}, T0 + 10, []),
    ("validation: degraded is not enough",
     spec(), {"a": view(VR, pod="new", marked_pod="old-pod", deleted=True, daemon_version=NEW, degraded=True)},
     T0 + 10, []),
    ("validation timeout fails the node; within the threshold the rollout goes on",
     spec(failure_threshold=1), {"a": view(VR, pod="new", marked_pod="old-pod", deleted=True), "b": view()}, T0 + 60,
     ["a>upgrade-failed", "b>pod-deletion-required", "delete b"]),
    ("failures beyond the threshold roll back",
     spec(failure_threshold=1), {"a": view(VR, pod="new", marked_pod="old-pod", deleted=True),
                                 "b": view(FAILED, deleted=True), "c": view()}, T0 + 60,
     ["a>upgrade-failed", "rollout rolling-back", "a>upgrade-required", "b>upgrade-required"]),
    ("a failed canary rolls back before any other wave",
     spec(wave=0, failure_threshold=10), {"c": view(VR, wave=0, canary=True, pod="new", marked_pod="old-pod",
                                                    deleted=True), "x": view(wave=1)}, T0 + 60,
     ["c>upgrade-failed", "rollout rolling-back", "c>upgrade-required"]),
    ("crash after the delete: the marked pod is gone, so no second delete",
     spec(), {"a": view(PDR, pod="new", marked_pod="old-pod")}, T0, ["a>validation-required"]),
    ("crash before the delete: the marked pod is still there, delete that pod",
     spec(), {"a": view(PDR, marked_pod="old-pod")}, T0, ["delete a"]),
    ("offline before its pod was deleted: deferred, the slot is freed",
     spec(max_unavailable=1), {"a": view(PDR, marked_pod="old-pod", online=False), "b": view()}, T0,
     ["a>offline-deferred", "b>pod-deletion-required", "delete b"]),
    ("a node already on the target is done without a restart",
     spec(), {"a": view(daemon_version=NEW)}, T0, ["a>upgrade-done", "rollout completed"]),
    ("a node that never reported is offline: deferred",
     spec(), {"a": view(online=False, daemon_version=None)}, T0, ["a>offline-deferred"]),
    ("no daemon pod on the node: straight to validation (the DaemonSet creates it)",
     spec(), {"a": view(pod=None)}, T0, ["a>validation-required"]),
    ("operator rollback: restarted nodes go back, untouched ones stay",
     spec(rollback_requested=True), {"a": view(DONE, daemon_version=NEW, deleted=True), "b": view(DEFERRED, online=False),
                                     "c": view(PDR, marked_pod="old-pod"), "d": view()}, T0,
     ["rollout rolling-back", "a>upgrade-required", "c>upgrade-required"]),
    ("rolling back: only reverting nodes are restarted",
     spec(state=RolloutState.ROLLING_BACK), {"a": view(reverting=True, daemon_version=NEW, pod="new"),
                                             "b": view(DEFERRED, online=True)}, T0,
     ["a>pod-deletion-required", "delete a"]),
    ("rolling back: back when a new pod reports another version",
     spec(state=RolloutState.ROLLING_BACK), {"a": view(VR, reverting=True, pod="old-again", marked_pod="new",
                                                       deleted=True)}, T0,
     ["a>upgrade-done", "rollout rolled-back"]),
    ("a finished rollout plans nothing",
     spec(state=RolloutState.COMPLETED), {"a": view()}, T0, []),
]


@pytest.mark.parametrize(("spec_", "nodes", "now", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan_table(spec_: RolloutSpec, nodes: dict[str, NodeView], now: float, expected: list[str]) -> None:
    assert summary(plan(spec_, nodes, now)) == expected


def test_a_delete_carries_its_follow_up_and_starts_record_the_old_version() -> None:
    actions = plan(spec(max_unavailable=1), {"a": view(pod="uid-a")}, T0)
    start, delete = actions
    assert isinstance(start, Transition) and start.marked_pod == "uid-a" and start.from_version == OLD
    assert isinstance(delete, DeletePod) and delete.pod == "uid-a"
    assert delete.then == Transition("a", VR, "pod uid-a deleted", deleted=True)


# ---- tables: helpers used when a rollout is created ---------------------------------------


@pytest.mark.parametrize(("members", "canary", "percentages", "expected"), [
    (["a", "b"], [], [100.0], {"a": 1, "b": 1}),
    ([f"n{i:02d}" for i in range(10)], ["n05"], [10.0, 50.0, 100.0],
     {"n05": 0, "n00": 1, "n01": 2, "n02": 2, "n03": 2, "n04": 2, "n06": 3, "n07": 3, "n08": 3, "n09": 3}),
    (["a", "b", "c"], [], [1.0, 100.0], {"a": 1, "b": 2, "c": 2}),  # a wave has at least its ceil
    (["a", "b", "c", "d"], ["a", "b"], [50.0, 100.0], {"a": 0, "b": 0, "c": 1, "d": 2}),
    ([], [], [10.0, 100.0], {}),
])
def test_assign_waves(members: list[str], canary: list[str], percentages: list[float], expected: dict[str, int]) -> None:
    assert assign_waves(members, canary, percentages) == expected


@pytest.mark.parametrize(("value", "total", "at_least", "expected"), [
    (3, 200, 1, 3), ("10%", 200, 1, 20), ("25%", 10, 1, 2), ("1%", 10, 1, 1), ("0%", 10, 0, 0),
    ("5%", 200, 0, 10), ("7", 5, 0, 7), ("100%", 7, 1, 7),
])
def test_resolve_amount(value: int | str, total: int, at_least: int, expected: int) -> None:
    assert resolve_amount(value, total, at_least=at_least) == expected


@pytest.mark.parametrize("bad", ["x", "-1", "101%", "%", True, -2])
def test_parse_amount_refuses(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_amount(bad)


@pytest.mark.parametrize(("image", "version"), [
    ("kgpu/edge:0.2.0", "0.2.0"), ("registry:5000/kgpu/edge:1.2", "1.2"), ("registry:5000/kgpu/edge", None),
    ("kgpu/edge", None), ("kgpu/edge@sha256:abc", None), ("edge:latest", "latest"),
])
def test_version_from_image(image: str, version: str | None) -> None:
    assert version_from_image(image) == version


def test_with_image_sets_one_container() -> None:
    template: dict[str, Any] = {"metadata": {"labels": {"app": "x"}},
                "spec": {"containers": [{"name": "edge", "image": "e:1"}, {"name": "side", "image": "s:1"}]}}
    assert with_image(template, "s:2", "side")["spec"]["containers"] == [
        {"name": "edge", "image": "e:1"}, {"name": "side", "image": "s:2"}]
    assert with_image(template, "e:2", None)["spec"]["containers"][0]["image"] == "e:2"
    assert template["spec"]["containers"][0]["image"] == "e:1"  # not modified in place
    with pytest.raises(ValueError, match="no container"):
        with_image(template, "e:2", "nope")


JSON_LEAF = st.one_of(st.integers(), st.text(max_size=5), st.booleans(), st.lists(st.integers(), max_size=3))
JSON_DICT = st.recursive(st.dictionaries(st.text("abc", max_size=2), JSON_LEAF, max_size=4),
                         lambda inner: st.dictionaries(st.text("abc", max_size=2), inner, max_size=4), max_leaves=12)


@given(JSON_DICT, JSON_DICT)
def test_merge_diff_turns_current_into_desired(current: dict[str, Any], desired: dict[str, Any]) -> None:
    assert apply_merge_patch(current, merge_diff(current, desired)) == desired


# ---- whole rollouts in a simulated world --------------------------------------------------


@dataclass
class SimNode:
    stored: NodeView
    online: bool = True
    responsive: bool = True  # its new daemon reports (a broken canary does not)
    version: str = OLD
    pod: str | None = None
    deleted_pods: list[str] = field(default_factory=list)


class Sim:
    """The executor, the DaemonSet controller and the edges around `plan`."""

    def __init__(self, rollout: RolloutSpec, nodes: dict[str, SimNode], versions: dict[str, str] | None = None) -> None:
        self.rollout = rollout
        self.nodes = nodes
        self.template = "new"
        self.versions = versions or {"old": OLD, "new": NEW}
        self.uids = itertools.count()
        self.now = T0
        self.max_in_flight = 0
        self.deletion_order: list[str] = []
        for node in nodes.values():
            node.pod = node.pod or f"pod-{next(self.uids)}"

    def views(self) -> dict[str, NodeView]:
        return {name: replace(n.stored, online=n.online, daemon_version=n.version if n.version else None, pod=n.pod)
                for name, n in self.nodes.items()}

    def store(self, t: Transition) -> None:
        n = self.nodes[t.node]
        changes: dict[str, Any] = {"state": t.to, "since": self.now}
        if t.marked_pod is not None:
            changes["marked_pod"] = t.marked_pod
        if t.clear_mark:
            changes["marked_pod"] = None
        if t.deleted is not None:
            changes["deleted"] = t.deleted
        if t.reverting is not None:
            changes["reverting"] = t.reverting
        n.stored = replace(n.stored, **changes)

    def step(self, dt: float = 1.0) -> list[Action]:
        views = self.views()
        before = sum(1 for v in views.values() if v.state in IN_FLIGHT)
        actions = plan(self.rollout, views, self.now)
        for a in actions:
            if isinstance(a, Transition):
                self.store(a)
            elif isinstance(a, OpenWave):
                self.rollout = replace(self.rollout, wave=a.wave)
            elif isinstance(a, SetRolloutState):
                self.rollout = replace(self.rollout, state=a.state)
                if a.state == RolloutState.ROLLING_BACK:
                    self.template = "old"
            elif isinstance(a, DeletePod):
                n = self.nodes[a.node]
                assert n.pod == a.pod and n.online, "only the marked pod of an online node is deleted"
                n.deleted_pods.append(a.pod)
                self.deletion_order.append(a.node)
                n.pod = None
                self.store(a.then)
        in_flight = sum(1 for n in self.nodes.values() if n.stored.state in IN_FLIGHT)
        assert in_flight <= max(self.rollout.max_unavailable, before)
        self.max_in_flight = max(self.max_in_flight, in_flight)
        for n in self.nodes.values():  # the DaemonSet controller and the daemons react
            if n.pod is None:
                n.pod = f"pod-{next(self.uids)}"
                if n.online and n.responsive:
                    n.version = self.versions[self.template]
        self.now += dt
        return actions

    def run(self, steps: int = 500) -> RolloutState:
        for _ in range(steps):
            self.step()
            if self.rollout.state in (RolloutState.COMPLETED, RolloutState.ROLLED_BACK):
                break
        return self.rollout.state

    def states(self) -> dict[str, NodeState]:
        return {name: n.stored.state for name, n in self.nodes.items()}


def fleet(waves: dict[str, int], canary: set[str] = frozenset(), **node_kw: Any) -> dict[str, SimNode]:  # type: ignore[assignment]
    return {name: SimNode(NodeView(UR, T0, wave=w, canary=name in canary), **node_kw) for name, w in waves.items()}


def test_a_rollout_runs_wave_by_wave_within_max_unavailable() -> None:
    names = [f"n{i:02d}" for i in range(20)]
    waves = assign_waves(names, ["n07"], [10.0, 50.0, 100.0])
    sim = Sim(spec(max_unavailable=3, wave_count=4, wave=0), fleet(waves, {"n07"}))
    assert sim.run() == RolloutState.COMPLETED
    assert set(sim.states().values()) == {DONE}
    assert sim.max_in_flight == 3
    order = [waves[n] for n in sim.deletion_order]
    assert order == sorted(order) and order[0] == 0  # canary first, never a later wave before an earlier one
    assert all(len(n.deleted_pods) == 1 for n in sim.nodes.values())


def test_offline_nodes_are_deferred_then_upgraded_when_back() -> None:
    names = [f"n{i:02d}" for i in range(10)]
    nodes = fleet(assign_waves(names, [], [50.0, 100.0]))
    for name in ("n01", "n08"):
        nodes[name].online = False
    sim = Sim(spec(max_unavailable=2, wave_count=3, wave=0), nodes)
    sim.run(60)
    states = sim.states()
    assert sim.rollout.state == RolloutState.RUNNING and sim.rollout.wave == 2  # every wave opened
    assert {n for n, s in states.items() if s == DEFERRED} == {"n01", "n08"}
    assert all(s == DONE for n, s in states.items() if n not in ("n01", "n08"))
    nodes["n01"].online = nodes["n08"].online = True
    assert sim.run() == RolloutState.COMPLETED
    assert set(sim.states().values()) == {DONE}


def test_a_failing_canary_rolls_back_before_any_other_wave_and_the_canary_returns() -> None:
    names = [f"n{i}" for i in range(6)]
    nodes = fleet(assign_waves(names, ["n0", "n1"], [100.0]), {"n0", "n1"})
    nodes["n1"].responsive = False  # its new daemon never reports
    sim = Sim(spec(max_unavailable=2, failure_threshold=5, health_timeout=5.0, wave=0), nodes)
    assert sim.run() == RolloutState.ROLLED_BACK
    assert set(sim.deletion_order) == {"n0", "n1"}  # nobody beyond the canaries was touched
    assert nodes["n0"].version == OLD and len(nodes["n0"].deleted_pods) == 2  # upgraded, then restarted back
    assert all(not nodes[n].deleted_pods for n in names[2:])
    assert all(nodes[n].stored.reverting and nodes[n].stored.state == DONE for n in ("n0", "n1"))


@pytest.mark.parametrize(("threshold", "outcome"), [(1, RolloutState.COMPLETED), (0, RolloutState.ROLLED_BACK)])
def test_failure_threshold(threshold: int, outcome: RolloutState) -> None:
    names = [f"n{i}" for i in range(8)]
    nodes = fleet(assign_waves(names, [], [100.0]))
    nodes["n3"].responsive = False
    sim = Sim(spec(max_unavailable=8, failure_threshold=threshold, health_timeout=3.0, wave=0), nodes)
    assert sim.run() == outcome
    if outcome == RolloutState.COMPLETED:
        assert sim.states()["n3"] == FAILED
    else:  # every restarted node went back to the old version
        assert all(n.version == OLD for n in nodes.values())


# ---- hypothesis: invariants of one plan() call --------------------------------------------

PODS = st.sampled_from([None, "p1", "p2"])


@st.composite
def views(draw: st.DrawFn) -> NodeView:
    state = draw(st.sampled_from(list(NodeState)))
    return NodeView(
        state=state, since=draw(st.floats(T0 - 200, T0)), wave=draw(st.integers(0, 3)), canary=draw(st.booleans()),
        online=draw(st.booleans()), daemon_version=draw(st.sampled_from([None, OLD, NEW])), degraded=draw(st.booleans()),
        pod=draw(PODS), marked_pod=draw(PODS), deleted=draw(st.booleans()), reverting=draw(st.booleans()),
    )


@st.composite
def specs(draw: st.DrawFn) -> RolloutSpec:
    return RolloutSpec(
        target_version=NEW, max_unavailable=draw(st.integers(1, 5)), failure_threshold=draw(st.integers(0, 3)),
        health_timeout=draw(st.floats(1, 300)), wave_count=4, wave=draw(st.integers(0, 3)),
        state=draw(st.sampled_from([RolloutState.RUNNING, RolloutState.ROLLING_BACK])),
        rollback_requested=draw(st.booleans()),
    )


FLEETS = st.dictionaries(st.sampled_from([f"n{i}" for i in range(12)]), views(), max_size=12)


def _after(nodes: dict[str, NodeView], actions: list[Action]) -> dict[str, NodeState]:
    states = {n: v.state for n, v in nodes.items()}
    for a in actions:
        if isinstance(a, Transition):
            states[a.node] = a.to
        elif isinstance(a, DeletePod):
            states[a.node] = a.then.to
    return states


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(specs(), FLEETS)
def test_never_more_than_max_unavailable_in_flight(rollout: RolloutSpec, nodes: dict[str, NodeView]) -> None:
    actions = plan(rollout, nodes, T0)
    before = sum(1 for v in nodes.values() if v.state in IN_FLIGHT)
    after = sum(1 for s in _after(nodes, actions).values() if s in IN_FLIGHT)
    assert after <= max(rollout.max_unavailable, before)
    started = [a for a in actions if isinstance(a, Transition) and a.to in IN_FLIGHT and nodes[a.node].state not in IN_FLIGHT]
    if started:
        assert after <= rollout.max_unavailable
    for a in actions:
        if isinstance(a, DeletePod):  # only the pod marked for deletion, only on an online node
            v = nodes[a.node]
            assert v.online and a.pod == v.pod
            assert a.pod == next((t.marked_pod for t in actions if isinstance(t, Transition) and t.node == a.node
                                  and t.marked_pod), v.marked_pod)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(specs(), FLEETS, views(), st.booleans())
def test_a_deferred_node_never_blocks(rollout: RolloutSpec, nodes: dict[str, NodeView], x: NodeView,
                                      reverting: bool) -> None:
    nodes.pop("x", None)
    deferred = replace(x, state=DEFERRED, online=False, deleted=False, reverting=reverting)
    with_x = plan(rollout, {**nodes, "x": deferred}, T0)
    without = plan(rollout, nodes, T0)

    def others(actions: list[Action]) -> list[Action]:
        return [a for a in actions if getattr(a, "node", None) != "x" and not (
            isinstance(a, SetRolloutState) and a.state in (RolloutState.COMPLETED, RolloutState.ROLLED_BACK))]

    assert others(with_x) == others(without)
    assert not [a for a in with_x if getattr(a, "node", None) == "x"]  # it stays deferred while offline


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(specs(), FLEETS)
def test_done_only_with_the_target_version(rollout: RolloutSpec, nodes: dict[str, NodeView]) -> None:
    for a in plan(rollout, nodes, T0):
        if isinstance(a, Transition) and a.to == DONE:
            v = nodes[a.node]
            assert v.online and not v.degraded and v.daemon_version is not None
            if rollout.state == RolloutState.RUNNING:
                assert v.daemon_version == NEW
            else:  # rolling back: done means off the rolled-back version
                assert v.daemon_version != NEW


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 25), st.integers(1, 6), st.lists(st.tuples(st.integers(0, 24), st.integers(0, 40)), max_size=30),
       st.data())
def test_flaky_fleets_complete_and_no_pod_is_deleted_twice(size: int, max_unavailable: int,
                                                           flaps: list[tuple[int, int]], data: st.DataObject) -> None:
    """Nodes go offline and come back at random steps; in the end everyone is upgraded, once."""
    names = [f"n{i:02d}" for i in range(size)]
    canary = data.draw(st.lists(st.sampled_from(names), max_size=2, unique=True))
    waves = assign_waves(names, canary, [10.0, 50.0, 100.0])
    nodes = fleet(waves, set(canary))
    sim = Sim(spec(max_unavailable=max_unavailable, wave_count=4, health_timeout=1000.0, wave=0), nodes)
    offline_at = {(names[i % size], step) for i, step in flaps}
    for step in range(60):
        for name in names:
            nodes[name].online = (name, step) not in offline_at and (name, step - 1) not in offline_at
        sim.step()
    for n in nodes.values():
        n.online = True
    assert sim.run() == RolloutState.COMPLETED
    assert all(n.stored.state == DONE and n.version == NEW for n in nodes.values())
    assert all(len(n.deleted_pods) <= 1 for n in nodes.values())
    assert all(s in FINAL for s in sim.states().values())
