"""The generation server's models root and model loading: GET /models listing and filters,
paths that cannot leave the root, hashes, architecture detection from safetensors headers,
/models/load validation that names the bad field, and single-file checkpoints / Flux
diffusion models with their component files loading into pipelines that generate."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from services.common import architectures
from services.common.errors import InvalidInput, NotFound
from services.common.settings import Settings
from services.inference import model_loading
from services.inference.model_files import LIST_KEYS, MODEL_TYPES, ModelsRoot, sha256_file
from services.inference.model_loading import detect_architecture, load_pipeline, plan_load
from tinymodels import diffusion as tiny_diffusion
from tinymodels import model_files as tiny_model_files

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    paths = tiny_model_files.build_models_root(tmp_path_factory.mktemp("models"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAMESH_SDXL_CONFIG", str(paths["sdxl_config"]))
        patch.setenv("LORAMESH_SD15_CONFIG", str(paths["sd15_config"]))
        patch.setenv("LORAMESH_FLUX_CONFIG", str(paths["flux_config"]))
        yield paths


@pytest.fixture(scope="module")
def root(models) -> ModelsRoot:
    return ModelsRoot(models["root"])


def _fields(error: InvalidInput) -> list[str]:
    return [f for f, _ in error.violations]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def _generate(pipe, architecture: str) -> np.ndarray:
    extra = {"max_sequence_length": 32, "guidance_scale": 3.5} if architecture == "Flux" else {}
    image = pipe("TOK, a red disc on a blue background", height=64, width=64, num_inference_steps=2,
                 generator=torch.Generator("cpu").manual_seed(0), **extra).images[0]
    assert image.size == (64, 64)
    return np.asarray(image)


# --------------------------------------------------------------------------- listing


@pytest.fixture()
def listing_root(tmp_path) -> Path:
    """A models root of empty stand-in files: listing never opens them."""
    for name in ("checkpoints/SD1x/b_model.safetensors", "checkpoints/a_model.CKPT", "checkpoints/notes.txt",
                 "checkpoints/.thumbs/hidden.safetensors", "checkpoints/.hidden.safetensors",
                 "diffusion_models/flux1-dev-Q4_K_S.gguf", "diffusion_models/Flux1-schnell.safetensors",
                 "loras/add_detail.safetensors", "loras/styles/ink.pt", "esrgan/RealESRGAN_x4plus.pth",
                 "taesd/taef1_decoder.safetensors"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * (len(name) + 1))
    outside = tmp_path.parent / f"{tmp_path.name}-outside.safetensors"
    outside.write_bytes(b"secret")
    (tmp_path / "checkpoints" / "escape.safetensors").symlink_to(outside)
    (tmp_path / "checkpoints" / "linked.safetensors").symlink_to(tmp_path / "checkpoints" / "a_model.CKPT")
    return tmp_path


def test_listing_has_every_list_sorted_with_relative_names(listing_root):
    listed = ModelsRoot(listing_root).list()

    assert list(listed) == list(LIST_KEYS.values())
    checkpoints = listed["checkpoints"]
    assert [m.name for m in checkpoints] == ["SD1x/b_model.safetensors", "a_model.CKPT", "linked.safetensors"]
    first = checkpoints[0]
    assert (first.type, first.file_extension) == ("checkpoint", ".safetensors")
    assert first.size_bytes == (listing_root / "checkpoints" / first.name).stat().st_size
    assert checkpoints[1].file_extension == ".ckpt"
    assert [m.name for m in listed["loras"]] == ["add_detail.safetensors", "styles/ink.pt"]
    assert [m.type for m in listed["taesd"]] == ["taesd"]
    assert listed["embeddings"] == [] and listed["controlnets"] == []


def test_filters_by_type_extension_and_search(listing_root):
    models = ModelsRoot(listing_root)

    by_type = models.list(type="diffusion")
    assert [m.name for m in by_type["diffusion_models"]] == ["Flux1-schnell.safetensors", "flux1-dev-Q4_K_S.gguf"]
    assert all(not v for k, v in by_type.items() if k != "diffusion_models")

    for extension in ("gguf", ".gguf", "GGUF"):
        found = [m.name for ms in models.list(extension=extension).values() for m in ms]
        assert found == ["flux1-dev-Q4_K_S.gguf"]

    found = {m.name for ms in models.list(search="FLUX").values() for m in ms}
    assert found == {"flux1-dev-Q4_K_S.gguf", "Flux1-schnell.safetensors"}
    both = models.list(type="diffusion", extension="safetensors", search="flux")
    assert [m.name for m in both["diffusion_models"]] == ["Flux1-schnell.safetensors"]
    assert [m.name for m in models.list(type="lora", search="detail")["loras"]] == ["add_detail.safetensors"]


def test_unknown_type_lists_the_allowed_ones(listing_root):
    with pytest.raises(InvalidInput) as error:
        ModelsRoot(listing_root).list(type="checkpoints")
    assert _fields(error.value) == ["type"]
    assert all(f'"{t}"' in str(error.value) for t in MODEL_TYPES)


def test_paths_stay_inside_the_type_folder(listing_root):
    models = ModelsRoot(listing_root)
    assert models.path("checkpoint", "SD1x/b_model.safetensors") == listing_root / "checkpoints/SD1x/b_model.safetensors"

    for bad in ("../loras/add_detail.safetensors", "SD1x/../../loras/add_detail.safetensors",
                str(listing_root / "checkpoints/a_model.CKPT"), "escape.safetensors", "a\x00.safetensors"):
        with pytest.raises(InvalidInput) as error:
            models.path("checkpoint", bad)
        assert _fields(error.value) == ["model_name"], bad
    with pytest.raises(InvalidInput) as error:
        models.path("vae", "../checkpoints/a_model.CKPT", field="vae")
    assert _fields(error.value) == ["vae"]
    with pytest.raises(NotFound, match="Model not found: missing.safetensors"):
        models.path("checkpoint", "missing.safetensors")


def test_lora_names_resolve_with_or_without_extension(listing_root):
    models = ModelsRoot(listing_root)
    assert models.lora_path("add_detail") == listing_root / "loras/add_detail.safetensors"
    assert models.lora_path("styles/ink") == listing_root / "loras/styles/ink.pt"
    assert models.lora_path("add_detail.safetensors") == listing_root / "loras/add_detail.safetensors"
    with pytest.raises(NotFound):
        models.lora_path("nothing")
    with pytest.raises(InvalidInput):
        models.lora_path("../checkpoints/a_model")


def test_hash_is_the_sha256_of_the_file(models):
    path = models["sdxl"]
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- detection and plans


def test_architectures_are_detected_from_the_headers(models):
    assert detect_architecture(models["sdxl"]) == "SDXL"
    assert detect_architecture(models["sd15"]) == "SD1.5"
    assert detect_architecture(models["flux"]) == "Flux"
    with pytest.raises(InvalidInput, match="unrecognised architecture") as error:
        detect_architecture(models["vae"])
    assert _fields(error.value) == ["model_name"]


def test_load_requests_that_cannot_work_name_the_field(root):
    cases = [
        ({"model_name": "tiny-sdxl.safetensors", "model_type": "unet"}, ["model_type"]),
        ({"model_type": "checkpoint"}, ["model_name"]),
        ({"model_name": "tiny-sdxl.safetensors", "options": {"weight_type": "q4_0"}}, ["options.weight_type"]),
        ({"model_name": "tiny-sdxl.safetensors", "t5xxl": "tiny-t5xxl.safetensors"}, ["t5xxl"]),
        ({"model_name": "tiny-flux.safetensors", "model_type": "diffusion", "llm": "qwen.gguf"}, ["llm"]),
        ({"model_name": "wan2.1_t2v_1.3B_fp16.safetensors", "model_type": "diffusion",
          "controlnet": "canny.safetensors"},
         ["controlnet"]),
        ({"model_name": "tiny-sdxl.safetensors", "options": {"flow_shift": 3.0, "prediction": "flux_flow",
                                                             "rng_type": "std_default", "tensor_type_rules": "^vae\\.=f16",
                                                             "chroma_use_t5_mask": True}},
         ["options.rng_type", "options.tensor_type_rules", "options.prediction", "options.flow_shift",
          "options.chroma_use_t5_mask"]),
        ({"model_name": "tiny-flux.safetensors", "model_type": "diffusion", "options": {"prediction": "v"}},
         ["options.prediction"]),
        ({"model_name": "tiny-sdxl.safetensors", "options": {"keep_clip_on_gpu": True, "n_threads": "8"}},
         ["options.keep_clip_on_gpu", "options.n_threads"]),
        # A TAESD must decode the family's latents (TAEF1's 16 channels are not SDXL's 4).
        ({"model_name": "tiny-sdxl.safetensors", "clip_vision": "vision.safetensors",
          "taesd": "taef1_decoder.safetensors"}, ["clip_vision", "taesd"]),
    ]
    for request, fields in cases:
        with pytest.raises(InvalidInput) as error:
            plan_load(root, request)
        assert sorted(_fields(error.value)) == sorted(fields), request
    with pytest.raises(InvalidInput, match='"f32", "f16", "bf16"'):
        plan_load(root, {"model_name": "tiny-sdxl.safetensors", "options": {"weight_type": "q8_0"}})
    with pytest.raises(NotFound, match="Model not found: nothing.safetensors"):
        plan_load(root, {"model_name": "nothing.safetensors"})
    with pytest.raises(NotFound, match="Model not found: no-vae.safetensors"):
        plan_load(root, {"model_name": "tiny-sdxl.safetensors", "vae": "no-vae.safetensors"})


def test_a_model_loaded_as_the_wrong_type_is_refused(models, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "diffusion_models").mkdir()
    shutil.copy(models["flux"], tmp_path / "checkpoints" / "flux.safetensors")
    shutil.copy(models["sdxl"], tmp_path / "diffusion_models" / "sdxl.safetensors")
    swapped = ModelsRoot(tmp_path)
    with pytest.raises(InvalidInput, match='model_type "diffusion"') as error:
        plan_load(swapped, {"model_name": "flux.safetensors", "model_type": "checkpoint"})
    assert _fields(error.value) == ["model_type"]
    with pytest.raises(InvalidInput, match='model_type "checkpoint"'):
        plan_load(swapped, {"model_name": "sdxl.safetensors", "model_type": "diffusion"})
    (tmp_path / "diffusion_models" / "flux1-dev-Q4_K_S.gguf").write_bytes(b"GGUF")
    with pytest.raises(InvalidInput, match="not a readable GGUF file") as error:
        plan_load(swapped, {"model_name": "flux1-dev-Q4_K_S.gguf", "model_type": "diffusion"})
    assert _fields(error.value) == ["model_name"]


def test_plans_fill_defaults_and_round_trip(root, models):
    request = {"model_name": "tiny-flux.safetensors", "model_type": "diffusion", "clip_l": "tiny-clip_l.safetensors",
               "vae": None, "options": {"flow_shift": 0.0, "n_threads": 8}}
    plan = plan_load(root, request)

    assert plan.architecture == "Flux"
    assert plan.components == {"vae": None, "clip_l": "tiny-clip_l.safetensors", "clip_g": None, "t5xxl": None,
                               "controlnet": None, "llm": None, "llm_vision": None}
    assert plan.paths == {"model": str(models["flux"].resolve()), "clip_l": str(models["clip_l"].resolve())}
    assert plan.options["flow_shift"] is None and plan.options["keep_clip_on_cpu"] is False
    assert plan.options["n_threads"] == 8
    again = model_loading.LoadPlan.from_json(plan.to_json())
    assert again == plan and again.key() == plan.key() == plan_load(root, request).key()
    assert plan_load(root, {**request, "options": {"flow_shift": 2.0}}).key() != plan.key()
    assert plan_load(root, {**request, "options": {"flow_shift": "Infinity"}}).options["flow_shift"] is None


def test_presets_have_the_documented_shape():
    presets = architectures.presets()
    assert {"SD1", "SDXL", "Flux", "Z-Image"} <= set(presets)
    for preset in presets.values():
        assert set(preset) == {"display_name", "requiredComponents", "optionalComponents", "generationDefaults"}
        assert set(preset["generationDefaults"]) == {"width", "height", "steps", "cfg_scale"}
    assert presets["SDXL"]["requiredComponents"] == ["clip_l", "clip_g"]
    assert [architectures.family(a).preset for a in ("SD1.5", "SDXL", "Flux", "Z-Image")] == [
        "SD1", "SDXL", "Flux", "Z-Image"]


def test_flux_conversion_matches_diffusers_at_flux1_width():
    """At FLUX.1's width the converter gives what diffusers' own one does (tensor sizes other
    than the fused ones do not matter to either, so they are kept tiny)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    inner, mlp = 3072, 4 * 3072
    generator = torch.Generator().manual_seed(0)
    bfl = {}
    for name in ("time_in", "vector_in", "guidance_in"):
        for layer in ("in_layer", "out_layer"):
            bfl[f"{name}.{layer}.weight"] = torch.randn(3, 2, generator=generator)
            bfl[f"{name}.{layer}.bias"] = torch.randn(3, generator=generator)
    bfl["img_in.weight"], bfl["img_in.bias"] = torch.randn(inner, 1, generator=generator), torch.randn(inner)
    bfl["txt_in.weight"], bfl["txt_in.bias"] = torch.randn(4, 1, generator=generator), torch.randn(4)
    for part in ("img", "txt"):
        bfl[f"double_blocks.0.{part}_mod.lin.weight"] = torch.randn(6, 1, generator=generator)
        bfl[f"double_blocks.0.{part}_mod.lin.bias"] = torch.randn(6, generator=generator)
        bfl[f"double_blocks.0.{part}_attn.qkv.weight"] = torch.randn(3 * inner, 1, generator=generator)
        bfl[f"double_blocks.0.{part}_attn.qkv.bias"] = torch.randn(3 * inner, generator=generator)
        bfl[f"double_blocks.0.{part}_attn.proj.weight"] = torch.randn(2, 1, generator=generator)
        bfl[f"double_blocks.0.{part}_attn.proj.bias"] = torch.randn(2, generator=generator)
        for norm in ("query_norm", "key_norm"):
            bfl[f"double_blocks.0.{part}_attn.norm.{norm}.scale"] = torch.randn(2, generator=generator)
        for layer in ("0", "2"):
            bfl[f"double_blocks.0.{part}_mlp.{layer}.weight"] = torch.randn(2, 1, generator=generator)
            bfl[f"double_blocks.0.{part}_mlp.{layer}.bias"] = torch.randn(2, generator=generator)
    bfl["single_blocks.0.modulation.lin.weight"] = torch.randn(3, 1, generator=generator)
    bfl["single_blocks.0.modulation.lin.bias"] = torch.randn(3, generator=generator)
    bfl["single_blocks.0.linear1.weight"] = torch.randn(3 * inner + mlp, 1, generator=generator)
    bfl["single_blocks.0.linear1.bias"] = torch.randn(3 * inner + mlp, generator=generator)
    bfl["single_blocks.0.linear2.weight"] = torch.randn(2, 1, generator=generator)
    bfl["single_blocks.0.linear2.bias"] = torch.randn(2, generator=generator)
    bfl["single_blocks.0.norm.query_norm.scale"] = torch.randn(2, generator=generator)
    bfl["single_blocks.0.norm.key_norm.scale"] = torch.randn(2, generator=generator)
    bfl["final_layer.linear.weight"], bfl["final_layer.linear.bias"] = torch.randn(2, 1), torch.randn(2)
    bfl["final_layer.adaLN_modulation.1.weight"] = torch.randn(4, 1, generator=generator)
    bfl["final_layer.adaLN_modulation.1.bias"] = torch.randn(4, generator=generator)
    prefixed = {"model.diffusion_model." + k: v for k, v in bfl.items()}

    ours = model_loading.flux_transformer_to_diffusers(prefixed)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


# --------------------------------------------------------------------------- loading


def test_sdxl_checkpoint_loads_with_a_separate_vae(root, models):
    plan = plan_load(root, {"model_name": "tiny-sdxl.safetensors", "vae": "tiny-sd-vae.safetensors",
                            "options": {"vae_tiling": True, "prediction": "eps"}})
    pipe = load_pipeline(plan, "cpu", torch.float32, Settings.load().models)

    reference = tiny_diffusion.tiny_sdxl_pipeline(0)
    assert _same_weights(pipe.unet, reference.unet)
    assert _same_weights(pipe.text_encoder_2, reference.text_encoder_2)
    assert _same_weights(pipe.vae, tiny_diffusion.tiny_sdxl_pipeline(7).vae)
    assert not _same_weights(pipe.vae, reference.vae)
    assert pipe.vae.use_tiling and pipe.scheduler.config.prediction_type == "epsilon"
    _generate(pipe, "SDXL")


def test_sd15_checkpoint_loads_and_generates(root, models):
    from diffusers import StableDiffusionPipeline

    plan = plan_load(root, {"model_name": "SD1x/tiny-sd15.safetensors", "model_type": "checkpoint",
                            "options": {"prediction": "v", "keep_vae_on_cpu": True}})
    pipe = load_pipeline(plan, "cpu", torch.float32, Settings.load().models)

    assert isinstance(pipe, StableDiffusionPipeline) and plan.architecture == "SD1.5"
    reference = StableDiffusionPipeline.from_pretrained(models["sd15_config"], safety_checker=None,
                                                        requires_safety_checker=False)
    for name in ("unet", "vae", "text_encoder"):
        assert _same_weights(getattr(pipe, name), getattr(reference, name)), name
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    _generate(pipe, "SD1.5")


def test_flux_diffusion_model_loads_its_component_files(root, models, tmp_path):
    from diffusers import FluxPipeline

    plan = plan_load(root, {"model_name": "tiny-flux.safetensors", "model_type": "diffusion",
                            "clip_l": "tiny-clip_l.safetensors", "t5xxl": "tiny-t5xxl.safetensors",
                            "vae": "tiny-flux-ae.safetensors", "options": {"flow_shift": 2.5}})
    pipe = load_pipeline(plan, "cpu", torch.float32, Settings.load().models)

    # The files hold a seed-1 model; the config folder's own weights are seed 0.
    files = FluxPipeline.from_pretrained(tiny_diffusion.build_flux(tmp_path / "seed1", seed=1))
    folder = FluxPipeline.from_pretrained(models["flux_config"])
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        assert _same_weights(getattr(pipe, name), getattr(files, name)), name
        assert not _same_weights(getattr(pipe, name), getattr(folder, name)), name
    assert (pipe.scheduler.config.shift, pipe.scheduler.config.use_dynamic_shifting) == (2.5, False)
    image = _generate(pipe, "Flux")
    assert np.array_equal(image, _generate(files, "Flux")) is False  # a different scheduler shift

    files.scheduler = pipe.scheduler
    assert np.array_equal(image, _generate(files, "Flux"))


def test_flux_components_not_named_come_from_the_config_folder(root, models):
    from diffusers import FluxPipeline

    plan = plan_load(root, {"model_name": "tiny-flux.safetensors", "model_type": "diffusion",
                            "options": {"weight_type": "bf16"}})
    pipe = load_pipeline(plan, "cpu", torch.float32, Settings.load().models)

    folder = FluxPipeline.from_pretrained(models["flux_config"], dtype=torch.bfloat16)
    assert _same_weights(pipe.text_encoder_2, folder.text_encoder_2)
    assert pipe.transformer.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.bfloat16
