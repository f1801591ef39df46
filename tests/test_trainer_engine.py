"""The training engine on tiny SDXL, SD1.5 and Flux pipelines: it learns, its LoRA loads
into a fresh diffusers pipeline and changes what it draws, checkpoints resume with their
optimizer state, and options that cannot apply here say what was used instead."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open

from services.trainer import checkpoints
from services.trainer.engine import RunInputs, TrainingRun
from services.trainer.job_config import parse_job_config
from tinymodels import diffusion as tiny_diffusion

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PIPELINES = {"sdxl": StableDiffusionXLPipeline, "sd15": StableDiffusionPipeline, "flux": FluxPipeline}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine")
    return {
        "sdxl": tiny_diffusion.build_sdxl(root / "sdxl"),
        "sd15": tiny_diffusion.build_sd15(root / "sd15"),
        "flux": tiny_diffusion.build_flux(root / "flux"),
        "dataset": tiny_diffusion.build_dataset(root / "dataset"),
    }


def make_run(built, out: Path, arch="sdxl", max_steps=100, *, name="run", network=None, save=None, dataset=None,
             sample=None, model=None, **train) -> TrainingRun:
    config = {"job": "extension", "config": {"name": name, "process": [{
        "type": "diffusion_trainer", "training_folder": str(out), "device": "cpu", "trigger_word": "TOK",
        "network": {"type": "lora", "linear": 4, "linear_alpha": 4, **(network or {})},
        "save": {"dtype": "fp32", "save_every": 1000, "max_step_saves_to_keep": 3, **(save or {})},
        "datasets": [{"folder_path": str(built["dataset"]), "resolution": [64], "bucket_step_size": 16,
                      "caption_dropout_rate": 0.0, **(dataset or {})}],
        "train": {"batch_size": 2, "steps": max_steps, "lr": 1e-3, "optimizer": "adamw",
                  "gradient_checkpointing": False, "seed": 7, **train},
        "model": {"name_or_path": str(built[arch]), "arch": arch, **(model or {})},
        **({"sample": sample} if sample else {}),
    }]}}
    job = parse_job_config(config)
    masks = [Path(job.process.datasets[0].mask_path) if job.process.datasets[0].mask_path else None]
    inputs = RunInputs(model_source=str(built[arch]), single_file_config=None, training_folder=out,
                       dataset_folders=[built["dataset"]], mask_folders=masks, device="cpu")
    run = TrainingRun(job, inputs, max_steps=max_steps)
    run.load()
    return run


def fixed_loss(run: TrainingRun, batches: list[list[int]]) -> float:
    """Loss on fixed batches, noise and timesteps: comparable before and after training."""
    python_state, torch_state = run.rng.getstate(), run.generator.get_state()
    run.rng.seed(123)
    run.generator.manual_seed(123)
    with torch.no_grad():
        loss = float(np.mean([run._batch_loss(batch).item() for batch in batches]))
    run.rng.setstate(python_state)
    run.generator.set_state(torch_state)
    return loss


def adapted_layers(module: torch.nn.Module) -> set[str]:
    return {name for name, layer in module.named_modules() if isinstance(layer, BaseTunerLayer)}


def generate(pipe, seed=3) -> np.ndarray:
    image = pipe("TOK, a disc", num_inference_steps=4, width=64, height=64, guidance_scale=1.0,
                 generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    return np.asarray(image, dtype=np.float32)


@pytest.mark.parametrize("arch", ["sdxl", "sd15", "flux"])
def test_loss_goes_down_on_a_tiny_dataset(built, tmp_path, arch):
    run = make_run(built, tmp_path, arch, lr=1e-2, cache_text_encoder_outputs=True, network={"conv": 4},
                   dataset={"cache_latents": True}, timestep_type="linear")
    batches = [[i] for i in range(len(run.dataset))]
    before = fixed_loss(run, batches)
    for _ in range(60):
        run.train_step()
    after = fixed_loss(run, batches)
    assert after < before * 0.9, (before, after)


@pytest.mark.parametrize(("arch", "save_format"), [("sdxl", "diffusers"), ("sdxl", "safetensors"),
                                                   ("sd15", "diffusers"), ("flux", "diffusers"),
                                                   ("flux", "safetensors")])
def test_the_lora_loads_into_a_fresh_pipeline_and_changes_its_output(built, tmp_path, arch, save_format):
    run = make_run(built, tmp_path, arch, lr=2e-2, save={"save_format": save_format, "dtype": "bf16"},
                   train_text_encoder=arch == "sdxl", text_encoder_lr=1e-3)
    for _ in range(5):
        run.train_step()
    checkpoint = run.save_checkpoint()
    assert checkpoint.path == tmp_path / "run" / "run_000000005.safetensors"
    with safe_open(str(checkpoint.path), "pt") as f:
        assert f.metadata()["step"] == "5"
        keys = list(f.keys())
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in keys)
    if arch == "sdxl" and save_format == "diffusers":
        assert any(k.startswith("text_encoder_2.") for k in keys) and any(k.startswith("unet.") for k in keys)
    if save_format == "safetensors" and arch != "flux":
        assert any(k.startswith("lora_unet_") and k.endswith("lora_down.weight") for k in keys)
    if arch == "flux":  # as ai-toolkit saves Flux LoRAs, whatever the format
        assert all(k.startswith("transformer.") and ".lora_" in k for k in keys)

    pipe = PIPELINES[arch].from_pretrained(built[arch])
    pipe.set_progress_bar_config(disable=True)
    plain = generate(pipe)
    pipe.load_lora_weights(str(checkpoint.path))
    for name, module in run.adapted.items():  # every trained layer came back
        assert adapted_layers(getattr(pipe, name)) == adapted_layers(module), name
    adapted = generate(pipe)
    assert np.abs(adapted - plain).mean() > 0.5


def test_recreated_runs_resume_at_the_newest_checkpoint_with_optimizer_state(built, tmp_path):
    first = make_run(built, tmp_path, lr_scheduler="cosine", lr_scheduler_kwargs={"eta_min": 1e-5},
                     ema_config={"use_ema": True, "ema_decay": 0.9}, save={"max_step_saves_to_keep": 2})
    for step in range(1, 7):
        first.train_step()
        if step % 2 == 0:
            first.save_checkpoint()
    assert [c.step for c in checkpoints.list_checkpoints(tmp_path, "run")] == [4, 6]
    saved_state = copy.deepcopy(first.optimizer.state_dict())
    saved_lr = first.lr_scheduler.get_last_lr()

    second = make_run(built, tmp_path, lr_scheduler="cosine", lr_scheduler_kwargs={"eta_min": 1e-5},
                      ema_config={"use_ema": True, "ema_decay": 0.9})
    assert second.step == 6 and second.last_checkpoint.step == 6
    assert second.lr_scheduler.get_last_lr() == saved_lr
    restored = second.optimizer.state_dict()["state"]
    for key, state in saved_state["state"].items():
        assert torch.equal(restored[key]["exp_avg"], state["exp_avg"])
    # The weights are the EMA weights the checkpoint holds.
    for param, shadow in zip(second.trainable, first.ema, strict=True):
        assert torch.allclose(param, shadow), (param.shape, (param - shadow).abs().max())
    assert second.train_step().step == 7


def test_a_checkpoint_without_its_optimizer_state_still_resumes_and_says_so(built, tmp_path):
    first = make_run(built, tmp_path)
    first.train_step()
    first.save_checkpoint()
    (tmp_path / "run" / checkpoints.TRAINING_STATE_FILE).unlink()
    second = make_run(built, tmp_path)
    assert second.step == 1
    assert any("no optimizer state for step 1" in note for note in second.notes)


def test_lokr_trains_and_resumes(built, tmp_path):
    run = make_run(built, tmp_path, network={"type": "lokr", "linear": 4, "lokr_factor": 4})
    run.train_step()
    path = run.save_checkpoint().path
    with safe_open(str(path), "pt") as f:
        assert any("lokr_w1" in key for key in f.keys())
    assert make_run(built, tmp_path, network={"type": "lokr", "linear": 4, "lokr_factor": 4}).step == 1


def test_network_options_choose_the_trained_layers(built, tmp_path):
    plain = make_run(built, tmp_path / "a")
    with_conv = make_run(built, tmp_path / "b", network={"conv": 2, "conv_alpha": 1})
    narrowed = make_run(built, tmp_path / "c", network={"network_kwargs": {"ignore_if_contains": ["attn2"]}})
    count = lambda run: sum(p.numel() for p in run.trainable)  # noqa: E731
    assert count(with_conv) > count(plain) > count(narrowed)
    names = [n for n, _ in narrowed.arch.denoiser.named_modules() if n.endswith("lora_A")]
    assert names and not any("attn2" in n for n in names)


def test_adamw8bit_keeps_8_bit_state_and_resumes(built, tmp_path):
    run = make_run(built, tmp_path, optimizer="adamw8bit", network={"linear": 64, "linear_alpha": 64})
    run.train_step()
    states = [s for s in run.optimizer.state.values() if "state1" in s]
    assert any(s["state1"].dtype == torch.uint8 for s in states)
    run.save_checkpoint()
    resumed = make_run(built, tmp_path, optimizer="adamw8bit", network={"linear": 64, "linear_alpha": 64})
    assert resumed.step == 1 and not any("optimizer" in note for note in resumed.notes)


def test_options_that_cannot_apply_on_cpu_say_what_was_used(built, tmp_path):
    run = make_run(built, tmp_path, mixed_precision="bf16", dtype="bf16", bypass_guidance_embedding=True,
                   model={"quantize": True, "low_vram": True})
    assert all(p.dtype == torch.float32 for p in run.arch.denoiser.parameters())
    assert run.notes == [
        "bf16 mixed precision needs CUDA; trained in float32 on cpu",
        "model.quantize is not available here; the model was loaded unquantized",
        "model.low_vram only offloads on CUDA; nothing to offload on cpu",
        "bypass_guidance_embedding applies to flux only; ignored for sdxl",
    ]


@pytest.mark.parametrize("optimizer", ["adafactor", "prodigy"])
def test_other_optimizers_train(built, tmp_path, optimizer):
    params = {"prodigy": {"d_coef": 1.0}, "adafactor": {"relative_step": False}}[optimizer]
    run = make_run(built, tmp_path, optimizer=optimizer, optimizer_params=params, lr=1.0 if optimizer == "prodigy"
                   else 1e-3)
    before = [p.detach().clone() for p in run.trainable]
    run.train_step()
    assert any(not torch.equal(a, b) for a, b in zip(before, run.trainable, strict=True))


def test_masks_min_snr_and_the_rest_of_the_seed_options_run(built, tmp_path):
    run = make_run(built, tmp_path, max_steps=10, dataset={"mask_path": str(built["dataset"] / "masks"),
                                                           "mask_min_value": 0.1, "flip_x": True,
                                                           "shuffle_tokens": True, "token_dropout_rate": 0.1,
                                                           "cache_latents_to_disk": True},
                   min_snr_gamma=5, noise_offset=0.1, zero_terminal_snr=True, scale_weight_norms=1.0,
                   gradient_accumulation=2, gradient_checkpointing=True, train_text_encoder=True,
                   diff_output_preservation=True, content_or_style="content", timestep_type="sigmoid",
                   sample={"sample_every": 5, "width": 64, "height": 64, "sample_steps": 2, "walk_seed": True,
                           "samples": [{"prompt": "[trigger] disc"}, {"prompt": "a square"}]})
    assert any((tmp_path / "run" / "_latent_cache").iterdir())
    results = [run.train_step() for _ in range(3)]
    assert all(np.isfinite(r.loss) for r in results)
    images = run.sample()
    assert [i.prompt for i in images] == ["TOK disc", "a square"]
    assert all(i.path.is_file() for i in images)


def test_flux_can_train_with_its_guidance_embedding_bypassed(built, tmp_path):
    run = make_run(built, tmp_path, "flux", bypass_guidance_embedding=True)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    noised = run.arch.add_noise(latents, torch.randn_like(latents), torch.tensor([0.5]))
    cond = run._condition(["TOK, a disc"])
    sample = run.dataset.load(0, run.rng)
    with torch.no_grad():
        bypassed = run.arch.predict(noised, cond, [sample])
        run.arch.bypass_guidance = False
        guided = run.arch.predict(noised, cond, [sample])
    assert not torch.allclose(bypassed, guided)
    assert np.isfinite(run.train_step().loss)
