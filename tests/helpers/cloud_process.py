"""Run `kgpu cloud run` as a real process for integration tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kgpu.lab.processes import free_port
from tests.helpers.edge_process import EdgeProcess


class CloudProcess(EdgeProcess):
    """Same HTTP helpers as EdgeProcess; a different command line.

    The controller refuses changes when no API token is configured. Given `token`, it runs with
    --api-token-file and `request()` sends the token; otherwise, unless the test configures a
    token itself (env or extra_args), it runs with --api-insecure so that tests can make changes."""

    def __init__(self, workdir: Path, mqtt: str, *, db: str | None = None, env: dict[str, str] | None = None,
                 extra_args: list[str] | None = None, kubeconfig: Path | None = None,
                 token: str | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.token = token
        auth_args: list[str] = []
        if token is not None:
            token_file = workdir / "api-token"
            token_file.write_text(token + "\n")
            auth_args = ["--api-token-file", str(token_file)]
        elif not any(k.startswith("KGPU_API_TOKEN") or k == "KGPU_API_INSECURE" for k in (env or {})) and not any(
                a.startswith("--api-token") or a == "--api-insecure" for a in (extra_args or [])):
            auth_args = ["--api-insecure"]
        self.node = "cloud"
        self.port = free_port()
        self.db_url = db or f"sqlite:///{workdir / 'fleet.db'}"
        self.log_path = workdir / f"cloud-{self.port}.log"
        self.args = [sys.executable, "-m", "kgpu", "cloud", "run", "--mqtt", mqtt, "--db", self.db_url,
                     "--http", f"127.0.0.1:{self.port}",
                     *(["--kubeconfig", str(kubeconfig)] if kubeconfig else ["--no-kube"]), *auth_args,
                     *(extra_args or [])]
        self.env = {**os.environ, "KGPU_LOG_JSON": "true", "PYTHONUNBUFFERED": "1",
                    "KGPU_MQTT_CLIENT_ID": f"kgpu-controller-test-{workdir.name}", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def node_state(self, node: str) -> dict[str, Any] | None:
        status, body = self.request("GET", f"/api/v1/nodes/{node}")
        return body if status == 200 else None

    def event_seqs(self, node: str) -> list[int]:
        events = self.get(f"/api/v1/events?node={node}&limit=10000")["events"]
        return sorted(e["seq"] for e in events)


__all__ = ["CloudProcess"]
