"""The shipped broker kit (deploy/mosquitto/) run for real: the shipped conf with only paths and
ports rewritten, the shipped ACL, users from make-users.sh and certificates from make-certs.sh."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

from kgpu.lab.broker import Mosquitto
from kgpu.lab.processes import free_port

ROOT = Path(__file__).resolve().parent.parent.parent
KIT = ROOT / "deploy" / "mosquitto"
SHIPPED_CONF = KIT / "mosquitto.conf"
SHIPPED_ACL = KIT / "acl"
MAKE_USERS = KIT / "make-users.sh"
MAKE_CERTS = KIT / "make-certs.sh"

# The only things the test changes in the shipped conf: these paths (to tmp dirs) and the two ports.
SHIPPED_PATHS = {"/mosquitto/data/", "/mosquitto/secrets/passwd", "/mosquitto/config/acl", "/mosquitto/certs/"}


# ---- the kit, run for real --------------------------------------------------------------------

def run_script(script: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise AssertionError(f"{script.name} {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def make_users(users_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_script(MAKE_USERS, "--dir", str(users_dir), *args, check=check)


def make_certs(certs_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_script(MAKE_CERTS, "--dir", str(certs_dir), *args)


def derive_conf(shipped: str, paths: dict[str, str], port: int, tls_port: int,
                uncomment: tuple[str, ...] = ()) -> str:
    """The shipped conf with paths and ports rewritten; every other line is kept as it is."""
    out: list[str] = []
    used: set[str] = set()
    for line in shipped.splitlines():
        directive = line.strip()
        if directive == "listener 1883":
            line = f"listener {port} 127.0.0.1"
        elif directive == "listener 8883":
            line = f"listener {tls_port} 127.0.0.1"
        elif directive.startswith("#"):
            if directive.lstrip("#") in uncomment:
                line = directive.lstrip("#")
        else:
            for old, new in paths.items():
                if old in line:
                    line = line.replace(old, new)
                    used.add(old)
        out.append(line)
    assert used == set(paths), f"shipped conf lacks {set(paths) - used}"
    text = "\n".join(out) + "\n"
    assert not re.search(r"^[^#]*/mosquitto/", text, re.MULTILINE), "a shipped path was left unrewritten"
    if os.geteuid() == 0:  # as root mosquitto would switch to its own user, who can't read tmp dirs
        text = "user root\n" + text
    return text


class ShippedBroker(Mosquitto):
    """mosquitto running the shipped conf and ACL with users and certs made by the kit's scripts."""

    def __init__(self, workdir: Path, *, nodes: tuple[str, ...] = ("edge-a", "edge-b"),
                 uncomment: tuple[str, ...] = ()) -> None:
        super().__init__(workdir)  # picks a free port; its own config is replaced below
        self.tls_port = free_port()
        self.users_dir = workdir / "users"
        self.certs_dir = workdir / "certs"
        make_users(self.users_dir, "--broker", f"mqtt://127.0.0.1:{self.port}", *nodes)
        make_certs(self.certs_dir, "--client", "edge-a", "localhost", "127.0.0.1")
        (workdir / "data").mkdir(exist_ok=True)
        acl = workdir / "acl"
        acl.write_bytes(SHIPPED_ACL.read_bytes())  # the shipped ACL, unchanged
        paths = {
            "/mosquitto/data/": f"{workdir}/data/",
            "/mosquitto/secrets/passwd": str(self.users_dir / "passwd"),
            "/mosquitto/config/acl": str(acl),
            "/mosquitto/certs/": f"{self.certs_dir}/",
        }
        assert set(paths) == SHIPPED_PATHS
        self.config.write_text(derive_conf(SHIPPED_CONF.read_text(), paths, self.port, self.tls_port, uncomment)
                               + f"log_dest file {self.log_path}\n")  # stdout goes nowhere in tests

    def url(self, user: str) -> str:  # type: ignore[override]
        """The credentials URL make-users.sh wrote for this user."""
        return (self.users_dir / "credentials" / f"{user}.url").read_text().strip()

    def password_file(self, user: str) -> Path:
        return self.users_dir / "credentials" / f"{user}.password"

    def hup(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
