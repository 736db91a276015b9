"""`dcgmi diag -r <level> -i <N>` for a simulated node (see edge/sim/tools/__init__.py).

Prints dcgmi's result table (the DCGM 3.x layout: metadata, then the tests by category, a failed
test followed by a Warning row with the reason) and exits as dcgmi does: 0 when every test
passed; 226 when one failed (DCGM_ST_NVVS_ERROR, -30, as the unsigned exit byte: what DCGM's own
test harness expects of `dcgmi diag` on a failure). Unsure, no source found: the code for a GPU
id that does not exist; we answer 254 (DCGM_ST_BADPARAM, -2). 2 when the simulation cannot be
reached or the arguments are wrong.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from edge.sim.tools.client import call, fail, gpu_index

PROG = "dcgmi"
DIAG_FAILED_EXIT = 226  # DCGM_ST_NVVS_ERROR (-30) as an exit status
BAD_PARAM_EXIT = 254  # DCGM_ST_BADPARAM (-2); see the module docstring
DCGM_VERSION = "3.3.7"
_NAME_WIDTH, _RESULT_WIDTH = 25, 46


def _row(name: str, result: str) -> str:
    return f"| {name:<{_NAME_WIDTH}} | {result[:_RESULT_WIDTH]:<{_RESULT_WIDTH}} |"


def _section(title: str, first: bool) -> str:
    head = f"-----  {title}  "
    left = (("|" if first else "+") + head).ljust(_NAME_WIDTH + 3, "-")
    return left + "+" + "-" * (_RESULT_WIDTH + 2) + ("|" if first else "+")


def render(results: list[dict[str, Any]]) -> str:
    """The table dcgmi prints for the results of one or more GPUs."""
    rule = "+" + "-" * (_NAME_WIDTH + 2) + "+" + "-" * (_RESULT_WIDTH + 2) + "+"
    lines = ["Successfully ran diagnostic for group.", rule, _row("Diagnostic", "Result"),
             rule.replace("-", "="), _section("Metadata", True), _row("DCGM Version", DCGM_VERSION),
             _row("Driver Version Detected", results[0]["driver_version"]),
             _row("GPU Device IDs Detected", ",".join(r["pci_device_id"] for r in results))]
    categories: list[str] = []
    for result in results:
        for test in result["tests"]:
            if test["category"] not in categories:
                categories.append(test["category"])
    for category in categories:
        lines.append(_section(category, category == "Deployment"))
        names = [t["name"] for t in results[0]["tests"] if t["category"] == category]
        for name in names:
            outcomes = [(r["index"], next(t for t in r["tests"] if t["name"] == name)) for r in results]
            failed = [(i, t) for i, t in outcomes if t["result"] == "Fail"]
            if category == "Deployment":
                verdict = "Fail" if failed else ("Skip" if all(t["result"] == "Skip" for _, t in outcomes)
                                                 else "Pass")
            elif failed:
                verdict = "Fail - GPU: " + ", ".join(str(i) for i, _ in failed)
            else:
                verdict = ("Skip - All" if all(t["result"] == "Skip" for _, t in outcomes) else "Pass - All")
            lines.append(_row(name, verdict))
            for _, test in failed:
                lines.append(_row("Warning", test["info"] or ""))
    lines.append(rule)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Simulated dcgmi: diag only")
    sub = parser.add_subparsers(dest="command", required=True)
    diag = sub.add_parser("diag", help="run a diagnostic")
    diag.add_argument("-r", "--run", required=True, help="the run level, 1 to 4")
    diag.add_argument("-i", "--gpuList", required=True, help="GPU indices, comma separated")
    args = parser.parse_args(argv)
    if args.run not in ("1", "2", "3", "4"):
        fail(PROG, f"Error: invalid run level {args.run!r}: this stand-in runs levels 1 to 4", 2)
    results = []
    for raw in args.gpuList.split(","):
        index = gpu_index(PROG, raw.strip())
        status, body = call(PROG, "POST", f"/api/v1/sim/gpus/{index}/diag?level={args.run}")
        if status == 404:
            print(f"Error: GPU {index} was not found on this node.", file=sys.stderr)
            return BAD_PARAM_EXIT
        if status != 200:
            fail(PROG, f"Error: the diagnostic could not run: HTTP {status} {body}", 2)
        results.append(body)
    print(render(results))
    return 0 if all(r["passed"] for r in results) else DIAG_FAILED_EXIT


if __name__ == "__main__":
    sys.exit(main())
