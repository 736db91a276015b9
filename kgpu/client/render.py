"""Output of the client commands: kubectl-like tables sized to the terminal, or JSON / YAML.

Pure functions of rows and a width, so that what an operator sees at 80 columns is decided in one
place: columns keep their natural width while the table fits; otherwise the widest cells are
shortened in the middle (`edge-site-0…-0042` keeps both the prefix and the number that tell nodes
apart) until it fits, never below a floor that keeps a value recognisable."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

GAP = 3  # spaces between two columns, as kubectl
MIN_CELL = 8  # a column is never shortened below this (or its header)
ELLIPSIS = "…"


@dataclass(frozen=True)
class Column:
    header: str
    value: Callable[[dict[str, Any]], Any]
    wide_only: bool = False
    shrink: bool = True  # may be shortened to fit the width
    volatile: bool = False  # changes by itself (an age): not a change worth a line of `-w`
    optional: bool = False  # left out (rightmost first) of a table too wide, before any value is shortened
    floor: int = MIN_CELL  # never shortened below this many characters
    text: bool = False  # free text: shortened at its end (a name or an id loses its middle)


def terminal_width() -> int | None:
    """COLUMNS when set, else the terminal's width; None (no limit) when stdout is not a terminal,
    so that a pipe or a script gets whole values."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    if sys.stdout.isatty():
        try:
            return os.get_terminal_size(sys.stdout.fileno()).columns
        except OSError:
            return 80
    return None


def shorten(text: str, width: int) -> str:
    """Cut the middle out: the start and the end of a name are what tell two apart."""
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    head = width // 2
    tail = width - 1 - head
    return text[:head] + ELLIPSIS + (text[-tail:] if tail else "")


def cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 10 or value == int(value) else f"{value:.1f}"
    return " ".join(str(value).split())  # one line per row, whatever the value holds


def fit(widths: list[int], floors: list[int], limit: int | None) -> list[int]:
    """Shrink columns one character at a time until the row fits `limit`: first those with the
    lowest floor (free text before names), the widest of them first."""
    widths = list(widths)
    if limit is None:
        return widths
    total = sum(widths) + GAP * (len(widths) - 1)
    while total > limit:
        candidates = [i for i, w in enumerate(widths) if w > floors[i]]
        if not candidates:
            break
        widest = min(candidates, key=lambda i: (floors[i], -widths[i]))
        widths[widest] -= 1
        total -= 1
    return widths


def signature(row: dict[str, Any], columns: Sequence[Column]) -> tuple[str, ...]:
    """What a table shows of a row, ages left out: `-w` prints a row again only when this changes."""
    return tuple(cell(c.value(row)) for c in columns if not c.volatile)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[Column], *, wide: bool, width: int | None,
          header: bool = True) -> list[str]:
    """The lines of a table (header first unless `header` is False)."""
    shown = [c for c in columns if wide or not c.wide_only]
    cells = [[cell(c.value(row)) for c in shown] for row in rows]
    natural = [max([len(c.header)] + [len(r[i]) for r in cells]) for i, c in enumerate(shown)]
    for i in reversed(range(len(shown))):  # first leave out what the row can do without
        if width is None or sum(natural) + GAP * (len(natural) - 1) <= width:
            break
        if shown[i].optional:
            del shown[i], natural[i]
            for r in cells:
                del r[i]
    floors = [natural[i] if not c.shrink else min(natural[i], max(c.floor, len(c.header)))
              for i, c in enumerate(shown)]
    widths = fit(natural, floors, width)
    lines = []
    for values in ([[c.header for c in shown]] if header else []) + cells:
        parts = [(v[:widths[i] - 1] + ELLIPSIS if shown[i].text and len(v) > widths[i] else shorten(v, widths[i]))
                 .ljust(widths[i]) for i, v in enumerate(values)]
        lines.append((" " * GAP).join(parts).rstrip())
    return lines


def age(ts: float | None, now: float | None = None) -> str:
    """kubectl's AGE: 45s, 12m, 5h, 3d (from a unix time)."""
    if ts is None:
        return "-"
    seconds = max(0.0, (time.time() if now is None else now) - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def dump(value: Any, output: str) -> str:
    """`-o json` (indented) or `-o yaml` (block style, keys in the API's order)."""
    if output == "json":
        return json.dumps(value, indent=2)
    return yaml.safe_dump(value, sort_keys=False, default_flow_style=False, allow_unicode=True).rstrip("\n")


def dump_line(value: Any, output: str) -> str:
    """One watch update: a JSON object per line, or a YAML document."""
    if output == "json":
        return json.dumps(value)
    return "---\n" + dump(value, "yaml")
