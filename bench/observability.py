"""What metrics and traces cost a call: the same tiny unary call, interleaved in one run,
against a plain grpc.aio server (the reference: no interceptors), the services' call
wrapper (`CallInterceptor`: request id, log line, error mapping, and the Prometheus counter
and histogram), and that wrapper behind the OpenTelemetry interceptor exporting every span
over OTLP to a loopback collector. Prints median latencies, the ratios to the plain server
and the cost of recording one call's metrics on its own."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "gen")]

import asyncio  # noqa: E402
from concurrent import futures  # noqa: E402

import grpc  # noqa: E402
import structlog  # noqa: E402
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc  # noqa: E402

from bench.common import median  # noqa: E402
from services.common import metrics, tracing  # noqa: E402
from services.common.server import CallInterceptor  # noqa: E402

CALLS = 2000
METHOD = "/loramesh.bench.EchoService/Echo"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.spans = 0

    def Export(self, request, context):
        self.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def _echo_handler() -> grpc.GenericRpcHandler:
    async def echo(request: bytes, context) -> bytes:
        return request

    return grpc.method_handlers_generic_handler("loramesh.bench.EchoService", {
        "Echo": grpc.unary_unary_rpc_method_handler(echo)})


async def _server(interceptors: list) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers((_echo_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def run(collector_endpoint: str) -> dict[str, list[float]]:
    tracer_interceptors = tracing.configure("bench", collector_endpoint)
    servers = {
        "plain": await _server([]),
        "wrapper": await _server([CallInterceptor()]),
        "wrapper+traces": await _server([*tracer_interceptors, CallInterceptor()]),
    }
    channels = {name: grpc.aio.insecure_channel(f"127.0.0.1:{port}") for name, (_, port) in servers.items()}
    calls = {name: channel.unary_unary(METHOD) for name, channel in channels.items()}
    times: dict[str, list[float]] = {name: [] for name in servers}
    for call in calls.values():  # warm-up: connections, first spans
        for _ in range(50):
            await call(b"x" * 64)
    for _ in range(CALLS):
        for name, call in calls.items():
            started = time.perf_counter()
            await call(b"x" * 64)
            times[name].append(time.perf_counter() - started)
    for channel in channels.values():
        await channel.close()
    for server, _ in servers.values():
        await server.stop(None)
    return times


def main() -> None:
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # the call log lines go nowhere
    collector = Collector()
    receiver = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)
    port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    times = asyncio.run(run(f"http://127.0.0.1:{port}"))
    tracing.shutdown()
    receiver.stop(0)

    plain = median(times["plain"])
    print(f"{CALLS} unary calls each, interleaved; median latency per call")
    for name, values in times.items():
        print(f"  {name:15s} {median(values) * 1e6:8.1f} us   ratio to plain {median(values) / plain:5.2f}")
    started = time.perf_counter()
    for _ in range(100_000):
        metrics.observe_call(METHOD, "OK", 0.001)
    print(f"recording one call's metrics (counter + histogram): {(time.perf_counter() - started) * 10:.2f} us")
    print(f"spans received by the collector: {collector.spans}")


if __name__ == "__main__":
    main()
