"""Fleet simulator: thousands of light simulated edge nodes in ONE process, against a real broker
and a real controller, speaking the edge's protocol with the edge's envelopes.

Every simulated node behaves like `kgpu edge run` on the wire (edge/sync.py):

- `kgpu/v1/edge/{node}/status`: QoS 1, retained, on connect, on a policy change and every
  `status_interval`; the broker's last will says `offline` when the connection dies uncleanly.
- `kgpu/v1/edge/{node}/telemetry`: QoS 0, one sample of the node's N GPUs every `interval`
  (nodes are spread evenly over the interval, as a real fleet's clocks are).
- `kgpu/v1/edge/{node}/events`: decisions from a per-node outbox numbered by `seq`; at most
  `outbox_window` in flight; an event leaves the outbox only when the cloud's cumulative ack
  (`kgpu/v1/cloud/{node}/ack`, epoch checked) covers it; unacked events are sent again after a
  reconnect or after `ack_timeout`.
- `kgpu/v1/cloud/{node}/#`: acks, the retained policy (its version goes into the next status) and
  commands (applied at most once per id, the result goes back as a `command_result` event).

Payloads are built with shared/protocol.py's own models and `make_envelope`, as the edge builds
them; each node keeps its telemetry body's models and moves their figures (node.py), so the
simulator stays light. Everything received from the cloud is decoded with `shared.protocol.decode`.

Why one asyncio loop driving many paho clients (not one thread per node, not paho's loop_start):
paho's external-loop interface (`on_socket_open/close`, `on_socket_register_write`,
`loop_read/loop_write/loop_misc`) lets one event loop multiplex every client's socket with epoll,
so 2,000 connections cost 2,000 file descriptors and no threads; one thread per client would
spend the machine on context switches and the GIL. All node state lives on that one loop, so
nothing needs a lock. How many nodes share one MQTT connection is a flag
(`nodes_per_connection`):

- 1 (default): one connection per node, exactly as a real fleet: per-node client id
  (`kgpu-edge-{node}`), per-node subscriptions, and a real last will per node. Needs one file
  descriptor per node here and in the broker (the simulator raises its own soft limit; check
  the broker's `max_connections` and `ulimit -n`).
- K > 1: a connection carries K nodes (fewer sockets, e.g. to go past a descriptor limit). MQTT
  gives a connection one will, so only the connection's first node has a broker-side last will;
  the others say `offline` only on a clean stop.

Ingest lag, measured here: for events, from the first publish of a seq to the arrival of the
cumulative ack that covers it (the cloud acks only after the commit, so this is "stored" plus the
ack's trip back); for telemetry (QoS 0, never acked), optional probes poll the controller's
`GET /api/v1/nodes/{node}` after publishing until the node's stored sample carries that `ts`.

Why in the lab and not in bench/: an operator load-tests their own broker and controller with the
installed package (`kgpu fleet-sim`, core dependencies only), without the repository;
bench/fleet_scale.py, bench/outbox_catchup.py and bench/rollout_fleet.py drive the same class
against processes they start.

    node.py        options, measurements, one node's state and its payloads (pure)
    connection.py  one MQTT connection carrying one or more nodes
    fleet.py       FleetSim: the nodes, their schedules, outboxes and what the cloud sends
    run.py         `kgpu fleet-sim`: run, report progress, return the figures

    kgpu fleet-sim --mqtt mqtt://127.0.0.1:1883 --nodes 2000 --gpus 8 --interval 10 \\
        --cloud http://127.0.0.1:9420 --duration 120
"""

from kgpu.lab.fleetsim.connection import SimConnection
from kgpu.lab.fleetsim.fleet import FleetSim, FleetSimError, raise_fd_limit
from kgpu.lab.fleetsim.node import (
    FleetCounters,
    FleetOptions,
    LagRecorder,
    SimNode,
    decision_body,
    envelope_json,
    offline_status_body,
    percentile,
    status_body,
    telemetry_body,
)
from kgpu.lab.fleetsim.run import lag_summary, run_fleet

__all__ = [
    "FleetCounters", "FleetOptions", "FleetSim", "FleetSimError", "LagRecorder", "SimConnection", "SimNode",
    "decision_body", "envelope_json", "lag_summary", "offline_status_body", "percentile", "raise_fd_limit",
    "run_fleet", "status_body", "telemetry_body",
]
