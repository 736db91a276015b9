"""Structured logging: JSON lines when stderr is not a terminal, readable text when it is.

Pass context as `extra={"node": ..., "msg_id": ...}`; every key given that way ends up as a
field of the JSON line. Use `get_logger(__name__)` everywhere.
"""

import json
import logging
import re
import sys
import time
from typing import Any

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

_node_name: str | None = None

# scheme://user:password@host — the password part, wherever a URL turns up in a message
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^\s/@:]*:)[^\s/@]*@", re.IGNORECASE)


def scrub(text: str) -> str:
    """Hide every URL password in `text`. Log lines, exceptions and error messages shown to a
    user pass through this, so a secret given in a broker or database URL is never printed."""
    return _URL_PASSWORD.sub(r"\g<head>***@", text)


def set_node(node: str | None) -> None:
    """The node name this process speaks for; added to every line."""
    global _node_name
    _node_name = node


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        if _node_name and "node" not in record.__dict__:
            line["node"] = _node_name
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                line[key] = scrub(value) if isinstance(value, str) else value
        if record.exc_info:
            line["exc"] = scrub(self.formatException(record.exc_info))
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = {
            k: v for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_")
        }
        if _node_name and "node" not in extras:
            extras["node"] = _node_name
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        tail = " ".join(f"{k}={v}" for k, v in extras.items())
        text = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if tail:
            text += f"  [{tail}]"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return scrub(text)


def setup_logging(level: str = "info", json_lines: bool | None = None) -> None:
    """Configure the root logger once per process."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiohttp.access", "alembic.runtime.plugins", "alembic.runtime.migration"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


class ThrottledLog:
    """At most one line per key per `every_s` seconds; the lines held back in between are counted
    and named in the next one ("... (and 12,345 more since 19:40:01)", field `suppressed`).

    For what arrives per message from the network (rejections, refusals): a flood of bad messages
    makes one line every `every_s` per reason, not one per message. Keys must come from a small
    set (reasons, not node names or message ids); past `max_keys` the oldest are forgotten."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0, *, level: int = logging.WARNING,
                 max_keys: int = 1000) -> None:
        self.logger = logger
        self.every_s = every_s
        self.level = level
        self.max_keys = max_keys
        self._last: dict[str, tuple[float, float, int]] = {}  # key -> (monotonic, wall time, held back)

    def log(self, key: str, msg: str, *args: object, extra: dict[str, Any] | None = None,
            now: float | None = None) -> bool:
        """Log `msg % args` unless a line for `key` went out less than `every_s` ago; True if logged."""
        at = time.monotonic() if now is None else now
        last = self._last.get(key)
        if last is not None and at - last[0] < self.every_s:
            self._last[key] = (last[0], last[1], last[2] + 1)
            return False
        fields = dict(extra or {})
        if last is not None and last[2]:
            msg = f"{msg} (and %s more since %s)"
            args = (*args, f"{last[2]:,}", time.strftime("%H:%M:%S", time.localtime(last[1])))
            fields["suppressed"] = last[2]
        if last is None and len(self._last) >= self.max_keys:
            del self._last[next(iter(self._last))]
        self._last.pop(key, None)
        self._last[key] = (at, time.time(), 0)
        self.logger.log(self.level, msg, *args, extra=fields)
        return True
