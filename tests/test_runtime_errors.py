"""Run-time errors as an operator meets them: the real `python -m kgpu` in a subprocess, each error
said in one line that names the cause and the fix, a fitting exit status, never a traceback.

What stops a start exits 1 with `kgpu: ...` on stderr (the HTTP port taken). What the daemon
outlives is said once and it keeps running: an edge database it cannot open (it enforces on a
temporary store), no NVML library with `--backend nvml` (it serves without GPUs and retries).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kgpu.lab.processes import wait_for

REPO = Path(__file__).resolve().parents[1]


def read_only_mount(directory: Path) -> list[str]:
    """A prefix that runs the command in its own mount namespace where `directory` is a read-only
    bind mount: root writes through permission bits, not through a read-only filesystem."""
    mount = f"mount --bind {directory} {directory} && mount -o remount,bind,ro {directory}"
    return ["unshare", "--mount", "/bin/sh", "-c", f'{mount} && exec "$@"', "sh"]


def can_mount_read_only(directory: Path) -> bool:
    try:
        probe = subprocess.run([*read_only_mount(directory), "/bin/sh", "-c", f"! touch {directory}/probe"],
                               capture_output=True, timeout=30)
    except OSError:
        return False
    return probe.returncode == 0


class Kgpu:
    """`python -m kgpu ARGS` with stderr collected line by line by a thread (bounded waits on it)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, wrap: list[str] | None = None) -> None:
        self.proc = subprocess.Popen([*(wrap or []), sys.executable, "-m", "kgpu", *args], cwd=REPO,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def messages(self) -> list[tuple[str, str]]:
        """(level, message) of each JSON log record; a plain line as ("plain", line)."""
        found = []
        for line in list(self.lines):
            try:
                record: Any = json.loads(line)
            except ValueError:
                found.append(("plain", line))
                continue
            found.append((record.get("level", ""), record.get("msg", "")))
        return found

    def wait_exit(self, timeout: float = 90) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(10)
        return code

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(60)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def edge(db: Path, *extra: str, backend: str = "sim", http: str = "127.0.0.1:0", **kwargs: Any) -> Kgpu:
    return Kgpu("edge", "run", "--node", "err-node", "--backend", backend, "--db", str(db), "--http", http,
                "--interval", "1", *extra, **kwargs)


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_edge_port_in_use_is_one_line_and_exit_1(tmp_path: Path, busy_port: int) -> None:
    run = edge(tmp_path / "edge.db", http=f"127.0.0.1:{busy_port}")
    assert run.wait_exit() == 1, run.text
    assert run.lines[-1] == (f"kgpu: cannot listen on 127.0.0.1:{busy_port} for the HTTP API: address already in "
                             "use (another kgpu edge or exporter on that port?); choose another with --http HOST:PORT")
    assert "Traceback" not in run.text


def db_problems(run: Kgpu) -> list[str]:
    return [m for level, m in run.messages() if level == "error" and "cannot be opened" in m]


def test_edge_database_in_a_read_only_directory_says_so_and_enforces_on(tmp_path: Path) -> None:
    read_only = tmp_path / "ro"
    read_only.mkdir()
    if os.geteuid() != 0:  # permission bits stop a user
        read_only.chmod(0o555)
        wrap, why = [], f"is read-only for uid {os.geteuid()}"
    elif can_mount_read_only(read_only):  # root writes through them: a read-only filesystem stops it
        wrap, why = read_only_mount(read_only), "is on a read-only filesystem"
    else:
        pytest.skip("root without mount namespaces: nothing here is read-only for this test")
    run = edge(read_only / "edge.db", "--log-level", "warning", env={"TMPDIR": str(tmp_path)}, wrap=wrap)
    try:
        wait_for(lambda: db_problems(run) or run.proc.poll() is not None, timeout=60, what="the database problem")
        (line,) = db_problems(run)
        assert f"directory {read_only} {why}" in line, line
        assert "temporary store" in line and "unable to open database file" not in line
    finally:
        code = run.stop()
        read_only.chmod(0o755)
    assert code == 0, run.text  # it kept running, enforcing, until told to stop
    assert "Traceback" not in run.text


def test_edge_database_under_a_file_says_the_directory_cannot_be_made(tmp_path: Path) -> None:
    blocker = tmp_path / "data"
    blocker.write_text("a file where the database's directory should be")
    run = edge(blocker / "kgpu" / "edge.db", "--log-level", "warning", env={"TMPDIR": str(tmp_path)})
    try:
        wait_for(lambda: db_problems(run) or run.proc.poll() is not None, timeout=60, what="the database problem")
        (line,) = db_problems(run)
        assert f"{blocker} is a file, not a directory" in line, line
    finally:
        code = run.stop()
    assert code == 0, run.text
    assert "Traceback" not in run.text


def test_backend_nvml_without_nvml_says_it_once_with_the_hint(tmp_path: Path) -> None:
    """This machine has no libnvidia-ml. The daemon serves without GPUs and retries (a driver can
    come after it); the missing library is said once, with `--backend sim`, the retries quietly."""
    run = edge(tmp_path / "edge.db", "--log-level", "debug", backend="nvml")
    try:
        retries = lambda: [m for lvl, m in run.messages() if "GPU driver" in m and "not reachable" in m]  # noqa: E731
        wait_for(lambda: len(retries()) >= 2 or run.proc.poll() is not None, timeout=60,
                 what="the daemon retrying the driver")
        assert run.proc.poll() is None, run.text
    finally:
        code = run.stop()
    assert code == 0, run.text
    said = [(level, m) for level, m in run.messages() if level in ("error", "warning", "plain")]
    hints = [m for _, m in said if "--backend sim" in m]
    assert len(hints) == 1 and "NVML library cannot be loaded" in hints[0], said
    loud = [m for level, m in said if "not reachable" in m]
    assert len(loud) <= 1, f"the retries repeat the error: {loud}"
    assert "Traceback" not in run.text


# ---- the controller (these need the patch to cloud/app.py and shared/paths.py) ----------------


def cloud(db: str, *extra: str, http: str = "127.0.0.1:0", **kwargs: Any) -> Kgpu:
    return Kgpu("cloud", "run", "--db", db, "--http", http, "--mqtt", "mqtt://127.0.0.1:1", *extra, **kwargs)


def test_controller_port_in_use_is_one_line_and_exit_1(tmp_path: Path, busy_port: int) -> None:
    run = cloud(f"sqlite:///{tmp_path / 'fleet.db'}", "--no-kube", http=f"127.0.0.1:{busy_port}")
    assert run.wait_exit() == 1, run.text
    assert run.lines[-1] == (f"kgpu: cannot listen on 127.0.0.1:{busy_port} for the API: address already in use; "
                             "choose another with --http HOST:PORT")
    assert "Traceback" not in run.text


def test_controller_database_under_a_file_is_one_line_and_exit_1(tmp_path: Path) -> None:
    blocker = tmp_path / "data"
    blocker.write_text("a file where the database's directory should be")
    run = cloud(f"sqlite:///{blocker / 'kgpu' / 'fleet.db'}", "--no-kube")
    assert run.wait_exit() == 1, run.text
    assert run.lines[-1] == (f"kgpu: fleet database {blocker / 'kgpu' / 'fleet.db'}: {blocker} is a file, not a "
                             "directory: the database cannot be made under it")
    assert "Traceback" not in run.text and "unable to open database file" not in run.text


def test_controller_database_in_a_read_only_directory_is_one_line_and_exit_1(tmp_path: Path) -> None:
    read_only = tmp_path / "ro"
    read_only.mkdir()
    if os.geteuid() != 0:
        read_only.chmod(0o555)
        wrap, why = [], f"is read-only for uid {os.geteuid()}"
    elif can_mount_read_only(read_only):
        wrap, why = read_only_mount(read_only), "is on a read-only filesystem"
    else:
        pytest.skip("root without mount namespaces: nothing here is read-only for this test")
    try:
        run = cloud(f"sqlite:///{read_only / 'fleet.db'}", "--no-kube", wrap=wrap)
        assert run.wait_exit() == 1, run.text
    finally:
        read_only.chmod(0o755)
    assert run.lines[-1] == (f"kgpu: fleet database {read_only / 'fleet.db'}: directory {read_only} {why}: SQLite "
                             "writes its journal beside the file")
    assert "Traceback" not in run.text


def test_controller_with_an_unreachable_kubernetes_api_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "lab",
            "clusters": [{"name": "lab", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
            "users": [{"name": "lab", "user": {"token": "t"}}],
            "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "lab"}}]}))
        run = cloud(f"sqlite:///{tmp_path / 'fleet.db'}", "--kubeconfig", str(kubeconfig))
        assert run.wait_exit() == 2, run.text
    last = run.lines[-1]
    assert last.startswith(f"kgpu: cannot reach Kubernetes: the API server at http://127.0.0.1:{port} does not "
                           "answer (") and last.endswith("; pass --kubeconfig FILE, --in-cluster or --no-kube"), last
    assert "Traceback" not in run.text and not (tmp_path / "fleet.db").exists()  # nothing written before it
