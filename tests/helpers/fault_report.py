"""What the fault tests tried and what was lost: one row per scenario, printed at the end of the
pytest run (tests/conftest.py, `pytest_terminal_summary`) and written to `faults.txt` under the
pytest basetemp.

A row counts events: `written` is what the edge committed to its outbox (its own record, read
from its SQLite file), `received` what the cloud holds for the node, `lost` the committed events
the cloud does not hold (or holds under another id), `duplicated` what it holds more than once or
never committed. Scenarios that are not about events (a migration, a rollout) count their own
units and say which in the note.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COLUMNS = ("scenario", "tries", "written", "received", "lost", "duplicated", "note")


@dataclass(frozen=True)
class Tally:
    """Edge record against cloud record for one node."""

    written: int
    received: int
    lost: int
    duplicated: int


@dataclass(frozen=True)
class Row:
    scenario: str
    tries: int
    written: int
    received: int
    lost: int
    duplicated: int
    note: str = ""


ROWS: list[Row] = []


def record(scenario: str, tries: int, tally: Tally, note: str = "") -> Row:
    """Add one row to the summary (call it before asserting, so a failure is in the table too)."""
    row = Row(scenario, tries, tally.written, tally.received, tally.lost, tally.duplicated, note)
    ROWS.append(row)
    return row


def edge_record(db: Path) -> dict[int, str]:
    """seq -> message id of every event the edge committed: its decision log plus its events log,
    both written in the same transaction as the outbox row. A seq missing from 1..last_seq is
    returned as id "" (the edge itself lost it), so it counts as lost."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        last = int(conn.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()[0])
        rows = conn.execute("SELECT seq, id FROM decisions UNION ALL SELECT seq, id FROM events_log").fetchall()
    record = {seq: "" for seq in range(1, last + 1)}
    record.update({int(seq): str(msg_id) for seq, msg_id in rows})
    return record


def cloud_record(events: Iterable[Mapping[str, Any]]) -> list[tuple[int, str]]:
    """(seq, message id) of each event row the cloud API returned for one node."""
    return [(int(e["seq"]), str(e["msg_id"])) for e in events]


def compare(written: Mapping[int, str], received: list[tuple[int, str]]) -> Tally:
    """Lost: committed (seq, id) pairs the cloud lacks. Duplicated: cloud rows beyond one per
    committed pair, and rows for pairs the edge never committed."""
    held = Counter(received)
    committed = {(seq, msg_id) for seq, msg_id in written.items()}
    lost = sum(1 for pair in committed if not pair[1] or held[pair] == 0)
    duplicated = sum(count - 1 if pair in committed else count for pair, count in held.items())
    return Tally(written=len(written), received=len(received), lost=lost, duplicated=duplicated)


def render(rows: list[Row] | None = None) -> str:
    """The rows as an aligned text table, with a total line."""
    rows = list(ROWS if rows is None else rows)
    cells = [list(COLUMNS)] + [[r.scenario, str(r.tries), str(r.written), str(r.received), str(r.lost),
                                str(r.duplicated), r.note] for r in rows]
    # written/received are not summed: scenarios count different units (events, pods, nodes)
    cells.append(["total", str(sum(r.tries for r in rows)), "", "", str(sum(r.lost for r in rows)),
                  str(sum(r.duplicated for r in rows)), ""])
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    numeric = {1, 2, 3, 4, 5}

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if i in numeric else v.ljust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(c) for c in cells[1:-1]), rule, line(cells[-1])])


def write(directory: Path) -> Path:
    """Write the table to `directory/faults.txt`; answer the path."""
    path = directory / "faults.txt"
    path.write_text(render() + "\n")
    return path
