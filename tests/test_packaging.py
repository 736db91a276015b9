"""What `pip install kgpu` brings, and what each side imports.

A bare install pulls no mock, no test library, no Kubernetes client and no database driver; the
`edge` extra adds only NVML's bindings and gRPC (the kubelet device-plugin API), so an edge image carries neither kubernetes, alembic,
psycopg nor kmock; the lab (kgpu/lab/: demo, tests, benchmarks) comes with the `lab` extra, and
the product never imports it. The requirements are read from pyproject.toml (what the wheel's
metadata is made of) and, when the editable install is current, from the installed metadata.
The import checks run in fresh interpreters, some with the cloud's and the lab's libraries made
unimportable, as on a node that installed only `kgpu[edge]`.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from kgpu.lab.processes import free_port, http_json, wait_for

ROOT = Path(__file__).resolve().parents[1]

# Never in a bare install
MOCK_AND_TEST = {"kmock", "amqtt", "hypothesis", "schemathesis", "playwright", "kubernetes-validate"}
CLUSTER_AND_DATABASE = {"kubernetes", "alembic", "psycopg"}
# Libraries only the cloud side and the lab import: blocked where a check plays an edge-only node
NOT_ON_AN_EDGE = ["kubernetes", "alembic", "psycopg", "kmock", "amqtt"]


def _name(requirement: Requirement) -> str:
    return re.sub(r"[-_.]+", "-", requirement.name).lower()


def _resolve(requirements: list[Requirement], extras: tuple[str, ...]) -> set[str]:
    """The names `pip install kgpu[extras]` asks for, following kgpu's extras that name kgpu itself."""
    names: set[str] = set()
    wanted, seen = list(extras), set()
    base = True
    while base or wanted:
        extra = None if base else wanted.pop()
        base = False
        if extra in seen:
            continue
        seen.add(extra)
        for r in requirements:
            applies = r.marker is None if extra is None else (
                r.marker is not None and r.marker.evaluate({"extra": extra}))
            if not applies:
                continue
            if _name(r) == "kgpu":
                wanted.extend(r.extras)
            else:
                names.add(_name(r))
    return names


def _from_pyproject() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = [Requirement(r) for r in project["dependencies"]]
    for extra, listed in project["optional-dependencies"].items():
        found += [Requirement(f"{r}; extra == '{extra}'") for r in listed]
    return found


def _sources() -> list[tuple[str, list[Requirement]]]:
    sources = [("pyproject.toml", _from_pyproject())]
    try:
        installed = [Requirement(r) for r in importlib.metadata.requires("kgpu") or []]
    except importlib.metadata.PackageNotFoundError:
        return sources
    current = {(_name(r), str(r.specifier), str(r.marker)) for r in installed}
    wanted = {(_name(r), str(r.specifier), str(r.marker).replace("'", '"')) for r in sources[0][1]}
    if current == wanted:
        sources.append(("the installed metadata", installed))
    return sources


@pytest.mark.parametrize(("where", "requirements"), _sources(), ids=lambda v: v if isinstance(v, str) else "")
def test_a_bare_install_pulls_no_mock_test_library_cluster_client_or_database_driver(
        where: str, requirements: list[Requirement]) -> None:
    core = _resolve(requirements, ())
    assert not core & (MOCK_AND_TEST | CLUSTER_AND_DATABASE), (where, core)
    assert not any(n.startswith("pytest") for n in core), (where, core)
    assert {"paho-mqtt", "pydantic", "sqlalchemy", "aiohttp"} <= core, (where, core)  # both sides use them

    edge = _resolve(requirements, ("edge",))
    assert edge - core == {"nvidia-ml-py", "grpcio", "protobuf"}, (where, edge - core)
    cloud = _resolve(requirements, ("cloud",))
    assert cloud - core == CLUSTER_AND_DATABASE, (where, cloud - core)
    assert _resolve(requirements, ("amd",)) - core == {"amdsmi"}, where  # AMD's bindings, nothing else
    lab = _resolve(requirements, ("lab",))  # the demo's mixed fleet runs simulated AMD nodes
    assert lab - core == {"nvidia-ml-py", "grpcio", "protobuf", "amdsmi", "kmock", "amqtt"} | CLUSTER_AND_DATABASE, (
        where, lab - core)
    assert _resolve(requirements, ("demo",)) == lab, where
    test = _resolve(requirements, ("test",))
    assert lab < test and {"pytest", "pytest-asyncio", "pytest-timeout", "hypothesis", "kubernetes-validate",
                           "playwright", "schemathesis"} <= test, (where, test - lab)
    for r in requirements:  # every requirement has a lower bound
        assert _name(r) == "kgpu" or any(s.operator == ">=" for s in r.specifier), (where, str(r))


def _blocked(block: list[str]) -> str:
    """Python code that makes the top-level modules in `block` unimportable, as if not installed."""
    return textwrap.dedent(f"""
        import importlib.abc, sys
        BLOCKED = {sorted(block)!r}
        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (not installed here)", name=name)
        sys.meta_path.insert(0, Blocker())
    """)


def _python(code: str, *, block: tuple[str, ...] | list[str] = (), timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`code` in a fresh interpreter where the modules in `block` cannot be imported."""
    return subprocess.run([sys.executable, "-c", _blocked(list(block)) + textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_the_product_never_imports_the_lab_or_a_mock() -> None:
    shared = sorted(f"shared.{p.stem}" for p in (ROOT / "shared").glob("*.py") if p.stem != "__init__")
    run = _python(f"""
        import importlib, sys
        for module in ["edge.main", "kgpu.cli", "shared", *{shared!r}]:
            importlib.import_module(module)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("kmock", "amqtt") or m.startswith("kgpu.lab"))
        print("LEAKED", leaked)
    """)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "LEAKED []" in run.stdout, run.stdout


def test_the_edge_side_imports_without_the_cloud_or_the_lab() -> None:
    run = _python("""
        import edge.main, edge.daemon, kgpu.cli
        print("OK")
    """, block=NOT_ON_AN_EDGE)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]


def test_the_lab_commands_name_the_extra_they_need() -> None:
    run = _python("""
        import sys
        sys.argv = ["kgpu", "demo"]
        from kgpu.cli import main
        main()
    """, block=["kmock", "amqtt"])
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr[-3000:]
    assert "needs the lab extra" in lines[0] and "pip install 'kgpu[lab]'" in lines[0] and "kmock" in lines[0]


@pytest.mark.parametrize(("argv", "blocked", "extra"), [
    (["cloud", "run", "--no-kube", "--db", "sqlite:///{tmp}/fleet.db"], ["alembic"], "cloud"),
    (["cloud", "run", "--no-kube", "--db", "sqlite:///{tmp}/fleet.db"], ["kubernetes"], "cloud"),
    (["edge", "run", "--backend", "sim", "--db", "{tmp}/edge.db"], ["pynvml"], "edge"),
])
def test_the_server_commands_name_the_extra_they_need(tmp_path: Path, argv: list[str], blocked: list[str],
                                                      extra: str) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    run = _python(f"""
        import sys
        sys.argv = ["kgpu", *{args!r}]
        from kgpu.cli import main
        main()
    """, block=blocked)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr[-3000:]
    assert f"needs the {extra} extra ({blocked[0]} is missing)" in lines[0], lines[0]
    assert f"pip install 'kgpu[{extra}]'" in lines[0], lines[0]


@pytest.mark.slow
def test_kgpu_edge_run_serves_with_only_the_core_and_the_edge_extra(tmp_path: Path) -> None:
    port = free_port()
    code = f"""
        sys.argv = ["kgpu", "edge", "run", "--node", "edge-only", "--backend", "sim", "--sim-gpus", "2",
                    "--db", {str(tmp_path / "edge.db")!r}, "--http", "127.0.0.1:{port}", "--interval", "1"]
        from kgpu.cli import main
        main()
    """
    log = tmp_path / "edge.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", _blocked(NOT_ON_AN_EDGE) + textwrap.dedent(code)], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        def gpus() -> list[dict[str, object]] | None:
            assert proc.poll() is None, log.read_text()[-3000:]
            status, body = http_json("GET", f"http://127.0.0.1:{port}/api/v1/gpus", timeout=2)
            return body["gpus"] if status == 200 else None

        assert len(wait_for(gpus, timeout=60, interval=0.2, what="the edge's GPUs", ignore=(OSError,))) == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in log.read_text(), log.read_text()[-3000:]
