"""`kgpu policy apply|delete` and `kgpu rollout start|status|cancel|rollback`: the client's changes
to policies (`PUT /api/v1/policies/{name}`) and rollouts of the edge daemon (`/api/v1/rollouts`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from kgpu.client.http import EXIT_NOT_FOUND, EXIT_REFUSED, EXIT_USAGE, Api, ClientError
from kgpu.client.options import (
    ACTIVE_ROLLOUT,
    Output,
    Server,
    TokenFile,
    api_for,
    check_output,
    flag,
    load_documents,
    one_line_errors,
)
from kgpu.client.render import Column, age, dump, table, terminal_width
from kgpu.client.resources import ROLLOUT_COLUMNS

POLICY_KIND = "GPUPowerPolicy"


def policy_name(doc: Any, given: str | None, path: Path) -> str:
    """The name in `metadata.name`, else `--name` (a bare spec has none)."""
    if not isinstance(doc, dict):
        raise ClientError(f"{path}: a policy must be a mapping (a GPUPowerPolicy or its spec)", EXIT_USAGE)
    if doc.get("kind") not in (None, POLICY_KIND):
        raise ClientError(f"{path}: kind {doc.get('kind')!r} is not {POLICY_KIND}", EXIT_USAGE)
    metadata = doc.get("metadata")
    named = metadata.get("name") if isinstance(metadata, dict) else None
    if named and given and named != given:
        raise ClientError(f"{path}: metadata.name {named!r} is not --name {given!r}", EXIT_USAGE)
    name = named or given
    if not name:
        raise ClientError(f"{path}: no metadata.name; pass --name NAME for a bare spec", EXIT_USAGE)
    return str(name)


def newest_rollout(api: Api, active_only: bool) -> int:
    rollouts = api.get("/api/v1/rollouts", limit=50).get("rollouts") or []
    for rollout in rollouts:
        if not active_only or rollout.get("state") in ACTIVE_ROLLOUT:
            return int(rollout["id"])
    raise ClientError("no active rollout" if active_only else "no rollout yet", EXIT_NOT_FOUND)


ROLLOUT_NODE_COLUMNS = [
    Column("NODE", lambda n: n.get("node"), floor=16),
    Column("WAVE", lambda n: ("canary" if n.get("canary") else n.get("wave")), shrink=False),
    Column("STATE", lambda n: n.get("state"), shrink=False),
    Column("SINCE", lambda n: age(n.get("since")), shrink=False, volatile=True),
    Column("FROM", lambda n: n.get("fromVersion"), optional=True),
    Column("NOW", lambda n: n.get("daemonVersion")),
    Column("REASON", lambda n: n.get("reason"), text=True),
]


def add_policy_and_rollout(app: typer.Typer, plain: dict[str, Any]) -> None:
    policy_app = typer.Typer(help="GPU power policies on the controller.", **plain)
    rollout_app = typer.Typer(help="Rollouts of the edge daemon (need a controller with a cluster).", **plain)
    app.add_typer(policy_app, name="policy")
    app.add_typer(rollout_app, name="rollout")

    @policy_app.command("apply")
    def apply(
        filename: Annotated[Path, typer.Option(
            "--filename", "-f",
            help="YAML or JSON: GPUPowerPolicy objects (--- between several) or a spec; - for stdin")],
        name: Annotated[str | None, typer.Option(help="The policy's name when the file is a bare spec")] = None,
        server: Server = None,
        token_file: TokenFile = None,
    ) -> None:
        """Create or replace power policies from a file (PUT /api/v1/policies/NAME)."""
        with one_line_errors():
            docs = load_documents(filename)
            named = [(policy_name(doc, name if len(docs) == 1 else None, filename), doc) for doc in docs]
            api = api_for(server, token_file)
            for policy, doc in named:
                row = api.request("PUT", f"/api/v1/policies/{policy}", doc)
                verb = "created" if api.last_status == 201 else "configured"
                typer.echo(f"gpupowerpolicy/{policy} {verb} (generation {row.get('generation')})")

    @policy_app.command("delete")
    def delete(
        name: Annotated[str, typer.Argument(help="The policy")],
        server: Server = None,
        token_file: TokenFile = None,
    ) -> None:
        """Delete a power policy (a controller without a cluster only)."""
        with one_line_errors():
            api_for(server, token_file).request("DELETE", f"/api/v1/policies/{name}")
            typer.echo(f"gpupowerpolicy/{name} deleted")

    @rollout_app.command("start")
    def start(
        image: Annotated[str | None, typer.Option(help="The new edge daemon image")] = None,
        filename: Annotated[Path | None, typer.Option(
            "--filename", "-f", help="A whole rollout request (YAML or JSON, as POST /api/v1/rollouts takes)")]
        = None,
        version: Annotated[str | None, typer.Option(help="The version the nodes must report [the image's tag]")]
        = None,
        container: Annotated[str | None, typer.Option(help="The container to change [the first]")] = None,
        max_unavailable: Annotated[str | None, typer.Option(help="Nodes restarting at once, N or N% [10%]")] = None,
        failure_threshold: Annotated[str | None, typer.Option(
            help="Failed nodes that roll it back, N or N% [5%]")] = None,
        health_timeout: Annotated[float | None, typer.Option(help="Seconds a node has to come back [300]")] = None,
        canary: Annotated[list[str] | None, typer.Option(help="A canary node (wave 0); repeat for several")] = None,
        server: Server = None,
        token_file: TokenFile = None,
    ) -> None:
        """Start a rollout of the edge daemon: canaries, then waves of the other nodes."""
        with one_line_errors():
            body: dict[str, Any] = {}
            if filename is not None:
                docs = load_documents(filename)
                if len(docs) != 1 or not isinstance(docs[0], dict):
                    raise ClientError(f"{filename}: expected one rollout request (a mapping)", EXIT_USAGE)
                body = docs[0]
            flags = {"image": image, "version": version, "container": container,
                     "maxUnavailable": _amount(max_unavailable), "failureThreshold": _amount(failure_threshold),
                     "healthTimeout": health_timeout}
            body.update({k: v for k, v in flags.items() if v is not None})
            if canary:
                body["waves"] = {**(body.get("waves") or {}), "canary": canary}
            if not body.get("image") and not body.get("templatePatch"):
                raise ClientError("give --image IMAGE, or -f FILE with a templatePatch", EXIT_USAGE)
            created = api_for(server, token_file).request("POST", "/api/v1/rollouts", body)
            typer.echo(f"rollout {created['id']} started: version {created.get('version')} over "
                       f"{created.get('nodeCount')} nodes in {created.get('waveCount')} waves")

    @rollout_app.command("status")
    def status(
        rollout_id: Annotated[int | None, typer.Argument(help="The rollout [the newest]")] = None,
        output: Output = None,
        watch: Annotated[bool, flag("--watch", "-w", help="Poll until the rollout ends")] = False,
        server: Server = None,
        token_file: TokenFile = None,
    ) -> None:
        """A rollout's state, wave and every node's progress."""
        with one_line_errors():
            check_output(output)
            api = api_for(server, token_file)
            number = rollout_id if rollout_id is not None else newest_rollout(api, active_only=False)
            while True:
                detail = api.get(f"/api/v1/rollouts/{number}")
                if output in ("json", "yaml"):
                    typer.echo(dump(detail, output))
                else:
                    _print_rollout(detail, output == "wide")
                if not watch or detail.get("state") not in ACTIVE_ROLLOUT:
                    break
                time.sleep(2.0)
            if detail.get("state") == "rolled-back":
                raise typer.Exit(code=EXIT_REFUSED)

    @rollout_app.command("cancel")
    def cancel(
        rollout_id: Annotated[int | None, typer.Argument(help="The rollout [the active one]")] = None,
        server: Server = None,
        token_file: TokenFile = None,
    ) -> None:
        """Stop an active rollout where it is (the DaemonSet template stays as it is)."""
        _act_on_rollout(rollout_id, server, token_file, "cancel", "rollout {} cancelled")

    @rollout_app.command("rollback")
    def rollback(
        rollout_id: Annotated[int | None, typer.Argument(help="The rollout [the active one]")] = None,
        server: Server = None,
        token_file: TokenFile = None,
    ) -> None:
        """Roll an active rollout back: the nodes it restarted go back to the previous template."""
        _act_on_rollout(rollout_id, server, token_file, "rollback", "rollout {}: rollback requested")


def _act_on_rollout(rollout_id: int | None, server: str | None, token_file: Path | None, action: str,
                    said: str) -> None:
    """POST /api/v1/rollouts/{id}/<action> on the given rollout, or the active one."""
    with one_line_errors():
        api = api_for(server, token_file)
        number = rollout_id if rollout_id is not None else newest_rollout(api, active_only=True)
        api.request("POST", f"/api/v1/rollouts/{number}/{action}")
        typer.echo(said.format(number))


def _amount(value: str | None) -> int | str | None:
    """`3` → 3 (a count), `10%` stays a percentage, as the API takes them."""
    if value is None:
        return None
    return int(value) if value.strip().isdigit() else value.strip()


def _print_rollout(detail: dict[str, Any], wide: bool) -> None:
    for line in table([detail], ROLLOUT_COLUMNS, wide=wide, width=terminal_width()):
        typer.echo(line)
    if detail.get("reason"):
        typer.echo(f"Reason: {detail['reason']}")
    nodes = detail.get("nodes") or []
    if nodes:
        typer.echo("")
        for line in table(nodes, ROLLOUT_NODE_COLUMNS, wide=wide, width=terminal_width()):
            typer.echo(line)
