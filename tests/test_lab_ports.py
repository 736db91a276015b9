"""kgpu/lab/processes.py `free_port`: the test workers run in parallel processes, and a port one
of them hands out must not be handed out by another while it runs (a broker found its port taken
in CI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kgpu.lab.processes import PORT_CLAIMS, free_port

ROOT = Path(__file__).resolve().parents[1]
# picks 200 ports, says which, and stays until told to go (its claims go with it)
PICK = ("import sys\nfrom kgpu.lab.processes import free_port\n"
        "print(' '.join(str(free_port()) for _ in range(200)), flush=True)\nsys.stdin.read()")


def test_ports_handed_out_by_parallel_processes_never_repeat_and_go_with_their_process() -> None:
    """Three processes pick 200 ports each at the same time: by chance alone (12,000 ports) some
    would repeat almost every time; the claims in PORT_CLAIMS keep them apart."""
    children = [subprocess.Popen([sys.executable, "-c", PICK], cwd=ROOT, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True) for _ in range(2)]
    mine = [free_port() for _ in range(200)]
    theirs: list[int] = []
    for child in children:
        assert child.stdout is not None
        theirs += [int(port) for port in child.stdout.readline().split()]
    every = mine + theirs
    assert len(every) == 600 and len(set(every)) == 600
    assert all((PORT_CLAIMS / str(port)).exists() for port in every)
    for child in children:
        child.communicate(timeout=60)  # closes its stdin: it leaves
        assert child.returncode == 0
    assert not any((PORT_CLAIMS / str(port)).exists() for port in theirs)  # released as they exited
    assert all((PORT_CLAIMS / str(port)).exists() for port in mine)
