"""GGUF diffusion models in the generation server: the seed's Flux GGUF load through REST and
its images against the unquantized model, GET /models and /options, files that are not
loadable GGUF refused without touching the loaded model, and a Z-Image GGUF through the
loader."""

from __future__ import annotations

import io

import gguf
import httpx
import numpy as np
import pytest
import torch
from gguf import quants
from PIL import Image

from services.common.errors import InvalidInput
from services.common.settings import ModelSources
from services.inference import gguf_files
from services.inference.model_files import ModelsRoot
from services.inference.model_loading import load_pipeline, plan_load
from tests.conftest import violated_fields
from tests.test_inference_server import txt2img
from tinymodels import model_files as tiny_model_files

# The seed's /options list, in its order.
SEED_QUANTIZATION_IDS = ("f32", "f16", "bf16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k",
                         "q8_k", "q3_k", "q2_k")
# The seed's "Load Flux-dev (quantized GGUF)" body, its component files the tiny ones.
FLUX_LOAD = {"model_name": "flux1-dev-Q4_K_S.gguf", "model_type": "diffusion", "vae": "tiny-flux-ae.safetensors",
             "clip_l": "tiny-clip_l.safetensors", "t5xxl": "tiny-t5xxl.safetensors",
             "options": {"keep_clip_on_cpu": True, "flash_attn": True}}
FLUX_JOB = {"prompt": 'a lovely cat holding a sign says "flux.cpp"', "width": 96, "height": 64, "steps": 4,
            "cfg_scale": 1.0, "sampler": "euler", "seed": 7}


@pytest.fixture(scope="module")
def client(mesh):
    with httpx.Client(base_url=mesh.rest_url, timeout=120) as client:
        yield client
        client.post("/models/unload")


def _load(client, **changes) -> dict:
    r = client.post("/models/load", json={**FLUX_LOAD, **changes})
    assert r.status_code == 200, r.text
    return r.json()


def _image(client, outputs_dir) -> np.ndarray:
    job = txt2img(client, **FLUX_JOB)
    assert job["status"] == "completed", job
    return np.asarray(Image.open(outputs_dir / job["outputs"][0]).convert("RGB"), dtype=np.float64)


def _writable(kind: gguf.GGMLQuantizationType) -> bool:
    try:
        quants.quantize(np.zeros((1, 256), np.float32), kind)
    except NotImplementedError:
        return False
    return True


def test_the_seed_flux_gguf_example_loads_and_generates_close_to_the_unquantized_model(client, outputs_dir):
    loaded = _load(client)
    assert loaded["model_name"] == "flux1-dev-Q4_K_S.gguf" and loaded["model_type"] == "diffusion"
    assert loaded["loaded_components"]["t5xxl"] == "tiny-t5xxl.safetensors"
    health = client.get("/health").json()
    assert health["model_architecture"] == "Flux" and health["model_name"] == "flux1-dev-Q4_K_S.gguf"
    job = txt2img(client, **FLUX_JOB)
    assert job["status"] == "completed", job
    served = client.get(f"/output/{job['outputs'][0]}")
    assert served.status_code == 200 and Image.open(io.BytesIO(served.content)).size == (96, 64)
    q4 = np.asarray(Image.open(io.BytesIO(served.content)).convert("RGB"), dtype=np.float64)

    _load(client, model_name="flux1-schnell-Q8_0.gguf")
    q8 = _image(client, outputs_dir)
    _load(client, model_name="tiny-flux.safetensors")
    plain = _image(client, outputs_dir)
    q8_diff, q4_diff = np.abs(q8 - plain).mean(), np.abs(q4 - plain).mean()
    print(f"mean pixel difference from the unquantized model: Q8_0 {q8_diff:.3f}, Q4_K_S {q4_diff:.3f}")
    assert plain.std() > 10  # an image with content, so closeness means something
    # Quantized weights really ran (not a float copy), and closer with more bits.
    assert 0 < q8_diff < 1.0 and q8_diff < q4_diff < 3.0


def test_models_list_the_gguf_files_and_options_the_working_types(client):
    listing = client.get("/models", params={"type": "diffusion", "extension": "gguf"}).json()
    entries = {m["name"]: m for m in listing["diffusion_models"]}
    # The tiny models root holds a GGUF of several families; the filter leaves only GGUF files.
    assert {"flux1-dev-Q4_K_S.gguf", "flux1-schnell-Q8_0.gguf", "z_image_turbo-Q8_0.gguf"} <= set(entries)
    assert all(m["file_extension"] == ".gguf" and m["size_bytes"] > 0 for m in entries.values())

    listed = client.get("/options").json()["quantization_types"]
    assert all(set(t) == {"id", "name", "bits"} for t in listed)
    loadable = gguf_files.loadable_types()
    working = [i for i in SEED_QUANTIZATION_IDS
               if i.upper() in loadable and _writable(gguf.GGMLQuantizationType[i.upper()])]
    assert [t["id"] for t in listed] == working
    assert {"id": "q8_0", "name": "Q8_0 (8-bit)", "bits": 8} in listed


def test_every_listed_quantized_type_round_trips_through_diffusers(client, tmp_path):
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    weight = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    for entry in client.get("/options").json()["quantization_types"]:
        kind = gguf.GGMLQuantizationType[entry["id"].upper()]
        path = tiny_model_files.write_gguf({"w.weight": weight}, tmp_path / f"{entry['id']}.gguf", entry["id"])
        assert gguf_files.inspect(path).tensor_types == {kind.name: 1}
        restored = dequantize_gguf_tensor(gguf_files.load_state_dict(path)["w.weight"]).float()
        # diffusers reads back what gguf wrote (its kernels compute scales in half precision)...
        written = torch.from_numpy(quants.dequantize(quants.quantize(weight.numpy(), kind), kind)).float()
        assert (restored - written).abs().max().item() < 1e-2, entry
        # ... which is the weight, to the type's precision.
        assert (restored - weight).abs().mean().item() < 0.1, entry


def test_gguf_files_that_cannot_load_are_refused_and_the_loaded_model_stays(client, inference_models):
    from safetensors.torch import load_file

    _load(client, model_name="flux1-schnell-Q8_0.gguf")
    folder = inference_models["root"] / "diffusion_models"
    random_bytes = folder / "invalid_model.gguf"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(4096))
    unreadable_types = tiny_model_files.write_gguf(load_file(inference_models["flux"]), folder / "flux-mxfp4.gguf",
                                                   "mxfp4")
    sdxl = tiny_model_files.write_gguf(load_file(inference_models["sdxl"]), folder / "sdxl-Q8_0.gguf", "q8_0",
                                       arch="sdxl")
    try:
        for path, reason in ((random_bytes, "not a readable GGUF file"), (unreadable_types, "MXFP4"),
                             (sdxl, "SDXL model in GGUF")):
            r = client.post("/models/load", json={**FLUX_LOAD, "model_name": path.name})
            assert r.status_code == 400, r.text
            assert violated_fields(r) == ["model_name"] and reason in r.json()["message"], r.json()
            health = client.get("/health").json()
            assert health["model_name"] == "flux1-schnell-Q8_0.gguf" and health["model_loaded"] is True
        assert txt2img(client, **FLUX_JOB)["status"] == "completed"
    finally:
        for path in (random_bytes, unreadable_types, sdxl):
            path.unlink(missing_ok=True)


def test_a_z_image_gguf_loads_through_the_loader(inference_models, tmp_path):
    from diffusers import ZImagePipeline

    folder = inference_models["zimage"]
    reference = ZImagePipeline.from_pretrained(folder)
    state = tiny_model_files.z_image_to_original_state_dict(reference.transformer)
    tiny_model_files.write_gguf(state, tmp_path / "diffusion_models" / "z_image_turbo-Q8_0.gguf", "q8_0",
                                arch="lumina2")
    plan = plan_load(ModelsRoot(tmp_path), {"model_name": "z_image_turbo-Q8_0.gguf", "model_type": "diffusion"})
    assert plan.architecture == "Z-Image"
    pipe = load_pipeline(plan, "cpu", torch.float32, ModelSources(zimage_config=str(folder)))
    assert type(pipe.transformer.layers[0].attention.to_q).__name__ == "GGUFLinear"

    def generate(p) -> np.ndarray:
        image = p("a lovely cat", height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
                  generator=torch.Generator("cpu").manual_seed(0)).images[0]
        return np.asarray(image, dtype=np.float64)

    plain, quantized = generate(reference), generate(pipe)
    assert plain.std() > 10 and 0 < np.abs(quantized - plain).mean() < 1.0


def test_a_plain_gguf_check_names_model_name(tmp_path):
    (tmp_path / "diffusion_models").mkdir()
    (tmp_path / "diffusion_models" / "flux1-dev-Q4_K_S.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(InvalidInput, match="not a readable GGUF file") as error:
        plan_load(ModelsRoot(tmp_path), {"model_name": "flux1-dev-Q4_K_S.gguf", "model_type": "diffusion"})
    assert [f for f, _ in error.value.violations] == ["model_name"]
