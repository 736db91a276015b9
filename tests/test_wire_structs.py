"""The msgspec Structs of the controller's hot path are derived from the pydantic wire models
(shared/wire_structs.py): the same fields, defaults and bounds, and a model they cannot follow
is refused at import instead of decoded differently."""

from __future__ import annotations

import gc
from typing import Any

import msgspec
import pytest
from pydantic import Field, field_validator

from shared.gpu import GpuSample
from shared.protocol import GpuSampleStruct, TelemetryBodyStruct
from shared.wire import CamelModel, WireModel
from shared.wire_structs import UnsupportedModel, struct_of, takes_any_value


def test_the_sample_struct_has_the_models_fields_in_order_with_their_defaults() -> None:
    fields = msgspec.structs.fields(GpuSampleStruct)
    assert [f.name for f in fields] == list(GpuSample.model_fields)
    minimal = {"index": 0, "uuid": "GPU-0", "ts": 1.5}
    from_struct = msgspec.to_builtins(msgspec.convert(minimal, GpuSampleStruct))
    assert from_struct == GpuSample.model_validate(minimal).model_dump(mode="json")


def test_bounds_are_carried_over_and_every_integer_fits_64_bits() -> None:
    decode = msgspec.json.Decoder(GpuSampleStruct).decode
    with pytest.raises(msgspec.ValidationError, match=">= 0"):
        decode(b'{"index": -1, "uuid": "GPU-0", "ts": 1}')
    with pytest.raises(msgspec.ValidationError):
        decode(b'{"index": 0, "uuid": "GPU-0", "ts": 1, "energy_mj": 9223372036854775808}')
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        decode(b'{"index": 0, "uuid": "GPU-0", "ts": 1, "nope": 1}')
    sample = decode(b'{"index": 0, "uuid": "GPU-0", "ts": 1, "energy_mj": 9223372036854775807}')
    assert sample.energy_mj == 2**63 - 1


def test_the_structs_are_not_tracked_by_the_garbage_collector() -> None:
    """Hundreds of thousands of them wait in the ingest's queue under load: the collector's full
    passes would walk every one (docs/benchmarks.md)."""
    body = msgspec.convert({"samples": [{"index": 0, "uuid": "GPU-0", "ts": 1.0}]}, TelemetryBodyStruct)
    assert not gc.is_tracked(body)
    assert not gc.is_tracked(body.samples[0])


class _Validated(WireModel):
    name: str

    @field_validator("name")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()


class _Camel(CamelModel):
    max_temp_c: float


class _Pattern(WireModel):
    name: str = Field(pattern="^a")


class _Open(WireModel):
    model_config = {"extra": "allow"}
    name: str


@pytest.mark.parametrize("model", [_Validated, _Camel, _Pattern, _Open])
def test_a_model_the_derivation_cannot_follow_is_refused(model: type[WireModel]) -> None:
    with pytest.raises(UnsupportedModel):
        struct_of(model)


def test_a_validator_the_caller_applies_itself_may_be_named() -> None:
    struct = struct_of(_Validated, checked_by_caller=frozenset({"name"}))
    assert msgspec.json.decode(b'{"name": "A"}', type=struct).name == "A"  # the caller applies it


class _Untyped(WireModel):
    name: str
    extra: list[dict[str, Any]] = []


def test_a_field_typed_any_is_found_however_deep() -> None:
    """The telemetry decoder leaves the 64-bit check to the Structs' bounds, which a field typed
    Any does not have: shared/protocol.py refuses to start with one (`takes_any_value`)."""
    assert takes_any_value(struct_of(_Untyped))
    assert not takes_any_value(TelemetryBodyStruct)
    assert not takes_any_value(GpuSampleStruct)
