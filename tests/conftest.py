from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.helpers.edge_process import EdgeProcess


@pytest.fixture
def edge_factory(tmp_path: Path) -> Iterator[Callable[..., EdgeProcess]]:
    """Start real `kgpu edge run --backend sim` processes; all are stopped at the end."""
    started: list[EdgeProcess] = []

    def start(**kwargs: Any) -> EdgeProcess:
        workdir = tmp_path / f"edge{len(started)}"
        workdir.mkdir()
        process = EdgeProcess(workdir, **kwargs)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        if process.proc is not None and process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait(timeout=10)
