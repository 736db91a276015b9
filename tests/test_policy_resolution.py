"""cloud/policies/resolution.py: validation, which policy a node gets, its version, the status.

Table-driven for the rules, hypothesis for the properties that must hold for any input:
deterministic (no dependence on listing order), the winner is the best matching valid policy,
versions never go back and change exactly when the content does, invalid policies affect nothing.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud.policies.resolution import (
    InvalidPolicy,
    NodeRecord,
    NodeView,
    PolicySource,
    Resolution,
    ValidPolicy,
    content_hash,
    policy_statuses,
    rank,
    resolve,
    selector_matches,
    validate_labels,
    validate_spec,
)

NOW = "2026-01-01T00:00:00Z"
LATER = "2026-01-01T00:05:00Z"


def pol(name: str, priority: int = 0, selector: dict[str, str] | None = None, generation: int = 1,
        **fields: Any) -> PolicySource:
    return PolicySource(name, {"priority": priority, "nodeSelector": selector or {}, **fields}, generation)


def run(policies: list[PolicySource], nodes: list[NodeView],
        records: dict[str, NodeRecord] | None = None) -> Resolution:
    return resolve(policies, nodes, records or {})


def feed_back(res: Resolution) -> dict[str, NodeRecord]:
    return {name: r.record() for name, r in res.nodes.items()}


# ---- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "field", "words"), [
    ({"thermalThrottling": {"maxTempC": 85, "criticalTempC": 80}}, "thermalThrottling", "criticalTempC"),
    ({"thermalThrottling": {"maxTempC": 90}}, "thermalThrottling", "must be above maxTempC"),  # default critical 90
    ({"thermalThrottling": {"maxTempC": 500}}, "thermalThrottling.maxTempC", "less than or equal to 150"),
    ({"powerCapWatts": -100}, "powerCapWatts", "greater than 0"),
    ({"powerCapWatts": 0}, "powerCapWatts", "greater than 0"),
    ({"powerSaving": {"capPercent": 120}}, "powerSaving.capPercent", "less than or equal to 100"),
    ({"powerSaving": {"sustainPeriod": "soon"}}, "powerSaving.sustainPeriod", "not a duration"),
    ({"xidPolicy": {"defaultAction": "explode"}}, "xidPolicy.defaultAction", "record"),
    ({"priority": "high"}, "priority", "integer"),
    ({"priority": True}, "priority", "integer"),
    ({"priority": 2**31}, "priority", "less than or equal"),
    ({"nodeSelector": {"zone": 3}}, "nodeSelector.zone", "string"),
    ({"nodeSelector": {"bad key!": "x"}}, "nodeSelector.bad key!.[key]", "label key"),
    ({"nodeSelector": {"zone": "a" * 64}}, "nodeSelector.zone", "label value"),
    ({"nodeSelector": ["zone"]}, "nodeSelector", "dictionary"),
    ({"powerCap": 300}, "powerCap", "Extra inputs"),
    ({"version": 7}, "version", "set by the controller"),
    ({"name": "other"}, "name", "set by the controller"),
])
def test_invalid_specs_name_the_field(spec: dict[str, Any], field: str, words: str) -> None:
    checked = validate_spec("p", spec)
    assert isinstance(checked, InvalidPolicy)
    assert any(e.field == field and words in e.problem for e in checked.errors), checked.errors
    assert words in checked.reason


def test_every_error_is_reported_not_just_the_first() -> None:
    checked = validate_spec("p", {"powerCapWatts": -1, "priority": "x", "thermalThrottling": {"hysteresisC": 99}})
    assert isinstance(checked, InvalidPolicy)
    assert {e.field for e in checked.errors} == {"powerCapWatts", "priority", "thermalThrottling.hysteresisC"}


@pytest.mark.parametrize("name", ["", "Upper", "under_score", "-lead", "a" * 254, "sp ace"])
def test_policy_names_are_dns_subdomains(name: str) -> None:
    checked = validate_spec(name, {})
    assert isinstance(checked, InvalidPolicy) and checked.errors[0].field == "name"


def test_spec_not_an_object() -> None:
    checked = validate_spec("p", ["nope"])
    assert isinstance(checked, InvalidPolicy) and "JSON object" in checked.reason


def test_a_valid_spec_both_spellings_and_durations() -> None:
    checked = validate_spec("east", {"priority": 5, "node_selector": {"zone": "east", "kgpu.io/tier": ""},
                                     "powerCapWatts": 400, "thermalThrottling": {"coolDownPeriod": "2m"}})
    assert isinstance(checked, ValidPolicy)
    assert (checked.priority, dict(checked.node_selector)) == (5, {"zone": "east", "kgpu.io/tier": ""})
    assert checked.policy.name == "east" and checked.policy.version == 0
    assert checked.policy.power_cap_watts == 400 and checked.policy.thermal_throttling.cool_down_period == 120


def test_labels_validation() -> None:
    assert validate_labels({"zone": "east", "example.com/gpu": "h100"}) == ({"zone": "east", "example.com/gpu": "h100"}, [])
    labels, errors = validate_labels({"zone": "no spaces"})
    assert labels is None and errors[0].field == "labels.zone"
    assert validate_labels("zone=east")[0] is None


# ---- choosing -------------------------------------------------------------------------------


@pytest.mark.parametrize(("selector", "labels", "matches"), [
    ({}, {}, True),
    ({}, {"zone": "east"}, True),
    ({"zone": "east"}, {"zone": "east", "gpu": "h100"}, True),
    ({"zone": "east", "gpu": "h100"}, {"zone": "east"}, False),
    ({"zone": "east"}, {"zone": "west"}, False),
    ({"zone": ""}, {}, False),  # a key must be present, even with an empty value
    ({"zone": ""}, {"zone": ""}, True),
])
def test_selector_matches(selector: dict[str, str], labels: dict[str, str], matches: bool) -> None:
    assert selector_matches(selector, labels) is matches


EAST_H100 = NodeView("a", {"zone": "east", "gpu": "h100"})
EAST_A100 = NodeView("b", {"zone": "east", "gpu": "a100"})
WEST = NodeView("c", {"zone": "west"})


@pytest.mark.parametrize(("policies", "expected"), [
    ([], {"a": None, "b": None, "c": None}),
    ([pol("east", 10, {"zone": "east"})], {"a": "east", "b": "east", "c": None}),
    ([pol("east", 10, {"zone": "east"}), pol("h100", 20, {"gpu": "h100"})], {"a": "h100", "b": "east", "c": None}),
    ([pol("east", 30, {"zone": "east"}), pol("h100", 20, {"gpu": "h100"})], {"a": "east", "b": "east", "c": None}),
    ([pol("all", 0), pol("east", 10, {"zone": "east"})], {"a": "east", "b": "east", "c": "all"}),
    ([pol("zeta", 5), pol("alpha", 5)], {"a": "alpha", "b": "alpha", "c": "alpha"}),  # tie: smaller name
    ([pol("neg", -1), pol("zero", 0, {"zone": "west"})], {"a": "neg", "b": "neg", "c": "zero"}),
    # an invalid policy, whatever its priority, takes no node: the next valid one does
    ([pol("broken", 100, thermalThrottling={"maxTempC": 95}), pol("east", 1, {"zone": "east"})],
     {"a": "east", "b": "east", "c": None}),
])
def test_winner_per_node(policies: list[PolicySource], expected: dict[str, str | None]) -> None:
    res = run(policies, [EAST_H100, EAST_A100, WEST])
    assert {n: r.policy_name for n, r in res.nodes.items()} == expected
    for r in res.nodes.values():
        assert (r.policy is None) == (r.policy_name is None)
        if r.policy is not None:
            assert r.policy.name == r.policy_name and r.policy.version == r.version == 1


def test_invalid_policies_are_listed_with_their_reason() -> None:
    res = run([pol("broken", 100, thermalThrottling={"maxTempC": 95}), pol("cap", powerCapWatts=-5),
               pol("ok", 1)], [WEST])
    assert set(res.invalid) == {"broken", "cap"} and set(res.valid) == {"ok"}
    assert "criticalTempC" in res.invalid["broken"].reason and "powerCapWatts" in res.invalid["cap"].reason
    assert res.nodes["c"].policy_name == "ok"


def test_two_policies_with_one_name_are_refused() -> None:
    with pytest.raises(ValueError):
        run([pol("x"), pol("x", 1)], [])


# ---- versions -------------------------------------------------------------------------------


def test_version_grows_only_when_the_content_changes() -> None:
    nodes = [EAST_H100, WEST]
    first = run([pol("east", 1, {"zone": "east"}, powerCapWatts=400)], nodes)
    a = first.nodes["a"]
    assert (a.version, a.changed, a.applied) == (1, True, False)
    assert (first.nodes["c"].version, first.nodes["c"].changed) == (0, False)

    same = run([pol("east", 1, {"zone": "east"}, powerCapWatts=400, generation=2)], nodes, feed_back(first))
    assert (same.nodes["a"].version, same.nodes["a"].changed) == (1, False)  # generation alone: same content

    # priority and selector are not content either: same policy, same version
    widened = run([pol("east", 7, {}, powerCapWatts=400)], nodes, feed_back(first))
    assert (widened.nodes["a"].version, widened.nodes["a"].changed) == (1, False)
    assert (widened.nodes["c"].version, widened.nodes["c"].changed) == (1, True)

    updated = run([pol("east", 1, {"zone": "east"}, powerCapWatts=350)], nodes, feed_back(first))
    assert (updated.nodes["a"].version, updated.nodes["a"].changed) == (2, True)
    assert updated.nodes["a"].policy is not None and updated.nodes["a"].policy.power_cap_watts == 350

    # another policy with identical settings is still a change for the node (its name is content)
    renamed = run([pol("east2", 1, {"zone": "east"}, powerCapWatts=350)], nodes, feed_back(updated))
    assert (renamed.nodes["a"].version, renamed.nodes["a"].policy_name) == (3, "east2")

    # no policy any more: nothing to publish, the counter is kept; a later match goes above it
    gone = run([], nodes, feed_back(renamed))
    assert (gone.nodes["a"].policy, gone.nodes["a"].version, gone.nodes["a"].changed) == (None, 3, True)
    back = run([pol("east2", 1, {"zone": "east"}, powerCapWatts=350)], nodes, feed_back(gone))
    assert (back.nodes["a"].version, back.nodes["a"].changed) == (4, True)


@pytest.mark.parametrize(("record", "reported", "expected_version", "applied"), [
    (None, (None, None), 1, False),  # never heard from, never resolved
    (None, ("default", 0), 1, False),  # the edge runs its config policy
    (None, ("default", 9), 10, False),  # config says version 9: go above it
    (None, ("east", 4), 5, False),  # the cloud's database was lost: go above the edge's
    ("same", ("east", 4), 4, True),  # stored v4, the edge has it
    ("same", ("east", 3), 4, False),  # the edge has an older one: pending, no bump
    ("same", ("east", 6), 7, False),  # the edge has a newer one than ours (another controller?)
    ("same", ("west", 4), 5, False),  # same number, other policy: the edge would ignore ours
])
def test_version_against_what_the_edge_reports(record: str | None, reported: tuple[str | None, int | None],
                                               expected_version: int, applied: bool) -> None:
    policies = [pol("east", 1, powerCapWatts=300)]
    records = {}
    if record == "same":
        base = run(policies, [NodeView("a")])
        records = {"a": NodeRecord(4, base.nodes["a"].content_hash)}
    res = run(policies, [NodeView("a", {}, *reported)], records)
    assert (res.nodes["a"].version, res.nodes["a"].applied) == (expected_version, applied)
    if applied:
        assert not res.nodes["a"].changed


def test_content_hash_ignores_the_version_only() -> None:
    p = validate_spec("x", {"powerCapWatts": 300})
    assert isinstance(p, ValidPolicy)
    assert content_hash(p.policy) == content_hash(p.policy.model_copy(update={"version": 41}))
    assert content_hash(p.policy) != content_hash(p.policy.model_copy(update={"power_cap_watts": 301}))
    assert content_hash(p.policy) != content_hash(p.policy.model_copy(update={"name": "y"}))


# ---- status ---------------------------------------------------------------------------------


def test_status_counts_and_conditions() -> None:
    policies = [pol("east", 10, {"zone": "east"}, generation=3), pol("all", 0),
                pol("broken", 50, thermalThrottling={"maxTempC": 95, "criticalTempC": 94})]
    first = run(policies, [EAST_H100, EAST_A100, WEST])
    v = first.nodes["a"].version
    nodes = [NodeView("a", EAST_H100.labels, "east", v), EAST_A100, NodeView("c", WEST.labels, "all", 1)]
    res = run(policies, nodes, feed_back(first))
    status = policy_statuses(res, {}, NOW)
    east, all_, broken = status["east"], status["all"], status["broken"]
    assert {k: east[k] for k in ("observedGeneration", "nodesMatched", "nodesShadowed", "applied", "pending")} == \
        {"observedGeneration": 3, "nodesMatched": 2, "nodesShadowed": 0, "applied": 1, "pending": 1}
    valid, applied = east["conditions"]
    assert (valid["type"], valid["status"], valid["reason"]) == ("Valid", "True", "Valid")
    assert (applied["type"], applied["status"], applied["reason"]) == ("Applied", "False", "Pending")
    assert "1 of 2" in applied["message"] and "b" in applied["message"]
    assert (all_["nodesMatched"], all_["nodesShadowed"], all_["applied"]) == (1, 2, 1)
    assert all_["conditions"][1]["status"] == "True"
    assert (broken["nodesMatched"], broken["applied"], broken["pending"]) == (0, 0, 0)
    bad_valid = broken["conditions"][0]
    assert (bad_valid["status"], bad_valid["reason"]) == ("False", "InvalidSpec")
    assert "criticalTempC (94.0) must be above maxTempC (95.0)" in bad_valid["message"]

    # lastTransitionTime moves only when a condition's status flips
    nodes[1] = NodeView("b", EAST_A100.labels, "east", res.nodes["b"].version)
    later = policy_statuses(run(policies, nodes, feed_back(res)), status, LATER)
    assert later["east"]["conditions"][0]["lastTransitionTime"] == NOW  # Valid stayed True
    assert later["east"]["conditions"][1]["lastTransitionTime"] == LATER  # Applied went True
    assert later["east"]["applied"] == 2 and later["east"]["pending"] == 0
    assert later["broken"]["conditions"][0]["lastTransitionTime"] == NOW


def test_status_of_a_policy_selecting_nothing() -> None:
    status = policy_statuses(run([pol("gpu-x", 1, {"gpu": "x100"})], [WEST]), {}, NOW)["gpu-x"]
    assert (status["nodesMatched"], status["conditions"][1]["reason"]) == (0, "NoMatchingNodes")


# ---- properties -----------------------------------------------------------------------------

LABEL_KEYS = ["zone", "gpu", "tier"]
LABEL_VALUES = ["a", "b"]
labels_st = st.dictionaries(st.sampled_from(LABEL_KEYS), st.sampled_from(LABEL_VALUES), max_size=3)
spec_st = st.fixed_dictionaries({
    "priority": st.integers(-3, 3),
    "nodeSelector": st.dictionaries(st.sampled_from(LABEL_KEYS), st.sampled_from(LABEL_VALUES), max_size=2),
}, optional={
    "powerCapWatts": st.sampled_from([250, 400, -1]),  # -1: invalid
    "thermalThrottling": st.sampled_from([{"maxTempC": 80}, {"maxTempC": 95}]),  # 95 >= 90: invalid
})
policies_st = st.dictionaries(st.sampled_from([f"p{i}" for i in range(6)]), spec_st, max_size=6).map(
    lambda d: [PolicySource(name, spec) for name, spec in d.items()])
nodes_st = st.dictionaries(st.sampled_from([f"n{i}" for i in range(5)]), labels_st, min_size=1, max_size=5).map(
    lambda d: [NodeView(name, labels) for name, labels in d.items()])


@settings(max_examples=200, deadline=None)
@given(policies_st, nodes_st, st.randoms(use_true_random=False))
def test_property_order_independent_and_best_match_wins(policies: list[PolicySource], nodes: list[NodeView],
                                                        rnd: random.Random) -> None:
    res = run(policies, nodes)
    shuffled_p, shuffled_n = policies[:], nodes[:]
    rnd.shuffle(shuffled_p)
    rnd.shuffle(shuffled_n)
    assert run(shuffled_p, shuffled_n) == res
    for node in nodes:
        r = res.nodes[node.name]
        matching = [p for p in res.valid.values() if selector_matches(p.node_selector, node.labels)]
        if not matching:
            assert r.policy_name is None
            continue
        best = min(matching, key=rank)
        assert r.policy_name == best.name
        assert set(r.shadowed) == {p.name for p in matching} - {best.name}
        assert r.policy_name not in res.invalid


@settings(max_examples=200, deadline=None)
@given(policies_st, nodes_st)
def test_property_invalid_policies_change_nothing(policies: list[PolicySource], nodes: list[NodeView]) -> None:
    res = run(policies, nodes)
    only_valid = run([p for p in policies if p.name in res.valid], nodes)
    assert only_valid.nodes == res.nodes
    assert set(res.valid) | set(res.invalid) == {p.name for p in policies}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(policies_st, st.booleans()), min_size=1, max_size=8), nodes_st)
def test_property_versions_only_grow_and_change_exactly_with_the_content(
        rounds: list[tuple[list[PolicySource], bool]], nodes: list[NodeView]) -> None:
    records: dict[str, NodeRecord] = {}
    published: dict[str, tuple[int, str]] = {}  # node -> (version, content) of the last policy sent
    reported: dict[str, tuple[str, int]] = {}
    for policies, edges_apply in rounds:
        views = [NodeView(n.name, n.labels, *reported.get(n.name, (None, None))) for n in nodes]
        res = run(policies, views, records)
        for name, r in res.nodes.items():
            before = records.get(name, NodeRecord())
            assert r.version >= before.version, "a version never goes back"
            if r.policy is None:
                continue
            content = r.policy.model_dump_json(exclude={"version"})
            if name in published:
                old_version, old_content = published[name]
                if content != old_content:
                    assert r.version > old_version, "new content, new version"
                elif before.content_hash == r.content_hash:
                    assert r.version == old_version, "same content, same version (the edge is not behind)"
            published[name] = (r.version, content)
            if edges_apply:
                reported[name] = (r.policy.name, r.version)
        records = feed_back(res)
        # and a second resolution of the same state is a fixed point
        again = run(policies, [NodeView(n.name, n.labels, *reported.get(n.name, (None, None))) for n in nodes], records)
        assert not any(r.changed for r in again.nodes.values())
