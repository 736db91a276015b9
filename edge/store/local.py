"""What the node keeps for itself: the newest policy (so that an offline restart enforces it),
the GPU inventory and a bounded telemetry history.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import sqlalchemy as sa
from pydantic import ValidationError

from edge.store.base import StoreBase, log
from edge.store.schema import inventory_table, meta_get, meta_set, policy_table, samples_table
from shared.gpu import GpuInventory, GpuSample
from shared.partitioning import NodePartitioning
from shared.policy import PowerPolicy

PARTITIONING_KEY = "partitioning"
REMEDIATION_KEY = "remediation"


ADD_SAMPLE = "INSERT INTO samples (ts, gpu_uuid, gpu_index, data) VALUES (?, ?, ?, ?)"
TRIM_SAMPLES = "DELETE FROM samples WHERE n <= (SELECT max(n) FROM samples) - ?"


class LocalStateStore(StoreBase):
    """The policy cache, the inventory and the telemetry history."""

    # -- policy --------------------------------------------------------------------------------

    def cache_policy(self, policy: PowerPolicy) -> bool:
        """Keep the newest policy for an offline restart. An older or equal version is ignored
        (False): a delayed or replayed policy message must never roll the node back."""
        with self._write("cache_policy") as conn:
            cached = conn.execute(
                sa.select(policy_table.c.version).where(policy_table.c.id == 1)
            ).scalar_one_or_none()
            if cached is not None and policy.version <= cached:
                return False
            row = {
                "version": policy.version,
                "policy": json.dumps(policy.dump()),
                "cached_at": time.time(),
            }
            if cached is None:
                conn.execute(policy_table.insert().values(id=1, **row))
            else:
                conn.execute(policy_table.update().where(policy_table.c.id == 1).values(**row))
            return True

    def cached_policy(self) -> PowerPolicy | None:
        """The newest policy seen, or None. An unreadable cache is logged and treated as empty."""
        with self._read("cached_policy") as conn:
            text = conn.execute(
                sa.select(policy_table.c.policy).where(policy_table.c.id == 1)
            ).scalar_one_or_none()
        if text is None:
            return None
        try:
            return PowerPolicy.model_validate_json(text)
        except ValidationError as exc:
            log.warning("cached policy is unreadable; ignoring it", extra={"error": str(exc)[:300]})
            return None

    # -- partitioning (MIG layouts, time-slicing) ------------------------------------------------

    def cache_partitioning(self, partitioning: NodePartitioning) -> bool:
        """Keep the cloud's partitioning, re-applied after a reboot with no cloud. The same
        object at an older or equal version is ignored (False): a replayed message never rolls
        a node back; another object (or none: name "") replaces it."""
        with self._write("cache_partitioning") as conn:
            cached = _parse_partitioning(meta_get(conn, PARTITIONING_KEY))
            if cached is not None and cached.name == partitioning.name and partitioning.version <= cached.version:
                return False
            meta_set(conn, PARTITIONING_KEY, partitioning.model_dump_json(by_alias=True))
            return True

    def cached_partitioning(self) -> NodePartitioning | None:
        with self._read("cached_partitioning") as conn:
            return _parse_partitioning(meta_get(conn, PARTITIONING_KEY))

    # -- the remediation ladders ------------------------------------------------------------------

    def save_remediation(self, state: str) -> None:
        """The remediation ladders (edge/remediation/), JSON: resumed after a restart or the reboot
        a ladder asked for."""
        with self._write("save_remediation") as conn:
            meta_set(conn, REMEDIATION_KEY, state)

    def saved_remediation(self) -> str | None:
        with self._read("saved_remediation") as conn:
            return meta_get(conn, REMEDIATION_KEY)

    # -- inventory -----------------------------------------------------------------------------

    def save_inventory(self, gpus: Sequence[GpuInventory]) -> None:
        """Replace the inventory with what the driver reports now (GPUs can disappear)."""
        with self._write("save_inventory") as conn:
            conn.execute(inventory_table.delete())
            if gpus:
                conn.execute(
                    inventory_table.insert(),
                    [
                        {"gpu_index": g.index, "uuid": g.uuid, "data": g.model_dump_json()}
                        for g in gpus
                    ],
                )

    def inventory(self) -> list[GpuInventory]:
        """The last saved inventory, by GPU index."""
        with self._read("inventory") as conn:
            rows = conn.execute(
                sa.select(inventory_table.c.data).order_by(inventory_table.c.gpu_index)
            ).scalars()
            return [GpuInventory.model_validate_json(data) for data in rows]

    # -- telemetry history ---------------------------------------------------------------------

    def add_samples(self, samples: Sequence[GpuSample]) -> None:
        """Append telemetry; past `samples_retention` rows the oldest are dropped."""
        if not samples:
            return
        rows = [(s.ts, s.uuid, s.index, s.model_dump_json()) for s in samples]
        with self._write("add_samples") as conn:
            # every cycle: the driver's own executemany inside the transaction, two statements
            # (a third of the Core statements' CPU; edge/store/schema.py's samples table)
            driver = conn.connection.driver_connection
            assert driver is not None
            driver.executemany(ADD_SAMPLE, rows)
            driver.execute(TRIM_SAMPLES, (self.samples_retention,))

    def samples(
        self, gpu_uuid: str | None = None, since: float | None = None, limit: int = 1000
    ) -> list[GpuSample]:
        """Samples with ts >= since, in time order; when more match, the newest `limit` of them."""
        t = samples_table
        inner = sa.select(t.c.n, t.c.ts, t.c.data).order_by(t.c.ts.desc(), t.c.n.desc())
        if gpu_uuid is not None:
            inner = inner.where(t.c.gpu_uuid == gpu_uuid)
        if since is not None:
            inner = inner.where(t.c.ts >= since)
        newest = inner.limit(max(0, limit)).subquery()
        query = sa.select(newest.c.data).order_by(newest.c.ts, newest.c.n)
        with self._read("samples") as conn:
            return [GpuSample.model_validate_json(data) for data in conn.execute(query).scalars()]

    def prune_samples(self, older_than: float) -> int:
        """Drop samples with ts < older_than; returns how many."""
        with self._write("prune_samples") as conn:
            result = conn.execute(samples_table.delete().where(samples_table.c.ts < older_than))
            return int(result.rowcount or 0)


def _parse_partitioning(text: str | None) -> NodePartitioning | None:
    if text is None:
        return None
    try:
        return NodePartitioning.model_validate_json(text)
    except ValidationError as exc:
        log.warning("cached partitioning is unreadable; ignoring it", extra={"error": str(exc)[:300]})
        return None
