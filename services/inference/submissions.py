"""Turns the requests of both APIs into jobs: every field checked (all bad fields
reported at once), defaults filled, seeds resolved, LoRAs resolved to files, input
images decoded. A request that fails here queues nothing.

Both produce a `JobSpec` (job_spec.py): what the worker runs, and in `params` what
GET /queue/{id} shows (the request with the seed used).
"""

from __future__ import annotations

import io
import math
import re
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.common import architectures, media
from services.common.errors import InvalidInput, NotFound, Violations
from services.common.settings import Settings
from services.inference import catalog, conversion, model_loading, samplers, upscaling
from services.inference.generation import check_image, server_guidance
from services.inference.job_spec import (
    CONVERT,
    IMG2IMG,
    JPEG,
    MP4,
    PNG,
    SERVER_API,
    SLG_DEFAULTS,
    TXT2IMG,
    TXT2VID,
    V1_API,
    ImageSpec,
    JobSpec,
    LoraSpec,
    ModelRef,
)
from services.inference.model_files import ModelsRoot
from services.inference.model_loading import LoadPlan

MAX_SEED = 2**63 - 1
MIN_SIZE, MAX_SIZE = 64, 4096
MAX_BATCH = 16
# Far beyond what any text encoder reads (CLIP 77 tokens, T5 512), and small enough that a
# job with many prompts fits in one NATS message.
MAX_PROMPT_CHARS = 10_000
LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")


@dataclass
class Submission:
    spec: JobSpec
    # Input images by name, kept in the object store until the job ends (PNG bytes).
    images: dict[str, bytes] = field(default_factory=dict)
    hf_token: str | None = None


def resolve_seed(seed: int | None) -> int:
    return secrets.randbelow(2**32) if seed is None or seed == -1 else seed


# --------------------------------------------------------------------------- checks


def _size(bad: Violations, field_name: str, value: Any, default: int) -> int:
    size = bad.integer(field_name, value, default, MIN_SIZE, MAX_SIZE)
    if isinstance(size, int) and size % 8:
        bad.add(field_name, f"must be a multiple of 8 (got {size})")
    return size


def _seed(bad: Violations, field_name: str, value: Any) -> int:
    seed = bad.integer(field_name, value, -1)
    if seed != -1 and not 0 <= seed <= MAX_SEED:
        bad.add(field_name, f"must be -1 (random) or between 0 and {MAX_SEED} (got {seed})")
        return 0
    return resolve_seed(seed)


def _check_work(bad: Violations, settings: Settings, factors: dict[str, int], formula: str | None = None) -> None:
    """Refuses a job whose work -- width x height x steps x images, a video's frames counting
    as images -- is over LORAMESH_MAX_JOB_WORK, naming each field that makes it up."""
    limit = settings.inference.max_job_work
    work = math.prod(factors.values())
    if work <= limit:
        return
    if formula is None:
        formula = " x ".join(name.rsplit(".", 1)[-1] for name in factors)
        formula += " = " + " x ".join(str(value) for value in factors.values())
    for name in factors:
        bad.add(name, f"the job's work ({formula} = {work:,}) is over this server's limit of {limit:,} "
                      f"(LORAMESH_MAX_JOB_WORK): make the images smaller or fewer, or use fewer steps")


def _image(raw: str, field_name: str, settings: Settings, violations: Violations) -> bytes | None:
    """An input image from an http(s) URL or base64 (raw or data URL), re-encoded as PNG."""
    try:
        if raw.startswith("http"):
            data = media.fetch_url(raw, field_name, settings.media)
        else:
            data = media.decode_base64(raw, field_name)
        image = media.decode_image(data, field_name, settings.media)
    except InvalidInput as exc:
        for name, description in exc.violations:
            violations.add(name, description)
        return None
    out = io.BytesIO()
    image.convert("RGBA" if image.mode in ("RGBA", "LA", "P") else "RGB").save(out, format="PNG")
    return out.getvalue()


def _refuse_unsupported(request: dict, unsupported: dict[str, Any], violations: Violations) -> None:
    """Fields this server cannot honour are refused when set to anything but their default
    (an empty list or string is the default too)."""
    for name, default in unsupported.items():
        value = request.get(name)
        if value is None or value in ([], "") or value == default:
            continue
        violations.add(name, f"is not supported by this server yet (leave it out or use {default!r})")


# --------------------------------------------------------------------------- async v1 API


def parse_v1(request: dict, settings: Settings) -> Submission:
    """POST /v1/inference."""
    bad = Violations()
    model_id = request.get("model") or ""
    model = catalog.CATALOG.get(model_id)
    if model is None:
        raise InvalidInput("model", f"unknown model {model_id!r}; use one of {', '.join(sorted(catalog.CATALOG))}")
    prompts = request.get("prompts") or []
    bad.require(bool(prompts), "prompts", "at least one prompt item is required")
    loras = [_v1_lora(item, f"loras[{i}]", model, settings, bad) for i, item in enumerate(request.get("loras") or [])]
    _one_lora_per_expert(loras, model, bad)
    trigger = request.get("trigger_word")
    images: dict[str, bytes] = {}
    entries = [_v1_prompt(item, i, model, trigger, settings, bad, images) for i, item in enumerate(prompts)]
    if not bad and len(entries) == 1:
        factors = {"prompts[0].width": entries[0].width, "prompts[0].height": entries[0].height,
                   "prompts[0].sample_steps": entries[0].steps}
        if model.is_video_model:
            factors["prompts[0].num_frames"] = entries[0].video_frames
        _check_work(bad, settings, factors)
    elif not bad:
        frames = " x num_frames" if model.is_video_model else ""
        _check_work(bad, settings, {"prompts": sum(e.width * e.height * e.steps * max(e.video_frames, 1)
                                                   for e in entries)},
                    f"width x height x sample_steps{frames} summed over its {len(entries)} prompts")
    bad.raise_if_any()
    params = {"model": model.id, "trigger_word": trigger, "prompts": [asdict(e) for e in entries],
              "loras": [{"path": lora.path, "network_multiplier": lora.scale,
                         **({"transformer": lora.transformer} if lora.transformer else {})} for lora in loras]}
    if model.is_video_model:
        job_type, output_format = TXT2VID, MP4
    else:
        job_type, output_format = IMG2IMG if model.requires_control_image else TXT2IMG, JPEG
    spec = JobSpec(type=job_type, api=V1_API, model=ModelRef(catalog=model.id), architecture=model.architecture,
                   images=entries, loras=loras, output_format=output_format, params=params)
    return Submission(spec, images, request.get("hf_token") or None)


def _v1_prompt(item: dict, index: int, model: catalog.CatalogModel, trigger: str | None, settings: Settings,
               bad: Violations, images: dict[str, bytes]) -> ImageSpec:
    prefix = f"prompts[{index}]."
    prompt = bad.text(prefix + "prompt", item.get("prompt"), required=True, max_length=MAX_PROMPT_CHARS)
    word = item.get("trigger_word") or trigger
    if word:
        prompt = prompt.replace("[trigger]", word)
    divisor = model.resolution_divisor
    # Sizes are checked as given, then rounded down to what the model can make.
    width = _size(bad, prefix + "width", item.get("width"), model.default_width) // divisor * divisor
    height = _size(bad, prefix + "height", item.get("height"), model.default_height) // divisor * divisor
    spec = ImageSpec(
        prompt=prompt, negative_prompt=bad.text(prefix + "neg", item.get("neg"), max_length=MAX_PROMPT_CHARS),
        width=width, height=height,
        steps=bad.integer(prefix + "sample_steps", item.get("sample_steps"), model.default_steps, 1, 150),
        guidance_scale=bad.number(prefix + "guidance_scale", item.get("guidance_scale"),
                                  model.default_guidance_scale, 0.0, 20.0),
        seed=_seed(bad, prefix + "seed", item.get("seed")), sampler=item.get("sampler") or None,
    )
    if model.is_video_model:
        _v1_video_fields(item, prefix, model, spec, bad)
        check_image(model.architecture, spec, bad, prefix, V1_NAMES)
        return spec
    ctrl = item.get("ctrl_img")
    if ctrl:
        data = _image(ctrl, prefix + "ctrl_img", settings, bad)
        if data is not None:
            spec.control = name = f"ctrl_{index}"
            images[name] = data
    elif model.requires_control_image:
        bad.add(prefix + "ctrl_img", f"is required by {model.id} (an http(s) URL or base64 image)")
    # Never silently ignored: what no model of the catalog takes yet.
    for name in ("num_frames", "fps"):
        if item.get(name) is not None:
            bad.add(prefix + name, f"applies only to video models; {model.id} makes images")
    for name in ("ctrl_img_1", "ctrl_img_2", "ctrl_img_3"):
        if item.get(name):
            bad.add(prefix + name, f"{model.id} takes at most one control image, ctrl_img")
    check_image(model.architecture, spec, bad, prefix, V1_NAMES)
    return spec


# The /v1 API's frame limit (its PromptItem.num_frames), within the video VAE's 4k+1 rule.
V1_MAX_FRAMES = 1000
# A two-expert model's LoRA sides: the expert each one applies to.
EXPERTS = {"high": "the high-noise expert, transformer", "low": "the low-noise expert, transformer_2"}


def _v1_video_fields(item: dict, prefix: str, model: catalog.CatalogModel, spec: ImageSpec, bad: Violations) -> None:
    """num_frames and fps of a video model's prompt item, into `spec`; the image-only fields refused."""
    frames = bad.integer(prefix + "num_frames", item.get("num_frames"), model.default_num_frames, 1, V1_MAX_FRAMES)
    _check_frames(bad, prefix + "num_frames", frames, V1_MAX_FRAMES, model.architecture)
    spec.video_frames = frames if isinstance(frames, int) else 1
    spec.fps = bad.integer(prefix + "fps", item.get("fps"), model.default_fps, 1, MAX_FPS)
    for name in ("ctrl_img", "ctrl_img_1", "ctrl_img_2", "ctrl_img_3"):
        if item.get(name):
            bad.add(prefix + name, f"{model.id} makes videos from text alone and takes no control image")


def _check_frames(bad: Violations, field_name: str, frames, most: int, architecture: str) -> None:
    """The video VAE packs 4 frames into each latent frame after the first: 4k+1 frames."""
    if isinstance(frames, int) and 1 <= frames <= most and (frames - 1) % 4:
        low = frames - (frames - 1) % 4
        bad.add(field_name, f"{architecture} makes 4k+1 frames (1, 5, 9, ..., 33, ...); use {low} or {low + 4}")


def _one_lora_per_expert(loras: list[LoraSpec], model: catalog.CatalogModel, bad: Violations) -> None:
    """A two-expert model takes one "low" and/or one "high" LoRA, as the document's MoE format says."""
    if not model.family.moe:
        return
    first: dict[str, int] = {}
    for index, lora in enumerate(loras):
        if lora.transformer in first:
            bad.add(f"loras[{index}].transformer", f'{model.id} takes one "{lora.transformer}" LoRA; '
                                                   f'loras[{first[lora.transformer]}] is already the one')
        elif lora.transformer:
            first[lora.transformer] = index


def _v1_lora(item: dict, label: str, model: catalog.CatalogModel, settings: Settings, bad: Violations) -> LoraSpec:
    raw = item.get("path") or ""
    scale = bad.number(f"{label}.network_multiplier", item.get("network_multiplier"), 1.0, -2.0, 2.0)
    side = item.get("transformer") or None
    sides = " or ".join(f'"{name}" ({what})' for name, what in EXPERTS.items())
    if side is not None and not model.family.moe:
        takers = ", ".join(m.id for m in catalog.CATALOG.values() if m.family.moe)
        bad.add(f"{label}.transformer", f"applies only to two-expert (MoE) video models ({takers}); {model.id} has "
                                        "one denoiser: leave it out")
        side = None
    elif model.family.moe and side not in EXPERTS:
        bad.add(f"{label}.transformer", f"{model.id} has two experts: each LoRA must say which one it was trained "
                                        f"for, {sides} (got {side!r})" if side else
                                        f"is required on {model.id}, which has two experts: {sides}")
        side = None
    if raw.startswith(("http://", "https://")):
        try:
            media.check_url(raw, f"{label}.path", settings.media)
        except InvalidInput as exc:
            bad.add(*exc.violations[0])
        if not media.extension(raw) == ".safetensors":
            bad.add(f"{label}.path", f"a LoRA URL must name a .safetensors file (got {raw!r})")
        return LoraSpec(path=raw, scale=scale, url=raw, transformer=side)
    base = settings.inference.workflows_base_path
    roots = (base, *settings.model_roots, *settings.media_roots)
    full = raw if Path(raw).is_absolute() else str(base / raw)
    path = media.resolve_into(bad, full, roots, f"{label}.path", "no such LoRA file", shown_as=raw)
    if path is not None and path.suffix != ".safetensors":
        bad.add(f"{label}.path", f"a LoRA must be a .safetensors file (got {media.shown(raw)})")
    return LoraSpec(path=str(path or raw), scale=scale, transformer=side)


# The v1 and generation-server names of the ImageSpec fields check_image reports.
V1_NAMES = {"steps": "sample_steps", "control": "ctrl_img"}
SERVER_NAMES = {"guidance_scale": "cfg_scale", "init": "init_image_base64", "mask": "mask_image_base64",
                "control": "ref_images"}


# --------------------------------------------------------------------------- generation-server API

# The fields of /txt2img and /img2img that parse_server reads.
HANDLED = frozenset({
    "prompt", "negative_prompt", "width", "height", "steps", "cfg_scale", "distilled_guidance", "eta", "seed",
    "sampler", "scheduler", "batch_count", "clip_skip", "strength", "init_image_base64", "mask_image_base64",
    "vae_tiling", "vae_tile_size_x", "vae_tile_size_y", "vae_tile_overlap",
    "slg_scale", "skip_layers", "slg_start", "slg_end",
    "control_image_base64", "control_strength", "easycache", "easycache_threshold", "easycache_start", "easycache_end",
    "upscale", "upscale_repeats", "upscale_auto_unload",
})
# Every other field: what this server cannot honour yet, with the default the document gives
# it. A request may send the default (the document's own examples do, e.g. upscale_repeats
# 1); any other value is refused naming the field, never silently ignored.
UNSUPPORTED = {
    "shifted_timestep": 0,
    "custom_sigmas": [], "ref_images": [], "auto_resize_ref_image": True, "increase_ref_index": False,
    "pm_id_images": [], "pm_id_embed_path": "",
    "pm_style_strength": 20.0,
    "img_cfg_scale": -1.0,
}


def parse_server(job_type: str, request: dict, loaded: LoadPlan | None, root: ModelsRoot,
                 settings: Settings, upscaler: upscaling.UpscalerPlan | None = None) -> Submission:
    """POST /txt2img and /img2img, on the model /models/load loaded (and the upscaler
    /upscaler/load loaded, for `upscale`)."""
    if loaded is None:
        raise InvalidInput("model", "No model loaded: load one with POST /models/load first")
    architecture = loaded.architecture
    if architectures.family(architecture).video:
        raise InvalidInput("model", f"{media.shown(loaded.model_name)} is a {architecture} video model, which makes "
                                    f"videos, not images: use POST /txt2vid, or load an image model")
    bad = Violations()
    given_prompt = bad.text("prompt", request.get("prompt"), required=True, max_length=MAX_PROMPT_CHARS)
    prompt, loras = _prompt_loras(given_prompt, root, bad)
    default_sampler, default_scheduler = architectures.family(architecture).default_sampler
    sampler = bad.choice("sampler", request.get("sampler"), samplers.SAMPLERS, default_sampler)
    scheduler = bad.choice("scheduler", request.get("scheduler"), samplers.SCHEDULERS, default_scheduler)
    params = {
        "prompt": given_prompt,
        "negative_prompt": bad.text("negative_prompt", request.get("negative_prompt"), max_length=MAX_PROMPT_CHARS),
        "width": _size(bad, "width", request.get("width"), 512),
        "height": _size(bad, "height", request.get("height"), 512),
        "steps": bad.integer("steps", request.get("steps"), 20, 1, 150),
        "cfg_scale": bad.number("cfg_scale", request.get("cfg_scale"), 7.0, 0.0, 30.0),
        "distilled_guidance": bad.number("distilled_guidance", request.get("distilled_guidance"), 3.5, 0.0, 30.0),
        "eta": bad.number("eta", request.get("eta"), 0.0, 0.0, 1.0),
        "seed": _seed(bad, "seed", request.get("seed")),
        "sampler": sampler,
        "scheduler": scheduler,
        "batch_count": bad.integer("batch_count", request.get("batch_count"), 1, 1, MAX_BATCH),
        "clip_skip": bad.integer("clip_skip", request.get("clip_skip"), -1, -1, 12),
    }
    _refuse_unsupported(request, UNSUPPORTED, bad)
    family = architectures.family(architecture)
    # Only Flux's guidance embedding takes a distilled guidance; only the UNet samplers add the
    # noise eta scales (flow-matching Euler steps are deterministic).
    for name, default, applies, why in (
            ("distilled_guidance", 3.5, family.guidance_embedding, "no distilled guidance (cfg_scale guides it)"),
            ("eta", 0.0, not family.flow, "no eta (its flow-matching sampler adds no noise)")):
        if not applies:
            bad.require(request.get(name) in (None, default), name,
                        f"{family.name} has {why}: leave it out or use {default}")
    slg = _skip_layer_guidance(request, job_type, loaded, params["cfg_scale"], bad)
    params.update(slg)
    vae_tiling = _vae_tiling(request, bad)
    easycache = _easycache(request, loaded, bad)
    upscale = upscaling.parse_generation_upscale(request, upscaler, params["width"], params["height"],
                                                 settings.media.max_image_pixels, bad)
    if upscale:
        params.update(upscale=True, upscale_repeats=upscale.repeats, upscale_auto_unload=upscale.auto_unload)
    images: dict[str, bytes] = {}
    if job_type == IMG2IMG:
        params["strength"] = bad.number("strength", request.get("strength"), 0.75, 0.0, 1.0)
        raw = request.get("init_image_base64") or ""
        if bad.require(bool(raw), "init_image_base64", "is required (a base64 JPEG or PNG)"):
            _server_image(raw, "init_image_base64", "init", settings, bad, images)
        if request.get("mask_image_base64"):
            _server_image(request["mask_image_base64"], "mask_image_base64", "mask", settings, bad, images)
    control_strength = _controlnet(request, loaded, settings, bad, images)
    if "controlnet" in images:
        params["control_strength"] = control_strength
        if job_type == IMG2IMG and family in (architectures.ZIMAGE, architectures.SD3, architectures.QWEN_IMAGE):
            # diffusers' Z-Image, SD3 and Qwen-Image ControlNet pipelines make images from noise only.
            bad.add("control_image_base64", f"{family.name} ControlNets steer text-to-image only; use /txt2img, "
                                            "or leave the control image out of image-to-image")
        if params.get("slg_scale", 0) > 0:
            # diffusers' SD3 ControlNet pipeline has no skip-layer guidance.
            bad.add("slg_scale", "skip-layer guidance does not run with a control image; leave slg_scale 0 or "
                                 "leave control_image_base64 out")
    if easycache:
        params.update(easycache=True, easycache_threshold=easycache[0], easycache_start=easycache[1],
                      easycache_end=easycache[2])
    entries = [
        ImageSpec(
            prompt=prompt, negative_prompt=params["negative_prompt"], width=params["width"], height=params["height"],
            steps=params["steps"], guidance_scale=server_guidance(architectures.family(architecture),
                                                                  params["cfg_scale"]),
            # sd.cpp makes the images of a batch with consecutive seeds.
            seed=(params["seed"] + i) % (MAX_SEED + 1), sampler=sampler, scheduler=scheduler,
            clip_skip=params["clip_skip"] if params["clip_skip"] > 0 else None,
            distilled_guidance=params["distilled_guidance"], eta=params["eta"],
            strength=params.get("strength", 0.75), init="init" if "init" in images else None,
            mask="mask" if "mask" in images else None, vae_tiling=vae_tiling, **slg,
            controlnet_image="controlnet" if "controlnet" in images else None,
            controlnet_strength=control_strength, easycache=easycache,
        )
        for i in range(params["batch_count"] if not bad else 1)
    ]
    if not bad:
        check_image(architecture, entries[0], bad, "", SERVER_NAMES)
    if not bad:
        _check_work(bad, settings, {"width": params["width"], "height": params["height"], "steps": params["steps"],
                                    "batch_count": params["batch_count"]})
    bad.raise_if_any()
    spec = JobSpec(type=job_type, api=SERVER_API, model=ModelRef(plan=loaded), architecture=architecture,
                   images=entries, loras=loras, output_format=PNG, params=params, upscale=upscale)
    return Submission(spec, images)


# The fields of /txt2vid that parse_txt2vid reads; every other one is refused unless at its
# documented default (image-to-video, control frames and VACE need models and pipelines this
# server does not run; two-expert models read MOE_HANDLED of them).
VIDEO_HANDLED = frozenset({
    "prompt", "negative_prompt", "width", "height", "video_frames", "fps", "steps", "cfg_scale", "seed", "sampler",
    "scheduler", "flow_shift", "clip_skip", "slg_scale", "skip_layers", "slg_start", "slg_end",
    "easycache", "easycache_threshold", "easycache_start", "easycache_end",
})
VIDEO_UNSUPPORTED = {
    "distilled_guidance": 3.5, "eta": 0.0, "init_image_base64": "", "end_image_base64": "", "strength": 0.75,
    "control_image_base64": "", "control_frames": [], "high_noise_steps": -1, "high_noise_cfg_scale": 7.0,
    "high_noise_sampler": "", "high_noise_distilled_guidance": 3.5, "high_noise_slg_scale": 0.0,
    "high_noise_skip_layers": [7, 8, 9], "high_noise_slg_start": 0.01, "high_noise_slg_end": 0.2,
    "moe_boundary": 0.875, "vace_strength": 1.0,
}
# The document's /txt2vid defaults beyond the family's generation defaults.
VIDEO_DEFAULTS = {"video_frames": 33, "fps": 16, "flow_shift": 3.0}
MAX_VIDEO_FRAMES = 257
MAX_FPS = 120


def parse_txt2vid(request: dict, loaded: LoadPlan | None, root: ModelsRoot, settings: Settings) -> Submission:
    """POST /txt2vid, on the video model /models/load loaded: one MP4 of video_frames frames."""
    if loaded is None:
        raise InvalidInput("model", "No model loaded: load a video model (Wan2.1, Wan2.2) with POST /models/load first")
    architecture = loaded.architecture
    family = architectures.family(architecture)
    if not family.video:
        takers = ", ".join(f.name for f in architectures.FAMILIES.values() if f.video)
        raise InvalidInput("model", f"{media.shown(loaded.model_name)} is a {architecture} image model; txt2vid "
                                    f"needs a video model ({takers}): load one with POST /models/load, or use "
                                    f"POST /txt2img")
    defaults = {**family.generation_defaults, **VIDEO_DEFAULTS}
    bad = Violations()
    given_prompt = bad.text("prompt", request.get("prompt"), required=True, max_length=MAX_PROMPT_CHARS)
    prompt, loras = _prompt_loras(given_prompt, root, bad)
    default_sampler, default_scheduler = family.default_sampler
    sampler = bad.choice("sampler", request.get("sampler"), samplers.SAMPLERS, default_sampler)
    scheduler = bad.choice("scheduler", request.get("scheduler"), samplers.SCHEDULERS, default_scheduler)
    frames = bad.integer("video_frames", request.get("video_frames"), int(defaults["video_frames"]), 1,
                         MAX_VIDEO_FRAMES)
    _check_frames(bad, "video_frames", frames, MAX_VIDEO_FRAMES, architecture)
    params = {
        "prompt": given_prompt,
        "negative_prompt": bad.text("negative_prompt", request.get("negative_prompt"), max_length=MAX_PROMPT_CHARS),
        "width": _size(bad, "width", request.get("width"), int(defaults["width"])),
        "height": _size(bad, "height", request.get("height"), int(defaults["height"])),
        "video_frames": frames,
        "fps": bad.integer("fps", request.get("fps"), int(defaults["fps"]), 1, MAX_FPS),
        "steps": bad.integer("steps", request.get("steps"), int(defaults["steps"]), 1, 150),
        "cfg_scale": bad.number("cfg_scale", request.get("cfg_scale"), defaults["cfg_scale"], 0.0, 30.0),
        "seed": _seed(bad, "seed", request.get("seed")),
        "sampler": sampler,
        "scheduler": scheduler,
        "flow_shift": bad.number("flow_shift", request.get("flow_shift"), defaults["flow_shift"], 0.01, 100.0),
        "clip_skip": bad.integer("clip_skip", request.get("clip_skip"), -1, -1, 12),
    }
    unsupported = dict(VIDEO_UNSUPPORTED)
    moe = {}
    if family.moe:
        moe = _moe_fields(request, sampler, bad)
        params.update(moe_boundary=moe["moe_boundary"], high_noise_cfg_scale=moe["high_noise_guidance_scale"])
        for name in MOE_HANDLED:
            unsupported.pop(name)
        # stable-diffusion.cpp applies a LoRA file's plain keys to the (low-noise) diffusion model.
        for lora in loras:
            lora.transformer = "low"
    _refuse_unsupported(request, unsupported, bad)
    slg = _skip_layer_guidance(request, TXT2VID, loaded, params["cfg_scale"], bad)
    easycache = _easycache(request, loaded, bad)
    if easycache:
        params.update(easycache=True, easycache_threshold=easycache[0], easycache_start=easycache[1],
                      easycache_end=easycache[2])
    spec = ImageSpec(
        prompt=prompt, negative_prompt=params["negative_prompt"], width=params["width"], height=params["height"],
        steps=params["steps"], guidance_scale=params["cfg_scale"], seed=params["seed"], sampler=sampler,
        scheduler=scheduler, clip_skip=params["clip_skip"] if params["clip_skip"] > 0 else None, **slg,
        easycache=easycache, video_frames=frames, fps=params["fps"], flow_shift=params["flow_shift"], **moe,
    )
    if not bad:
        check_image(architecture, spec, bad, "", SERVER_NAMES)
    if not bad and samplers.resolve(architecture, sampler, scheduler).sigmas is not None:
        # diffusers' video pipeline takes a step count only, not a list of noise levels.
        takes = ", ".join(name for (solver, name), how in samplers.supported(architecture).items()
                          if solver == sampler and how.sigmas is None)
        bad.add("scheduler", f"{scheduler!r} is not available for {architecture} videos; use one of {takes}")
    if not bad:
        _check_work(bad, settings, {"width": params["width"], "height": params["height"], "steps": params["steps"],
                                    "video_frames": frames})
    bad.raise_if_any()
    spec_job = JobSpec(type=TXT2VID, api=SERVER_API, model=ModelRef(plan=loaded), architecture=architecture,
                       images=[spec], loras=loras, output_format=MP4, params=params)
    return Submission(spec_job)


# The /txt2vid fields two-expert models (Wan 2.2) honour: where the low-noise expert takes over
# (diffusers' boundary_ratio), the high-noise expert's guidance, and its sampler when it is the
# main one (diffusers runs one scheduler through both experts). The other high_noise_* fields
# stay refused: diffusers' WanPipeline has no per-expert step count, distilled guidance or SLG.
MOE_HANDLED = ("moe_boundary", "high_noise_cfg_scale", "high_noise_sampler")


def _moe_fields(request: dict, sampler: str, bad: Violations) -> dict:
    """moe_boundary and high_noise_cfg_scale as ImageSpec fields; high_noise_sampler checked."""
    boundary = bad.number("moe_boundary", request.get("moe_boundary"), VIDEO_UNSUPPORTED["moe_boundary"], 0.0, 1.0)
    guidance = bad.number("high_noise_cfg_scale", request.get("high_noise_cfg_scale"),
                          VIDEO_UNSUPPORTED["high_noise_cfg_scale"], 0.0, 30.0)
    high_sampler = request.get("high_noise_sampler") or ""
    if high_sampler not in ("", sampler):
        bad.add("high_noise_sampler", f"both experts sample with one scheduler here: leave it \"\" or give the "
                                      f"main sampler ({sampler!r})")
    return {"moe_boundary": boundary, "high_noise_guidance_scale": guidance}


def _skip_layer_guidance(request: dict, job_type: str, loaded: LoadPlan, cfg_scale: float | None,
                         bad: Violations) -> dict:
    """slg_scale, skip_layers, slg_start and slg_end, honoured for text-to-image on families with
    skip-layer guidance (diffusers' SD3 pipeline); other families take only the defaults."""
    family = architectures.family(loaded.architecture)
    if not family.skip_layer_guidance:
        takers = ", ".join(f.name for f in architectures.FAMILIES.values() if f.skip_layer_guidance)
        for name, default in SLG_DEFAULTS.items():
            value = request.get(name)
            if value is not None and value not in ([], default):
                bad.add(name, f"skip-layer guidance applies to {takers} models only; {family.name} takes the "
                              f"default ({default!r}) or none")
        return dict(SLG_DEFAULTS)
    slg = {
        "slg_scale": bad.number("slg_scale", request.get("slg_scale"), 0.0, 0.0, 30.0),
        "skip_layers": request.get("skip_layers") or list(SLG_DEFAULTS["skip_layers"]),
        "slg_start": bad.number("slg_start", request.get("slg_start"), 0.01, 0.0, 1.0),
        "slg_end": bad.number("slg_end", request.get("slg_end"), 0.2, 0.0, 1.0),
    }
    layers = slg["skip_layers"]
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        bad.add("skip_layers", "must be a list of integers: transformer layer indices")
        slg["skip_layers"] = list(SLG_DEFAULTS["skip_layers"])
    elif slg["slg_scale"] > 0:
        count = model_loading.sd3_layer_count(loaded.paths["model"])
        outside = [str(i) for i in layers if not 0 <= i < count]
        if outside:
            shown = ", ".join(outside[:5]) + (", ..." if len(outside) > 5 else "")
            bad.add("skip_layers", f"{shown}: not a layer of {loaded.model_name}, whose transformer has layers "
                                   f"0 to {count - 1}")
    if slg["slg_scale"] <= 0:
        return slg
    if job_type == IMG2IMG:
        bad.add("slg_scale", f"skip-layer guidance works in txt2img only ({family.name} image-to-image has "
                             "none); leave it 0")
    if cfg_scale is not None and cfg_scale <= 1.0:
        bad.add("slg_scale", f"skip-layer guidance acts with classifier-free guidance, which cfg_scale {cfg_scale:g} "
                             "turns off: raise cfg_scale above 1 or leave slg_scale 0")
    if slg["slg_start"] >= slg["slg_end"]:
        bad.add("slg_end", f"must be greater than slg_start ({slg['slg_start']:g})")
    return slg


def _controlnet(request: dict, loaded: LoadPlan, settings: Settings, bad: Violations,
                images: dict[str, bytes]) -> float:
    """control_image_base64 (kept as the "controlnet" input image) and control_strength, for
    the ControlNet /models/load loaded with the model; the strength is returned."""
    strength = bad.number("control_strength", request.get("control_strength"), 0.9, 0.0, 1.0)
    raw = request.get("control_image_base64") or ""
    if not raw:
        bad.require(strength == 0.9, "control_strength",
                    "applies with control_image_base64 only; leave it out or use 0.9")
        return 0.9
    if not loaded.components.get("controlnet"):
        takers = ", ".join(f.name for f in architectures.FAMILIES.values() if "controlnet" in f.components)
        bad.add("control_image_base64", f"needs a ControlNet loaded with the model ({loaded.model_name} was "
                                        f"loaded without one): load it with POST /models/load's controlnet "
                                        f"({takers} models)")
        return 0.9
    _server_image(raw, "control_image_base64", "controlnet", settings, bad, images)
    return strength


# sd.cpp's EasyCache defaults: threshold, start, end.
EASYCACHE_DEFAULTS = {"easycache_threshold": 0.2, "easycache_start": 0.15, "easycache_end": 0.95}


def _easycache(request: dict, loaded: LoadPlan, bad: Violations) -> list[float] | None:
    """[threshold, start, end] when the request turns EasyCache on (diffusers' first-block cache
    on a transformer, step_cache.py), else None; its settings without it take their defaults."""
    values = [bad.number(name, request.get(name), default, 0.0, 1.0 if name != "easycache_threshold" else 10.0)
              for name, default in EASYCACHE_DEFAULTS.items()]
    if not request.get("easycache"):
        for name, default in EASYCACHE_DEFAULTS.items():
            bad.require(request.get(name) in (None, default), name,
                        f"applies with easycache true only; leave it out or use {default}")
        return None
    family = architectures.family(loaded.architecture)
    if not family.block_cache:
        takers = ", ".join(f.name for f in architectures.FAMILIES.values() if f.block_cache)
        why = ("is a UNet model" if not family.flow else
               "switches between two experts, which a cache of one transformer does not follow" if family.moe else
               "has blocks diffusers' first-block cache cannot skip (its last block drops the text stream)")
        bad.add("easycache", f"EasyCache skips transformer blocks; {family.name} {why}. It applies to "
                             f"{takers} models; leave it false")
        for name, default in EASYCACHE_DEFAULTS.items():
            bad.require(request.get(name) in (None, default), name, f"{family.name} takes no EasyCache; leave it "
                                                                    f"out or use {default}")
        return None
    threshold, start, end = values
    bad.require(start < end, "easycache_end", f"must be greater than easycache_start ({start:g})")
    return [threshold, start, end]


def _vae_tiling(request: dict, bad: Violations) -> list[float] | None:
    """[tile width, tile height, overlap] when the request asks for VAE tiling (diffusers'
    tiled decode, tiles of the given pixel size; 0 = the VAE's own), else None."""
    size_x = bad.integer("vae_tile_size_x", request.get("vae_tile_size_x"), 0, 0, 4096)
    size_y = bad.integer("vae_tile_size_y", request.get("vae_tile_size_y"), 0, 0, 4096)
    overlap = bad.number("vae_tile_overlap", request.get("vae_tile_overlap"), 0.5, 0.0, 0.99)
    for name, size in (("vae_tile_size_x", size_x), ("vae_tile_size_y", size_y)):
        bad.require(size is None or size % 8 == 0, name, f"must be 0 (auto) or a multiple of 8 pixels (got {size})")
    if not request.get("vae_tiling"):
        return None
    return [size_x or 0, size_y or 0, overlap if overlap is not None else 0.5]


def _server_image(raw: str, field_name: str, name: str, settings: Settings, violations: Violations,
                  images: dict[str, bytes]) -> None:
    if raw.startswith("http"):
        violations.add(field_name, "must be base64 (raw or a data URL), not a URL")
        return
    data = _image(raw, field_name, settings, violations)
    if data is not None:
        images[name] = data


def _prompt_loras(prompt: str, root: ModelsRoot, violations: Violations) -> tuple[str, list[LoraSpec]]:
    """Takes the <lora:name:weight> tags out of a prompt and resolves them in loras/."""
    loras = []
    for match in LORA_TAG.finditer(prompt):
        name, weight = match.group(1).strip(), (match.group(2) or "1.0").strip()
        try:
            scale = float(weight)
        except ValueError:
            violations.add("prompt", f"<lora:{name}:{weight}>: the weight must be a number")
            continue
        try:
            path = root.lora_path(name)
        except (NotFound, InvalidInput) as exc:
            violations.add("prompt", f"<lora:{name}:{weight}>: {exc}")
            continue
        loras.append(LoraSpec(path=str(path), scale=scale))
    return " ".join(LORA_TAG.sub(" ", prompt).split()), loras


def parse_convert(request: dict, root: ModelsRoot) -> Submission:
    """POST /convert: the checked conversion; `params` shows the request with the output path
    it got."""
    plan = conversion.plan_conversion(root.root, request)
    params = {"input_path": request["input_path"], "output_type": plan.output_type, "output_path": plan.output_name}
    for name in ("vae_path", "tensor_type_rules"):
        if request.get(name):
            params[name] = request[name]
    spec = JobSpec(type=CONVERT, api=SERVER_API, model=ModelRef(), architecture=plan.architecture, images=[],
                   params=params, conversion=plan)
    return Submission(spec)
