from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.helpers.edge_process import EdgeProcess
from tests.helpers.pod_list import PodListServer

if TYPE_CHECKING:
    from kgpu.lab.broker import Mosquitto
    from kgpu.lab.kube import KubeEmulator


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


@pytest.fixture(scope="session")
def promtool() -> str:
    """Prometheus' promtool (its linter and rule tester), or a skip that says how to get it."""
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (scripts/test.sh installs Debian's prometheus package)")
    return path


@pytest.fixture
def pod_list_server() -> Iterator[PodListServer]:
    """The kubelet's pod list on loopback; set `.body` to what it lists, give `.url` to the edge."""
    with PodListServer() as server:
        yield server


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real mosquitto on a free loopback port, for one test."""
    from kgpu.lab.broker import Mosquitto, mosquitto_binary

    if mosquitto_binary() is None:
        pytest.skip("mosquitto not installed (scripts/test.sh installs Debian's mosquitto package)")
    server = Mosquitto(tmp_path / "broker").start()
    yield server
    server.stop()


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[KubeEmulator]:
    """An emulated Kubernetes API server on loopback (kmock), with a kubeconfig file for it."""
    from kgpu.lab.kube import KubeEmulator

    emulator = KubeEmulator(tmp_path / "kube")
    yield emulator
    emulator.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    """The fault tests' table of what was tried and what was lost (tests/helpers/fault_report.py),
    also written to faults.txt under the pytest basetemp."""
    from tests.helpers import fault_report

    if not fault_report.ROWS:
        return
    terminalreporter.section("faults tried, events lost")
    for line in fault_report.render().splitlines():
        terminalreporter.write_line(line)
    factory = getattr(config, "_tmp_path_factory", None)  # what the tmp_path fixtures use
    if factory is not None:
        terminalreporter.write_line(f"(written to {fault_report.write(factory.getbasetemp())})")
