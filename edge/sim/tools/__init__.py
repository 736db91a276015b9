"""Stand-ins for the command-line tools the remediation ladder runs, for a simulated node.

`python -m edge.sim.tools.nvidia_smi --gpu-reset -i N`, `python -m edge.sim.tools.dcgmi diag -r 1
-i N`, `python -m edge.sim.tools.cuda_probe -i N` and `python -m edge.sim.tools.reboot` act on the
simulation inside a running `kgpu edge run --backend sim` through its sim HTTP API, found at
`$KGPU_EDGE_API` (the daemon sets it for the commands it runs). They print what the real tools
print and exit with their codes, so the ladder's handling of real output is exercised. Standard
library only (urllib): they must start fast and need nothing but Python.
"""
