"""Quantizing on load (options.weight_type, tensor_type_rules), SD3 GGUF files and the K-quant
tiny file: the tiny Flux quantized to Q8_0 and Q4_0 on load through REST against the
unquantized model, the document's Z-Image load with weight_type "q5_0", types that cannot be
quantized to and families diffusers cannot read as GGUF refused, a city96-style SD3.5 Q8_0
GGUF against its safetensors checkpoint, and the Q4_K file's blocks against its source."""

from __future__ import annotations

import re

import gguf
import httpx
import numpy as np
import pytest
import torch
from gguf import GGUFReader, quants
from PIL import Image
from safetensors.torch import load_file

from services.common.errors import InvalidInput
from services.common.settings import ModelSources
from services.inference import gguf_files
from services.inference.model_files import ModelsRoot
from services.inference.model_loading import load_pipeline, plan_load
from tests.conftest import violated_fields
from tests.test_inference_gguf import FLUX_JOB, FLUX_LOAD
from tests.test_inference_server import txt2img
from tinymodels import diffusion as tiny_diffusion
from tinymodels import model_files as tiny_model_files

Q = gguf.GGMLQuantizationType
FLUX_SAFETENSORS = {**FLUX_LOAD, "model_name": "tiny-flux.safetensors"}


@pytest.fixture(scope="module")
def client(mesh):
    with httpx.Client(base_url=mesh.rest_url, timeout=120) as client:
        yield client
        client.post("/models/unload")


def _image(client, outputs_dir, job=FLUX_JOB) -> np.ndarray:
    done = txt2img(client, **job)
    assert done["status"] == "completed", done
    return np.asarray(Image.open(outputs_dir / done["outputs"][0]).convert("RGB"), dtype=np.float64)


def _load(client, body: dict) -> None:
    r = client.post("/models/load", json=body)
    assert r.status_code == 200, r.text


def test_weight_type_quantizes_the_flux_safetensors_on_load(client, outputs_dir):
    _load(client, FLUX_SAFETENSORS)
    plain = _image(client, outputs_dir)
    diffs = {}
    for weight_type in ("q8_0", "q4_0"):
        _load(client, {**FLUX_SAFETENSORS, "options": {**FLUX_SAFETENSORS["options"], "weight_type": weight_type}})
        diffs[weight_type] = np.abs(_image(client, outputs_dir) - plain).mean()
    print(f"mean pixel difference from the unquantized model: weight_type q8_0 {diffs['q8_0']:.3f}, "
          f"q4_0 {diffs['q4_0']:.3f}")
    assert plain.std() > 10
    # Quantized weights ran (an image differs), closer with more bits.
    assert 0 < diffs["q8_0"] < 1.0 and diffs["q8_0"] < diffs["q4_0"] < 6.0


def test_types_that_cannot_be_quantized_to_and_families_without_gguf_are_refused(client, sdxl_loaded):
    for body, allowed in (
        ({**FLUX_SAFETENSORS, "options": {"weight_type": "q4_k"}}, '"q8_0", "q5_0", "q5_1", "q4_0", "q4_1"'),
        ({"model_name": "tiny-sdxl.safetensors", "options": {"weight_type": "q8_0"}}, '"f32", "f16", "bf16"'),
        ({"model_name": "tiny-sdxl.safetensors", "options": {"tensor_type_rules": "attn=q8_0"}}, "Flux, Z-Image, SD3"),
        ({**FLUX_SAFETENSORS, "options": {"tensor_type_rules": "attn=q9"}}, "allowed: f32, f16"),
    ):
        r = client.post("/models/load", json=body)
        assert r.status_code == 400, r.text
        field = "options." + next(iter(body["options"]))
        assert violated_fields(r) == [field] and allowed in r.json()["message"], r.json()
        health = client.get("/health").json()
        assert health["model_name"] == "tiny-sdxl.safetensors" and health["model_loaded"] is True


# The document's "Load Z-Image Turbo" body, its GGUF VAE and LLM swapped for their safetensors
# releases (diffusers reads GGUF transformers only).
Z_IMAGE_LOAD = {"model_name": "z_image_turbo-Q8_0.gguf", "model_type": "diffusion", "vae": "ae.safetensors",
                "llm": "qwen_3_4b.safetensors",
                "options": {"flash_attn": True, "vae_conv_direct": True, "weight_type": "q5_0"}}


def test_the_documented_z_image_load_with_weight_type_q5_0_generates(client, outputs_dir):
    job = {"prompt": "a lovely cat", "width": 64, "height": 64, "steps": 2, "cfg_scale": 1.0, "sampler": "euler",
           "seed": 42}
    _load(client, {**Z_IMAGE_LOAD, "options": {}})
    as_stored = _image(client, outputs_dir, job)
    _load(client, Z_IMAGE_LOAD)
    health = client.get("/health").json()
    assert health["model_architecture"] == "Z-Image" and health["model_name"] == "z_image_turbo-Q8_0.gguf"
    q5 = _image(client, outputs_dir, job)
    difference = np.abs(q5 - as_stored).mean()
    print(f"Z-Image weight_type q5_0: mean pixel difference from the Q8_0 file as stored {difference:.3f}")
    assert as_stored.std() > 10 and 0 < difference < 3.0


def test_weight_type_requantizes_a_gguf_file_to_fewer_bits(inference_models):
    plan = plan_load(ModelsRoot(inference_models["root"]), Z_IMAGE_LOAD)
    pipe = load_pipeline(plan, "cpu", torch.float32, ModelSources(zimage_config=str(inference_models["zimage_config"])))
    assert pipe.transformer.layers[0].attention.to_q.weight.quant_type == Q.Q5_0


def test_tensor_type_rules_pick_types_per_tensor_on_load(inference_models):
    root = ModelsRoot(inference_models["root"])
    sources = ModelSources(flux_config=str(inference_models["flux_config"]))
    body = {**FLUX_SAFETENSORS, "options": {"tensor_type_rules": r"img_attn\.=q4_0,img_mlp=q8_0"}}
    pipe = load_pipeline(plan_load(root, body), "cpu", torch.float32, sources)
    block = pipe.transformer.transformer_blocks[0]
    assert block.attn.to_q.weight.quant_type == Q.Q4_0 and block.ff.net[0].proj.weight.quant_type == Q.Q8_0
    # Tensors no rule names keep their type (no weight_type asked).
    assert not hasattr(block.attn.add_q_proj.weight, "quant_type")
    assert block.attn.add_q_proj.weight.dtype == torch.float32


def test_already_quantized_tensors_keep_fewer_bits_and_lose_more():
    from diffusers.quantizers.gguf.utils import GGUFParameter

    weight = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))

    def stored(kind):
        return GGUFParameter(torch.from_numpy(quants.quantize(weight.numpy(), kind)), quant_type=kind)

    state = {"a.weight": stored(Q.Q4_0), "b.weight": stored(Q.Q8_0), "c.weight": weight, "c.bias": weight[0]}
    out = gguf_files.quantize_state_dict(state, Q.Q5_0)
    assert out["a.weight"] is state["a.weight"]  # 4.5 bits per weight: kept
    assert out["b.weight"].quant_type == Q.Q5_0 and out["c.weight"].quant_type == Q.Q5_0
    assert out["c.bias"] is state["c.bias"]  # biases stay float, as in a GGUF file
    requantized = quants.dequantize(out["b.weight"].numpy(), Q.Q5_0)
    assert np.abs(requantized - weight.numpy()).mean() < 0.1


def test_a_city96_sd3_gguf_loads_close_to_its_safetensors_checkpoint(client, inference_models, outputs_dir):
    root = inference_models["root"]
    checkpoint = load_file(inference_models["sd3"])
    # city96's layout: the MMDiT under its original names, without prefix; the VAE apart.
    transformer = {k.removeprefix("model.diffusion_model."): v for k, v in checkpoint.items()
                   if k.startswith("model.diffusion_model.")}
    gguf_path = tiny_model_files.write_gguf(transformer, root / "diffusion_models" / "sd3.5_large-Q8_0.gguf", "q8_0",
                                            arch="sd3")
    vae_path = tiny_diffusion.write_safetensors(
        {k.removeprefix("first_stage_model."): v for k, v in checkpoint.items() if k.startswith("first_stage_model.")},
        root / "vae" / "sd3.5_vae.safetensors")
    encoders = {"clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors", "t5xxl": "t5xxl_fp16.safetensors"}
    job = {"prompt": "a red cat", "width": 64, "height": 64, "steps": 4, "cfg_scale": 4.5, "seed": 5}
    try:
        assert gguf_files.inspect(gguf_path).tensor_types["Q8_0"] > 0
        _load(client, {"model_name": "sd3.5_large.safetensors", "model_type": "checkpoint", **encoders})
        plain = _image(client, outputs_dir, job)
        _load(client, {"model_name": "sd3.5_large-Q8_0.gguf", "model_type": "diffusion",
                       "vae": "sd3.5_vae.safetensors", **encoders})
        health = client.get("/health").json()
        assert health["model_architecture"] == "SD3" and health["model_name"] == "sd3.5_large-Q8_0.gguf"
        q8 = _image(client, outputs_dir, job)
        difference = np.abs(q8 - plain).mean()
        print(f"SD3.5 Q8_0 GGUF: mean pixel difference from the safetensors checkpoint {difference:.3f}")
        assert plain.std() > 10 and 0 < difference < 1.0
    finally:
        client.post("/models/unload")
        gguf_path.unlink(missing_ok=True)
        vae_path.unlink(missing_ok=True)


def test_the_q4_k_s_file_holds_real_q4_k_blocks_close_to_its_source(inference_models):
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    source = load_file(inference_models["flux"])
    path = inference_models["flux_gguf_q4"]
    reader = GGUFReader(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    q4_k = [t for t in reader.tensors if t.tensor_type == Q.Q4_K]
    # Every linear weight whose rows split into 256-weight super-blocks; the narrower ones in
    # Q5_0, llama.cpp's fallback for Q4_K.
    wide = [name for name, t in source.items() if name.endswith(".weight") and t.dim() == 2 and t.shape[1] % 256 == 0]
    assert sorted(t.name for t in q4_k) == sorted(wide) and wide
    assert {types[n] for n, t in source.items() if n.endswith(".weight") and t.dim() == 2 and n not in wide} == {Q.Q5_0}
    diffusers_view = gguf_files.load_state_dict(path)
    for tensor in q4_k:
        weight = source[tensor.name].float().numpy()
        restored = quants.dequantize(tensor.data, Q.Q4_K).reshape(weight.shape)
        error = np.abs(restored - weight).mean() / np.abs(weight).mean()
        assert error < 0.1, (tensor.name, error)
        # diffusers' kernels read the same values.
        assert np.allclose(dequantize_gguf_tensor(diffusers_view[tensor.name]).float().numpy(), restored, atol=1e-3)
    # On wider random weights the encoder is as close as gguf's own 4-bit Q4_0.
    wide_weight = torch.randn(16, 1024, generator=torch.Generator().manual_seed(2)).numpy()
    k_error = np.abs(quants.dequantize(tiny_model_files.quantize_q4_k(wide_weight), Q.Q4_K) - wide_weight).mean()
    q4_0_error = np.abs(quants.dequantize(quants.quantize(wide_weight, Q.Q4_0), Q.Q4_0) - wide_weight).mean()
    print(f"mean error on N(0, 1) weights: Q4_K {k_error:.4f}, Q4_0 {q4_0_error:.4f}")
    assert k_error < 1.1 * q4_0_error


def test_weight_type_q8_0_on_an_sdxl_plan_names_the_field(inference_models):
    with pytest.raises(InvalidInput, match=re.escape("SDXL models take")) as error:
        plan_load(ModelsRoot(inference_models["root"]),
                  {"model_name": "tiny-sdxl.safetensors", "options": {"weight_type": "q8_0"}})
    assert [f for f, _ in error.value.violations] == ["options.weight_type"]
