"""One image from a loaded diffusers pipeline: the checks of what each model family can do,
and the pipeline call built for each family. The call is exactly what a user would
write against diffusers by hand, so an image equals the plain pipeline's for the same
arguments, scheduler and seed."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import PIL.Image

from services.common import architectures
from services.common.architectures import ModelFamily
from services.common.errors import Violations
from services.inference import samplers, step_cache
from services.inference.job_spec import ImageSpec


@dataclass(frozen=True)
class LoraWeight:
    path: Path      # a local .safetensors file (kohya/ai-toolkit, diffusers or peft layout)
    scale: float    # network_multiplier / <lora:name:weight>
    transformer: str | None = None  # two-expert models: "high" or "low", the expert it applies to


# The control type a Flux ControlNet-Union is run with: InstantX's and Shakker-Labs' mode 0,
# canny (edges), the kind of control image the generation server's API documents.
FLUX_UNION_CONTROL_MODE = 0
# Called after each step with the running pipeline, its latents (as the pipeline holds them),
# the step (1-based) and the total: live previews.
OnLatents = Callable[[Any, Any, int, int], None]


class Cancelled(Exception):
    """Raised by an on_step callback to stop a running job at the next step."""


def check_image(architecture: str, spec: ImageSpec, violations: Violations, prefix: str = "",
                names: Mapping[str, str] = MappingProxyType({})) -> None:
    """What the family can do, checked when a job is submitted: sampler/scheduler pair, size
    divisible by the family's divisor, clip_skip, img2img/inpainting/reference image. Each
    violation names the field as the client's API calls it (`names` maps the ImageSpec field
    to it) under `prefix` (e.g. "prompts[0].")."""

    def add(name: str, description: str) -> None:
        violations.add(prefix + names.get(name, name), description)

    family = architectures.FAMILIES.get(architecture)
    if family is None:
        add("model", f"unknown architecture {architecture!r}; known: {', '.join(architectures.FAMILIES)}")
        return
    found = Violations()
    samplers.check(architecture, spec.sampler or "", spec.scheduler or "", found)
    for name, description in found.items:
        add(name, description)
    for name in ("width", "height"):
        value = getattr(spec, name)
        if value <= 0 or value % family.size_divisor:
            add(name, f"{value} is not a positive multiple of {family.size_divisor}, which {architecture} needs")
    if spec.clip_skip is not None and spec.clip_skip > 0:
        if family.clip_skip_base is None:
            if spec.clip_skip > 1:
                add("clip_skip", f"{architecture} has no CLIP layers to skip; use -1 (model default)")
        elif spec.clip_skip < family.clip_skip_base:
            add("clip_skip", f"{architecture} conditions on CLIP layer -{family.clip_skip_base} at least; use -1 "
                             f"(model default) or a value of {family.clip_skip_base} or more")
    if spec.init is not None and not family.init_image:
        add("init", f"{architecture} does not do image-to-image; give the image as the control (reference) "
                    f"image instead")
    if spec.mask is not None:
        if not family.init_image:
            add("mask", f"{architecture} does not do inpainting")
        elif spec.init is None:
            add("mask", "a mask needs the image it applies to (init_image)")
    if spec.init is not None:
        if not 0.0 < spec.strength <= 1.0:
            add("strength", f"{spec.strength} is outside (0, 1]")
        elif int(spec.steps * spec.strength) < 1:
            # img2img runs the last steps * strength steps of the schedule.
            add("strength", f"{spec.strength} of {spec.steps} steps leaves no step to run; raise strength or steps")
    if spec.control is not None and not family.control_image:
        editors = ", ".join(f.name for f in architectures.FAMILIES.values() if f.control_image)
        add("control", f"{architecture} takes no reference image; only {editors} does")


def diffusers_clip_skip(family: ModelFamily, clip_skip: int | None) -> int | None:
    """sd.cpp counts the layers dropped from the end (1 = last layer); diffusers counts the
    layers skipped beyond what the pipeline already uses: the last layer for SD1.5, the
    penultimate for SDXL."""
    if clip_skip is None or clip_skip <= 0 or family.clip_skip_base is None:
        return None
    skipped = clip_skip - family.clip_skip_base
    return skipped if skipped > 0 else None


def _accepts(pipe, name: str) -> bool:
    return name in inspect.signature(pipe.__call__).parameters


def _max_sequence_length(pipe) -> int | None:
    """The pipeline's default prompt length, capped by what its (last) tokenizer can encode."""
    parameter = inspect.signature(pipe.__call__).parameters.get("max_sequence_length")
    if parameter is None:
        return None
    limit = parameter.default
    tokenizer = next((getattr(pipe, name) for name in ("tokenizer_3", "tokenizer_2", "tokenizer")
                      if getattr(pipe, name, None) is not None), None)
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


def server_guidance(family: ModelFamily, cfg_scale: float) -> float:
    """The diffusers guidance_scale that gives the generation server's cfg_scale as
    stable-diffusion.cpp means it: neg + s (pos - neg), where 1 is no guidance. diffusers'
    Z-Image guidance w gives pos + w (pos - neg), so it is s - 1 there; the other pipelines
    mean what sd.cpp means (Qwen-Image's true_cfg_scale among them). (/v1's guidance_scale goes
    to diffusers as it is.)"""
    if family is architectures.ZIMAGE:
        return max(0.0, cfg_scale - 1.0)
    return cfg_scale


def call_arguments(pipe, family: ModelFamily, request: ImageSpec, images: Mapping[str, PIL.Image.Image],
                   sampling: samplers.Sampling, on_step: Callable[[int, int], None] | None = None,
                   on_latents: OnLatents | None = None) -> dict[str, Any]:
    """The keyword arguments of the diffusers pipeline call for `request`, its input images
    taken by name from `images`."""
    import torch

    init_image, mask_image, control_image, controlnet_image = (
        images.get(name) if name else None
        for name in (request.init, request.mask, request.control, request.controlnet_image))
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

    if not family.flow:  # SD1.5, SDXL
        kwargs["negative_prompt"] = request.negative_prompt or None
        kwargs["guidance_scale"] = request.guidance_scale
        kwargs["clip_skip"] = diffusers_clip_skip(family, request.clip_skip)
        kwargs["eta"] = request.eta  # used only by schedulers whose step takes it (DDIM, TCD)
        if family is architectures.SD15 and kwargs["clip_skip"] is not None:
            skipped = kwargs.pop("clip_skip")
            kwargs["prompt_embeds"] = _clip_skip_embeds(pipe, request.prompt, skipped)
            kwargs["negative_prompt_embeds"] = _clip_skip_embeds(pipe, request.negative_prompt, skipped)
            kwargs["prompt"] = kwargs["negative_prompt"] = None
    elif family in (architectures.FLUX, architectures.FLUX_KONTEXT):
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
        if family.control_image and control_image is not None:
            # The reference image at the output size (the pipeline's own auto-resize would pick
            # a ~1 MP Kontext size instead); without max_area it would also rescale the output
            # to about a megapixel.
            kwargs["image"] = _sized(control_image, request.width, request.height)
            kwargs["_auto_resize"] = False
            kwargs["max_area"] = request.width * request.height
        elif family.control_image:
            kwargs["max_area"] = request.width * request.height
    elif family is architectures.ZIMAGE:
        kwargs["guidance_scale"] = request.guidance_scale
        kwargs["negative_prompt"] = request.negative_prompt or None
        kwargs["max_sequence_length"] = _max_sequence_length(pipe)
    elif family in (architectures.WAN21, architectures.WAN22):
        kwargs["negative_prompt"] = request.negative_prompt or None
        kwargs["guidance_scale"] = request.guidance_scale
        if family.moe:
            # diffusers: guidance_scale for the high-noise expert, guidance_scale_2 for the low-noise one.
            if request.high_noise_guidance_scale is not None:
                kwargs["guidance_scale"] = request.high_noise_guidance_scale
            kwargs["guidance_scale_2"] = request.guidance_scale
        kwargs["num_frames"] = request.video_frames
        kwargs["max_sequence_length"] = _max_sequence_length(pipe)
        kwargs["output_type"] = "np"
    elif family is architectures.QWEN_IMAGE:
        # Qwen-Image's true classifier-free guidance is sd.cpp's cfg_scale: against the negative
        # prompt (an empty one too) above 1, none at 1 or below.
        kwargs["true_cfg_scale"] = request.guidance_scale
        kwargs["negative_prompt"] = request.negative_prompt if request.guidance_scale > 1.0 else None
        kwargs["max_sequence_length"] = _max_sequence_length(pipe)
    elif family is architectures.SD3:
        kwargs["negative_prompt"] = request.negative_prompt or None
        kwargs["guidance_scale"] = request.guidance_scale
        kwargs["clip_skip"] = diffusers_clip_skip(family, request.clip_skip)
        kwargs["max_sequence_length"] = _max_sequence_length(pipe)
        if request.slg_scale > 0:  # refused at submission where the pipeline has none (img2img)
            kwargs["skip_guidance_layers"] = list(request.skip_layers)
            kwargs["skip_layer_guidance_scale"] = request.slg_scale
            kwargs["skip_layer_guidance_start"] = request.slg_start
            kwargs["skip_layer_guidance_stop"] = request.slg_end

    if init_image is not None:
        kwargs["image"] = _sized(init_image, request.width, request.height)
        kwargs["strength"] = request.strength
        if mask_image is not None:
            kwargs["mask_image"] = _sized(mask_image, request.width, request.height, "L")
    if controlnet_image is not None:
        # diffusers' ControlNet pipelines: `image` in SD text-to-image, `control_image` beside an
        # init image and in the transformer families' ones (Flux, Z-Image, SD3, Qwen-Image).
        name = "control_image" if init_image is not None or _accepts(pipe, "control_image") else "image"
        kwargs[name] = _sized(controlnet_image, request.width, request.height)
        kwargs["controlnet_conditioning_scale"] = request.controlnet_strength
        if getattr(getattr(pipe, "controlnet", None), "union", False):
            # A Flux ControlNet-Union needs a control type; the API has no field for it.
            kwargs["control_mode"] = FLUX_UNION_CONTROL_MODE

    if on_step is not None:
        def step_end(pipeline, index, _timestep, tensors):
            total = getattr(pipeline, "_num_timesteps", None) or len(pipeline.scheduler.timesteps)
            on_step(index + 1, total)
            if on_latents is not None and "latents" in tensors:
                on_latents(pipeline, tensors["latents"], index + 1, total)
            return {}

        kwargs["callback_on_step_end"] = step_end
    return {k: v for k, v in kwargs.items() if v is not None or k in ("prompt", "negative_prompt", "clip_skip")}


def generate(pipe, family: ModelFamily, request: ImageSpec, images: Mapping[str, PIL.Image.Image],
             sampling: samplers.Sampling, on_step: Callable[[int, int], None],
             on_latents: OnLatents | None = None) -> PIL.Image.Image:
    """Runs `pipe` (already holding the sampling's scheduler and the wanted LoRAs) for one
    image, with EasyCache on its transformer for this image only when the request asks.
    Exceptions from on_step (Cancelled) propagate out of the denoising loop."""
    import torch

    with torch.inference_mode(), _control_latents_seeded(family, request), \
            step_cache.easycache(getattr(pipe, "transformer", None), request.easycache) as at_step:
        def stepped(done: int, total: int) -> None:
            at_step(done, total)
            on_step(done, total)

        kwargs = call_arguments(pipe, family, request, images, sampling, stepped, on_latents)
        return pipe(**kwargs).images[0]


@contextlib.contextmanager
def _control_latents_seeded(family: ModelFamily, request: ImageSpec):
    """diffusers' SD3 ControlNet pipeline samples the control image's latents from torch's global
    generator, not the one it is given: for that call the global one is seeded with the request's
    seed (one seed, one image) and restored after."""
    import torch

    if family is not architectures.SD3 or request.controlnet_image is None:
        yield
        return
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        torch.manual_seed(request.seed)
        yield


def frames_uint8(frames):
    """A pipeline's float frames in [0, 1] as uint8 RGB, rounded to the nearest level."""
    import numpy as np

    return (np.clip(np.asarray(frames, dtype=np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def generate_video(pipe, family: ModelFamily, request: ImageSpec, sampling: samplers.Sampling,
                   on_step: Callable[[int, int], None], on_latents: OnLatents | None = None):
    """Runs a video pipeline (holding the sampling's scheduler and the wanted LoRAs) for one
    video: its frames as a (frames, height, width, 3) uint8 array."""
    import torch

    with torch.inference_mode(), step_cache.easycache(pipe.transformer, request.easycache) as at_step, \
            moe_boundary(pipe, request.moe_boundary):
        def stepped(done: int, total: int) -> None:
            at_step(done, total)
            on_step(done, total)

        kwargs = call_arguments(pipe, family, request, MappingProxyType({}), sampling, stepped, on_latents)
        return frames_uint8(pipe(**kwargs).frames[0])


@contextlib.contextmanager
def moe_boundary(pipe, boundary: float | None):
    """A two-expert pipeline's boundary_ratio for one video (WanPipeline reads it from its
    config, not from the call), then the model's own again."""
    if boundary is None or getattr(pipe.config, "boundary_ratio", None) is None:
        yield
        return
    own = pipe.config.boundary_ratio
    pipe.register_to_config(boundary_ratio=boundary)
    try:
        yield
    finally:
        pipe.register_to_config(boundary_ratio=own)
