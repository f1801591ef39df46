"""Turns the requests of both APIs into jobs: every field checked (all bad fields
reported at once), defaults filled, seeds resolved, LoRAs resolved to files, input
images decoded. A request that fails here queues nothing.

A job's `spec` is what the worker runs: one entry per output image, the LoRAs, and the
output format. Its `params` is what GET /queue/{id} shows: the request with the seed used.
"""

from __future__ import annotations

import io
import re
import secrets
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image

from services.common import media
from services.common.errors import InvalidInput, NotFound, Violations
from services.common.settings import Settings
from services.inference import catalog, samplers
from services.inference.generation import ImageRequest, check_request
from services.inference.jobs import JobRecord
from services.inference.model_files import ModelsRoot

MAX_SEED = 2**63 - 1
MIN_SIZE, MAX_SIZE = 64, 4096
MAX_BATCH = 16
LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")


@dataclass
class Submission:
    record: JobRecord
    # Input images by name, kept in the object store until the job ends (PNG bytes).
    images: dict[str, bytes] = field(default_factory=dict)
    hf_token: str | None = None


def new_job_id() -> str:
    return str(uuid.uuid4())


def resolve_seed(seed: int | None) -> int:
    return secrets.randbelow(2**32) if seed is None or seed == -1 else seed


# --------------------------------------------------------------------------- checks


def _int(request: dict, name: str, default: int, low: int, high: int, violations: Violations,
         label: str | None = None) -> int:
    value = request.get(name)
    if value is None:
        return default
    try:
        value = int(value)  # 64-bit integers arrive as strings from proto JSON
    except (TypeError, ValueError):
        violations.add(label or name, f"must be an integer (got {value!r})")
        return default
    if not low <= value <= high:
        violations.add(label or name, f"must be between {low} and {high} (got {value})")
    return value


def _float(request: dict, name: str, default: float, low: float, high: float, violations: Violations,
           label: str | None = None) -> float:
    value = request.get(name)
    if value is None:
        return default
    value = float(value)
    if not low <= value <= high:
        violations.add(label or name, f"must be between {low:g} and {high:g} (got {value:g})")
    return value


def _size(request: dict, name: str, default: int, violations: Violations, label: str | None = None) -> int:
    value = _int(request, name, default, MIN_SIZE, MAX_SIZE, violations, label)
    if value % 8:
        violations.add(label or name, f"must be a multiple of 8 (got {value})")
    return value


def _seed(request: dict, name: str, violations: Violations, label: str | None = None) -> int:
    value = request.get(name)
    if value is not None and int(value) != -1 and not 0 <= int(value) <= MAX_SEED:
        violations.add(label or name, f"must be -1 (random) or between 0 and {MAX_SEED} (got {value})")
        return 0
    return resolve_seed(None if value is None else int(value))


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
    """Fields this server cannot honour are refused when set to anything but their default."""
    for name, default in unsupported.items():
        value = request.get(name)
        if value in (None, default, [], ""):
            continue
        violations.add(name, f"is not supported by this server (leave it out or use {default!r})")


# --------------------------------------------------------------------------- async v1 API


def parse_v1(request: dict, settings: Settings) -> Submission:
    """POST /v1/inference."""
    violations = Violations()
    model_id = request.get("model") or ""
    model = catalog.CATALOG.get(model_id)
    if model is None:
        raise InvalidInput("model", f"unknown model {model_id!r}; use one of {', '.join(sorted(catalog.CATALOG))}")
    prompts = request.get("prompts") or []
    if not prompts:
        violations.add("prompts", "at least one prompt item is required")
    loras = [_v1_lora(item, f"loras[{i}]", settings, violations) for i, item in enumerate(request.get("loras") or [])]
    trigger = request.get("trigger_word")
    images: dict[str, bytes] = {}
    entries = []
    for i, item in enumerate(prompts):
        entries.append(_v1_prompt(item, i, model, trigger, settings, violations, images))
    violations.raise_if_any()
    job_type = "img2img" if model.requires_control_image else "txt2img"
    params = {"model": model.id, "trigger_word": trigger, "prompts": [dict(e) for e in entries],
              "loras": [{"path": lora["path"], "network_multiplier": lora["scale"]} for lora in loras]}
    record = JobRecord(
        job_id=new_job_id(), type=job_type, api="v1", model={"catalog": model.id}, architecture=model.architecture,
        params=params, spec={"images": entries, "loras": loras, "output_format": "jpeg"},
    )
    return Submission(record, images, request.get("hf_token") or None)


def _v1_prompt(item: dict, index: int, model: catalog.CatalogModel, trigger: str | None, settings: Settings,
               violations: Violations, images: dict[str, bytes]) -> dict:
    prefix = f"prompts[{index}]."
    prompt = item.get("prompt") or ""
    if not prompt.strip():
        violations.add(prefix + "prompt", "is required")
    word = item.get("trigger_word") or trigger
    if word:
        prompt = prompt.replace("[trigger]", word)
    divisor = model.resolution_divisor
    # Sizes are checked as given, then rounded down to what the model can make.
    width = _size(item, "width", model.default_width, violations, prefix + "width") // divisor * divisor
    height = _size(item, "height", model.default_height, violations, prefix + "height") // divisor * divisor
    entry = {
        "prompt": prompt,
        "negative_prompt": item.get("neg") or "",
        "width": width,
        "height": height,
        "steps": _int(item, "sample_steps", model.default_steps, 1, 150, violations, prefix + "sample_steps"),
        "guidance_scale": _float(item, "guidance_scale", model.default_guidance_scale, 0.0, 20.0, violations,
                                 prefix + "guidance_scale"),
        "seed": _seed(item, "seed", violations, prefix + "seed"),
        "sampler": item.get("sampler") or None,
        "scheduler": None,
        "control": None,
    }
    ctrl = item.get("ctrl_img")
    if ctrl:
        data = _image(ctrl, prefix + "ctrl_img", settings, violations)
        if data is not None:
            entry["control"] = name = f"ctrl_{index}"
            images[name] = data
    elif model.requires_control_image:
        violations.add(prefix + "ctrl_img", f"is required by {model.id} (an http(s) URL or base64 image)")
    _check_architecture(model.architecture, entry, violations, prefix, V1_NAMES)
    return entry


def _v1_lora(item: dict, label: str, settings: Settings, violations: Violations) -> dict:
    raw = item.get("path") or ""
    scale = _float(item, "network_multiplier", 1.0, -2.0, 2.0, violations, f"{label}.network_multiplier")
    if item.get("transformer"):
        violations.add(f"{label}.transformer", "applies only to MoE video models, which this server does not offer")
    if raw.startswith(("http://", "https://")):
        try:
            media.check_url(raw, f"{label}.path", settings.media)
        except InvalidInput as exc:
            violations.add(*exc.violations[0])
        if not media.extension(raw) == ".safetensors":
            violations.add(f"{label}.path", f"a LoRA URL must name a .safetensors file (got {raw!r})")
        return {"url": raw, "path": raw, "scale": scale}
    base = settings.inference.workflows_base_path
    roots = (base, *settings.model_roots, *settings.media_roots)
    full = raw if Path(raw).is_absolute() else str(base / raw)
    path = media.resolve_into(violations, full, roots, f"{label}.path", "no such LoRA file")
    if path is not None and path.suffix != ".safetensors":
        violations.add(f"{label}.path", f"a LoRA must be a .safetensors file (got {raw!r})")
    return {"path": str(path or raw), "scale": scale}


def _check_architecture(architecture: str, entry: dict, violations: Violations, prefix: str,
                        names: dict[str, str]) -> None:
    """Architecture-dependent checks (sampler pairs, divisors, image inputs) before anything
    is queued, reported under the request's own field names."""
    present = PIL.Image.new("RGB", (1, 1))  # stands for an input image the request has
    request = ImageRequest(
        prompt=entry["prompt"], width=entry["width"], height=entry["height"], steps=entry["steps"],
        guidance_scale=entry["guidance_scale"], seed=entry["seed"], sampler=entry.get("sampler"),
        scheduler=entry.get("scheduler"), clip_skip=entry.get("clip_skip"), strength=entry.get("strength", 0.75),
        init_image=present if entry.get("init") else None, mask_image=present if entry.get("mask") else None,
        control_image=present if entry.get("control") else None,
    )
    found = Violations()
    check_request(architecture, request, found, "")
    for name, description in found.items:
        violations.add(prefix + names.get(name, name), description)


# The v1 and generation-server names of the ImageRequest fields check_request reports.
V1_NAMES = {"steps": "sample_steps", "control_image": "ctrl_img", "model": "model"}
SERVER_NAMES = {"guidance_scale": "cfg_scale", "init_image": "init_image_base64", "mask_image": "mask_image_base64",
                "control_image": "ref_images"}


# --------------------------------------------------------------------------- generation-server API

# Fields of /txt2img and /img2img a diffusers pipeline cannot honour here, with their defaults.
UNSUPPORTED = {
    "shifted_timestep": 0, "slg_scale": 0.0, "skip_layers": [], "custom_sigmas": [], "ref_images": [],
    "increase_ref_index": False, "control_image_base64": "", "easycache": False, "pm_id_images": [],
    "pm_id_embed_path": "", "upscale": False, "img_cfg_scale": -1.0,
}


def parse_server(job_type: str, request: dict, loaded: dict | None, root: ModelsRoot, settings: Settings) -> Submission:
    """POST /txt2img and /img2img. `loaded` is the LoadPlan JSON of the loaded model."""
    if loaded is None:
        raise InvalidInput("model", "No model loaded: load one with POST /models/load first")
    architecture = loaded["architecture"]
    violations = Violations()
    prompt = request.get("prompt") or ""
    if not prompt.strip():
        violations.add("prompt", "is required")
    prompt, loras = _prompt_loras(prompt, root, violations)
    default_sampler, default_scheduler = samplers.default_sampler(architecture)
    sampler = request.get("sampler") or default_sampler
    scheduler = request.get("scheduler") or default_scheduler
    for name, value, allowed in (("sampler", sampler, samplers.SAMPLERS), ("scheduler", scheduler, samplers.SCHEDULERS)):
        if value not in allowed:
            violations.add(name, f"unknown {name} {value!r}; use one of {', '.join(allowed)}")
    params = {
        "prompt": request.get("prompt") or "",
        "negative_prompt": request.get("negative_prompt") or "",
        "width": _size(request, "width", 512, violations),
        "height": _size(request, "height", 512, violations),
        "steps": _int(request, "steps", 20, 1, 150, violations),
        "cfg_scale": _float(request, "cfg_scale", 7.0, 0.0, 30.0, violations),
        "distilled_guidance": _float(request, "distilled_guidance", 3.5, 0.0, 30.0, violations),
        "eta": _float(request, "eta", 0.0, 0.0, 1.0, violations),
        "seed": _seed(request, "seed", violations),
        "sampler": sampler,
        "scheduler": scheduler,
        "batch_count": _int(request, "batch_count", 1, 1, MAX_BATCH, violations),
        "clip_skip": _int(request, "clip_skip", -1, -1, 12, violations),
    }
    _refuse_unsupported(request, UNSUPPORTED, violations)
    images: dict[str, bytes] = {}
    if job_type == "img2img":
        params["strength"] = _float(request, "strength", 0.75, 0.0, 1.0, violations)
        raw = request.get("init_image_base64") or ""
        if not raw:
            violations.add("init_image_base64", "is required (a base64 JPEG or PNG)")
        else:
            _server_image(raw, "init_image_base64", "init", settings, violations, images)
        if request.get("mask_image_base64"):
            _server_image(request["mask_image_base64"], "mask_image_base64", "mask", settings, violations, images)
    entries = []
    for i in range(params["batch_count"]):
        entry = {
            "prompt": prompt, "negative_prompt": params["negative_prompt"], "width": params["width"],
            "height": params["height"], "steps": params["steps"], "guidance_scale": params["cfg_scale"],
            # sd.cpp makes the images of a batch with consecutive seeds.
            "seed": (params["seed"] + i) % (MAX_SEED + 1), "sampler": sampler, "scheduler": scheduler,
            "clip_skip": params["clip_skip"] if params["clip_skip"] > 0 else None,
            "distilled_guidance": params["distilled_guidance"], "eta": params["eta"],
            "strength": params.get("strength", 0.75), "init": "init" if "init" in images else None,
            "mask": "mask" if "mask" in images else None,
        }
        entries.append(entry)
    if not violations and entries:
        _check_architecture(architecture, entries[0], violations, "", SERVER_NAMES)
    violations.raise_if_any()
    record = JobRecord(
        job_id=new_job_id(), type=job_type, api="server", model={"plan": loaded}, architecture=architecture,
        params=params, spec={"images": entries, "loras": loras, "output_format": "png"},
    )
    return Submission(record, images)


def _server_image(raw: str, field_name: str, name: str, settings: Settings, violations: Violations,
                  images: dict[str, bytes]) -> None:
    if raw.startswith("http"):
        violations.add(field_name, "must be base64 (raw or a data URL), not a URL")
        return
    data = _image(raw, field_name, settings, violations)
    if data is not None:
        images[name] = data


def _prompt_loras(prompt: str, root: ModelsRoot, violations: Violations) -> tuple[str, list[dict]]:
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
        loras.append({"name": name, "path": str(path), "scale": scale})
    return " ".join(LORA_TAG.sub(" ", prompt).split()), loras
