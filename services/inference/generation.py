"""One image from a loaded diffusers pipeline: the request, its architecture-dependent checks,
and the pipeline call built for each architecture. The call is exactly what a user would
write against diffusers by hand, so an image equals the plain pipeline's for the same
arguments, scheduler and seed."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image

from services.common.errors import Violations
from services.inference import samplers

SD15, SDXL, FLUX, FLUX_KONTEXT, ZIMAGE = "SD1.5", "SDXL", "Flux", "Flux Kontext", "Z-Image"
ARCHITECTURES = (SD15, SDXL, FLUX, FLUX_KONTEXT, ZIMAGE)

# Width and height must be multiples of these: the VAE downsamples 8x, and the transformers
# of the flow models pack latents into 2x2 patches on top.
RESOLUTION_DIVISORS = {SD15: 8, SDXL: 8, FLUX: 16, FLUX_KONTEXT: 16, ZIMAGE: 16}
# Architectures whose prompts go through CLIP text encoders whose layers can be skipped.
CLIP_SKIP_ARCHITECTURES = (SD15, SDXL)
# Kontext edits its reference (control) image; it has no separate img2img or inpainting.
INIT_IMAGE_ARCHITECTURES = (SD15, SDXL, FLUX, ZIMAGE)
CONTROL_IMAGE_ARCHITECTURES = (FLUX_KONTEXT,)


@dataclass(frozen=True)
class LoraWeight:
    path: Path      # a local .safetensors file (kohya/ai-toolkit, diffusers or peft layout)
    scale: float    # network_multiplier / <lora:name:weight>


@dataclass
class ImageRequest:
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    guidance_scale: float = 7.0
    seed: int = 0                          # already resolved (never -1 here)
    sampler: str | None = None             # a name from samplers.SAMPLERS (or "flowmatch"); None = model default
    scheduler: str | None = None           # a name from samplers.SCHEDULERS; None = model default
    clip_skip: int | None = None           # sd.cpp/A1111 convention: None or <=0 = model default, 1 = last layer, 2 = one skipped
    distilled_guidance: float | None = None  # Flux guidance embedding; None = model default
    eta: float = 0.0
    init_image: PIL.Image.Image | None = None    # img2img
    strength: float = 0.75
    mask_image: PIL.Image.Image | None = None    # inpainting (white repaint, black keep)
    control_image: PIL.Image.Image | None = None  # Flux Kontext reference image (ctrl_img)

    @property
    def task(self) -> str:
        if self.init_image is not None and self.mask_image is not None:
            return "inpaint"
        if self.init_image is not None:
            return "img2img"
        return "txt2img"


class Cancelled(Exception):
    """Raised by an on_step callback to stop a running job at the next step."""


def check_request(architecture: str, request: ImageRequest, violations: Violations, prefix: str = "") -> None:
    """Architecture-dependent checks done at submit time (before queueing): sampler/scheduler
    pair, size divisible by the model's divisor, clip_skip support, img2img/inpaint/control
    support. Field names prefixed with `prefix` (e.g. "prompts[0].")."""
    if architecture not in ARCHITECTURES:
        violations.add(f"{prefix}model", f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
        return
    samplers.check(architecture, request.sampler or "", request.scheduler or "", violations,
                   f"{prefix}sampler", f"{prefix}scheduler")
    divisor = RESOLUTION_DIVISORS[architecture]
    for name in ("width", "height"):
        value = getattr(request, name)
        if value <= 0 or value % divisor:
            violations.add(f"{prefix}{name}", f"{value} is not a positive multiple of {divisor}, "
                                              f"which {architecture} needs")
    if request.clip_skip is not None and request.clip_skip > 0:
        if architecture not in CLIP_SKIP_ARCHITECTURES:
            if request.clip_skip > 1:
                violations.add(f"{prefix}clip_skip", f"{architecture} has no CLIP layers to skip; "
                                                     f"use -1 (model default)")
        elif architecture == SDXL and request.clip_skip < 2:
            violations.add(f"{prefix}clip_skip", "SDXL conditions on the penultimate CLIP layer at least; "
                                                 "use -1 (model default) or a value of 2 or more")
    if request.init_image is not None and architecture not in INIT_IMAGE_ARCHITECTURES:
        violations.add(f"{prefix}init_image", f"{architecture} does not do image-to-image; give the image as the "
                                              f"control (reference) image instead")
    if request.mask_image is not None:
        if architecture not in INIT_IMAGE_ARCHITECTURES:
            violations.add(f"{prefix}mask_image", f"{architecture} does not do inpainting")
        elif request.init_image is None:
            violations.add(f"{prefix}mask_image", "a mask needs the image it applies to (init_image)")
    if request.init_image is not None:
        if not 0.0 < request.strength <= 1.0:
            violations.add(f"{prefix}strength", f"{request.strength} is outside (0, 1]")
        elif int(request.steps * request.strength) < 1:
            # img2img runs the last steps * strength steps of the schedule.
            violations.add(f"{prefix}strength", f"{request.strength} of {request.steps} steps leaves no step to "
                                                f"run; raise strength or steps")
    if request.control_image is not None and architecture not in CONTROL_IMAGE_ARCHITECTURES:
        violations.add(f"{prefix}control_image", f"{architecture} takes no reference image; "
                                                 f"only {', '.join(CONTROL_IMAGE_ARCHITECTURES)} does")


def diffusers_clip_skip(architecture: str, clip_skip: int | None) -> int | None:
    """sd.cpp counts the layers dropped from the end (1 = last layer); diffusers counts the
    layers skipped beyond what the pipeline already uses: the last layer for SD1.5, the
    penultimate for SDXL."""
    if clip_skip is None or clip_skip <= 0 or architecture not in CLIP_SKIP_ARCHITECTURES:
        return None
    skipped = clip_skip - (2 if architecture == SDXL else 1)
    return skipped if skipped > 0 else None


def _accepts(pipe, name: str) -> bool:
    return name in inspect.signature(pipe.__call__).parameters


def _max_sequence_length(pipe) -> int | None:
    """The pipeline's default prompt length, capped by what its (last) tokenizer can encode."""
    parameter = inspect.signature(pipe.__call__).parameters.get("max_sequence_length")
    if parameter is None:
        return None
    limit = parameter.default
    tokenizer = getattr(pipe, "tokenizer_2", None) or getattr(pipe, "tokenizer", None)
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < limit:
        limit = model_max
    return limit


def _clip_skip_embeds(pipe, text: str, skipped: int):
    """SD1.5 prompt embeddings from `skipped` layers before CLIP's last, through its final
    layer norm: what diffusers' clip_skip computes, done here because its SD1.5 path looks
    for a `text_model` attribute that transformers 5's CLIPTextModel no longer has. The
    negative prompt gets the same skip, as in A1111 and stable-diffusion.cpp."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    tokens = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    mask = tokens.attention_mask.to(encoder.device) if getattr(encoder.config, "use_attention_mask", False) else None
    hidden = encoder(tokens.input_ids.to(encoder.device), attention_mask=mask, output_hidden_states=True)
    norm = getattr(encoder, "text_model", encoder).final_layer_norm
    return norm(hidden.hidden_states[-(skipped + 1)]).to(encoder.dtype)


def _sized(image: PIL.Image.Image, width: int, height: int, mode: str = "RGB") -> PIL.Image.Image:
    image = image.convert(mode)
    return image if image.size == (width, height) else image.resize((width, height), PIL.Image.LANCZOS)


def call_arguments(pipe, architecture: str, request: ImageRequest, sampling: samplers.Sampling,
                   on_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """The keyword arguments of the diffusers pipeline call for `request`."""
    import torch

    kwargs: dict[str, Any] = {
        "prompt": request.prompt,
        "num_inference_steps": request.steps,
        "generator": torch.Generator("cpu").manual_seed(request.seed),
        "output_type": "pil",
    }
    if _accepts(pipe, "width"):
        kwargs["width"], kwargs["height"] = request.width, request.height
    if sampling.sigmas is not None:
        kwargs["sigmas"] = sampling.sigmas(request.steps)

    if architecture in (SD15, SDXL):
        kwargs["negative_prompt"] = request.negative_prompt or None
        kwargs["guidance_scale"] = request.guidance_scale
        kwargs["clip_skip"] = diffusers_clip_skip(architecture, request.clip_skip)
        kwargs["eta"] = request.eta  # used only by schedulers whose step takes it (DDIM, TCD)
        if architecture == SD15 and kwargs["clip_skip"] is not None:
            skipped = kwargs.pop("clip_skip")
            kwargs["prompt_embeds"] = _clip_skip_embeds(pipe, request.prompt, skipped)
            kwargs["negative_prompt_embeds"] = _clip_skip_embeds(pipe, request.negative_prompt, skipped)
            kwargs["prompt"] = kwargs["negative_prompt"] = None
    elif architecture in (FLUX, FLUX_KONTEXT):
        # The /v1 API's guidance_scale is Flux's distilled guidance; when distilled_guidance
        # is given separately, guidance_scale is true classifier-free guidance.
        if request.distilled_guidance is not None:
            kwargs["guidance_scale"] = request.distilled_guidance
            if request.negative_prompt and request.guidance_scale > 1.0 and _accepts(pipe, "true_cfg_scale"):
                kwargs["negative_prompt"] = request.negative_prompt
                kwargs["true_cfg_scale"] = request.guidance_scale
        else:
            kwargs["guidance_scale"] = request.guidance_scale
        kwargs["max_sequence_length"] = _max_sequence_length(pipe)
        if architecture == FLUX_KONTEXT and request.control_image is not None:
            # The reference image at the output size (the pipeline's own auto-resize would pick
            # a ~1 MP Kontext size instead); without max_area it would also rescale the output
            # to about a megapixel.
            kwargs["image"] = _sized(request.control_image, request.width, request.height)
            kwargs["_auto_resize"] = False
            kwargs["max_area"] = request.width * request.height
        elif architecture == FLUX_KONTEXT:
            kwargs["max_area"] = request.width * request.height
    elif architecture == ZIMAGE:
        # diffusers' Z-Image guidance w gives pos + w (pos - neg); the API's cfg scale s is
        # the usual neg + s (pos - neg), so s = 1 (the Turbo default) means no guidance.
        kwargs["guidance_scale"] = max(0.0, request.guidance_scale - 1.0)
        kwargs["negative_prompt"] = request.negative_prompt or None
        kwargs["max_sequence_length"] = _max_sequence_length(pipe)

    if request.init_image is not None:
        kwargs["image"] = _sized(request.init_image, request.width, request.height)
        kwargs["strength"] = request.strength
        if request.mask_image is not None:
            kwargs["mask_image"] = _sized(request.mask_image, request.width, request.height, "L")

    if on_step is not None:
        def step_end(pipeline, index, _timestep, _tensors):
            total = getattr(pipeline, "_num_timesteps", None) or len(pipeline.scheduler.timesteps)
            on_step(index + 1, total)
            return {}

        kwargs["callback_on_step_end"] = step_end
    return {k: v for k, v in kwargs.items() if v is not None or k in ("prompt", "negative_prompt", "clip_skip")}


def generate(pipe, architecture: str, request: ImageRequest, sampling: samplers.Sampling,
             on_step: Callable[[int, int], None]) -> PIL.Image.Image:
    """Runs `pipe` (already holding the sampling's scheduler and the wanted LoRAs) for one
    image. Exceptions from on_step (Cancelled) propagate out of the denoising loop."""
    import torch

    with torch.inference_mode():
        kwargs = call_arguments(pipe, architecture, request, sampling, on_step)
        return pipe(**kwargs).images[0]
