"""Every job record of the `inference_jobs` bucket, held in this replica's memory in queue
order with a count per status, so GET /queue answers without reading the bucket.

A KV watch feeds it: the latest record of every key first, then each write as it lands.
Before it answers, the index waits until it has applied the bucket's last write as of the
request (one stream-info call), so every replica lists the same jobs, and a job a client
just submitted through any replica is in the next listing. Records leave with the
bucket's TTL (the server expires them without a watch event, so the index drops them by
the time of their last write). `start()` builds it afresh; the store calls it at start-up
and after every NATS reconnect.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import Callable

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from services.common import logs
from services.common.errors import Unavailable

log = logs.get(__name__)

# How long a listing waits for the watch to apply the writes made before it.
SYNC_S = 5.0

OrderKey = tuple  # what `order` returns for a record


class QueueIndex:
    def __init__(self, js: JetStreamContext, bucket: str, history_s: float, decode: Callable,
                 order: Callable[[object], tuple], statuses: tuple[str, ...]):
        self.js = js
        self.stream, self.prefix = f"KV_{bucket}", f"$KV.{bucket}."
        self.history_s = history_s
        self.decode = decode
        self.order = order
        self.statuses = statuses
        self._subscription = None
        # Listings waiting for the index to reach a stream sequence; they outlive a rebuild.
        self._waiters: list[tuple[int, asyncio.Future]] = []
        self._reset()

    def _reset(self) -> None:
        # job id -> (record, its order key, time of its last write)
        self._entries: dict[str, tuple[object, OrderKey, float]] = {}
        # (order key, job id), sorted: every record, and the records of each status.
        self._all: list[tuple[OrderKey, str]] = []
        self._by_status: dict[str, list[tuple[OrderKey, str]]] = {s: [] for s in self.statuses}
        # Stream sequence of the last write applied, and what the first snapshot covers.
        self._applied = 0
        self._floor = 0
        self._snapshot_done = False
        # No record was written before this (a lower bound), so none expires before it + TTL.
        self._oldest = time.time()

    # ---- feeding ------------------------------------------------------------------------

    async def start(self) -> None:
        """(Re)builds the index from the bucket and follows it."""
        await self.stop()
        self._reset()
        self._floor = (await self.js.stream_info(self.stream)).state.last_seq
        self._subscription = await self.js.subscribe(
            f"{self.prefix}>", stream=self.stream, cb=self._on_message, ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT)
        info = await self._subscription.consumer_info()
        if info.num_pending == 0 and self._subscription.delivered == 0:
            self._finish_snapshot()

    async def stop(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                await self._subscription.unsubscribe()
            self._subscription = None

    async def _on_message(self, msg) -> None:
        meta = msg.metadata
        job_id = msg.subject[len(self.prefix):]
        if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
            self._remove(job_id)
        else:
            try:
                self._put(job_id, self.decode(msg.data), meta.timestamp.timestamp())
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("unreadable job record left out of the index", job_id=job_id, error=str(exc))
        self._applied = max(self._applied, meta.sequence.stream)
        if meta.num_pending == 0 and not self._snapshot_done:
            self._finish_snapshot()
        self._wake()

    def _finish_snapshot(self) -> None:
        # Every write up to the start of the watch is in the snapshot, or was replaced or expired.
        self._snapshot_done = True
        self._wake()

    def _put(self, job_id: str, record, written: float) -> None:
        key = self.order(record)
        old = self._entries.get(job_id)
        self._entries[job_id] = (record, key, written)
        self._oldest = min(self._oldest, written)
        if old is not None and old[1] == key and old[0].status == record.status:
            return  # progress and the like: the place in line is the same
        if old is not None:
            self._unlist(job_id, old[0].status, old[1])
        bisect.insort(self._all, (key, job_id))
        bisect.insort(self._by_status.setdefault(record.status, []), (key, job_id))

    def _remove(self, job_id: str) -> None:
        old = self._entries.pop(job_id, None)
        if old is not None:
            self._unlist(job_id, old[0].status, old[1])

    def _unlist(self, job_id: str, status: str, key: OrderKey) -> None:
        for listing in (self._all, self._by_status[status]):
            at = bisect.bisect_left(listing, (key, job_id))
            if at < len(listing) and listing[at][1] == job_id:
                del listing[at]

    # ---- reading ------------------------------------------------------------------------

    @property
    def applied(self) -> int:
        return max(self._applied, self._floor) if self._snapshot_done else self._applied

    def _wake(self) -> None:
        applied, waiting = self.applied, []
        for target, future in self._waiters:
            if applied >= target and not future.done():
                future.set_result(None)
            elif not future.done():
                waiting.append((target, future))
        self._waiters = waiting

    async def sync(self) -> None:
        """Returns once every write the bucket held when called is in the index; a watch
        that does not get there in time is started again once."""
        target = (await self.js.stream_info(self.stream)).state.last_seq
        for attempt in range(2):
            if self.applied >= target:
                break
            future = asyncio.get_running_loop().create_future()
            self._waiters.append((target, future))
            try:
                await asyncio.wait_for(future, SYNC_S)
                break
            except TimeoutError:
                if attempt:
                    raise Unavailable("the job list is catching up with NATS; try again") from None
                log.warning("job index fell behind; rebuilding it", applied=self.applied, target=target)
                await self.start()
        self._expire()

    def _expire(self) -> None:
        """Drops the records the bucket's TTL has removed (checked only when one may have)."""
        now = time.time()
        if self._oldest + self.history_s > now:
            return
        for job_id, (_, _, written) in list(self._entries.items()):
            if written + self.history_s <= now:
                self._remove(job_id)
        self._oldest = min((written for _, _, written in self._entries.values()), default=now)

    def counts(self) -> dict[str, int]:
        return {status: len(listing) for status, listing in self._by_status.items()}

    def __len__(self) -> int:
        return len(self._entries)

    def items(self, status: str | None = None, offset: int = 0, limit: int | None = None) -> list:
        """Records in queue order, only those in `status` when given, paged."""
        listing = self._all if status is None else self._by_status.get(status, [])
        end = len(listing) if limit is None else offset + limit
        return [self._entries[job_id][0] for _, job_id in listing[offset:end]]
