"""What the AWS plugins (the ``asg`` source, ``blue-green``'s load balancers) share.

Credentials come only from boto3's default chain: the environment, the shared
profile, the instance role. Never from the YAML.
"""

from __future__ import annotations

import threading
from typing import Any


class LazyClient:
    """A boto3 client made on first use (boto3 is imported only then), thread-safe."""

    def __init__(self, service: str, *, region: str, endpoint_url: str | None, timeout: float,
                 attempts: int = 3) -> None:
        self.service, self.region, self.endpoint_url = service, region, endpoint_url
        self.timeout, self.attempts = timeout, attempts
        self._client: Any = None
        self._lock = threading.Lock()

    def __call__(self) -> Any:
        with self._lock:  # boto3 sessions are not thread-safe to create from
            if self._client is None:
                try:
                    import boto3
                    from botocore.config import Config
                except ImportError:
                    raise ImportError("AWS needs boto3: pip install 'shipmate[aws]'") from None

                config = Config(connect_timeout=self.timeout, read_timeout=self.timeout,
                                retries={"max_attempts": self.attempts, "mode": "standard"})
                self._client = boto3.session.Session().client(
                    self.service, region_name=self.region, endpoint_url=self.endpoint_url,
                    config=config)
            return self._client

    def call(self, method: str, where: str, error: type[Exception], **kwargs: Any) -> Any:
        """``client.method(**kwargs)``; every failure becomes ``error`` naming ``where``."""
        try:
            client = self()
            from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
        except ImportError as exc:
            raise error(f"{where}: {exc}") from None
        try:
            return getattr(client, method)(**kwargs)
        except NoCredentialsError:
            raise error(f"{where}: no AWS credentials found (boto3 looks in the environment, "
                        "the shared profile and the instance role)") from None
        except ClientError as exc:
            err = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
            raise error(f"{where}: {method}: AWS answered {status} {err.get('Code', '')}: "
                        f"{err.get('Message', '')}".rstrip(": ")) from None
        except BotoCoreError as exc:
            raise error(f"{where}: {method}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
