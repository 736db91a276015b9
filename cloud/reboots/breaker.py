"""The circuit breaker over node reboots: which pending requests to grant, hold or deny (pure).

A reboot is the remediation ladder's last step (edge/remediation/): the node goes away for
minutes with every GPU and pod on it. At an edge site with nobody on hand, a fleet of ladders
that all decide to reboot at once would take the site down, so the cloud grants reboots one at a
time under these rules, per site (the `topology.kubernetes.io/zone` of the node; a node without
one, or without a cluster, is its own site):

- `reboot_max_per_site` 0: nothing is granted, every request is denied (advised only: the
  operator reboots by hand);
- a node that is offline is held (it cannot take the command; it asks again when it is back);
- one reboot at a time per site: a granted reboot is in progress until the node was seen offline
  and is back online, its edge refused the command, or `reboot_timeout` has passed;
- at most `reboot_max_per_site` grants per site within `reboot_window`;
- never the last healthy node of a site: a node is healthy when it is online, has at least one
  healthy GPU and is not rebooting; a node with no healthy GPU left may always go (it serves
  nothing), a node with a healthy GPU only while another healthy node stays in its site.

Every pending request of a node gets the same verdict (one reboot serves them all).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

ZONE_LABEL = "topology.kubernetes.io/zone"


class Verdict(StrEnum):
    GRANT = "grant"
    HOLD = "hold"
    DENY = "deny"


class Ended(StrEnum):
    """How a granted reboot stopped counting as in progress."""

    BACK = "back"  # the node was seen offline after the grant and is online again
    REFUSED = "refused"  # the edge answered the command with a failure (it had not asked, ...)
    TIMED_OUT = "timed-out"  # reboot_timeout passed first


@dataclass(frozen=True)
class Limits:
    """The breaker's settings (CloudSettings.reboot_*)."""

    max_per_site: int
    window_s: float
    timeout_s: float


@dataclass(frozen=True)
class Request:
    """A pending reboot request (one REBOOT_REQUEST event)."""

    id: int  # the event's id in the fleet store
    node: str
    received_at: float  # cloud clock


@dataclass(frozen=True)
class Grant:
    """A granted reboot, as recorded."""

    request_id: int
    node: str
    site: str  # the site it was granted in: it counts against that site's budget
    granted_at: float
    down_at: float | None = None  # when the node was first seen offline after the grant
    ended_at: float | None = None
    ended: Ended | None = None
    refusal: str | None = None  # the edge's answer when it refused the command (from the outbox)


@dataclass(frozen=True)
class NodeState:
    online: bool
    last_seen: float  # cloud clock
    healthy_gpus: int


@dataclass(frozen=True)
class Decision:
    request_id: int
    node: str
    site: str
    verdict: Verdict
    why: str
    primary: int  # the node's oldest pending request: a grant's command is named after it

    @property
    def command_id(self) -> str:
        return command_id(self.primary)


def command_id(request_id: int) -> str:
    """The reboot command of a grant: one per reboot, whichever requests it serves."""
    return f"reboot-{request_id}"


def site_of(node: str, zones: Mapping[str, str]) -> str:
    """The node's site: its zone label, else the node itself."""
    return zones.get(node) or node


def stamp(ts: float) -> str:
    """A moment for a reason line: UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# ---- granted reboots ---------------------------------------------------------------------------


def track(grants: Iterable[Grant], nodes: Mapping[str, NodeState], now: float, limits: Limits) -> list[Grant]:
    """Every grant as it stands now: `down_at` once its node is seen offline (its last message,
    at the earliest the grant), ended once the node is back online with a message after that,
    its edge refused the command, or `timeout_s` passed."""
    out = []
    for g in grants:
        if g.ended_at is None:
            state = nodes.get(g.node)
            if g.down_at is None and (state is None or not state.online):
                # from its last message, not from now: a node back before this scan is back
                g = replace(g, down_at=now if state is None else max(state.last_seen, g.granted_at))
            if g.refusal is not None:
                g = replace(g, ended_at=now, ended=Ended.REFUSED)
            elif (state is not None and state.online and g.down_at is not None
                  and state.last_seen > g.down_at):
                g = replace(g, ended_at=now, ended=Ended.BACK)
            elif now - g.granted_at >= limits.timeout_s:
                g = replace(g, ended_at=now, ended=Ended.TIMED_OUT)
        out.append(g)
    return out


def in_progress(g: Grant, now: float, limits: Limits) -> bool:
    """Whether a grant (as `track` left it) still holds its site."""
    return g.ended_at is None and now - g.granted_at < limits.timeout_s


def spent_until(granted_at: Sequence[float], now: float, limits: Limits) -> float | None:
    """When a site whose grants were at `granted_at` may be granted again (None: it may now).
    With `max_per_site` 0 it never may: `inf`."""
    if limits.max_per_site <= 0:
        return float("inf")
    recent = sorted(t for t in granted_at if now - t < limits.window_s)
    if len(recent) < limits.max_per_site:
        return None
    return recent[len(recent) - limits.max_per_site] + limits.window_s


def open_sites(grants: Iterable[Grant], sites: Iterable[str], now: float, limits: Limits) -> dict[str, bool]:
    """site -> whether its breaker is open (its budget spent) for every site named or granted
    in the window: `kgpu_reboot_breaker_open{site}`."""
    by_site: dict[str, list[float]] = defaultdict(list)
    for g in grants:
        if now - g.granted_at < limits.window_s:
            by_site[g.site].append(g.granted_at)
    return {site: spent_until(by_site.get(site, []), now, limits) is not None
            for site in sorted(set(sites) | set(by_site))}


# ---- pending requests --------------------------------------------------------------------------


def decide(requests: Iterable[Request], grants: Iterable[Grant], nodes: Mapping[str, NodeState],
           zones: Mapping[str, str], limits: Limits, now: float) -> list[Decision]:
    """A verdict for every pending request, oldest node first; a grant is counted at once, so the
    next request of the same site sees it. `grants` as `track` left them."""
    by_node: dict[str, list[Request]] = defaultdict(list)
    for r in sorted(requests, key=lambda r: r.id):
        by_node[r.node].append(r)
    window: dict[str, list[float]] = defaultdict(list)
    active: dict[str, list[Grant]] = defaultdict(list)  # site -> reboots in progress there
    rebooting: dict[str, Grant] = {}
    for g in grants:
        if now - g.granted_at < limits.window_s:
            window[g.site].append(g.granted_at)
        if in_progress(g, now, limits):
            active[g.site].append(g)
            rebooting[g.node] = g
    healthy: dict[str, set[str]] = defaultdict(set)
    for name, state in nodes.items():
        if state.online and state.healthy_gpus > 0 and name not in rebooting:
            healthy[site_of(name, zones)].add(name)

    decisions: list[Decision] = []
    for node, pending in by_node.items():
        site = site_of(node, zones)
        verdict, why = _verdict(node, site, nodes.get(node), rebooting.get(node), active[site],
                                window[site], healthy[site], limits, now)
        if verdict is Verdict.GRANT:
            g = Grant(request_id=pending[0].id, node=node, site=site, granted_at=now)
            window[site].append(now)
            active[site].append(g)
            rebooting[node] = g
            healthy[site].discard(node)
        decisions += [Decision(r.id, node, site, verdict, why, pending[0].id) for r in pending]
    return decisions


def _verdict(node: str, site: str, state: NodeState | None, own: Grant | None, active: Sequence[Grant],
             window: Sequence[float], healthy: set[str], limits: Limits, now: float) -> tuple[Verdict, str]:
    where = f"site {site!r}" if site != node else "its own site (no zone)"
    if limits.max_per_site <= 0:
        return Verdict.DENY, ("reboots are advised only (reboot_max_per_site 0): reboot the node by hand "
                              "if it needs it")
    if state is None or not state.online:
        return Verdict.HOLD, "the node is offline: it cannot take the command"
    if own is not None:
        return Verdict.HOLD, f"a reboot of this node granted at {stamp(own.granted_at)} is still in progress"
    if active:
        first = min(active, key=lambda g: g.granted_at)
        return Verdict.HOLD, (f"another reboot in {where} is still in progress ({first.node}, granted at "
                              f"{stamp(first.granted_at)}): one at a time per site")
    until = spent_until(window, now, limits)
    if until is not None:
        return Verdict.HOLD, (f"the budget of {where} ({limits.max_per_site} per {limits.window_s:g} s) is "
                              f"spent until {stamp(until)}")
    others = healthy - {node}
    if node in healthy and not others:
        return Verdict.HOLD, (f"it is the last healthy node of {where} (online with a healthy GPU); "
                              "it waits until another node there is healthy")
    used = sum(1 for t in window if now - t < limits.window_s) + 1
    return Verdict.GRANT, (f"{where}: reboot {used} of {limits.max_per_site} in {limits.window_s:g} s; "
                           f"{len(others)} other healthy node(s) there")
