"""The raw history as one row per telemetry message (`sample_messages`) instead of one row per GPU
sample (`samples`): the sample writer process spent about half its time per message on the eight
rows of an 8-GPU message (8 x 11 parameters, 3 b-trees each); one row a message, its samples as a
JSON array of arrays in `figures` (cloud/store/schema.py RAW_FIGURES), cut that time by ~16 %
(docs/benchmarks.md). Unique (node, ts): a message delivered twice is stored once.

Upgrade: the old rows grouped by (node, ts) (the samples of one message share their ts), built in
SQL (SQLite `json_group_array`, PostgreSQL `json_agg`); SQLite writes the floats with 17 significant
digits (its `json_array` keeps 15), which gives back every double of these figures' ranges exactly.
The roll-up's progress (`history_rollup_state.rolled_id`: "rows up to this id are in every tier")
is mapped: the groups whose samples were all rolled up get the first new ids, in the order of their
first old id, and the progress becomes the last of them; every other group follows, in the same
order. A group that straddled the old progress (some of its samples rolled up, some not: a pass
stopped between two chunks inside a message, or GPUs of one ts stored by different batches) is
rolled up again whole on the next pass: the samples of it that were rolled up already count twice
in their buckets (sums and counts), nothing is lost.

Downgrade: the samples back into `samples`, one row each (a sample stored twice inside the JSON is
kept once), the rolled-up rows first, so that the progress becomes the last id they took.

Written by hand; it must stay equal to the tables in cloud/store/schema.py (tests/test_fleet_store.py
compares the migrated schema with `metadata`).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies: a migration must not change when cloud/store/schema.py does.
ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
NODE = sa.String(253)
# the order of a sample's array in `figures` (schema.py RAW_FIGURES), and each figure's SQL type
FIGURES = (("uuid", sa.String), ("ts", sa.Float), ("temperature_c", sa.Float), ("power_w", sa.Float),
           ("power_limit_w", sa.Float), ("utilization_pct", sa.Float), ("memory_used_bytes", sa.BigInteger),
           ("memory_util_pct", sa.Float), ("sm_clock_mhz", sa.Integer), ("memory_clock_mhz", sa.Integer))
STATE_KEY = "samples"  # history_rollup_state's row of the sample history (cloud/store/history.py)


def _rolled_id(conn: sa.Connection) -> int | None:
    found = conn.execute(sa.text("SELECT rolled_id FROM history_rollup_state WHERE name = :k"),
                         {"k": STATE_KEY}).scalar_one_or_none()
    return None if found is None else int(found)


def _set_rolled_id(conn: sa.Connection, rolled: int) -> None:
    conn.execute(sa.text("UPDATE history_rollup_state SET rolled_id = :r WHERE name = :k"),
                 {"r": rolled, "k": STATE_KEY})


def _sqlite_number(column: str, kind: type[sa.types.TypeEngine[object]]) -> str:
    """A figure as JSON text: a float with 17 significant digits, NULL as null."""
    if kind is sa.Float:
        return f"CASE WHEN {column} IS NULL THEN 'null' ELSE printf('%!.17g', {column}) END"
    return f"coalesce(CAST({column} AS TEXT), 'null')"


def upgrade() -> None:
    conn = op.get_bind()
    op.create_table(
        "sample_messages",
        sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("node", NODE, sa.ForeignKey("nodes.name", name="fk_sample_messages_node", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("figures", sa.Text, nullable=False),
    )
    op.create_index("ix_sample_messages_node_ts", "sample_messages", ["node", "ts"], unique=True)
    op.create_index("ix_sample_messages_ts", "sample_messages", ["ts"])

    rolled = _rolled_id(conn) or 0
    if conn.dialect.name == "postgresql":
        sample = "json_build_array({})".format(", ".join(name for name, _kind in FIGURES))
        figures = f"json_agg({sample} ORDER BY uuid)::text"
    else:
        parts = " || ',' || ".join("json_quote(uuid)" if name == "uuid" else _sqlite_number(name, kind)
                                   for name, kind in FIGURES)
        figures = f"json_group_array(json('[' || {parts} || ']'))"
    # the fully rolled-up groups first (ids 1..N), each part in the order of its first old id
    conn.execute(sa.text(
        "INSERT INTO sample_messages (id, node, ts, figures) "
        f"SELECT row_number() OVER (ORDER BY CASE WHEN max(id) <= :rolled THEN 0 ELSE 1 END, min(id)), "
        f"node, ts, {figures} FROM samples GROUP BY node, ts"), {"rolled": rolled})
    if conn.dialect.name == "postgresql":  # the ids were given: the sequence goes on after them
        conn.execute(sa.text("SELECT setval(pg_get_serial_sequence('sample_messages', 'id'), max(id)) "
                             "FROM sample_messages HAVING count(*) > 0"))
    if _rolled_id(conn) is not None:
        done = conn.execute(sa.text("SELECT count(*) FROM (SELECT node, ts FROM samples GROUP BY node, ts "
                                    "HAVING max(id) <= :rolled) AS whole"), {"rolled": rolled}).scalar_one()
        _set_rolled_id(conn, int(done))
    op.drop_index("ix_samples_ts", table_name="samples")
    op.drop_index("ix_samples_node_ts_uuid", table_name="samples")
    op.drop_table("samples")


def downgrade() -> None:
    conn = op.get_bind()
    op.create_table(
        "samples",
        sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("node", NODE, sa.ForeignKey("nodes.name", name="fk_samples_node", ondelete="CASCADE"),
                  nullable=False),
        *[sa.Column(name, kind, nullable=name not in ("uuid", "ts")) for name, kind in FIGURES],
    )
    op.create_index("ix_samples_node_ts_uuid", "samples", ["node", "ts", "uuid"], unique=True)
    op.create_index("ix_samples_ts", "samples", ["ts"])

    names = ", ".join(name for name, _kind in FIGURES)
    if conn.dialect.name == "postgresql":
        sql_types = {sa.String: "text", sa.Float: "double precision", sa.BigInteger: "bigint", sa.Integer: "integer"}
        values = ", ".join(f"(p.value ->> {i})::{sql_types[kind]}" for i, (_name, kind) in enumerate(FIGURES))
        source = "sample_messages AS m, jsonb_array_elements(m.figures::jsonb) WITH ORDINALITY AS p(value, k)"
        insert, conflict = "INSERT INTO", " ON CONFLICT DO NOTHING"
    else:
        values = ", ".join(f"json_extract(p.value, '$[{i}]')" for i in range(len(FIGURES)))
        source = "sample_messages AS m, json_each(m.figures) AS p"
        insert, conflict = "INSERT OR IGNORE INTO", ""
    order = "m.id, p.k" if conn.dialect.name == "postgresql" else "m.id, p.key"
    rolled = _rolled_id(conn)
    for where in ("m.id <= :rolled", "m.id > :rolled"):  # the rolled-up rows first
        conn.execute(sa.text(f"{insert} samples (node, {names}) SELECT m.node, {values} FROM {source} "
                             f"WHERE {where} ORDER BY {order}{conflict}"), {"rolled": rolled or 0})
        if where == "m.id <= :rolled" and rolled is not None:
            _set_rolled_id(conn, int(conn.execute(sa.text("SELECT coalesce(max(id), 0) FROM samples")).scalar_one()))
    op.drop_index("ix_sample_messages_ts", table_name="sample_messages")
    op.drop_index("ix_sample_messages_node_ts", table_name="sample_messages")
    op.drop_table("sample_messages")
