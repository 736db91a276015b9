"""`kgpu demo` as a person runs it: it starts, serves simulated GPUs, and Ctrl-C stops it cleanly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request

import pytest

from tests.helpers.edge_process import free_port, wait_for

pytestmark = pytest.mark.slow


def test_demo_serves_simulated_gpus_and_stops_on_ctrl_c() -> None:
    port = free_port()
    demo = subprocess.Popen([sys.executable, "-m", "kgpu", "demo", "--gpus", "3", "--http", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def gpus() -> list | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/gpus", timeout=2) as resp:
                    return json.load(resp)["gpus"]
            except OSError:
                assert demo.poll() is None, demo.stderr.read() if demo.stderr else ""
                return None

        listed = wait_for(gpus, timeout=30, what="the demo's API")
        assert len(listed) == 3 and "H100" in listed[0]["inventory"]["name"]
    finally:
        demo.send_signal(signal.SIGINT)
        _, err = demo.communicate(timeout=20)
    assert demo.returncode == 0, err
    assert "heat up GPU 0" in err and f"127.0.0.1:{port}" in err  # it told the user what to try
    assert "Traceback" not in err
