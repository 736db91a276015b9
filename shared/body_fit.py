"""An event body cut to fit the broker's message size limit, rather than dropped: an event that
never arrives would hold back the acknowledgement of every event after it (the edge's outbox
calls it before it stores an event)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from shared.protocol import BODY_MODELS, MAX_PAYLOAD_BYTES, Kind, make_envelope
from shared.wire import WireModel

# The tightest caps `fit_body` tries, in turn: long strings and collections cut to these sizes.
_FIT_CAPS = (16384, 4096, 1024, 256, 64)


def _cut(value: Any, cap: int) -> Any:
    """A JSON value with every string cut to `cap` characters (saying how much went) and every
    list or object to `max(8, cap // 64)` items."""
    if isinstance(value, str):
        return value if len(value) <= cap else f"{value[:cap]}…[{len(value) - cap} characters cut]"
    keep = max(8, cap // 64)
    if isinstance(value, list):
        return [_cut(item, cap) for item in value[:keep]]
    if isinstance(value, dict):
        return {key[:cap]: _cut(item, cap) for key, item in list(value.items())[:keep]}
    return value


def fit_body(node: str, kind: Kind, body: WireModel, max_bytes: int = MAX_PAYLOAD_BYTES) -> WireModel:
    """`body`, or a copy with long strings and collections cut, so that its envelope is at most
    `max_bytes`: the broker drops a bigger message, and an event that never arrives would hold
    back the acknowledgement of every event after it. Raises ValueError when even the tightest
    cut does not fit (no body kgpu makes comes near that)."""
    def size(candidate: WireModel) -> int:
        return len(make_envelope(node, candidate, kind, seq=2**63 - 1).to_json())

    if size(body) <= max_bytes:
        return body
    dumped = body.model_dump(mode="json", by_alias=True)
    for cap in _FIT_CAPS:
        try:
            candidate = BODY_MODELS[kind].model_validate(_cut(dumped, cap))
        except ValidationError:
            continue
        if size(candidate) <= max_bytes:
            return candidate
    raise ValueError(f"a {kind} body cannot be cut to fit {max_bytes} bytes")
