"""Process -> pod resolution: cgroup parsing, a fake /proc, and a real HTTP pod list server."""

import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.pods import PodRef, PodResolver, build_index, parse_cgroup
from kgpu.lab.processes import free_port
from tests.helpers.pod_list import PodListServer

UID = "1234abcd-5678-90ef-1234-567890abcdef"
UID_US = UID.replace("-", "_")
CID = "a" * 12 + "0123456789abcdef" * 3 + "b" * 4  # 64 hex
CID2 = "f" * 64
STATIC_UID = "6b3d5c7e9f0a1b2c3d4e5f60718293a4"  # static pods: config hash, no dashes

CGROUP_CASES: list[tuple[str, str, tuple[str, str] | None]] = [
    (
        "v2 systemd containerd burstable",
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_US}.slice/"
        f"cri-containerd-{CID}.scope\n",
        (UID, CID),
    ),
    (
        "v2 systemd besteffort",
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_US}.slice/"
        f"cri-containerd-{CID}.scope\n",
        (UID, CID),
    ),
    (
        "v2 systemd guaranteed",
        f"0::/kubepods.slice/kubepods-pod{UID_US}.slice/cri-containerd-{CID}.scope\n",
        (UID, CID),
    ),
    (
        "v2 systemd crio",
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_US}.slice/"
        f"crio-{CID}.scope\n",
        (UID, CID),
    ),
    (
        "v2 systemd docker",
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_US}.slice/"
        f"docker-{CID}.scope\n",
        (UID, CID),
    ),
    (
        "v2 kind (kubelet.slice prefix)",
        f"0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
        f"kubelet-kubepods-besteffort-pod{UID_US}.slice/cri-containerd-{CID}.scope\n",
        (UID, CID),
    ),
    (
        "v2 cgroup namespace relative path",
        f"0::/../../kubepods-besteffort-pod{UID_US}.slice/cri-containerd-{CID}.scope\n",
        (UID, CID),
    ),
    (
        "v2 nested cgroup inside the container",
        f"0::/kubepods.slice/kubepods-pod{UID_US}.slice/cri-containerd-{CID}.scope/init.scope\n",
        (UID, CID),
    ),
    (
        "v2 cgroupfs burstable",
        f"0::/kubepods/burstable/pod{UID}/{CID}\n",
        (UID, CID),
    ),
    (
        "v1 cgroupfs burstable (k3s, many hierarchies)",
        f"12:pids:/kubepods/burstable/pod{UID}/{CID}\n"
        f"11:memory:/kubepods/burstable/pod{UID}/{CID}\n"
        f"10:cpu,cpuacct:/kubepods/burstable/pod{UID}/{CID}\n"
        f"1:name=systemd:/kubepods/burstable/pod{UID}/{CID}\n"
        "0::/\n",
        (UID, CID),
    ),
    (
        "v1 cgroupfs guaranteed",
        f"4:devices:/kubepods/pod{UID}/{CID}\n",
        (UID, CID),
    ),
    (
        "v1 cgroupfs besteffort",
        f"7:memory:/kubepods/besteffort/pod{UID}/{CID}\n",
        (UID, CID),
    ),
    (
        "v1 systemd driver docker",
        f"11:devices:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_US}.slice/"
        f"docker-{CID}.scope\n"
        f"1:name=systemd:/kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{UID_US}.slice/docker-{CID}.scope\n",
        (UID, CID),
    ),
    (
        "v1 hybrid: pod only in v1 lines",
        f"0::/system.slice/containerd.service\n3:memory:/kubepods/besteffort/pod{UID}/{CID2}\n",
        (UID, CID2),
    ),
    (
        "cgroupfs crio prefix",
        f"0::/kubepods/besteffort/pod{UID}/crio-{CID}\n",
        (UID, CID),
    ),
    (
        "upper-case uid normalised",
        f"0::/kubepods/burstable/pod{UID.upper()}/{CID}\n",
        (UID, CID),
    ),
    (
        "static pod with hash uid",
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC_UID}.slice/"
        f"cri-containerd-{CID}.scope\n",
        (STATIC_UID, CID),
    ),
    (
        "process in the pod cgroup itself",
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_US}.slice\n",
        (UID, ""),
    ),
    ("host: user session", "0::/user.slice/user-1000.slice/session-3.scope\n", None),
    ("host: system service", "0::/system.slice/nvidia-persistenced.service\n", None),
    ("host: root", "0::/\n", None),
    (
        "host: v1 system service",
        "12:pids:/system.slice/sshd.service\n1:name=systemd:/system.slice/sshd.service\n",
        None,
    ),
    ("docker without kubernetes", f"0::/system.slice/docker-{CID}.scope\n", None),
    ("podman pod is not a kubernetes pod", f"0::/machine.slice/libpod-{CID}.scope\n", None),
    ("kubepods slice without a pod", "0::/kubepods.slice/kubepods-besteffort.slice\n", None),
    ("empty", "", None),
    ("garbage", "not a cgroup file\n\x00\x01", None),
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [(text, expected) for _, text, expected in CGROUP_CASES],
    ids=[name for name, _, _ in CGROUP_CASES],
)
def test_parse_cgroup(text: str, expected: tuple[str, str] | None) -> None:
    assert parse_cgroup(text) == expected


# --- a fake /proc -------------------------------------------------------------------------------

POD_PID, POD2_PID, HOST_PID, UNLISTED_PID = 4242, 4343, 1, 5151
UNLISTED_UID = "99999999-8888-7777-6666-555555555555"


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    def write(pid: int, text: str) -> None:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cgroup").write_text(text)

    write(
        POD_PID,
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_US}.slice/"
        f"cri-containerd-{CID}.scope\n",
    )
    write(POD2_PID, f"0::/kubepods/burstable/pod{UID}/{CID2}\n")
    write(HOST_PID, "0::/init.scope\n")
    write(UNLISTED_PID, f"0::/kubepods/besteffort/pod{UNLISTED_UID}/{CID2[:60]}dead\n")
    (tmp_path / "777").mkdir()  # a process whose cgroup file vanished
    return tmp_path


def pod_list(*, with_second_container: bool = True) -> dict:
    statuses = [{"name": "trainer", "containerID": f"containerd://{CID}", "ready": True}]
    if with_second_container:
        statuses.append({"name": "sidecar", "containerID": f"containerd://{CID2}"})
    return {
        "kind": "PodList",
        "apiVersion": "v1",
        "items": [
            {
                "metadata": {"name": "train-0", "namespace": "ml", "uid": UID},
                "status": {"phase": "Running", "containerStatuses": statuses},
            },
            {"metadata": {"name": "broken"}},  # odd items are skipped, not fatal
            "not even an object",
        ],
    }


# --- a real HTTP server --------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[PodListServer]:
    with PodListServer() as s:
        s.body = json.dumps(pod_list()).encode()
        yield s


def free_port_url() -> str:
    """A URL nothing listens on (a port the lab hands out once, below the ephemeral range)."""
    return f"http://127.0.0.1:{free_port()}/api/v1/pods"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_names_from_pod_list(proc: Path, server: PodListServer) -> None:
    resolver = PodResolver(proc, server.url)
    assert resolver.resolve(POD_PID) == PodRef("ml", "train-0", "trainer", UID, CID)
    assert resolver.resolve(POD2_PID) == PodRef("ml", "train-0", "sidecar", UID, CID2)
    assert server.requests == 1


def test_host_and_vanished_processes_are_none(proc: Path, server: PodListServer) -> None:
    resolver = PodResolver(proc, server.url)
    assert resolver.resolve(HOST_PID) is None
    assert resolver.resolve(777) is None  # no cgroup file
    assert resolver.resolve(123456) is None  # no such pid
    assert server.requests == 0  # host processes never need names


def test_no_url_falls_back_to_ids(proc: Path) -> None:
    resolver = PodResolver(proc)
    assert resolver.resolve(POD_PID) == PodRef("unknown", UID, CID[:12], UID, CID)


def test_server_down_falls_back(proc: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    resolver = PodResolver(proc, free_port_url(), timeout_s=1.0, clock=clock)
    with caplog.at_level(logging.DEBUG, logger="edge.pods"):
        first = resolver.resolve(POD_PID)
        clock.now += 10  # past min_refresh_s: tried again, fails again
        second = resolver.resolve(POD_PID)
    assert first == second == PodRef("unknown", UID, CID[:12], UID, CID)
    records = [r for r in caplog.records if r.name == "edge.pods"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.DEBUG]  # loud once


def test_malformed_json_falls_back(proc: Path, server: PodListServer) -> None:
    server.body = b'{"items": [ {"metadata": '
    resolver = PodResolver(proc, server.url)
    assert resolver.resolve(POD_PID) == PodRef("unknown", UID, CID[:12], UID, CID)
    assert server.requests == 1


@pytest.mark.parametrize(
    "body", [b"[]", b'{"kind": "Status", "code": 403}', b'{"items": "nope"}', b"null", b"\xff\xfe"]
)
def test_not_a_pod_list_falls_back(proc: Path, server: PodListServer, body: bytes) -> None:
    server.body = body
    resolver = PodResolver(proc, server.url)
    assert resolver.resolve(POD_PID) == PodRef("unknown", UID, CID[:12], UID, CID)


def test_http_error_falls_back(proc: Path, server: PodListServer) -> None:
    server.status = 503
    resolver = PodResolver(proc, server.url)
    assert resolver.resolve(POD_PID) == PodRef("unknown", UID, CID[:12], UID, CID)


def test_cache_ttl_honoured(proc: Path, server: PodListServer) -> None:
    clock = Clock()
    resolver = PodResolver(proc, server.url, cache_ttl_s=30.0, min_refresh_s=3.0, clock=clock)
    for _ in range(5):
        assert resolver.resolve(POD_PID) is not None
    assert server.requests == 1
    clock.now += 29.0
    resolver.resolve(POD_PID)
    assert server.requests == 1  # still fresh
    clock.now += 1.0
    resolver.resolve(POD_PID)
    assert server.requests == 2  # expired: fetched again
    resolver.resolve(POD2_PID)
    assert server.requests == 2


def test_cache_ttl_in_real_time(proc: Path, server: PodListServer) -> None:
    """The same with the real clock and a short TTL, to be sure the default clock works."""
    import time

    resolver = PodResolver(proc, server.url, cache_ttl_s=0.2, min_refresh_s=0.0)
    resolver.resolve(POD_PID)
    resolver.resolve(POD_PID)
    assert server.requests == 1
    time.sleep(0.25)
    resolver.resolve(POD_PID)
    assert server.requests == 2


def test_miss_refreshes_but_rate_limited(proc: Path, server: PodListServer) -> None:
    clock = Clock()
    server.body = json.dumps(pod_list(with_second_container=False)).encode()
    resolver = PodResolver(proc, server.url, min_refresh_s=3.0, clock=clock)
    assert resolver.resolve(POD_PID) == PodRef("ml", "train-0", "trainer", UID, CID)
    assert server.requests == 1

    # The sidecar started since: a miss, but we fetched under 3 s ago, so no new GET yet.
    # The pod is known, so its names are used with the short container id.
    server.body = json.dumps(pod_list()).encode()
    assert resolver.resolve(POD2_PID) == PodRef("ml", "train-0", CID2[:12], UID, CID2)
    assert server.requests == 1

    clock.now += 3.0
    assert resolver.resolve(POD2_PID) == PodRef("ml", "train-0", "sidecar", UID, CID2)
    assert server.requests == 2

    # A pod the list never has: one refresh per period at most, however many lookups.
    clock.now += 3.0
    for _ in range(10):
        ref = resolver.resolve(UNLISTED_PID)
        assert ref is not None and ref.namespace == "unknown" and ref.pod == UNLISTED_UID
    assert server.requests == 3


def test_recovers_when_server_returns(proc: Path) -> None:
    clock = Clock()
    with PodListServer() as s:
        s.body = b"<html>bad gateway</html>"
        resolver = PodResolver(proc, s.url, clock=clock)
        assert resolver.resolve(POD_PID).namespace == "unknown"  # type: ignore[union-attr]
        s.body = json.dumps(pod_list()).encode()
        clock.now += 5
        assert resolver.resolve(POD_PID) == PodRef("ml", "train-0", "trainer", UID, CID)


def test_stale_index_kept_when_server_goes_down(proc: Path) -> None:
    clock = Clock()
    with PodListServer() as s:
        s.body = json.dumps(pod_list()).encode()
        resolver = PodResolver(proc, s.url, cache_ttl_s=10.0, clock=clock)
        assert resolver.resolve(POD_PID) == PodRef("ml", "train-0", "trainer", UID, CID)
    clock.now += 60  # expired, and the server is gone: the old names still hold
    assert resolver.resolve(POD_PID) == PodRef("ml", "train-0", "trainer", UID, CID)


def test_concurrent_resolves(proc: Path, server: PodListServer) -> None:
    resolver = PodResolver(proc, server.url)
    results: list[PodRef | None] = []

    def work() -> None:
        for _ in range(20):
            results.append(resolver.resolve(POD_PID))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) == {PodRef("ml", "train-0", "trainer", UID, CID)}
    assert server.requests == 1


def test_build_index_runtimes_and_init_containers() -> None:
    index = build_index(
        {
            "items": [
                {
                    "metadata": {"name": "p", "namespace": "ns", "uid": UID},
                    "status": {
                        "initContainerStatuses": [
                            {"name": "init", "containerID": f"cri-o://{CID}"}
                        ],
                        "containerStatuses": [
                            {"name": "main", "containerID": f"docker://{CID2}"},
                            {"name": "waiting"},  # not started yet: no containerID
                        ],
                    },
                }
            ]
        }
    )
    assert index.pods == {UID: ("ns", "p")}
    assert {cid: names.container for cid, names in index.containers.items()} == {
        CID: "init",
        CID2: "main",
    }
    with pytest.raises(ValueError):
        build_index({"kind": "Status"})
