"""The controller's access to Kubernetes: the official `kubernetes` client, every call in a
worker thread (the client is blocking), API errors turned into one exception type.

Use it as `await kube.call(kube.core.patch_node, name, body)`; the typed APIs are `core`, `apps`,
`custom` (CustomObjectsApi) and `coordination`. With `--no-kube` there is no Kube object at all:
features that need a cluster say so (KubeUnavailable).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from shared.logs import get_logger

log = get_logger(__name__)
T = TypeVar("T")


class KubeUnavailable(RuntimeError):
    """The controller runs with --no-kube: this feature needs a cluster."""


class KubeError(RuntimeError):
    """A Kubernetes API call failed. `status` is the HTTP status (0: no answer at all)."""

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(f"{status} {reason}{': ' + detail if detail else ''}")
        self.status = status
        self.reason = reason
        self.detail = detail

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def too_many_requests(self) -> bool:  # e.g. an eviction refused by a PodDisruptionBudget
        return self.status == 429


class Kube:
    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.coordination = client.CoordinationV1Api(api_client)

    @classmethod
    def connect(cls, kubeconfig: Path | None, in_cluster: bool) -> Kube:
        """From a kubeconfig file, or the pod's service account (in-cluster)."""
        if in_cluster:
            config.load_incluster_config()
            return cls(client.ApiClient())
        configuration = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig) if kubeconfig else None,
                                client_configuration=configuration)
        return cls(client.ApiClient(configuration))

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one blocking client call in a thread (asyncio's default executor); raise KubeError
        on failure."""
        return await self.call_in(None, fn, *args, **kwargs)

    async def call_in(self, executor: Executor | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`call` on the threads of `executor` (None: the default executor). The leader's Lease
        calls have their own, so that a burst of other blocking calls (pod deletions, database
        reads) queued on the default one cannot hold a renewal past its deadline."""
        try:
            if executor is None:
                return await asyncio.to_thread(fn, *args, **kwargs)
            context = contextvars.copy_context()
            return await asyncio.get_running_loop().run_in_executor(
                executor, functools.partial(context.run, fn, *args, **kwargs))
        except ApiException as exc:
            raise KubeError(int(exc.status or 0), str(exc.reason or "error"), _short(exc.body)) from None
        except (HTTPError, OSError) as exc:
            raise KubeError(0, "API server unreachable", str(exc)[:300]) from None

    def close(self) -> None:
        self.api_client.close()


def _short(body: object) -> str:
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
    return text[:300]
