"""`python -m kgpu ARGS` as an operator runs it, for the tests: in a subprocess, with none of the
test runner's own KGPU_* variables (so no stray setting or config file reaches it) and a fixed
terminal width (tables are sized to it)."""

from __future__ import annotations

import os
import subprocess
import sys


def clean_env(env: dict[str, str] | None = None, columns: int = 80) -> dict[str, str]:
    """This process's environment without KGPU_*, with COLUMNS and then `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KGPU_")}
    return {**clean, "COLUMNS": str(columns), **(env or {})}


def run_kgpu(*args: str, env: dict[str, str] | None = None, columns: int = 80,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kgpu", *args], capture_output=True, text=True, timeout=timeout,
                          env=clean_env(env, columns), check=False)
