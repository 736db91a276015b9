"""Loading settings: command-line flags, then `KGPU_*` environment variables, then an optional
YAML or TOML file, then defaults (highest precedence first).

A bad configuration raises `ConfigError` carrying one readable line per problem; the CLI prints
them and exits with status 2.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from shared.logs import scrub
from shared.policy import Seconds

_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("kgpu_config_file", default=None)

ENV_PREFIX = "KGPU_"


class ConfigError(Exception):
    """Invalid configuration; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class KgpuSettings(BaseSettings):
    """Base for the edge and cloud settings: env prefix, strictness and source order."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        env_nested_delimiter="__",
        validate_default=True,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_file.get()
        if path is not None:
            if path.suffix == ".toml":
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            else:
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)


def parse_host_port(value: str, *, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """'HOST:PORT', ':PORT', a bare 'PORT' or '[::1]:PORT' → (host, port)."""
    value = str(value).strip()
    if value.isdigit():
        value = ":" + value
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]") or default_host
    return host, int(port)


def validate_mqtt_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"MQTT URL must start with mqtt:// or mqtts://, got {scrub(url)!r}")
    if not parts.hostname:
        raise ValueError(f"MQTT URL has no host: {scrub(url)!r}")
    try:
        _ = parts.port  # urlsplit only checks the port when asked
    except ValueError:
        raise ValueError(f"MQTT URL has a bad port: {scrub(url)!r}") from None
    return url


def _check_host_port(value: str) -> str:
    parse_host_port(value)
    return value


HostPort = Annotated[str, AfterValidator(_check_host_port)]  # "HOST:PORT" of a listener
MqttUrl = Annotated[str, AfterValidator(validate_mqtt_url)]  # mqtt://[user:pass@]host:port, mqtts://

# The HTTP limits both servers take (shared/http.py, docs/api.md): one definition, one meaning.
HttpHeaderTimeout = Annotated[Seconds, Field(
    10.0, gt=0.0, le=300.0, description="A request's headers must arrive within this long of the "
    "connection opening or of the previous response, else the connection is closed (also the "
    "idle keep-alive time)")]
HttpRequestTimeout = Annotated[Seconds, Field(
    30.0, gt=0.0, le=3600.0, description="A request still running after this long is cancelled and "
    "answered 503 with a JSON error")]


S = TypeVar("S", bound=KgpuSettings)


def _describe(error: Mapping[str, Any]) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "settings"
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown setting"
    if error["type"] == "value_error":
        return scrub(f"{where}: {error['ctx']['error']}")
    given = error.get("input")
    if error["type"] != "missing" and not isinstance(given, dict) and given is not None:
        if any(word in where for word in ("password", "token", "secret")):
            given = "***"
        return scrub(f"{where}: {message} (got {given!r})")
    return f"{where}: {message}"


def load_settings(cls: type[S], flags: dict[str, Any], config_file: Path | str | None) -> S:
    """Build `cls` from flags (None values mean "not given"), the environment and the file."""
    path = Path(config_file) if config_file else None
    if path is not None:
        if not path.is_file():
            raise ConfigError([f"config file not found: {path}"])
        if path.suffix not in (".yaml", ".yml", ".toml"):
            raise ConfigError([f"config file must be .yaml, .yml or .toml: {path}"])
        try:
            text = path.read_text()
            if path.suffix != ".toml":
                loaded = yaml.safe_load(text)
                if loaded is not None and not isinstance(loaded, dict):
                    raise ConfigError([f"{path}: the file must hold a mapping of settings"])
        except yaml.YAMLError as exc:
            raise ConfigError([f"{path}: not valid YAML: {exc}".replace("\n", " ")]) from None
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    given = {key: value for key, value in flags.items() if value is not None}
    token = _config_file.set(path)
    try:
        return cls(**given)
    except ValidationError as exc:
        raise ConfigError([_describe(e) for e in exc.errors()]) from None
    except ValueError as exc:  # e.g. TOML decode errors, bad JSON in a complex env var
        raise ConfigError([str(exc).replace("\n", " ")]) from None
    finally:
        _config_file.reset(token)
