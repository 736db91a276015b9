"""Task migration: move GPU work off a failing node, through the Kubernetes API.

Triggers (found by the leader's periodic scan, woken early by ingested requests and health
events):

* `edge-request`: a `migration_request` event from an edge (XID 48/79/94/95, double-bit ECC,
  critical temperature ...). Each event is consumed once (`migration_triggers` remembers it).
* `gpu-unhealthy`: a GPU unhealthy or lost for longer than `migration_grace`, timed from the
  health events (cloud clock), or from when this controller first saw it unhealthy.
* `node-offline`: a node offline past `offline_threshold` with GPU pods that opted in to leave it
  (annotation `kgpu.io/migrate-when-offline: "<duration>"`, moved once the node has been offline that
  long, or selected by `offline_migration_selector`); never a pod tolerating
  `node.kubernetes.io/unreachable` without `tolerationSeconds`; none in a zone with more than
  `offline_zone_max_share` of its nodes offline (the zone guard). Originals are never
  force-deleted. See docs/operations.md, "Offline nodes and split-brain". Pods waiting for their
  duration keep the migration in progress with one `hold` step.

One migration is open per node at a time: a trigger for a node with an open migration is merged
into it (a "trigger merged" step; the GPU joins its subjects; a node-level request adds the
subject `node`). A finished migration (completed, failed) that gains a subject is in progress
again (a `reopen` step): the new GPU's pods move, and the node taint is checked again.

Which pods move. The Kubernetes API does not say which GPU a pod holds; the edge does: its status
lists the pods on each GPU (`GpuSummary.pods`; MIG devices and time-slicing replicas folded into
their GPU) and where the listing came from (`StatusBody.pod_map_source`), and the repository reads
both into the fleet view (`GpuView.pods`, `World.pod_sources`). A GPU migration moves the pods
listed on its subject GPUs; a pod listed only on other GPUs never moves. Per `pod-resources` (the
kubelet's allocations: every device of every pod) that is all; per `processes` (NVML's processes:
only pods running GPU work now) a GPU pod seen on no GPU moves too, as it may hold a failing one.
With the source unknown (an older edge), or a subject GPU missing from the status, every GPU pod
of the node moves, and the find-pods step says why. A node-level migration (offline, an edge
request without a GPU) moves every GPU pod of the node.

The node taint. The edge's device plugin fences a failing GPU by itself (advertised unhealthy), so
the node keeps taking work on its healthy GPUs: the node is tainted only for a node-level trigger
or when no GPU of it is left in service (healthy, and `remediation` None: not held by the edge's
remediation ladder); otherwise the taint step is recorded `skipped` with the reason, and a later
trigger that leaves no GPU in service adds the taint then.

States: `needs-cluster` (recorded with --no-kube; pending once a controller with a cluster
leads), `deferred` (cool-down: the node had a migration start less than
`migration_node_cooldown` ago; pending when it ends), `pending` (waiting for one of
`migration_max_concurrent` slots), `in-progress`, `completed` (its pods moved; a node taint, if
one was needed, stays until recovery), `failed` (a pod could not be moved after repeated errors;
taint kept), `recovered` (every subject GPU healthy again with its `remediation` None, so out of
the edge's remediation ladder, and our taint gone), `cancelled` (back in service before the
migration started). A started migration always finishes: an XID 79 GPU
that comes back has already killed the work on it.

Steps of an in-progress migration, each recorded in the row's `steps` right after it happens:
taint the node `kgpu.io/gpu-unhealthy=<uuid>:NoSchedule` when the rule above says so (the full
taint list is patched; ours is added once), tell the edge `migrate_away` for each subject GPU,
find the pods to move (with those left alone and why), pick a target per pod
(placement.py), evict controller-owned pods (a 429 from a PodDisruptionBudget is retried
with backoff), recreate bare pods on the target (required node affinity on
`kubernetes.io/hostname`, deterministic name `<name>-m<id>`, so a repeat is a 409, not a second
copy) and delete the originals. The row is the truth across restarts: a pod recorded as evicted
is never evicted again. Each step is recorded right after its API call (shielded from a loss of
leadership); a crash between the two replays the call, which a real API server makes harmless:
an evicted pod is terminating (skipped), a recreated copy answers 409, a deleted original 404.

Modules, the pure core beside the I/O shell:

* `model`: the data (a migration's row, the fleet view, triggers, steps) and the str enums of
  states (`MigrationState`), triggers, step kinds (`StepKind`) and pod states.
* `triggers`: which fleet state starts, merges, defers, cancels or starts a migration (pure).
* `planner`: the next steps of an in-progress migration: which pods, whether to taint (pure).
* `placement`: the target scorer (pure).
* `manifests`: which pods move, and the Kubernetes objects sent (pure).
* `repository`: the `migrations` and `migration_triggers` tables and the fleet view (store).
* `manager`: `MigrationManager`, the leader's scan and one method per step kind (I/O).
* `http`: `GET /api/v1/migrations[/{id}]`.
"""

from cloud.migration.manager import MigrationManager
from cloud.migration.manifests import TAINT_EFFECT, TAINT_KEY
from cloud.migration.model import (
    NODE_SUBJECT,
    OFFLINE_SUBJECT,
    GpuView,
    Migration,
    MigrationState,
    PodState,
    RequestEvent,
    Rules,
    Step,
    StepKind,
    Trigger,
    TriggerKind,
    World,
)
from cloud.migration.repository import MigrationRepository

__all__ = [
    "NODE_SUBJECT",
    "OFFLINE_SUBJECT",
    "TAINT_EFFECT",
    "TAINT_KEY",
    "GpuView",
    "Migration",
    "MigrationManager",
    "MigrationRepository",
    "MigrationState",
    "PodState",
    "RequestEvent",
    "Rules",
    "Step",
    "StepKind",
    "Trigger",
    "TriggerKind",
    "World",
]
