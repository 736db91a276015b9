"""A throwaway PostgreSQL server for the test session, so store tests run on the real thing.

The server lives in a temporary directory (data, unix socket, log), listens on a free loopback
port with `trust` authentication, and is stopped and deleted at the end of the session. As root
it runs as the `postgres` system user (or `nobody`), because PostgreSQL refuses to run as root.
Durability is switched off (`fsync=off`): the data is thrown away anyway.

Use the session fixture `pg_url` (a `postgresql+psycopg://` URL of an empty database) and
`create_database(pg_url)` for a fresh database per test:

    from tests.helpers.postgres import create_database, pg_url  # noqa: F401
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kgpu.lab.processes import free_port

SUPERUSER = "kgpu"
START_TIMEOUT_S = 30.0
_db_counter = itertools.count(1)


def find_server_binaries() -> tuple[Path, Path] | None:
    """(initdb, postgres) from PATH or Debian's /usr/lib/postgresql/<version>/bin, else None."""
    on_path = shutil.which("initdb"), shutil.which("postgres")
    if all(on_path):
        return Path(on_path[0]), Path(on_path[1])  # type: ignore[arg-type]

    def version(bindir: str) -> int:
        try:
            return int(Path(bindir).parent.name)
        except ValueError:
            return -1

    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        initdb, postgres = Path(bindir, "initdb"), Path(bindir, "postgres")
        if initdb.exists() and postgres.exists():
            return initdb, postgres
    return None


def _run_as() -> str | None:
    """The unprivileged user to run the server as when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
            return user
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists")


@dataclass
class PostgresServer:
    """One running server; `stop()` shuts it down and deletes its directory."""

    root: Path
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # "fast" shutdown: ends sessions, no wait
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres(initdb: Path, postgres: Path) -> PostgresServer:
    """initdb into a temporary directory and start a server on a free loopback port."""
    root = Path(tempfile.mkdtemp(prefix="kgpu-pg-"))
    data, log_path = root / "data", root / "postgres.log"
    user = _run_as()
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    # setuid in the child: no runuser/su in between, so our Popen *is* the postmaster and a
    # signal to it is a clean shutdown.
    group = pwd.getpwnam(user).pw_gid if user is not None else None
    extra_groups: list[int] | None = [] if user is not None else None  # [] drops root's groups
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    init = subprocess.run(
        [str(initdb), "-D", str(data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8",
         "--no-locale", "--no-sync"],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
        user=user, group=group, extra_groups=extra_groups,
    )
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"initdb failed ({init.returncode}): {init.stderr.strip()[-2000:]}")
    port = free_port()
    log_file = open(log_path, "wb")
    if user is not None:
        os.chown(log_path, pwd.getpwnam(user).pw_uid, -1)
    process = subprocess.Popen(
        [str(postgres), "-D", str(data), "-p", str(port), "-k", str(root),
         "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
         "-c", "full_page_writes=off", "-c", "max_connections=200",
         "-c", "shared_buffers=64MB"],
        cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT,
        user=user, group=group, extra_groups=extra_groups,
    )
    log_file.close()
    server = PostgresServer(root=root, port=port, process=process, log_path=log_path)
    try:
        _wait_until_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_until_ready(server: PostgresServer) -> None:
    import psycopg

    deadline = time.monotonic() + START_TIMEOUT_S
    last_error = ""
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"postgres exited ({server.process.returncode}):\n{server.log_tail()}")
        try:
            with psycopg.connect(
                host="127.0.0.1", port=server.port, user=SUPERUSER, dbname="postgres",
                connect_timeout=2,
            ):
                return
        except psycopg.OperationalError as exc:
            last_error = str(exc).strip()
            time.sleep(0.1)
    raise RuntimeError(
        f"postgres did not accept connections within {START_TIMEOUT_S}s ({last_error}):\n"
        f"{server.log_tail()}"
    )


def create_database(any_url: str, name: str | None = None) -> str:
    """Create an empty database on the server behind `any_url`; return its URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(any_url)
    name = name or f"kgpu_test_{os.getpid()}_{next(_db_counter)}"
    with psycopg.connect(
        host=url.host, port=url.port, user=url.username, dbname="postgres", autocommit=True
    ) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.set(database=name).render_as_string(hide_password=False)


def drop_database(any_url: str) -> None:
    """Drop the database `any_url` names, closing whatever sessions are still on it."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(any_url)
    with psycopg.connect(
        host=url.host, port=url.port, user=url.username, dbname="postgres", autocommit=True
    ) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of an empty database on a PostgreSQL server started for this test session."""
    binaries = find_server_binaries()
    if binaries is None:
        pytest.skip(
            "PostgreSQL server binaries not installed (initdb/postgres): looked on PATH and in "
            "/usr/lib/postgresql/*/bin; on Debian `apt-get install -y postgresql`"
        )
    server = start_postgres(*binaries)
    try:
        yield create_database(server.admin_url, "kgpu_test")
    finally:
        server.stop()
