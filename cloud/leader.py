"""Leader election over a coordination.k8s.io/v1 Lease, the way client-go's leaderelection does it.

Every replica runs one LeaderElector. The Lease `settings.lease_name` in `settings.namespace`
names the holder (`holderIdentity`) and when it last renewed (`renewTime`, RFC3339 with
microseconds). A replica takes the Lease when nobody holds it or when the holder's
renewTime + leaseDurationSeconds is in the past by our clock; the holder renews it every
`lease_renew_interval`. Replica clocks must agree to well under `lease_duration` (NTP).

Safety rests on three rules:

* A write carries the resourceVersion we read, so a real API server refuses a stale write with
  409; a 409 (on create too) means another replica won the race, and we follow.
  The test emulator (kmock 0.8) gives objects no resourceVersion: there two replicas that read
  an expired Lease at the same moment can both write it; the loser sees the other's name on its
  next read (one retry period later) and steps down.
* A leader that cannot renew for `renew_deadline` (shorter than lease_duration; client-go's
  renewDeadline) clears `leading` before anyone else may take the Lease over.
* On `stop` the leader releases the Lease (holderIdentity "") so the next replica takes over
  at its next poll instead of after lease_duration. Cancelling `run()` without `stop` abandons
  the Lease like a crash would: `leading` is cleared, the Lease expires on its own.

Writes are JSON merge patches, not PUTs: kmock 0.8 does not serve PUT, and a real API server
treats a `metadata.resourceVersion` inside a patch as the same optimistic-concurrency
precondition as a replace.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from cloud.config import CloudSettings
from cloud.kube import Kube, KubeError
from shared.aio import wait_event
from shared.logs import get_logger

log = get_logger(__name__)

Decision = Literal["acquire", "renew", "follow"]

MERGE_PATCH = "application/merge-patch+json"
JITTER = 0.2  # followers poll every renew_interval * U(1, 1 + JITTER), so replicas spread out


def format_micro_time(moment: datetime) -> str:
    """A Kubernetes MicroTime: RFC3339 in UTC with exactly six fractional digits."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: object) -> datetime | None:
    """A (Micro)Time from the API, or None when absent or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def decide(lease: dict[str, Any] | None, identity: str, now: datetime, duration_s: float) -> Decision:
    """What `identity` should do with `lease` (the Lease as JSON, None if missing) at `now`.

    The holder's own leaseDurationSeconds counts when the Lease has one (that is what it promised
    to renew within); `duration_s` otherwise. A holder with no renewTime or acquireTime cannot be
    shown to be alive, so its Lease counts as expired."""
    if lease is None:
        return "acquire"
    spec = lease.get("spec") or {}
    holder = spec.get("holderIdentity") or ""
    if holder == identity:
        return "renew"
    if not holder:
        return "acquire"
    renewed = parse_time(spec.get("renewTime")) or parse_time(spec.get("acquireTime"))
    if renewed is None:
        return "acquire"
    declared = spec.get("leaseDurationSeconds")
    duration = float(declared) if isinstance(declared, (int, float)) and declared > 0 else duration_s
    return "acquire" if renewed + timedelta(seconds=duration) < now else "follow"


class LeaderElector:
    """Keeps `leading` set exactly while this replica holds the leader Lease."""

    def __init__(self, kube: Kube, settings: CloudSettings, identity: str, leading: asyncio.Event) -> None:
        self.kube = kube
        self.identity = identity
        self.leading = leading
        self.namespace = settings.namespace
        self.name = settings.lease_name
        self.duration = float(settings.lease_duration)
        self.renew_interval = float(settings.lease_renew_interval)
        # Step down this long after the last successful renewal: a margin before others may take
        # the Lease (renewTime + duration) for the decision tasks to stop. 15 s / 5 s gives 10 s.
        self.renew_deadline = self.duration - min(self.renew_interval, self.duration / 3)
        self.call_timeout = max(1.0, self.renew_interval)  # per HTTP request; a partition hangs
        self.leader_identity: str | None = None  # the holder we last saw in the Lease
        self._renewed_at = 0.0  # monotonic time at which our last successful write was stamped
        self._failing_since: float | None = None
        self._rng = random.Random()
        # The Lease calls' own threads: on asyncio's default executor they would queue behind
        # whatever else blocks there (a rollout's pod deletions, database reads) and, on a busy
        # machine, miss the renewal deadline (cloud/kube.py, Kube.call_in).
        self._threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="leader-lease")

    @property
    def is_leader(self) -> bool:
        return self.leading.is_set()

    async def run(self, stop: asyncio.Event) -> None:
        """Elect until `stop`, then release the Lease if held (once per elector). See the module
        doc on cancelling."""
        try:
            while not stop.is_set():
                await self._cycle()
                await wait_event(stop, self._next_wait())
        except asyncio.CancelledError:
            if not stop.is_set():
                self._step_down("abandoned: election cancelled without release, the lease will expire")
                raise
            await self._finish()  # the controller cancels its tasks right after `stop`
            raise
        else:
            await self._finish()
        finally:
            self._threads.shutdown(wait=False)

    # ---- one round: read, decide, write ------------------------------------------------------

    async def _cycle(self) -> None:
        now = time.monotonic()
        if self.is_leader and now - self._renewed_at >= self.renew_deadline:
            self._step_down(f"lost: could not renew for {now - self._renewed_at:.1f}s")
        # A leader's attempt may not outlive its deadline; a follower's is just bounded.
        limit = self._renewed_at + self.renew_deadline - now if self.is_leader else 2 * self.call_timeout
        try:
            await asyncio.wait_for(self._try_acquire_or_renew(), timeout=max(0.05, limit))
        except (KubeError, TimeoutError) as exc:
            self._failed(exc)
        except Exception as exc:  # a bug or a malformed Lease must not end the election
            if self._failing_since is None:
                log.exception("leader election round failed", extra={"identity": self.identity})
            self._failed(exc)
        else:
            if self._failing_since is not None:
                log.info("lease API reachable again after %.1fs", time.monotonic() - self._failing_since,
                         extra={"identity": self.identity})
                self._failing_since = None
        now = time.monotonic()
        if self.is_leader and now - self._renewed_at >= self.renew_deadline:
            self._step_down(f"lost: could not renew for {now - self._renewed_at:.1f}s")

    async def _try_acquire_or_renew(self) -> None:
        lease = await self._read()
        self._observe(lease)
        decision = decide(lease, self.identity, datetime.now(UTC), self.duration)
        if decision == "follow":
            if self.is_leader:
                self._step_down(f"lost: the lease is held by {self.leader_identity}")
            return
        stamped_at = time.monotonic()
        now = format_micro_time(datetime.now(UTC))
        spec = (lease or {}).get("spec") or {}
        transitions = int(spec.get("leaseTransitions") or 0)
        body_spec: dict[str, Any] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": math.ceil(self.duration),
            "acquireTime": spec.get("acquireTime") if decision == "renew" and spec.get("acquireTime") else now,
            "renewTime": now,
            "leaseTransitions": transitions + 1 if lease is not None and decision == "acquire" else transitions,
        }
        try:
            if lease is None:
                await self._create(body_spec)
            else:
                await self._write(lease, body_spec)
        except KubeError as exc:
            if exc.conflict:
                if self.is_leader:
                    self._step_down("lost: another replica wrote the lease first (409)")
                else:
                    log.info("lost the race for the lease (409); following", extra={"identity": self.identity})
                return
            raise
        self._renewed_at = stamped_at
        self.leader_identity = self.identity
        if not self.is_leader:
            self.leading.set()
            log.info("acquired the leader lease", extra={
                "identity": self.identity, "lease": f"{self.namespace}/{self.name}",
                "transitions": body_spec["leaseTransitions"]})

    def _observe(self, lease: dict[str, Any] | None) -> None:
        holder = ((lease or {}).get("spec") or {}).get("holderIdentity") or None
        if holder == self.leader_identity:
            return
        if holder is None:
            log.info("the leader lease is free",
                     extra={"identity": self.identity, "previous": self.leader_identity})
        elif holder != self.identity:
            log.info("observed new leader %s", holder, extra={"identity": self.identity, "holder": holder})
        self.leader_identity = holder

    def _failed(self, exc: BaseException) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning("leader lease round failed: %s", str(exc) or type(exc).__name__,
                        extra={"identity": self.identity, "leading": self.is_leader})

    def _next_wait(self) -> float:
        if not self.is_leader:
            return self.renew_interval * (1.0 + JITTER * self._rng.random())
        if self._failing_since is None:
            return self.renew_interval
        # renewing fails: retry more often, and be back in _cycle by the deadline to step down
        remaining = self._renewed_at + self.renew_deadline - time.monotonic()
        return max(0.0, min(self.renew_interval / 2, remaining))

    def _step_down(self, why: str) -> None:
        if self.is_leader:
            self.leading.clear()
            log.warning("%s", why, extra={"identity": self.identity, "holder": self.leader_identity})

    # ---- release -----------------------------------------------------------------------------

    async def _finish(self) -> None:
        """Release (bounded, not cut short by a cancel of run()), then clear `leading`."""
        release = asyncio.ensure_future(self._release())
        try:
            await asyncio.shield(release)
        except asyncio.CancelledError:
            await release
            raise

    async def _release(self) -> None:
        try:
            if self.is_leader:
                await asyncio.wait_for(self._write_release(), timeout=2 * self.call_timeout)
        except (KubeError, TimeoutError) as exc:
            log.warning("could not release the leader lease (%s); it expires within %.0fs", str(exc) or "timeout",
                        self.duration, extra={"identity": self.identity})
        finally:
            self.leading.clear()

    async def _write_release(self) -> None:
        lease = await self._read()
        holder = ((lease or {}).get("spec") or {}).get("holderIdentity")
        if lease is None or holder != self.identity:
            log.info("not releasing: the lease is held by %s", holder or "nobody",
                     extra={"identity": self.identity})
            return
        try:
            await self._write(lease, {"holderIdentity": "", "renewTime": format_micro_time(datetime.now(UTC))})
        except KubeError as exc:
            if not exc.conflict:
                raise
            log.info("not releasing: the lease changed meanwhile (409)", extra={"identity": self.identity})
            return
        self.leader_identity = None
        log.info("released the leader lease",
                 extra={"identity": self.identity, "lease": f"{self.namespace}/{self.name}"})

    # ---- API ---------------------------------------------------------------------------------

    async def _read(self) -> dict[str, Any] | None:
        """The Lease as the server's JSON (not the client's model: no re-parsing of times)."""
        try:
            response = await self.kube.call_in(
                self._threads, self.kube.coordination.read_namespaced_lease, self.name, self.namespace,
                _preload_content=False, _request_timeout=self.call_timeout)
        except KubeError as exc:
            if exc.not_found:
                return None
            raise
        lease: dict[str, Any] = json.loads(response.data)  # type: ignore[attr-defined]  # raw: _preload_content=False
        return lease

    async def _create(self, spec: dict[str, Any]) -> None:
        # The client re-serialises a created body through its model, dropping ".000000" when the
        # microseconds are zero; nudge them so that the server always gets a MicroTime it parses.
        for key in ("acquireTime", "renewTime"):
            if spec[key].endswith(".000000Z"):
                spec[key] = spec[key][:-8] + ".000001Z"
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace}, "spec": spec}
        await self.kube.call_in(self._threads, self.kube.coordination.create_namespaced_lease, self.namespace, body,
                                _preload_content=False, _request_timeout=self.call_timeout)

    async def _write(self, lease: dict[str, Any], spec: dict[str, Any]) -> None:
        """Merge-patch `spec` in, conditional on the resourceVersion we read when there is one."""
        body: dict[str, Any] = {"spec": spec}
        version = (lease.get("metadata") or {}).get("resourceVersion")
        if version:
            body["metadata"] = {"resourceVersion": version}
        await self.kube.call_in(self._threads, self.kube.coordination.patch_namespaced_lease, self.name,
                                self.namespace, body, _content_type=MERGE_PATCH, _preload_content=False,
                                _request_timeout=self.call_timeout)

