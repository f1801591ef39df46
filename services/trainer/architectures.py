"""What differs between the model families a LoRA trains on: how the pipeline loads, how
captions and images become conditioning and latents, how noise is added and what the
denoiser must predict. Stable Diffusion 1.5 and SDXL are DDPM models (epsilon or
v-prediction); Flux is a rectified-flow transformer. The training loop (engine.py) only
talks to the `Architecture` interface."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.training_utils import compute_snr

from services.common import architectures as registry
from services.trainer.dataset import Sample

SAMPLERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "flowmatch": FlowMatchEulerDiscreteScheduler,
}


@dataclass
class Noised:
    """A noised batch: what goes into the denoiser and what it should predict."""

    model_input: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    # Per-sample loss weights of the noise schedule (min-SNR); None when uniform.
    weights: torch.Tensor | None


class Architecture:
    """One model family. `pipe` is the diffusers pipeline whose denoiser is trained."""

    name: str  # the family's id in services.common.architectures
    pipeline_class: type
    denoiser_name: str
    text_encoder_names: tuple[str, ...]

    def __init__(self, pipe, device: torch.device, dtype: torch.dtype):
        self.pipe = pipe
        self.device = device
        self.dtype = dtype

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        return {n: getattr(self.pipe, n) for n in self.text_encoder_names if getattr(self.pipe, n, None) is not None}

    @classmethod
    def load(cls, source: str | Path, single_file_config: str | None, dtype: torch.dtype):
        """The pipeline from a diffusers folder, a Hugging Face id (HF cache and
        HF_HUB_OFFLINE honoured), or a single-file checkpoint with `single_file_config`
        (a diffusers folder or id) supplying the component configs and tokenizers."""
        source = str(source)
        if source.endswith((".safetensors", ".ckpt")):
            return cls.pipeline_class.from_single_file(source, config=single_file_config, torch_dtype=dtype)
        return cls.pipeline_class.from_pretrained(source, torch_dtype=dtype)

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        latents = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.sample()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, u: torch.Tensor) -> Noised:
        """Noise `latents` at levels u in [0, 1] (1 = pure noise)."""
        raise NotImplementedError

    def predict(self, noised: Noised, cond: dict[str, torch.Tensor], samples: list[Sample]) -> torch.Tensor:
        raise NotImplementedError

    def generate(self, embeds: dict[str, torch.Tensor], negative: dict[str, torch.Tensor] | None, *,
                 width: int, height: int, steps: int, guidance_scale: float, cfg_rescale: float,
                 generator: torch.Generator):
        raise NotImplementedError


class StableDiffusionFamily(Architecture):
    """SD 1.5 and SDXL: DDPM noise schedule, UNet denoiser."""

    denoiser_name = "unet"

    def __init__(self, pipe, device, dtype, *, zero_terminal_snr: bool = False, min_snr_gamma: float | None = None):
        super().__init__(pipe, device, dtype)
        config = dict(pipe.scheduler.config)
        config.pop("rescale_betas_zero_snr", None)
        self.noise_scheduler = DDPMScheduler.from_config(config, rescale_betas_zero_snr=zero_terminal_snr)
        self.min_snr_gamma = min_snr_gamma

    def add_noise(self, latents, noise, u):
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = (u * (steps - 1)).round().long().clamp(0, steps - 1).to(latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        v_prediction = self.noise_scheduler.config.prediction_type == "v_prediction"
        target = self.noise_scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
        weights = None
        if self.min_snr_gamma:
            # Min-SNR-γ (Hang et al. 2023): weight each step by min(SNR, γ)/SNR (v: /(SNR+1)).
            snr = compute_snr(self.noise_scheduler, timesteps).clamp(min=1e-8)
            clipped = torch.minimum(snr, torch.full_like(snr, self.min_snr_gamma))
            weights = clipped / (snr + 1 if v_prediction else snr)
        return Noised(noisy, timesteps, target, weights)


class StableDiffusion15(StableDiffusionFamily):
    name = "sd15"
    pipeline_class = StableDiffusionPipeline
    text_encoder_names = ("text_encoder",)

    @classmethod
    def load(cls, source, single_file_config, dtype):
        source = str(source)
        if source.endswith((".safetensors", ".ckpt")):
            return cls.pipeline_class.from_single_file(
                source, config=single_file_config, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
            )
        return cls.pipeline_class.from_pretrained(source, torch_dtype=dtype, safety_checker=None,
                                                  requires_safety_checker=False)

    def encode_prompts(self, captions):
        embeds, _ = self.pipe.encode_prompt(captions, self.device, 1, False)
        return {"prompt_embeds": embeds}

    def predict(self, noised, cond, samples):
        return self.denoiser(noised.model_input, noised.timesteps, encoder_hidden_states=cond["prompt_embeds"]).sample

    def generate(self, embeds, negative, *, width, height, steps, guidance_scale, cfg_rescale, generator):
        return self.pipe(
            prompt_embeds=embeds["prompt_embeds"],
            negative_prompt_embeds=negative["prompt_embeds"] if negative else None,
            width=width, height=height, num_inference_steps=steps, guidance_scale=guidance_scale,
            guidance_rescale=cfg_rescale, generator=generator,
        ).images[0]


class StableDiffusionXL(StableDiffusionFamily):
    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    text_encoder_names = ("text_encoder", "text_encoder_2")

    def encode_prompts(self, captions):
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=captions, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def predict(self, noised, cond, samples):
        # SDXL micro-conditioning: original size, crop corner and target size of each image.
        time_ids = torch.tensor(
            [[*s.original_size, *s.crop_top_left, *s.target_size] for s in samples],
            device=noised.model_input.device, dtype=cond["prompt_embeds"].dtype,
        )
        return self.denoiser(
            noised.model_input, noised.timesteps, encoder_hidden_states=cond["prompt_embeds"],
            added_cond_kwargs={"text_embeds": cond["pooled_prompt_embeds"], "time_ids": time_ids},
        ).sample

    def generate(self, embeds, negative, *, width, height, steps, guidance_scale, cfg_rescale, generator):
        if negative is None and self.pipe.config.force_zeros_for_empty_prompt:
            negative = {key: torch.zeros_like(value) for key, value in embeds.items()}
        return self.pipe(
            prompt_embeds=embeds["prompt_embeds"], pooled_prompt_embeds=embeds["pooled_prompt_embeds"],
            negative_prompt_embeds=negative["prompt_embeds"] if negative else None,
            negative_pooled_prompt_embeds=negative["pooled_prompt_embeds"] if negative else None,
            width=width, height=height, num_inference_steps=steps, guidance_scale=guidance_scale,
            guidance_rescale=cfg_rescale, generator=generator,
        ).images[0]


class Flux(Architecture):
    """Flux: rectified flow (x_t = (1-σ)·x0 + σ·noise, predict noise - x0), a transformer
    over 2×2-packed latents, CLIP pooled + T5 sequence conditioning, guidance embedding."""

    name = "flux"
    pipeline_class = FluxPipeline
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    max_sequence_length = 512

    def __init__(self, pipe, device, dtype, *, guidance: float = 1.0, bypass_guidance: bool = False):
        super().__init__(pipe, device, dtype)
        self.guidance = guidance
        self.bypass_guidance = bypass_guidance

    def encode_prompts(self, captions):
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=captions, prompt_2=None, device=self.device,
            max_sequence_length=min(self.max_sequence_length, self.pipe.tokenizer_2.model_max_length),
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def encode_images(self, pixels):
        latents = super().encode_images(pixels)
        # Packing takes 2×2 latent patches: trim an odd row or column.
        height, width = latents.shape[-2] // 2 * 2, latents.shape[-1] // 2 * 2
        return latents[..., :height, :width]

    def add_noise(self, latents, noise, u):
        sigmas = u.to(latents.device, latents.dtype).view(-1, 1, 1, 1)
        noisy = (1 - sigmas) * latents + sigmas * noise
        return Noised(noisy, u.to(latents.device), noise - latents, None)

    def predict(self, noised, cond, samples):
        latents = noised.model_input
        batch, channels, height, width = latents.shape
        packed = FluxPipeline._pack_latents(latents, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, latents.dtype)
        text_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=latents.device, dtype=latents.dtype)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((batch,), self.guidance, device=latents.device, dtype=latents.dtype)
        with self._guidance_bypassed():
            out = self.denoiser(
                hidden_states=packed, timestep=noised.timesteps.to(latents.dtype), guidance=guidance,
                pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=cond["prompt_embeds"],
                txt_ids=text_ids, img_ids=image_ids,
            ).sample
        scale = self.pipe.vae_scale_factor
        return FluxPipeline._unpack_latents(out, height * scale, width * scale, scale)

    @contextlib.contextmanager
    def _guidance_bypassed(self):
        """bypass_guidance_embedding: the guidance embedder's output is zeroed while
        training, so the LoRA learns as if the model had no guidance input."""
        embedder = getattr(self.denoiser.time_text_embed, "guidance_embedder", None)
        if not (self.bypass_guidance and embedder is not None):
            yield
            return
        handle = embedder.register_forward_hook(lambda module, args, output: torch.zeros_like(output))
        try:
            yield
        finally:
            handle.remove()

    def generate(self, embeds, negative, *, width, height, steps, guidance_scale, cfg_rescale, generator):
        return self.pipe(
            prompt_embeds=embeds["prompt_embeds"], pooled_prompt_embeds=embeds["pooled_prompt_embeds"],
            width=width, height=height, num_inference_steps=steps, guidance_scale=guidance_scale,
            generator=generator,
        ).images[0]


# The training class of each family, by its registry id (a config's model.arch).
ARCHITECTURES: dict[str, type[Architecture]] = {
    cls.name: cls for cls in (StableDiffusion15, StableDiffusionXL, Flux)
}


def _check_registry() -> None:
    """A family the registry marks trainable must have a class here running its pipeline, or
    configs naming it would pass validation and fail only once a session starts."""
    for family in registry.trainable():
        cls = ARCHITECTURES.get(family.id)
        if cls is None or cls.pipeline_class.__name__ != family.pipeline_class:
            raise ImportError(f"the trainer has no training class for {family.id} running {family.pipeline_class}")


_check_registry()
