"""kgpu as the node's device plugin: the kubelet device-plugin API v1beta1 over unix sockets.

- `devices`: what the daemon hands in (`PluginDevice`, `DeviceSource`) and the API's constants;
- `allocation`: the pure decisions (Allocate's environment and CDI names, preferred allocation);
- `server`: one DevicePlugin gRPC service for one resource name, on its socket;
- `manager`: `DevicePluginManager`, serving one socket per resource, registering each with the
  kubelet, and serving and registering again when the kubelet restarts;
- `v1beta1`: the stubs generated from `proto/api.proto` (scripts/gen_protos.sh).

`DevicePluginManager` is importable from here, but only loaded when asked for: the daemon imports
`devices` always (the partition manager builds PluginDevices), grpc only with --device-plugin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge.deviceplugin.manager import DevicePluginManager

__all__ = ["DevicePluginManager"]


def __getattr__(name: str) -> Any:
    if name == "DevicePluginManager":
        from edge.deviceplugin.manager import DevicePluginManager

        return DevicePluginManager
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
