"""Latency the gateway adds: the same small call (GET /tag/free with nothing loaded)
as REST through Envoy and as native gRPC straight to the tagger, interleaved in one run.
Prints medians and the added latency (target: median under 1 ms)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "gen")]

import grpc  # noqa: E402
import httpx  # noqa: E402

from bench.common import median, start_mesh, workdir  # noqa: E402
from loramesh.v1 import tagger_pb2, tagger_pb2_grpc  # noqa: E402

CALLS = 500


def main() -> None:
    with workdir() as tmp:
        mesh = start_mesh(Path(tmp))
        try:
            rest_times, grpc_times = [], []
            with httpx.Client(timeout=30) as client, \
                    grpc.insecure_channel(f"127.0.0.1:{mesh.ports.services['tagger']}") as channel:
                stub = tagger_pb2_grpc.TaggerServiceStub(channel)
                url = mesh.rest_url + "/tag/free"
                for _ in range(50):  # warm up connections
                    client.get(url)
                    stub.FreeTagger(tagger_pb2.FreeTaggerRequest())
                for _ in range(CALLS):
                    start = time.perf_counter()
                    assert client.get(url).status_code == 200
                    rest_times.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    stub.FreeTagger(tagger_pb2.FreeTaggerRequest())
                    grpc_times.append(time.perf_counter() - start)
        finally:
            mesh.stop()
    rest_ms, grpc_ms = median(rest_times) * 1000, median(grpc_times) * 1000
    print(f"direct gRPC      median {grpc_ms:7.3f} ms")
    print(f"REST via Envoy   median {rest_ms:7.3f} ms")
    print(f"added by gateway median {rest_ms - grpc_ms:7.3f} ms   ratio {rest_ms / grpc_ms:.2f}x   (target < 1 ms)")


if __name__ == "__main__":
    main()
