"""Leader election (cloud/leader.py): the decide() table; LeaderElectors in-process over real HTTP
against the kmock emulator (one leader at a time, release, crash, unreachable API); and a
hand-over between two real `kgpu cloud run` processes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from kubernetes import client

from cloud.config import CloudSettings
from cloud.kube import Kube
from cloud.leader import LeaderElector, decide, format_micro_time, parse_time
from kgpu.lab.broker import Mosquitto
from kgpu.lab.kube import KubeEmulator
from kgpu.lab.processes import wait_for
from tests.helpers.cloud_process import CloudProcess

NOW = datetime(2026, 11, 22, 15, 0, 0, 123456, tzinfo=UTC)
DURATION = 2.0  # in-process lease_duration
RENEW = 0.5  # in-process lease_renew_interval
NAMESPACE = "kgpu"


def lease(holder: str | None, renewed_ago: float | None = 0.0, *, duration: int | None = 2,
          acquired_ago: float | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"leaseTransitions": 3}
    if holder is not None:
        spec["holderIdentity"] = holder
    if renewed_ago is not None:
        spec["renewTime"] = format_micro_time(NOW - timedelta(seconds=renewed_ago))
    if acquired_ago is not None:
        spec["acquireTime"] = format_micro_time(NOW - timedelta(seconds=acquired_ago))
    if duration is not None:
        spec["leaseDurationSeconds"] = duration
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "l"}, "spec": spec}


@pytest.mark.parametrize("current, expected", [
    (None, "acquire"),                                              # no Lease yet: create it
    (lease("me", renewed_ago=0.1), "renew"),                        # ours: keep it
    (lease("me", renewed_ago=60), "renew"),                         # ours even if stale: nobody took it
    (lease(None), "acquire"),                                       # no holder field
    (lease(""), "acquire"),                                         # released
    (lease("other", renewed_ago=0.5), "follow"),                    # alive
    (lease("other", renewed_ago=1.999), "follow"),                  # just within its duration
    (lease("other", renewed_ago=2.001), "acquire"),                 # expired
    (lease("other", renewed_ago=-30), "follow"),                    # renewTime ahead of our clock
    (lease("other", renewed_ago=5, duration=10), "follow"),         # the holder's own duration counts
    (lease("other", renewed_ago=5, duration=None), "acquire"),      # none declared: ours (2 s)
    (lease("other", renewed_ago=1, duration=None), "follow"),
    (lease("other", renewed_ago=None, acquired_ago=1), "follow"),   # acquireTime stands in for renewTime
    (lease("other", renewed_ago=None, acquired_ago=9), "acquire"),
    (lease("other", renewed_ago=None), "acquire"),                  # no time at all: cannot be alive
    ({"spec": {"holderIdentity": "other", "renewTime": "garbage"}}, "acquire"),
    ({"metadata": {}}, "acquire"),                                  # no spec
])
def test_decide(current: dict[str, Any] | None, expected: str) -> None:
    assert decide(current, "me", NOW, DURATION) == expected


def test_micro_time() -> None:
    assert format_micro_time(NOW) == "2026-11-22T15:00:00.123456Z"
    assert format_micro_time(NOW.replace(microsecond=0)) == "2026-11-22T15:00:00.000000Z"
    assert parse_time("2026-11-22T15:00:00.123456Z") == NOW
    assert parse_time("2026-11-22T15:00:00.123456+00:00") == NOW  # how kmock echoes it
    assert parse_time("2026-11-22T15:00:00Z") == NOW.replace(microsecond=0)
    assert parse_time(None) is None and parse_time("") is None and parse_time("soon") is None


# ---- in-process electors against the emulator ---------------------------------------------------


def cloud_settings(name: str) -> CloudSettings:
    return CloudSettings(lease_name=name, namespace=NAMESPACE, lease_duration=DURATION, lease_renew_interval=RENEW)


class Replica:
    """One LeaderElector with its own Kubernetes client (real HTTP), like one controller replica."""

    def __init__(self, url: str, identity: str, lease_name: str) -> None:
        configuration = client.Configuration()
        configuration.host = url
        self.identity = identity
        self.kube = Kube(client.ApiClient(configuration))
        self.leading = asyncio.Event()
        self.elector = LeaderElector(self.kube, cloud_settings(lease_name), identity, self.leading)
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.elector.run(self.stop), name=f"elector-{identity}")

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Graceful stop: release the Lease."""
        self.stop.set()
        await asyncio.wait_for(self.task, timeout)

    async def crash(self) -> None:
        """Cancel without `stop`: no release, as if the process had died."""
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def close(self) -> None:
        if not self.task.done():
            await self.crash()
        self.kube.close()


class Sampler:
    """Records (monotonic, wall, who leads) every 10 ms, so tests can check overlaps and timings."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas = replicas
        self.samples: list[tuple[float, datetime, tuple[str, ...]]] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            leaders = tuple(r.identity for r in self.replicas if r.elector.is_leader)
            self.samples.append((time.monotonic(), datetime.now(UTC), leaders))
            await asyncio.sleep(0.01)

    def first(self, predicate: Callable[[tuple[str, ...]], bool]) -> tuple[float, datetime] | None:
        for mono, wall, leaders in self.samples:
            if predicate(leaders):
                return mono, wall
        return None

    def overlaps(self) -> list[tuple[str, ...]]:
        return [leaders for _, _, leaders in self.samples if len(leaders) > 1]

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def until(check: Callable[[], Any], timeout: float, what: str) -> float:
    """Poll `check` every 10 ms; the monotonic time at which it held. Fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def read_lease(kube: KubeEmulator, name: str) -> dict[str, Any]:
    response = await asyncio.to_thread(kube.coordination.read_namespaced_lease, name, NAMESPACE,
                                       _preload_content=False, _request_timeout=5)
    return json.loads(response.data)


@pytest.mark.timeout(20)
async def test_exactly_one_leader_at_a_time(kube: KubeEmulator) -> None:
    a, b = Replica(kube.url, "replica-a", "one"), Replica(kube.url, "replica-b", "one")
    sampler = Sampler([a, b])
    try:
        await until(lambda: a.elector.is_leader or b.elector.is_leader, 3, "a leader")
        started = time.monotonic()
        await asyncio.sleep(3)  # six renewals by the leader, six polls by the follower
        leaders = {s[2] for s in sampler.samples if s[0] >= started}
        assert len(leaders) == 1 and len(next(iter(leaders))) == 1, leaders  # the same single leader throughout
        assert not sampler.overlaps()
        leader, follower = (a, b) if a.elector.is_leader else (b, a)
        spec = (await read_lease(kube, "one"))["spec"]
        assert spec["holderIdentity"] == leader.identity and spec["leaseDurationSeconds"] == 2
        assert spec["leaseTransitions"] == 0  # the loser of the create race got 409 and followed
        renewed = parse_time(spec["renewTime"])
        # the leader keeps renewing: the lease is never as old as its duration, and a later read
        # shows a newer renewal (an age under RENEW + 0.3 s held only on a quiet machine: with
        # both cores busy a renewal came 1.07 s after the one before)
        assert renewed is not None and datetime.now(UTC) - renewed < timedelta(seconds=DURATION)
        assert spec["renewTime"].endswith("Z") and len(spec["renewTime"].split(".")[1]) == 7  # MicroTime
        deadline = time.monotonic() + DURATION
        later = renewed
        while later == renewed and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            later = parse_time((await read_lease(kube, "one"))["spec"]["renewTime"])
        assert later is not None and later > renewed
        assert follower.elector.leader_identity == leader.identity == leader.elector.leader_identity
    finally:
        await sampler.close()
        await a.close()
        await b.close()


@pytest.mark.timeout(20)
async def test_release_on_stop_hands_over_at_once(kube: KubeEmulator) -> None:
    a = Replica(kube.url, "replica-a", "release")
    await until(lambda: a.elector.is_leader, 3, "replica-a leading")
    b = Replica(kube.url, "replica-b", "release")
    sampler = Sampler([a, b])
    try:
        await until(lambda: b.elector.leader_identity == "replica-a", 3, "replica-b observing replica-a")
        stopped = time.monotonic()
        await a.shutdown()
        assert not a.leading.is_set() and time.monotonic() - stopped < 1.0
        took_over = await until(lambda: b.elector.is_leader, 3, "replica-b leading")
        assert took_over - stopped < 1.0  # its next poll (0.5-0.6 s), not lease_duration
        assert not sampler.overlaps()
        spec = (await read_lease(kube, "release"))["spec"]
        assert spec["holderIdentity"] == "replica-b" and spec["leaseTransitions"] == 1
    finally:
        await sampler.close()
        await a.close()
        await b.close()


@pytest.mark.timeout(20)
async def test_crashed_leader_is_replaced_after_the_lease_duration(kube: KubeEmulator) -> None:
    a = Replica(kube.url, "replica-a", "crash")
    await until(lambda: a.elector.is_leader, 3, "replica-a leading")
    b = Replica(kube.url, "replica-b", "crash")
    sampler = Sampler([a, b])
    try:
        await until(lambda: b.elector.leader_identity == "replica-a", 3, "replica-b observing replica-a")
        crashed = time.monotonic()
        await a.crash()
        assert not a.leading.is_set()
        await asyncio.sleep(0.2)  # a renewal already on the wire lands; nothing after it
        spec = (await read_lease(kube, "crash"))["spec"]
        assert spec["holderIdentity"] == "replica-a"  # not released
        last_renewal = parse_time(spec["renewTime"])
        assert last_renewal is not None
        await until(lambda: b.elector.is_leader, DURATION + 2, "replica-b taking over")
        await asyncio.sleep(0.05)  # let the sampler record it too
        first = sampler.first(lambda leaders: "replica-b" in leaders)
        assert first is not None
        took_over_mono, took_over_wall = first
        assert took_over_wall > last_renewal + timedelta(seconds=DURATION)  # not before the lease expired
        assert took_over_mono - crashed < DURATION + 1.0  # and soon after
        spec = (await read_lease(kube, "crash"))["spec"]
        assert spec["holderIdentity"] == "replica-b" and spec["leaseTransitions"] == 1
    finally:
        await sampler.close()
        await a.close()
        await b.close()


class Relay:
    """A loopback TCP relay in front of the emulator. `cut()` makes it a black hole: connections
    stay open and bytes are swallowed, the way a partition looks to an HTTP client."""

    def __init__(self, target: str) -> None:
        parsed = urlparse(target)
        self.target = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.is_cut = False
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def cut(self) -> None:
        self.is_cut = True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        if self.is_cut:
            await self._pipe(reader, None)
            return
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers.append(up_writer)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter | None) -> None:
        try:
            while data := await source.read(65536):
                if sink is not None and not self.is_cut:
                    sink.write(data)
                    await sink.drain()
        except ConnectionError:
            pass
        finally:
            if sink is not None:
                sink.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in self.writers:
            writer.close()


@pytest.mark.timeout(20)
async def test_leader_cut_off_from_the_api_steps_down_before_anyone_takes_over(kube: KubeEmulator) -> None:
    relay = Relay(kube.url)
    a = Replica(await relay.start(), "replica-a", "partition")
    await until(lambda: a.elector.is_leader, 3, "replica-a leading")
    b = Replica(kube.url, "replica-b", "partition")
    sampler = Sampler([a, b])
    try:
        await until(lambda: b.elector.leader_identity == "replica-a", 3, "replica-b observing replica-a")
        await asyncio.sleep(RENEW)  # a few renewals through the relay
        relay.cut()
        cut = time.monotonic()
        stepped_down = await until(lambda: not a.elector.is_leader, DURATION + 1, "replica-a stepping down")
        assert stepped_down - cut < DURATION  # renew deadline: 1.5 s after its last renewal
        took_over = await until(lambda: b.elector.is_leader, DURATION + 2, "replica-b taking over")
        assert stepped_down < took_over
        assert not sampler.overlaps()  # never two leaders, sampled every 10 ms
        assert a.elector.leader_identity == "replica-a"  # it has not seen the Lease since
    finally:
        await sampler.close()
        await a.close()
        await b.close()
        await relay.close()


# ---- real processes ------------------------------------------------------------------------------


def holder(kube: KubeEmulator) -> str | None:
    try:
        response = kube.coordination.read_namespaced_lease("kgpu-controller", NAMESPACE, _preload_content=False,
                                                           _request_timeout=5)
    except client.exceptions.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return json.loads(response.data)["spec"].get("holderIdentity")


@pytest.mark.timeout(40)
def test_handover_between_cloud_processes(tmp_path: Path, broker: Mosquitto, kube: KubeEmulator) -> None:
    env = {"KGPU_LEASE_DURATION": "3", "KGPU_LEASE_RENEW_INTERVAL": "1"}
    replicas = {
        name: CloudProcess(tmp_path / name, broker.url, kubeconfig=kube.kubeconfig,
                           env={**env, "KGPU_MQTT_CLIENT_ID": name})
        for name in ("replica-a", "replica-b")
    }
    try:
        for replica in replicas.values():
            replica.start()
        first = wait_for(lambda: holder(kube), timeout=8, interval=0.1, what="a replica holding the Lease")
        assert first in replicas
        second = next(name for name in replicas if name != first)

        replicas[first].kill9()
        killed = time.monotonic()
        wait_for(lambda: holder(kube) == second, timeout=8, interval=0.1, what=f"{second} taking over")
        assert time.monotonic() - killed < 3 + 1.2 + 1.5  # lease_duration + one jittered poll + slack
        # The log line follows the Lease write the test has just read; give it the moment between.
        wait_for(lambda: "acquired the leader lease" in replicas[second].log_path.read_text(), timeout=3,
                 interval=0.05, what=f"{second} logging its lease")

        stopping = time.monotonic()
        assert replicas[second].stop(timeout=10) == 0
        assert holder(kube) == ""  # released on SIGTERM, not left to expire
        assert time.monotonic() - stopping < 5
        assert "released the leader lease" in replicas[second].log_path.read_text()
    finally:
        for replica in replicas.values():
            if replica.proc is not None and replica.proc.poll() is None:
                replica.proc.kill()
                replica.proc.wait(timeout=10)
