"""The partitioning read API: `GET /api/v1/partitioning` (every object and every node's resolved
partitioning) and `GET /api/v1/nodes/{node}/partitioning`. Read only: the `GPUPartitioning`
objects are written with kubectl."""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web

from cloud.partitioning.resolution import Resolution
from shared.http import json_error
from shared.topics import NODE_NAME_RE


class Partitioning(Protocol):
    """What the routes use of the part (cloud/partitioning/manager.py)."""

    @property
    def source(self) -> str: ...

    async def view(self) -> Resolution: ...

    def node_out(self, resolution: Resolution, node: str) -> dict[str, Any]: ...


def add_routes(app: web.Application, part: Partitioning) -> None:
    async def overview(_: web.Request) -> web.Response:
        resolution = await part.view()
        objects = [{"name": o.name, "generation": o.generation, "valid": True, "reason": None,
                    "priority": o.spec.priority, "node_selector": dict(o.spec.node_selector)}
                   for o in resolution.valid.values()]
        objects += [{"name": o.name, "generation": o.generation, "valid": False, "reason": o.reason,
                     "priority": None, "node_selector": None} for o in resolution.invalid.values()]
        return web.json_response({
            "source": part.source, "objects": sorted(objects, key=lambda o: o["name"]),
            "nodes": [part.node_out(resolution, node) for node in sorted(resolution.nodes)]})

    async def node(request: web.Request) -> web.Response:
        name = request.match_info["node"]
        resolution = await part.view()
        if not NODE_NAME_RE.match(name) or name not in resolution.nodes:
            return json_error(404, "no such node for partitioning", name)
        return web.json_response(part.node_out(resolution, name))

    app.router.add_get("/api/v1/partitioning", overview)
    app.router.add_get("/api/v1/nodes/{node}/partitioning", node)
