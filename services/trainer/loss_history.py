"""Each session's recent loss and learning rate, one point per logged step (the config's
`logging.log_every`), for charts. A limits stream keeps the newest points of each session
and drops the oldest past the limit, so a long session costs a bounded amount:

    stream  TRAINER_LOSS  (trainer.loss.<session id>)  one {step, loss, learning_rate, time} per message
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import nats.errors
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError

from services.common import bus

STREAM = "TRAINER_LOSS"
SUBJECT = "trainer.loss"
READ_BATCH = 1000


@dataclass(frozen=True)
class LossPoint:
    step: int
    loss: float
    learning_rate: float
    time: float


class LossHistory:
    def __init__(self, nc, max_points: int, *, stream: str = STREAM, prefix: str = SUBJECT):
        self.nc = nc
        self.js = nc.jetstream()
        self.max_points = max_points
        self.stream = stream
        self.prefix = prefix

    def subject(self, session_id: str) -> str:
        return f"{self.prefix}.{session_id}"  # session ids are letters, digits, '-' and '_': one token

    async def setup(self) -> None:
        config = StreamConfig(name=self.stream, subjects=[f"{self.prefix}.>"], retention=RetentionPolicy.LIMITS,
                              storage=StorageType.FILE, max_msgs_per_subject=self.max_points,
                              discard=DiscardPolicy.OLD, num_replicas=bus.stream_replicas(self.js))
        try:
            await self.js.add_stream(config)
        except BadRequestError:
            await self.js.update_stream(config)

    async def append(self, session_id: str, step: int, loss: float, learning_rate: float) -> None:
        point = LossPoint(step, loss, learning_rate, time.time())
        await self.js.publish(self.subject(session_id), json.dumps(asdict(point)).encode())

    async def points(self, session_id: str, after_step: int = 0) -> list[LossPoint]:
        """The stored points in step order, those past `after_step`. A session that resumed
        from an older checkpoint trained some steps again: their newer points replace the
        ones written before the restart."""
        name = self.subject(session_id)
        info = await self.js.stream_info(self.stream, subjects_filter=name)
        if not (info.state.subjects or {}).get(name):
            return []
        subscription = await self.js.pull_subscribe(name, stream=self.stream, config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=30.0))
        points: list[LossPoint] = []
        try:
            while True:
                try:
                    messages = await subscription.fetch(READ_BATCH, timeout=2.0)
                except (TimeoutError, nats.errors.TimeoutError):
                    break  # trimmed while reading: what was read is the history
                for msg in messages:
                    point = LossPoint(**json.loads(msg.data))
                    while points and points[-1].step >= point.step:
                        points.pop()
                    points.append(point)
                if messages[-1].metadata.num_pending == 0:
                    break
        finally:
            await subscription.unsubscribe()
        return [p for p in points if p.step > after_step]

    async def clear(self, session_id: str) -> None:
        await self.js.purge_stream(self.stream, subject=self.subject(session_id))
