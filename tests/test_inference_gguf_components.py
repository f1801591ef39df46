"""GGUF text encoders, LLMs and VAEs in the generation server: the seed's Z-Image Turbo example
with its GGUF VAE and Qwen3 LLM through REST against the same model with safetensors components,
Wan 2.1 with city96's GGUF UMT5 encoder, each encoder loader (Qwen3, UMT5, Qwen2.5-VL) against
its safetensors twin, and GGUF component files that cannot load refused by field before
anything changes."""

from __future__ import annotations

import io
import shutil

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from services.common.errors import InvalidInput
from services.inference import gguf_files
from services.inference.model_loading import _text_encoder_from_file
from tests.conftest import violated_fields
from tests.test_inference_server import txt2img
from tests.test_inference_video import WAN_LOAD, decoded, txt2vid
from tinymodels import model_files as tiny_model_files

# The seed's "Load Z-Image Turbo" body without its `"weight_type": "q5_0"` option (quantizing on
# load is tested with the weight_type option itself, in test_inference_gguf_quantize.py).
Z_IMAGE_LOAD = {"model_name": "z_image_turbo-Q8_0.gguf", "model_type": "diffusion", "vae": "ae_q8_0.gguf",
                "llm": "qwen_3_4b.Q8_0.gguf", "options": {"flash_attn": True, "vae_conv_direct": True}}
# The seed's Z-Image Turbo txt2img body, smaller (96x64, 4 steps, 2 images), without easycache
# (diffusers' Z-Image transformer has no cache hooks).
Z_IMAGE_JOB = {
    "prompt": "A solitary 27-year-old woman sits sideways on a weathered, moss-flecked tree trunk that lies "
              "diagonally across a quiet forest clearing; she faces camera-left.",
    "negative_prompt": "piercings, jewelry, tattoos", "width": 96, "height": 64, "steps": 4, "cfg_scale": 1.0,
    "sampler": "euler", "scheduler": "smoothstep", "seed": 42, "batch_count": 2,
}
WAN_GGUF_LOAD = {**WAN_LOAD, "t5xxl": "umt5-xxl-encoder-Q8_0.gguf"}
PROMPT_IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64]])


@pytest.fixture(scope="module")
def client(mesh):
    with httpx.Client(base_url=mesh.rest_url, timeout=180) as client:
        yield client
        client.post("/models/unload")


def _load(client, body: dict) -> dict:
    r = client.post("/models/load", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _images(client, outputs_dir) -> list[np.ndarray]:
    job = txt2img(client, **Z_IMAGE_JOB)
    assert job["status"] == "completed", job.get("error")
    images = [Image.open(outputs_dir / name) for name in job["outputs"]]
    assert [image.size for image in images] == [(96, 64)] * 2
    return [np.asarray(image.convert("RGB"), dtype=np.float64) for image in images]


def _mean_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.mean([np.abs(x - y).mean() for x, y in zip(a, b, strict=True)]))


# --------------------------------------------------------------------------- through REST


def test_the_seed_z_image_example_loads_gguf_components_and_generates_like_safetensors_ones(client, outputs_dir):
    loaded = _load(client, Z_IMAGE_LOAD)
    assert loaded["loaded_components"]["vae"] == "ae_q8_0.gguf"
    assert loaded["loaded_components"]["llm"] == "qwen_3_4b.Q8_0.gguf"
    health = client.get("/health").json()
    assert health["model_architecture"] == "Z-Image" and health["model_name"] == "z_image_turbo-Q8_0.gguf"
    job = txt2img(client, **Z_IMAGE_JOB)
    assert job["status"] == "completed", job.get("error")
    served = client.get(f"/output/{job['outputs'][0]}")
    assert served.status_code == 200 and Image.open(io.BytesIO(served.content)).size == (96, 64)
    gguf = _images(client, outputs_dir)

    _load(client, {**Z_IMAGE_LOAD, "vae": "ae.safetensors", "llm": "qwen_3_4b.safetensors"})
    plain = _images(client, outputs_dir)
    # Without component files the encoder and VAE come from the config folder, whose weights
    # differ: what the files hold visibly decides the image.
    _load(client, {key: value for key, value in Z_IMAGE_LOAD.items() if key not in ("vae", "llm")})
    other = _images(client, outputs_dir)

    close, far = _mean_difference(gguf, plain), _mean_difference(other, plain)
    print(f"mean pixel difference from safetensors components: GGUF {close:.3f}, other weights {far:.3f}")
    assert all(image.std() > 10 for image in plain)  # images with content, so closeness means something
    assert 0 < close < 2.0 and far > 5 * close


def test_wan21_loads_the_gguf_umt5_encoder_and_makes_the_video_the_safetensors_one_makes(client):
    loaded = _load(client, WAN_GGUF_LOAD)
    assert loaded["loaded_components"]["t5xxl"] == "umt5-xxl-encoder-Q8_0.gguf"
    short = {"width": 80, "height": 64, "video_frames": 5, "steps": 3, "seed": 5}
    job = txt2vid(client, **short)
    assert job["status"] == "completed", job.get("error")
    served = client.get(f"/output/{job['outputs'][0]}")
    assert served.status_code == 200
    frames, _, codec = decoded(served.content)
    assert codec == "h264" and frames.shape == (5, 64, 80, 3)

    _load(client, WAN_LOAD)
    plain, _, _ = decoded(client.get(f"/output/{txt2vid(client, **short)['outputs'][0]}").content)
    difference = np.abs(frames.astype(np.float64) - plain).mean()
    assert plain.std() > 5 and difference < 3.0, difference


def test_gguf_components_that_cannot_load_are_refused_by_field_and_the_model_stays(client, inference_models,
                                                                                   tmp_path):
    _load(client, Z_IMAGE_LOAD)
    root = inference_models["root"]
    qwen_vl = tiny_model_files.build_qwen25vl_encoder_files(tmp_path / "qwen-vl")["gguf"]
    wrong_arch = root / "llm" / "Qwen2.5-VL-7B-Instruct-Q8_0.gguf"
    not_gguf = root / "vae" / "ae_broken.gguf"
    llm_as_t5 = root / "t5" / "qwen_3_4b.Q8_0.gguf"
    shutil.copy(qwen_vl, wrong_arch)
    shutil.copy(inference_models["zimage_llm_gguf"], llm_as_t5)
    not_gguf.write_bytes(np.random.default_rng(0).bytes(2048))
    try:
        r = client.post("/models/load", json={**Z_IMAGE_LOAD, "llm": wrong_arch.name, "vae": not_gguf.name})
        assert r.status_code == 400, r.text
        assert sorted(violated_fields(r)) == ["llm", "vae"], r.json()
        message = r.json()["message"]
        assert "llama.cpp 'qwen2vl' model" in message and "'qwen3'" in message, message
        assert "ae_broken.gguf is not a readable GGUF file" in message, message
        r = client.post("/models/load", json={**WAN_GGUF_LOAD, "t5xxl": llm_as_t5.name})
        assert r.status_code == 400 and violated_fields(r) == ["t5xxl"], r.text
        assert "llama.cpp 'qwen3' model" in r.json()["message"] and "'t5encoder'" in r.json()["message"]
        health = client.get("/health").json()
        assert health["model_name"] == "z_image_turbo-Q8_0.gguf" and health["model_loaded"] is True
        assert health["loaded_components"]["llm"] == "qwen_3_4b.Q8_0.gguf"
    finally:
        for path in (wrong_arch, not_gguf, llm_as_t5):
            path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the loaders


def _hidden(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROMPT_IDS, output_hidden_states=True).hidden_states[-1]


def _assert_close_to_safetensors(gguf_model, plain_model) -> None:
    ours, theirs = _hidden(gguf_model), _hidden(plain_model)
    error = (ours - theirs).abs().max().item()
    # Q8_0 keeps about 2-3 significant digits per weight; a model that lost or misplaced a
    # weight differs by the size of the activations themselves.
    assert 0 < error < 0.1 * theirs.abs().mean().item(), error


def test_the_qwen3_gguf_loads_as_the_z_image_text_encoder(inference_models):
    config = str(inference_models["zimage_config"])
    gguf = _text_encoder_from_file(inference_models["zimage_llm_gguf"], config, "text_encoder", torch.float32, "llm")
    plain = _text_encoder_from_file(inference_models["zimage_llm"], config, "text_encoder", torch.float32, "llm")
    assert type(gguf).__name__ == "Qwen3Model"
    assert gguf_files.file_architecture(inference_models["zimage_llm_gguf"], "llm") == "qwen3"
    assert gguf_files.inspect(inference_models["zimage_llm_gguf"]).tensor_types["Q8_0"] > 0
    _assert_close_to_safetensors(gguf, plain)
    # The header is llama.cpp's: transformers rebuilds the encoder's shape from it.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    read = load_gguf_checkpoint(str(inference_models["zimage_llm_gguf"]))["config"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size"):
        assert read[key] == getattr(plain.config, key), key


def test_the_umt5_gguf_loads_as_the_wan_text_encoder_and_transformers_reads_it_as_umt5(inference_models):
    from transformers import UMT5EncoderModel

    path, config = inference_models["wan21_t5xxl_gguf"], str(inference_models["wan21_config"])
    gguf = _text_encoder_from_file(path, config, "text_encoder", torch.float32, "t5xxl")
    plain = _text_encoder_from_file(inference_models["wan21_t5xxl"], config, "text_encoder", torch.float32, "t5xxl")
    assert type(gguf).__name__ == "UMT5EncoderModel"
    assert gguf_files.file_architecture(path, "t5xxl") == "t5encoder"
    _assert_close_to_safetensors(gguf, plain)
    # transformers' own GGUF loading reads the file as city96's files are read: a UMT5 encoder of
    # the same weights (its config from the header, which has no relative_attention_max_distance:
    # the tiny encoder's 16 is not UMT5-XXL's default 128, so outputs are compared above only).
    standalone = UMT5EncoderModel.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = gguf.state_dict()
    assert standalone.config.d_model == gguf.config.d_model and standalone.state_dict().keys() == ours.keys()
    assert all(torch.equal(tensor, ours[name]) for name, tensor in standalone.state_dict().items())


def test_the_qwen25vl_gguf_loads_its_language_model_and_leaves_the_vision_tower_out(tmp_path):
    files = tiny_model_files.build_qwen25vl_encoder_files(tmp_path)
    assert gguf_files.file_architecture(files["gguf"], "llm") == "qwen2vl"
    assert not any(name.startswith("v.") for name in gguf_files.inspect(files["gguf"]).tensor_names)
    gguf = _text_encoder_from_file(files["gguf"], str(tmp_path), "text_encoder", torch.float32, "llm")
    plain = _text_encoder_from_file(files["safetensors"], str(tmp_path), "text_encoder", torch.float32, "llm")
    assert type(gguf).__name__ == "Qwen2_5_VLForConditionalGeneration"
    _assert_close_to_safetensors(gguf, plain)
    assert torch.allclose(gguf.lm_head.weight, plain.lm_head.weight, atol=0.05)
    # No tower weights exist; images are refused in words instead of running unset weights.
    assert not any(name.startswith("model.visual.") for name in gguf.state_dict())
    with pytest.raises(ValueError, match="language model only"):
        gguf.model.visual(torch.zeros(4, 8))
    gguf.to(torch.bfloat16)  # the pipeline moves it like any other encoder


def test_the_gguf_vae_decodes_like_its_safetensors_release(inference_models):
    from diffusers import AutoencoderKL

    path, config = inference_models["zimage_vae_gguf"], str(inference_models["zimage_config"])
    assert gguf_files.inspect(path).tensor_types.keys() <= {"F16", "F32", "Q8_0"}
    from_gguf = AutoencoderKL.from_single_file(gguf_files.dequantized_state_dict(path, torch.float32, "vae"),
                                               config=config, subfolder="vae")
    plain = AutoencoderKL.from_single_file(str(inference_models["zimage_vae"]), config=config, subfolder="vae")
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = from_gguf.decode(latents).sample, plain.decode(latents).sample
    assert 0 < (ours - theirs).abs().mean().item() < 0.01 * theirs.abs().mean().item() + 1e-3


def test_a_gguf_encoder_of_other_sizes_is_refused_naming_the_field(inference_models, tmp_path):
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(vocab_size=653, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=12)
    wider = tiny_model_files.write_llama_cpp_gguf(Qwen3Model(config).state_dict(), config,
                                                  tmp_path / "qwen3-wide.gguf", "qwen3", "Qwen3-wide")
    with pytest.raises(InvalidInput, match="other sizes") as caught:
        _text_encoder_from_file(wider, str(inference_models["zimage_config"]), "text_encoder", torch.float32, "llm")
    assert [name for name, _ in caught.value.violations] == ["llm"]
    # A UMT5 GGUF holds none of a Qwen3's weights.
    with pytest.raises(InvalidInput, match="weights missing") as caught:
        _text_encoder_from_file(inference_models["wan21_t5xxl_gguf"], str(inference_models["zimage_config"]),
                                "text_encoder", torch.float32, "llm")
    assert [name for name, _ in caught.value.violations] == ["llm"]


def test_the_umt5_gguf_keeps_every_layers_relative_attention_bias(inference_models):
    # UMT5, unlike T5, has a relative position bias in every layer; llama.cpp names each one.
    names = gguf_files.inspect(inference_models["wan21_t5xxl_gguf"]).tensor_names
    safetensors = load_file(inference_models["wan21_t5xxl"])
    layers = {k.split(".")[2] for k in safetensors if k.endswith("relative_attention_bias.weight")}
    assert {f"enc.blk.{i}.attn_rel_b.weight" for i in layers} <= set(names) and len(layers) > 1


def test_a_gguf_encoder_under_its_source_names_loads_as_its_safetensors_release(inference_models, tmp_path):
    # stable-diffusion.cpp's converter keeps the names of the file it converts.
    source = load_file(inference_models["wan21_t5xxl"])
    path = gguf_files.write_gguf(source, tmp_path / "umt5_xxl_q8_0.gguf", "q8_0", arch="t5")
    config = str(inference_models["wan21_config"])
    gguf = _text_encoder_from_file(path, config, "text_encoder", torch.float32, "t5xxl")
    plain = _text_encoder_from_file(inference_models["wan21_t5xxl"], config, "text_encoder", torch.float32, "t5xxl")
    _assert_close_to_safetensors(gguf, plain)
