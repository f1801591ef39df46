"""The common runtime: media limits, residency, events on NATS, graceful shutdown."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import grpc
import nats
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from launcher.mesh import free_port
from loramesh.v1 import events_pb2, tagger_pb2, tagger_pb2_grpc
from services.common import bus, media, server
from services.common.errors import InvalidInput, NotFound
from services.common.residency import Residency
from services.common.settings import MediaLimits
from tests.conftest import RoutesHandler, write_image, write_video

ALLOW_LOOPBACK = MediaLimits(allow_private_urls=True, max_download_bytes=10_000)


def test_resolve_path_stays_inside_the_roots(tmp_path):
    root = tmp_path / "root"
    inside = write_image(root / "a" / "x.png")
    outside = write_image(tmp_path / "secret.png")
    (root / "escape.png").symlink_to(outside)
    roots = (root.resolve(),)
    assert media.resolve_path(str(inside), roots, "f") == inside.resolve()
    with pytest.raises(InvalidInput, match="'..'"):
        media.resolve_path(f"{root}/a/../a/x.png", roots, "f")
    with pytest.raises(InvalidInput, match="outside the allowed roots"):
        media.resolve_path(str(outside), roots, "f")
    with pytest.raises(InvalidInput, match="leads outside"):
        media.resolve_path(str(root / "escape.png"), roots, "f")
    with pytest.raises(InvalidInput, match="absolute"):
        media.resolve_path("a/x.png", roots, "f")
    with pytest.raises(NotFound, match="no such file"):
        media.resolve_path(str(root / "nope.png"), roots, "f")


def test_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (4000, 3000)).save(path)
    with pytest.raises(InvalidInput, match="4000x3000 pixels"):
        media.decode_image(path, "image_path", MediaLimits(max_image_pixels=10_000_000))
    assert media.decode_image(path, "image_path", MediaLimits()).size == (4000, 3000)




@pytest.fixture
def http_server():
    RoutesHandler.routes, RoutesHandler.seen_hosts = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), RoutesHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", RoutesHandler.routes
    server.shutdown()


def test_url_downloads_respect_size_and_redirect_limits(http_server):
    base, routes = http_server
    routes.update({
        "/small": (200, {}, b"x" * 100),
        "/big": (200, {}, b"x" * 20_000),
        "/moved": (302, {"location": "/small"}, b""),
        "/loop": (302, {"location": "/loop"}, b""),
        "/gone": (404, {}, b""),
    })
    assert media.fetch_url(f"{base}/small", "u", ALLOW_LOOPBACK) == b"x" * 100
    assert media.fetch_url(f"{base}/moved", "u", ALLOW_LOOPBACK) == b"x" * 100
    with pytest.raises(InvalidInput, match="larger than the 10000 byte limit"):
        media.fetch_url(f"{base}/big", "u", ALLOW_LOOPBACK)
    with pytest.raises(InvalidInput, match="redirects"):
        media.fetch_url(f"{base}/loop", "u", ALLOW_LOOPBACK)
    with pytest.raises(InvalidInput, match="HTTP 404"):
        media.fetch_url(f"{base}/gone", "u", ALLOW_LOOPBACK)
    with pytest.raises(InvalidInput, match="private or loopback"):
        media.fetch_url(f"{base}/small", "u", MediaLimits(allow_private_urls=False))


def test_video_frames_are_sampled_at_the_interval(tmp_path):
    video = write_video(tmp_path / "v.mp4", frames=40, fps=10)
    frames = media.sample_video_frames(video, "v", 0.5, 50, MediaLimits())
    assert [round(f.time_s, 2) for f in frames] == [i * 0.5 for i in range(8)]
    assert [f.index for f in frames] == [i * 5 for i in range(8)]
    assert len(media.sample_video_frames(video, "v", 0.1, 3, MediaLimits())) == 3
    audio_only = tmp_path / "not-video.mp4"
    audio_only.write_bytes(b"\x00" * 100)
    with pytest.raises(InvalidInput, match="not a readable video"):
        media.sample_video_frames(audio_only, "v", 0.5, 5, MediaLimits())


def test_residency_loads_once_evicts_and_frees():
    residency = Residency(max_bytes=100)
    loads = []

    def loader(name, size):
        def load():
            loads.append(name)
            return object(), "cpu", size
        return load

    a = residency.get("a", loader("a", 60))
    assert residency.get("a", loader("a", 60)) is a
    residency.get("b", loader("b", 60))  # over budget: "a" goes
    assert [r.name for r in residency.resident()] == ["b"]
    assert loads == ["a", "b"]
    assert residency.total_bytes == 60
    freed = residency.free_all()
    assert [(f.name, f.nbytes) for f in freed] == [("b", 60)]
    assert residency.total_bytes == 0


async def test_events_are_kept_for_late_readers(mesh):
    nc = await nats.connect(mesh.nats_url)
    try:
        await bus.ensure_events_stream(nc)
        publisher = bus.EventPublisher(nc, "tagger")
        for step in range(3):
            await publisher.publish("job-7", events_pb2.EVENT_KIND_PROGRESS, {"step": step, "total": 3})
        js = nc.jetstream()
        sub = await js.subscribe("events.tagger.job-7.progress", ordered_consumer=True)
        received = [json.loads((await sub.next_msg(timeout=5)).data) for _ in range(3)]
        assert [e["data"]["step"] for e in received] == [0, 1, 2]
        assert {e["kind"] for e in received} == {"EVENT_KIND_PROGRESS"}
        assert received[0]["subject_id"] == "job-7"
    finally:
        await nc.close()


def test_sigterm_lets_running_calls_finish(mesh, media_dir):
    images = [str(write_image(media_dir / "slow" / f"{i}.png", (1400, 1200), seed=i)) for i in range(48)]
    port = free_port()
    env = {**mesh.env, "LORAMESH_TAGGER_PORT": str(port), "LORAMESH_SHUTDOWN_GRACE_S": "60"}
    proc = subprocess.Popen([sys.executable, "-m", "services.tagger"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 60
        while True:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    break
            except grpc.RpcError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        request = tagger_pb2.TagRequest()
        request.input.list_value.extend(images)
        future = tagger_pb2_grpc.TaggerServiceStub(channel).Tag.future(request, timeout=120)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        try:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError:
            status = None
        assert status != health_pb2.HealthCheckResponse.SERVING
        reply = future.result()
        assert len(reply.fields) == len(images)
        assert proc.wait(timeout=60) == 0
        assert "shutting down" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_vram_free_names_what_did_not_answer(mesh, tmp_path):
    # A replica that acknowledges and never reports, beside the mesh's four services.
    nc = await nats.connect(mesh.nats_url)
    try:
        async def silent(msg):
            await msg.respond(server.FREE_ACK + b"trainer@silent-replica")

        await nc.subscribe(server.FREE_MEMORY_SUBJECT, cb=silent)
        await nc.flush()
        reports, unanswered = await server.fan_out_free(nc, timeout=2.0)
        assert {r.service for r in reports} == {"trainer", "captioner", "tagger", "inference"}
        assert unanswered == ["trainer@silent-replica"]
    finally:
        await nc.close()

    # On a NATS nobody else listens on, every service is named.
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "nats-server"), "-p", str(port), "-a", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        nc = await bus.connect(f"nats://127.0.0.1:{port}", name="test")
        reports, unanswered = await server.fan_out_free(nc, timeout=1.0)
        assert reports == [] and unanswered == ["captioner", "inference", "tagger", "trainer"]
        await nc.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
