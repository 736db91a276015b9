"""Kepler's GPU metric families on the edge's `/metrics`, read from the daemon at scrape time.

The figures come from the daemon's energy accountant (`edge/energy.py`: per GPU idle and active
energy, per pod, container and process shares) and its latest samples; the families themselves
are built by `shared/kepler.py`, which the controller can use too. A process's `comm` and `exe`
are read from `/proc/<pid>/` (the daemon runs with hostPID; `proc_root` in the settings) once per
PID and cached while the PID has a series.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from shared.kepler import KeplerContainer, KeplerGpu, KeplerPod, KeplerProcess, kepler_families

if TYPE_CHECKING:
    from edge.daemon import EdgeDaemon


class KeplerCollector(Collector):
    def __init__(self, daemon: EdgeDaemon) -> None:
        self.daemon = daemon
        self._names: dict[int, tuple[str, str]] = {}  # pid -> (comm, exe)

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        energy = d.energy
        gpus = []
        for index, view in sorted(d.gpus.items()):
            inv, sample = view.inventory, view.sample
            g = energy.gpus.get(inv.uuid)
            watts = idle = active = None
            if sample is not None and not sample.lost:
                idle = energy.idle_power_for(sample)
                if idle is not None:
                    watts = sample.power_w
                elif g is not None and g.power_w is not None:  # no reading: the interval's average
                    watts, idle = g.power_w, g.idle_power_w
                if watts is not None and idle is not None:
                    active = max(watts - idle, 0.0)
            gpus.append(KeplerGpu(
                index=index, uuid=inv.uuid, name=inv.name, vendor=inv.vendor,  # Kepler's own `vendor` label
                joules=g.joules if g else 0.0, idle_joules=g.idle_joules if g else 0.0,
                active_joules=g.active_joules if g else 0.0,
                watts=watts, idle_watts=idle, active_watts=active,
            ))
        pods = [KeplerPod(uid=k.uid, name=k.pod, namespace=k.namespace, joules=j,
                          watts=energy.kepler_pods.power_w.get(k, 0.0))
                for k, j in energy.kepler_pods.joules.items()]
        containers = [KeplerContainer(container_id=ref.container_id, name=ref.container, pod_uid=ref.pod_uid,
                                      joules=j, watts=energy.containers.power_w.get(ref, 0.0))
                      for ref, j in energy.containers.joules.items()]
        processes = []
        root = Path(d.settings.proc_root)
        live = set()
        for key, j in energy.processes.joules.items():
            live.add(key.pid)
            comm, exe = self._proc_names(root, key.pid)
            processes.append(KeplerProcess(
                pid=key.pid, comm=comm, exe=exe, joules=j, watts=energy.processes.power_w.get(key, 0.0),
                container_id=key.pod.container_id if key.pod else "",
                type="container" if key.pod else "regular",
            ))
        for pid in set(self._names) - live:
            del self._names[pid]
        yield from kepler_families(d.node, gpus, pods, containers, processes)

    def _proc_names(self, root: Path, pid: int) -> tuple[str, str]:
        """(comm, exe) of a PID, "" for what cannot be read (gone, or no permission)."""
        names = self._names.get(pid)
        if names is None:
            try:
                comm = (root / str(pid) / "comm").read_text(errors="replace").strip()
            except OSError:
                comm = ""
            try:
                exe = os.readlink(root / str(pid) / "exe")
            except OSError:
                exe = ""
            names = self._names[pid] = (comm, exe)
        return names
