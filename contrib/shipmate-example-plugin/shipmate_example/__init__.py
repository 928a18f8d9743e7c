"""An example Shipmate plugin: the ``file`` source."""

from __future__ import annotations

from pathlib import Path

from agent import Source, SourceConfig, SourceError, hookimpl


class FileConfig(SourceConfig):
    path: Path
    "a text file holding the desired count"


class FileSource(Source):
    """Reads the desired count from a text file."""

    type_name = "file"
    Config = FileConfig

    def read(self) -> float:
        try:
            text = self.config.path.read_text().strip()
        except OSError as exc:
            raise SourceError(f"cannot read {self.config.path}: {exc.strerror}") from exc
        if not text.isdigit():
            raise SourceError(f"{self.config.path} holds {text[:20]!r}, not a count")
        return int(text)


@hookimpl
def shipmate_source_types() -> list[type[Source]]:
    return [FileSource]
