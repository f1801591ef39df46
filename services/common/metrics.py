"""Prometheus metrics of a service process, defined once: calls by gRPC method and code with
their latency, the work queues' depth and lag, job durations, steps, and the resident models
and their memory. `serve` starts the /metrics endpoint on LORAMESH_METRICS_PORT (0: none).

Queue and residency figures are read when Prometheus scrapes, so they are never stale: the
queues from JetStream's consumer and stream state (the NATS client's own loop answers), the
models from the service's Residency. REST routes are visible in Envoy's own metrics."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime

import nats.errors
import nats.js.errors
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common import logs
from services.common.residency import Residency

log = logs.get(__name__)

# From a health-check-sized call to a minute-long model load.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# From a one-second tiny job to a training session of hours.
_JOB_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200)

REQUESTS = Counter("loramesh_grpc_requests", "gRPC calls handled, by full method name and status code",
                   ["method", "code"])
LATENCY = Histogram("loramesh_grpc_request_duration_seconds", "Time from a call's arrival to its answer "
                    "(a stream: to its last message)", ["method"], buckets=_LATENCY_BUCKETS)
JOB_SECONDS = Histogram("loramesh_job_duration_seconds", "Time a job ran on this replica, from start to its "
                        "final status", ["service", "kind", "status"], buckets=_JOB_BUCKETS)
STEPS = Counter("loramesh_steps", "Denoising steps (inference) and training steps (trainer) run on this replica; "
                "rate() gives steps/s", ["service", "kind"])
STEPS_PER_SECOND = Gauge("loramesh_training_steps_per_second", "Training speed over the recent steps of the "
                         "session that last reported", ["session_id"])

# How long one scrape may wait for NATS before it leaves the queue figures out.
SCRAPE_TIMEOUT_S = 2.0


def observe_call(method: str, code: str, seconds: float) -> None:
    REQUESTS.labels(method, code).inc()
    LATENCY.labels(method).observe(seconds)


def observe_job(service: str, kind: str, status: str, started_at: float | None) -> None:
    """A job that reached its final status; `started_at` is its start in epoch seconds."""
    if started_at is not None:
        JOB_SECONDS.labels(service, kind, status).observe(max(0.0, time.time() - started_at))


def forget_session(session_id: str) -> None:
    """A session that left this replica no longer has a speed here."""
    with contextlib.suppress(KeyError):
        STEPS_PER_SECOND.remove(session_id)


class QueueCollector(Collector):
    """Depth, in-flight count and lag of every work queue this process set up, read from
    JetStream on each scrape: depth is what no worker has taken yet (KEDA's lag), in flight
    what workers hold unacknowledged, and the age of a stream's oldest message how long the
    oldest unfinished work has waited."""

    def __init__(self) -> None:
        self._consumers: dict[tuple[str, str], object] = {}  # (stream, consumer) -> JetStreamContext
        self._loop: asyncio.AbstractEventLoop | None = None

    def track(self, js, stream: str, consumer: str) -> None:
        """Called on the NATS client's event loop when a queue is set up (again after a reconnect)."""
        self._loop = asyncio.get_running_loop()
        self._consumers[(stream, consumer)] = js

    def collect(self) -> Iterable[GaugeMetricFamily]:
        depth = GaugeMetricFamily("loramesh_queue_depth", "Messages waiting in a work queue that no worker has "
                                  "taken yet", labels=["stream", "consumer"])
        in_flight = GaugeMetricFamily("loramesh_queue_in_flight", "Messages workers hold and have not acknowledged",
                                      labels=["stream", "consumer"])
        oldest = GaugeMetricFamily("loramesh_queue_oldest_age_seconds", "Age of a work queue's oldest message "
                                   "(waiting or running): how far the workers lag", labels=["stream"])
        if self._consumers and self._loop is not None and not self._loop.is_closed():
            try:
                future = asyncio.run_coroutine_threadsafe(self._read(), self._loop)
                consumers, ages = future.result(SCRAPE_TIMEOUT_S)
            except Exception as exc:  # NATS away or slow: the other metrics still answer
                log.warning("queue metrics unavailable", error=type(exc).__name__)
                consumers, ages = {}, {}
            for (stream, consumer), (pending, ack_pending) in sorted(consumers.items()):
                depth.add_metric([stream, consumer], pending)
                in_flight.add_metric([stream, consumer], ack_pending)
            for stream, age in sorted(ages.items()):
                oldest.add_metric([stream], age)
        yield from (depth, in_flight, oldest)

    async def _read(self) -> tuple[dict, dict]:
        consumers, ages = {}, {}
        for (stream, consumer), js in list(self._consumers.items()):
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                info = await js.consumer_info(stream, consumer)
                consumers[(stream, consumer)] = (info.num_pending or 0, info.num_ack_pending or 0)
            if stream not in ages:
                with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                    ages[stream] = await _oldest_age(js, stream)
        return consumers, ages


async def _oldest_age(js, stream: str) -> float:
    state = (await js.stream_info(stream)).state
    if not state.messages:
        return 0.0
    first = await js.get_msg(stream, seq=state.first_seq)
    sent = first.time if isinstance(first.time, datetime) else None
    return max(0.0, (datetime.now(UTC) - sent).total_seconds()) if sent else 0.0


class ResidencyCollector(Collector):
    """What models the service holds, where and how many bytes; with CUDA, the memory torch
    has allocated and reserved per device."""

    def __init__(self, residency: Residency):
        self._residency = residency

    def collect(self) -> Iterable[GaugeMetricFamily]:
        resident = GaugeMetricFamily("loramesh_model_resident_bytes", "Bytes of weights of each resident model",
                                     labels=["model", "device"])
        for model in self._residency.resident():
            resident.add_metric([model.name, model.device], model.nbytes)
        yield resident
        yield GaugeMetricFamily("loramesh_models_resident", "Models this replica holds in memory",
                                value=len(self._residency.resident()))
        torch = sys.modules.get("torch")  # only a process that imported torch can hold CUDA memory
        if torch is not None and torch.cuda.is_available():
            allocated = GaugeMetricFamily("loramesh_device_memory_allocated_bytes", "Device memory torch has "
                                          "allocated", labels=["device"])
            reserved = GaugeMetricFamily("loramesh_device_memory_reserved_bytes", "Device memory torch's caching "
                                         "allocator holds", labels=["device"])
            for index in range(torch.cuda.device_count()):
                allocated.add_metric([f"cuda:{index}"], torch.cuda.memory_allocated(index))
                reserved.add_metric([f"cuda:{index}"], torch.cuda.memory_reserved(index))
            yield from (allocated, reserved)


QUEUES = QueueCollector()
REGISTRY.register(QUEUES)


def track_queue(js, stream: str, consumer: str) -> None:
    QUEUES.track(js, stream, consumer)


def serve_metrics(port: int, host: str, residency: Residency):
    """Starts the /metrics endpoint (a daemon thread) and returns its server to shut down."""
    REGISTRY.register(ResidencyCollector(residency))
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    return server

