"""The console script as a user meets it first: every group's and command's `--help` renders, in a
subprocess with the typer, click and rich this environment installed (a help text with
`[/var/lib/...]` in it once crashed rich's markup parser), and `kgpu --version` answers.

The commands are found by walking the Typer app itself, so a new command is covered without
touching this file."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import typer

from kgpu.cli import app
from shared import __version__
from tests.helpers.cli import run_kgpu


def command_paths() -> list[tuple[tuple[str, ...], Any]]:
    """Every group and command under the app, as the words that reach it (the root is ())."""
    found: list[tuple[tuple[str, ...], Any]] = []

    def walk(path: tuple[str, ...], command: Any) -> None:
        found.append((path, command))
        for name, sub in sorted(getattr(command, "commands", {}).items()):  # a group (typer vendors click)
            walk((*path, name), sub)

    walk((), typer.main.get_command(app))
    return found


PATHS = command_paths()


def kgpu(*args: str) -> subprocess.CompletedProcess[str]:
    return run_kgpu(*args, columns=100)


def test_the_walk_finds_every_group_and_command() -> None:
    names = {" ".join(path) for path, _ in PATHS}
    # a floor, not the list: the walk must reach into the sub-apps
    assert {"", "edge", "edge run", "cloud", "cloud run", "demo", "watch", "version"} <= names
    assert any(getattr(cmd, "commands", None) for path, cmd in PATHS if path)  # a group below the root


@pytest.mark.parametrize(("path", "command"), PATHS, ids=[" ".join(p) or "kgpu" for p, _ in PATHS])
def test_help_renders(path: tuple[str, ...], command: Any) -> None:
    result = kgpu(*path, "--help")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "Traceback" not in out and "Error:" not in result.stderr, out
    usage = next((line for line in result.stdout.splitlines() if line.strip()), "")
    assert usage.startswith("Usage:") and " ".join(path) in usage, out
    for param in command.params:  # every option is listed (the help rendered to the end)
        for opt in param.opts:
            if opt.startswith("--") and not getattr(param, "hidden", False):
                assert opt in result.stdout, f"{opt} missing from `kgpu {' '.join(path)} --help`:\n{out}"
    if command.help:
        first_words = " ".join(command.help.split()[:3])
        assert first_words in " ".join(result.stdout.split()), out


def test_help_shows_bracketed_defaults_as_written() -> None:
    result = kgpu("edge", "run", "--help")
    assert result.returncode == 0, result.stderr
    assert "[/var/lib/kgpu/edge.db]" in result.stdout


def test_version_flag() -> None:
    result = kgpu("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"kgpu {__version__}"
    assert kgpu("version").stdout.strip() == __version__  # the command too, as before
