"""A stand-in for NVIDIA's `nvpmodel` over a simulated Jetson tree (edge/sim/jetson/tree.py).

    python -m edge.sim.jetson.nvpmodel --root DIR -q [--verbose]   # the mode in force
    python -m edge.sim.jetson.nvpmodel --root DIR -m ID            # switch mode
    python -m edge.sim.jetson.nvpmodel --root DIR -p --verbose     # list the modes

Like the real tool it reads DIR/etc/nvpmodel.conf (its "< PARAM TYPE=CLOCK NAME=GPU >" block names
the devfreq files, each "< POWER_MODEL ID=n NAME=x >" block the GPU MIN_FREQ/MAX_FREQ of that mode:
-1 the table's top, 0 its bottom), writes the GPU's devfreq files for `-m` (the simulated kernel
clamps them at its next tick) and keeps the mode in DIR/var/lib/nvpmodel/status ("pmode:0002").
Its output has the lines jetson-stats parses (jtop/core/nvpmodel.py): "NV Power Mode: <NAME>" and
the ID on the next line for -q; "POWER_MODEL: ID=n NAME=x" and "PM_CONFIG: DEFAULT=x(n)" for -p.
A control file it may not write (mode 0444: the simulation's permissions="none") fails the switch
with "NVPM ERROR", exit status 1, as the real tool fails without root.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

STATUS = Path("var/lib/nvpmodel/status")
_BLOCK = re.compile(r"<\s*(?P<kind>\w+)\s+(?P<attrs>[^>]*)>")


@dataclass
class Conf:
    gpu_files: dict[str, str] = field(default_factory=dict)  # FREQ_TABLE/MAX_FREQ/MIN_FREQ -> path
    modes: dict[int, tuple[str, dict[str, int]]] = field(default_factory=dict)  # id -> (name, GPU knobs)
    default: int = 0


def read_conf(root: Path) -> Conf:
    conf = Conf()
    section: tuple[str, dict[str, str]] | None = None
    for raw in (root / "etc/nvpmodel.conf").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if match := _BLOCK.match(line):
            attrs = dict(part.split("=", 1) for part in match["attrs"].split() if "=" in part)
            section = (match["kind"], attrs)
            if match["kind"] == "POWER_MODEL":
                conf.modes[int(attrs["ID"])] = (attrs["NAME"], {})
            elif match["kind"] == "PM_CONFIG":
                conf.default = int(attrs["DEFAULT"])
            continue
        parts = line.split()
        if section is None:
            continue
        kind, attrs = section
        if kind == "PARAM" and attrs.get("NAME") == "GPU" and len(parts) == 2:
            conf.gpu_files[parts[0]] = parts[1]
        elif kind == "POWER_MODEL" and len(parts) == 3 and parts[0] == "GPU":
            conf.modes[int(attrs["ID"])][1][parts[1]] = int(parts[2])
    return conf


def current_mode(root: Path, conf: Conf) -> int:
    try:
        return int((root / STATUS).read_text().split("pmode:", 1)[1].split()[0])
    except (OSError, IndexError, ValueError):
        return conf.default


def _under(root: Path, absolute: str) -> Path:
    return root / absolute.lstrip("/")


def set_mode(root: Path, conf: Conf, mode_id: int) -> None:
    if mode_id not in conf.modes:
        raise SystemExit(f"NVPM ERROR: Invalid power mode ID {mode_id} (valid: "
                         f"{', '.join(map(str, sorted(conf.modes)))})")
    _, knobs = conf.modes[mode_id]
    table = sorted(int(v) for v in _under(root, conf.gpu_files["FREQ_TABLE"]).read_text().split())
    wanted = {}
    for knob in ("MAX_FREQ", "MIN_FREQ"):
        if knob in knobs:
            value = knobs[knob]
            wanted[knob] = table[-1] if value < 0 else (table[0] if value == 0 else value)
    for knob in wanted:
        path = _under(root, conf.gpu_files[knob])
        if not path.stat().st_mode & 0o222:
            raise SystemExit(f"NVPM ERROR: failed to write {conf.gpu_files[knob]}: Permission denied")
    order = ["MIN_FREQ", "MAX_FREQ"]
    current_min = int(_under(root, conf.gpu_files["MIN_FREQ"]).read_text().split()[0])
    if "MAX_FREQ" in wanted and wanted["MAX_FREQ"] >= current_min:
        order.reverse()  # raising: the ceiling first
    for knob in order:
        if knob in wanted:
            _under(root, conf.gpu_files[knob]).write_text(f"{wanted[knob]}\n")
    (root / STATUS).parent.mkdir(parents=True, exist_ok=True)
    (root / STATUS).write_text(f"pmode:{mode_id:04d} fmode:quiet\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nvpmodel", description="simulated nvpmodel (kgpu)")
    parser.add_argument("--root", type=Path, required=True, help="the simulated tree's root")
    parser.add_argument("-q", action="store_true", help="query the power mode in force")
    parser.add_argument("-m", type=int, metavar="ID", help="set the power mode")
    parser.add_argument("-p", action="store_true", help="print the modes")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        conf = read_conf(args.root)
    except OSError as error:
        print(f"NVPM ERROR: cannot read /etc/nvpmodel.conf: {error}", file=sys.stderr)
        return 1
    try:
        if args.m is not None:
            set_mode(args.root, conf, args.m)
    except SystemExit as refusal:
        print(refusal, file=sys.stderr)
        return 1
    if args.q:
        mode = current_mode(args.root, conf)
        print("NV Fan Mode:quiet")
        print(f"NV Power Mode: {conf.modes.get(mode, ('UNKNOWN', {}))[0]}")
        print(mode)
    if args.p:
        default_name = conf.modes.get(conf.default, ("UNKNOWN", {}))[0]
        print(f"NVPM VERB: PM_CONFIG: DEFAULT={default_name}({conf.default})")
        for mode_id, (name, _) in sorted(conf.modes.items()):
            print(f"NVPM VERB: POWER_MODEL: ID={mode_id} NAME={name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
