"""Latency the gateway adds: the same small call (GET /tag/free with nothing loaded)
as REST through Envoy, as native gRPC through Envoy, and as native gRPC straight to the
tagger, interleaved in one run. Prints medians and what the gateway adds (target: median
under 1 ms). The REST client is http.client on a kept-alive connection, the lightest
client Python has, so the difference is the gateway rather than the client library."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "gen")]

import http.client  # noqa: E402

import grpc  # noqa: E402

from bench.common import median, start_mesh, workdir  # noqa: E402
from loramesh.v1 import tagger_pb2, tagger_pb2_grpc  # noqa: E402

CALLS = 500


def main() -> None:
    with workdir() as tmp:
        mesh = start_mesh(Path(tmp))
        try:
            rest_times, via_envoy_times, grpc_times = [], [], []
            rest = http.client.HTTPConnection("127.0.0.1", mesh.ports.rest[0])
            with grpc.insecure_channel(f"127.0.0.1:{mesh.ports.services['tagger']}") as direct, \
                    grpc.insecure_channel(f"127.0.0.1:{mesh.ports.rest[0]}") as through_envoy:
                direct_call = tagger_pb2_grpc.TaggerServiceStub(direct).FreeTagger
                envoy_call = tagger_pb2_grpc.TaggerServiceStub(through_envoy).FreeTagger
                request = tagger_pb2.FreeTaggerRequest()

                def rest_call():
                    rest.request("GET", "/tag/free")
                    response = rest.getresponse()
                    response.read()
                    assert response.status == 200

                for _ in range(50):  # warm up connections
                    rest_call()
                    direct_call(request)
                    envoy_call(request)
                for _ in range(CALLS):
                    for call, times in ((rest_call, rest_times), (lambda: envoy_call(request), via_envoy_times),
                                        (lambda: direct_call(request), grpc_times)):
                        start = time.perf_counter()
                        call()
                        times.append(time.perf_counter() - start)
            rest.close()
        finally:
            mesh.stop()
    rest_ms, envoy_ms, grpc_ms = (median(t) * 1000 for t in (rest_times, via_envoy_times, grpc_times))
    print(f"direct gRPC               median {grpc_ms:7.3f} ms")
    print(f"gRPC via Envoy            median {envoy_ms:7.3f} ms   (+{envoy_ms - grpc_ms:.3f} ms)")
    print(f"REST via Envoy            median {rest_ms:7.3f} ms")
    print(f"added by REST gateway     median {rest_ms - grpc_ms:7.3f} ms   ratio {rest_ms / grpc_ms:.2f}x   "
          f"(target < 1 ms)")


if __name__ == "__main__":
    main()
