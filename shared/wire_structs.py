"""msgspec Structs derived from the pydantic wire models, for the controller's hot path.

The pydantic models (shared/protocol.py, shared/gpu.py) are the wire contract. Validating the
telemetry every node sends every few seconds into them costs about 60 µs of CPU a message, and
leaves hundreds of objects for the garbage collector to walk; msgspec decodes the same JSON into
Structs in about 8 µs, into objects the collector does not track (`gc=False`: no Struct here
refers back to another). The Structs are not written by hand: `struct_of` derives each from its
model at import, with the same field names, order, types, defaults and `ge`/`le`/length bounds,
unknown fields refused. A model feature it cannot carry over (a validator, an alias, a constraint
it does not know) raises at import, so the two can never drift apart in silence.

msgspec is stricter than pydantic's lax mode (no `"5"` or `5.0` for an int, no `1` for a bool),
and the Structs bound every integer to 64 bits and every float strictly inside +-2**63 (the
reference decoder's 64-bit check, `_float_bounds`): what they refuse goes to the reference decoder,
which accepts or refuses it and says why. What they accept, the models accept the same
(tests/test_ingest_fuzz.py).
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Protocol, Union

import annotated_types
import msgspec
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # every integer on the wire fits a BIGINT column
FLOAT_INT_LIMIT = float(2**63)  # a float field's values stay strictly inside it (_float_bounds)

_derived: dict[type[BaseModel], type[msgspec.Struct]] = {}


class UnsupportedModel(TypeError):
    """The model uses something `struct_of` cannot carry over faithfully."""


def struct_of(model: type[BaseModel], *, checked_by_caller: frozenset[str] = frozenset()) -> type[msgspec.Struct]:
    """The msgspec Struct accepting what `model` accepts, at most (see the module docstring).

    `checked_by_caller`: fields whose pydantic validators the caller applies itself after decoding
    (e.g. the envelope's node-name check); any other validator makes the model unsupported."""
    cached = _derived.get(model)
    if cached is not None and not checked_by_caller:
        return cached
    _refuse_what_cannot_be_derived(model, checked_by_caller)
    fields: list[tuple[str, Any, Any]] = []
    for name, info in model.model_fields.items():
        fields.append((name, _annotation(info, f"{model.__name__}.{name}"), _default(info)))
    struct: type[msgspec.Struct] = msgspec.defstruct(
        f"{model.__name__}Struct", fields, kw_only=True, forbid_unknown_fields=True, gc=False,
        module=__name__,
    )
    if not checked_by_caller:
        _derived[model] = struct
    return struct


def _refuse_what_cannot_be_derived(model: type[BaseModel], checked_by_caller: frozenset[str]) -> None:
    config = model.model_config
    if config.get("extra") != "forbid":
        raise UnsupportedModel(f"{model.__name__}: only models that forbid unknown fields (WireModel)")
    if config.get("alias_generator") is not None or any(
            f.alias not in (None, name) for name, f in model.model_fields.items()):
        raise UnsupportedModel(f"{model.__name__}: aliases are not carried over")
    decorators = model.__pydantic_decorators__
    if decorators.model_validators or decorators.root_validators or decorators.validators:
        raise UnsupportedModel(f"{model.__name__}: model validators are not carried over")
    for validator in decorators.field_validators.values():
        unchecked = set(validator.info.fields) - checked_by_caller
        if unchecked:
            raise UnsupportedModel(f"{model.__name__}: the validator of {sorted(unchecked)} is not carried over")


def _default(info: FieldInfo) -> Any:
    if info.default_factory is not None:
        return msgspec.field(default_factory=info.default_factory)  # type: ignore[arg-type]
    if info.default is PydanticUndefined:
        return msgspec.NODEFAULT
    if isinstance(info.default, list | dict | set):
        value = info.default
        return msgspec.field(default_factory=lambda: type(value)(value))
    return info.default


def _annotation(info: FieldInfo, where: str) -> Any:
    bounds: dict[str, Any] = {}
    for item in info.metadata:
        if isinstance(item, annotated_types.Ge):
            bounds["ge"] = item.ge
        elif isinstance(item, annotated_types.Le):
            bounds["le"] = item.le
        elif isinstance(item, annotated_types.Gt):
            bounds["gt"] = item.gt
        elif isinstance(item, annotated_types.Lt):
            bounds["lt"] = item.lt
        elif isinstance(item, annotated_types.MinLen):
            bounds["min_length"] = item.min_length
        elif isinstance(item, annotated_types.MaxLen):
            bounds["max_length"] = item.max_length
        else:
            raise UnsupportedModel(f"{where}: the constraint {item!r} is not carried over")
    return _type(info.annotation, where, bounds)


def _float_bounds(bounds: dict[str, Any]) -> dict[str, Any]:
    """A float's bounds, kept strictly inside +-2**63. The reference decoder refuses any integer
    literal beyond 64 bits wherever it stands (`parse_int`); msgspec would take one for a float
    field as a float. Refused here, it goes to the reference, which accepts a float literal that
    large (`1e19`) and refuses the integer: the same answers without scanning every payload for
    long runs of digits first (6 us a telemetry message, half of msgspec's decode)."""
    kept = dict(bounds)
    if not any(kept.get(name, -FLOAT_INT_LIMIT) > -FLOAT_INT_LIMIT for name in ("ge", "gt")):
        kept.pop("ge", None)
        kept["gt"] = -FLOAT_INT_LIMIT
    if not any(kept.get(name, FLOAT_INT_LIMIT) < FLOAT_INT_LIMIT for name in ("le", "lt")):
        kept.pop("le", None)
        kept["lt"] = FLOAT_INT_LIMIT
    return kept


def built_as_is(struct: type[msgspec.Struct], values: dict[str, Any]) -> msgspec.Struct:
    """`struct` holding `values` (a model's `model_dump()`) as they are: what the model accepted
    but the Struct's bounds do not (a float beyond +-2**63, `_float_bounds`). Struct constructors
    check nothing; nested models' dicts become their Structs."""
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    return struct(**{f.name: _as_is(f.type, values[f.name]) for f in info.fields if f.name in values})


def _as_is(info: msgspec.inspect.Type, value: Any) -> Any:
    if isinstance(value, dict) and isinstance(info, msgspec.inspect.StructType):
        return built_as_is(info.cls, value)
    if isinstance(info, msgspec.inspect.UnionType):
        members = [t for t in info.types if isinstance(t, msgspec.inspect.StructType)]
        return _as_is(members[0], value) if members and isinstance(value, dict) else value
    item = getattr(info, "item_type", None)
    if item is not None and isinstance(value, list):
        return [_as_is(item, v) for v in value]
    return value


def takes_any_value(struct: type[msgspec.Struct]) -> bool:
    """Whether a Struct has a field (however deep) typed Any: there msgspec keeps whatever
    number it reads, so a decoder relying on the derived bounds for the 64-bit check cannot."""
    seen: set[type] = set()

    def walk(info: msgspec.inspect.Type) -> bool:
        if isinstance(info, msgspec.inspect.AnyType):
            return True
        if isinstance(info, msgspec.inspect.StructType):
            if info.cls in seen:
                return False
            seen.add(info.cls)
            return any(walk(f.type) for f in info.fields)
        if isinstance(info, msgspec.inspect.UnionType):
            return any(walk(t) for t in info.types)
        if isinstance(info, msgspec.inspect.DictType):
            return walk(info.key_type) or walk(info.value_type)
        item = getattr(info, "item_type", None)  # lists, sets, variadic tuples
        return walk(item) if item is not None else False

    return walk(msgspec.inspect.type_info(struct))


def _type(annotation: Any, where: str, bounds: dict[str, Any] | None = None) -> Any:
    """The msgspec type of one pydantic annotation; `bounds` apply to it (not to its members)."""
    bounds = bounds or {}
    origin = typing.get_origin(annotation)
    if annotation is int or annotation is float or annotation is str or annotation is bool:
        if annotation is int:  # 64 bits, as the reference decoder demands (shared/protocol.py)
            bounds = {"ge": max(bounds.get("ge", INT64_MIN), INT64_MIN), "le": min(bounds.get("le", INT64_MAX),
                                                                                    INT64_MAX), **{
                k: v for k, v in bounds.items() if k not in ("ge", "le")}}
        if annotation is float:
            bounds = _float_bounds(bounds)
        if annotation is bool and bounds:
            raise UnsupportedModel(f"{where}: bounds on a bool")
        return Annotated[annotation, msgspec.Meta(**bounds)] if bounds else annotation
    if origin is Union or origin is types.UnionType:  # `int | None = Field(ge=0)`: bounds on the int
        members = tuple(None if a is type(None) else _type(a, where, bounds) for a in typing.get_args(annotation))
        return Union[members]  # noqa: UP007 - built from a tuple at run time
    if bounds and origin is not list:
        raise UnsupportedModel(f"{where}: bounds on {annotation!r} are not carried over")
    if annotation is type(None):
        return None
    if annotation is Any:
        return Any
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return struct_of(annotation)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return annotation  # decoded by value, as pydantic does
    if origin is Literal:
        return annotation
    if origin is list:
        (item,) = typing.get_args(annotation)
        derived: Any = list[_type(item, where)]  # type: ignore[misc]
        return Annotated[derived, msgspec.Meta(**bounds)] if bounds else derived
    if origin is dict:
        key, value = typing.get_args(annotation)
        if key is not str:
            raise UnsupportedModel(f"{where}: only str keys")
        return dict[str, _type(value, where)]  # type: ignore[misc]
    raise UnsupportedModel(f"{where}: the type {annotation!r} is not carried over")


class SampleFigures(Protocol):
    """What the controller's ingest reads of one GPU sample: a `GpuSample` or its Struct."""

    @property
    def index(self) -> int: ...
    @property
    def uuid(self) -> str: ...
    @property
    def ts(self) -> float: ...
    @property
    def temperature_c(self) -> float | None: ...
    @property
    def power_w(self) -> float | None: ...
    @property
    def power_limit_w(self) -> float | None: ...
    @property
    def utilization_pct(self) -> float | None: ...
    @property
    def memory_used_bytes(self) -> int | None: ...
    @property
    def memory_util_pct(self) -> float | None: ...
    @property
    def sm_clock_mhz(self) -> int | None: ...
    @property
    def memory_clock_mhz(self) -> int | None: ...


class TelemetryRecord(Protocol):
    """A telemetry body as the controller's ingest reads it: a `TelemetryBody` or its Struct."""

    @property
    def samples(self) -> Sequence[SampleFigures]: ...
