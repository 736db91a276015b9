"""Which power policy applies to which node, as pure functions (no I/O, no clock).

Inputs are the policies as written (a `GPUPowerPolicy` spec or a REST body: `nodeSelector`,
`priority` and the `PowerPolicy` fields, camelCase), the nodes with their labels and what their
edge last reported, and what was stored for each node last time (`NodeRecord`). Outputs are
each node's resolved `PowerPolicy` with its version, and each policy's status.

Rules:

* A policy is *valid* when its spec passes `PowerPolicy` validation (bounds, criticalTempC above
  maxTempC, no unknown field) and its selector/priority are well formed. An invalid policy is
  excluded with the reason; it affects no node and no other policy (nodes it would have won fall
  to the next matching valid policy).
* A selector matches a node when every `key: value` of it is among the node's labels; an empty
  selector matches every node (as a Pod's `nodeSelector`).
* Per node, the matching valid policy with the highest `priority` wins; equal priorities are
  broken by name (the smaller name wins), so the result never depends on listing order.
* A node that no policy matches gets nothing: its edge keeps the policy it has (its config's,
  or the last one the cloud sent).
* `version` only grows. It is bumped whenever the node's resolved content (name + policy, not
  the version) changes, as seen through the stored content hash, and also when the edge reports
  a version at least as high as ours that is not ours (the controller's database was lost, or
  the edge got a policy elsewhere): the new version is then above anything either side has seen,
  so the edge, which ignores versions not newer than its own, always takes it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import AfterValidator, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from shared.policy import PowerPolicy
from shared.wire import CamelModel

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
MAX_VERSION = INT32_MAX  # nodes.policy_version is an SQL INTEGER

# A policy's name is a Kubernetes object name: a DNS subdomain.
POLICY_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
# Label keys and values, as Kubernetes validates them.
_LABEL_NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_PREFIX_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")

SELECTION_KEYS = frozenset({"nodeSelector", "node_selector", "priority"})
CONTROLLER_KEYS = frozenset({"name", "version"})  # set by the controller, never by the spec

CONDITION_VALID = "Valid"
CONDITION_APPLIED = "Applied"


# ---- validation -----------------------------------------------------------------------------


def _label_key(key: str) -> str:
    prefix, _, name = key.rpartition("/")
    if (prefix and not _LABEL_PREFIX_RE.match(prefix)) or not _LABEL_NAME_RE.match(name):
        raise ValueError(f"not a valid label key: {key!r}")
    return key


def _label_value(value: str) -> str:
    if not _LABEL_VALUE_RE.match(value):
        raise ValueError(f"not a valid label value: {value!r} (at most 63 of [A-Za-z0-9-_.])")
    return value


LabelKey = Annotated[str, Field(strict=True), AfterValidator(_label_key)]
LabelValue = Annotated[str, Field(strict=True), AfterValidator(_label_value)]


class Placement(CamelModel):
    """The part of a policy spec that says where it applies (the rest is a `PowerPolicy`)."""

    model_config = ConfigDict(extra="ignore", alias_generator=to_camel, populate_by_name=True)

    node_selector: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    priority: int = Field(0, ge=INT32_MIN, le=INT32_MAX, strict=True)


class NodeLabels(CamelModel):
    """`PUT /api/v1/nodes/{node}/labels` body (labels for `--no-kube`)."""

    labels: dict[LabelKey, LabelValue]


@dataclass(frozen=True)
class FieldError:
    field: str  # dotted camelCase path in the spec, "" for the spec itself
    problem: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "problem": self.problem}


@dataclass(frozen=True)
class ValidPolicy:
    name: str
    priority: int
    node_selector: Mapping[str, str]
    policy: PowerPolicy  # version 0: the per-node version is set at resolution
    generation: int


@dataclass(frozen=True)
class InvalidPolicy:
    name: str
    generation: int
    errors: tuple[FieldError, ...]

    @property
    def reason(self) -> str:
        return "; ".join(f"{e.field}: {e.problem}" if e.field else e.problem for e in self.errors)


def _errors(exc: ValidationError, prefix: str = "") -> list[FieldError]:
    out = []
    for e in exc.errors(include_url=False):
        path = ".".join(str(p) for p in e["loc"])
        problem = e["msg"].removeprefix("Value error, ")
        out.append(FieldError(f"{prefix}{path}" if path else prefix.rstrip("."), problem))
    return out


def validate_spec(name: str, spec: Any, generation: int = 1) -> ValidPolicy | InvalidPolicy:
    """Check a policy spec completely; on failure collect every field error, not just the first."""
    errors: list[FieldError] = []
    if not isinstance(name, str) or not POLICY_NAME_RE.match(name):
        errors.append(FieldError("name", f"not a valid policy name: {name!r} (a DNS subdomain, at most 253)"))
    if not isinstance(spec, Mapping):
        return InvalidPolicy(str(name), generation, (*errors, FieldError("", "the spec must be a JSON object")))
    placement: Placement | None = None
    try:
        placement = Placement.model_validate(dict(spec))
    except ValidationError as exc:
        errors += _errors(exc)
    for key in sorted(CONTROLLER_KEYS & set(spec)):
        errors.append(FieldError(key, "set by the controller, not in the spec"))
    rest = {k: v for k, v in spec.items() if k not in SELECTION_KEYS and k not in CONTROLLER_KEYS}
    policy: PowerPolicy | None = None
    try:
        # the name is checked above (a DNS subdomain); a placeholder keeps its errors single
        policy = PowerPolicy.model_validate({**rest, "name": "placeholder"})
    except ValidationError as exc:
        errors += _errors(exc)
    if errors or placement is None or policy is None:
        return InvalidPolicy(str(name), generation, tuple(errors))
    policy = policy.model_copy(update={"name": name, "version": 0})
    return ValidPolicy(name, placement.priority, dict(placement.node_selector), policy, generation)


def validate_labels(labels: Any) -> tuple[dict[str, str] | None, list[FieldError]]:
    try:
        return dict(NodeLabels.model_validate({"labels": labels}).labels), []
    except ValidationError as exc:
        return None, _errors(exc)


# ---- resolution -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicySource:
    """A policy as written (CRD object or REST), before validation."""

    name: str
    spec: Mapping[str, Any]
    generation: int = 1


@dataclass(frozen=True)
class NodeView:
    """A node: its labels, and the policy its edge last reported (None: never heard from)."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    reported_name: str | None = None
    reported_version: int | None = None


@dataclass(frozen=True)
class NodeRecord:
    """What was stored for a node by the previous resolution."""

    version: int = 0
    content_hash: str | None = None


@dataclass(frozen=True)
class NodeResolution:
    node: str
    policy_name: str | None  # None: no policy matches
    policy: PowerPolicy | None  # the resolved policy, with `version` set
    content_hash: str | None
    version: int  # the node's counter (kept when nothing matches, so it never goes back)
    changed: bool  # differs from the stored record: store it, publish it (or clear it)
    applied: bool  # the edge reports exactly this name and version
    shadowed: tuple[str, ...] = ()  # valid policies that match too but lost

    def record(self) -> NodeRecord:
        return NodeRecord(self.version, self.content_hash)


@dataclass(frozen=True)
class Resolution:
    valid: Mapping[str, ValidPolicy]
    invalid: Mapping[str, InvalidPolicy]
    nodes: Mapping[str, NodeResolution]


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def rank(policy: ValidPolicy) -> tuple[int, str]:
    """Sort key: the first in this order wins (highest priority, then smallest name)."""
    return (-policy.priority, policy.name)


def choose(policies: Iterable[ValidPolicy], labels: Mapping[str, str]) -> tuple[ValidPolicy | None, tuple[str, ...]]:
    """The winning policy for these labels, and the names of the matching ones it beat."""
    matching = sorted((p for p in policies if selector_matches(p.node_selector, labels)), key=rank)
    if not matching:
        return None, ()
    return matching[0], tuple(p.name for p in matching[1:])


def content_hash(policy: PowerPolicy) -> str:
    """sha256 of the policy's canonical JSON without its version: equal content, equal hash."""
    body = policy.dump()
    body.pop("version", None)
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def validate_all(policies: Iterable[PolicySource]) -> tuple[dict[str, ValidPolicy], dict[str, InvalidPolicy]]:
    valid: dict[str, ValidPolicy] = {}
    invalid: dict[str, InvalidPolicy] = {}
    for source in policies:
        if source.name in valid or source.name in invalid:
            raise ValueError(f"two policies named {source.name!r}")
        checked = validate_spec(source.name, source.spec, source.generation)
        if isinstance(checked, ValidPolicy):
            valid[source.name] = checked
        else:
            invalid[source.name] = checked
    return valid, invalid


def named_policy(winner: ValidPolicy) -> tuple[PowerPolicy, str]:
    """The policy as a node gets it (named, version 0) and its `content_hash`."""
    named = winner.policy.model_copy(update={"name": winner.name, "version": 0})
    return named, content_hash(named)


def resolve_node(
    node: NodeView, valid: Mapping[str, ValidPolicy], record: NodeRecord | None,
    named: Mapping[str, tuple[PowerPolicy, str]] | None = None,
    versioned: dict[tuple[str, int], PowerPolicy] | None = None,
) -> NodeResolution:
    """One node's policy and version (see the module docstring for the version rule). `named`:
    `named_policy` of each valid policy, and `versioned`, the policies with their version made so
    far (filled here): computed once for the fleet rather than per node."""
    record = record or NodeRecord()
    winner, shadowed = choose(valid.values(), node.labels)
    if winner is None:
        return NodeResolution(node.name, None, None, None, record.version,
                              changed=record.content_hash is not None, applied=False)
    named_winner, digest = named[winner.name] if named is not None else named_policy(winner)
    version = record.version
    reported = node.reported_version
    ours = (node.reported_name, reported) == (winner.name, version)
    overtaken = reported is not None and reported >= version and not ours
    if digest != record.content_hash or version < 1 or overtaken:
        version = min(MAX_VERSION, max(version, reported or 0) + 1)
    final = versioned.get((winner.name, version)) if versioned is not None else None
    if final is None:
        final = named_winner.model_copy(update={"version": version})
        if versioned is not None:
            versioned[(winner.name, version)] = final
    applied = (node.reported_name, reported) == (winner.name, version)
    return NodeResolution(node.name, winner.name, final, digest, version,
                          changed=(digest, version) != (record.content_hash, record.version),
                          applied=applied, shadowed=shadowed)


def resolve(
    policies: Iterable[PolicySource], nodes: Iterable[NodeView], records: Mapping[str, NodeRecord]
) -> Resolution:
    """Validate every policy, then resolve every node."""
    valid, invalid = validate_all(policies)
    named = {name: named_policy(policy) for name, policy in valid.items()}
    versioned: dict[tuple[str, int], PowerPolicy] = {}
    out: dict[str, NodeResolution] = {}
    for node in sorted(nodes, key=lambda n: n.name):
        if node.name in out:
            raise ValueError(f"node {node.name!r} listed twice")
        out[node.name] = resolve_node(node, valid, records.get(node.name), named, versioned)
    return Resolution(valid=valid, invalid=invalid, nodes=out)


# ---- status ---------------------------------------------------------------------------------


def _condition(type_: str, status: bool, reason: str, message: str,
               previous: Sequence[Mapping[str, Any]], now: str) -> dict[str, Any]:
    """A condition; lastTransitionTime moves only when its status flips."""
    text = "True" if status else "False"
    before = next((c for c in previous if c.get("type") == type_), None)
    since = before.get("lastTransitionTime") if before and before.get("status") == text else None
    return {"type": type_, "status": text, "reason": reason, "message": message,
            "lastTransitionTime": since or now}


def _names(nodes: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(nodes[:limit])
    return shown + (f" and {len(nodes) - limit} more" if len(nodes) > limit else "")


def policy_statuses(
    resolution: Resolution, previous: Mapping[str, Mapping[str, Any]], now: str
) -> dict[str, dict[str, Any]]:
    """Each policy's status, as written to the CRD's status subresource (camelCase).

    nodesMatched: nodes where this policy is in effect (it matches and wins); applied + pending
    equals it. nodesShadowed: nodes it matches where a higher-ranked policy wins."""
    winners: dict[str, list[NodeResolution]] = {}
    shadowed: dict[str, int] = {}
    for node in resolution.nodes.values():
        if node.policy_name is not None:
            winners.setdefault(node.policy_name, []).append(node)
        for name in node.shadowed:
            shadowed[name] = shadowed.get(name, 0) + 1
    out: dict[str, dict[str, Any]] = {}
    for name, policy in resolution.valid.items():
        conditions = list(previous.get(name, {}).get("conditions") or [])
        mine = winners.get(name, [])
        pending = sorted(n.node for n in mine if not n.applied)
        applied = len(mine) - len(pending)
        if not mine:
            applied_condition = _condition(CONDITION_APPLIED, False, "NoMatchingNodes",
                                           "no node is selected by this policy (or a higher-priority one wins)",
                                           conditions, now)
        elif pending:
            applied_condition = _condition(CONDITION_APPLIED, False, "Pending",
                                           f"{applied} of {len(mine)} nodes applied; waiting for {_names(pending)}",
                                           conditions, now)
        else:
            applied_condition = _condition(CONDITION_APPLIED, True, "AllApplied",
                                           f"all {len(mine)} nodes applied it", conditions, now)
        out[name] = {
            "observedGeneration": policy.generation,
            "nodesMatched": len(mine),
            "nodesShadowed": shadowed.get(name, 0),
            "applied": applied,
            "pending": len(pending),
            "conditions": [
                _condition(CONDITION_VALID, True, "Valid", "the spec is valid", conditions, now),
                applied_condition,
            ],
        }
    for name, bad in resolution.invalid.items():
        conditions = list(previous.get(name, {}).get("conditions") or [])
        out[name] = {
            "observedGeneration": bad.generation,
            "nodesMatched": 0,
            "nodesShadowed": 0,
            "applied": 0,
            "pending": 0,
            "conditions": [
                _condition(CONDITION_VALID, False, "InvalidSpec", bad.reason[:2000], conditions, now),
                _condition(CONDITION_APPLIED, False, "InvalidSpec",
                           "not applied to any node: the spec is invalid", conditions, now),
            ],
        }
    return out
