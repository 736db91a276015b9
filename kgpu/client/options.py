"""What every client command shares: the controller and token options, `-o`, reading a file of
documents, and turning a ClientError into one line on stderr with its exit code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from kgpu.client.http import EXIT_USAGE, Api, ClientError, resolve_target


def flag(*decls: str, **kwargs: Any) -> Any:
    """An option that takes no value: an empty metavar, so that no help renderer (Typer's rich one
    prints the type) shows `<bool>` beside a flag that refuses a value."""
    return typer.Option(*decls, metavar="", **kwargs)


Server = Annotated[str | None, typer.Option(
    "--server", "-s", help="The controller's base URL [http://127.0.0.1:9420]", envvar="KGPU_SERVER")]
TokenFile = Annotated[Path | None, typer.Option(
    "--token-file", help="File holding the API bearer token (its first line)", envvar="KGPU_TOKEN_FILE")]
Output = Annotated[str | None, typer.Option(
    "--output", "-o", help="wide (more columns), json or yaml [a table]")]
OUTPUTS = (None, "wide", "json", "yaml")
ACTIVE_ROLLOUT = ("running", "rolling-back")


@contextmanager
def one_line_errors() -> Iterator[None]:
    """A ClientError becomes `kgpu: <message>` on stderr and its exit code; Ctrl-C ends quietly."""
    try:
        yield
    except ClientError as exc:
        typer.echo(f"kgpu: {exc}", err=True)
        raise typer.Exit(code=exc.exit_code) from None
    except KeyboardInterrupt:
        raise typer.Exit(code=0) from None


def api_for(server: str | None, token_file: Path | None) -> Api:
    return Api(resolve_target(server, token_file))


def check_output(output: str | None) -> None:
    if output not in OUTPUTS:
        raise ClientError(f"-o must be wide, json or yaml, got {output!r}", EXIT_USAGE)


def load_documents(path: Path) -> list[Any]:
    """A YAML (one or more documents) or JSON file; `-` reads stdin."""
    try:
        text = typer.get_text_stream("stdin").read() if str(path) == "-" else path.read_text()
    except OSError as exc:
        raise ClientError(f"cannot read {path}: {exc.strerror or exc}", EXIT_USAGE) from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]  # JSON is YAML
    except yaml.YAMLError as exc:
        raise ClientError(f"{path} is not YAML or JSON: {' '.join(str(exc).split())}", EXIT_USAGE) from None
    if not docs:
        raise ClientError(f"{path} holds no document", EXIT_USAGE)
    return docs
