"""Every table of the fleet store, on one metadata.

The ingest core's tables (nodes, gpus, sample_messages, events, decisions) and each cloud part's own
(policies, rollouts, migrations, edge commands) are declared here, in one module, so that the
schema is complete wherever `metadata` is imported (Alembic's env, the tests that compare it with
the migrations) instead of depending on which parts happen to be imported. A part reads and
writes its own tables through the store's transactions (`FleetStore.reading`/`writing`); the
core tables are the store's: parts go through its methods.

Kept identical to the Alembic revisions in `alembic/versions` (a test compares the two).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

JsonType = sa.JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments an `INTEGER PRIMARY KEY`, PostgreSQL wants BIGINT for big tables.
RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

metadata = sa.MetaData()

# The figures of a sample that the history's coarser tiers keep the mean of.
ROLLED_UP_FIGURES = ("temperature_c", "power_w", "power_limit_w", "utilization_pct", "memory_used_bytes",
                     "memory_util_pct", "sm_clock_mhz", "memory_clock_mhz")

nodes_table = sa.Table(
    "nodes",
    metadata,
    sa.Column("name", sa.String(253), primary_key=True),
    sa.Column("online", sa.Boolean, nullable=False),
    sa.Column("first_seen", sa.Float, nullable=False),  # cloud clock
    sa.Column("last_seen", sa.Float, nullable=False),  # cloud clock: liveness is judged here
    sa.Column("daemon_version", sa.String),
    sa.Column("policy_name", sa.String),
    sa.Column("policy_version", sa.Integer),
    sa.Column("outbox_depth", sa.Integer),
    sa.Column("outbox_epoch", sa.String(64)),  # NULL until a status names it
    sa.Column("acked_seq", sa.BigInteger, nullable=False),
    sa.Column("gaps", sa.BigInteger, nullable=False),
    sa.Column("degraded", JsonType, nullable=False),
    sa.Column("labels", JsonType, nullable=False),
    sa.Column("status_ts", sa.Float),  # edge ts of the newest status applied, less the clock skew
    # where the newest status took its GPUs' `pods` from ("pod-resources" | "processes"); NULL: unknown
    sa.Column("pod_map_source", sa.String(16)),
)

gpus_table = sa.Table(
    "gpus",
    metadata,
    sa.Column(
        "node",
        sa.String(253),
        sa.ForeignKey("nodes.name", name="fk_gpus_node", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("uuid", sa.String, primary_key=True),
    sa.Column("index", sa.Integer, nullable=False),
    sa.Column("name", sa.String),  # NULL when only telemetry has been seen
    sa.Column("health", sa.String),
    sa.Column("power_limit_w", sa.Float),
    sa.Column("sample", JsonType),  # the latest GpuSample
    sa.Column("sample_ts", sa.Float),  # its ts less the clock skew, so a late sample cannot win
    sa.Column("updated_at", sa.Float, nullable=False),  # cloud clock
    sa.Column("pci_bus_id", sa.String(32)),  # from the status (fleet exporter's labels); NULL: not told
    sa.Column("driver_version", sa.String(64)),
    sa.Column("pods", JsonType),  # from the status: "namespace/name" of the pods using this GPU; NULL: not told
    sa.Column("remediation", sa.String(200)),  # from the status: the edge's remediation stage; NULL: in service
    # the device layer (issue 16, alembic 0011), from the status; NULL: an older edge (NVIDIA on NVML)
    sa.Column("vendor", sa.String(16)),  # nvidia | amd | intel
    sa.Column("backend", sa.String(16)),  # nvml | jetson | amd | intel
    sa.Column("platform", sa.String(64)),  # jetson-orin, instinct, flex, ...
    sa.Column("resource_name", sa.String(253)),  # the device plugin's extended resource (amd.com/gpu, ...)
    sa.Column("capabilities", JsonType),  # what the device can do (edge/devices/base.py Capability values)
)

# The raw tier of the sample history (cloud/store/history.py): ONE ROW PER TELEMETRY MESSAGE, its
# GPUs' samples in `figures`, a JSON array of one array per sample holding RAW_FIGURES in that order.
# One row per sample (alembic 0012 and before) cost 8 rows of 11 parameters and 3 b-trees each
# per 8-GPU message: 42 of the sample writer's 86 µs a message; one row a message, 72 µs in all
# (docs/benchmarks.md). `ts` is the earliest of the row's samples (controller clock); a row holds
# samples at most RAW_ROW_SPAN_S after it (a message spread wider is split), so that a read of the
# samples from `since` on reads the rows from `since - RAW_ROW_SPAN_S` on.
RAW_FIGURES = ("uuid", "ts", *ROLLED_UP_FIGURES)
RAW_ROW_SPAN_S = 60.0

sample_messages_table = sa.Table(
    "sample_messages",
    metadata,
    sa.Column("id", RowId, primary_key=True, autoincrement=True),  # the roll-up reads by id
    sa.Column(
        "node",
        sa.String(253),
        sa.ForeignKey("nodes.name", name="fk_sample_messages_node", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("figures", sa.Text, nullable=False),
    # unique: a telemetry message delivered twice is stored once (ON CONFLICT DO NOTHING)
    sa.Index("ix_sample_messages_node_ts", "node", "ts", unique=True),
    sa.Index("ix_sample_messages_ts", "ts"),  # retention
)

# One sample of the raw history as the readers return it (and the API describes it: cloud/openapi.yaml
# `Sample`): NOT a table of the database (its own metadata), the shape of a point and the types of
# RAW_FIGURES, under the name the API has always given it.
_WHOLE_NUMBER_FIGURES = {"memory_used_bytes": sa.BigInteger, "sm_clock_mhz": sa.Integer, "memory_clock_mhz": sa.Integer}
sample_point_table = sa.Table(
    "samples",
    sa.MetaData(),
    sa.Column("node", sa.String(253), nullable=False),
    sa.Column("uuid", sa.String, nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    *[sa.Column(name, _WHOLE_NUMBER_FIGURES.get(name, sa.Float)) for name in ROLLED_UP_FIGURES],
)

# The coarser tiers of the sample history (cloud/store/history.py): per GPU and bucket of
# `resolution_s` seconds starting at `bucket_ts`, the SUM and the COUNT of each figure (NULLs left
# out), so that a roll-up pass adds a late sample to its bucket instead of recomputing it; the
# API divides. WITHOUT ROWID on SQLite: the key is the row's only copy (a third less disk).
sample_rollups_table = sa.Table(
    "sample_rollups",
    metadata,
    sa.Column(
        "node",
        sa.String(253),
        sa.ForeignKey("nodes.name", name="fk_sample_rollups_node", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("resolution_s", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("uuid", sa.String, primary_key=True),
    sa.Column("bucket_ts", sa.Float, primary_key=True, autoincrement=False),
    sa.Column("n", sa.Integer, nullable=False),  # samples in the bucket
    *[sa.Column(f"{name}_sum", sa.Float) for name in ROLLED_UP_FIGURES],
    *[sa.Column(f"{name}_n", sa.Integer) for name in ROLLED_UP_FIGURES],
    sa.Index("ix_sample_rollups_resolution_bucket", "resolution_s", "bucket_ts"),
    sqlite_with_rowid=False,
)

# How far the roll-up has read `sample_messages` (by id: a late sample is added to its old bucket).
history_rollup_state_table = sa.Table(
    "history_rollup_state",
    metadata,
    sa.Column("name", sa.String(32), primary_key=True),
    sa.Column("rolled_id", sa.BigInteger, nullable=False),  # sample_messages.id <= this are in every tier
    sa.Column("updated_at", sa.Float, nullable=False),
)

events_table = sa.Table(
    "events",
    metadata,
    sa.Column("id", RowId, primary_key=True, autoincrement=True),
    sa.Column(
        "node",
        sa.String(253),
        sa.ForeignKey("nodes.name", name="fk_events_node", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("epoch", sa.String(64), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("msg_id", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("ts", sa.Float, nullable=False),  # edge clock
    sa.Column("received_at", sa.Float, nullable=False),  # cloud clock
    sa.Column("body", JsonType, nullable=False),
    sa.UniqueConstraint("node", "epoch", "seq", name="uq_events_node_epoch_seq"),
    sa.Index("ix_events_node_ts", "node", "ts"),
    sa.Index("ix_events_kind_ts", "kind", "ts"),
    sa.Index("ix_events_ts", "ts"),
)

decisions_table = sa.Table(
    "decisions",
    metadata,
    sa.Column("id", RowId, primary_key=True, autoincrement=True),
    sa.Column(
        "node",
        sa.String(253),
        sa.ForeignKey("nodes.name", name="fk_decisions_node", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("epoch", sa.String(64), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("gpu_uuid", sa.String),
    sa.Column("rule", sa.String, nullable=False),
    sa.Column("action", sa.String, nullable=False),
    sa.Column("value", sa.Float),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("policy_version", sa.Integer),
    sa.UniqueConstraint("node", "epoch", "seq", name="uq_decisions_node_epoch_seq"),
    sa.Index("ix_decisions_node_ts", "node", "ts"),
    sa.Index("ix_decisions_ts", "ts"),
)


# ---- policies ------------------------------------------------------------------------------

policies_table = sa.Table(
    "policies",
    metadata,
    sa.Column("name", sa.String(253), primary_key=True),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("spec", JsonType, nullable=False),
    sa.Column("generation", sa.BigInteger, nullable=False),
    sa.Column("status", JsonType, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

policy_nodes_table = sa.Table(
    "policy_nodes",
    metadata,
    sa.Column("node", sa.String(253), primary_key=True),
    sa.Column("labels", JsonType, nullable=False),
    sa.Column("present", sa.Boolean, nullable=False),
    sa.Column("policy_name", sa.String(253)),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("content_hash", sa.String(64)),
    sa.Column("policy", JsonType),
    sa.Column("published_version", sa.Integer),
    sa.Column("published_at", sa.Float),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Index("ix_policy_nodes_policy_name", "policy_name"),
)


# ---- rollouts ------------------------------------------------------------------------------

rollouts_table = sa.Table(
    "rollouts",
    metadata,
    sa.Column("id", RowId, primary_key=True, autoincrement=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("active", sa.Integer),  # 1 while running or rolling back, else NULL: the UNIQUE allows one
    sa.Column("target_version", sa.String(128), nullable=False),
    sa.Column("image", sa.String(512)),
    sa.Column("container", sa.String(253)),
    sa.Column("template_patch", JsonType),
    sa.Column("request", JsonType, nullable=False),  # as accepted, defaults filled in (camelCase)
    sa.Column("max_unavailable", sa.Integer, nullable=False),  # resolved against the node count
    sa.Column("failure_threshold", sa.Integer, nullable=False),
    sa.Column("health_timeout", sa.Float, nullable=False),
    sa.Column("wave", sa.Integer, nullable=False),  # highest wave opened (0: canaries)
    sa.Column("wave_count", sa.Integer, nullable=False),
    sa.Column("previous_template", JsonType, nullable=False),  # the pod template before: rollback target
    sa.Column("new_template", JsonType, nullable=False),
    sa.Column("template_applied", sa.String(16)),  # "new" | "previous": the template last written
    sa.Column("rollback_requested", sa.Boolean, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    sa.UniqueConstraint("active", name="uq_rollouts_active"),
)

rollout_nodes_table = sa.Table(
    "rollout_nodes",
    metadata,
    sa.Column(
        "rollout_id",
        RowId,
        sa.ForeignKey("rollouts.id", name="fk_rollout_nodes_rollout", ondelete="CASCADE"),
        primary_key=True,
        autoincrement=False,
    ),
    sa.Column("node", sa.String(253), primary_key=True),  # no FK: a node may never have reported
    sa.Column("wave", sa.Integer, nullable=False),
    sa.Column("canary", sa.Boolean, nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("since", sa.Float, nullable=False),  # cloud clock
    sa.Column("marked_pod", sa.String(253)),  # uid of the pod to delete, then of the pod deleted
    sa.Column("deleted", sa.Boolean, nullable=False),  # pod deleted in the current direction
    sa.Column("reverting", sa.Boolean, nullable=False),  # rollback: goes back to the previous template
    sa.Column("from_version", sa.String(128)),  # what it reported before its restart
    sa.Column("reason", sa.Text),  # why it is in its state
    sa.Index("ix_rollout_nodes_rollout_state", "rollout_id", "state"),
)


# ---- workload migrations -------------------------------------------------------------------

migrations_table = sa.Table(
    "migrations",
    metadata,
    sa.Column("id", RowId, primary_key=True, autoincrement=True),
    sa.Column("node", sa.String(253), nullable=False),
    sa.Column("gpu_uuid", sa.String),  # the GPU of the first trigger; NULL for a node trigger
    sa.Column("subjects", JsonType, nullable=False),  # every GPU uuid covered, or "node-offline"
    sa.Column("trigger", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),  # cloud clock
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),  # when it went in-progress: the node's cool-down runs from it
    sa.Column("next_attempt_at", sa.Float),  # deferred: end of the cool-down; in-progress: next retry
    sa.Column("pods", JsonType, nullable=False),  # "ns/name" -> what was done to that pod
    sa.Column("steps", JsonType, nullable=False),  # [{step, outcome, detail, at, ...}]
    sa.Index("ix_migrations_node_created", "node", "created_at"),
    sa.Index("ix_migrations_state", "state"),
)

migration_triggers_table = sa.Table(
    "migration_triggers",
    metadata,
    sa.Column("event_id", sa.BigInteger, primary_key=True, autoincrement=False),  # events.id
    sa.Column(
        "migration_id",
        RowId,
        sa.ForeignKey("migrations.id", name="fk_migration_triggers_migration", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("at", sa.Float, nullable=False),
)


# ---- edge commands -------------------------------------------------------------------------

edge_commands_table = sa.Table(
    "edge_commands",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # the envelope id: the edge applies it once
    sa.Column("node", sa.String(253), nullable=False),
    sa.Column("command", sa.String(32), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),  # the envelope, exactly as published each time
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("sent_at", sa.Float),  # last publish the broker took; NULL: not yet
    sa.Column("sends", sa.Integer, nullable=False),
    sa.Column("result_at", sa.Float),  # when the edge's command_result was stored
    sa.Column("ok", sa.Boolean),
    sa.Column("detail", sa.Text),
    sa.Index("ix_edge_commands_result_at_created_at", "result_at", "created_at"),
)


# ---- node reboots (cloud/reboots/: the circuit breaker over the edges' reboot requests) ----

reboots_table = sa.Table(
    "reboots",
    metadata,
    sa.Column("event_id", sa.BigInteger, primary_key=True, autoincrement=False),  # events.id of the request
    sa.Column("node", sa.String(253), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),  # the request's seq in the edge's outbox
    sa.Column("gpu_index", sa.Integer),
    sa.Column("gpu_uuid", sa.String),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("requested_at", sa.Float, nullable=False),  # edge clock
    sa.Column("received_at", sa.Float, nullable=False),  # cloud clock
    sa.Column("site", sa.String(253), nullable=False),  # zone, or the node itself
    sa.Column("verdict", sa.String(16), nullable=False),  # grant | hold | deny
    sa.Column("why", sa.Text, nullable=False),
    sa.Column("decided_at", sa.Float, nullable=False),  # when the verdict (and why) was first given
    sa.Column("granted_at", sa.Float),
    sa.Column("command_id", sa.String(64)),  # the grant's reboot command (edge_commands.id)
    sa.Column("down_at", sa.Float),  # the node first seen offline after the grant
    sa.Column("ended_at", sa.Float),  # the grant stopped counting as in progress
    sa.Column("ended", sa.String(16)),  # back | refused | timed-out
    sa.Index("ix_reboots_verdict", "verdict"),
    sa.Index("ix_reboots_granted_at", "granted_at"),
)
