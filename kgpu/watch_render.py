"""`kgpu watch`'s display: a `WatchState` turned into rich renderables, one whole screen per
refresh. Apart from the state (kgpu/watch_state.py) and the loop (kgpu/watch.py): nothing here
changes what the watcher knows, so a refresh can be drawn from any state at any time.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from kgpu.watch_state import TOPIC_KINDS, WatchState


@dataclass
class LinkView:
    """The watcher's own connection, shown on top of the display."""

    broker: str
    connected: bool = False
    error: str | None = None


def format_ago(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def format_lag(lag: float | None) -> Text:
    if lag is None:
        return Text("—")
    text = f"{lag:+.2f}s" if abs(lag) < 100 else ("+" if lag > 0 else "-") + format_ago(abs(lag))
    if lag < 0:
        return Text(f"{text} clock ahead", style="yellow")
    return Text(text, style="red" if lag > 30 else "")


def render(state: WatchState, now: float, link: LinkView | None = None) -> RenderableType:
    """The whole display for one refresh; `now` is wall-clock unix seconds."""
    parts: list[RenderableType] = []
    if link is not None:
        header = Text("kgpu watch ", style="bold")
        header.append(link.broker)
        if link.connected:
            header.append("  ● connected", style="green")
        else:
            header.append("  ✗ not connected", style="bold red")
            if link.error:
                header.append(f": {link.error}", style="red")
            header.append(" — retrying")
        filters = [f"node={state.node_filter}" if state.node_filter else "",
                   f"kind={state.kind_filter}" if state.kind_filter else ""]
        if any(filters):
            header.append(f"  filter: {' '.join(f for f in filters if f)}", style="cyan")
        parts.append(header)
    parts.append(render_nodes(state, now))
    parts.append(render_rates(state, now))
    parts.append(render_events(state, now))
    if state.rejected_counts:
        parts.append(render_rejected(state, now))
    return Group(*parts)


_STATE_STYLES = {"online": "green", "offline": "bold red"}


def render_nodes(state: WatchState, now: float) -> Table:
    table = Table(title="nodes", title_justify="left", expand=False)
    for column in ("node", "state", "version", "last seen", "lag", "outbox", "seq/ack", "policy",
                   "GPUs"):
        table.add_column(column, no_wrap=True)
    if not state.nodes:
        table.add_row(Text("waiting for messages…", style="dim"), *[""] * 8)
    for name in sorted(state.nodes):
        node = state.nodes[name]
        status = Text(node.state or "?", style=_STATE_STYLES.get(node.state or "", "dim"))
        if node.degraded:
            status.append(" degraded", style="yellow")
        seen = format_ago(None if node.last_seen is None else now - node.last_seen)
        seq = "—" if node.max_event_seq is None else str(node.max_event_seq)
        ack = "—" if node.ack_upto is None else str(node.ack_upto)
        policy = "—" if node.policy_name is None else f"{node.policy_name} v{node.policy_version}"
        gpus = Text(str(node.gpu_count))
        if node.unhealthy:
            gpus.append(f" / {node.unhealthy} unhealthy", style="bold red")
        outbox = "—" if node.outbox_depth is None else str(node.outbox_depth)
        table.add_row(Text(name, style="bold"), status, Text(node.version or "—"), seen,
                      format_lag(node.last_lag_s), outbox, f"{seq}/{ack}", Text(policy), gpus)
    return table


def render_rates(state: WatchState, now: float) -> Text:
    rates = state.rates(now)
    text = Text(f"msg/s ({state.rate_window_s:g}s window): ", style="bold")
    kinds = [k for k in TOPIC_KINDS if k in rates or state.kind_filter is None]
    for i, kind in enumerate(kinds):
        if i:
            text.append("  ")
        text.append(f"{kind} {rates.get(kind, 0.0):.1f}")
    text.append(f"   total {state.total}", style="dim")
    return text


def render_events(state: WatchState, now: float) -> Table:
    table = Table(title=f"latest events (of {state.events.maxlen})", title_justify="left")
    for column in ("ago", "node", "kind", "seq", "summary"):
        table.add_column(column, no_wrap=column != "summary")
    for row in reversed(state.events):
        table.add_row(format_ago(now - row.received_at), Text(row.node), Text(row.kind),
                      "" if row.seq is None else str(row.seq), Text(row.summary))
    return table


def render_rejected(state: WatchState, now: float) -> Table:
    counts = ", ".join(f"{reason} {n}" for reason, n in state.rejected_counts.most_common())
    table = Table(title=f"rejected: {counts}", title_justify="left", title_style="bold red")
    for column in ("ago", "reason", "topic", "detail"):
        table.add_column(column, no_wrap=column != "detail")
    for rej in reversed(state.rejected):
        table.add_row(format_ago(now - rej.received_at), Text(rej.reason, style="red"), Text(rej.topic),
                      Text(rej.detail[:200]))
    return table
