"""`systemctl reboot` for a simulated node: `python -m edge.sim.tools.reboot`.

Reboots the simulation inside the edge daemon (every GPU freshly booted, the driver reloaded; the
daemon itself keeps running). Exits 0 once done, as `systemctl reboot` exits 0 once the reboot is
queued; 2 when the simulation cannot be reached.
"""

from __future__ import annotations

import sys

from edge.sim.tools.client import call, fail

PROG = "reboot"


def main(argv: list[str] | None = None) -> int:
    if argv or (argv is None and sys.argv[1:]):
        fail(PROG, "this simulated reboot takes no arguments", 2)
    status, body = call(PROG, "POST", "/api/v1/sim/reboot")
    if status != 200:
        fail(PROG, f"the simulated node did not reboot: HTTP {status} {body}", 2)
    print(f"simulated node rebooted (boot {body['boots']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
