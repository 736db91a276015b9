"""Run `kgpu edge run` as a real process for end-to-end tests, and talk to it over HTTP (ports, waits
and HTTP calls from the lab: kgpu/lab/processes.py)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, Self

import yaml

from kgpu.lab.processes import free_port, http_json, wait_for

# utilisation flipping across the threshold makes a decision nearly every cycle
BUSY_POLICY = {"policy": {"version": 1, "powerSaving": {"enabled": True, "utilizationThreshold": 50,
                                                        "capPercent": 60, "sustainPeriod": 0}},
               "ack_timeout": 3, "status_interval": 2}


def edge_seqs(edge: EdgeProcess) -> int:
    """The last seq the edge's outbox assigned (read from its database)."""
    with sqlite3.connect(edge.db) as conn:
        return int(conn.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()[0])


def outbox_depth(edge: EdgeProcess) -> int:
    """Events in the edge's outbox not yet acked by the cloud (read from its database)."""
    with sqlite3.connect(edge.db) as conn:
        return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])


class EdgeProcess:
    def __init__(self, workdir: Path, *, node: str = "edge-test", gpus: int = 2, model: str = "H100",
                 config: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                 mqtt: str | None = None) -> None:
        self.workdir = workdir
        self.node = node
        self.port = free_port()
        self.db = workdir / "edge.db"
        self.log_path = workdir / f"edge-{self.port}.log"
        self.config_path = workdir / "edge.yaml"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(config or {}))
        self.args = [
            sys.executable, "-m", "kgpu", "edge", "run", "--node", node, "--backend", "sim",
            "--sim-gpus", str(gpus), "--sim-model", model, "--db", str(self.db),
            "--http", f"127.0.0.1:{self.port}", "--interval", "1", "--config", str(self.config_path),
        ]
        if mqtt is not None:
            self.args += ["--mqtt", mqtt]
        self.env = {**os.environ, "KGPU_LOG_JSON": "true", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.token: str | None = None  # sent as a bearer token with every request

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> Self:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        wait_for(self._up, timeout=timeout, interval=0.05, what=f"edge daemon on :{self.port} (log {self.log_path})")
        return self

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"edge daemon exited with {self.proc.returncode}:\n{self.log()}")
        try:
            self.request("GET", "/healthz")
            return True
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 20.0) -> Self:
        """Until /healthz answers 200: `start()` returns once the server answers at all, which
        can be before the MQTT link is up."""
        wait_for(lambda: self.request("GET", "/healthz")[0] == 200, timeout=timeout,
                 what=f"/healthz 200 on :{self.port} (log {self.log_path})")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """One HTTP request; with `Authorization: Bearer <token>` when the process has a token."""
        sent = {"Authorization": f"Bearer {self.token}"} if self.token is not None else {}
        return http_json(method, self.base + path, body, raw=raw, headers={**sent, **(headers or {})}, timeout=10)

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        assert status == 200, (status, body)
        return body

    def metric(self, name: str, **labels: str) -> float:
        """One sample from /metrics (0.0 when absent, as a counter that never counted)."""
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.get("/metrics")):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    def inject(self, index: int, **fault: Any) -> Any:
        status, body = self.request("POST", f"/api/v1/sim/gpus/{index}", fault)
        assert status == 200, (status, body)
        return body

    def gpu(self, index: int) -> dict[str, Any]:
        return self.get("/api/v1/gpus")["gpus"][index]

    def decisions(self, **query: Any) -> list[dict[str, Any]]:
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        return self.get(f"/api/v1/decisions?{qs}")["decisions"]

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)
        self._log.close()
