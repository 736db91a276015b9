"""Which pod and container a GPU process belongs to.

The daemon runs with hostPID, so NVML hands us host PIDs and `/proc/<pid>/cgroup` of each one
names the pod UID and container ID its cgroup sits in. UIDs and IDs are not what a person wants
to read, so names come from a pod list in Kubernetes JSON: edgecore's MetaServer on a KubeEdge
node (`http://127.0.0.1:10550/api/v1/pods`), the kubelet's `/pods` elsewhere. Without that list
(unset, down, garbage) we still attribute energy, under the UID and a short container ID.
"""

import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any

from shared.logs import get_logger

log = get_logger(__name__)

UNKNOWN_NAMESPACE = "unknown"
_MAX_BODY_BYTES = 64 * 1024 * 1024  # a pod list larger than this is not an edge node's

# A pod's cgroup directory: `pod<uid>` (cgroupfs driver) or `kubepods[-qos]-pod<uid>.slice`
# (systemd driver, where the UID's dashes are underscores). Static pods carry a 32-hex config
# hash as UID instead of a UUID.
_POD_COMPONENT = re.compile(
    r"^(?:[A-Za-z0-9_.-]*-)?pod"
    r"(?P<uid>[0-9a-fA-F]{8}(?:[-_][0-9a-fA-F]{4}){3}[-_][0-9a-fA-F]{12}"
    r"|[0-9a-fA-F]{32})"
    r"(?:\.slice)?$"
)
# The container's directory right below the pod's: a bare ID (cgroupfs) or a runtime-prefixed
# systemd scope (`cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`).
_CONTAINER_COMPONENT = re.compile(
    r"^(?:(?:cri-containerd|containerd|crio|cri-o|docker|libpod)-)?"
    r"(?P<id>[0-9a-fA-F]{12,64})(?:\.scope)?$"
)


@dataclass(frozen=True)
class PodRef:
    """Where a process runs. With no pod list, namespace is "unknown" and pod/container hold IDs."""

    namespace: str
    pod: str
    container: str
    pod_uid: str
    container_id: str


def parse_cgroup(text: str) -> tuple[str, str] | None:
    """(pod_uid, container_id) from the contents of a `/proc/<pid>/cgroup`, None for a non-pod.

    Works for cgroup v1 (one line per hierarchy) and v2 (`0::/path`), both cgroup drivers, and
    paths made relative by a cgroup namespace (`0::/../../kubepods-...`), because it looks for the
    pod's directory anywhere in the path rather than anchoring at `/kubepods`. The UID comes back
    dashed and lower case, as the API server writes it. container_id is "" when the process sits
    in the pod's cgroup itself or below a directory we do not recognise.
    """
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        components = parts[2].split("/")
        for i, component in enumerate(components):
            pod = _POD_COMPONENT.match(component)
            if pod is None:
                continue
            uid = pod.group("uid").lower().replace("_", "-")
            container_id = ""
            if i + 1 < len(components):
                container = _CONTAINER_COMPONENT.match(components[i + 1])
                if container is not None:
                    container_id = container.group("id").lower()
            return uid, container_id
    return None


@dataclass(frozen=True)
class _ContainerNames:
    namespace: str
    pod: str
    container: str


@dataclass
class _PodIndex:
    pods: dict[str, tuple[str, str]]  # pod uid -> (namespace, pod name)
    containers: dict[str, _ContainerNames]  # container id -> names


def _strip_runtime(container_id: str) -> str:
    """`containerd://abc` -> `abc`: the status carries the runtime as a URL scheme."""
    _, sep, rest = container_id.partition("://")
    return (rest if sep else container_id).lower()


def build_index(pod_list: Any) -> _PodIndex:
    """Index a Kubernetes PodList by pod UID and container ID.

    Raises ValueError when the document is not a pod list at all; single items that lack a
    field are skipped, so one odd pod does not cost the names of all the others.
    """
    if not isinstance(pod_list, dict) or not isinstance(pod_list.get("items"), list):
        raise ValueError("not a pod list: no 'items' array")
    pods: dict[str, tuple[str, str]] = {}
    containers: dict[str, _ContainerNames] = {}
    for item in pod_list["items"]:
        if not isinstance(item, dict):
            continue
        meta = item.get("metadata")
        if not isinstance(meta, dict):
            continue
        uid, name, namespace = meta.get("uid"), meta.get("name"), meta.get("namespace")
        if not (isinstance(uid, str) and isinstance(name, str)):
            continue
        namespace = namespace if isinstance(namespace, str) and namespace else "default"
        pods[uid.lower()] = (namespace, name)
        status = item.get("status")
        if not isinstance(status, dict):
            continue
        for field in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
            statuses = status.get(field)
            if not isinstance(statuses, list):
                continue
            for cs in statuses:
                if not isinstance(cs, dict):
                    continue
                cname, cid = cs.get("name"), cs.get("containerID")
                if isinstance(cname, str) and isinstance(cid, str) and cid:
                    containers[_strip_runtime(cid)] = _ContainerNames(namespace, name, cname)
    return _PodIndex(pods, containers)


class PodResolver:
    """PID -> PodRef. Blocking (file reads, one HTTP GET now and then): call it from a thread.

    The pod list is cached for `cache_ttl_s`. A PID whose pod or container is not in the cache
    (a pod started since) triggers a refresh, but fetches are never tried more often than once
    per `min_refresh_s`, so a down server costs at most one timeout per that period, not one per
    process. A failed fetch keeps the last good index: UIDs never get reused, so stale names are
    still right for the pods they name. Safe to call from several threads.
    """

    def __init__(
        self,
        proc_root: str | Path = "/proc",
        pod_list_url: str | None = None,
        cache_ttl_s: float = 30.0,
        timeout_s: float = 2.0,
        *,
        min_refresh_s: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.proc_root = Path(proc_root)
        self.pod_list_url = pod_list_url or None
        self.cache_ttl_s = cache_ttl_s
        self.timeout_s = timeout_s
        self.min_refresh_s = min_refresh_s
        self._clock = clock
        self._lock = threading.Lock()
        self._index: _PodIndex | None = None
        self._fetched_at: float | None = None  # last successful fetch
        self._tried_at: float | None = None  # last attempt, successful or not
        self._failing = False  # warned about the current outage already

    def resolve(self, pid: int) -> PodRef | None:
        """The pod and container of `pid`; None for a host process or a PID that is gone."""
        try:
            text = (self.proc_root / str(pid) / "cgroup").read_text(errors="replace")
        except (OSError, ValueError):
            return None
        parsed = parse_cgroup(text)
        if parsed is None:
            return None
        pod_uid, container_id = parsed
        return self._names(pod_uid, container_id)

    def _names(self, pod_uid: str, container_id: str) -> PodRef:
        if self.pod_list_url is None:
            return self._fallback(pod_uid, container_id, None)
        with self._lock:
            now = self._clock()
            expired = self._fetched_at is None or now - self._fetched_at >= self.cache_ttl_s
            if expired and self._may_try(now):
                self._refresh(now)
            if self._misses(pod_uid, container_id) and self._may_try(now):
                self._refresh(now)
            index = self._index
        if index is not None:
            names = index.containers.get(container_id) if container_id else None
            if names is not None:
                return PodRef(names.namespace, names.pod, names.container, pod_uid, container_id)
            pod = index.pods.get(pod_uid)
            if pod is not None:
                return self._fallback(pod_uid, container_id, pod)
        return self._fallback(pod_uid, container_id, None)

    @staticmethod
    def _fallback(pod_uid: str, container_id: str, pod: tuple[str, str] | None) -> PodRef:
        namespace, name = pod if pod is not None else (UNKNOWN_NAMESPACE, pod_uid)
        return PodRef(namespace, name, container_id[:12], pod_uid, container_id)

    def _may_try(self, now: float) -> bool:
        return self._tried_at is None or now - self._tried_at >= self.min_refresh_s

    def _misses(self, pod_uid: str, container_id: str) -> bool:
        if self._index is None:
            return True
        if container_id:
            return container_id not in self._index.containers
        return pod_uid not in self._index.pods

    def _refresh(self, now: float) -> None:
        """Fetch and index the pod list; on any failure keep the old index and say so once."""
        assert self.pod_list_url is not None
        self._tried_at = now
        try:
            request = urllib.request.Request(
                self.pod_list_url, headers={"Accept": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                body = response.read(_MAX_BODY_BYTES + 1)
            if len(body) > _MAX_BODY_BYTES:
                raise ValueError(f"pod list larger than {_MAX_BODY_BYTES} bytes")
            index = build_index(json.loads(body))
        except (OSError, HTTPException, ValueError) as exc:
            # URLError, HTTPError and timeouts are OSErrors; JSONDecodeError is a ValueError.
            level = "debug" if self._failing else "warning"
            getattr(log, level)(
                "pod list unavailable, naming pods by UID",
                extra={"url": self.pod_list_url, "error": repr(exc)},
            )
            self._failing = True
            return
        if self._failing:
            log.info("pod list available again", extra={"url": self.pod_list_url})
        self._failing = False
        self._index = index
        self._fetched_at = now
