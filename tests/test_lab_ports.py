"""kgpu/lab/processes.py `free_port`: the test workers run in parallel processes, and a port one
of them hands out must not be handed out by another (a broker found its port taken in CI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kgpu.lab.processes import PORT_CLAIMS, free_port

ROOT = Path(__file__).resolve().parents[1]
PICK = "from kgpu.lab.processes import free_port\nprint(' '.join(str(free_port()) for _ in range(200)))"


def test_ports_handed_out_by_parallel_processes_never_repeat() -> None:
    """Three processes pick 200 ports each at the same time: by chance alone (12,000 ports) some
    would repeat almost every time; the claims in PORT_CLAIMS keep them apart."""
    children = [subprocess.Popen([sys.executable, "-c", PICK], cwd=ROOT, stdout=subprocess.PIPE, text=True)
                for _ in range(2)]
    mine = [free_port() for _ in range(200)]
    theirs = [int(port) for child in children for port in child.communicate(timeout=60)[0].split()]
    assert all(child.returncode == 0 for child in children)
    every = mine + theirs
    assert len(every) == 600 and len(set(every)) == 600
    assert all((PORT_CLAIMS / str(port)).exists() for port in every)
