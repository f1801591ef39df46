"""grpc.aio server bootstrap shared by every service: health, reflection, request
logging and error mapping, the memory fan-out, NATS, and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import nats.errors
import nats.js.errors
import structlog
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from nats.aio.client import Client as NATS

from loramesh.v1 import common_pb2, common_pb2_grpc
from services.common import bus, errors, logs, metrics, tracing
from services.common.residency import Freed, Residency
from services.common.settings import SERVICE_PORTS, Settings, SettingsError

log = logs.get(__name__)

FREE_MEMORY_SUBJECT = "control.memory.free"
# How long to wait for more replicas to acknowledge after the last acknowledgement.
FAN_OUT_IDLE_S = 0.3
FREE_ACK = b"ack "  # followed by service@replica

_STATUS_CODES = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.TooLarge: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.UpstreamError: grpc.StatusCode.UNAVAILABLE,
}


@dataclass
class ServiceContext:
    """What a servicer needs from the runtime, built once per process."""

    settings: Settings
    nats: NATS
    events: bus.EventPublisher
    residency: Residency
    # Frees this replica's memory; services holding more than models (training sessions) replace it.
    free_memory: Callable[[], Awaitable[list[Freed]]] = field(default=None)  # type: ignore[assignment]
    # Run once the server listens, e.g. to set up queues and start workers.
    on_start: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Run on SIGTERM before the server stops, e.g. to checkpoint running work.
    on_shutdown: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Run after NATS comes back, e.g. to create buckets and queues again on a server that
    # lost its store (they are idempotent, so a server that kept it is left as it was).
    on_reconnect: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.free_memory is None:
            self.free_memory = lambda: asyncio.to_thread(self.residency.free_all)

    def memory_report(self, freed: list[Freed]) -> common_pb2.MemoryReport:
        return memory_report(self.settings, freed)


def memory_report(settings: Settings, freed: list[Freed]) -> common_pb2.MemoryReport:
    return common_pb2.MemoryReport(
        service=settings.service,
        replica=settings.replica,
        freed=[common_pb2.FreedModel(name=f.name, device=f.device, bytes=f.nbytes, action=f.action) for f in freed],
        bytes_freed=sum(f.nbytes for f in freed),
        message=f"freed {len(freed)} model(s)" if freed else "nothing loaded",
    )


# Every status travels in HTTP/2 headers (grpc-message, grpc-status-details-bin) that Envoy
# refuses past its header limit, so no client value may make one large.
MAX_MESSAGE_BYTES = 1024
MAX_FIELD_BYTES = 256
MAX_DETAILS_BYTES = 8 * 1024


def bounded(text: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, ending with "…" and how much was cut."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    # The marker takes at most 32 bytes; "ignore" drops a character cut in half.
    keep = data[: max(0, limit - 32)].decode("utf-8", "ignore")
    return f"{keep}… ({len(data) - len(keep.encode())} more bytes)"


def status_for(exc: errors.ServiceError) -> status_pb2.Status:
    """The google.rpc.Status a client sees for a domain error, with BadRequest details;
    the message, each field and each description are bounded, and so is the whole detail."""
    code = _STATUS_CODES.get(type(exc), grpc.StatusCode.INTERNAL)
    status = status_pb2.Status(code=code.value[0], message=bounded(str(exc)))
    if isinstance(exc, errors.InvalidInput):
        detail = error_details_pb2.BadRequest()
        for index, (name, description) in enumerate(exc.violations):
            violation = error_details_pb2.BadRequest.FieldViolation(
                field=bounded(str(name), MAX_FIELD_BYTES), description=bounded(str(description)))
            if detail.ByteSize() + violation.ByteSize() + 64 > MAX_DETAILS_BYTES:
                detail.field_violations.add(
                    field=violation.field,
                    description=f"… and {len(exc.violations) - index} more problems not shown")
                break
            detail.field_violations.append(violation)
        status.details.add().Pack(detail)
    return status


def internal_status(request_id: str) -> status_pb2.Status:
    """What a client sees for an unexpected error: no exception text (it may hold server
    paths or the client's whole input), only the id to find it in the log."""
    return status_pb2.Status(code=grpc.StatusCode.INTERNAL.value[0],
                             message=f"internal error; the service log has it under request id {request_id}")


async def abort(context: grpc.aio.ServicerContext, status: status_pb2.Status, http_status: int | None = None) -> None:
    if http_status is not None:
        with contextlib.suppress(Exception):  # a stream may have sent its headers already
            await context.send_initial_metadata((("x-http-status", str(http_status)),))
    await context.abort(
        _CODE_BY_NUMBER[status.code],
        status.message,
        trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),),
    )


_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}

_QUIET_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Binds the request id, logs each call (once, streams included), and turns domain
    errors into statuses."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(_QUIET_PREFIXES):
            return handler
        metadata = dict(details.invocation_metadata or ())
        # The client's id is echoed in logs and statuses: keep it short.
        request_id = str(metadata.get("x-request-id") or uuid.uuid4().hex)[:128]
        method = details.method

        @contextlib.asynccontextmanager
        async def scope(context):
            structlog.contextvars.bind_contextvars(request_id=request_id, method=method)
            started = time.perf_counter()
            outcome = "OK"
            try:
                with bus.answering_call():
                    yield
            except bus.NATS_UNREACHABLE_ERRORS as exc:
                status = status_for(errors.Unavailable(bus.NATS_UNREACHABLE_MESSAGE))
                outcome = "UNAVAILABLE"
                log.warning("nats unreachable", error=type(exc).__name__)
                raise _Abort(status) from exc
            except nats.errors.MaxPayloadError as exc:
                too_large = errors.TooLarge("body", "the request is larger than one NATS message (max_payload, 1 MiB "
                                                    "unless the server raises it), which a record or job must fit in")
                outcome = "INVALID_ARGUMENT"
                raise _Abort(status_for(too_large), too_large.http_status) from exc
            except errors.ServiceError as exc:
                status = status_for(exc)
                outcome = _CODE_BY_NUMBER[status.code].name
                raise _Abort(status, getattr(exc, "http_status", None)) from exc
            except grpc.aio.AbortError:
                # The handler aborted with its own status.
                code = context.code()
                outcome = code.name if isinstance(code, grpc.StatusCode) else str(code)
                raise
            except (asyncio.CancelledError, GeneratorExit):
                outcome = "CANCELLED"
                raise
            except Exception as exc:
                outcome = "INTERNAL"
                log.exception("call failed")
                raise _Abort(internal_status(request_id)) from exc
            finally:
                seconds = time.perf_counter() - started
                metrics.observe_call(method, outcome, seconds)
                log.info("call", code=outcome, ms=round(seconds * 1000, 2))
                structlog.contextvars.unbind_contextvars("request_id", "method")

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                try:
                    async with scope(context):
                        return await inner(request, context)
                except _Abort as exc:
                    await abort(context, exc.status, exc.http_status)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream and inspect.isasyncgenfunction(handler.unary_stream):
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                try:
                    async with scope(context):
                        async for item in inner_stream(request, context):
                            yield item
                except _Abort as exc:
                    await abort(context, exc.status, exc.http_status)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler


class _Abort(Exception):
    def __init__(self, status: status_pb2.Status, http_status: int | None = None):
        self.status = status
        # A REST status the gRPC code does not map to (413); the gateway applies it.
        self.http_status = http_status


class MemoryServicer(common_pb2_grpc.MemoryServiceServicer):
    """POST /vram/free: asks every replica of every service over NATS and gathers the reports."""

    def __init__(self, ctx: ServiceContext):
        self._ctx = ctx

    async def FreeVram(self, request, context):
        timeout = request.timeout_seconds if request.HasField("timeout_seconds") else 5.0
        if not 0 < timeout <= 60:
            raise errors.InvalidInput("timeout_seconds", "must be > 0 and <= 60 seconds")
        # Published while NATS is away, the request would wait in nats-py's buffer and
        # reach nobody.
        await bus.wait_connected(self._ctx.nats)
        reports, unanswered = await fan_out_free(self._ctx.nats, timeout)
        return common_pb2.FreeVramResponse(
            reports=reports, total_bytes_freed=sum(r.bytes_freed for r in reports), unanswered=unanswered
        )


def _replica_name(service: str, replica: str) -> str:
    return f"{service}@{replica}"


async def fan_out_free(nc: NATS, timeout: float) -> tuple[list[common_pb2.MemoryReport], list[str]]:
    """Every replica first acknowledges at once (naming itself), then reports when it has
    freed its memory (a training session may take a while): wait for a report from each
    replica that acknowledged, or until `timeout`. Returns the reports and what did not
    answer: services no replica of which acknowledged, replicas that did not report."""
    inbox = nc.new_inbox()
    replies: asyncio.Queue = asyncio.Queue()
    sub = await nc.subscribe(inbox, cb=replies.put)
    try:
        await nc.publish(FREE_MEMORY_SUBJECT, b"", reply=inbox)
        reports: list[common_pb2.MemoryReport] = []
        acknowledged: set[str] = set()
        deadline = time.monotonic() + timeout
        acks_until = time.monotonic() + FAN_OUT_IDLE_S
        while (now := time.monotonic()) < deadline:
            all_in = len(reports) >= len(acknowledged)
            if all_in and now >= acks_until:
                break
            try:
                msg = await asyncio.wait_for(replies.get(), timeout=(acks_until if all_in else deadline) - now)
            except TimeoutError:
                continue
            if msg.headers and msg.headers.get("Status") == "503":
                break  # NATS says no replica of any service listens
            if msg.data.startswith(FREE_ACK):
                acknowledged.add(msg.data[len(FREE_ACK):].decode())
                acks_until = time.monotonic() + FAN_OUT_IDLE_S
            else:
                reports.append(json_format.Parse(msg.data, common_pb2.MemoryReport()))
        reported = {_replica_name(r.service, r.replica) for r in reports}
        answering_services = {name.split("@", 1)[0] for name in acknowledged | reported}
        unanswered = sorted(set(SERVICE_PORTS) - answering_services) + sorted(acknowledged - reported)
        return sorted(reports, key=lambda r: (r.service, r.replica)), unanswered
    finally:
        await sub.unsubscribe()


async def answer_free_requests(ctx: ServiceContext) -> None:
    ack = FREE_ACK + _replica_name(ctx.settings.service, ctx.settings.replica).encode()

    async def on_request(msg) -> None:
        await msg.respond(ack)
        freed = await ctx.free_memory()
        report = ctx.memory_report(freed)
        log.info("memory freed", bytes=report.bytes_freed, models=len(freed))
        await msg.respond(json_format.MessageToJson(report, preserving_proto_field_name=True).encode())

    await ctx.nats.subscribe(FREE_MEMORY_SUBJECT, cb=on_request)


Register = Callable[[grpc.aio.Server, ServiceContext], list[str]]


async def serve(settings: Settings, register: Register) -> None:
    """Runs one service until SIGTERM/SIGINT. `register` adds the servicers and returns
    their full service names (for health and reflection)."""
    service = settings.service
    logs.configure(service)

    restore_hooks: list[Callable[[], Awaitable[None]]] = []

    async def restore_streams() -> None:
        # A NATS server that came back empty needs every stream, bucket and queue again.
        await bus.ensure_events_stream(nc)
        for hook in restore_hooks:
            try:
                await hook()
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                log.warning("could not restore NATS state after reconnecting", error=str(exc))

    residency = Residency(settings.max_resident_bytes)
    metrics_server = None
    if port := settings.observability.metrics_port:
        # Before NATS, so that a port in use stops the service at once.
        try:
            metrics_server = metrics.serve_metrics(port, settings.bind_host, residency)
        except OSError as exc:
            sys.exit(f"{service}: cannot serve metrics on LORAMESH_METRICS_PORT={port}: {exc.strerror or exc}")
    nc = await bus.connect(settings.nats_url, name=f"{service}@{settings.replica}", on_reconnect=restore_streams,
                           nats_settings=settings.nats)
    await bus.ensure_events_stream(nc)
    ctx = ServiceContext(
        settings=settings,
        nats=nc,
        events=bus.EventPublisher(nc, service),
        residency=residency,
        on_reconnect=restore_hooks,
    )

    # The tracing interceptor comes first, so a call's span covers all it does.
    interceptors = [*tracing.configure(service, settings.observability.otlp_endpoint), CallInterceptor()]
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)],
    )
    names = register(server, ctx)
    common_pb2_grpc.add_MemoryServiceServicer_to_server(MemoryServicer(ctx), server)
    names = [*names, common_pb2.DESCRIPTOR.services_by_name["MemoryService"].full_name]

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)

    server.add_insecure_port(f"{settings.bind_host}:{settings.port}")
    await server.start()
    for hook in ctx.on_start:
        await hook()
    await answer_free_requests(ctx)
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving", port=settings.port, metrics_port=settings.observability.metrics_port or None, services=names)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    # Load balancers see NOT_SERVING first; calls already running get the grace period.
    log.info("shutting down", grace_s=settings.shutdown_grace_s)
    await health_servicer.enter_graceful_shutdown()
    for hook in ctx.on_shutdown:
        await hook()
    await server.stop(settings.shutdown_grace_s)
    try:
        await asyncio.wait_for(nc.drain(), timeout=5)
    except (TimeoutError, nats.errors.Error):
        await nc.close()
    if metrics_server is not None:
        metrics_server.shutdown()
    tracing.shutdown()
    log.info("stopped")


def main(service: str, register: Register) -> None:
    try:
        settings = Settings.load(service)
    except SettingsError as exc:
        # Before anything starts: the operator sees which variable to fix.
        sys.exit(f"{service}: {exc}")
    asyncio.run(serve(settings, register))
