"""The tagger through the gateway (REST on :8000-style port) and over native gRPC, with
the documented examples, reference scores and bad input."""

from __future__ import annotations

import json
import shutil
import threading
import tracemalloc
import weakref
from dataclasses import dataclass

import grpc
import httpx
import pytest
from google.protobuf import json_format
from PIL import Image

from loramesh.v1 import tagger_pb2, tagger_pb2_grpc
from services.common import media
from services.common.residency import Residency
from services.common.settings import Settings
from services.tagger import wd14
from services.tagger.inputs import MAX_INPUTS
from services.tagger.tagging import Tagger
from tests.conftest import write_image, write_video
from tests.wd14_reference import reference_tags


def post(mesh, path, body, **kwargs):
    return httpx.post(mesh.rest_url + path, json=body, timeout=60, **kwargs)


def test_tag_an_image_matches_reference(mesh, media_dir, models_dir):
    path = str(media_dir / "cat.png")
    r = post(mesh, "/tag", {"input": [path]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body) == [path]
    expected_rating, expected_tags = reference_tags(models_dir / "wd14-vit-v1", Image.open(path))
    assert set(body[path]) == {"rating", "tags"}
    assert list(body[path]["tags"]) == list(expected_tags), "same tags, best first"
    for part, expected in (("rating", expected_rating), ("tags", expected_tags)):
        assert body[path][part].keys() == expected.keys()
        for name, score in expected.items():
            assert body[path][part][name] == pytest.approx(score, abs=1e-5)


def test_tag_from_url(mesh, media_server, media_dir):
    url = f"{media_server}/dog.png"
    r = post(mesh, "/tag", {"input": [{"media_url": url}]})
    assert r.status_code == 200, r.text
    assert list(r.json()) == [url]
    by_path = post(mesh, "/tag", {"input": [str(media_dir / "dog.png")]}).json()
    assert r.json()[url] == next(iter(by_path.values()))


def test_tag_with_local_model_directory_and_onnx_path(mesh, media_dir, models_dir):
    path = str(media_dir / "cat.png")
    default = post(mesh, "/tag", {"input": [path]}).json()
    by_dir = post(mesh, "/tag", {"model_path": str(models_dir / "wd14-vit-v1"), "input": [path]})
    by_file = post(mesh, "/tag", {"modelPath": str(models_dir / "wd14-vit-v1" / "model.onnx"), "input": [path]})
    assert by_dir.status_code == by_file.status_code == 200, (by_dir.text, by_file.text)
    assert by_dir.json() == default == by_file.json()


def test_tag_video_merges_frames_by_maximum(mesh, media_dir):
    video = str(media_dir / "video.mp4")
    item = {"media_type": "video", "media_path": video, "frame_interval": 0.25, "max_frame_count": 15,
            "general_threshold": 0.0, "character_threshold": 0.0}
    r = post(mesh, "/tag", {"input": [item]})
    assert r.status_code == 200, r.text
    video_tags = r.json()[video]["tags"]
    # Tag the first frame alone as an image: every score of the video is at least that frame's.
    with __import__("av").open(video) as container:
        first = next(container.decode(video=0)).to_image()
    frame_path = media_dir / "first_frame.png"
    first.save(frame_path)
    frame = post(mesh, "/tag", {"input": [{"media_path": str(frame_path), "general_threshold": 0.0,
                                           "character_threshold": 0.0}]}).json()[str(frame_path)]["tags"]
    assert set(video_tags) == set(frame)
    assert all(video_tags[name] >= frame[name] - 1e-6 for name in frame)
    assert any(video_tags[name] > frame[name] + 1e-6 for name in frame), "later frames raise some scores"


def test_thresholds_per_item_and_multiple_inputs(mesh, media_dir):
    cat, dog = str(media_dir / "cat.png"), str(media_dir / "dog.png")
    r = post(mesh, "/tag", {"input": [cat, {"media_path": dog, "general_threshold": 0.4}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {cat, dog}
    low = post(mesh, "/tag", {"input": [{"media_path": dog, "general_threshold": 0.0}]}).json()[dog]["tags"]
    assert all(score >= 0.4 for name, score in body[dog]["tags"].items())
    assert {n for n, s in low.items() if s >= 0.4} <= set(body[dog]["tags"])
    assert len(low) > len(body[dog]["tags"])


def test_native_grpc_gives_the_same_result(mesh, media_dir):
    path = str(media_dir / "cat.png")
    rest = post(mesh, "/tag", {"input": [path]}).json()
    request = tagger_pb2.TagRequest()
    json_format.ParseDict({"input": [path]}, request)
    with grpc.insecure_channel(f"127.0.0.1:{mesh.ports.rest[0]}") as channel:
        reply = tagger_pb2_grpc.TaggerServiceStub(channel).Tag(request, timeout=60)
    native = json_format.MessageToDict(reply)
    assert native.keys() == rest.keys()
    for key in rest:
        for part in ("rating", "tags"):
            assert native[key][part] == pytest.approx(rest[key][part], abs=1e-9)


BAD_INPUTS = [
    ({}, "input"),
    ({"input": []}, "input"),
    ({"input": "/data/cat.png"}, "input"),
    ({"input": [{"media_path": "{media}/cat.png", "media_url": "http://example.com/a.png"}]}, "input[0]"),
    ({"input": ["{media}/missing.png"]}, "missing.png"),
    ({"input": ["/etc/passwd.png"]}, "outside the allowed roots"),
    ({"input": ["{media}/../cat.png"]}, ".."),
    ({"input": ["{media}/notes.txt"]}, "unsupported extension"),
    ({"input": ["{media}/corrupt.png"]}, "not a readable image"),
    ({"input": [{"media_path": "{media}/cat.png", "general_threshold": 1.5}]}, "general_threshold"),
    ({"input": [{"media_path": "{media}/cat.png", "character_threshold": -0.1}]}, "character_threshold"),
    ({"input": [{"media_url": "file:///etc/passwd"}]}, "http"),
    ({"input": [{"media_url": "ftp://example.com/cat.png"}]}, "http"),
    ({"input": [{"media_path": "{media}/cat.png", "max_frame_count": 0}]}, "max_frame_count"),
    ({"input": [{"media_path": "{media}/cat.png", "colour": "red"}]}, "colour"),
    ({"input": [42]}, "input[0]"),
    ({"input": ["{media}/cat.png"], "model_path": "/nonexistent/model"}, "model_path"),
    ({"input": ["{media}/cat.png"] * (MAX_INPUTS + 1)}, f"at most {MAX_INPUTS} are allowed per request"),
]


@pytest.mark.parametrize(("body", "named"), BAD_INPUTS)
def test_bad_input_is_a_clear_4xx_and_the_service_keeps_serving(mesh, media_dir, body, named):
    (media_dir / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (media_dir / "notes.txt").write_text("hello")
    text = json.dumps(body).replace("{media}", str(media_dir))
    r = httpx.post(mesh.rest_url + "/tag", content=text, headers={"content-type": "application/json"}, timeout=30)
    assert 400 <= r.status_code < 500, r.text
    error = r.json()
    assert named in error["message"], error
    ok = post(mesh, "/tag", {"input": [str(media_dir / "cat.png")]})
    assert ok.status_code == 200


def test_invalid_fields_carry_bad_request_details(mesh, media_dir):
    body = {"input": [{"media_path": str(media_dir / "cat.png"), "general_threshold": 2, "max_frame_count": -1}]}
    r = post(mesh, "/tag", body)
    assert r.status_code == 400
    details = r.json()["details"]
    violations = [v for d in details for v in d.get("fieldViolations", d.get("field_violations", []))]
    fields = {v["field"] for v in violations}
    assert fields == {"input[0].general_threshold", "input[0].max_frame_count"}


def test_oversized_body_is_refused(mesh):
    blob = "x" * (70 * 1024 * 1024)
    r = httpx.post(mesh.rest_url + "/tag", content=json.dumps({"input": [blob]}),
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413


def test_private_urls_are_refused_by_default(monkeypatch):
    from services.common import media
    from services.common.errors import InvalidInput
    from services.common.settings import MediaLimits

    monkeypatch.delenv("LORAMESH_ALLOW_PRIVATE_URLS", raising=False)
    with pytest.raises(InvalidInput, match="private or loopback"):
        media.fetch_url("http://127.0.0.1:9/cat.png", "input[0].media_url", MediaLimits())


def test_symlink_out_of_the_roots_is_refused(mesh, media_dir, tmp_path):
    outside = write_image(tmp_path / "outside.png")
    link = media_dir / "link.png"
    link.unlink(missing_ok=True)
    link.symlink_to(outside)
    r = post(mesh, "/tag", {"input": [str(link)]})
    assert r.status_code == 400
    assert "outside the allowed roots" in r.json()["message"]


def test_tag_free_then_vram_free_report_the_model(mesh, media_dir, models_dir):
    assert post(mesh, "/tag", {"input": [str(media_dir / "cat.png")]}).status_code == 200
    freed = httpx.get(mesh.rest_url + "/tag/free", timeout=30)
    assert freed.status_code == 200, freed.text
    report = freed.json()["report"]
    assert report["service"] == "tagger"
    assert report["freed"][0]["name"].endswith("model.onnx")
    assert int(report["bytes_freed"]) > 0

    assert post(mesh, "/tag", {"input": [str(media_dir / "cat.png")]}).status_code == 200  # reloads
    # A generation left running by an earlier test holds the inference replica's report
    # until it ends: wait for it (up to 45 s) rather than the 5 s default.
    r = post(mesh, "/vram/free", {"timeout_seconds": 45})
    assert r.status_code == 200, r.text
    reports = {rep["service"]: rep for rep in r.json()["reports"]}
    assert set(reports) == {"trainer", "captioner", "tagger", "inference"}
    assert r.json()["unanswered"] == []
    assert int(reports["tagger"]["bytes_freed"]) > 0
    assert reports["trainer"]["message"] == "nothing loaded"
    assert int(r.json()["total_bytes_freed"]) == sum(int(rep.get("bytes_freed", 0)) for rep in reports.values())
    again = post(mesh, "/vram/free", {"timeout_seconds": 45}).json()
    assert int(again.get("total_bytes_freed", 0)) == 0


def test_model_folder_copy_outside_roots_is_refused(mesh, media_dir, models_dir, tmp_path):
    copy = tmp_path / "wd14"
    shutil.copytree(models_dir / "wd14-vit-v1", copy)
    r = post(mesh, "/tag", {"model_path": str(copy), "input": [str(media_dir / "cat.png")]})
    assert r.status_code == 400
    assert "model_path" in r.json()["message"]


def test_second_rest_port_serves_the_same_routes(mesh, media_dir):
    path = str(media_dir / "cat.png")
    first = post(mesh, "/tag", {"input": [path]}).json()
    second = httpx.post(f"http://127.0.0.1:{mesh.ports.rest[1]}/tag", json={"input": [path]}, timeout=60)
    assert second.status_code == 200
    assert second.json() == first


class Alive:
    """How many of the objects it was shown are alive now, and the most at once."""

    def __init__(self):
        self.now = self.peak = 0
        self._lock = threading.Lock()

    def add(self, thing) -> None:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        weakref.finalize(thing, self._gone)

    def _gone(self) -> None:
        with self._lock:
            self.now -= 1


def counted_frames(alive: Alive) -> type:
    """media.Frame that shows each decoded frame's picture to `alive`."""

    @dataclass(frozen=True)
    class CountedFrame(media.Frame):
        def __post_init__(self):
            alive.add(self.image)

    return CountedFrame


def test_many_videos_are_tagged_a_batch_at_a_time(models_dir, tmp_path, monkeypatch):
    """Memory follows the batch: a request of many long videos holds at most one batch of
    decoded frames and scores at most one batch per ONNX run, and its answer is the same
    as tagging each video on its own."""
    batch = 8
    monkeypatch.setattr(wd14, "MAX_BATCH", batch)
    frames = Alive()
    monkeypatch.setattr(media, "Frame", counted_frames(frames))
    videos = [str(write_video(tmp_path / f"clip{i}.mp4", frames=3 * batch, fps=8, size=(64, 48), seed=i))
              for i in range(5)]
    settings = Settings.load("tagger", {"LORAMESH_MEDIA_ROOTS": str(tmp_path), "LORAMESH_MODEL_ROOTS": str(models_dir)})
    tagger = Tagger(settings, Residency())
    model_path = str(models_dir / "wd14-vit-v1")
    runs = []
    predict = wd14.WD14Model.predict
    monkeypatch.setattr(wd14.WD14Model, "predict", lambda self, rows: runs.append(len(rows)) or predict(self, rows))

    def items(paths):
        return [{"media_path": p, "frame_interval": 0.01, "max_frame_count": 3 * batch, "general_threshold": 0.0}
                for p in paths]

    tracemalloc.start()
    try:
        together = tagger.tag(items(videos), model_path)
        _, peak_many = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        alone = {video: tagger.tag(items([video]), model_path)[video] for video in videos}
        _, peak_one = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert frames.peak <= batch + 1
    assert sum(runs) == 2 * len(videos) * 3 * batch and max(runs) <= batch
    assert peak_many < 1.5 * peak_one, (peak_many, peak_one)  # five videos cost what one does
    assert together == alone
