"""The rollout's Kubernetes side: the edge daemon's DaemonSet, its pods, deleting one pod."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from kubernetes import client

from cloud.kube import Kube, KubeError
from cloud.rollout.plan import merge_diff
from shared.logs import get_logger

log = get_logger(__name__)

MAX_PARALLEL_DELETES = 16
MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True)
class DaemonPod:
    name: str
    uid: str | None

    @property
    def identity(self) -> str:
        """The uid (a pod of the same name created later is another pod); the name if none."""
        return self.uid or f"name:{self.name}"


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a pod's labels."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        present = key in labels
        if op == "In" and (not present or labels[key] not in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


def _selector_string(selector: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items()))


async def _raw(kube: Kube, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """A client call's JSON as plain dicts (no model round trip that could drop fields)."""
    def call() -> Any:
        return json.loads(fn(*args, _preload_content=False, **kwargs).data)

    return await kube.call(call)


class EdgeDaemonSet:
    """The edge daemon's DaemonSet `namespace/name` and its pods."""

    def __init__(self, namespace: str, name: str) -> None:
        self.namespace = namespace
        self.name = name
        self._deletes = asyncio.Semaphore(MAX_PARALLEL_DELETES)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    async def read(self, kube: Kube) -> dict[str, Any]:
        return dict(await _raw(kube, kube.apps.read_namespaced_daemon_set, self.name, self.namespace))

    async def pods(self, kube: Kube, ds: dict[str, Any]) -> dict[str, DaemonPod]:
        """node -> its live daemon pod. Selectors are checked here too (an emulator may ignore them)."""
        selector = ds.get("spec", {}).get("selector") or {}
        listed = await _raw(kube, kube.core.list_namespaced_pod, self.namespace,
                            label_selector=_selector_string(selector))
        pods: dict[str, DaemonPod] = {}
        for pod in listed.get("items") or []:
            meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
            node = spec.get("nodeName")
            if not node or meta.get("deletionTimestamp") or not selector_matches(selector, meta.get("labels") or {}):
                continue
            owners = meta.get("ownerReferences") or []
            if not any(o.get("kind") == "DaemonSet" and o.get("name") == self.name for o in owners):
                continue
            pods[node] = DaemonPod(meta.get("name", ""), meta.get("uid"))
        return pods

    async def write_template(self, kube: Kube, ds: dict[str, Any], desired: dict[str, Any]) -> None:
        """Make the pod template `desired` (a merge patch of the difference; nothing if none)."""
        patch = merge_diff(ds.get("spec", {}).get("template") or {}, desired)
        if not patch:
            return
        body: dict[str, Any] = {"spec": {"template": patch}}
        version = (ds.get("metadata") or {}).get("resourceVersion")
        if version:  # a real API server refuses the write if the DaemonSet changed since our read
            body["metadata"] = {"resourceVersion": version}
        await kube.call(kube.apps.patch_namespaced_daemon_set, self.name, self.namespace, body,
                        _content_type=MERGE_PATCH)

    async def delete(self, kube: Kube, pod: DaemonPod, node: str) -> bool:
        """Delete one pod (only that uid); True when it is gone, whoever deleted it."""
        body = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=pod.uid)) if pod.uid else None
        async with self._deletes:
            try:
                await kube.call(kube.core.delete_namespaced_pod, pod.name, self.namespace, body=body)
            except KubeError as exc:
                if exc.not_found or exc.conflict:  # gone already, or the name is another pod now
                    return True
                log.warning("deleting daemon pod failed: %s", exc, extra={"node": node, "pod": pod.name})
                return False
        log.info("daemon pod deleted", extra={"node": node, "pod": pod.name, "uid": pod.uid})
        return True
