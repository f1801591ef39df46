"""Image and video captioning through the gateway with tiny Florence-2 and JoyCaption
models: the documented requests answer with captions equal to a plain transformers
`generate`, frames are sampled as asked, and bad input is refused."""

from __future__ import annotations

import json

import grpc
import httpx
import nats
import pytest
import torch
from nats.js.api import DeliverPolicy
from PIL import Image
from transformers import AutoProcessor, Florence2ForConditionalGeneration

from loramesh.v1 import captioner_pb2, captioner_pb2_grpc
from tests.conftest import violated_fields, write_counting_video, write_image, write_tone


@pytest.fixture(scope="module")
def media(media_dir):
    folder = media_dir / "captions"
    return {
        "image": write_image(folder / "flowers.png", (96, 64), seed=7),
        "video": write_counting_video(folder / "counting.mp4"),
        "audio": write_tone(folder / "tone.wav"),
    }




@pytest.fixture
def client(mesh):
    with httpx.Client(base_url=mesh.rest_url, timeout=120) as client:
        yield client


def reference_florence2(model_dir, image_path, task="<DETAILED_CAPTION>", max_new_tokens=1024, num_beams=3):
    model = Florence2ForConditionalGeneration.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    image = Image.open(image_path).convert("RGB")
    inputs = processor(text=task, images=image, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
    text = processor.batch_decode(out, skip_special_tokens=False)[0]
    return processor.post_process_generation(text, task=task, image_size=image.size)[task].strip()


def test_the_default_florence2_request_equals_plain_transformers(client, media, models_dir):
    body = {"image_path": str(media["image"]), "model_path": str(models_dir / "florence2"), "max_new_tokens": 12}
    r = client.post("/caption", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["model_type"] == "florence2" and answer["model_path"] == body["model_path"]
    assert answer["caption"] == reference_florence2(models_dir / "florence2", media["image"], max_new_tokens=12)
    assert answer["frame_captions"] == [] and answer["timings"]["total_seconds"] > 0


def test_joycaption_captions_an_image_and_is_repeatable_with_a_seed(client, media, models_dir):
    body = {"image_path": str(media["image"]), "model_type": "joycaption",
            "model_path": str(models_dir / "joycaption"),
            "prompt": "Write a long descriptive caption for this image in a formal tone.",
            "max_new_tokens": 12, "temperature": 0.6, "top_p": 0.9, "seed": 5}
    first = client.post("/caption", json=body)
    assert first.status_code == 200, first.text
    assert first.json()["caption"] and first.json()["model_type"] == "joycaption"
    assert client.post("/caption", json=body).json()["caption"] == first.json()["caption"]


@pytest.mark.parametrize(("method", "expected"), [("uniform", [0, 13, 26, 39]), ("first", [0, 1, 2, 3])])
def test_video_frames_are_sampled_as_asked(client, media, models_dir, method, expected):
    body = {"video_path": str(media["video"]), "model_type": "florence2", "num_frames": 4, "sample_method": method,
            "combine_method": "combined", "max_new_tokens": 6, "num_beams": 1, "task": "<CAPTION>",
            "model_path": str(models_dir / "florence2")}
    r = client.post("/caption", json=body)
    assert r.status_code == 200, r.text
    frames = r.json()["frame_captions"]
    assert [f["frame_index"] for f in frames] == expected
    assert [round(f["timestamp_seconds"], 2) for f in frames] == [i / 10 for i in expected]
    distinct = list(dict.fromkeys(f["caption"] for f in frames))
    assert r.json()["caption"] == " ".join(distinct)


def test_the_batch_route_captions_many_images_in_order(client, media, media_dir, models_dir):
    paths = [str(write_image(media_dir / "captions" / f"batch{i}.png", (64, 64), seed=i)) for i in range(5)]
    body = {"image_paths": paths, "options": {"model_path": str(models_dir / "florence2"), "max_new_tokens": 8,
                                              "task": "<CAPTION>", "num_beams": 1}, "batch_size": 2}
    r = client.post("/caption/batch", json=body)
    assert r.status_code == 200, r.text
    assert [c["source"] for c in r.json()["captions"]] == paths
    one = client.post("/caption", json={"image_path": paths[3], "model_path": str(models_dir / "florence2"),
                                        "max_new_tokens": 8, "task": "<CAPTION>", "num_beams": 1}).json()
    assert r.json()["captions"][3]["caption"] == one["caption"]


def test_unloading_returns_the_memory_and_the_next_request_reloads(client, media, models_dir):
    body = {"image_path": str(media["image"]), "model_path": str(models_dir / "florence2"), "max_new_tokens": 4}
    assert client.post("/caption", json=body).status_code == 200
    report = client.post("/caption/unload").json()["report"]
    assert report["bytes_freed"] > 0 and report["service"] == "captioner"
    assert client.post("/caption/unload").json()["report"].get("bytes_freed", 0) == 0
    assert client.post("/caption", json=body).status_code == 200
    freed = [r for r in client.post("/vram/free", json={"timeout_seconds": 45}).json()["reports"] if r["service"] == "captioner"]
    assert freed[0]["bytes_freed"] > 0


def test_audio_is_captioned_from_files_and_from_video_tracks(client, media, media_dir, models_dir):
    audio_model = str(models_dir / "audio-lm")
    r = client.post("/audio/caption", json={"audio_path": str(media["audio"]), "model_path": audio_model,
                                            "max_new_tokens": 6, "do_sample": False})
    assert r.status_code == 200, r.text
    assert r.json()["caption"] and r.json()["sample_rate"] == 16000
    assert abs(r.json()["duration_seconds"] - 1.0) < 0.05

    with_sound = write_counting_video(media_dir / "captions" / "with-sound.mp4", audio=True)
    r = client.post("/audio/caption", json={"video_path": str(with_sound), "model_path": audio_model,
                                            "target_sample_rate": 16000, "max_audio_seconds": 2,
                                            "max_new_tokens": 6})
    assert r.status_code == 200, r.text
    assert abs(r.json()["duration_seconds"] - 2.0) < 0.05

    body = {"video_path": str(with_sound), "model_path": str(models_dir / "florence2"), "num_frames": 2,
            "max_new_tokens": 4, "num_beams": 1, "do_audio": True, "audio_model_path": audio_model,
            "audio_max_new_tokens": 6, "audio_do_sample": False}
    r = client.post("/caption", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["audio"]["has_audio"] is True and r.json()["audio"]["caption"]

    r = client.post("/caption", json={**body, "video_path": str(media["video"])})
    assert r.status_code == 200, r.text
    assert r.json()["audio"]["has_audio"] is False and r.json()["audio"]["message"] == "video has no audio track"
    silent = client.post("/audio/caption", json={"video_path": str(media["video"]), "model_path": audio_model})
    assert silent.status_code == 400 and "no audio track" in silent.json()["message"]
    assert client.post("/audio/unload").json()["report"]["bytes_freed"] > 0


@pytest.mark.parametrize(("route", "body", "field"), [
    ("/caption", {}, "input"),
    ("/caption", {"image_path": "IMG", "video_path": "VID"}, "video_path"),
    ("/caption", {"image_path": "IMG", "model_type": "blip"}, "model_type"),
    ("/caption", {"image_path": "IMG", "task": "<OCR>"}, "task"),
    ("/caption", {"image_path": "IMG", "temperature": 2.5}, "temperature"),
    ("/caption", {"image_path": "IMG", "top_p": 0}, "top_p"),
    ("/caption", {"video_path": "VID", "num_frames": 0}, "num_frames"),
    ("/caption", {"video_path": "VID", "num_frames": 100000}, "num_frames"),
    ("/caption", {"video_path": "VID", "sample_method": "random"}, "sample_method"),
    ("/caption", {"image_path": "IMG", "do_audio": True}, "do_audio"),
    ("/caption", {"image_path": "IMG", "model_path": "/etc"}, "model_path"),
    ("/caption", {"image_path": "/etc/passwd"}, "image_path"),
    ("/caption", {"video_path": "AUD"}, "video_path"),
    ("/audio/caption", {}, "input"),
    ("/audio/caption", {"audio_path": "AUD", "video_path": "VID"}, "video_path"),
    ("/audio/caption", {"audio_path": "AUD", "temperature": 3}, "temperature"),
    ("/audio/caption", {"audio_path": "AUD", "target_sample_rate": 100}, "target_sample_rate"),
    ("/audio/caption", {"audio_path": "IMG"}, "audio_path"),
])
def test_bad_requests_name_the_field(client, media, route, body, field):
    names = {"IMG": "image", "VID": "video", "AUD": "audio"}
    body = {k: str(media[names[v]]) if v in names else v for k, v in body.items()}
    r = client.post(route, json=body)
    assert r.status_code == 400, r.text
    assert field in violated_fields(r), r.json()


async def events_of(nats_url: str, request_id: str, until_kind: str = "status") -> list[dict]:
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.jetstream().subscribe(f"events.captioner.{request_id}.>", ordered_consumer=True,
                                             deliver_policy=DeliverPolicy.ALL)
        found = []
        while not found or found[-1]["subject"].split(".")[-1] != until_kind:
            msg = await sub.next_msg(timeout=10)
            found.append({"subject": msg.subject, **json.loads(msg.data)})
        return found
    finally:
        await nc.close()


async def test_long_calls_report_progress_and_failures_under_their_request_id(mesh, media_dir, models_dir):
    paths = [str(write_image(media_dir / "captions" / f"progress{i}.png", (64, 64), seed=i)) for i in range(5)]
    options = {"model_path": str(models_dir / "florence2"), "max_new_tokens": 4, "num_beams": 1}
    async with httpx.AsyncClient(base_url=mesh.rest_url, timeout=120) as client:
        ok = await client.post("/caption/batch", json={"image_paths": paths, "options": options, "batch_size": 2})
        corrupt = media_dir / "captions" / "corrupt.png"
        corrupt.write_bytes(b"\x89PNG not really")
        failed = await client.post("/caption/batch", json={"image_paths": [paths[0], str(corrupt)],
                                                           "options": options})
    assert ok.status_code == 200 and failed.status_code == 400
    progress = await events_of(mesh.nats_url, ok.headers["x-request-id"])
    assert [e["data"]["done"] for e in progress if e["subject"].endswith(".progress")] == [2, 4, 5]
    assert progress[-1]["data"]["status"] == "completed"
    failure = (await events_of(mesh.nats_url, failed.headers["x-request-id"]))[-1]
    assert failure["data"]["status"] == "failed" and "image_paths[1]" in failure["data"]["error"]


def test_native_grpc_clients_get_the_same_caption_through_the_gateway(mesh, client, media, models_dir):
    body = {"image_path": str(media["image"]), "model_path": str(models_dir / "florence2"), "max_new_tokens": 8}
    over_rest = client.post("/caption", json=body).json()
    with grpc.insecure_channel(mesh.rest_url.removeprefix("http://")) as channel:
        stub = captioner_pb2_grpc.CaptionerServiceStub(channel)
        answer = stub.Caption(captioner_pb2.CaptionRequest(**body), timeout=60)
    assert answer.caption == over_rest["caption"] and answer.model_type == "florence2"


AUDIO_PROMPT = ("Provide a concise but detailed caption of the audio. Describe any speech (content summary if "
                "clear), speaker count, perceived gender/age, tone/emotion, language/accent, and notable non-speech "
                "sounds such as music (genre/instruments/tempo/mood) or environmental noises. If there is no speech, "
                "focus on the audio events and atmosphere.")
VIDEO = {"video_path": "SOUND", "num_frames": 8, "sample_method": "uniform"}
# The API document's examples, verbatim but for the file paths (the tiny models are the defaults here).
SEED_EXAMPLES = [
    ("/caption", {"image_path": "IMG"}),
    ("/caption", {**VIDEO, "model_type": "florence2", "combine_method": "first", "max_new_tokens": 1024,
                  "num_beams": 3, "task": "<DETAILED_CAPTION>"}),
    ("/caption", {**VIDEO, "model_type": "florence2", "combine_method": "first", "max_new_tokens": 1024,
                  "num_beams": 3, "task": "<DETAILED_CAPTION>", "do_audio": True}),
    ("/caption", {"image_path": "IMG", "model_type": "joycaption"}),
    ("/caption", {"image_path": "IMG", "model_type": "joycaption", "max_new_tokens": 512, "temperature": 0.6,
                  "prompt": "Write a long descriptive caption for this image in a formal tone.", "top_p": 0.9}),
    ("/caption", {**VIDEO, "model_type": "joycaption", "combine_method": "longest", "temperature": 0.6,
                  "prompt": "Describe what is happening in this video in a narrative style.", "top_p": 0.9,
                  "max_new_tokens": 512}),
    ("/caption", {**VIDEO, "model_type": "joycaption", "combine_method": "longest", "temperature": 0.6,
                  "prompt": "Describe what is happening in this video in a narrative style.", "top_p": 0.9,
                  "max_new_tokens": 512, "do_audio": True, "audio_prompt": AUDIO_PROMPT}),
    ("/audio/caption", {"audio_path": "AUD"}),
    ("/audio/caption", {"video_path": "SOUND", "target_sample_rate": 16000, "max_audio_seconds": 30}),
    ("/audio/caption", {"audio_url": "URL", "prompt": AUDIO_PROMPT, "max_new_tokens": 256, "temperature": 0.2,
                        "top_p": 0.9, "num_beams": 1, "do_sample": True}),
]


@pytest.mark.parametrize(("route", "body"), SEED_EXAMPLES)
def test_the_documented_examples_answer_with_the_documented_fields(client, media, media_dir, media_server, route,
                                                                   body):
    sound = write_counting_video(media_dir / "captions" / "seed-video.mp4", audio=True)
    files = {"IMG": str(media["image"]), "AUD": str(media["audio"]), "SOUND": str(sound),
             "URL": f"{media_server}/captions/tone.wav"}
    r = client.post(route, json={k: files.get(v, v) if isinstance(v, str) else v for k, v in body.items()})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["caption"] and answer["timings"]["total_seconds"] > 0
    if route == "/caption":
        assert answer["model_type"] == body.get("model_type", "florence2")
        assert len(answer["frame_captions"]) == (8 if "video_path" in body else 0)
        if body.get("do_audio"):
            assert answer["audio"]["has_audio"] and answer["audio"]["caption"]
    else:
        assert answer["sample_rate"] == 16000 and answer["duration_seconds"] > 0


def test_greedy_joycaption_equals_plain_transformers(client, media, models_dir):
    from transformers import LlavaForConditionalGeneration

    body = {"image_path": str(media["image"]), "model_type": "joycaption", "temperature": 0, "max_new_tokens": 10,
            "prompt": "Write a short caption."}
    answer = client.post("/caption", json=body).json()
    model = LlavaForConditionalGeneration.from_pretrained(models_dir / "joycaption")
    processor = AutoProcessor.from_pretrained(models_dir / "joycaption")
    messages = [{"role": "system", "content": "You are a helpful image captioner."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Write a short caption."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[Image.open(media["image"]).convert("RGB")], return_tensors="pt",
                       add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    expected = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    assert answer["caption"] == expected
