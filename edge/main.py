"""`kgpu edge run`: build the daemon from settings, serve HTTP, stop cleanly on SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import signal

from aiohttp import web

from edge.api import make_app
from edge.config import EdgeSettings
from edge.daemon import EdgeDaemon
from shared.logs import get_logger

log = get_logger(__name__)


def install_backend(settings: EdgeSettings):  # -> SimulatedNvml | None
    """With `--backend sim`, put the simulated libnvidia-ml in place before anything calls NVML."""
    if settings.backend != "sim":
        return None
    from edge import sim

    return sim.install(settings.sim_gpus, settings.sim_model, permissions=settings.sim_permissions)


async def serve(settings: EdgeSettings, *, ready: asyncio.Event | None = None) -> None:
    simulated = install_backend(settings)
    daemon = EdgeDaemon(settings, sim=simulated)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    await daemon.start()
    runner = web.AppRunner(make_app(daemon), access_log=None)
    await runner.setup()
    host, port = settings.http_address
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        log.error("cannot listen on %s: %s", settings.http, exc.strerror)
        await daemon.stop()
        raise SystemExit(1) from None
    log.info("HTTP API listening", extra={"http": settings.http})
    if ready is not None:
        ready.set()
    sync_task = None
    if settings.mqtt:
        from edge.sync import EdgeSync

        sync_task = asyncio.create_task(EdgeSync(daemon, settings).run(stop), name="sync")
    try:
        await daemon.run(stop)
    finally:
        if sync_task is not None:
            await asyncio.gather(sync_task, return_exceptions=True)
        log.info("stopping")
        await runner.cleanup()
        await daemon.stop()
        if simulated is not None:
            simulated.uninstall()
