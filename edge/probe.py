"""The operator's application-level health probe: a shell command whose exit status says whether
the node can run work (`probe_command`); run by the daemon every `probe_interval`."""

from __future__ import annotations

import asyncio


async def run_probe(command: str, timeout_s: float) -> tuple[bool, str]:
    """Run the operator's probe command; exit status 0 within the timeout means healthy."""
    try:
        process = await asyncio.create_subprocess_shell(
            command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
    except OSError as exc:
        return False, f"cannot start: {exc}"
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout=timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        return False, f"timed out after {timeout_s:g} s"
    text = output.decode(errors="replace").strip()[-200:]
    if process.returncode != 0:
        return False, f"exit status {process.returncode}: {text}"
    return True, text
