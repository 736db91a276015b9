"""OpenAPI 3.1 descriptions of the two HTTP APIs, kept true to the code.

The descriptions are YAML files next to the code (cloud/openapi.yaml, edge/openapi.yaml, shipped in
the wheel) and are served as JSON at `GET /api/v1/openapi.json`. Schemas that the code already
defines are not written twice: a component schema in the YAML may name a source that the server
hands to `load()` (the tables, models and enums it really returns and takes; nothing is imported
by name), and is filled in from it when the file is loaded:

- `x-kgpu-model: Name` — the pydantic model `models["Name"]`'s JSON schema (camelCase where the
  model is; `x-kgpu-mode: serialization` for what the server writes, validation (default) for
  what it reads). Durations (`shared.policy.Seconds`) accept a number or a string like "90s".
- `x-kgpu-table: name` — one row of the SQLAlchemy table `tables["name"]` as the API returns it,
  every column present, nullable columns allowing null.

Both take `x-kgpu-omit: [names]` (fields the API leaves out), `x-kgpu-nullable: [names]` and
`x-kgpu-add: {name: schema}` (fields the API adds or writes differently, all required unless listed
in `x-kgpu-optional`). Anywhere, `x-kgpu-enum: Name` lists the values of `enums["Name"]`. Row
schemas stay open (`additionalProperties: true`): a new column is not a
breaking change for a reader. A name the server did not hand over is an OpenApiError at load.

An operation marked `x-kgpu-only-with: FEATURE` is left out unless FEATURE is on (the edge's
simulated-driver endpoint exists only with `--backend sim`).

The server also holds itself to its description: `conform_body()` checks a JSON request body
against the operation's schema after the handler's own validation passed, so nothing the
description calls invalid (`true` for a number, "300" for an integer) is accepted by pydantic's
lax coercion. `add_spec_route` installs it as the app's body check (shared.http.BODY_CHECK), which
`shared.http.read_model` runs: this module builds on shared.http, never the other way round.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Iterable, Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml
from aiohttp import web
from jsonschema import Draft202012Validator, ValidationError
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode
from pydantic_core import core_schema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from shared.http import BODY_CHECK, invalid_body

SPEC_PATH = "/api/v1/openapi.json"
MODEL_KEY, TABLE_KEY, ENUM_KEY = "x-kgpu-model", "x-kgpu-table", "x-kgpu-enum"
_MARKERS = (MODEL_KEY, TABLE_KEY, "x-kgpu-mode", "x-kgpu-omit", "x-kgpu-nullable", "x-kgpu-add", "x-kgpu-optional")
_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")
_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


class OpenApiError(ValueError):
    """The YAML description cannot be completed (an unknown model or table, a name clash)."""


@dataclasses.dataclass(frozen=True)
class Sources:
    """What a description's `x-kgpu-*` markers may name: the server's own tables, models and
    enums, by the key the YAML uses."""

    tables: Mapping[str, sa.Table] = dataclasses.field(default_factory=dict)
    models: Mapping[str, type[BaseModel]] = dataclasses.field(default_factory=dict)
    enums: Mapping[str, type[Enum]] = dataclasses.field(default_factory=dict)

    def _get(self, what: str, given: Mapping[str, Any], key: Any) -> Any:
        if not isinstance(key, str) or key not in given:
            raise OpenApiError(f"no {what} {key!r} was given to load() (given: {', '.join(sorted(given)) or 'none'})")
        return given[key]

    def table(self, key: Any) -> sa.Table:
        table = self._get("table", self.tables, key)
        if not isinstance(table, sa.Table):
            raise OpenApiError(f"{key} is not an SQLAlchemy table")
        return table

    def model(self, key: Any) -> type[BaseModel]:
        model = self._get("model", self.models, key)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise OpenApiError(f"{key} is not a pydantic model")
        return model

    def enum(self, key: Any) -> type[Enum]:
        enum = self._get("enum", self.enums, key)
        if not (isinstance(enum, type) and issubclass(enum, Enum)):
            raise OpenApiError(f"{key} is not an enum")
        return enum

    def key(self) -> tuple[Any, ...]:
        """Hashable, for caching a completed description per set of sources."""
        return tuple(tuple(sorted(m.items(), key=lambda item: item[0])) for m in (self.tables, self.models, self.enums))


# ---- schemas from pydantic models -----------------------------------------------------------


class _KgpuJsonSchema(GenerateJsonSchema):
    """pydantic's generator, plus: a duration field (shared.policy.parse_duration runs before
    the float) accepts "90s"/"2m" strings as the model does."""

    def function_before_schema(self, schema: core_schema.BeforeValidatorFunctionSchema) -> dict[str, Any]:
        from shared.policy import _DURATION, parse_duration

        inner = super().function_before_schema(schema)
        if schema["function"].get("function") is parse_duration and self.mode == "validation":
            return {"anyOf": [inner, {"type": "string", "pattern": _DURATION.pattern}]}
        return inner


def _normalise(schema: Any) -> Any:
    """Constraints pydantic leaves under their Python names (`ge`, `le`) get JSON Schema's names;
    titles (noise derived from field names) are dropped."""
    if isinstance(schema, list):
        return [_normalise(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _normalise(sub) for name, sub in value.items()}
        elif key in _BOUNDS and isinstance(value, int | float) and not isinstance(value, bool):
            out[_BOUNDS[key]] = value
        elif key == "title" and isinstance(value, str):
            continue
        else:
            out[key] = _normalise(value)
    return out


def model_schema(model: type[BaseModel], name: str, mode: JsonSchemaMode = "validation") -> dict[str, Any]:
    """The model's schema with its nested models as `{name}_{Nested}` in `$defs`."""
    schema = model.model_json_schema(by_alias=True, mode=mode, schema_generator=_KgpuJsonSchema,
                                     ref_template=f"#/components/schemas/{name}_{{model}}")
    return _normalise(schema)


# ---- schemas from SQLAlchemy tables ---------------------------------------------------------


def _column_type(column_type: sa.types.TypeEngine[Any]) -> str | None:
    if isinstance(column_type, sa.JSON):
        return None  # any JSON value
    if isinstance(column_type, sa.Boolean):
        return "boolean"
    if isinstance(column_type, sa.Integer):
        return "integer"
    if isinstance(column_type, sa.Float | sa.Numeric):
        return "number"
    if isinstance(column_type, sa.String):
        return "string"
    raise OpenApiError(f"no JSON type for the SQL type {column_type!r}")


def table_schema(table: sa.Table) -> dict[str, Any]:
    """One row of `table` as JSON: every column required, nullable ones allow null."""
    properties: dict[str, Any] = {}
    for column in table.columns:
        kind = _column_type(column.type)
        if kind is None:
            properties[column.name] = {}
        else:
            properties[column.name] = {"type": [kind, "null"] if column.nullable else kind}
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": True}


# ---- completing a description ---------------------------------------------------------------


def _derived(name: str, marker: dict[str, Any], schemas: dict[str, Any], sources: Sources) -> dict[str, Any]:
    if MODEL_KEY in marker:
        model = sources.model(marker[MODEL_KEY])
        schema = model_schema(model, name, marker.get("x-kgpu-mode", "validation"))
        for nested, sub in schema.pop("$defs", {}).items():
            key = f"{name}_{nested}"
            if key in schemas and schemas[key] != sub:
                raise OpenApiError(f"component {key} is defined twice")
            schemas[key] = sub
        source = f"{model.__module__}:{model.__qualname__}"
    else:
        table = sources.table(marker[TABLE_KEY])
        schema = table_schema(table)
        source = f"table:{table.name}"
    properties: dict[str, Any] = schema.setdefault("properties", {})
    required: list[str] = schema.setdefault("required", [])
    for field in marker.get("x-kgpu-omit", []):
        if field not in properties:
            raise OpenApiError(f"{name}: cannot omit {field!r}, {source} has no such field")
        del properties[field]
        if field in required:
            required.remove(field)
    for field in marker.get("x-kgpu-nullable", []):
        properties[field] = {"anyOf": [properties[field], {"type": "null"}]}
    optional = set(marker.get("x-kgpu-optional", []))
    for field, sub in (marker.get("x-kgpu-add") or {}).items():
        properties[field] = sub
        if field not in required and field not in optional:
            required.append(field)
    if not required:
        schema.pop("required")
    rest = {k: v for k, v in marker.items() if k not in _MARKERS}
    return {**schema, **rest, "x-kgpu-source": source}


def complete(document: Mapping[str, Any], features: Iterable[str] = (),
             sources: Sources | None = None) -> dict[str, Any]:
    """A copy of the YAML `document` with derived schemas filled in from `sources` and
    operations whose feature is off removed."""
    sources = sources or Sources()
    spec = copy.deepcopy(dict(document))
    on = set(features)
    schemas: dict[str, Any] = spec.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in list(schemas.items()):
        if isinstance(schema, dict) and (MODEL_KEY in schema or TABLE_KEY in schema):
            schemas[name] = _derived(name, schema, schemas, sources)
    spec = _enums(spec, sources)
    for path, item in list(spec.get("paths", {}).items()):
        for method in _METHODS:
            feature = (item.get(method) or {}).get("x-kgpu-only-with")
            if feature is not None and feature not in on:
                del item[method]
        if not any(m in item for m in _METHODS):
            del spec["paths"][path]
    return spec


def _enums(node: Any, sources: Sources) -> Any:
    """`x-kgpu-enum: Name` becomes `enum: [the values of sources.enums["Name"]]`."""
    if isinstance(node, list):
        return [_enums(n, sources) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _enums(v, sources) for k, v in node.items() if k != ENUM_KEY}
    if ENUM_KEY in node:
        out["enum"] = [member.value for member in sources.enum(node[ENUM_KEY])]
    return out


class OpenApi:
    """A completed description: served as JSON, and used to check request bodies."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.body = json.dumps(document, sort_keys=False).encode()
        resource = Resource.from_contents(document, default_specification=DRAFT202012)
        self._registry: Registry = Registry().with_resource("urn:kgpu:openapi", resource)
        self._validators: dict[tuple[str, str], Draft202012Validator] = {}
        for path, item in document.get("paths", {}).items():
            for method in _METHODS:
                content = ((item.get(method) or {}).get("requestBody") or {}).get("content") or {}
                schema = (content.get("application/json") or {}).get("schema")
                if schema is not None:
                    self._validators[(method.upper(), path)] = self.validator(schema)

    def validator(self, schema: Mapping[str, Any]) -> Draft202012Validator:
        """A validator for `schema`, whose `$ref`s resolve within this description."""
        return Draft202012Validator(_rebase(dict(schema)), registry=self._registry)

    def body_validator(self, method: str, path: str) -> Draft202012Validator | None:
        return self._validators.get((method.upper(), path))

    def operations(self) -> set[tuple[str, str]]:
        """(METHOD, path template) of every operation described."""
        return {(m.upper(), p) for p, item in self.document.get("paths", {}).items() for m in _METHODS if m in item}


def _rebase(schema: Any) -> Any:
    """Local refs (`#/components/...`) point into the registered description."""
    if isinstance(schema, list):
        return [_rebase(s) for s in schema]
    if isinstance(schema, dict):
        return {k: ("urn:kgpu:openapi" + v if k == "$ref" and isinstance(v, str) and v.startswith("#/") else _rebase(v))
                for k, v in schema.items()}
    return schema


_LOADED: dict[tuple[Path, frozenset[str], tuple[Any, ...]], OpenApi] = {}


def load(path: Path, features: Iterable[str] = (), *, tables: Mapping[str, sa.Table] | None = None,
         models: Mapping[str, type[BaseModel]] | None = None,
         enums: Mapping[str, type[Enum]] | None = None) -> OpenApi:
    """The description in `path`, completed from the `tables`, `models` and `enums` its
    `x-kgpu-*` markers name (see the module's docstring), with the operations of `features`.
    Read and completed once per process for each path, feature set and set of sources."""
    sources = Sources(tables or {}, models or {}, enums or {})
    cache_key = (path, frozenset(features), sources.key())
    if cache_key not in _LOADED:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        _LOADED[cache_key] = OpenApi(complete(document, cache_key[1], sources))
    return _LOADED[cache_key]


OPENAPI: web.AppKey[OpenApi] = web.AppKey("openapi", OpenApi)


def add_spec_route(app: web.Application, spec: OpenApi) -> None:
    """`GET /api/v1/openapi.json`; the spec is also what `conform_body` checks request bodies
    against (installed as the app's shared.http body check)."""
    app[OPENAPI] = spec
    app[BODY_CHECK] = conform_body

    async def openapi(_: web.Request) -> web.Response:
        return web.Response(body=spec.body, content_type="application/json")

    app.router.add_get(SPEC_PATH, openapi)


def conform_body(request: web.Request, data: Any, error: str = "invalid request body") -> None:
    """Refuse (400, counted as invalid_body) a JSON body that its operation's schema does not allow."""
    spec = request.app.get(OPENAPI)
    route = request.match_info.route.resource
    if spec is None or route is None:
        return
    validator = spec.body_validator(request.method, route.canonical)
    if validator is None:
        return
    errors = [leaf for e in validator.iter_errors(data) for leaf in _leaves(e)]
    if errors:
        errors.sort(key=lambda e: [str(p) for p in e.absolute_path])
        detail = [{"field": ".".join(str(p) for p in e.absolute_path), "problem": e.message[:300]} for e in errors[:20]]
        raise invalid_body(detail, error)


def _leaves(error: ValidationError) -> list[ValidationError]:
    """The errors worth showing: for anyOf/oneOf, those of the alternative that got furthest
    into the body (not "is not valid under any of the given schemas")."""
    if not error.context:
        return [error]
    branches: dict[Any, list[ValidationError]] = {}
    for sub in error.context:
        branches.setdefault(sub.relative_schema_path[0] if sub.relative_schema_path else None, []).append(sub)
    furthest = max(branches.values(), key=lambda subs: max(len(s.absolute_path) for s in subs))
    return [leaf for sub in furthest for leaf in _leaves(sub)]
