"""Thermal settling: how the edge's power policy brings a GPU at full load in a hot cabinet under
`maxTempC`, counted in decisions, against the same policy module at an earlier git revision.

The pure `evaluate` of edge/policy.py drives the simulated GPU's physics in simulated time
(kgpu/lab/thermal.py, as tests/test_thermal_settling.py does): 8 minutes, 100 % load, a 55 °C
cabinet, the demo's policy (maxTempC 80, 10 % steps every 5 s, 60 s cool-down, 5 °C hysteresis).
Printed for each GPU model and start: step-downs, restores, the time of the last thermal decision
(when it settled) and where it ended. `--before REV` also runs edge/policy.py as it was at REV (its
own file, loaded beside the current one), so both sets are from the same run and machine.

    python -m bench.thermal_settling [--before REV] [--interval 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from bench.common import machine
from edge import policy as current_policy
from kgpu.lab.thermal import DEMO_THERMAL, EIGHT_MINUTES, Evaluate, Run, start

CASES = [("H100", None), ("H100", 86.0), ("A100", None), ("A100", 86.0)]


def policy_at(revision: str) -> ModuleType:
    """edge/policy.py as it was at `revision`, loaded as a module of its own."""
    root = Path(__file__).resolve().parent.parent
    text = subprocess.run(["git", "-C", str(root), "show", f"{revision}:edge/policy.py"], check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="kgpu-policy-")) / "policy_before.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("policy_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def summary(run: Run) -> str:
    thermal = run.thermal()
    downs = sum(d.rule != "thermal_restore" for d in thermal)
    last = f"{thermal[-1].at:.0f} s" if thermal else "-"
    return (f"{downs:2d} step-downs, {run.restores():2d} restores, last decision {last:>6}, ends "
            f"{run.gpu.temperature_c:.0f} °C at {run.gpu.power_limit_w:.0f} W")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="also run edge/policy.py as it was at this git revision")
    parser.add_argument("--interval", type=float, default=5.0, help="sampling interval, simulated seconds")
    args = parser.parse_args()
    policies: list[tuple[str, Evaluate]] = [("now", current_policy.evaluate)]
    if args.before:
        policies.insert(0, (f"at {args.before}", policy_at(args.before).evaluate))
    print(f"thermal settling, {machine()}; 100 % load, 55 °C cabinet, demo policy, sampled every "
          f"{args.interval:g} s, {EIGHT_MINUTES / 60:.0f} simulated minutes")
    for model, start_c in CASES:
        for name, evaluate in policies:
            run = start(model, DEMO_THERMAL, ambient_c=55, load_pct=100, temperature_c=start_c,
                        interval=args.interval, policy=evaluate).until(EIGHT_MINUTES)
            begin = "idle" if start_c is None else f"{start_c:.0f} °C"
            print(f"  {model} from {begin:6} {name:>14}: {summary(run)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
