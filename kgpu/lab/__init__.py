"""The lab: everything kgpu needs to run itself without a cluster, a fleet or a GPU.

Why a package of its own: the demo (`kgpu demo`), the tests, the benchmarks (bench/) and the fleet
simulator (`kgpu fleet-sim`) all need the same harness: free ports, child processes, an MQTT broker,
an emulated Kubernetes API and someone playing the cluster's controllers around it. Written once
here, each of them uses the same parts, and the product (edge/, cloud/, shared/) never imports any
of it: its libraries (kmock, amqtt) come with the `lab` extra only (`pip install 'kgpu[lab]'`;
the `demo` and `test` extras include it), so a production node installs no mock.

    processes   free_port, wait_for, Child (a child process with its log), HTTP helpers
    broker      mosquitto (config, persistence, TLS), the amqtt fallback, cuttable relays
    kube        KubeEmulator: kmock's emulated Kubernetes API on a background loop
    manifests   the Kubernetes objects the lab seeds (nodes, GPU pods, the DaemonSet and its pods)
    cluster     ClusterPlayer: kubelet, scheduler, ReplicaSet and DaemonSet controllers, played
    kubelet     KubeletStandIn / KubeletThread: the kubelet's device-plugin Registration service
                (the upstream proto), dialling plugins back, ListAndWatch, Allocate, restarts
    fleetsim    thousands of light simulated edges in one process (`kgpu fleet-sim`)
"""
