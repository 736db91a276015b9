"""Render the settings models as Markdown tables, so docs/configuration.md cannot drift from the
code (tests/test_docs.py regenerates it and compares). Run: `python -m kgpu.settings_doc`.

It reads the edge's and the cloud's settings and the CLI's flags, so it lives in kgpu/ (which
may import every part), not in shared/ (which imports nothing above it)."""

from __future__ import annotations

import json
import sys
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from shared.settings import ENV_PREFIX


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "(see below)" if isinstance(value, BaseModel) else f"`{json.dumps(value)}`"
    if field.default is PydanticUndefined or field.default is None:
        return "—"
    return f"`{field.default}`"


def _type_name(tp: Any) -> str:
    """A readable type: validators (Annotated) dropped, unions as `a | b`."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(tp))
    if origin is typing.Literal:
        return f"Literal[{', '.join(repr(arg) for arg in typing.get_args(tp))}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _type(field: Any) -> str:
    return _type_name(field.annotation).replace("|", "\\|")


def cli_flags(*command_path: str) -> set[str]:
    """The long options `kgpu <command_path>` really has, read from the CLI itself."""
    import typer.main

    from kgpu.cli import app

    command: Any = typer.main.get_command(app)
    for name in command_path:
        command = command.commands[name]
    return {opt for param in command.params for opt in param.opts if opt.startswith("--")}


def settings_table(cls: type[BaseModel], flags: set[str]) -> str:
    lines = ["| flag | env | file key | type | default | meaning |", "|---|---|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        flag = f"--{name.replace('_', '-')}"
        lines.append(
            f"| {f'`{flag}`' if flag in flags else '—'} | `{ENV_PREFIX}{name.upper()}` | `{name}` | {_type(field)} "
            f"| {_default(field)} | {field.description or ''} |"
        )
    return "\n".join(lines)


def policy_table() -> str:
    from shared.policy import PowerPolicy

    lines = ["| key | default | constraint |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = prefix + (field.alias or name)
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, key + ".")
                continue
            bounds = ", ".join(
                f"{k} {getattr(m, k)}"
                for m in field.metadata for k in ("ge", "gt", "le", "lt") if getattr(m, k, None) is not None
            )
            lines.append(f"| `{key}` | {_default(field)} | {bounds} |")

    walk(PowerPolicy, "")
    return "\n".join(lines)


def render() -> str:
    from cloud.config import CloudSettings
    from edge.config import EdgeSettings

    return f"""# Configuration reference

Generated from the settings models by `python -m kgpu.settings_doc > docs/configuration.md`;
`tests/test_docs.py` fails when this file and the code disagree.

Precedence: command-line flag, then environment variable, then the `--config` file (YAML or TOML,
keys as below), then the default. Only the settings most used have a flag (— in the flag
column: set it through its environment variable or the config file). Durations accept seconds
or `90s`, `2m`, `1h`. A bad value stops start-up with one line per problem and exit status 2.

## `kgpu edge run`

{settings_table(EdgeSettings, cli_flags("edge", "run"))}

## `kgpu cloud run`

{settings_table(CloudSettings, cli_flags("cloud", "run"))}

## Power policy (`policy:` in the edge config file; the `GPUPowerPolicy` CRD's spec)

{policy_table()}
"""


if __name__ == "__main__":
    sys.stdout.write(render())
