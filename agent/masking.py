"""Secrets stay out of logs: a logging filter that masks every configured secret value.

What counts as a secret value: every value the config took from the environment
(``${VAR}``), every ``SecretStr`` in the config (``agent.store.password``, plugin keys),
and the agent's environment variables whose names say they are secret (``*KEY*``,
``*SECRET*``, ``*TOKEN*``, ``*PASSWORD*``, ``*CREDENTIAL*``: ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``DD_API_KEY``, ...). The filter sits on the root logger's
handlers, so it sees every record, the libraries' included, and masks the message,
its arguments and any traceback text as ``***``.

Third-party libraries' loggers (botocore, urllib3, docker, datadog, etcd clients, ...)
stay at WARNING unless ``shipmate run -vv`` asks for their debug output.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, SecretStr

MASK = "***"
MIN_LENGTH = 4  # shorter values would mask ordinary words
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL|AUTH", re.IGNORECASE)
THIRD_PARTY = ("botocore", "boto3", "s3transfer", "urllib3", "requests", "docker", "datadog",
               "etcd", "etcd3gw", "prometheus_client")


class SecretFilter(logging.Filter):
    """Masks the secret values it was told about in every record it sees."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None

    def add(self, values: Iterable[str]) -> None:
        """Mask these values from now on (short ones are ignored)."""
        with self._lock:
            new = {v for v in values if isinstance(v, str) and len(v) >= MIN_LENGTH}
            if new <= self._values:
                return
            self._values |= new
            ordered = sorted(self._values, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(v) for v in ordered))

    def mask(self, text: str) -> str:
        """``text`` with every secret value replaced by ``***``."""
        pattern = self._pattern
        return text if pattern is None else pattern.sub(MASK, text)

    def filter(self, record: logging.LogRecord) -> bool:
        if self._pattern is None:
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: logging reports it later
            return True
        masked = self.mask(message)
        if masked != message or record.args:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.mask(record.exc_text)
        if record.stack_info:
            record.stack_info = self.mask(record.stack_info)
        return True


FILTER = SecretFilter()
"""The one filter of this process (:func:`install` puts it on the root handlers)."""


def environment_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of environment variables whose names say they hold a secret."""
    environ = os.environ if environ is None else environ
    return [value for name, value in environ.items() if SECRET_NAME.search(name) and value]


def secret_values(value: Any) -> list[str]:
    """Every ``SecretStr`` value inside a (nested) config model."""
    out: list[str] = []
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, SecretStr):
            out.append(item.get_secret_value())
        elif isinstance(item, BaseModel):
            todo += [getattr(item, name, None) for name in type(item).model_fields]
        elif isinstance(item, Mapping):
            todo += list(item.values())
        elif isinstance(item, (list, tuple, set)):
            todo += list(item)
    return out


def remember(values: Iterable[str]) -> None:
    """Mask these values in every log record from now on."""
    FILTER.add(values)


def install(verbosity: int = 0) -> None:
    """Put the filter on every handler of the root logger and quiet third-party loggers
    (WARNING) unless ``verbosity`` is 2 or more (``-vv``)."""
    FILTER.add(environment_secrets())
    for handler in logging.getLogger().handlers:
        if FILTER not in handler.filters:
            handler.addFilter(FILTER)
    level = logging.NOTSET if verbosity >= 2 else logging.WARNING
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(level)
