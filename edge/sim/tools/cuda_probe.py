"""A CUDA context probe for a simulated node: `python -m edge.sim.tools.cuda_probe -i N`.

Not a stand-in for an NVIDIA tool (there is no standard one): it answers what creating a CUDA
context on the GPU would, from the simulation (edge/sim/diagnostics.py): exit 0 and one line when
a context can be made; exit 1 and the CUDA error on stderr when not (the GPU is lost or needs a
reset or a reboot); 2 when the simulation cannot be reached or the GPU does not exist.
"""

from __future__ import annotations

import argparse
import sys

from edge.sim.tools.client import call, fail, gpu_index

PROG = "cuda_probe"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Can a CUDA context be made on GPU N?")
    parser.add_argument("-i", "--id", required=True, help="the GPU's index")
    args = parser.parse_args(argv)
    index = gpu_index(PROG, args.id)
    status, body = call(PROG, "POST", f"/api/v1/sim/gpus/{index}/diag?level=1")
    if status == 404:
        fail(PROG, f"cudaErrorInvalidDevice: no GPU {index} on this node", 2)
    if status != 200:
        fail(PROG, f"the probe could not run: HTTP {status} {body}", 2)
    context = body["cuda_context"]
    if not context["ok"]:
        print(context["error"], file=sys.stderr)
        return 1
    print(f"CUDA context created and released on GPU {index} ({body['uuid']}, {body['pci_bus_id']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
