"""NATS: a connection that keeps reconnecting, the events stream and event publishing."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import nats
import nats.errors
import nats.js.errors
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from loramesh.v1 import events_pb2
from services.common import logs
from services.common.settings import NatsSettings

log = logs.get(__name__)

EVENTS_STREAM = "EVENTS"
EVENTS_SUBJECTS = ["events.>"]
EVENTS_MAX_AGE_S = 7 * 24 * 3600


# What a client is told when NATS, which holds every job and record, cannot be reached.
NATS_UNREACHABLE_MESSAGE = "the message bus (NATS) that holds jobs and state is not reachable; try again shortly"
# nats-py's ways of saying NATS did not answer.
NATS_UNREACHABLE_ERRORS = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.NoRespondersError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.TimeoutError,
    nats.js.errors.ServiceUnavailableError,
)

# Set while a service answers a call. nats-py holds a request made while it reconnects
# until its timeout; a caller is better served by a quick 503 (after a short grace for a
# restart), while background work (workers, trainers) keeps waiting for the reconnect.
_answering_call: ContextVar[bool] = ContextVar("answering_call", default=False)


@contextlib.contextmanager
def answering_call() -> Iterator[None]:
    token = _answering_call.set(True)
    try:
        yield
    finally:
        _answering_call.reset(token)


# How long a call waits for a reconnect in progress (a NATS restart takes about a second)
# before it is answered 503.
RECONNECT_GRACE_S = 2.0
RECONNECT_WAIT_S = 0.5


async def wait_connected(nc: NATS) -> None:
    """Returns once `nc` is connected; raises ConnectionReconnectingError after the grace."""
    deadline = time.monotonic() + RECONNECT_GRACE_S
    while not nc.is_connected:
        if nc.is_closed or time.monotonic() > deadline:
            raise nats.errors.ConnectionReconnectingError
        await asyncio.sleep(0.05)


class _Client(NATS):
    # Copies JetStream keeps of what this connection creates (LORAMESH_NATS_REPLICAS).
    stream_replicas = 1

    async def request(self, *args, **kwargs):
        if _answering_call.get():
            await wait_connected(self)
        return await super().request(*args, **kwargs)

    def jetstream(self, **options):
        js = super().jetstream(**options)
        js.stream_replicas = self.stream_replicas
        return js


def stream_replicas(js) -> int:
    """The replica count for a stream, bucket or object store created through `js`: the
    connection's setting (1 for a context not made by `connect`)."""
    return getattr(js, "stream_replicas", 1)


def connect_options(nats_settings: NatsSettings) -> dict[str, Any]:
    """nats-py's connect() arguments for the credentials and TLS in `nats_settings`."""
    options: dict[str, Any] = {}
    if nats_settings.user is not None:
        options |= {"user": nats_settings.user, "password": nats_settings.password}
    if nats_settings.creds is not None:
        options["user_credentials"] = str(nats_settings.creds)
    if nats_settings.tls_ca is not None:
        context = ssl.create_default_context(cafile=str(nats_settings.tls_ca))
        if nats_settings.tls_cert is not None:
            context.load_cert_chain(str(nats_settings.tls_cert), str(nats_settings.tls_key))
        options["tls"] = context
    return options


class NatsRefused(RuntimeError):
    """NATS refused this process's credentials or TLS setup: retrying cannot help."""


def _is_refusal(exc: Exception) -> bool:
    return (isinstance(exc, (nats.errors.AuthorizationError, nats.errors.SecureConnFailedError,
                             nats.errors.SecureConnRequiredError, ssl.SSLError))
            or "authorization violation" in str(exc).lower())


async def connect(url: str, name: str, on_reconnect=None, nats_settings: NatsSettings | None = None) -> NATS:
    """Connects, retrying until NATS answers; afterwards nats-py reconnects on its own.
    Requests made while answering a call fail at once when NATS is away (answering_call).
    Credentials, TLS and the replica count come from `nats_settings` (default: the
    LORAMESH_NATS_* variables); NatsRefused if the server refuses them on the first connect."""
    nats_settings = nats_settings or NatsSettings.load()
    refused: asyncio.Future = asyncio.get_running_loop().create_future()

    async def reconnected() -> None:
        log.info("nats reconnected", url=url)
        if on_reconnect:
            await on_reconnect()

    async def disconnected() -> None:
        log.warning("nats disconnected", url=url)

    async def error(exc: Exception) -> None:
        log.warning("nats error", error=str(exc))
        # nats-py retries refused credentials forever; at start-up, stop with the reason instead.
        if not refused.done() and _is_refusal(exc):
            refused.set_result(exc)

    delay = 0.2
    while True:
        try:
            nc = _Client()
            nc.stream_replicas = nats_settings.replicas
            connecting = asyncio.ensure_future(nc.connect(
                url,
                name=name,
                max_reconnect_attempts=-1,
                reconnect_time_wait=RECONNECT_WAIT_S,
                reconnected_cb=reconnected,
                disconnected_cb=disconnected,
                error_cb=error,
                **connect_options(nats_settings),
            ))
            await asyncio.wait({connecting, refused}, return_when=asyncio.FIRST_COMPLETED)
            if refused.done() and not nc.is_connected:
                connecting.cancel()
                if connecting.done() and not connecting.cancelled():
                    connecting.exception()  # already reported as the refusal
                await nc.close()
                raise NatsRefused(f"NATS at {url} refused this connection ({refused.result()}): check "
                                  f"LORAMESH_NATS_USER/LORAMESH_NATS_PASSWORD (or LORAMESH_NATS_CREDS) and "
                                  f"LORAMESH_NATS_TLS_*")
            await connecting
            return nc
        except (TimeoutError, OSError, nats.errors.NoServersError) as exc:
            log.warning("nats not reachable yet", url=url, error=str(exc), retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def ensure_events_stream(nc: NATS) -> None:
    """Creates the limits-retention events stream if it does not exist (idempotent)."""
    js = nc.jetstream()
    config = StreamConfig(
        name=EVENTS_STREAM,
        subjects=EVENTS_SUBJECTS,
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=EVENTS_MAX_AGE_S,
        num_replicas=stream_replicas(js),
    )
    try:
        await js.add_stream(config)
    except BadRequestError:
        await js.update_stream(config)


@dataclass(frozen=True)
class EventKindNames:
    token: str  # the last token of its subject, events.<service>.<id>.<token>
    documented: str  # the generation server's name for it (WebSocket, /queue/{id}/events)


# The one table of event kinds: how each is named on NATS and to clients. The inference
# service's events carry the generation server's documented names (job_progress,
# model_loaded, ...); other services' reach WebSocket clients as "<service>_<token>"
# (trainer_progress, trainer_log).
EVENT_KINDS: dict[int, EventKindNames] = {
    events_pb2.EVENT_KIND_PROGRESS: EventKindNames("progress", "job_progress"),
    events_pb2.EVENT_KIND_LOG: EventKindNames("log", "job_log"),
    events_pb2.EVENT_KIND_STATUS: EventKindNames("status", "job_status_changed"),
    events_pb2.EVENT_KIND_PREVIEW: EventKindNames("preview", "job_preview"),
    events_pb2.EVENT_KIND_JOB_ADDED: EventKindNames("job_added", "job_added"),
    events_pb2.EVENT_KIND_JOB_CANCELLED: EventKindNames("job_cancelled", "job_cancelled"),
    events_pb2.EVENT_KIND_MODEL_LOADING_PROGRESS: EventKindNames("model_loading_progress", "model_loading_progress"),
    events_pb2.EVENT_KIND_MODEL_LOADED: EventKindNames("model_loaded", "model_loaded"),
    events_pb2.EVENT_KIND_MODEL_UNLOADED: EventKindNames("model_unloaded", "model_unloaded"),
    events_pb2.EVENT_KIND_UPSCALER_LOADED: EventKindNames("upscaler_loaded", "upscaler_loaded"),
    events_pb2.EVENT_KIND_UPSCALER_UNLOADED: EventKindNames("upscaler_unloaded", "upscaler_unloaded"),
    events_pb2.EVENT_KIND_SERVER_STATUS: EventKindNames("server_status", "server_status"),
}
# The kinds an inference job's event stream carries (their data has the job_id).
JOB_EVENT_KINDS = frozenset({events_pb2.EVENT_KIND_JOB_ADDED, events_pb2.EVENT_KIND_STATUS,
                             events_pb2.EVENT_KIND_PROGRESS, events_pb2.EVENT_KIND_PREVIEW,
                             events_pb2.EVENT_KIND_JOB_CANCELLED})
# Replicas' periodic status goes on core NATS under this prefix (status.<service>.<replica>),
# outside the events stream: nobody replays a heartbeat.
STATUS_SUBJECTS = "status.>"


def client_event_name(service: str, kind: int) -> str:
    """What WebSocket and SSE clients call an event of `service`."""
    if service == "inference" or kind == events_pb2.EVENT_KIND_SERVER_STATUS:
        return EVENT_KINDS[kind].documented
    return f"{service}_{EVENT_KINDS[kind].token}"


def client_timestamp(time: Timestamp) -> str:
    """An event's time as clients see it: ISO 8601 UTC with milliseconds, "...T12:00:30.123Z"."""
    return time.ToDatetime(tzinfo=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def subject_token(value: str) -> str:
    """`value` as one subject token: tokens cannot hold '.', '*', '>' or spaces."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in value) or "_"


def event_subject(service: str, subject_id: str, kind: str) -> str:
    return f"events.{service}.{subject_token(subject_id)}.{kind}"


class EventPublisher:
    """Publishes loramesh.v1.Event JSON into the events stream."""

    def __init__(self, nc: NATS, service: str):
        self._nc = nc
        self._js = nc.jetstream()
        self._service = service

    async def publish(self, subject_id: str, kind: int, data: dict[str, Any], *,
                      confirmed: bool = True) -> events_pb2.Event:
        """Publishes one event. With `confirmed` it returns once the stream has stored it;
        without, it only hands it to the connection (for frequent events such as per-step
        progress, where waiting for each acknowledgement would slow the work reported on)."""
        event, body = self._event(subject_id, kind, data)
        subject = event_subject(self._service, subject_id, EVENT_KINDS[kind].token)
        if confirmed:
            await self._js.publish(subject, body)
        else:
            await self._nc.publish(subject, body)
        return event

    def _event(self, subject_id: str, kind: int, data: dict[str, Any]) -> tuple[events_pb2.Event, bytes]:
        event = events_pb2.Event(id=uuid.uuid4().hex, service=self._service, subject_id=subject_id, kind=kind)
        event.time.FromDatetime(datetime.now(UTC))
        event.data.update(data)
        return event, json_format.MessageToJson(event, preserving_proto_field_name=True, indent=None).encode()

    def publish_from_thread(self, loop: asyncio.AbstractEventLoop, subject_id: str, kind: int,
                            data: dict[str, Any]) -> None:
        """Publishes from another thread (a model thread) through `loop`, without waiting."""
        asyncio.run_coroutine_threadsafe(self.publish(subject_id, kind, data, confirmed=False), loop)

    async def publish_status(self, replica: str, data: dict[str, Any]) -> None:
        """A replica's periodic server_status, on core NATS (status.<service>.<replica>): the
        WebSocket bridge forwards it; the events stream does not keep it."""
        _, body = self._event(replica, events_pb2.EVENT_KIND_SERVER_STATUS, data)
        await self._nc.publish(f"status.{self._service}.{subject_token(replica)}", body)


FOLLOW_RECHECK_S = 5.0


async def replay_events(nc: NATS, service: str, subject_id: str, *, follow: bool, final_statuses: frozenset[str],
                        find: Callable[[], Awaitable[Any]]) -> AsyncIterator[events_pb2.Event]:
    """The events of one subject (a session, a job) from the start of the stream; with
    follow, then new ones until a status event reaches one of `final_statuses` or, when
    nothing arrives, `find` shows the record gone or final."""

    def is_last(event: events_pb2.Event) -> bool:
        return event.kind == events_pb2.EVENT_KIND_STATUS and event.data["status"] in final_statuses

    async def has_ended() -> bool:
        record = await find()
        return record is None or record.is_final

    js = nc.jetstream()
    subscription = await js.pull_subscribe(event_subject(service, subject_id, "*"), stream=EVENTS_STREAM,
                                           config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL,
                                                                 ack_policy=AckPolicy.NONE, inactive_threshold=60.0))
    caught_up = False
    try:
        while True:
            try:
                messages = await subscription.fetch(100, timeout=FOLLOW_RECHECK_S if caught_up else 1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                caught_up = True  # nothing more stored
                if not follow or await has_ended():
                    return
                continue
            for msg in messages:
                event = json_format.Parse(msg.data, events_pb2.Event(), ignore_unknown_fields=True)
                yield event
                caught_up = caught_up or msg.metadata.num_pending == 0
                if follow and is_last(event):
                    return
            if caught_up and not follow:
                return
    finally:
        await subscription.unsubscribe()
