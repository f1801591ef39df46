"""JetStream building blocks for job state and work: key-value buckets updated with
compare-and-set, and work-queue streams with one durable pull consumer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Generic, Protocol, TypeVar

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError

from services.common import bus, logs, metrics, tracing
from services.common.errors import NotFound

log = logs.get(__name__)

T = TypeVar("T")
# Keys a bucket cannot hold ("a.b*", " ") name nothing that exists.
_MISSING = (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError, nats.js.errors.InvalidKeyError)


def iso_time(seconds: float | None) -> str | None:
    """A record's time as the documents print date-times: RFC 3339 in UTC with milliseconds."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def key_value(js: JetStreamContext, bucket: str, ttl: float | None = None):
    """The bucket, created on first use (idempotent). With `ttl`, a key not written for that
    many seconds expires."""
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        return await js.create_key_value(KeyValueConfig(bucket=bucket, history=1, storage=StorageType.FILE, ttl=ttl,
                                                        replicas=bus.stream_replicas(js)))


async def cas_update(kv, key: str, decode: Callable[[bytes], T], encode: Callable[[T], bytes],
                     change: Callable[[T], None], attempts: int = 50) -> T:
    """Reads `key`, applies `change` to the decoded value and writes it back only if
    nobody wrote in between; retries on a lost race. `change` may raise to refuse."""
    for _ in range(attempts):
        entry = await kv.get(key)
        value = decode(entry.value)
        change(value)
        try:
            await kv.update(key, encode(value), last=entry.revision)
            return value
        except nats.js.errors.KeyWrongLastSequenceError:
            continue
    raise RuntimeError(f"could not update {key}: too many concurrent writers")


async def work_queue(js: JetStreamContext, stream: str, subject: str, consumer: str, *,
                     ack_wait: float, max_deliver: int, filter_subject: str | None = None) -> None:
    """A work-queue stream on `subject` and its durable pull consumer (idempotent), which
    takes the messages of `filter_subject` (default: all of `subject`). A message not acked
    within ack_wait (no in_progress() heartbeat) goes to another worker."""
    config = StreamConfig(name=stream, subjects=[subject], retention=RetentionPolicy.WORK_QUEUE,
                          storage=StorageType.FILE, num_replicas=bus.stream_replicas(js))
    try:
        await js.add_stream(config)
    except BadRequestError:
        await js.update_stream(config)
    await js.add_consumer(stream, ConsumerConfig(
        durable_name=consumer, ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait, max_deliver=max_deliver,
        filter_subject=filter_subject or subject,
    ))
    metrics.track_queue(js, stream, consumer)


class JsonRecord(Protocol):
    def to_json(self) -> bytes: ...

    @classmethod
    def from_json(cls, raw: bytes): ...


R = TypeVar("R", bound=JsonRecord)


# How long listing a bucket may take before the caller is told NATS is not answering.
LIST_TIMEOUT_S = 15.0


class RecordStore(Generic[R]):
    """Records of one kind in a key-value bucket (set `kv` in setup), changed only with
    compare-and-set, so any replica can read and change any record; the work they stand
    for goes through a work queue on the same connection."""

    record_type: type[R]
    bucket: str
    kv = None

    def __init__(self, nc, ack_wait: float):
        self.nc = nc
        self.js = nc.jetstream()
        # Seconds a worker may stay silent before its work queue message goes to another.
        self.ack_wait = ack_wait

    def not_found(self, key: str) -> str:
        return f"no record {key!r}"

    async def get(self, key: str) -> R:
        try:
            entry = await self.kv.get(key)
        except _MISSING as exc:
            raise NotFound(self.not_found(key)) from exc
        return self.record_type.from_json(entry.value)

    async def find(self, key: str) -> R | None:
        try:
            return await self.get(key)
        except NotFound:
            return None

    async def update(self, key: str, change: Callable[[R], None]) -> R:
        try:
            return await cas_update(self.kv, key, self.record_type.from_json, self.record_type.to_json, change)
        except _MISSING as exc:
            raise NotFound(self.not_found(key)) from exc

    async def all(self) -> list[R]:
        """Every record, read in one pass over the bucket's stream (the latest value of each
        key). nats-py's kv.keys() sometimes reports an empty bucket under load."""
        stream, prefix = f"KV_{self.bucket}", f"$KV.{self.bucket}."
        if (await self.js.stream_info(stream)).state.messages == 0:
            return []
        subscription = await self.js.pull_subscribe(
            f"{prefix}>", stream=stream, config=ConsumerConfig(
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, ack_policy=AckPolicy.NONE, inactive_threshold=30.0))
        records: list[R] = []
        pending: int | None = None  # messages the consumer still holds after the last one read
        deadline = asyncio.get_running_loop().time() + LIST_TIMEOUT_S
        try:
            while True:
                try:
                    messages = await subscription.fetch(256, timeout=2.0)
                except (TimeoutError, nats.errors.TimeoutError):
                    if pending is None:
                        return records  # every key expired or was deleted since stream_info
                    if asyncio.get_running_loop().time() > deadline:
                        raise  # a partial list would be a wrong answer: UNAVAILABLE instead
                    continue  # a slow server: the rest is still coming
                for msg in messages:
                    if (msg.headers or {}).get("KV-Operation") not in ("DEL", "PURGE"):
                        records.append(self.record_type.from_json(msg.data))
                    pending = msg.metadata.num_pending
                    if pending == 0:
                        return records
        finally:
            await subscription.unsubscribe()


async def pull_loop(subscribe: Callable[[], Awaitable], handle: Callable[[object], Awaitable[None]],
                    stopping: asyncio.Event, has_room: Callable[[], bool] = lambda: True) -> None:
    """Takes messages from a work queue one at a time while there is room, until stopping;
    rides out NATS outages by subscribing again."""
    subscription = None
    while not stopping.is_set():
        if not has_room():
            await asyncio.sleep(0.2)
            continue
        try:
            subscription = subscription or await subscribe()
            messages = await subscription.fetch(1, timeout=1.0)
        except (TimeoutError, nats.errors.TimeoutError):
            continue
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            log.warning("work queue unavailable", error=str(exc))
            subscription = None
            await asyncio.sleep(1.0)
            continue
        for msg in messages:
            # The span of the work continues the trace of the call that queued it.
            with tracing.processing(msg):
                await handle(msg)
