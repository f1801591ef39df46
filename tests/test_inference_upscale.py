"""Upscaling in the generation server: ESRGAN-family models (a tiny RRDBNet ESRGAN 4x in
Real-ESRGAN's release layout and a tiny Real-ESRGAN compact 2x) loaded with spandrel,
/upscaler/load and /upscaler/unload, queued /upscale jobs, txt2img's `upscale`, /health,
/vram/free, and bad input -- through the gateway -- plus the tiling itself, in process."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from services.common.errors import InvalidInput
from services.inference import upscaling
from tests.conftest import violated_fields
from tests.test_inference_server import add_detail, png, sdxl_loaded, wait_job  # noqa: F401  (fixtures)

X4, X2 = "RealESRGAN_x4plus.pth", "realesr-compact-x2.pth"


@pytest.fixture
def client(mesh):
    with httpx.Client(base_url=mesh.rest_url, timeout=120) as client:
        yield client


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth picture with some detail (a gradient plus blurred noise)."""
    rng = np.random.default_rng(seed)
    noise = Image.fromarray((rng.random((height // 4 + 1, width // 4 + 1, 3)) * 255).astype(np.uint8))
    noise = np.asarray(noise.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    return Image.fromarray(np.clip(0.5 * noise + 0.5 * ramp, 0, 255).astype(np.uint8))


def load(client: httpx.Client, name: str, **body) -> dict:
    r = client.post("/upscaler/load", json={"model_name": name, **body})
    assert r.status_code == 200, r.text
    return r.json()


def upscale(client: httpx.Client, image: Image.Image, **body) -> tuple[dict, Image.Image]:
    r = client.post("/upscale", json={"image_base64": png(image), **body})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job_id"])
    assert job["status"] == "completed", job
    out = client.get(f"/output/{job['outputs'][0]}")
    assert out.status_code == 200
    return job, Image.open(io.BytesIO(out.content))


def queued(client: httpx.Client) -> int:
    return client.get("/queue").json()["total_count"]


def health(client: httpx.Client) -> tuple[bool, str | None]:
    body = client.get("/health").json()
    return body["upscaler_loaded"], body["upscaler_name"]


# --------------------------------------------------------------------------- in process


@pytest.mark.parametrize(("key", "scale"), [("esrgan_x4", 4), ("esrgan_x2", 2)])
def test_tiled_upscale_blends_to_the_untiled_one_which_is_spandrels_own(inference_models, key, scale):
    spandrel = upscaling.import_spandrel()
    path = inference_models[key]
    descriptor = upscaling.load_descriptor(path, path.name, "cpu")
    assert descriptor.scale == scale
    upscaler = upscaling.Upscaler(upscaling.UpscalerPlan(path.name, str(path), scale), descriptor)
    image = picture(150, 110)
    whole = np.asarray(upscaler.one_pass(image, 0), dtype=np.int16)
    tiled = np.asarray(upscaler.one_pass(image, 48), dtype=np.int16)
    assert upscaler.tiles_per_pass(150, 110, 48) > 4
    # spandrel on its own, the whole image at once.
    plain = spandrel.ModelLoader().load_from_file(path).model.eval()
    with torch.inference_mode():
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        direct = (plain(x)[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    assert whole.shape == tiled.shape == (110 * scale, 150 * scale, 3)
    assert np.abs(whole - direct.astype(np.int16)).max() <= 1
    # Tiles see less context at their edges; blending keeps the seams within a few levels.
    margin = 8 * scale
    inner = np.abs(whole - tiled)[margin:-margin, margin:-margin]
    assert inner.max() <= 6 and inner.mean() < 0.5, (inner.max(), inner.mean())
    # ...but they were tiles: the model saw each alone.
    assert not np.array_equal(whole, tiled)


def test_files_that_are_not_upscalers_are_refused_naming_model_name(inference_models, tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a model")
    for path in (text, inference_models["vae"]):
        with pytest.raises(InvalidInput) as caught:
            upscaling.load_descriptor(path, path.name, "cpu")
        assert [name for name, _ in caught.value.violations] == ["model_name"]


# --------------------------------------------------------------------------- through the gateway


def test_load_upscale_and_unload_as_documented(client, outputs_dir):
    assert health(client) == (False, None)
    listed = client.get("/models", params={"type": "esrgan"}).json()["esrgan"]
    assert {m["name"] for m in listed} >= {X4, X2} and {m["type"] for m in listed} == {"esrgan"}
    # The document's own example.
    assert load(client, X4, n_threads=-1, tile_size=128) == {
        "success": True, "message": "Upscaler loaded successfully", "model_name": X4, "upscale_factor": 4}
    assert health(client) == (True, X4)
    image = picture(40, 28)
    r = client.post("/upscale", json={"image_base64": png(image), "upscale_factor": 4, "tile_size": 128, "repeats": 1})
    assert r.status_code == 202, r.text
    assert set(r.json()) == {"job_id", "status", "position"} and r.json()["status"] == "pending"
    job = wait_job(client, r.json()["job_id"])
    assert (job["type"], job["status"]) == ("upscale", "completed")
    assert job["outputs"] == [f"{job['job_id']}/image_0.png"]
    assert Image.open(outputs_dir / job["outputs"][0]).size == (160, 112)
    # Tiled and repeated: factor ** repeats.
    _, out = upscale(client, image, tile_size=16, repeats=2)
    assert out.size == (640, 448)
    # A factor other than the model's: the model's result resized (Lanczos) to it.
    _, out = upscale(client, image, upscale_factor=2)
    assert out.size == (80, 56)
    assert client.post("/upscaler/unload").json() == {"success": True, "message": "Upscaler unloaded"}
    assert health(client) == (False, None)


def test_a_compact_2x_model_upscales_by_its_own_factor_by_default(client):
    assert load(client, X2)["upscale_factor"] == 2
    job, out = upscale(client, picture(30, 20), tile_size=0)
    assert out.size == (60, 40) and job["params"]["upscale_factor"] == 2
    client.post("/upscaler/unload")


@pytest.mark.parametrize(("change", "field"), [
    ({"upscale_factor": 0}, "upscale_factor"),
    ({"upscale_factor": 9}, "upscale_factor"),
    ({"tile_size": 8}, "tile_size"),
    ({"tile_size": -1}, "tile_size"),
    ({"repeats": 0}, "repeats"),
    ({"image_base64": ""}, "image_base64"),
    ({"image_base64": "bm90IGFuIGltYWdl"}, "image_base64"),
])
def test_bad_upscale_requests_are_refused_and_queue_nothing(client, change, field):
    load(client, X2)
    before = queued(client)
    r = client.post("/upscale", json={"image_base64": png(picture(16, 16)), **change})
    assert r.status_code == 400, r.text
    assert violated_fields(r) == [field], r.text
    assert field in r.json()["error"]
    assert queued(client) == before


def test_bad_loads_are_refused_and_keep_the_loaded_upscaler(client, inference_models):
    (inference_models["root"] / "esrgan" / "notes.pth").write_text("not a model")
    load(client, X2)
    for body, status, field in [({"model_name": "notes.pth"}, 400, "model_name"),
                                ({"model_name": "tiny-sd-vae.safetensors"}, 404, None),
                                ({"model_name": X4, "tile_size": 0}, 200, None),
                                ({"model_name": X4, "tile_size": 4}, 400, "tile_size"),
                                ({"model_name": X4, "n_threads": 0}, 400, "n_threads"),
                                ({}, 400, "model_name")]:
        r = client.post("/upscaler/load", json=body)
        assert r.status_code == status, (body, r.text)
        if field:
            assert violated_fields(r) == [field], r.text
            assert health(client)[0]
    client.post("/upscaler/unload")


def test_nothing_loaded_is_refused_naming_the_field(client, sdxl_loaded):  # noqa: F811
    client.post("/upscaler/unload")
    before = queued(client)
    r = client.post("/upscale", json={"image_base64": png(picture(16, 16))})
    assert r.status_code == 400 and violated_fields(r) == ["upscaler"], r.text
    r = client.post("/txt2img", json={"prompt": "a cat", "width": 64, "height": 64, "upscale": True})
    assert r.status_code == 400 and violated_fields(r) == ["upscale"], r.text
    assert queued(client) == before


def test_txt2img_upscales_every_image_and_unloads_after_use(client, sdxl_loaded, outputs_dir):  # noqa: F811
    load(client, X2)
    body = {"prompt": "a lovely cat", "width": 64, "height": 64, "steps": 2, "seed": 5}
    r = client.post("/txt2img", json={**body, "upscale": True, "upscale_repeats": 2, "upscale_auto_unload": False,
                                      "batch_count": 2})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job_id"])
    assert job["status"] == "completed", job
    assert [Image.open(outputs_dir / o).size for o in job["outputs"]] == [(256, 256), (256, 256)]
    assert health(client) == (True, X2)
    r = client.post("/img2img", json={**body, "init_image_base64": png(picture(64, 64)), "strength": 0.5,
                                      "upscale": True, "upscale_auto_unload": False})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job_id"])
    assert Image.open(outputs_dir / job["outputs"][0]).size == (128, 128)
    # Documented default: the upscaler is unloaded after use.
    r = client.post("/txt2img", json={**body, "upscale": True})
    job = wait_job(client, r.json()["job_id"])
    assert Image.open(outputs_dir / job["outputs"][0]).size == (128, 128)
    assert health(client) == (False, None)


def test_vram_free_frees_the_upscaler_and_jobs_load_it_again(client):
    load(client, X4)
    reports = client.post("/vram/free", json={"timeout_seconds": 45}).json()["reports"]
    freed = [m["name"] for r in reports if r["service"] == "inference" for m in r.get("freed", [])]
    assert any(name.startswith("upscaler:") and name.endswith(X4) for name in freed), reports
    # Still loaded as far as the API goes: the next job loads the file again.
    _, out = upscale(client, picture(20, 12))
    assert out.size == (80, 48)
    client.post("/upscaler/unload")
