"""Python client of the loramesh gateway, over native gRPC (h2c on the same port as REST).

    from loramesh.client import Client

    with Client("http://localhost:8000") as client:
        tags = client.tagger.tag(input=["/work/var/media/cat.png"])

`Client` is synchronous, `AsyncClient` the same over grpc.aio. Each has one attribute per
service (`trainer`, `captioner`, `tagger`, `inference`, `memory`) with one method per RPC;
see docs/client.md.
"""

from __future__ import annotations

import asyncio
import os
from urllib.parse import urlsplit

import grpc

from loramesh.client import errors
from loramesh.client.errors import FieldViolation, LorameshError, Unavailable
from loramesh.client.services import (
    AsyncCaptionerService,
    AsyncInferenceService,
    AsyncMemoryService,
    AsyncResponseStream,
    AsyncTaggerService,
    AsyncTrainerService,
    CaptionerService,
    InferenceService,
    MemoryService,
    ResponseStream,
    TaggerService,
    TrainerService,
)

__all__ = [
    "Client", "AsyncClient", "DEFAULT_URL", "errors", "LorameshError", "FieldViolation", "Unavailable",
    "ResponseStream", "AsyncResponseStream",
]

DEFAULT_URL = "http://localhost:8000"
# Output files come back in 256 KiB chunks, answers are small; this leaves room for big ones.
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
                    ("grpc.max_send_message_length", 64 * 1024 * 1024)]


def _target(url: str) -> tuple[str, bool]:
    """host:port of a gateway URL and whether it uses TLS. `localhost:8000` and
    `http://localhost:8000` are the same gateway."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"gateway URL must look like http://host:port or https://host[:port] (got {url!r})")
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}", secure


def _auth_metadata(token: str | None, api_key: str | None) -> tuple[tuple[str, str], ...]:
    # The gateway checks these on native gRPC calls as on REST: the JWT on the training
    # task RPCs, the key on the finetune RPCs. Other routes ignore them.
    metadata = []
    if token:
        metadata.append(("authorization", f"Bearer {token}"))
    if api_key:
        metadata.append(("x-key", api_key))
    return tuple(metadata)


class _Settings:
    def __init__(self, url: str | None, token: str | None, api_key: str | None):
        self.url = url or os.environ.get("LORAMESH_URL") or DEFAULT_URL
        self.target, self.secure = _target(self.url)
        self.metadata = _auth_metadata(token or os.environ.get("LORAMESH_TOKEN"),
                                       api_key or os.environ.get("LORAMESH_API_KEY"))

    def unreachable(self) -> Unavailable:
        return Unavailable(f"cannot reach the loramesh gateway at {self.url}")


class Client:
    """Synchronous client. `url` (default `LORAMESH_URL`, else http://localhost:8000) is the
    gateway; `token` (`LORAMESH_TOKEN`) is the JWT of the training task RPCs, `api_key`
    (`LORAMESH_API_KEY`) the X-Key of the finetune RPCs; `timeout` is the default deadline
    of every call in seconds (None: no deadline)."""

    trainer: TrainerService
    captioner: CaptionerService
    tagger: TaggerService
    inference: InferenceService
    memory: MemoryService

    def __init__(self, url: str | None = None, *, token: str | None = None, api_key: str | None = None,
                 timeout: float | None = None, credentials: grpc.ChannelCredentials | None = None):
        self._settings = _Settings(url, token, api_key)
        self.url = self._settings.url
        if self._settings.secure or credentials is not None:
            self.channel = grpc.secure_channel(self._settings.target, credentials or grpc.ssl_channel_credentials(),
                                               options=_CHANNEL_OPTIONS)
        else:
            self.channel = grpc.insecure_channel(self._settings.target, options=_CHANNEL_OPTIONS)
        args = (self.channel, self._settings.metadata, timeout)
        self.trainer = TrainerService(*args)
        self.captioner = CaptionerService(*args)
        self.tagger = TaggerService(*args)
        self.inference = InferenceService(*args)
        self.memory = MemoryService(*args)

    def wait_ready(self, timeout: float = 5.0) -> None:
        """Connects to the gateway; raises Unavailable when it cannot within `timeout`."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise self._settings.unreachable() from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """The same as Client over grpc.aio: unary methods are coroutines, streams are async
    iterators. Make it inside a running event loop; `async with AsyncClient() as client`."""

    trainer: AsyncTrainerService
    captioner: AsyncCaptionerService
    tagger: AsyncTaggerService
    inference: AsyncInferenceService
    memory: AsyncMemoryService

    def __init__(self, url: str | None = None, *, token: str | None = None, api_key: str | None = None,
                 timeout: float | None = None, credentials: grpc.ChannelCredentials | None = None):
        self._settings = _Settings(url, token, api_key)
        self.url = self._settings.url
        if self._settings.secure or credentials is not None:
            self.channel = grpc.aio.secure_channel(self._settings.target,
                                                   credentials or grpc.ssl_channel_credentials(),
                                                   options=_CHANNEL_OPTIONS)
        else:
            self.channel = grpc.aio.insecure_channel(self._settings.target, options=_CHANNEL_OPTIONS)
        args = (self.channel, self._settings.metadata, timeout)
        self.trainer = AsyncTrainerService(*args)
        self.captioner = AsyncCaptionerService(*args)
        self.tagger = AsyncTaggerService(*args)
        self.inference = AsyncInferenceService(*args)
        self.memory = AsyncMemoryService(*args)

    async def wait_ready(self, timeout: float = 5.0) -> None:
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout)
        except TimeoutError:
            raise self._settings.unreachable() from None

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
