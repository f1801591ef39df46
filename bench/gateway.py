"""Latency the gateway adds: the same small call (GET /tag/free with nothing loaded)
as REST through Envoy, as native gRPC through Envoy, and as native gRPC straight to the
tagger, interleaved in one run. Prints medians and what the gateway adds (target: median
under 1 ms). The REST client is http.client on a kept-alive connection, the lightest
client Python has, so the difference is the gateway rather than the client library.

Then the cost of the gateway's request checks (content type and unknown JSON fields, the
`loramesh.requests` Lua filter) on a typical generation request (POST /txt2img, 1 KB of
JSON; with no model loaded the service answers at once, so the gateway's share shows): the
mesh's Envoy against a second Envoy with the same configuration less that filter,
interleaved, both in front of the same inference service."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "gen")]

import http.client  # noqa: E402
import json  # noqa: E402

import grpc  # noqa: E402
import yaml  # noqa: E402

from bench.common import median, start_mesh, workdir  # noqa: E402
from gateway import envoy_runner  # noqa: E402
from launcher.mesh import free_port  # noqa: E402
from loramesh.v1 import tagger_pb2, tagger_pb2_grpc  # noqa: E402

CALLS = 500
TXT2IMG = json.dumps({
    "prompt": "a lighthouse on a cliff at dusk, dramatic sky, <lora:add_detail:0.8>", "negative_prompt": "blurry",
    "width": 1024, "height": 768, "steps": 28, "cfg_scale": 6.5, "seed": 42, "sampler": "euler_a",
    "scheduler": "karras", "batch_count": 2, "clip_skip": 2, "skip_layers": [7, 8, 9], "vae_tiling": False,
    "easycache": True, "easycache_threshold": 0.2, "upscale": False,
    "ref_images": ["iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="]
    * 4,
})


def unchecked_envoy(mesh, tmp: Path):
    """An Envoy with the mesh's configuration less the request checks, on ports of its own."""
    config = yaml.safe_load(mesh.envoy_config_path.read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = admin = free_port()
    for listener in config["static_resources"]["listeners"]:
        listener["address"]["socket_address"]["port_value"] = port = free_port()
        listener.pop("additional_addresses", None)
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        manager["http_filters"] = [f for f in manager["http_filters"] if f["name"] != "loramesh.requests"]
        if listener["name"] == "rest":
            rest_port = port
    path = tmp / "envoy-unchecked.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = envoy_runner.start(path, tmp / "envoy-unchecked.log")
    envoy_runner.wait_ready(admin)
    return proc, rest_port


def checks_cost(mesh, tmp: Path) -> tuple[float, float]:
    """Median ms of POST /txt2img through the mesh's Envoy and through one without the checks."""
    proc, unchecked_port = unchecked_envoy(mesh, tmp)
    try:
        connections = [http.client.HTTPConnection("127.0.0.1", port) for port in (mesh.ports.rest[0], unchecked_port)]
        times: list[list[float]] = [[], []]

        def put(connection):
            connection.request("POST", "/txt2img", TXT2IMG, {"content-type": "application/json"})
            response = connection.getresponse()
            assert b"No model loaded" in response.read(), response.status

        for _ in range(50):
            for connection in connections:
                put(connection)
        for _ in range(CALLS):
            for connection, samples in zip(connections, times, strict=True):
                start = time.perf_counter()
                put(connection)
                samples.append(time.perf_counter() - start)
        for connection in connections:
            connection.close()
    finally:
        envoy_runner.stop(proc)
    return median(times[0]) * 1000, median(times[1]) * 1000


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
            checked_ms, unchecked_ms = checks_cost(mesh, Path(tmp))
        finally:
            mesh.stop()
    rest_ms, envoy_ms, grpc_ms = (median(t) * 1000 for t in (rest_times, via_envoy_times, grpc_times))
    print(f"direct gRPC               median {grpc_ms:7.3f} ms")
    print(f"gRPC via Envoy            median {envoy_ms:7.3f} ms   (+{envoy_ms - grpc_ms:.3f} ms)")
    print(f"REST via Envoy            median {rest_ms:7.3f} ms")
    print(f"added by REST gateway     median {rest_ms - grpc_ms:7.3f} ms   ratio {rest_ms / grpc_ms:.2f}x   "
          f"(target < 1 ms)")
    print(f"POST /txt2img             median {unchecked_ms:7.3f} ms without the request checks")
    print(f"  with the request checks median {checked_ms:7.3f} ms   (+{checked_ms - unchecked_ms:.3f} ms)   "
          f"ratio {checked_ms / unchecked_ms:.3f}x")


if __name__ == "__main__":
    main()
