"""Node reboots under a circuit breaker: the cloud grants the reboots the edges' remediation
ladders ask for (edge/remediation/; `reboot_request` events), at most `reboot_max_per_site` per
site per `reboot_window`, one at a time per site, never the last healthy node of a site, and none
at all with `reboot_max_per_site` 0 (advised only). A grant is a `reboot` command through the
command outbox; the edge refuses one it did not ask for. docs/operations.md, "Reboots and the
circuit breaker", is the operator's view.

Modules: `breaker` (the rules: pure), `repository` (the `reboots` table and the fleet view),
`manager` (`RebootManager`: the leader's scan, the commands, the metrics), `http` (the route).
"""

from cloud.reboots.manager import RebootManager

__all__ = ["RebootManager"]
