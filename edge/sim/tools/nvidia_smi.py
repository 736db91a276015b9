"""`nvidia-smi --gpu-reset -i N` for a simulated node (see edge/sim/tools/__init__.py).

Prints what nvidia-smi prints and exits with its codes (nvidia-smi(1), RETURN VALUE): 0 reset,
6 no such GPU ("No devices were found"), 9 driver not loaded, 255 any other error, the in-use
refusal among them. Only the reset is simulated; anything else is refused with 2 (invalid
argument, as nvidia-smi answers a bad flag). 2 also when the simulation cannot be reached.
"""

from __future__ import annotations

import argparse
import sys

from edge.sim.tools.client import call, fail, gpu_index

PROG = "nvidia-smi"
NOT_FOUND_EXIT = 6
DRIVER_NOT_LOADED_EXIT = 9
OTHER_ERROR_EXIT = 255
IN_USE_ADVICE = (
    "1 device is currently being used by one or more other processes (e.g., Fabric Manager, CUDA "
    "application, graphics application such as an X server, or a monitoring application such as "
    "another instance of nvidia-smi). Please first kill all processes using this device and all "
    "compute applications running in the system."
)
DRIVER_NOT_LOADED = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that "
    "the latest NVIDIA driver is installed and running."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Simulated nvidia-smi: GPU reset only")
    parser.add_argument("-r", "--gpu-reset", action="store_true", help="reset the GPU given with -i")
    parser.add_argument("-i", "--id", required=True, help="the GPU's index")
    args = parser.parse_args(argv)
    if not args.gpu_reset:
        fail(PROG, "this simulated nvidia-smi only resets GPUs (--gpu-reset -i N)", 2)
    index = gpu_index(PROG, args.id)
    status, body = call(PROG, "POST", f"/api/v1/sim/gpus/{index}/reset")
    if status == 200:
        print(f"GPU {body['pci_bus_id']} was successfully reset.")
        return 0
    if status == 404:
        print("No devices were found")
        return NOT_FOUND_EXIT
    detail = body.get("detail") if isinstance(body, dict) else None
    if status == 409 and isinstance(detail, dict):
        if detail.get("reason") == "driver-not-loaded":
            print(DRIVER_NOT_LOADED)
            return DRIVER_NOT_LOADED_EXIT
        print("The following GPUs could not be reset:")
        print(f"  GPU {detail.get('pci_bus_id')}: {detail.get('message')}")
        if detail.get("reason") == "in-use":
            print()
            print(IN_USE_ADVICE)
        return OTHER_ERROR_EXIT
    print(f"Unable to reset GPU {index}: HTTP {status} {body}", file=sys.stderr)
    return OTHER_ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
