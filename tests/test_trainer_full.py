"""Full fine-tuning in the training engine on a tiny SD1.5 pipeline: the whole UNet trains
and changes what the model draws, a killed run resumes with its trained weights, and the
finished run leaves the fine-tuned weights plus a LoRA extracted from them by SVD that a
fresh diffusers pipeline loads and that draws closer to the fine-tune than the base does."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from services.common.errors import InvalidInput
from services.trainer import checkpoints
from services.trainer.extract import extract_lora
from services.trainer.job_config import parse_job_config
from tests.test_trainer_engine import make_run
from tinymodels import diffusion as tiny_diffusion

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FULL = {"type": "full", "linear": 8}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("full")
    return {"sd15": tiny_diffusion.build_sd15(root / "sd15"), "dataset": tiny_diffusion.build_dataset(root / "dataset")}


def full_run(built, out: Path, **train):
    return make_run(built, out, "sd15", network=FULL, lr=2e-3, **train)


def fresh_pipe(built) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(built["sd15"], safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe, seed=3) -> torch.Tensor:
    """The denoised latents of a fixed prompt and seed: what the denoiser alone decides."""
    with torch.no_grad():
        return pipe("TOK, a disc", num_inference_steps=4, width=64, height=64, guidance_scale=1.0,
                    output_type="latent", generator=torch.Generator("cpu").manual_seed(seed)).images


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().mean().item()


@pytest.fixture(scope="module")
def finished(built, tmp_path_factory):
    """A full run trained 6 steps, checkpointed and finished with save_final."""
    out = tmp_path_factory.mktemp("finished")
    run = full_run(built, out)
    for _ in range(6):
        run.train_step()
    run.save_checkpoint()
    final = run.save_final()
    run.arch.denoiser.eval()
    return run, final, latents(run.arch.pipe)


def test_full_runs_train_every_weight_of_the_denoiser_and_change_its_output(built, finished):
    run, _, tuned_latents = finished
    denoiser = run.arch.denoiser
    assert run.trainable == list(denoiser.parameters())
    assert all(p.dtype == torch.float32 for p in run.trainable)
    assert not any(p.requires_grad for p in run.arch.pipe.text_encoder.parameters())
    assert not any("lora" in name for name, _ in denoiser.named_modules())

    base = fresh_pipe(built)
    base_state = base.unet.state_dict()
    changed = [k for k, v in denoiser.state_dict().items() if not torch.equal(v, base_state[k])]
    assert len(changed) == len(base_state)  # AdamW moves every weight
    assert distance(tuned_latents, latents(base)) > 0.05


def test_save_final_writes_the_fine_tune_and_a_lora_extracted_from_it(built, finished):
    run, final, tuned_latents = finished
    folder = run.training_folder / "run"
    assert final.full_weights == folder / "run_full.safetensors"
    assert final.lora == folder / "run.safetensors"
    # Neither is mistaken for a checkpoint when a run resumes.
    assert [c.step for c in checkpoints.list_checkpoints(run.training_folder, "run")] == [6]

    full_pipe = fresh_pipe(built)
    full_pipe.unet.load_state_dict(load_file(str(final.full_weights)))
    assert torch.allclose(latents(full_pipe), tuned_latents, atol=1e-5)

    with safe_open(str(final.lora), "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["network_type"] == "lora" and f.metadata()["step"] == "6"
        ranks = {f.get_tensor(k).shape[1] for k in keys if k.endswith("lora_B.weight")}
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert max(ranks) == 8 and min(ranks) < 8  # layers narrower than the rank keep their own
    assert any(".resnets." in k and ".conv1." in k for k in keys)  # convolutions are extracted too

    base_latents = latents(fresh_pipe(built))
    lora_pipe = fresh_pipe(built)
    lora_pipe.load_lora_weights(str(folder), weight_name="run.safetensors")
    lora_latents = latents(lora_pipe)
    assert distance(lora_latents, base_latents) > 0.05
    assert distance(lora_latents, tuned_latents) < 0.5 * distance(base_latents, tuned_latents)


def test_a_killed_full_run_resumes_at_its_checkpoint_with_the_trained_weights(built, tmp_path):
    first = full_run(built, tmp_path, ema_config={"use_ema": True, "ema_decay": 0.5})
    for _ in range(3):
        first.train_step()
    first.save_checkpoint()
    with first._ema_weights():  # the checkpoint holds the EMA weights
        saved = {k: v.clone() for k, v in first.arch.denoiser.state_dict().items()}
        first.arch.denoiser.eval()
        saved_latents = latents(first.arch.pipe)
    first.train_step()  # trained past the checkpoint, then killed
    with safe_open(str(first.last_checkpoint.path), "pt") as f:
        assert f.metadata()["network_type"] == "full"
        assert set(f.keys()) == set(saved)

    second = full_run(built, tmp_path, ema_config={"use_ema": True, "ema_decay": 0.5})
    assert second.step == 3 and second.last_checkpoint.step == 3
    for key, value in second.arch.denoiser.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert second.optimizer.state_dict()["state"]  # AdamW moments came back too
    second.arch.denoiser.eval()
    assert torch.equal(latents(second.arch.pipe), saved_latents)
    assert second.train_step().step == 4


def test_a_lora_run_does_not_resume_from_a_full_run_checkpoint(built, tmp_path):
    run = full_run(built, tmp_path)
    run.train_step()
    run.save_checkpoint()
    with pytest.raises(ValueError, match="holds a full network and this run trains lora"):
        make_run(built, tmp_path, "sd15")


def test_lora_runs_save_final_as_their_last_checkpoint(built, tmp_path):
    run = make_run(built, tmp_path, "sd15", lr=1e-2)
    for _ in range(2):
        run.train_step()
    checkpoint = run.save_checkpoint()
    final = run.save_final()
    assert final.lora == tmp_path / "run" / "run.safetensors" and final.full_weights is None
    saved, last = load_file(str(final.lora)), load_file(str(checkpoint.path))
    assert saved.keys() == last.keys() and saved
    assert all(torch.equal(saved[k], last[k]) for k in saved)


def test_full_runs_note_what_they_do_not_train_and_still_sample(built, tmp_path):
    run = make_run(built, tmp_path, "sd15", network=FULL, train_text_encoder=True, diff_output_preservation=True,
                   cache_text_encoder_outputs=True,
                   sample={"sample_every": 5, "width": 64, "height": 64, "sample_steps": 2,
                           "samples": [{"prompt": "[trigger] disc"}]})
    assert "full fine-tuning trains the denoiser only; train_text_encoder ignored" in run.notes
    assert any("diff_output_preservation" in note for note in run.notes)
    assert not run.trains_text_encoders and not run.preserves_output
    assert run.train_step().step == 1
    assert [image.path.is_file() for image in run.sample()] == [True]


def test_the_job_config_takes_full_and_needs_the_unet_trained(built, tmp_path):
    def config(**train):
        return {"job": "extension", "config": {"name": "x", "process": [{
            "type": "diffusion_trainer", "training_folder": str(tmp_path), "network": {"type": "full", "linear": 16},
            "datasets": [{"folder_path": str(built["dataset"])}], "train": train,
            "model": {"name_or_path": str(built["sd15"]), "arch": "sd15"}}]}}

    assert parse_job_config(config()).process.network.type == "full"
    with pytest.raises(InvalidInput) as caught:
        parse_job_config(config(train_unet=False, train_text_encoder=True))
    assert caught.value.violations == [("config.config.process[0].train.train_unet",
                                        "must be true when network.type is full: full fine-tuning trains the "
                                        "denoiser (the UNet or transformer)")]


# ---- extract_lora ------------------------------------------------------------------------


def low_rank(shape: tuple[int, int], rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)


def delta_of(lora: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    up, down = lora[f"{module}.lora_B.weight"], lora[f"{module}.lora_A.weight"]
    return up.flatten(1) @ down.flatten(1)


def test_a_rank_r_difference_is_recovered_exactly_at_rank_r():
    base = {"proj.weight": torch.randn(48, 40), "conv.weight": torch.randn(12, 6, 3, 3), "same.weight": torch.randn(8, 8)}
    tuned = {"proj.weight": base["proj.weight"] + low_rank((48, 40), 5, 1),
             "conv.weight": base["conv.weight"] + low_rank((12, 54), 5, 2).reshape(12, 6, 3, 3),
             "same.weight": base["same.weight"].clone()}
    lora = extract_lora(base, tuned, 5, modules=["proj", "conv", "same"])
    assert sorted(lora) == ["conv.lora_A.weight", "conv.lora_B.weight", "proj.lora_A.weight", "proj.lora_B.weight"]
    assert lora["proj.lora_A.weight"].shape == (5, 40) and lora["proj.lora_B.weight"].shape == (48, 5)
    # peft's Conv2d LoRA: lora_A keeps the kernel, lora_B is 1x1.
    assert lora["conv.lora_A.weight"].shape == (5, 6, 3, 3) and lora["conv.lora_B.weight"].shape == (12, 5, 1, 1)
    for module in ("proj", "conv"):
        expected = (tuned[f"{module}.weight"] - base[f"{module}.weight"]).flatten(1)
        assert torch.allclose(delta_of(lora, module), expected, atol=1e-4)


@pytest.mark.parametrize("rank", [1, 4, 12])
def test_lower_ranks_give_the_best_approximation_of_that_rank(rank):
    base, tuned = {"w.weight": torch.randn(30, 20)}, {"w.weight": torch.randn(30, 20)}
    delta = tuned["w.weight"] - base["w.weight"]
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    approximation = delta_of(extract_lora(base, tuned, rank, modules=["w"]), "w")
    assert torch.allclose(approximation, best, atol=1e-4)
    error = (delta - approximation).norm()
    assert error == pytest.approx(s[rank:].norm().item(), rel=1e-4)
    assert error > 0


def test_a_rank_above_the_layer_size_keeps_the_whole_difference():
    base, tuned = {"w.weight": torch.randn(3, 10)}, {"w.weight": torch.randn(3, 10)}
    lora = extract_lora(base, tuned, 16, modules=["w"])
    assert lora["w.lora_A.weight"].shape == (3, 10)
    assert torch.allclose(delta_of(lora, "w"), tuned["w.weight"] - base["w.weight"], atol=1e-5)
