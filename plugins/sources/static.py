"""The ``static`` source: a fixed count from the YAML."""

from __future__ import annotations

from pydantic import Field

from agent import Source, SourceConfig, hookimpl


class StaticConfig(SourceConfig):
    count: int = Field(ge=0)
    "how many instances the service should have"


class StaticSource(Source):
    """Always reads ``count``."""

    type_name = "static"
    Config = StaticConfig

    def read(self) -> float:
        return self.config.count

    def history(self, start: float, end: float, step: float) -> list[tuple[float, float]]:
        return [(start, float(self.config.count))]


@hookimpl
def shipmate_source_types() -> list[type[Source]]:
    return [StaticSource]
