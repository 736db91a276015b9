"""The kubectl-style client commands (`kgpu get`, `describe`, `drain`, `undrain`, `policy`, `rollout`),
registered on the `kgpu` app by kgpu/cli.py. Each one resolves the controller and token, makes its
requests (kgpu/client/http.py) and prints a table or a document (kgpu/client/render.py); any failure
is one line on stderr and an exit code (docs/cli.md)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any

import typer

from kgpu.client.http import EXIT_REFUSED, EXIT_USAGE, Api, ClientError
from kgpu.client.options import Output, Server, TokenFile, api_for, check_output, flag, one_line_errors
from kgpu.client.render import dump, dump_line, signature, table, terminal_width
from kgpu.client.resources import ALIASES, GPU_COLUMNS, KINDS, Filters, Kind, resolve_gpu


def show(rows: list[dict[str, Any]], kind: Kind, output: str | None, *, header: bool = True,
         wide_columns: list[Any] | None = None) -> None:
    if output in ("json", "yaml"):
        typer.echo(dump(rows, output))
        return
    if not rows and header:
        typer.echo("No resources found.", err=True)
        return
    wide = output == "wide"  # as kubectl: -o wide is whole values, the terminal wraps what it must
    for line in table(rows, wide_columns or kind.columns, wide=wide, width=None if wide else terminal_width(),
                      header=header):
        typer.echo(line)


def _watch(api: Api, kind: Kind, filters: Filters, output: str | None, interval: float,
           newest_first: bool) -> None:
    """Poll and print what changed: new rows, and rows whose table cells (ages aside) changed, as
    table lines without the header or one document each, as `kubectl get -w` does."""
    seen: dict[str, tuple[str, ...]] = {}
    first = True
    while True:
        rows = kind.fetch(api, filters)
        if newest_first:
            rows = list(reversed(rows))
        changed = []
        for row in rows:
            key, content = kind.key(row), signature(row, kind.columns)
            if seen.get(key) != content:
                seen[key] = content
                changed.append(row)
        if first and output in ("json", "yaml"):
            for row in changed:
                typer.echo(dump_line(row, output))
        elif first:
            show(changed, kind, output)
        elif changed:
            if output in ("json", "yaml"):
                for row in changed:
                    typer.echo(dump_line(row, output))
            else:
                show(changed, kind, output, header=False)
        first = False
        time.sleep(interval)


def register(app: typer.Typer) -> None:
    """Add `get`, `describe`, `drain` and `undrain` to `app` (policy and rollout: kgpu/client/policy_rollout.py)."""

    @app.command("get")
    def get(
        kind: Annotated[str, typer.Argument(help="nodes, gpus, migrations, rollouts, policies or events")],
        name: Annotated[str | None, typer.Argument(help="One object: a node, policy, migration id or rollout id")]
        = None,
        output: Output = None,
        watch: Annotated[bool, flag("--watch", "-w", help="Keep polling; print what changes")] = False,
        interval: Annotated[float, typer.Option(min=0.2, help="Seconds between two polls of --watch")] = 2.0,
        node: Annotated[str | None, typer.Option(help="Only this node's (gpus, migrations, events)")] = None,
        event_kind: Annotated[str | None, typer.Option(
            "--kind", help="events: only this kind (health, xid, command_result, ...)")] = None,
        state: Annotated[str | None, typer.Option(help="migrations: only this state (in-progress, done, ...)")]
        = None,
        limit: Annotated[int | None, typer.Option(min=1, help="At most this many rows (events: 50)")] = None,
        server: Server = None,
        token_file: TokenFile = None,
    ) -> None:
        """List nodes, GPUs, migrations, rollouts, policies or events from the controller."""
        with one_line_errors():
            check_output(output)
            plural = ALIASES.get(kind.lower(), kind.lower())
            if plural not in KINDS:
                raise ClientError(f"unknown kind {kind!r}: nodes, gpus, migrations, rollouts, policies or events",
                                  EXIT_USAGE)
            if name is not None and plural in ("gpus", "events"):
                raise ClientError(f"`kgpu get {plural}` takes no name: use --node NODE", EXIT_USAGE)
            api = api_for(server, token_file)
            filters = Filters(name=name, node=node, kind=event_kind, state=state, limit=limit, full=output is not None)
            if watch:
                _watch(api, KINDS[plural], filters, output, interval, newest_first=plural in ("events",))
                return
            rows = KINDS[plural].fetch(api, filters)
            if name is not None and output in ("json", "yaml"):
                typer.echo(dump(rows[0], output))
                return
            show(rows, KINDS[plural], output)

    @app.command("describe")
    def describe(
        kind: Annotated[str, typer.Argument(help="node")],
        name: Annotated[str, typer.Argument(help="The node's name")],
        output: Output = None,
        server: Server = None,
        token_file: TokenFile = None,
    ) -> None:
        """Show one node in full: status, GPUs, policy, recent commands, migrations and events."""
        from kgpu.client.describe import describe_node, gather_node

        with one_line_errors():
            check_output(output)
            if ALIASES.get(kind.lower(), kind.lower()) != "nodes":
                raise ClientError(f"`kgpu describe` knows nodes only, not {kind!r}", EXIT_USAGE)
            found = gather_node(api_for(server, token_file), name)
            if output in ("json", "yaml"):
                typer.echo(dump(found, output))
                return
            for line in describe_node(found, GPU_COLUMNS, terminal_width()):
                typer.echo(line)

    def _command(verb: str) -> Callable[..., None]:
        def send(
            node: Annotated[str, typer.Argument(help="The node")],
            gpu: Annotated[str, typer.Argument(help="The GPU: its index, its UUID, or `all`")],
            wait: Annotated[bool, flag(
                "--wait/--no-wait", help="Wait for the edge's answer [wait]")] = True,
            timeout: Annotated[float, typer.Option(min=0.0, help="Seconds to wait for the answer")] = 30.0,
            server: Server = None,
            token_file: TokenFile = None,
        ) -> None:
            with one_line_errors():
                api = api_for(server, token_file)
                uuid, what = resolve_gpu(api, node, gpu)
                sent = api.request("POST", f"/api/v1/nodes/{node}/commands",
                                   {"command": verb, **({"gpuUuid": uuid} if uuid else {})})
                typer.echo(f"{verb} of {what} on {node} sent (command {sent['id']})")
                if wait:
                    _await_result(api, node, str(sent["id"]), timeout)

        send.__doc__ = (f"{verb.capitalize()} a GPU of a node: the edge "
                        + ("stops placing work on it and reports it unhealthy to the kubelet."
                           if verb == "drain" else "puts it back in service.")
                        + " Sent until the edge answers.")
        return send

    app.command("drain")(_command("drain"))
    app.command("undrain")(_command("undrain"))


def _await_result(api: Api, node: str, command_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for row in api.get("/api/v1/commands", node=node, limit=100).get("commands") or []:
            if row.get("id") != command_id or row.get("state") == "pending":
                continue
            if row.get("state") == "done":
                typer.echo(f"{node}: {row.get('detail') or 'done'}")
                return
            raise ClientError(f"{node} answered {row.get('state')}: {row.get('detail') or 'no detail'}", EXIT_REFUSED)
        if time.monotonic() >= deadline:
            typer.echo(f"kgpu: no answer from {node} within {timeout:g} s; the controller sends the command again "
                       "until the edge answers (see `kgpu get events --kind command_result`)", err=True)
            return
        time.sleep(0.5)
