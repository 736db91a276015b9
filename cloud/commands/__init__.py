"""Commands to edge nodes, sent again until the edge answers (the controller's command outbox).

A QoS 1 publish is not the end of a command's road: the broker drops what it queued for a node
whose session was taken over, expired or lost with a broker that restarted without its
persistence file, and a node that never connected has no session to queue into at all. The edge
applies each command id at most once and answers with a `command_result` event, so the controller
can safely send the same command again until that answer is stored: at-least-once delivery,
at-most-once effect.

- `EdgeCommands.send()` stores the command (table `edge_commands`) before it first publishes it,
  so a command survives a controller restart too; its id decides: a second `send()` of an id is a
  no-op.
- The leader re-publishes every pending command of an online node every
  `--command-resend-interval` (30 s), for at most `--command-ttl` (1 h; after that it is
  `expired`: the situation it was for is long gone).
- Every replica's ingest marks the results (a result reaches whichever replica's share of the
  subscription it falls in).

Operators send `drain`, `undrain` and `restart_check` with `POST /api/v1/nodes/{node}/commands`
and read them back from `GET /api/v1/commands`; the migration part sends its own.

Modules: `model` (the request body and a command's state: pure), `repository` (the table),
`outbox` (`EdgeCommands`: sending, the re-send loop, results), `http` (the routes).
"""

from cloud.commands.model import OperatorCommand, command_state
from cloud.commands.outbox import SCAN_INTERVAL_S, EdgeCommands

__all__ = ["SCAN_INTERVAL_S", "EdgeCommands", "OperatorCommand", "command_state"]
