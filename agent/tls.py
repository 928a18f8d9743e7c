"""TLS client settings shared by the etcd store and plugins that speak https (fleet)."""

from __future__ import annotations

import ssl
from pathlib import Path

from pydantic import BaseModel, ConfigDict, model_validator


class TLSConfig(BaseModel):
    """TLS to etcd (or fleet) over ``https://``; paths are relative to the config file's folder."""

    model_config = ConfigDict(extra="forbid")

    ca: Path | None = None
    "a PEM bundle of the CAs to trust instead of the system's (a private CA)"
    cert: Path | None = None
    "a client certificate (PEM), for a server that requires one"
    key: Path | None = None
    "the client certificate's private key (PEM), if not in the cert file"
    verify: bool = True
    "false: accept any server certificate (a test setup only; never a fallback)"

    @model_validator(mode="after")
    def _pair(self) -> TLSConfig:
        if self.key is not None and self.cert is None:
            raise ValueError("a key needs its cert")
        return self

    def resolved(self, base: Path) -> TLSConfig:
        """The same settings with relative paths made relative to ``base``."""
        def fix(path: Path | None) -> Path | None:
            return None if path is None or path.is_absolute() else base / path
        return self.model_copy(update={
            name: fix(getattr(self, name)) or getattr(self, name) for name in ("ca", "cert", "key")
        })

    def context(self, base: Path | None = None) -> ssl.SSLContext:
        """An SSL context for a client: the CA (else the system's), the client certificate,
        and no verification only if ``verify`` is false. Paths relative to ``base``.

        :raises OSError: naming a file that cannot be read; ssl.SSLError for a bad one.
        """
        tls = self.resolved(base) if base is not None else self
        context = ssl.create_default_context(cafile=str(tls.ca) if tls.ca else None)
        if not tls.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if tls.cert is not None:
            context.load_cert_chain(str(tls.cert), str(tls.key) if tls.key else None)
        return context
