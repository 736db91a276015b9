"""Settings precedence (flags > KGPU_* env > file > defaults) and bad-configuration handling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge.config import EdgeSettings
from shared.settings import ConfigError, load_settings, parse_host_port


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KGPU_INTERVAL", "KGPU_NODE", "NODE_NAME", "KGPU_BACKEND", "KGPU_HTTP", "KGPU_POLICY"):
        monkeypatch.delenv(name, raising=False)


def test_precedence_flag_over_env_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "edge.yaml"
    config.write_text("interval: 7\nhttp: 127.0.0.1:1000\nbackend: sim\nsim_gpus: 3\n")
    monkeypatch.setenv("KGPU_INTERVAL", "9")
    monkeypatch.setenv("KGPU_HTTP", "127.0.0.1:2000")
    settings = load_settings(EdgeSettings, {"interval": "3s", "http": None}, config)
    assert settings.interval == 3.0  # flag wins over env and file
    assert settings.http == "127.0.0.1:2000"  # env wins over file
    assert settings.sim_gpus == 3 and settings.backend == "sim"  # file over defaults


def test_toml_file_and_nested_policy(tmp_path: Path) -> None:
    config = tmp_path / "edge.toml"
    config.write_text('backend = "sim"\n[policy]\nname = "factory"\npowerCapWatts = 300\n'
                      '[policy.thermalThrottling]\nmaxTempC = 80\ncoolDownPeriod = "2m"\n')
    settings = load_settings(EdgeSettings, {}, config)
    assert settings.policy.name == "factory"
    assert settings.policy.power_cap_watts == 300
    assert settings.policy.thermal_throttling.cool_down_period == 120.0


def test_node_name_falls_back_to_node_name_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "Edge-Node-7")
    assert load_settings(EdgeSettings, {}, None).node == "edge-node-7"
    monkeypatch.setenv("KGPU_NODE", "explicit")
    assert load_settings(EdgeSettings, {}, None).node == "explicit"


def test_every_problem_is_reported(tmp_path: Path) -> None:
    config = tmp_path / "edge.yaml"
    config.write_text("intervall: 5\npolicy:\n  thermalThrottling:\n    maxTempC: 95\n  powerCapWatts: -3\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(EdgeSettings, {"backend": "cuda", "mqtt": "http://broker"}, config)
    text = "\n".join(caught.value.problems)
    assert len(caught.value.problems) == 5, text
    for expected in ("backend", "mqtt://", "intervall: unknown setting", "criticalTempC", "powerCapWatts"):
        assert expected in text


@pytest.mark.parametrize("content,expected", [
    ("interval: [", "not valid YAML"),
    ("- a\n- b\n", "must hold a mapping"),
])
def test_unreadable_file(tmp_path: Path, content: str, expected: str) -> None:
    config = tmp_path / "edge.yaml"
    config.write_text(content)
    with pytest.raises(ConfigError, match=expected):
        load_settings(EdgeSettings, {}, config)


@pytest.mark.parametrize("value,expected", [
    ("0.0.0.0:9410", ("0.0.0.0", 9410)), (":80", ("0.0.0.0", 80)), ("[::1]:5", ("::1", 5)),
])
def test_host_port(value: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(value) == expected


@pytest.mark.parametrize("args,needle", [
    (["--backend", "gpu"], "backend"),
    (["--interval", "0.1"], "interval"),
    (["--http", "nowhere"], "HOST:PORT"),
    (["--mqtt", "tcp://x:1"], "mqtt://"),
    (["--config", "/nonexistent/kgpu.yaml"], "config file not found"),
    (["--sim-model", "V100"], "sim_model"),
])
def test_cli_bad_config_exits_2_with_one_line_per_problem(args: list[str], needle: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kgpu", "edge", "run", "--db", str(tmp_path / "x.db"), *args],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("kgpu: configuration error: ") for line in lines), result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_shipped_example_config_loads() -> None:
    example = Path(__file__).resolve().parent.parent / "deploy" / "edge-config.example.yaml"
    settings = load_settings(EdgeSettings, {}, example)
    assert settings.policy.power_saving.sustain_period == 300
    assert settings.health_quiet_period == 300
    assert settings.policy.xid_policy.action_for(79).value == "request_migration"
