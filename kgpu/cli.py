"""The `kgpu` command line. Flags map onto the settings models: each flag `--foo-bar` may also
be given as `KGPU_FOO_BAR` or as `foo_bar` in the `--config` file (flags win)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from kgpu.client.commands import register as register_client_commands
from kgpu.client.options import flag as _flag
from kgpu.client.policy_rollout import add_policy_and_rollout
from shared import __version__
from shared.logs import scrub, setup_logging
from shared.settings import ConfigError, load_settings, parse_host_port

# Help texts are plain text: rich markup off, so that a default shown as `[/var/lib/kgpu/edge.db]`
# is printed as written and not parsed as a closing tag (tests/test_cli.py runs every --help).
_PLAIN: dict[str, Any] = {"rich_markup_mode": None, "no_args_is_help": True}

app = typer.Typer(
    name="kgpu",
    help="GPU manager for KubeEdge edge fleets.",
    add_completion=False,
    pretty_exceptions_enable=False,
    **_PLAIN,
)
edge_app = typer.Typer(help="The edge daemon (one per GPU edge node).", **_PLAIN)
app.add_typer(edge_app, name="edge")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"kgpu {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, _flag(
        "--version", help="Print the version and exit", is_eager=True, callback=_print_version)] = False,
) -> None:
    """GPU manager for KubeEdge edge fleets."""


def _http_flag(value: str | None) -> str | None:
    """`--http` means the same on every command: HOST:PORT, :PORT or a bare PORT (every interface)."""
    return f":{value.strip()}" if value is not None and value.strip().isdigit() else value


ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML or TOML settings file", envvar="KGPU_CONFIG")
]


# The third-party libraries each side needs beyond the core install, and the extra that brings them.
_EXTRA_OF = {"pynvml": "edge", "grpc": "edge", "google": "edge",
             "kubernetes": "cloud", "alembic": "cloud", "psycopg": "cloud"}


@contextmanager
def _needs_extra(command: str) -> Iterator[None]:
    """Turn the ImportError of a library that an extra brings into one line naming the extra."""
    try:
        yield
    except ImportError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in _EXTRA_OF:
            raise
        extra = _EXTRA_OF[top]
        typer.echo(f"kgpu: {command} needs the {extra} extra ({top} is missing): pip install 'kgpu[{extra}]'",
                   err=True)
        raise typer.Exit(code=2) from None


def _fail_config(problems: list[str]) -> None:
    for line in problems:
        typer.echo(f"kgpu: configuration error: {line}", err=True)
    raise typer.Exit(code=2)


def _run_edge(flags: dict[str, Any], config: Path | None) -> None:
    from edge.config import EdgeSettings
    from shared.logs import set_node

    try:
        settings = load_settings(EdgeSettings, flags, config)
    except ConfigError as exc:
        _fail_config(exc.problems)
        return
    setup_logging(settings.log_level, settings.log_json)
    set_node(settings.node)
    with _needs_extra("kgpu edge run"):
        from edge.main import serve  # imported late: a config error needs none of the daemon
        from edge.store import StoreError

    try:
        asyncio.run(serve(settings))
    except StoreError as exc:  # the database cannot even be opened: nothing to run on
        typer.echo(f"kgpu: {scrub(str(exc))}", err=True)
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        pass


@edge_app.command("run")
def edge_run(
    node: Annotated[str | None, typer.Option(help="Node name [env NODE_NAME, then hostname]")] = None,
    mqtt: Annotated[str | None, typer.Option(help="Broker URL mqtt://[user:pass@]host:port or mqtts://")] = None,
    db: Annotated[Path | None, typer.Option(help="SQLite file of the edge store [/var/lib/kgpu/edge.db]")] = None,
    http: Annotated[str | None, typer.Option(help="HOST:PORT or PORT for the HTTP API [0.0.0.0:9410]")] = None,
    backend: Annotated[str | None, typer.Option(
        help="nvml, jetson, amd, intel, auto (probe the node) or sim (simulated; docs/devices.md) [nvml]")] = None,
    sim_gpus: Annotated[int | None, typer.Option(help="Simulated GPUs (backend sim; a Jetson has 1) [2]")] = None,
    sim_model: Annotated[str | None, typer.Option(
        help="H100, A100 (80 GB), A100-40GB, A10, T4, ORIN-NANO, ORIN-NX, AGX-ORIN, MI210, MI300X or FLEX170 "
             "(backend sim) [H100]")] = None,
    sysfs_root: Annotated[Path | None, typer.Option(
        help="Where the host's sys/, proc/ and etc/ are (backends jetson, intel, auto) [/]")] = None,
    interval: Annotated[str | None, typer.Option(help="Sampling interval, seconds or e.g. '2s' [5]")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error [info]")] = None,
    device_plugin: Annotated[bool | None, _flag(
        "--device-plugin/--no-device-plugin", help="Also serve the kubelet device-plugin API v1beta1 [off]")] = None,
    kubelet_dir: Annotated[Path | None, typer.Option(
        help="The kubelet's device-plugin directory [/var/lib/kubelet/device-plugins]")] = None,
    resource_name: Annotated[str | None, typer.Option(
        help="Resource whole GPUs are advertised as [the backend's: nvidia.com/gpu, amd.com/gpu, ...]")] = None,
    config: ConfigOpt = None,
) -> None:
    """Run the edge daemon: sample the GPUs, keep them healthy and inside their power policy."""
    _run_edge(
        {"node": node, "mqtt": mqtt, "db": db, "http": _http_flag(http), "backend": backend, "sim_gpus": sim_gpus,
         "sim_model": sim_model, "interval": interval, "log_level": log_level, "device_plugin": device_plugin,
         "kubelet_dir": kubelet_dir, "resource_name": resource_name, "sysfs_root": sysfs_root},
        config,
    )


cloud_app = typer.Typer(help="The cloud controller (central cluster).", **_PLAIN)
app.add_typer(cloud_app, name="cloud")


@cloud_app.command("run")
def cloud_run(
    mqtt: Annotated[str | None, typer.Option(help="Broker URL mqtt://[user:pass@]host:port or mqtts://")] = None,
    db: Annotated[str | None, typer.Option(
        help="sqlite:///path or postgresql+psycopg://... [sqlite:///kgpu-cloud.db]")] = None,
    http: Annotated[str | None, typer.Option(help="HOST:PORT or PORT for the API [0.0.0.0:9420]")] = None,
    shared_subscription: Annotated[str | None, typer.Option(
        help="Group for $share/GROUP/... so replicas split ingest")] = None,
    kubeconfig: Annotated[Path | None, typer.Option(help="kubeconfig file [$KUBECONFIG, ~/.kube/config]")] = None,
    in_cluster: Annotated[bool | None, _flag("--in-cluster", help="Use the pod's service account")] = None,
    no_kube: Annotated[bool | None, _flag("--no-kube", help="No cluster: REST policies only")] = None,
    api_token_file: Annotated[Path | None, typer.Option(help="File holding the API bearer token")] = None,
    api_token_secret: Annotated[str | None, typer.Option(
        help="[NAMESPACE/]NAME[:KEY] of a Secret holding the API bearer token")] = None,
    api_auth: Annotated[str | None, typer.Option(help="reads-open or all: what needs the token [reads-open]")] = None,
    api_insecure: Annotated[bool | None, _flag(
        "--api-insecure", help="No token configured: allow changes anyway (a lab only)")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error [info]")] = None,
    config: ConfigOpt = None,
) -> None:
    """Run the cloud controller: ingest every edge node over MQTT into the fleet store."""
    from cloud.config import CloudSettings

    try:
        settings = load_settings(
            CloudSettings,
            {"mqtt": mqtt, "db": db, "http": _http_flag(http), "shared_subscription": shared_subscription,
             "log_level": log_level,
             "kubeconfig": kubeconfig, "in_cluster": in_cluster, "no_kube": no_kube,
             "api_token_file": api_token_file, "api_token_secret": api_token_secret, "api_auth": api_auth,
             "api_insecure": api_insecure},
            config,
        )
    except ConfigError as exc:
        _fail_config(exc.problems)
        return
    setup_logging(settings.log_level, settings.log_json)
    with _needs_extra("kgpu cloud run"):
        from kubernetes.config import ConfigException

        from cloud.app import serve
        from cloud.store import FleetStoreError

    try:
        asyncio.run(serve(settings))
    except FleetStoreError as exc:  # the fleet database cannot be opened or migrated at start
        typer.echo(f"kgpu: {scrub(str(exc))}", err=True)
        raise typer.Exit(code=1) from None
    except ConfigException as exc:
        typer.echo(f"kgpu: cannot reach Kubernetes: {exc}; pass --kubeconfig FILE, --in-cluster or --no-kube", err=True)
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:
        pass


@app.command("demo")
def demo(
    nodes: Annotated[int, typer.Option(min=2, max=12, help=(
        "Simulated GPU edge nodes: the first four NVIDIA (the scenario's), then a Jetson Orin NX, an AMD "
        "MI210 and an Intel Flex 170 in turn"))] = 7,
    http: Annotated[str, typer.Option(
        help="PORT (or 127.0.0.1:PORT) of the controller's API and dashboard; the demo listens on loopback only")]
    = "9420",
    scenario: Annotated[bool, _flag(
        "--scenario",
        help="Play a narrated story (thermal spike, XID migration, a node cut off, a rollout), then exit")] = False,
    fast: Annotated[bool, _flag("--fast", help="With --scenario: shorten the waits (for tests)")] = False,
    keep: Annotated[bool, _flag("--keep", help="Keep the temp dir (databases, logs) on exit")] = False,
) -> None:
    """Everything on one machine, no cluster: mosquitto, an emulated Kubernetes API, the controller and
    simulated GPU edge nodes. Ctrl-C stops it all."""
    port = _demo_port(http)
    try:  # late: other commands need none of it; the lab's libraries come with the `lab` extra
        from kgpu.demo import DemoOptions, run_demo
    except ImportError as exc:
        typer.echo(f"kgpu: kgpu demo needs the lab extra ({exc.name} is missing): pip install 'kgpu[lab]'", err=True)
        raise typer.Exit(code=2) from None

    options = DemoOptions(nodes=nodes, http=port, scenario=scenario, fast=fast, keep=keep)
    raise typer.Exit(code=run_demo(options))


def _demo_port(value: str) -> int:
    """The demo's `--http`: a bare PORT as before, or HOST:PORT as the other commands take it, with
    a loopback host (the demo's controller runs without a token: it must not face a network)."""
    try:
        host, port = parse_host_port(_http_flag(value) or "", default_host="127.0.0.1")
    except ValueError as exc:
        typer.echo(f"kgpu: --http: {exc}", err=True)
        raise typer.Exit(code=2) from None
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"kgpu: --http: the demo serves on 127.0.0.1 only, not {host!r}; give a PORT", err=True)
        raise typer.Exit(code=2)
    return port


@app.command("watch")
def watch(
    mqtt: Annotated[str | None, typer.Option(
        help="Broker URL mqtt://host:port or mqtts://, user:pass@ optional", envvar="KGPU_MQTT")] = None,
    node: Annotated[str | None, typer.Option(
        help="Only this node: its messages, and a per-GPU view (health, temperature, power and limit)")] = None,
    kind: Annotated[str | None, typer.Option(
        help="Only this topic kind (status, telemetry, events, ack, policy, commands) or envelope kind "
             "(decision, health, xid, migration_request, command_result, offline_summary, command)")] = None,
    json_lines: Annotated[bool, _flag(
        "--json", help="One JSON line per message on stdout, no table")] = False,
    events: Annotated[int, typer.Option(help="How many latest events the display keeps")] = 20,
    ca_file: Annotated[Path | None, typer.Option(
        help="CA bundle for mqtts:// (default: the system's)", envvar="KGPU_MQTT_CA_FILE")] = None,
    cert_file: Annotated[Path | None, typer.Option(
        help="Client certificate for mutual TLS", envvar="KGPU_MQTT_CERT_FILE")] = None,
    key_file: Annotated[Path | None, typer.Option(
        help="Client key for mutual TLS", envvar="KGPU_MQTT_KEY_FILE")] = None,
    tls_insecure: Annotated[bool, _flag(
        help="Skip the broker's hostname check (explicit opt-in only)",
        envvar="KGPU_MQTT_TLS_INSECURE")] = False,
    password_file: Annotated[Path | None, typer.Option(
        help="File holding the MQTT password; overrides the URL's", envvar="KGPU_MQTT_PASSWORD_FILE")] = None,
) -> None:
    """Live monitor of the kgpu MQTT topics (read-only): nodes, rates, events, rejected messages."""
    import signal

    from kgpu.watch import WatchError, WatchOptions, run_watch  # late: other commands need none of it

    # SIGTERM (kubectl exec, a supervisor) ends the watch as cleanly as Ctrl-C does
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    options = WatchOptions(mqtt=mqtt, node=node, kind=kind, json_lines=json_lines, ca_file=ca_file,
                           cert_file=cert_file, key_file=key_file, tls_insecure=tls_insecure,
                           password_file=password_file, max_events=events)
    try:
        code = run_watch(options)
    except WatchError as exc:
        typer.echo(f"kgpu: {exc}", err=True)
        raise typer.Exit(code=2) from None
    raise typer.Exit(code=code)


@app.command("fleet-sim")
def fleet_sim(
    mqtt: Annotated[str, typer.Option(help="Broker URL mqtt://[user:pass@]host:port", envvar="KGPU_MQTT")],
    nodes: Annotated[int, typer.Option(min=1, help="Simulated edge nodes")] = 100,
    gpus: Annotated[int, typer.Option(min=1, max=64, help="GPUs per node")] = 8,
    interval: Annotated[float, typer.Option(min=0.1, help="Telemetry interval per node, seconds")] = 10.0,
    event_every: Annotated[float, typer.Option(
        min=0.0, help="Mean seconds between two events of a node (0: none)")] = 60.0,
    status_interval: Annotated[float, typer.Option(
        min=1.0, help="Retained status re-published this often, seconds")] = 30.0,
    nodes_per_connection: Annotated[int, typer.Option(
        min=1, help="Nodes sharing one MQTT connection (1: one per node, each with its own last will)")] = 1,
    prefix: Annotated[str, typer.Option(help="Node names are PREFIX-00000, PREFIX-00001, ...")] = "sim",
    cloud: Annotated[str | None, typer.Option(
        help="Controller HTTP base URL (http://host:9420): probe how long telemetry takes to be stored")] = None,
    duration: Annotated[float, typer.Option(min=0.0, help="Seconds to run (0: until Ctrl-C)")] = 0.0,
    report_every: Annotated[float, typer.Option(min=1.0, help="Seconds between progress lines")] = 10.0,
) -> None:
    """Simulate a whole fleet of light edge nodes in one process against a real broker and controller
    (same topics and envelopes as `kgpu edge run`), and report ingest lag."""
    import json

    try:  # late: other commands need none of it
        from kgpu.lab.fleetsim import FleetOptions, FleetSimError, run_fleet
    except ImportError as exc:
        typer.echo(f"kgpu: kgpu fleet-sim needs the lab extra ({exc.name} is missing): pip install 'kgpu[lab]'",
                   err=True)
        raise typer.Exit(code=2) from None

    try:
        options = FleetOptions(mqtt=mqtt, nodes=nodes, gpus=gpus, interval_s=interval, event_every_s=event_every,
                               status_interval_s=status_interval, nodes_per_connection=nodes_per_connection,
                               prefix=prefix, cloud=cloud.rstrip("/") if cloud else None)
    except ValueError as exc:
        typer.echo(f"kgpu: {exc}", err=True)
        raise typer.Exit(code=2) from None
    setup_logging("warning", False)
    try:
        result = asyncio.run(run_fleet(options, duration, report_every, echo=typer.echo))
    except KeyboardInterrupt:
        return
    except FleetSimError as exc:
        typer.echo(f"kgpu: {exc}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(json.dumps(result, indent=2))


register_client_commands(app)
add_policy_and_rollout(app, _PLAIN)


@app.command("version")
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
