"""JetStream building blocks for job state and work: key-value buckets updated with
compare-and-set, and work-queue streams with one durable pull consumer."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError

T = TypeVar("T")


async def key_value(js: JetStreamContext, bucket: str):
    """The bucket, created on first use (idempotent)."""
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        return await js.create_key_value(KeyValueConfig(bucket=bucket, history=1, storage=StorageType.FILE))


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
                     ack_wait: float, max_deliver: int) -> None:
    """A work-queue stream on `subject` and its durable pull consumer (idempotent). A
    message not acked within ack_wait (no in_progress() heartbeat) goes to another worker."""
    config = StreamConfig(name=stream, subjects=[subject], retention=RetentionPolicy.WORK_QUEUE,
                          storage=StorageType.FILE)
    try:
        await js.add_stream(config)
    except BadRequestError:
        await js.update_stream(config)
    await js.add_consumer(stream, ConsumerConfig(
        durable_name=consumer, ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait, max_deliver=max_deliver,
        filter_subject=subject,
    ))
