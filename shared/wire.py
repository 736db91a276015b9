"""Base classes for every model that crosses a process boundary (MQTT, HTTP, config files)."""

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class WireModel(BaseModel):
    """Strict model: unknown fields are an error, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=False)


class CamelModel(WireModel):
    """A model written in camelCase on the wire and in CRDs (`maxTempC`), snake_case in Python.

    Both spellings are accepted on input; `dump()` writes camelCase.
    """

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)

    def dump(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)
