"""`DevicePluginManager`: kgpu's GPUs as kubelet device-plugin resources.

One `PluginSocket` per resource name found in the source's devices (nvidia.com/gpu, a shared
resource for time-slicing, nvidia.com/mig-<profile>...), each with a task that keeps it served
and registered:

- serve first, then register at DIR/kubelet.sock (the kubelet dials back during Register);
- while kubelet.sock is absent or Register fails, retry with a backoff capped at `retry_max_s`;
- every `watch_interval_s`, check our socket file: the kubelet deletes every socket in DIR when
  it restarts, so a missing (or replaced) file means serve a fresh one and register again; a
  replaced kubelet.sock alone also means register again;
- a resource that appears gets a socket; one that disappears (a MIG layout change) has its
  streams ended and its socket removed; on stop every socket of ours is removed.

Device changes reach the kubelet through the open ListAndWatch streams as soon as the source's
`changed` event is set, healthy again included: nothing restarts for that. `source.devices()` is
called on the loop and must not block (the daemon keeps the list in memory).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from edge.deviceplugin.devices import DeviceSource, PluginDevice, by_resource
from edge.deviceplugin.server import PluginSocket, ResourceService
from shared.aio import wait_event
from shared.logs import get_logger

log = get_logger(__name__)


@dataclass
class _Plugin:
    socket: PluginSocket
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    registered: bool = False
    task: asyncio.Task[None] | None = None


class DevicePluginManager:
    def __init__(self, source: DeviceSource, kubelet_dir: Path, *, watch_interval_s: float = 1.0,
                 retry_min_s: float = 0.5, retry_max_s: float = 5.0) -> None:
        self._source = source
        self.kubelet_dir = Path(kubelet_dir).absolute()
        self._watch_interval_s = watch_interval_s
        self._retry_min_s = retry_min_s
        self._retry_max_s = retry_max_s
        self._plugins: dict[str, _Plugin] = {}

    def state(self) -> dict[str, dict[str, object]]:
        """Per resource: socket, registered, device counts (for status pages and logs)."""
        return {
            resource: {"socket": str(p.socket.path), "serving": p.socket.serving, "registered": p.registered,
                       "devices": len(p.socket.service.devices),
                       "healthy": sum(d.healthy for d in p.socket.service.devices)}
            for resource, p in self._plugins.items()
        }

    async def run(self, stop: asyncio.Event) -> None:
        log.info("device plugin manager started", extra={"kubelet_dir": str(self.kubelet_dir)})
        try:
            while not stop.is_set():
                self._source.changed.clear()  # before reading: a change from now on wakes us again
                try:
                    devices = self._source.devices()
                except Exception:  # deliberate: keep serving the last list we had
                    log.exception("cannot read the devices: the kubelet keeps the last list")
                else:
                    await self._sync(by_resource(devices))
                await _first_of(stop, self._source.changed)
        finally:
            await asyncio.gather(*(self._remove(r) for r in list(self._plugins)))
            log.info("device plugin manager stopped", extra={"kubelet_dir": str(self.kubelet_dir)})

    async def _sync(self, groups: dict[str, list[PluginDevice]]) -> None:
        for resource in [r for r in self._plugins if r not in groups]:
            log.info("resource gone: removing its device plugin", extra={"resource": resource})
            await self._remove(resource, announce_empty=True)
        for resource, devices in groups.items():
            plugin = self._plugins.get(resource)
            if plugin is None:
                plugin = _Plugin(PluginSocket(ResourceService(resource, devices), self.kubelet_dir))
                plugin.task = asyncio.create_task(self._keep_registered(plugin), name=f"device-plugin {resource}")
                self._plugins[resource] = plugin
                log.info("resource found: starting its device plugin",
                         extra={"resource": resource, "devices": [d.id for d in devices]})
            elif plugin.socket.service.update(devices):
                log.info("devices changed", extra={
                    "resource": resource,
                    "healthy": [d.id for d in devices if d.healthy],
                    "unhealthy": [d.id for d in devices if not d.healthy]})

    async def _remove(self, resource: str, *, announce_empty: bool = False) -> None:
        """Stop one resource's plugin. `announce_empty` (the resource is gone, e.g. its GPUs are now
        split by MIG): its open ListAndWatch streams first send an empty list, so the kubelet takes
        its capacity to 0 at once instead of keeping the devices as unhealthy until its grace period
        ends. Not on the daemon's own stop: a restart must not empty the node's capacity."""
        plugin = self._plugins.pop(resource)
        if announce_empty and plugin.socket.service.update([]):
            await asyncio.sleep(0.2)  # the streams are woken; let them send before they end
        plugin.stop.set()
        if plugin.task is not None:
            await plugin.task
        plugin.socket.service.close()
        await plugin.socket.close(remove=True)
        log.info("device plugin stopped, socket removed", extra={"resource": resource,
                                                                 "socket": str(plugin.socket.path)})

    async def _keep_registered(self, plugin: _Plugin) -> None:
        """Serve, register, and do both again whenever the kubelet restarts; until plugin.stop."""
        socket = plugin.socket
        resource = socket.service.resource
        backoff = self._retry_min_s
        while not plugin.stop.is_set():
            try:
                if socket.serving and not socket.socket_present():
                    log.warning("device plugin socket gone (kubelet restarted?): serving a fresh one",
                                extra={"resource": resource, "socket": str(socket.path)})
                    await socket.close(remove=False)
                    plugin.registered = False
                elif plugin.registered and socket.kubelet_replaced():
                    log.warning("kubelet socket replaced: registering again", extra={"resource": resource})
                    plugin.registered = False
                if not socket.serving:
                    await socket.serve()
                if not plugin.registered:
                    await socket.register()
                    plugin.registered = True
                    backoff = self._retry_min_s
            except (grpc.aio.AioRpcError, OSError) as exc:
                reason = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                log.warning("device plugin not registered yet, retrying",
                            extra={"resource": resource, "reason": reason, "retry_in_s": backoff})
            except Exception:  # deliberate: one resource's failure must not end its retries
                log.exception("device plugin failed, retrying", extra={"resource": resource, "retry_in_s": backoff})
            else:
                await wait_event(plugin.stop, self._watch_interval_s)
                continue
            await wait_event(plugin.stop, backoff)
            backoff = min(backoff * 2, self._retry_max_s)


async def _first_of(*events: asyncio.Event) -> None:
    """Wait until any of `events` is set."""
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
