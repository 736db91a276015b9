"""The kubectl-style client (`kgpu get|describe|drain|undrain|policy|rollout`, docs/cli.md) as an
operator runs it: `python -m kgpu ...` subprocesses against a real `kgpu cloud run --no-kube`
that needs its token for reads too (`--api-auth all`, as tests/test_http_auth.py sets it up), fed
by a real simulated edge over a real mosquitto. Every answer is checked against the controller's
own API, and each failure against its one-line message and exit code.

Also here, for the CLI as a whole: no flag shows a `<bool>` metavar, and `--http` takes a bare
port on every command (the controller and the edge below are started that way)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from kgpu.cli import _demo_port, app
from kgpu.client.http import EXIT_AUTH, EXIT_NOT_FOUND, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE
from kgpu.client.render import table
from kgpu.client.resources import GPU_COLUMNS, NODE_COLUMNS
from kgpu.lab.processes import free_port, wait_for
from tests.helpers.cli import clean_env, run_kgpu
from tests.helpers.cloud_process import CloudProcess
from tests.helpers.edge_process import EdgeProcess

TOKEN = "client-cli-token-0123"
NODE = "edge-client-cli-site-0042"  # long enough that an 80-column table must not cut it to `edge-…`
POLICY = """\
apiVersion: kgpu.io/v1
kind: GPUPowerPolicy
metadata:
  name: night-cap
spec:
  priority: 10
  powerSaving:
    enabled: true
    utilizationThreshold: 30
    capPercent: 70
"""


def kgpu(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m kgpu ARGS` with no KGPU_* from the outer environment, 80 columns, no config file."""
    return run_kgpu(*args, env=env, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """The failure is exactly one `kgpu: ...` line on stderr, with the exit code and the words."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kgpu: ") and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def fleet(broker: Any, tmp_path: Path) -> Any:
    cloud = CloudProcess(tmp_path / "cloud", broker.url, token=TOKEN, extra_args=["--api-auth", "all"])
    cloud.args += ["--http", str(cloud.port)]  # a bare port: every interface, as HOST:PORT would say ":PORT"
    edge = EdgeProcess(tmp_path / "edge", node=NODE, mqtt=broker.url)
    edge.args += ["--http", str(edge.port)]
    cloud.start()
    edge.start()
    wait_for(lambda: (cloud.node_state(NODE) or {}).get("gpu_summary", {}).get("healthy") == 2, timeout=60,
             what="the edge's two GPUs in the controller")
    env = {"KGPU_SERVER": cloud.base, "KGPU_TOKEN_FILE": str(cloud.workdir / "api-token")}
    yield cloud, edge, env
    edge.stop()
    cloud.stop()


def test_get_describe_drain_policies_and_errors_against_a_live_controller(fleet: Any, tmp_path: Path) -> None:
    cloud, edge, env = fleet
    gpus = cloud.get(f"/api/v1/nodes/{NODE}")["gpus"]
    watcher = subprocess.Popen([sys.executable, "-m", "kgpu", "get", "events", "-w", "--interval", "0.3"],
                               env=clean_env(env), stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    watched: list[str] = []
    threading.Thread(target=lambda: watched.extend(iter(watcher.stdout.readline, "")),  # type: ignore[union-attr]
                     daemon=True).start()

    # get nodes: a table at 80 columns with the whole node name, and JSON the same as the API's
    table = kgpu("get", "nodes", env=env)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "STATUS", "GPUS"] and all(len(line) <= 80 for line in lines), lines
    assert lines[1].split()[:3] == [NODE, "Online", "2/2"], lines
    listed = json.loads(kgpu("get", "nodes", "-o", "json", env=env).stdout)
    assert [n["name"] for n in listed] == [n["name"] for n in cloud.get("/api/v1/nodes")["nodes"]] == [NODE]

    # get gpus: YAML with every GPU and its latest sample; the table names each by node and index
    as_yaml = yaml.safe_load(kgpu("get", "gpus", "-o", "yaml", env=env).stdout)
    assert [(g["node"], g["uuid"]) for g in as_yaml] == [(NODE, g["uuid"]) for g in gpus]
    assert all(g["sample"]["temperature_c"] is not None for g in as_yaml)
    gpu_lines = kgpu("get", "gpus", env=env).stdout.splitlines()
    assert [line.split()[:2] for line in gpu_lines[1:]] == [[NODE, "0"], [NODE, "1"]], gpu_lines
    assert all(len(line) <= 80 for line in gpu_lines), gpu_lines

    # drain GPU 1 by index, wait for the edge's answer; undrain it by UUID
    drained = kgpu("drain", NODE, "1", env=env)
    assert drained.returncode == 0 and "draining GPU 1" in drained.stdout, (drained.stdout, drained.stderr)
    assert edge.gpu(1)["draining"] is True and edge.gpu(0)["draining"] is False
    undrained = kgpu("undrain", NODE, gpus[1]["uuid"], env=env)
    assert undrained.returncode == 0 and "undrained GPU 1" in undrained.stdout, (undrained.stdout, undrained.stderr)
    assert edge.gpu(1)["draining"] is False
    sent = cloud.get(f"/api/v1/commands?node={NODE}")["commands"]
    assert sorted((c["command"], c["state"]) for c in sent) == [("drain", "done"), ("undrain", "done")]
    events = json.loads(kgpu("get", "events", "--kind", "command_result", "-o", "json", env=env).stdout)
    assert sorted(e["body"]["command"] for e in events) == ["drain", "undrain"]
    try:  # `get events -w`, started before the drain, printed both answers as they came, and goes on
        wait_for(lambda: sum("command_result" in line for line in watched) == 2, timeout=60,
                 what=f"both command_result events in `kgpu get events -w` (saw {watched})")
        assert any("undrain" in line for line in watched) and watcher.poll() is None
    finally:
        watcher.terminate()
        watcher.wait(timeout=10)

    # policy apply: created, then configured; a bad one is the controller's field errors on one line
    (tmp_path / "policy.yaml").write_text(POLICY)
    first = kgpu("policy", "apply", "-f", str(tmp_path / "policy.yaml"), env=env)
    assert first.returncode == 0 and first.stdout.strip().startswith("gpupowerpolicy/night-cap created"), first
    again = kgpu("policy", "apply", "-f", str(tmp_path / "policy.yaml"), env=env)
    assert again.stdout.strip().startswith("gpupowerpolicy/night-cap configured"), again
    (tmp_path / "bad.yaml").write_text(POLICY.replace("capPercent: 70", "capPercent: 700"))
    one_line_error(kgpu("policy", "apply", "-f", str(tmp_path / "bad.yaml"), env=env), EXIT_REFUSED,
                   "invalid policy", "powerSaving.capPercent")
    policies = json.loads(kgpu("get", "policies", "-o", "json", env=env).stdout)
    assert [(p["name"], p["valid"], p["priority"]) for p in policies] == [("night-cap", True, 10)]
    wait_for(lambda: cloud.get(f"/api/v1/nodes/{NODE}/policy")["applied"], timeout=60,
             what="the edge applying night-cap")

    # describe node: every section, the GPUs by UUID, the commands just sent
    described = kgpu("describe", "node", NODE, env=env)
    assert described.returncode == 0, described.stderr
    for words in ("Name:", NODE, "Online", "night-cap", "GPU devices:", "Commands (latest", "drain", "Events"):
        assert words in described.stdout, (words, described.stdout)
    assert all(len(line) <= 80 for line in described.stdout.splitlines()), described.stdout

    errors_are_one_line_with_their_exit_code(cloud, env, tmp_path)


def errors_are_one_line_with_their_exit_code(cloud: CloudProcess, env: dict[str, str], tmp_path: Path) -> None:
    """(Part of the test above: one controller serves both.)"""
    commands_before = cloud.get("/api/v1/commands")["commands"]
    no_token = {"KGPU_SERVER": env["KGPU_SERVER"]}
    one_line_error(kgpu("get", "nodes", env=no_token), EXIT_AUTH, "needs a token", "--token-file", "KGPU_TOKEN_FILE")
    (tmp_path / "wrong").write_text("not-the-token\n")
    one_line_error(kgpu("get", "nodes", "--token-file", str(tmp_path / "wrong"), env=no_token), EXIT_AUTH,
                   "refused the token", str(tmp_path / "wrong"))
    down = f"http://127.0.0.1:{free_port()}"
    one_line_error(kgpu("get", "nodes", "--server", down, env=env), EXIT_UNREACHABLE, down, "--server")
    one_line_error(kgpu("describe", "node", "no-such-node", env=env), EXIT_NOT_FOUND, "no such node")
    one_line_error(kgpu("drain", NODE, "7", env=env), EXIT_NOT_FOUND, "no GPU '7'")
    one_line_error(kgpu("get", "widgets", env=env), EXIT_USAGE, "unknown kind")
    one_line_error(kgpu("rollout", "start", "--image", "kgpu:2", env=env), EXIT_REFUSED, "need a cluster")
    one_line_error(kgpu("rollout", "status", env=env), EXIT_NOT_FOUND, "no rollout")
    one_line_error(kgpu("policy", "apply", "-f", str(tmp_path / "missing.yaml"), env=env), EXIT_USAGE, "cannot read")
    assert cloud.get("/api/v1/commands")["commands"] == commands_before  # nothing refused reached an edge

    # the config file stands in for the flags and the environment
    config = tmp_path / "xdg" / "kgpu" / "client.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(yaml.safe_dump({"server": env["KGPU_SERVER"], "token-file": env["KGPU_TOKEN_FILE"]}))
    configured = kgpu("get", "nodes", "-o", "json", env={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert configured.returncode == 0 and json.loads(configured.stdout)[0]["name"] == NODE, configured.stderr


def _commands() -> list[tuple[tuple[str, ...], Any]]:
    found: list[tuple[tuple[str, ...], Any]] = []

    def walk(path: tuple[str, ...], command: Any) -> None:
        found.append((path, command))
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk((*path, name), sub)

    walk((), typer.main.get_command(app))
    return found


def test_flags_show_no_bool_metavar() -> None:
    """Neither the plain help nor Typer's rich renderer (which prints each option's type) shows
    `<bool>` for a flag, which refuses a value."""
    runner = CliRunner()
    flags = 0
    for path, command in _commands():
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "100"})
        assert result.exit_code == 0 and "<bool>" not in result.output, (path, result.output)
        ctx = typer.Context(command, info_name="kgpu")
        for param in command.params:
            if getattr(param, "is_flag", False):
                flags += 1
                shown = param.display_type_rich(ctx=ctx) if hasattr(param, "display_type_rich") else param.metavar
                assert not shown, (path, param.opts, shown)
    assert flags >= 10  # the walk reached the flags (--no-kube, --json, --watch, ...)


def test_http_takes_a_bare_port_everywhere() -> None:
    """edge and cloud run were started with a bare port above; the demo takes PORT or a loopback
    HOST:PORT, and refuses another host (its controller runs without a token)."""
    assert _demo_port("9555") == _demo_port(":9555") == _demo_port("127.0.0.1:9555") == 9555
    refused = kgpu("demo", "--http", "0.0.0.0:9555")
    one_line_error(refused, EXIT_USAGE, "127.0.0.1 only")
    one_line_error(kgpu("demo", "--http", "nine"), EXIT_USAGE, "--http")


def test_tables_at_80_columns_keep_long_names_apart() -> None:
    """Twelve nodes whose names differ only at the end (the issue's `edge-…` at 80 columns): what
    the row can do without goes first, and what remains of each name still tells them apart."""
    now_ish = 1.0e12
    nodes = [{"name": f"edge-gpu-site-frankfurt-rack-{i:04d}", "online": i % 5 != 0, "degraded": ["mqtt"] * (i % 2),
              "gpu_summary": {"count": 8, "healthy": 8 - i % 3, "power_w": 2812.5, "max_temperature_c": 71.0},
              "policy_name": "night-cap-for-the-frankfurt-site", "policy_version": 12, "daemon_version": "0.1.0-rc3",
              "last_seen": now_ish} for i in range(12)]
    lines = table(nodes, NODE_COLUMNS, wide=False, width=80)
    assert all(len(line) <= 80 for line in lines), lines
    names = [line.split()[0] for line in lines[1:]]
    assert len(set(names)) == 12 and all(n.endswith(f"{i:04d}") and len(n) >= 16 for i, n in enumerate(names)), names
    gpus = [{"node": n["name"], "index": i, "uuid": f"GPU-{i:08x}-31ab-5915-a346-59e677181e08", "health": "healthy",
             "power_limit_w": 700.0, "sample": {"temperature_c": 50.0, "power_w": 300.0, "utilization_pct": 99.0}}
            for i, n in enumerate(nodes)]
    gpu_lines = table(gpus, GPU_COLUMNS, wide=False, width=80)
    assert all(len(line) <= 80 for line in gpu_lines) and "TEMP" in gpu_lines[0] and "LIMIT" in gpu_lines[0]
    assert len({line.split()[0] for line in gpu_lines[1:]}) == 12, gpu_lines
    assert table(nodes, NODE_COLUMNS, wide=False, width=None)[1].startswith(nodes[0]["name"])  # a pipe: whole
