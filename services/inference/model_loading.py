"""POST /models/load: a request naming files of the models root becomes a validated LoadPlan
(cheap, before anything loads, so a bad request changes nothing), and a plan becomes a
diffusers pipeline.

Single-file checkpoints (SD1.5, SDXL) load with diffusers' from_single_file; diffusion
models (Flux in Black Forest Labs' layout, Z-Image) load their transformer from the file and
the text encoders and VAE from the named component files. SD3/SD3.5 checkpoints hold the
transformer and the VAE, the text encoders come as component files (city96's SD3 GGUF files, the
transformer alone, load as diffusion models). A quantized options.weight_type quantizes a
GGUF-loadable transformer as it loads (_transformer_checkpoint). An SD1.5/SDXL checkpoint may
bring a ControlNet single file, built on the loaded UNet's config. What the files do not hold
(component configs, tokenizers, scheduler, components not named) comes from a diffusers
folder: LORAMESH_<ARCH>_CONFIG (a local folder) or the architecture's Hugging Face id.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from services.common import architectures
from services.common.architectures import COMPONENT_FIELDS, ModelFamily
from services.common.errors import FailedPrecondition, InvalidInput, NotFound, Violations
from services.common.settings import ModelSources
from services.inference import gguf_files, previews
from services.inference.model_files import MODEL_TYPES, ModelsRoot

# Request fields that name files but have nowhere to go in a diffusers pipeline here.
_UNSUPPORTED_FIELDS = {
    "clip_vision": "IP-Adapter image encoders are not supported",
    "photo_maker": "PhotoMaker is not supported",
    "llm_vision": "no supported architecture takes an LLM vision encoder",
}
# Two-expert video models (Wan 2.2 A14B): the high-noise expert's file, beside model_name's low-noise one.
HIGH_NOISE = "high_noise_diffusion_model"
# A tiny autoencoder for live previews (previews.py), from the taesd folder.
TAESD = previews.TAE_TYPE
_REQUEST_FIELDS = {"model_name", "model_type", "options", HIGH_NOISE, TAESD, *COMPONENT_FIELDS, *_UNSUPPORTED_FIELDS}


def _header_keys(path: Path) -> list[str]:
    if gguf_files.is_gguf(path):
        return gguf_files.inspect(path).tensor_names
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def detect_architecture(path: Path) -> str:
    """"SD1.5", "SDXL", "Flux", "Z-Image", "SD3", "Wan2.1" or "Qwen-Image", from the tensor names
    in a .safetensors or GGUF header (nothing is loaded). InvalidInput("model_name", ...) for
    anything else."""
    path = Path(path)
    if path.suffix.lower() not in (".safetensors", ".sft", ".gguf"):
        raise InvalidInput("model_name", f"{path.name}: only .safetensors and .gguf models load here (pickled "
                                         ".ckpt/.pt files are not supported)")
    try:
        keys = _header_keys(path)
    except InvalidInput:
        raise
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise InvalidInput("model_name", f"{path.name} is not a readable safetensors file: {exc}") from None
    names = {k.removeprefix("model.diffusion_model.") for k in keys}

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in names)

    if has("conditioner.embedders.1."):
        return architectures.SDXL.name
    if has("cond_stage_model.transformer.") and has("input_blocks."):
        return architectures.SD15.name
    if has("double_blocks.0.") and has("single_blocks.0."):
        return architectures.FLUX.name
    if "layers.0.adaLN_modulation.0.weight" in names and has("cap_embedder."):
        return architectures.ZIMAGE.name
    if has("joint_blocks.0.") and has("x_embedder.") and has("context_embedder."):
        return architectures.SD3.name
    if has("blocks.0.self_attn.q.") and has("patch_embedding.") and has("text_embedding."):
        # Wan's own layout; image-to-video (img_emb) and VACE (vace_blocks) variants need inputs
        # /txt2vid does not take.
        if has("img_emb.") or has("vace_blocks."):
            raise InvalidInput("model_name", f"{path.name} is a Wan image-to-video or VACE model; only Wan 2.1 "
                                             "text-to-video models load here")
        return architectures.WAN21.name
    if "transformer_blocks.0.img_mod.1.weight" in names and "txt_norm.weight" in names and has("img_in.") \
            and has("txt_in."):
        # Qwen-Image's MMDiT under diffusers-style names, as Comfy-Org and city96 release it.
        return architectures.QWEN_IMAGE.name
    kinds = ("SD1.5, SDXL or SD3/SD3.5 checkpoints, Flux (Black Forest Labs layout), Z-Image, Qwen-Image or "
             "Wan 2.1 text-to-video diffusion models")
    if has("cond_stage_model.model."):
        raise InvalidInput("model_name", f"unrecognised architecture in {path.name} (SD2-style open_clip "
                                         f"checkpoint); supported: {kinds}")
    raise InvalidInput("model_name", f"unrecognised architecture in {path.name}; supported: {kinds}")


# --------------------------------------------------------------------------- options

# name -> default, the seed's documented defaults but one: keep_clip_on_cpu is off unless
# asked for, because a T5 or Qwen text encoder on the CPU costs seconds per prompt under
# diffusers. flow_shift None = detected from the model.
OPTION_DEFAULTS: dict = {
    "n_threads": -1, "keep_clip_on_cpu": False, "keep_vae_on_cpu": False, "keep_controlnet_on_cpu": False,
    "vae_conv_direct": False, "diffusion_conv_direct": False, "flash_attn": True, "offload_to_cpu": False,
    "enable_mmap": True, "vae_decode_only": True, "tae_preview_only": False, "free_params_immediately": False,
    "flow_shift": None, "weight_type": "", "tensor_type_rules": "", "rng_type": "cuda", "sampler_rng_type": "",
    "prediction": "", "lora_apply_mode": "auto", "vae_tiling": False, "vae_tile_size_x": 0, "vae_tile_size_y": 0,
    "vae_tile_overlap": 0.5, "chroma_use_dit_mask": True, "chroma_use_t5_mask": False, "chroma_t5_mask_pad": 1,
}
# GET /options lists these (id, name, bits): the GGUF tensor types that work end to end here,
# those diffusers' GGUF kernels dequantize and the gguf package writes (it cannot write
# K-quants, though K-quant files load). weight_type takes them all: the float ones pick the
# dtype, the quantized ones quantize a GGUF-loadable transformer on load.
QUANTIZATION_TYPES = (
    ("f32", "F32 (32-bit float)", 32), ("f16", "F16 (16-bit float)", 16), ("bf16", "BF16 (Brain float 16)", 16),
    ("q8_0", "Q8_0 (8-bit)", 8), ("q5_0", "Q5_0 (5-bit)", 5), ("q5_1", "Q5_1 (5-bit)", 5), ("q4_0", "Q4_0 (4-bit)", 4),
    ("q4_1", "Q4_1 (4-bit)", 4),
)
_WEIGHT_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
WEIGHT_TYPES = ("", *(t for t, _, _ in QUANTIZATION_TYPES))
_QUANTIZED_WEIGHT_TYPES = tuple(t for t in WEIGHT_TYPES if t and t not in _WEIGHT_DTYPES)
# Quantized GGML types files may carry but gguf cannot write, so no load quantizes to them:
# the K-quants, i-quants and ternary types.
_GGML_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_k", "iq4_nl", "iq4_xs", "tq1_0", "tq2_0")
_PREDICTIONS = ("", "eps", "v", "edm_v", "sd3_flow", "flux_flow", "flux2_flow")


def _quoted(values) -> str:
    return ", ".join(f'"{v}"' for v in values)


def _parse_options(raw, violations: Violations) -> dict:
    """Types and architecture-independent limits; the result has every option, defaults filled."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        violations.add("options", "must be an object")
        return dict(OPTION_DEFAULTS)
    options = dict(OPTION_DEFAULTS)
    for name, value in raw.items():
        where = f"options.{name}"
        if name not in OPTION_DEFAULTS:
            violations.add(where, f"unknown option; known: {', '.join(OPTION_DEFAULTS)}")
            continue
        if value is None:
            continue
        default = OPTION_DEFAULTS[name]
        if name == "flow_shift":
            if isinstance(value, str) and value.lower() in ("infinity", "inf"):
                continue  # INFINITY = detect from the model
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                violations.add(where, "must be a number (absent, 0 or Infinity = detected from the model)")
                continue
            if value < 0:
                violations.add(where, "must be positive (absent, 0 or Infinity = detected from the model)")
                continue
            options[name] = None if value == 0 or math.isinf(value) else float(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                violations.add(where, "must be true or false")
                continue
            options[name] = value
        elif isinstance(default, int):
            if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
                violations.add(where, "must be an integer")
                continue
            options[name] = int(value)
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                violations.add(where, "must be a number")
                continue
            options[name] = float(value)
        else:
            if not isinstance(value, str):
                violations.add(where, "must be a string")
                continue
            options[name] = value

    weight_type = options["weight_type"].lower()
    if weight_type in _GGML_TYPES:
        violations.add("options.weight_type", f"{options['weight_type']!r} cannot be quantized to on load (the "
                                              "gguf package writes no K-quants or i-quants; load a .gguf file "
                                              f"quantized to it instead); use one of {_quoted(WEIGHT_TYPES)} "
                                              '("" = the server default)')
    elif weight_type not in WEIGHT_TYPES:
        violations.add("options.weight_type", f"must be one of {_quoted(WEIGHT_TYPES)}")
    else:
        options["weight_type"] = weight_type
    if options["tensor_type_rules"]:
        from services.inference.conversion import parse_rules  # conversion builds on this module

        rules = Violations()
        parse_rules(options["tensor_type_rules"], rules)
        for _, description in rules.items:
            violations.add("options.tensor_type_rules", description)
    for name, allowed in (("rng_type", ("cuda", "cpu")), ("sampler_rng_type", ("", "cuda", "cpu"))):
        if options[name] == "std_default":
            violations.add(f"options.{name}", f'"std_default" (the C++ std::mt19937 noise) is not available; '
                                              f"use {_quoted(allowed)}")
        elif options[name] not in allowed:
            violations.add(f"options.{name}", f"must be one of {_quoted(allowed)}")
    if options["lora_apply_mode"] == "immediately":
        violations.add("options.lora_apply_mode", 'LoRAs are applied at runtime so they can change between jobs '
                                                  'without reloading the model; use "auto" or "at_runtime"')
    elif options["lora_apply_mode"] not in ("auto", "at_runtime"):
        violations.add("options.lora_apply_mode", 'must be "auto" or "at_runtime"')
    if options["prediction"] not in _PREDICTIONS:
        violations.add("options.prediction", f"must be one of {_quoted(_PREDICTIONS)}")
    if not 0.0 <= options["vae_tile_overlap"] < 1.0:
        violations.add("options.vae_tile_overlap", "must be at least 0.0 and below 1.0")
    for axis in ("x", "y"):
        size = options[f"vae_tile_size_{axis}"]
        if size < 0 or size % 8:
            violations.add(f"options.vae_tile_size_{axis}", "must be 0 (auto) or a positive multiple of 8 pixels")
    x, y = options["vae_tile_size_x"], options["vae_tile_size_y"]
    if x and y and x != y:
        violations.add("options.vae_tile_size_y", f"VAE tiles are square here; give the same size as "
                                                  f"vae_tile_size_x ({x}) or 0")
    return options


def _check_for_architecture(family: ModelFamily, options: dict, violations: Violations) -> None:
    prediction = options["prediction"]
    if prediction and prediction not in family.predictions:
        allowed = _quoted(["", *family.predictions])
        violations.add("options.prediction", f'"{prediction}" does not apply to {family.name} models; '
                                             f"use {allowed}")
    if options["flow_shift"] is not None and not family.flow:
        violations.add("options.flow_shift", f"{family.name} is not a flow-matching model; leave it absent, "
                                             "0 or Infinity")
    if family.name not in _GGUF_LOADABLE:
        # Quantized weights load through diffusers' GGUF support, which reads transformers only.
        gguf_families = ", ".join(_GGUF_LOADABLE)
        if options["weight_type"] in _QUANTIZED_WEIGHT_TYPES:
            violations.add("options.weight_type", f'"{options["weight_type"]}" quantizes {gguf_families} '
                                                  f"transformers only; {family.name} models take "
                                                  f"{_quoted(['', *_WEIGHT_DTYPES])}")
        if options["tensor_type_rules"] and "options.tensor_type_rules" not in dict(violations.items):
            violations.add("options.tensor_type_rules", f"per-tensor types apply to {gguf_families} transformers "
                                                        f'only; leave it "" for {family.name} models')
    for name in ("chroma_use_dit_mask", "chroma_use_t5_mask", "chroma_t5_mask_pad"):
        if options[name] != OPTION_DEFAULTS[name]:
            violations.add(f"options.{name}", f"applies to Chroma models only; {family.name} takes the "
                                              f"default ({json.dumps(OPTION_DEFAULTS[name])})")


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class LoadPlan:
    model_name: str
    model_type: str  # "checkpoint" | "diffusion"
    architecture: str
    components: dict[str, str | None]  # vae, clip_l, clip_g, t5xxl, controlnet, llm, llm_vision (names as given)
    paths: dict[str, str]  # resolved absolute paths: "model" plus each given component
    options: dict = field(default_factory=dict)  # every option, defaults filled

    def to_json(self) -> dict:
        return {"model_name": self.model_name, "model_type": self.model_type, "architecture": self.architecture,
                "components": dict(self.components), "paths": dict(self.paths), "options": dict(self.options)}

    @classmethod
    def from_json(cls, data: dict) -> LoadPlan:
        return cls(model_name=data["model_name"], model_type=data["model_type"], architecture=data["architecture"],
                   components=dict(data["components"]), paths=dict(data["paths"]), options=dict(data["options"]))

    def key(self) -> str:
        """Equal for equal plans: what the pipeline cache is keyed by."""
        encoded = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(encoded.encode()).hexdigest()


def plan_load(root: ModelsRoot, request: dict) -> LoadPlan:
    """Validates a /models/load body (the proto's snake_case fields; options a dict): every bad
    field at once as InvalidInput, NotFound for a missing file. Reads only safetensors headers."""
    violations = Violations()
    for name in request:
        if name not in _REQUEST_FIELDS:
            violations.add(name, f"unknown field; known: {', '.join(sorted(_REQUEST_FIELDS))}")
    model_name = request.get("model_name")
    model_type = request.get("model_type") or "checkpoint"
    unusable = not isinstance(model_name, str) or not model_name or model_type not in ("checkpoint", "diffusion")
    if not isinstance(model_name, str) or not model_name:
        violations.add("model_name", "is required: a checkpoint or diffusion model name as GET /models lists it")
    if model_type not in ("checkpoint", "diffusion"):
        violations.add("model_type", 'must be "checkpoint" or "diffusion"')
    options = _parse_options(request.get("options"), violations)
    given: dict[str, str] = {}
    for name in dict.fromkeys((*COMPONENT_FIELDS, *_UNSUPPORTED_FIELDS)):
        value = request.get(name)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            violations.add(name, "must be a model name (a string) or null")
        elif name in _UNSUPPORTED_FIELDS:
            violations.add(name, f"{_UNSUPPORTED_FIELDS[name]}; leave it null")
        else:
            given[name] = value
    high_noise = request.get(HIGH_NOISE) or None
    if high_noise is not None and not isinstance(high_noise, str):
        violations.add(HIGH_NOISE, "must be a model name (a string) or null")
        high_noise = None
    taesd = request.get(TAESD) or None
    if taesd is not None and not isinstance(taesd, str):
        violations.add(TAESD, "must be a model name (a string) or null")
        taesd = None
    if unusable:
        violations.raise_if_any()

    # The architecture decides what else is allowed; every bad field is reported at once, a
    # missing file only when nothing else is wrong.
    try:
        model_path = root.path(model_type, model_name, "model_name")
        architecture = detect_architecture(model_path)
        if gguf_files.is_gguf(model_path):
            gguf_files.check_loadable(model_path, architecture, list(_GGUF_LOADABLE))
        high_noise_path = None
        if high_noise is not None:
            architecture, high_noise_path = _high_noise_expert(root, model_path, architecture, high_noise)
    except InvalidInput as error:
        for item in error.violations:
            violations.add(*item)
        violations.raise_if_any()
        raise
    except NotFound:
        violations.raise_if_any()
        _refuse_other_folder(root, model_type, model_name)
        raise
    family = architectures.family(architecture)
    # SD3 transformer-only files (city96's GGUF conversions, ComfyUI's exports) sit in
    # diffusion_models/, where the document lists SD3.
    if family.model_type != model_type and not (family is architectures.SD3 and model_type == "diffusion"):
        where = "checkpoints/" if family.model_type == "checkpoint" else "diffusion_models/"
        violations.add("model_type", f'{model_name} is a {architecture} {family.model_type} model; put it in '
                                     f'{where} and load it with model_type "{family.model_type}"')
    for name in given:
        if name not in family.components:
            takes = ", ".join(family.components)
            also = ""
            if name == "controlnet":
                takers = ", ".join(f.name for f in architectures.FAMILIES.values() if "controlnet" in f.components)
                also = f" (ControlNets load with {takers} checkpoints)"
            violations.add(name, f"{architecture} models have no {name} component; they take {takes}{also}")
    _check_for_architecture(family, options, violations)
    tae_path = _tae_path(root, taesd, family, violations)
    violations.raise_if_any()

    paths = {"model": str(model_path.resolve())}
    if high_noise_path is not None:
        paths[HIGH_NOISE] = str(high_noise_path.resolve())
    for name, value in given.items():
        paths[name] = str(root.path(family.components[name].folder_type, value, name).resolve())
        if gguf_files.is_gguf(paths[name]):
            # Dequantized on load (_component_models); the header is checked now.
            try:
                gguf_files.check_component(Path(paths[name]), name, family.components[name].gguf_archs,
                                           f"the {architecture} {name}")
            except InvalidInput as error:
                for item in error.violations:
                    violations.add(*item)
    if tae_path is not None:
        paths[TAESD] = str(tae_path)
    violations.raise_if_any()
    if "controlnet" in paths:
        _check_controlnet(Path(paths["controlnet"]), family)
        if family is architectures.ZIMAGE:
            # The pipeline lends a Z-Image ControlNet the transformer's own embedders and refiners,
            # so it runs where the transformer runs.
            for name in ("keep_controlnet_on_cpu", "offload_to_cpu"):
                if options[name]:
                    violations.add(f"options.{name}", "a Z-Image ControlNet runs the transformer's own layers "
                                                      "and stays beside it; leave it false")
            violations.raise_if_any()
    if family is architectures.QWEN_IMAGE and "llm" in paths and not gguf_files.is_gguf(paths["llm"]):
        _check_qwen_vl_encoder(Path(paths["llm"]))
    return LoadPlan(
        model_name=model_name, model_type=model_type, architecture=architecture,
        components={name: given.get(name) for name in COMPONENT_FIELDS}, paths=paths, options=options,
    )


def _tae_path(root: ModelsRoot, name: str | None, family: ModelFamily, violations: Violations) -> Path | None:
    """The tiny autoencoder (`taesd`) a load names, checked against the family; a missing file
    is NotFound only when nothing else is wrong."""
    if name is None:
        return None
    try:
        path = root.path(TAESD, name, TAESD)
        previews.check_tae_file(path, family, TAESD)
    except InvalidInput as error:
        for item in error.violations:
            violations.add(*item)
        return None
    except NotFound:
        violations.raise_if_any()
        raise
    return path.resolve()


def _high_noise_expert(root: ModelsRoot, model_path: Path, architecture: str, name: str) -> tuple[str, Path]:
    """(the two-expert family's name, the high-noise file) when `name` is the high-noise expert of
    the Wan transformer at model_path (the low-noise one): a diffusion model of the same layout."""
    if architecture != architectures.WAN21.name:
        raise InvalidInput(HIGH_NOISE, f"only two-expert video models (Wan 2.2 A14B, whose low-noise expert is "
                                       f"model_name) have a high-noise model; {model_path.name} is a {architecture} "
                                       "model: leave it null")
    path = root.path("diffusion", name, HIGH_NOISE)
    try:
        wan = detect_architecture(path) == architecture
    except InvalidInput:
        wan = False
    if not wan:
        raise InvalidInput(HIGH_NOISE, f"{path.name} is not a Wan text-to-video transformer like {model_path.name}")
    if gguf_files.is_gguf(path):
        gguf_files.check_loadable(path, architectures.WAN22.name, list(_GGUF_LOADABLE), HIGH_NOISE)

    def names(file: Path) -> set[str]:
        return {key.removeprefix("model.diffusion_model.") for key in _header_keys(file)}

    if names(path) != names(model_path):
        raise InvalidInput(HIGH_NOISE, f"{path.name} and {model_path.name} are not two experts of one model: "
                                       "their transformers' weights differ in names")
    return architectures.WAN22.name, path


def _check_qwen_vl_encoder(path: Path) -> None:
    """From the header: Qwen-Image's llm file holds a Qwen2.5-VL (its vision tower, in the release
    layout or transformers'), not another family's LLM such as Z-Image's Qwen3."""
    try:
        keys = _header_keys(path)
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise InvalidInput("llm", f"{path.name} is not a readable safetensors file: {exc}") from None
    if not any(k.startswith(("visual.blocks.", "model.visual.blocks.")) for k in keys):
        raise InvalidInput("llm", f"{path.name} is not a Qwen2.5-VL model (it has no vision tower); Qwen-Image "
                                  "reads its prompts with Qwen2.5-VL-7B (qwen_2.5_vl_7b.safetensors)")


def _refuse_other_folder(root: ModelsRoot, model_type: str, model_name: str) -> None:
    """A model_name missing from its model_type's folder but present in the other one is a
    wrong model_type (InvalidInput naming it), not a missing file."""
    other = "diffusion" if model_type == "checkpoint" else "checkpoint"
    try:
        root.path(other, model_name)
    except (NotFound, InvalidInput):
        return
    raise InvalidInput("model_type", f"{model_name} is in {MODEL_TYPES[other]}/, not {MODEL_TYPES[model_type]}/: "
                                     f'load it with model_type "{other}"')


def _check_controlnet(path: Path, family: ModelFamily) -> None:
    """From the header: a ControlNet in a layout loaded here, made for the model's family. SD1.5
    and SDXL ones (lllyasviel's or diffusers' layout; SDXL's has the added time/size embedding),
    Flux ones in diffusers' layout (InstantX, Shakker-Labs: transformer blocks beside
    controlnet_x_embedder), Z-Image ones in the released Fun-Controlnet-Union layout
    (control_all_x_embedder), SD3/SD3.5 ones in diffusers' layout (InstantX's, and the
    diffusion_pytorch_model.safetensors of Stability's SD3.5 ControlNets: pos_embed_input beside
    transformer_blocks), Qwen-Image ones in diffusers' layout (InstantX: controlnet_x_embedder
    beside img_in)."""
    try:
        keys = {k.removeprefix("control_model.") for k in _header_keys(path)}
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise InvalidInput("controlnet", f"{path.name} is not a readable safetensors file: {exc}") from None

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("control_all_x_embedder."):
        made_for = architectures.ZIMAGE.name
    elif "controlnet_x_embedder.weight" in keys and "x_embedder.weight" in keys:
        made_for = architectures.FLUX.name
    elif "controlnet_x_embedder.weight" in keys and "img_in.weight" in keys:
        made_for = architectures.QWEN_IMAGE.name
    elif "pos_embed_input.proj.weight" in keys and has("transformer_blocks.0."):
        made_for = architectures.SD3.name
    elif has("double_blocks.0.") or has("controlnet_blocks.") or has("pos_embed_input."):
        raise InvalidInput("controlnet", f"{path.name} is a transformer ControlNet in a layout not loaded here; "
                                         "Flux, SD3 and Qwen-Image ControlNets load in diffusers' layout "
                                         "(InstantX, Shakker-Labs), Z-Image ones in the Fun-Controlnet-Union layout")
    elif not keys & {"input_hint_block.0.weight", "controlnet_cond_embedding.conv_in.weight"}:
        raise InvalidInput("controlnet", f"{path.name} is not a ControlNet (it has no hint encoder)")
    elif keys & {"label_emb.0.0.weight", "add_embedding.linear_1.weight"}:
        made_for = architectures.SDXL.name
    else:
        made_for = architectures.SD15.name
    if made_for != family.name:
        raise InvalidInput("controlnet", f"{path.name} is a ControlNet for {made_for} models; the model is "
                                         f"{family.name}")
    hint = {architectures.SD3.name: ("pos_embed_input.proj.weight", None),
            architectures.QWEN_IMAGE.name: ("controlnet_x_embedder.weight", "img_in.weight")}.get(made_for)
    if hint is not None:
        # Inpainting ControlNets (alimama's) take the mask beside the latents; the ControlNet
        # pipelines here run text-to-image. Every SD3 model has 16 latent channels.
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            inputs = f.get_slice(hint[0]).get_shape()[1]
            latents = f.get_slice(hint[1]).get_shape()[1] if hint[1] else 16
        if inputs != latents:
            raise InvalidInput("controlnet", f"{path.name} is an inpainting ControlNet (its hint embedder takes "
                                             f"{inputs} channels, the latents have {latents}); text-to-image "
                                             "ControlNets load here")

# --------------------------------------------------------------------------- loading

def load_pipeline(plan: LoadPlan, device, dtype, models: ModelSources,
                  on_stage: Callable[[str, int, int], None] | None = None):
    """The diffusers pipeline of a plan, on `device` in `dtype` (a float options.weight_type picks
    the dtype, a quantized one quantizes the transformer: _transformer_checkpoint), with the
    plan's options applied. on_stage(stage, step, total) hears each of its LOAD_STAGES begin."""
    import torch

    stage = on_stage or (lambda *_: None)
    stage(LOAD_STAGES[0], 0, len(LOAD_STAGES))

    options = plan.options
    if options["weight_type"] in _WEIGHT_DTYPES:
        dtype = getattr(torch, _WEIGHT_DTYPES[options["weight_type"]])
    if options["n_threads"] > 0:
        torch.set_num_threads(options["n_threads"])
    family = architectures.family(plan.architecture)
    config = family.config_source(models)
    try:
        pipe = _LOADERS[plan.architecture](plan, family, config, dtype)
    except OSError as exc:
        if Path(config).is_dir():
            raise
        raise FailedPrecondition(
            f"{plan.architecture} models need the component configs and tokenizers of {config}, which are not "
            f"in the Hugging Face cache and cannot be fetched ({exc}); set LORAMESH_{family.id.upper()}_CONFIG to a local "
            "diffusers folder") from None
    stage(LOAD_STAGES[1], 1, len(LOAD_STAGES))
    _apply_scheduler_options(pipe, family, options)
    if options["vae_tiling"]:
        _enable_vae_tiling(pipe.vae, options)
    stage(LOAD_STAGES[2], 2, len(LOAD_STAGES))
    _place(pipe, torch.device(device), dtype, options)
    stage("loaded", len(LOAD_STAGES), len(LOAD_STAGES))
    return pipe


# What a load goes through, as model_loading_progress reports it.
LOAD_STAGES = ("reading weights", "applying options", "placing on the device")


def _component_models(plan: LoadPlan, family: ModelFamily, config: str, dtype) -> dict:
    """The pipeline components loaded from the plan's component files, by pipeline attribute."""
    models = {}
    for name, component in family.components.items():
        attribute = component.attribute
        path = plan.paths.get(name)
        if path is None or attribute == "controlnet":  # built on the UNet: see _load_controlnet
            continue
        if attribute == "vae":
            import diffusers

            vae_class = getattr(diffusers, "AutoencoderKLWan" if family.video else "AutoencoderKL")
            # A GGUF VAE (stable-diffusion.cpp's ae_q8_0.gguf: the original layout's names) is
            # dequantized and then converted as its safetensors release is.
            source = gguf_files.dequantized_state_dict(path, dtype, name) if gguf_files.is_gguf(path) else path
            if family.vae_class:
                models["vae"] = _wan_layout_vae(getattr(diffusers, family.vae_class), source, config, dtype)
            else:
                models["vae"] = vae_class.from_single_file(source, config=config, subfolder="vae", torch_dtype=dtype)
        else:
            models[attribute] = _text_encoder_from_file(Path(path), config, attribute, dtype, name)
    return models


def _wan_layout_vae(vae_class, source, config: str, dtype):
    """A VAE of Wan's architecture that diffusers has no single-file loader for, from a file (or
    state dict) in Wan's layout (qwen_image_vae.safetensors) or diffusers' own."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    from safetensors.torch import load_file

    name = "the file" if isinstance(source, dict) else Path(source).name
    state = source if isinstance(source, dict) else load_file(str(source))
    if "encoder.conv_in.weight" not in state:
        try:
            state = convert_wan_vae_to_diffusers(dict(state))
        except (KeyError, IndexError, ValueError) as exc:  # the converter indexes Wan's names blindly
            raise InvalidInput("vae", f"{name} is not a VAE in Wan's layout, which {vae_class.__name__} "
                                      f"needs (no {exc})") from None
    with init_empty_weights():
        model = vae_class.from_config(vae_class.load_config(config, subfolder="vae"))
    return _loaded_exactly(model, state, dtype, "vae",
                           f"{name} is not a {vae_class.__name__} like the one this architecture uses")


def _load_checkpoint(plan: LoadPlan, family: ModelFamily, config: str, dtype):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    components = _component_models(plan, family, config, dtype)
    if family is architectures.SDXL:
        pipe = StableDiffusionXLPipeline.from_single_file(plan.paths["model"], config=config, torch_dtype=dtype,
                                                          **components)
    else:
        pipe = StableDiffusionPipeline.from_single_file(plan.paths["model"], config=config, torch_dtype=dtype,
                                                        safety_checker=None, requires_safety_checker=False,
                                                        **components)
    if plan.paths.get("controlnet"):
        # A plain attribute, not a registered component (the text-to-image pipelines refuse
        # one they do not declare): _place moves it, the ControlNet variants (pipelines.py)
        # take it from there.
        pipe.controlnet = _load_controlnet(Path(plan.paths["controlnet"]), pipe.unet, dtype)
    return pipe


def _load_controlnet(path: Path, unet, dtype):
    """A ControlNet single file, in lllyasviel's layout (`control_model.*`, as
    control_v11p_sd15_canny ships) or diffusers' (as SDXL ControlNets ship). A ControlNet is a
    copy of its UNet's encoder, so its config comes from the loaded UNet (no config repo needed);
    files whose blocks differ from the UNet's (SDXL "mid"/"small" ControlNets) are refused."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from safetensors.torch import load_file

    with init_empty_weights():
        model = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    state = convert_controlnet_checkpoint(load_file(str(path)), model.config)
    state = {key: value for key, value in state.items() if value is not None}
    return _loaded_exactly(model, state, dtype, "controlnet",
                           f"{path.name} is not a ControlNet for this model's UNet")


def _block_count(state: dict, prefix: str) -> int:
    return len({key.removeprefix(prefix).split(".")[0] for key in state if key.startswith(prefix)})


def _load_flux_controlnet(path: Path, transformer, dtype):
    """A Flux ControlNet single file in diffusers' layout, which ships without a config (InstantX
    and Shakker-Labs FLUX.1-dev-ControlNet-Union): block counts, the union mode embedding
    (num_mode), a hint encoder and the guidance embedding come from its weights, the widths
    from the loaded transformer's config."""
    from accelerate import init_empty_weights
    from diffusers import FluxControlNetModel
    from safetensors.torch import load_file

    state = load_file(str(path))
    mode = state.get("controlnet_mode_embedder.weight")
    hint = state.get("input_hint_block.conv_out.weight")
    config = {name: transformer.config[name] for name in (
        "patch_size", "in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
        "pooled_projection_dim", "axes_dims_rope")}
    config.update(num_layers=_block_count(state, "transformer_blocks."),
                  num_single_layers=_block_count(state, "single_transformer_blocks."),
                  guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in state,
                  num_mode=None if mode is None else mode.shape[0],
                  conditioning_embedding_channels=None if hint is None else hint.shape[0])
    with init_empty_weights():
        model = FluxControlNetModel.from_config(config)
    return _loaded_exactly(model, state, dtype, "controlnet",
                           f"{path.name} is not a Flux ControlNet for this model's transformer")


def _load_z_image_controlnet(path: Path, transformer, dtype):
    """A Z-Image ControlNet single file in the released Fun-Controlnet-Union layout. The file
    holds the control blocks only (the pipeline lends it the transformer's embedders and
    refiners), so the config comes from its weights and the transformer's: the control blocks
    sit evenly from the first to the last transformer layer (every 5th of 30 in 1.0, every 2nd
    in 2.x, 0/14/28 in the lite files); a control noise refiner with a trained before_proj is
    2.1's, one without 2.0's (whose control layers refine the noise, as diffusers reads it);
    plain refiner blocks are 1.0's."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import ZImageControlNetModel
    from safetensors.torch import load_file

    config = transformer.config
    patch = f"{config.all_patch_size[0]}-{config.all_f_patch_size[0]}"
    state = load_file(str(path))
    embedder = state.get(f"control_all_x_embedder.{patch}.weight")
    count = _block_count(state, "control_layers.")
    if embedder is None or count == 0:
        raise InvalidInput("controlnet", f"{path.name} is not a Z-Image ControlNet for this model's transformer "
                                         f"(no control_all_x_embedder.{patch} or control_layers)")
    step = (config.n_layers - 1) // (count - 1) if count > 1 else 1
    before = state.get("control_noise_refiner.0.before_proj.weight")
    if before is not None and bool(torch.any(before != 0)):
        refiner = "control_noise_refiner"
    elif any(key.startswith("control_noise_refiner.") for key in state) and before is None \
            and not any(".after_proj." in key for key in state if key.startswith("control_noise_refiner.")):
        refiner = None
    else:
        refiner = "control_layers"
        state = {key: value for key, value in state.items() if not key.startswith("control_noise_refiner.")}
    with init_empty_weights():
        model = ZImageControlNetModel(
            control_layers_places=[i * step for i in range(count)],
            control_refiner_layers_places=list(range(config.n_refiner_layers)),
            control_in_dim=embedder.shape[1] // (config.all_patch_size[0] ** 2 * config.all_f_patch_size[0]),
            add_control_noise_refiner=refiner, all_patch_size=tuple(config.all_patch_size),
            all_f_patch_size=tuple(config.all_f_patch_size), dim=config.dim, n_refiner_layers=config.n_refiner_layers,
            n_heads=config.n_heads, n_kv_heads=config.n_kv_heads, norm_eps=config.norm_eps, qk_norm=config.qk_norm)
    return _loaded_exactly(model, state, dtype, "controlnet",
                           f"{path.name} is not a Z-Image ControlNet for this model's transformer")


def _load_sd3_controlnet(path: Path, transformer, dtype):
    """An SD3/SD3.5 ControlNet single file in diffusers' layout, read without its config: InstantX's
    SD3 ones (own positional embedding and caption embedder, joint blocks) and Stability's SD3.5
    ones (diffusion_pytorch_model.safetensors: single blocks, the transformer's positional
    embedding lent by the pipeline). Block count, q/k norms and dual-attention blocks come from
    its weights, the widths from the loaded transformer's config. InstantX's
    layout is the one trained on zeroed pooled projections (diffusers' force_zeros_for_pooled_projection)."""
    from accelerate import init_empty_weights
    from diffusers import SD3ControlNetModel
    from safetensors.torch import load_file

    state = load_file(str(path))
    own = transformer.config
    joint = "context_embedder.weight" in state
    count = _block_count(state, "transformer_blocks.")
    config = {name: own[name] for name in (
        "sample_size", "patch_size", "in_channels", "attention_head_dim", "num_attention_heads",
        "caption_projection_dim", "pooled_projection_dim", "out_channels", "pos_embed_max_size")}
    config.update(num_layers=count, joint_attention_dim=own.joint_attention_dim if joint else None,
                  qk_norm=own.qk_norm if "transformer_blocks.0.attn.norm_q.weight" in state else None,
                  dual_attention_layers=tuple(i for i in range(count)
                                              if f"transformer_blocks.{i}.attn2.to_q.weight" in state),
                  use_pos_embed="pos_embed.proj.weight" in state, force_zeros_for_pooled_projection=joint)
    with init_empty_weights():
        model = SD3ControlNetModel.from_config(config)
    return _loaded_exactly(model, state, dtype, "controlnet",
                           f"{path.name} is not an SD3 ControlNet in diffusers' layout for this model's transformer")


def _load_qwen_image_controlnet(path: Path, transformer, dtype):
    """A Qwen-Image ControlNet single file in diffusers' layout, which ships without a config
    (InstantX/Qwen-Image-ControlNet-Union): the block count from its weights, the widths from
    the loaded transformer's config. The union model takes no control type (the control image
    alone tells canny, depth, pose...)."""
    from accelerate import init_empty_weights
    from diffusers import QwenImageControlNetModel
    from safetensors.torch import load_file

    state = load_file(str(path))
    own = transformer.config
    config = {name: own[name] for name in (
        "patch_size", "in_channels", "out_channels", "attention_head_dim", "num_attention_heads",
        "joint_attention_dim", "axes_dims_rope")}
    config.update(num_layers=_block_count(state, "transformer_blocks."))
    with init_empty_weights():
        model = QwenImageControlNetModel.from_config(config)
    return _loaded_exactly(model, state, dtype, "controlnet",
                           f"{path.name} is not a Qwen-Image ControlNet for this model's transformer")


def _loaded_exactly(model, state: dict, dtype, field_name: str, mismatch: str):
    """`model` (built empty) with `state` as its weights, when they are exactly its weights
    (names and shapes); else InvalidInput(field_name, mismatch + which weights differ)."""
    expected = model.state_dict()
    wrong = sorted(set(expected) ^ set(state)) or sorted(k for k in state if state[k].shape != expected[k].shape)
    if wrong:
        shown = ", ".join(wrong[:5]) + (", ..." if len(wrong) > 5 else "")
        raise InvalidInput(field_name, f"{mismatch} ({len(wrong)} weights differ: {shown})")
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(dtype).eval()


def _transformer_checkpoint(plan: LoadPlan, dtype, as_dict: bool = False) -> tuple:
    """What a GGUF-loadable family's transformer loads from (the file, or its tensors when
    `as_dict`), and from_single_file's GGUF arguments. A quantized options.weight_type or
    tensor_type_rules (typed as /convert types tensors) quantize the tensors on load
    (gguf_files.quantize_state_dict), which then take the path a .gguf file of that type takes."""
    path = plan.paths["model"]
    weight_type, rules = plan.options["weight_type"], plan.options["tensor_type_rules"]
    kind = gguf_files.ggml_type(weight_type) if weight_type in _QUANTIZED_WEIGHT_TYPES else None
    if kind is None and not rules and not as_dict:
        return path, gguf_files.single_file_kwargs(path, dtype)
    if gguf_files.is_gguf(path):
        tensors = gguf_files.load_state_dict(path)
    else:
        from safetensors.torch import load_file

        tensors = load_file(path)
    if kind is None and not rules:
        return tensors, gguf_files.single_file_kwargs(path, dtype)
    from services.inference.conversion import compiled_rules, parse_rules

    # A checkpoint's VAE and text encoders stay out; the transformer is under this prefix there.
    prefix = "model.diffusion_model."
    if any(name.startswith(prefix) for name in tensors):
        tensors = {name: tensor for name, tensor in tensors.items() if name.startswith(prefix)}
    typed_by = compiled_rules(parse_rules(rules, Violations()))
    return gguf_files.quantize_state_dict(tensors, kind, typed_by), gguf_files.quantization_kwargs(dtype)


def _load_flux(plan: LoadPlan, family: ModelFamily, config: str, dtype):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    weights, quantization = _transformer_checkpoint(plan, dtype, as_dict=True)
    transformer = FluxTransformer2DModel.from_single_file(
        flux_transformer_to_diffusers(weights), config=config, subfolder="transformer", torch_dtype=dtype,
        **quantization)
    components = _component_models(plan, family, config, dtype)
    pipe = FluxPipeline.from_pretrained(config, transformer=transformer, dtype=dtype, **components)
    if plan.paths.get("controlnet"):
        pipe.controlnet = _load_flux_controlnet(Path(plan.paths["controlnet"]), transformer, dtype)
    return pipe


def _load_z_image(plan: LoadPlan, family: ModelFamily, config: str, dtype):
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    checkpoint, quantization = _transformer_checkpoint(plan, dtype)
    transformer = ZImageTransformer2DModel.from_single_file(checkpoint, config=config, subfolder="transformer",
                                                            torch_dtype=dtype, **quantization)
    components = _component_models(plan, family, config, dtype)
    pipe = ZImagePipeline.from_pretrained(config, transformer=transformer, dtype=dtype, **components)
    if plan.paths.get("controlnet"):
        pipe.controlnet = _load_z_image_controlnet(Path(plan.paths["controlnet"]), transformer, dtype)
    return pipe


def _load_sd3(plan: LoadPlan, family: ModelFamily, config: str, dtype):
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

    path = plan.paths["model"]
    checkpoint, quantization = _transformer_checkpoint(plan, dtype)
    transformer = SD3Transformer2DModel.from_single_file(checkpoint, config=config, subfolder="transformer",
                                                         torch_dtype=dtype, **quantization)
    components = _component_models(plan, family, config, dtype)
    if "vae" not in components and not gguf_files.is_gguf(path) and \
            any(k.startswith("first_stage_model.") for k in _header_keys(Path(path))):
        # Stability's SD3.5 files carry their VAE; a `vae` file, when named, replaces it. GGUF
        # files hold the transformer only: the VAE comes from `vae` or the config folder.
        components["vae"] = AutoencoderKL.from_single_file(path, config=config, subfolder="vae", torch_dtype=dtype)
    pipe = StableDiffusion3Pipeline.from_pretrained(config, transformer=transformer, dtype=dtype, **components)
    if plan.paths.get("controlnet"):
        pipe.controlnet = _load_sd3_controlnet(Path(plan.paths["controlnet"]), transformer, dtype)
    return pipe


def _wan_transformer(plan: LoadPlan, config: str, dtype):
    """The WanTransformer3DModel of plan.paths["model"]: Wan's layout, .safetensors or GGUF."""
    from diffusers import WanTransformer3DModel

    checkpoint, quantization = _transformer_checkpoint(plan, dtype)
    return WanTransformer3DModel.from_single_file(checkpoint, config=config, subfolder="transformer",
                                                  torch_dtype=dtype, **quantization)


def _load_wan21(plan: LoadPlan, family: ModelFamily, config: str, dtype):
    from diffusers import WanPipeline

    components = _component_models(plan, family, config, dtype)
    return WanPipeline.from_pretrained(config, transformer=_wan_transformer(plan, config, dtype), dtype=dtype,
                                       **components)


def _load_wan22(plan: LoadPlan, family: ModelFamily, config: str, dtype):
    """The high-noise expert (transformer) from high_noise_diffusion_model, the low-noise one
    (transformer_2) from model_name; boundary_ratio from the config folder's model_index."""
    from diffusers import WanPipeline

    high = replace(plan, paths={**plan.paths, "model": plan.paths[HIGH_NOISE]})
    components = _component_models(plan, family, config, dtype)
    return WanPipeline.from_pretrained(config, transformer=_wan_transformer(high, config, dtype),
                                       transformer_2=_wan_transformer(plan, config, dtype), dtype=dtype, **components)


def _load_qwen_image(plan: LoadPlan, family: ModelFamily, config: str, dtype):
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    weights, quantization = _transformer_checkpoint(plan, dtype, as_dict=True)
    # diffusers takes Qwen-Image files under their own names as they are; a ComfyUI export puts
    # them under model.diffusion_model.
    weights = {k.removeprefix("model.diffusion_model."): v for k, v in weights.items()}
    transformer = QwenImageTransformer2DModel.from_single_file(
        weights, config=config, subfolder="transformer", torch_dtype=dtype, **quantization)
    components = _component_models(plan, family, config, dtype)
    pipe = QwenImagePipeline.from_pretrained(config, transformer=transformer, dtype=dtype, **components)
    if plan.paths.get("controlnet"):
        pipe.controlnet = _load_qwen_image_controlnet(Path(plan.paths["controlnet"]), transformer, dtype)
    return pipe


def sd3_layer_count(path: str | Path) -> int:
    """How many MMDiT joint blocks an SD3 file's transformer has (from its header): the
    indices skip_layers may name."""
    blocks = {k.removeprefix("model.diffusion_model.").split(".")[1] for k in _header_keys(Path(path))
              if k.removeprefix("model.diffusion_model.").startswith("joint_blocks.")}
    return len(blocks)


# The loader of each family /models/load takes (Kontext single files load as Flux).
_LOADERS = {architectures.SD15.name: _load_checkpoint, architectures.SDXL.name: _load_checkpoint,
            architectures.FLUX.name: _load_flux, architectures.ZIMAGE.name: _load_z_image,
            architectures.SD3.name: _load_sd3, architectures.WAN21.name: _load_wan21,
            architectures.WAN22.name: _load_wan22, architectures.QWEN_IMAGE.name: _load_qwen_image}
# The families whose transformer diffusers reads from a GGUF file (its single-file GGUF support).
_GGUF_LOADABLE = (architectures.FLUX.name, architectures.ZIMAGE.name, architectures.SD3.name, architectures.WAN21.name,
                  architectures.WAN22.name, architectures.QWEN_IMAGE.name)


def flux_transformer_to_diffusers(checkpoint: dict) -> dict:
    """Black Forest Labs' Flux layout -> diffusers FluxTransformer2DModel keys. diffusers' own
    converter assumes FLUX.1's width (3072) when it splits the single blocks' fused linear1;
    here the width comes from the weights, so any width converts (the result is the same for
    FLUX.1)."""
    import torch

    sd = {k.removeprefix("model.diffusion_model."): v for k, v in checkpoint.items()}
    out: dict = {}

    def take(new: str, old: str) -> None:
        for kind in ("weight", "bias"):
            if f"{old}.{kind}" in sd:
                out[f"{new}.{kind}"] = sd.pop(f"{old}.{kind}")

    def split(news: list[str], old: str, sizes: list[int]) -> None:
        for kind in ("weight", "bias"):
            for new, part in zip(news, torch.split(sd.pop(f"{old}.{kind}"), sizes, dim=0), strict=True):
                out[f"{new}.{kind}"] = part

    def swap_halves(weight):
        shift, scale = weight.chunk(2, dim=0)
        return torch.cat([scale, shift], dim=0)

    inner = sd["img_in.weight"].shape[0]
    for old, new in {"time_in": "time_text_embed.timestep_embedder", "vector_in": "time_text_embed.text_embedder",
                     "guidance_in": "time_text_embed.guidance_embedder"}.items():
        take(f"{new}.linear_1", f"{old}.in_layer")
        take(f"{new}.linear_2", f"{old}.out_layer")
    take("context_embedder", "txt_in")
    take("x_embedder", "img_in")
    doubles = sorted({int(k.split(".")[1]) for k in sd if k.startswith("double_blocks.")})
    singles = sorted({int(k.split(".")[1]) for k in sd if k.startswith("single_blocks.")})
    for i in doubles:
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        take(f"{d}.norm1.linear", f"{b}.img_mod.lin")
        take(f"{d}.norm1_context.linear", f"{b}.txt_mod.lin")
        split([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], f"{b}.img_attn.qkv", [inner] * 3)
        split([f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"], f"{b}.txt_attn.qkv",
              [inner] * 3)
        for old, new in {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
                         "txt_attn.norm.query_norm": "attn.norm_added_q",
                         "txt_attn.norm.key_norm": "attn.norm_added_k"}.items():
            out[f"{d}.{new}.weight"] = sd.pop(f"{b}.{old}.scale")
        take(f"{d}.ff.net.0.proj", f"{b}.img_mlp.0")
        take(f"{d}.ff.net.2", f"{b}.img_mlp.2")
        take(f"{d}.ff_context.net.0.proj", f"{b}.txt_mlp.0")
        take(f"{d}.ff_context.net.2", f"{b}.txt_mlp.2")
        take(f"{d}.attn.to_out.0", f"{b}.img_attn.proj")
        take(f"{d}.attn.to_add_out", f"{b}.txt_attn.proj")
    for i in singles:
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        take(f"{d}.norm.linear", f"{b}.modulation.lin")
        mlp = sd[f"{b}.linear1.weight"].shape[0] - 3 * inner
        split([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"], f"{b}.linear1",
              [inner, inner, inner, mlp])
        out[f"{d}.attn.norm_q.weight"] = sd.pop(f"{b}.norm.query_norm.scale")
        out[f"{d}.attn.norm_k.weight"] = sd.pop(f"{b}.norm.key_norm.scale")
        take(f"{d}.proj_out", f"{b}.linear2")
    take("proj_out", "final_layer.linear")
    for kind in ("weight", "bias"):
        out[f"norm_out.linear.{kind}"] = swap_halves(sd.pop(f"final_layer.adaLN_modulation.1.{kind}"))
    return out


# Prefixes under which text encoders are found in files people download (ComfyUI exports,
# SD3-style bundles, LDM checkpoints, causal-LM exports of the LLM encoders).
_ENCODER_PREFIXES = ("text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer.",
                     "text_encoders.t5xxl.transformer.", "cond_stage_model.transformer.",
                     "conditioner.embedders.0.transformer.", "transformer.", "model.")


def _qwen_vl_release_name(key: str) -> str:
    """Qwen2.5-VL's release layout (Qwen2.5-VL-7B-Instruct, Comfy-Org's qwen_2.5_vl_7b.safetensors:
    the language model under `model.`, the vision tower under `visual.`) -> transformers 5's."""
    if key.startswith("model."):
        return "model.language_model." + key.removeprefix("model.")
    return "model." + key if key.startswith("visual.") else key


def _best_key_mapping(keys: list[str], expected: set[str]) -> dict[str, str]:
    """file key -> model key, choosing the prefix rewrite that matches the most model keys."""
    rewrites = [lambda k: k, lambda k: "text_model." + k]
    rewrites += [lambda k, p=p: k.removeprefix(p) for p in _ENCODER_PREFIXES]
    rewrites += [lambda k, p=p: "text_model." + k.removeprefix(p) for p in _ENCODER_PREFIXES]
    rewrites.append(_qwen_vl_release_name)
    best: dict[str, str] = {}
    for rewrite in rewrites:
        mapping = {k: rewrite(k) for k in keys if rewrite(k) in expected}
        if len(mapping) > len(best):
            best = mapping
    return best


def _text_encoder_from_file(path: Path, config: str, subfolder: str, dtype, field_name: str):
    """A transformers text encoder with the class and config of `config`/`subfolder`, its weights
    from a single file (clip_l.safetensors, t5xxl_fp16.safetensors, ...) or a GGUF one
    (qwen_3_4b.Q8_0.gguf, umt5-xxl-encoder-Q8_0.gguf, Qwen2.5-VL-7B-Instruct-Q8_0.gguf: llama.cpp's
    tensor names are mapped by transformers' GGUF support, weights dequantized to `dtype`). Built
    without initialising random weights first, which for T5-XXL would take minutes."""
    import transformers
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    model_config = transformers.AutoConfig.from_pretrained(config, subfolder=subfolder)
    model_class = getattr(transformers, (model_config.architectures or ["CLIPTextModel"])[0])
    with init_empty_weights(include_buffers=False):
        model = model_class(model_config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    expected = set(shapes)
    if gguf_files.is_gguf(path):
        tensors = gguf_files.encoder_state_dict(path, model, dtype, field_name)
    else:
        tensors = load_file(str(path))
    mapping = _best_key_mapping(list(tensors), expected)
    state = {new: tensors[old].to(dtype) if tensors[old].is_floating_point() else tensors[old]
             for old, new in mapping.items()}
    # Tied token embeddings are stored once (T5: shared.weight).
    if "shared.weight" in state and "shared.weight" in expected:
        for key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            if key in expected:
                state.setdefault(key, state["shared.weight"])
    # Qwen-VL text encoder files may leave out the LM head: prompts are encoded from hidden
    # states, and the logits computed beside them are never read.
    embeddings = state.get("model.language_model.embed_tokens.weight")
    if "lm_head.weight" in expected and "lm_head.weight" not in state and embeddings is not None:
        state["lm_head.weight"] = embeddings
    if gguf_files.is_gguf(path):
        expected = _without_vision_tower(model, expected, state)
    missing = sorted(expected - set(state))
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise InvalidInput(field_name, f"{path.name} does not hold a {model_class.__name__} like the one this "
                                       f"architecture uses ({len(missing)} weights missing: {shown})")
    wrong = [f"{name} {tuple(state[name].shape)}, not {shapes[name]}" for name in sorted(state)
             if tuple(state[name].shape) != shapes[name]]
    if wrong:
        shown = "; ".join(wrong[:3]) + ("; ..." if len(wrong) > 3 else "")
        raise InvalidInput(field_name, f"{path.name} holds a {model_class.__name__} of other sizes than the one "
                                       f"this architecture uses ({len(wrong)} weights differ: {shown})")
    model.load_state_dict(state, strict=False, assign=True)
    return model.to(dtype).eval()


def _without_vision_tower(model, expected: set[str], state: dict) -> set[str]:
    """The weights still expected of a Qwen-VL text encoder read from GGUF. Those files hold the
    language model only (llama.cpp ships the vision tower as a separate mmproj file) and
    text-to-image never runs the tower, so a tower the file lacks is replaced by a module that
    refuses images rather than left without weights. Other models: `expected` as it is."""
    import torch

    owner = getattr(model, "model", model)
    if getattr(owner, "visual", None) is None:
        return expected
    prefix = ("model.visual." if owner is not model else "visual.")
    if any(name.startswith(prefix) for name in state):
        return expected

    class NoVisionTower(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise ValueError("this text encoder was loaded from a GGUF file holding its language model only; "
                             "image inputs need the vision tower, which it does not have")

    owner.visual = NoVisionTower()
    return {name for name in expected if not name.startswith(prefix)}


def _apply_scheduler_options(pipe, family: ModelFamily, options: dict) -> None:
    scheduler = pipe.scheduler
    overrides: dict = {}
    prediction = family.predictions.get(options["prediction"]) if options["prediction"] else None
    if prediction:
        overrides["prediction_type"] = prediction
    if family.flow and options["flow_shift"] is not None:
        # A fixed shift replaces the resolution-dependent one.
        overrides.update(shift=options["flow_shift"], use_dynamic_shifting=False)
    if overrides:
        pipe.scheduler = type(scheduler).from_config(scheduler.config, **overrides)


@contextlib.contextmanager
def vae_tiling_for(vae, tiling: list[float] | None):
    """One image's VAE tiling ([size x, size y, overlap]), then the model's own setting again."""
    if not tiling:
        yield
        return
    saved = {name: getattr(vae, name) for name in ("use_tiling", "tile_sample_min_size", "tile_latent_min_size",
                                                   "tile_overlap_factor") if hasattr(vae, name)}
    size_x, size_y, overlap = tiling
    _enable_vae_tiling(vae, {"vae_tile_size_x": int(size_x), "vae_tile_size_y": int(size_y),
                             "vae_tile_overlap": overlap})
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(vae, name, value)


def _enable_vae_tiling(vae, options: dict) -> None:
    vae.enable_tiling()
    size = options["vae_tile_size_x"] or options["vae_tile_size_y"]
    if size and hasattr(vae, "tile_sample_min_size"):
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        vae.tile_sample_min_size = size
        vae.tile_latent_min_size = size // scale
    if hasattr(vae, "tile_overlap_factor"):
        vae.tile_overlap_factor = options["vae_tile_overlap"]


# --------------------------------------------------------------------------- placement


def _place(pipe, device, dtype, options: dict) -> None:
    """On CUDA: offload_to_cpu moves each model to the GPU only while it runs; keep_clip_on_cpu /
    keep_controlnet_on_cpu / keep_vae_on_cpu leave the text encoders / ControlNet / VAE on the
    CPU, their inputs and outputs moved across. Elsewhere everything sits on `device`."""
    import torch

    controlnet = getattr(pipe, "controlnet", None)
    if device.type != "cuda":
        pipe.to(device)
        if controlnet is not None:
            controlnet.to(device)
        return
    cpu_dtype = torch.float32 if dtype == torch.float16 else dtype  # CPU half precision is slow or missing
    if controlnet is not None:
        # Offloading covers the pipeline's own components only; the ControlNet then stays on the CPU.
        if options["keep_controlnet_on_cpu"] or options["offload_to_cpu"]:
            _run_on_cpu(controlnet, cpu_dtype, device)
        else:
            controlnet.to(device)
    if options["offload_to_cpu"]:
        pipe.enable_model_cpu_offload(device=device)
        return
    pipe.to(device)
    if options["keep_clip_on_cpu"]:
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(pipe, name, None)
            if module is not None:
                _run_on_cpu(module, cpu_dtype, device)
    if options["keep_vae_on_cpu"] and getattr(pipe, "vae", None) is not None:
        pipe.vae.to("cpu", cpu_dtype)
        # The pipelines call vae.encode/decode, not forward: hook the parts that run.
        for part in ("encoder", "quant_conv", "post_quant_conv", "decoder"):
            module = getattr(pipe.vae, part, None)
            if module is not None:
                _run_on_cpu(module, cpu_dtype, device, move=False)


def _run_on_cpu(module, cpu_dtype, result_device, move: bool = True) -> None:
    import torch

    if move:
        module.to("cpu", cpu_dtype)

    def inputs_to_cpu(_, args, kwargs):
        return _moved(args, torch.device("cpu"), cpu_dtype), _moved(kwargs, torch.device("cpu"), cpu_dtype)

    def outputs_back(_, args, kwargs, output):
        return _moved(output, result_device, None)

    module.register_forward_pre_hook(inputs_to_cpu, with_kwargs=True)
    module.register_forward_hook(outputs_back, with_kwargs=True)


def _moved(value, device, float_dtype):
    import torch

    if isinstance(value, torch.Tensor):
        if float_dtype is not None and value.is_floating_point():
            return value.to(device, float_dtype)
        return value.to(device)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_moved(v, device, float_dtype) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_moved(v, device, float_dtype) for v in value)
    if isinstance(value, dict):
        moved = {k: _moved(v, device, float_dtype) for k, v in value.items()}
        try:
            return type(value)(**moved)  # transformers/diffusers output dataclasses
        except TypeError:
            return moved
    return value
