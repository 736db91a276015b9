"""libfaketime (Debian package `faketime`, installed by scripts/test.sh): a process's wall clock
moved for real, through LD_PRELOAD, while its monotonic clock keeps running true."""

from __future__ import annotations

import glob
from pathlib import Path


def faketime_library() -> str | None:
    """libfaketime's preload library, if installed."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + glob.glob("/usr/lib/faketime/libfaketime.so.1"))
    return found[0] if found else None


def fixed_offset_env(library: str, offset_s: int) -> dict[str, str]:
    """The wall clock `offset_s` seconds off for the whole life of the process."""
    return {"LD_PRELOAD": library, "FAKETIME": f"{offset_s:+d}", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def offset_file_env(library: str, offset_file: Path) -> dict[str, str]:
    """The wall clock offset by what `offset_file` holds (e.g. "+0", "-3h"), read again every
    second: writing the file steps the running process's clock."""
    offset_file.write_text("+0\n")
    return {"LD_PRELOAD": library, "FAKETIME_TIMESTAMP_FILE": str(offset_file), "FAKETIME_CACHE_DURATION": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
