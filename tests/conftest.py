from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from edge.sim.nvml.mig_state import PERSISTED_MIG_MODE
from tests.helpers.edge_process import EdgeProcess
from tests.helpers.pod_list import PodListServer
from tests.helpers.postgres import create_database, drop_database, pg_url  # noqa: F401  (pg_url: fixture)

if TYPE_CHECKING:
    from kgpu.lab.broker import Mosquitto, RabbitMQ, RabbitVhost
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


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh fleet database per test on each backend: a SQLite file in `tmp_path`, and a new
    database on the session's PostgreSQL server (skips when PostgreSQL is not installed)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
        return
    url = create_database(request.getfixturevalue("pg_url"))
    yield url
    drop_database(url)


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


# The broker matrix: these tests (file, function) run on mosquitto and on RabbitMQ's MQTT plugin,
# a broker that differs where brokers differ most (retained messages and wildcards, $share, dots in
# topics; docs/broker.md section 8). They are the ones about online/offline, telemetry, an outage
# delivered once, the last will and the retained policy, and touch the broker only through
# `url`, `stop()` and `start()`. New broker tests take the `rabbitmq` fixture directly.
BROKER_MATRIX = {
    ("test_sync.py", "test_events_status_and_telemetry_reach_the_cloud"),
    ("test_sync.py", "test_broker_down_for_a_while_edge_keeps_deciding_then_replays"),
    ("test_sync.py", "test_last_will_marks_a_killed_edge_offline"),
    ("test_sync.py", "test_policy_from_the_cloud_applies_caches_and_survives_restart_offline"),
    ("test_mqtt_link.py", "test_last_will_marks_a_dead_client"),
}
BROKERS = ("mosquitto", "rabbitmq")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run the BROKER_MATRIX tests once per broker (test ids `[mosquitto]`, `[rabbitmq]`)."""
    if "broker" in metafunc.fixturenames and (
            Path(metafunc.definition.fspath).name, metafunc.function.__name__) in BROKER_MATRIX:
        metafunc.parametrize("broker", BROKERS, indirect=True)


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQ]:
    """One real RabbitMQ (MQTT plugin) for the whole session: it takes seconds to start. Give each
    test its own virtual host (`rabbitmq.vhost()`), as the `broker` fixture does."""
    from kgpu.lab.broker import RabbitMQ, rabbitmq_binary

    if rabbitmq_binary() is None:
        pytest.skip("RabbitMQ not installed (scripts/test.sh installs Debian's rabbitmq-server package)")
    server = RabbitMQ(tmp_path_factory.mktemp("rabbitmq")).start()
    yield server
    server.stop()


@pytest.fixture
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Mosquitto | RabbitVhost]:
    """A real mosquitto on a free loopback port, for one test; for the BROKER_MATRIX tests also
    a virtual host of its own on the session's RabbitMQ (`stop()` takes it away, `start()` gives
    it back empty)."""
    from kgpu.lab.broker import Mosquitto, mosquitto_binary

    if getattr(request, "param", "mosquitto") == "rabbitmq":
        vhost = request.getfixturevalue("rabbitmq").vhost()
        yield vhost
        vhost.stop()
        return
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


# pytest-xdist (scripts/test.sh) runs the fault tests in worker processes: their rows travel to the
# controller, which prints the table, in the test report's user_properties.
_FAULT_ROWS_FROM = pytest.StashKey[int]()


def pytest_runtest_setup(item: pytest.Item) -> None:
    from tests.helpers import fault_report

    item.stash[_FAULT_ROWS_FROM] = len(fault_report.ROWS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    if call.when != "teardown" or not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    from tests.helpers import fault_report

    rows = fault_report.ROWS[item.stash.get(_FAULT_ROWS_FROM, len(fault_report.ROWS)):]
    if rows:
        outcome.get_result().user_properties.append(("fault_rows", [dataclasses.asdict(r) for r in rows]))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    from tests.helpers import fault_report

    for name, rows in report.user_properties:
        if name == "fault_rows":
            fault_report.ROWS.extend(fault_report.Row(**row) for row in rows)


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


@pytest.fixture(autouse=True)
def _mig_mode_forgotten_between_tests() -> Iterator[None]:
    """The simulated driver keeps a board's MIG mode across a 'reboot' (a new simulated library in
    the same process), as real A100/H100 boards do; one test's boards must not carry it into the next."""
    yield
    PERSISTED_MIG_MODE.clear()
