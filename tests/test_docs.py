"""The generated configuration reference matches the code."""

from pathlib import Path

from kgpu.settings_doc import render

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_reference_is_current() -> None:
    current = (ROOT / "docs" / "configuration.md").read_text()
    assert current == render(), "docs/configuration.md is stale: run python -m kgpu.settings_doc > docs/configuration.md"


def test_readme_names_the_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "scripts/demo.sh" in readme and "scripts/test.sh" in readme
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("exec scripts/test.sh")
