"""Which `GPUPartitioning` applies to which node, and whether its MIG layouts fit the node's GPUs:
pure functions (no I/O, no clock).

Rules (the same as the power policies', cloud/policies/resolution.py):

* An object is *valid* when its spec passes `shared.partitioning.PartitioningSpec` validation
  (selector, priority, layouts, replicas). An invalid one affects no node; the nodes it would have
  won fall to the next valid object that selects them.
* A selector matches a node when every `key: value` is among the node's labels (empty: every node).
* Per node the matching valid object with the highest `priority` wins, then the smaller name.
* The node is sent `NodePartitioning(name, version=metadata.generation, models=spec.models)`; a
  node that none selects is sent an empty one (`name` "", no models: its edge leaves its GPUs as
  they are).
* Fit: for every node an object is in effect on and every GPU model the node reports, the model's
  MIG layout must be placeable (`shared.mig.place`); each that is not is a `Problem` naming the
  node, the model and NVIDIA's reason. It is an early warning: the object is still published (the
  edge refuses such a layout itself, with the same reason).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from shared.mig import ImpossibleLayout, place
from shared.partitioning import NodePartitioning, PartitioningSpec

CONDITION_VALID = "Valid"
CONDITION_FITS = "Fits"
CONDITION_APPLIED = "Applied"
MAX_PROBLEMS = 50  # listed in the status; the count is always complete
EMPTY = NodePartitioning()


@dataclass(frozen=True)
class PartitioningSource:
    """A `GPUPartitioning` object as listed: its name, raw spec and metadata.generation."""

    name: str
    spec: Mapping[str, Any]
    generation: int = 1
    status: Mapping[str, Any] = field(default_factory=dict)  # as stored on the object


@dataclass(frozen=True)
class ValidPartitioning:
    name: str
    generation: int
    spec: PartitioningSpec


@dataclass(frozen=True)
class InvalidPartitioning:
    name: str
    generation: int
    reason: str


@dataclass(frozen=True)
class NodeView:
    """A node: its labels, its GPU models (as NVML names them) and what its edge last reported."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    gpu_models: tuple[str, ...] = ()
    reported_name: str | None = None
    reported_version: int | None = None
    reported_state: str | None = None


@dataclass(frozen=True)
class Problem:
    node: str
    model: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"node": self.node, "model": self.model, "reason": self.reason}


@dataclass(frozen=True)
class NodeResolution:
    node: str
    partitioning: NodePartitioning  # EMPTY when nothing selects the node
    shadowed: tuple[str, ...] = ()  # valid objects that select it too but lost
    problems: tuple[Problem, ...] = ()

    def payload_hash(self) -> str:
        """What the broker should hold for this node, as a hash: publish again only when it moves."""
        body = json.dumps(self.partitioning.dump(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True)
class Resolution:
    valid: Mapping[str, ValidPartitioning]
    invalid: Mapping[str, InvalidPartitioning]
    nodes: Mapping[str, NodeResolution]
    reported: Mapping[str, tuple[str | None, int | None]]  # node -> (name, version) its edge reports

    def applied(self, node: str) -> bool:
        r = self.nodes[node]
        return self.reported.get(node) == (r.partitioning.name, r.partitioning.version)


def validate(source: PartitioningSource) -> ValidPartitioning | InvalidPartitioning:
    """Check one object's spec; every field error in the reason, not just the first."""
    try:
        spec = PartitioningSpec.model_validate(dict(source.spec))
    except ValidationError as exc:
        problems = []
        for e in exc.errors(include_url=False):
            path = ".".join(str(p) for p in e["loc"])
            problems.append(f"{path}: {e['msg'].removeprefix('Value error, ')}" if path else e["msg"])
        return InvalidPartitioning(source.name, source.generation, "; ".join(problems))
    return ValidPartitioning(source.name, max(1, source.generation), spec)


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def choose(objects: Iterable[ValidPartitioning],
           labels: Mapping[str, str]) -> tuple[ValidPartitioning | None, tuple[str, ...]]:
    """The winner for these labels (highest priority, then smallest name) and those it beat."""
    matching = sorted((o for o in objects if selector_matches(o.spec.node_selector, labels)),
                      key=lambda o: (-o.spec.priority, o.name))
    if not matching:
        return None, ()
    return matching[0], tuple(o.name for o in matching[1:])


def fit_problems(node: str, partitioning: NodePartitioning, gpu_models: Iterable[str]) -> list[Problem]:
    """Each GPU model of the node whose MIG layout cannot be made, with the reason."""
    problems = []
    for model in sorted(set(gpu_models)):
        wanted = partitioning.for_model(model)
        if wanted is None or wanted.mig is None:
            continue
        try:
            place(model, wanted.mig)
        except ImpossibleLayout as exc:
            problems.append(Problem(node, model, str(exc)))
    return problems


def resolve(objects: Iterable[PartitioningSource], nodes: Iterable[NodeView]) -> Resolution:
    """Validate every object, then give every node its partitioning and its fit problems."""
    valid: dict[str, ValidPartitioning] = {}
    invalid: dict[str, InvalidPartitioning] = {}
    for source in objects:
        checked = validate(source)
        if isinstance(checked, ValidPartitioning):
            valid[source.name] = checked
        else:
            invalid[source.name] = checked
    out: dict[str, NodeResolution] = {}
    reported: dict[str, tuple[str | None, int | None]] = {}
    for node in sorted(nodes, key=lambda n: n.name):
        winner, shadowed = choose(valid.values(), node.labels)
        if winner is None:
            out[node.name] = NodeResolution(node.name, EMPTY)
        else:
            partitioning = NodePartitioning(name=winner.name, version=winner.generation,
                                            models=dict(winner.spec.models))
            out[node.name] = NodeResolution(node.name, partitioning, shadowed,
                                            tuple(fit_problems(node.name, partitioning, node.gpu_models)))
        reported[node.name] = (node.reported_name, node.reported_version)
    return Resolution(valid=valid, invalid=invalid, nodes=out, reported=reported)


# ---- status ---------------------------------------------------------------------------------


def _condition(type_: str, status: bool, reason: str, message: str,
               previous: Sequence[Mapping[str, Any]], now: str) -> dict[str, Any]:
    """A condition; lastTransitionTime moves only when its status flips."""
    text = "True" if status else "False"
    before = next((c for c in previous if c.get("type") == type_), None)
    since = before.get("lastTransitionTime") if before and before.get("status") == text else None
    return {"type": type_, "status": text, "reason": reason, "message": message[:2000],
            "lastTransitionTime": since or now}


def _names(items: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def statuses(resolution: Resolution, previous: Mapping[str, Mapping[str, Any]], now: str) -> dict[str, dict[str, Any]]:
    """Each object's status subresource (camelCase): counts, fit problems and conditions."""
    mine: dict[str, list[NodeResolution]] = {}
    shadowed: dict[str, int] = {}
    for r in resolution.nodes.values():
        if r.partitioning.name:
            mine.setdefault(r.partitioning.name, []).append(r)
        for name in r.shadowed:
            shadowed[name] = shadowed.get(name, 0) + 1
    out: dict[str, dict[str, Any]] = {}
    for name, obj in resolution.valid.items():
        before = list((previous.get(name) or {}).get("conditions") or [])
        nodes = mine.get(name, [])
        pending = sorted(r.node for r in nodes if not resolution.applied(r.node))
        problems = [p for r in nodes for p in r.problems]
        if problems:
            first = problems[0]
            fits = _condition(CONDITION_FITS, False, "ImpossibleLayout",
                              f"{len(problems)} layout(s) cannot be made; first: node {first.node}, "
                              f"{first.model}: {first.reason}", before, now)
        else:
            fits = _condition(CONDITION_FITS, True, "Fits", "every MIG layout fits the GPUs of the nodes it is in "
                              "effect on", before, now)
        if not nodes:
            applied = _condition(CONDITION_APPLIED, False, "NoMatchingNodes",
                                 "no node is selected by this object (or a higher-priority one wins)", before, now)
        elif pending:
            applied = _condition(CONDITION_APPLIED, False, "Pending",
                                 f"{len(nodes) - len(pending)} of {len(nodes)} nodes applied it; waiting for "
                                 f"{_names(pending)}", before, now)
        else:
            applied = _condition(CONDITION_APPLIED, True, "AllApplied", f"all {len(nodes)} nodes applied it",
                                 before, now)
        out[name] = {
            "observedGeneration": obj.generation, "nodesMatched": len(nodes),
            "nodesShadowed": shadowed.get(name, 0), "applied": len(nodes) - len(pending),
            "pending": len(pending), "problems": [p.as_dict() for p in problems[:MAX_PROBLEMS]],
            "conditions": [_condition(CONDITION_VALID, True, "Valid", "the spec is valid", before, now), fits,
                           applied],
        }
    for name, bad in resolution.invalid.items():
        before = list((previous.get(name) or {}).get("conditions") or [])
        out[name] = {
            "observedGeneration": bad.generation, "nodesMatched": 0, "nodesShadowed": 0, "applied": 0,
            "pending": 0, "problems": [],
            "conditions": [
                _condition(CONDITION_VALID, False, "InvalidSpec", bad.reason, before, now),
                _condition(CONDITION_FITS, False, "InvalidSpec", "not checked: the spec is invalid", before, now),
                _condition(CONDITION_APPLIED, False, "InvalidSpec", "not applied to any node: the spec is invalid",
                           before, now),
            ],
        }
    return out
