"""Why a file cannot be made where it is asked for: shared by the edge store and the fleet store,
whose SQLite says only "unable to open database file" for a missing, read-only or blocked directory."""

from __future__ import annotations

import os
from pathlib import Path


def directory_problem(path: Path) -> str | None:
    """Why no database can be made or written at `path` because of where it is (a directory that is
    missing and cannot be made, read-only, or a file), in words an operator can act on; None when
    the place is fine and the trouble, if any, is the file itself. SQLite only says "unable to open
    database file" for all of these."""
    parent = path.parent
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory: the database cannot be made under it"
    read_only = _read_only(existing)
    if existing != parent and read_only:
        return f"directory {parent} does not exist and cannot be made: {existing} {read_only}"
    if read_only:
        return f"directory {parent} {read_only}: SQLite writes its journal beside the file"
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return f"{path} is not readable and writable for uid {os.geteuid()}"
    return None


def _read_only(directory: Path) -> str | None:
    """How `directory` is read-only (its filesystem, or its permissions for this user), or None."""
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return "is on a read-only filesystem"
    except OSError:
        pass
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"is read-only for uid {os.geteuid()}"
    return None
