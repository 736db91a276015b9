"""A real Prometheus (Debian's `prometheus` binary) for the tests: written a config, started on a
free loopback port with its storage in the caller's directory, and waited for until its API
answers. One starter for every test that scrapes kgpu or evaluates its rules and dashboards."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from kgpu.lab.processes import Child, LabError, free_port, get_json, wait_for, wait_listening

PROMETHEUS = shutil.which("prometheus")


def start_prometheus(workdir: Path, config: dict[str, Any], *, name: str = "prometheus",
                     files: dict[str, str] | None = None) -> tuple[int, Child]:
    """Prometheus on `config` (with `files`, e.g. rule files it names, written beside it); returns
    its port and its process (stop it when done). Raises LabError if it exits, with its log."""
    if PROMETHEUS is None:
        raise LabError("prometheus is not installed (Debian's prometheus package; scripts/test.sh installs it)")
    workdir.mkdir(parents=True, exist_ok=True)
    for file_name, text in (files or {}).items():
        (workdir / file_name).write_text(text)
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    child = Child(name, [PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}",
                         f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                  workdir / "prometheus.log").start()

    def ready() -> Any:
        if not child.alive():  # e.g. a rules file it refuses: the log says why
            raise LabError(f"prometheus exited: {child.log_tail()}")
        return get_json(f"http://127.0.0.1:{port}/api/v1/status/runtimeinfo")

    try:
        wait_listening(child, port, timeout=30)
        wait_for(ready, timeout=30, ignore=(OSError, ValueError), what="Prometheus to answer")
    except BaseException:
        child.stop()
        raise
    return port, child
