"""Which pod uses which GPU (docs/device-plugin.md, "Which pod uses which GPU").

- `podmap`: `GpuPodMap`, refreshed by the daemon once a cycle: from the kubelet's pod-resources
  API when it answers, else from NVML's processes -> cgroup -> pod (edge/pods.py), and the pure
  folding of device IDs (MIG devices, time-slicing replicas) into their GPU;
- `client`: the blocking `List` call over the kubelet's unix socket;
- `v1`: the stubs generated from `proto/api.proto` (k8s.io/kubelet's podresources/v1, kept
  verbatim) by scripts/gen_protos.sh.
"""

from edge.podresources.podmap import GpuPodMap, Source

__all__ = ["GpuPodMap", "Source"]
