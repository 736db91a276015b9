"""Edge-aware rollouts of the edge daemon's DaemonSet: waves over flaky nodes, per-node state in the DB.

A plain RollingUpdate stalls as soon as an edge node is NotReady (kubernetes issue 117204): its
old pod never terminates and the update waits on it. Here the DaemonSet uses `updateStrategy:
OnDelete` and the leader restarts pods itself, node by node, in waves, judging each node by what
its daemon reports over MQTT (version, online, degraded); an offline node is deferred instead of
blocking, and upgraded when it comes back. The decisions are in cloud/rollout/plan.py (pure);
the rest of the package is the I/O around them: HTTP API, tables, observing the fleet and the pods,
acting.

How a rollout knows the new version: the request names it (`version`), or it is the tag of
`image` (`repo/edge:0.2.0` -> "0.2.0"); a `templatePatch` needs an explicit `version`. A node is
done when its new pod's daemon reports exactly that version, online and not degraded, within
`healthTimeout` of its pod's deletion.

Crash safety: a node's pod is only deleted after `pod-deletion-required` and the pod's uid are
stored; after a restart, a stored uid that is no longer on the node means the deletion happened,
so no pod is ever deleted twice. The template write is recorded too (`template_applied`) and is
idempotent, so a new leader simply continues from the tables.

Rollback restarts the nodes this rollout restarted (see plan); `POST .../cancel` stops
tracking a rollout and leaves the DaemonSet template as it is (the way out of a rollout that waits
forever for a node that will never come back).

Modules: `plan` (the pure planner), `request` (the request body), `views` (the JSON answers),
`repository` (the tables), `kubernetes` (the DaemonSet and its pods), `manager` (creating a
rollout, the leader's loop), `http` (the routes).
"""

from cloud.rollout.manager import MIN_TICK_S, TICK_S, RolloutManager
from cloud.rollout.request import RolloutRequest, Waves
from cloud.rollout.views import RolloutRefused

__all__ = ["MIN_TICK_S", "TICK_S", "RolloutManager", "RolloutRefused", "RolloutRequest", "Waves"]
