"""`kgpu watch`'s display: a `WatchState` turned into rich renderables, one whole screen per
refresh. Apart from the state (kgpu/watch_state.py) and the loop (kgpu/watch.py): nothing here
changes what the watcher knows, so a refresh can be drawn from any state at any time.

The screen is laid out for the width it is drawn at (an 80-column terminal as well as a wide
one): node names lose the prefix and suffix they all share (shown once, above the table), the
least needed columns go first, and a name is shortened from the middle only as a last resort,
never into two names that read the same. `--node NAME` shows that node's GPUs one per row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.table import Table
from rich.text import Text

from kgpu.watch_state import (
    TOPIC_KINDS,
    GpuView,
    NameDisplay,
    NodeView,
    WatchState,
    shorten_names,
    throttle_names,
)
from shared.gpu import Health

ALWAYS = 100  # a column priority that is never dropped
MIN_NAME_CELLS = 10  # below this a shortened name stops telling nodes apart
COLUMN_GAP = 2  # cells between two columns (right padding + the box's blank divider)
FOLD_CELLS = 16  # what a column that may wrap needs at least


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


def render(state: WatchState, now: float, link: LinkView | None = None, *, focus: str | None = None,
           keys: bool = False) -> RenderableType:
    """The whole display for one refresh; `now` is wall-clock unix seconds. It is laid out when
    drawn, for the width of the console it is drawn on. `focus` shows that node's GPUs (as
    `--node` does, without filtering what is watched); `keys` says the keys that move it."""
    return Screen(state, now, link, focus=focus, keys=keys)


KEY_NEXT = ("n", "j", "\t", "\x1b[B", "\x1b[C")  # n, j, Tab, arrow down, arrow right
KEY_PREVIOUS = ("p", "k", "\x1b[Z", "\x1b[A", "\x1b[D")  # p, k, shift-Tab, arrow up, arrow left
KEY_ALL = ("a", "\x1b")  # a, Esc
_KEY_SEQUENCES = sorted(KEY_NEXT + KEY_PREVIOUS + KEY_ALL, key=len, reverse=True)


def key_presses(typed: str) -> list[str]:
    """The keys in what the terminal sent (arrow keys are three characters, Esc one)."""
    keys: list[str] = []
    while typed:
        key = next((k for k in _KEY_SEQUENCES if typed.startswith(k)), typed[0])
        keys.append(key)
        typed = typed[len(key):]
    return keys


def move_focus(nodes: list[str], focus: str | None, key: str) -> str | None:
    """The node shown after `key`: n/p step through the nodes (by name), a or Esc go back to all."""
    if key in KEY_ALL or not nodes:
        return None if key in KEY_ALL else focus
    ordered = sorted(nodes)
    if key in KEY_NEXT:
        return ordered[0] if focus not in ordered else ordered[(ordered.index(focus) + 1) % len(ordered)]
    if key in KEY_PREVIOUS:
        return ordered[-1] if focus not in ordered else ordered[ordered.index(focus) - 1]
    return focus


class Screen:
    """A renderable that lays the screen out for the width rich gives it."""

    def __init__(self, state: WatchState, now: float, link: LinkView | None, *, focus: str | None = None,
                 keys: bool = False) -> None:
        self.state, self.now, self.link = state, now, link
        self.focus, self.keys = focus, keys

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        # On a terminal the screen is as tall as the window (rich's Live cuts what is below): a
        # long node list then gives way to the events. Printed to a file, every node is listed.
        height = (options.height or console.height) if console.is_terminal else None
        yield Group(*layout(self.state, self.now, self.link, max(20, options.max_width), height,
                            focus=self.focus, keys=self.keys))


# Lines kept for everything but the node rows (header, titles, rates, a few events) when the
# screen has a height.
RESERVED_LINES = 14


def layout(state: WatchState, now: float, link: LinkView | None, width: int, height: int | None = None, *,
           focus: str | None = None, keys: bool = False) -> list[RenderableType]:
    """Everything on one screen, for `width` columns (and `height` lines, when it has one)."""
    parts: list[RenderableType] = []
    if link is not None:
        parts.append(render_header(state, link, width))
    names = NameDisplay("", "", {})
    focus = state.node_filter or focus
    if focus is not None:
        if keys:
            ordered = sorted(state.nodes)
            where = f"node {ordered.index(focus) + 1} of {len(ordered)}" if focus in ordered else "node"
            parts.append(Text(f"{where} · n/p: next/previous node · a: all nodes", style="dim"))
        parts.extend(render_node_detail(state, now, focus, width))
    else:
        max_rows = None if height is None else max(3, height - RESERVED_LINES)
        table, names = render_nodes(state, now, width, max_rows, keys=keys)
        parts.append(table)
    parts.append(render_rates(state, now))
    parts.append(render_events(state, now, names, only=focus))
    if state.rejected_counts:
        parts.append(render_rejected(state, now))
    return parts


def packed(pieces: list[Text], width: int, gap: int = 2) -> Text:
    """Pieces side by side, a new line where the next one would not fit: a line breaks between
    two facts, never inside one."""
    out = Text()
    used = 0
    for piece in pieces:
        if used and used + gap + piece.cell_len > width:
            out.append("\n")
            used = 0
        elif used:
            out.append(" " * gap)
            used += gap
        out.append_text(piece)
        used += piece.cell_len
    return out


def render_header(state: WatchState, link: LinkView, width: int = 200) -> Text:
    pieces = [Text("kgpu watch", style="bold"), Text(link.broker)]
    if link.connected:
        pieces.append(Text("● connected", style="green"))
    else:
        down = Text("✗ not connected", style="bold red")
        if link.error:
            down.append(f": {link.error}", style="red")
        down.append(" — retrying")
        pieces.append(down)
    filters = [f"node={state.node_filter}" if state.node_filter else "",
               f"kind={state.kind_filter}" if state.kind_filter else ""]
    if any(filters):
        pieces.append(Text(f"filter: {' '.join(f for f in filters if f)}", style="cyan"))
    return packed(pieces, width)


# ---- fitting columns to the width -------------------------------------------------------------


@dataclass
class Column:
    """One column before layout: its cells, and how much it matters when the width is short."""

    header: str
    cells: list[Text]
    priority: int  # the lowest goes first; ALWAYS is never dropped
    justify: str = "left"
    fold: bool = False  # may wrap onto more lines: it needs only FOLD_CELLS to fit

    @property
    def cells_wide(self) -> int:
        return max([cell_len(self.header), *(c.cell_len for c in self.cells)])

    @property
    def cells_needed(self) -> int:
        return min(self.cells_wide, FOLD_CELLS) if self.fold else self.cells_wide


def cells_wide(columns: list[Column]) -> int:
    """How wide a table of these columns is drawn (no side borders)."""
    return sum(c.cells_needed for c in columns) + COLUMN_GAP * (len(columns) - 1)


def fit_columns(columns: list[Column], width: int) -> list[Column]:
    """The columns that fit in `width`, dropping the least needed first (order is kept)."""
    kept = list(columns)
    while cells_wide(kept) > width:
        optional = [c for c in kept if c.priority < ALWAYS]
        if not optional:
            break
        kept.remove(min(optional, key=lambda c: c.priority))
    return kept


def columns_table(columns: list[Column], *, title: str | Text, fold: str | None = None) -> Table:
    """A compact table (no side borders) of the given columns; `fold` names the one column that
    may wrap when nothing else helps (the others never wrap, except those marked `fold`)."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  padding=(0, 1, 0, 0), header_style="bold")
    for column in columns:
        if column.fold:
            table.add_column(column.header, justify=column.justify,  # type: ignore[arg-type]
                             min_width=column.cells_needed)
            continue
        folding = column.header == fold
        table.add_column(column.header, justify=column.justify,  # type: ignore[arg-type]
                         no_wrap=not folding, overflow="fold" if folding else "ellipsis",
                         min_width=min(column.cells_wide, MIN_NAME_CELLS) if folding else None)
    for row in zip(*(c.cells for c in columns), strict=True):
        table.add_row(*row)
    return table


# ---- the fleet: one row per node --------------------------------------------------------------


_STATE_STYLES = {"online": "green", "offline": "bold red"}


def _state_cell(node: NodeView) -> Text:
    status = Text(node.state or "?", style=_STATE_STYLES.get(node.state or "", "dim"))
    if node.degraded:
        status.append(" degraded", style="yellow")
    return status


def _power_cell(node: NodeView) -> Text:
    power = node.power_w
    if power is None:
        return Text("—")
    draw, limit = power
    return Text(f"{draw:.0f}" + (f"/{limit:.0f}" if limit is not None else "") + " W")


def _node_columns(now: float, rows: list[NodeView], names: NameDisplay) -> list[Column]:
    def col(header: str, priority: int, cell: Callable[[NodeView], Text], justify: str = "left") -> Column:
        return Column(header, [cell(n) for n in rows], priority, justify)

    def gpus(node: NodeView) -> Text:
        text = Text(str(node.gpu_count))
        if node.unhealthy:
            text.append(f" ({node.unhealthy} unhealthy)", style="bold red")
        return text

    def temperature(node: NodeView) -> Text:
        temp = node.max_temperature_c
        return Text("—" if temp is None else f"{temp:.0f}")

    def seen(node: NodeView) -> Text:
        return Text(format_ago(None if node.last_seen is None else now - node.last_seen))

    def seq_ack(node: NodeView) -> Text:
        seq = "—" if node.max_event_seq is None else str(node.max_event_seq)
        return Text(f"{seq}/{'—' if node.ack_upto is None else node.ack_upto}")

    def policy(node: NodeView) -> Text:
        return Text("—" if node.policy_name is None else f"{node.policy_name} v{node.policy_version}")

    def outbox(node: NodeView) -> Text:
        return Text("—" if node.outbox_depth is None else str(node.outbox_depth))

    return [
        col("node", ALWAYS, lambda n: Text(names.short[n.name], style="bold")),
        col("state", ALWAYS, _state_cell),
        col("GPUs", ALWAYS, gpus),
        col("max °C", 8, temperature, "right"),
        col("power", 5, _power_cell, "right"),
        col("last seen", 7, seen, "right"),
        col("lag", 6, lambda n: format_lag(n.last_lag_s)),
        col("policy", 4, policy),
        col("seq/ack", 3, seq_ack),
        col("outbox", 2, outbox, "right"),
        col("version", 1, lambda n: Text(n.version or "—")),
    ]


def needs_attention(node: NodeView) -> int:
    """0 for a node to show first (offline, unhealthy GPUs, degraded), 1 for the others."""
    return 0 if node.state != "online" or node.unhealthy or node.degraded else 1


def render_nodes(state: WatchState, now: float, width: int, max_rows: int | None = None, *,
                 keys: bool = False) -> tuple[Table, NameDisplay]:
    """The fleet table for `width` columns, and the names it used (the event list uses the same).
    Past `max_rows` nodes, the ones needing attention are kept and the rest counted."""
    every_row = [state.nodes[name] for name in sorted(state.nodes)]
    rows, hidden = every_row, 0
    if max_rows is not None and len(every_row) > max_rows:
        kept = sorted(every_row, key=lambda n: (needs_attention(n), n.name))[: max_rows - 1]
        rows, hidden = sorted(kept, key=lambda n: n.name), len(every_row) - len(kept)
    # What gives way when the width is short, in this order: the prefix and suffix every name
    # shares (shown once, in the title), then the least needed columns, then the names' middles.
    names = NameDisplay("", "", {n.name: n.name for n in every_row})
    every_column = _node_columns(now, rows, names)
    if cells_wide(every_column) > width:
        names = shorten_names([n.name for n in every_row], max_cells=None)
        every_column = _node_columns(now, rows, names)
    columns = fit_columns(every_column, width)
    others = sum(c.cells_wide for c in columns if c.header != "node") + COLUMN_GAP * (len(columns) - 1)
    if rows and others + columns[0].cells_wide > width:  # the names alone are too long: shorten them
        names = shorten_names([n.name for n in every_row], max_cells=max(MIN_NAME_CELLS, width - others))
        columns[0] = _node_columns(now, rows, names)[0]
    title = [Text(f"nodes ({len(every_row)})" if every_row else "nodes", style="bold")]
    if names.pattern:
        title[0].append(f" named {names.pattern}")
    if keys and rows:
        title.append(Text("(n/p: each node's GPUs)", style="dim"))
    elif len(columns) < len(every_column):
        title.append(Text("(--node NAME: one node's GPUs)", style="dim"))
    table = columns_table(columns, title=packed(title, width), fold="node")
    if not rows:
        table.add_row(Text("waiting for messages…", style="dim"), *[""] * (len(columns) - 1))
    if hidden:
        shown = {n.name for n in rows}
        unwell = sum(1 for n in every_row if n.name not in shown and needs_attention(n) == 0)
        table.caption = (f"… {hidden} more, " + (f"{unwell} of them offline or unhealthy" if unwell
                         else "all online and healthy") + "; a taller window shows them")
        table.caption_justify = "left"
    return table, names


# ---- one node: one row per GPU ----------------------------------------------------------------


_HEALTH_STYLES = {Health.HEALTHY: "green", Health.UNHEALTHY: "bold red", Health.LOST: "bold red"}


def _num(value: float | None, fmt: str = "{:.0f}") -> Text:
    return Text("—" if value is None else fmt.format(value))


def _gpu_columns(node: NodeView) -> list[Column]:
    rows = [node.gpus.get(i) or GpuView(i) for i in sorted(set(node.gpus) | set(node.gpu_health))]

    def col(header: str, priority: int, cell: Callable[[GpuView], Text], justify: str = "left") -> Column:
        return Column(header, [cell(g) for g in rows], priority, justify)

    def health(gpu: GpuView) -> Text:
        value = node.gpu_health.get(gpu.index)
        return Text("?" if value is None else value.value, style=_HEALTH_STYLES.get(value, "dim")
                    if value is not None else "dim")

    def temperature(gpu: GpuView) -> Text:
        return _num(gpu.sample.temperature_c if gpu.sample else None)

    def power(gpu: GpuView) -> Text:
        return _num(gpu.sample.power_w if gpu.sample else None)

    def limit(gpu: GpuView) -> Text:
        return _num(gpu.power_limit_w)

    def util(gpu: GpuView) -> Text:
        return _num(gpu.sample.utilization_pct if gpu.sample else None)

    def memory(gpu: GpuView) -> Text:
        sample = gpu.sample
        if sample is None or sample.memory_used_bytes is None:
            return Text("—")
        used = sample.memory_used_bytes / 2**30
        if sample.memory_free_bytes is None:
            return Text(f"{used:.1f}")
        return Text(f"{used:.1f}/{(sample.memory_used_bytes + sample.memory_free_bytes) / 2**30:.0f}")

    def notes(gpu: GpuView) -> Text:
        text = Text()
        bits: list[tuple[str, str]] = []
        reasons = throttle_names(gpu.sample.throttle_reasons if gpu.sample else None)
        if reasons:
            bits.append((f"throttled: {', '.join(reasons)}", "yellow"))
        if gpu.draining:
            bits.append(("draining", "cyan"))
        if gpu.remediation:
            bits.append((gpu.remediation, "magenta"))
        if gpu.pods:
            bits.append((f"{gpu.pods} pod{'s' if gpu.pods != 1 else ''}", ""))
        for i, (bit, style) in enumerate(bits):
            text.append(("; " if i else "") + bit, style=style)
        return text if bits else Text("—", style="dim")

    return [
        col("GPU", ALWAYS, lambda g: Text(str(g.index)), "right"),
        col("health", ALWAYS, health),
        col("°C", ALWAYS, temperature, "right"),
        col("power W", ALWAYS, power, "right"),
        col("limit W", ALWAYS, limit, "right"),
        col("util %", 5, util, "right"),
        col("mem GiB", 4, memory, "right"),
        Column("notes", [notes(g) for g in rows], ALWAYS, fold=True),
        col("model", 2, lambda g: Text(g.model or "—")),
        col("vendor", 1, lambda g: Text(g.vendor or "—")),
        col("uuid", 1, lambda g: Text(g.uuid or "—", style="dim")),
    ]


def render_node_detail(state: WatchState, now: float, name: str, width: int) -> Iterator[RenderableType]:
    """`--node NAME`: the node's own line (everything the fleet table has) and its GPUs."""
    node = state.nodes.get(name)
    if node is None:
        yield Text(f"waiting for messages about {name}…", style="dim")
        return
    facts = [Text(name, style="bold"), _state_cell(node)] + [Text(fact) for fact in (
        f"version {node.version or '—'}",
        f"seen {format_ago(None if node.last_seen is None else now - node.last_seen)} ago",
        f"policy {'—' if node.policy_name is None else f'{node.policy_name} v{node.policy_version}'}",
        f"outbox {'—' if node.outbox_depth is None else node.outbox_depth}",
        f"seq/ack {'—' if node.max_event_seq is None else node.max_event_seq}/"
        f"{'—' if node.ack_upto is None else node.ack_upto}",
    )]
    facts.append(Text("lag ").append_text(format_lag(node.last_lag_s)))
    if node.degraded:
        facts.append(Text(f"degraded: {', '.join(node.degraded)}", style="yellow"))
    line = packed(facts, width)
    yield line
    columns = fit_columns(_gpu_columns(node), width)
    title = f"GPUs ({node.gpu_count})"
    power = node.power_w
    if power is not None:
        title += f" — {_power_cell(node).plain} in all"
    table = columns_table(columns, title=title)
    if not columns[0].cells:
        table.add_row(Text("no GPU reported yet", style="dim"), *[""] * (len(columns) - 1))
    yield table


# ---- traffic ----------------------------------------------------------------------------------


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


def _short(names: NameDisplay, node: str) -> str:
    return names.short.get(node, node)


def render_events(state: WatchState, now: float, names: NameDisplay | None = None, *,
                  only: str | None = None) -> Table:
    names = names or NameDisplay("", "", {})
    table = Table(title=f"latest events (of {state.events.maxlen})", title_justify="left",
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0),
                  header_style="bold")
    one_node = only is not None  # every event shown is that node's: no column for it
    for column in ("ago", "node", "kind", "seq", "summary"):
        if column == "node" and one_node:
            continue
        table.add_column(column, no_wrap=column not in ("summary", "node"),
                         overflow="fold" if column == "node" else "ellipsis",
                         justify="right" if column in ("ago", "seq") else "left")
    for row in reversed(state.events):
        if only is not None and row.node != only:
            continue
        cells: list[RenderableType] = [format_ago(now - row.received_at), Text(_short(names, row.node)), Text(row.kind),
                 "" if row.seq is None else str(row.seq), Text(row.summary)]
        table.add_row(*(cells[:1] + cells[2:] if one_node else cells))
    return table


def render_rejected(state: WatchState, now: float) -> Table:
    counts = ", ".join(f"{reason} {n}" for reason, n in state.rejected_counts.most_common())
    table = Table(title=f"rejected: {counts}", title_justify="left", title_style="bold red",
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0),
                  header_style="bold")
    for column in ("ago", "reason", "topic", "detail"):
        # the topic is the evidence: it folds onto a second line rather than lose its node
        table.add_column(column, no_wrap=column in ("ago", "reason"),
                         overflow="fold" if column == "topic" else "ellipsis")
    for rej in reversed(state.rejected):
        table.add_row(format_ago(now - rej.received_at), Text(rej.reason, style="red"), Text(rej.topic),
                      Text(rej.detail[:200]))
    return table
