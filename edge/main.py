"""`kgpu edge run`: build the daemon from settings, serve HTTP, stop cleanly on SIGINT/SIGTERM,
within `shutdown_timeout` seconds (the outbox is on disk at every commit; what a stop cut short
loses is only what was still held in memory, and it is logged).

What stops the start is said in one line on stderr (`kgpu: ...`) with exit status 1, no traceback:
the HTTP port is taken; `--backend auto` finds no accelerator (the line says what each probe found);
a vendor backend (or its simulation) that is not installed. `--backend nvml` without an NVML
library does not stop it: the daemon serves its API without GPUs (`/healthz` 503,
`kgpu_driver_up 0`) and retries, as it does when the driver goes away later (a driver loaded after
the daemon, a GPU in reset); the missing library is said once at the start, with the hint to run
`--backend sim` where there is no GPU. A database that cannot be opened does not stop it either: it
enforces on a temporary store and says why (edge/store/recovery.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Any, NoReturn

from aiohttp import web

from edge.api import make_app
from edge.config import EdgeSettings
from edge.daemon import EdgeDaemon
from edge.devices.base import DeviceBackend
from edge.devices.select import BackendNotFound, install_sim, make_backend, resolve
from shared.logs import get_logger

log = get_logger(__name__)


def install_backend(settings: EdgeSettings) -> Any:
    """With `--backend sim`, put the simulation of `--sim-model` in place before anything calls the
    device interface (the simulated libnvidia-ml, or a vendor's simulated interface); else None."""
    if settings.backend != "sim":
        return None
    return install_sim(settings)


def choose_backend(settings: EdgeSettings) -> tuple[Any, DeviceBackend]:
    """The simulation (with `--backend sim`) and the device backend; BackendNotFound says why none."""
    name = resolve(settings)  # `auto` probes the node here
    simulated = install_backend(settings)
    try:
        return simulated, make_backend(settings, simulated, backend=name)
    except BaseException:
        if simulated is not None:
            simulated.uninstall()
        raise


def fail(message: str, code: int = 1) -> NoReturn:
    """Say why in one line on stderr, as the CLI says configuration errors, and exit with `code`."""
    print(f"kgpu: {message}", file=sys.stderr, flush=True)
    logging.shutdown()
    raise SystemExit(code)


NO_NVML_HINT = ("is the NVIDIA driver installed (in a container: does the NVIDIA container toolkit give it "
                "libnvidia-ml.so.1)? The daemon runs without GPUs and retries; to try kgpu without a GPU, "
                "run with --backend sim")


def missing_nvml(settings: EdgeSettings) -> str | None:
    """With `--backend nvml`, why the NVML library cannot be loaded at all; None when it loads (or
    fails only later: a driver not answering yet is the daemon's to retry)."""
    if settings.backend != "nvml":
        return None
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound as exc:
        return str(exc)
    except pynvml.NVMLError:
        return None
    pynvml.nvmlShutdown()
    return None


def listen_problem(settings: EdgeSettings, exc: OSError) -> str:
    """One line for a port that cannot be bound (taken, or a privileged port, or no such address)."""
    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    return (f"cannot listen on {settings.http} for the HTTP API: {reason} (another kgpu edge or exporter on "
            "that port?); choose another with --http HOST:PORT")


async def serve(settings: EdgeSettings, *, ready: asyncio.Event | None = None) -> None:
    # first: a SIGTERM while the backend or the store is still being opened stops the daemon
    # cleanly once it is up, instead of killing it half-made (the store's recovery logs first)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    absent = await asyncio.to_thread(missing_nvml, settings)
    if absent is not None:  # said once here; the daemon's retries say only what changes
        log.error("--backend nvml: the NVML library cannot be loaded (%s): %s", absent, NO_NVML_HINT)
    try:
        simulated, backend = await asyncio.to_thread(choose_backend, settings)
    except BackendNotFound as exc:
        fail(str(exc))
    log.info("device backend: %s (%s, resource %s)", backend.backend, backend.vendor,
             settings.resource_name or backend.resource_name, extra={"backend": backend.backend})
    daemon = EdgeDaemon(settings, sim=simulated, backend=backend)

    await daemon.start()
    runner = web.AppRunner(make_app(daemon), access_log=None)
    await runner.setup()
    host, port = settings.http_address
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await daemon.stop()
        if simulated is not None:
            simulated.uninstall()
        fail(listen_problem(settings, exc))
    log.info("HTTP API listening", extra={"http": settings.http})
    if port == 0 and runner.addresses:  # the port the system chose: the ladder's commands reach it
        daemon.remediation.set_api_url(f"http://127.0.0.1:{runner.addresses[0][1]}")
    if ready is not None:
        ready.set()
    sync_task = None
    if settings.mqtt:
        from edge.sync import EdgeSync

        sync_task = asyncio.create_task(EdgeSync(daemon, settings).run(stop), name="sync")
    plugin_task = None
    if settings.device_plugin:
        from edge.deviceplugin import DevicePluginManager

        plugin = DevicePluginManager(daemon.partitions, settings.kubelet_dir)
        plugin_task = asyncio.create_task(plugin.run(stop), name="device-plugin")
    run_task = asyncio.create_task(daemon.run(stop), name="daemon")
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([run_task, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        stop.set()
        # the bound starts with the signal: a cycle stuck on a dead disk is inside it too
        await shut_down(daemon, runner, [run_task, sync_task, plugin_task], simulated, settings.shutdown_timeout)
    if run_task.done() and not run_task.cancelled() and run_task.exception() is not None:
        raise run_task.exception()  # type: ignore[misc]


async def shut_down(daemon: EdgeDaemon, runner: web.AppRunner, tasks: list[asyncio.Task[None] | None],
                    simulated: Any, timeout_s: float) -> None:
    """Let the loop and the sync end, stop the HTTP server and the daemon, all within `timeout_s`;
    past it, say what is lost and exit at once (a thread stuck on a dead disk or driver would
    otherwise hold the process for good)."""

    async def steps() -> None:
        await asyncio.gather(*(task for task in tasks if task is not None), return_exceptions=True)
        log.info("stopping")
        await runner.cleanup()
        await daemon.stop()
        if simulated is not None:
            simulated.uninstall()

    try:
        await asyncio.wait_for(steps(), timeout_s)
    except TimeoutError:
        log.error("shutdown took longer than %g s (shutdown_timeout); exiting now. Every event in the outbox "
                  "is on disk and is sent after the restart; %d events held in memory (never written: the "
                  "store was failing) are lost", timeout_s, daemon.held_events)
        logging.shutdown()
        os._exit(1)
