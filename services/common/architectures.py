"""The model families the platform knows, defined once. Each entry says how the family is
named (in job records, in /architectures, in trainer configs), which diffusers pipeline
runs it, what components /models/load may give it, how it samples by default, the size
its images must divide by, which LoRA layouts it reads and writes, and whether the trainer
trains it. The inference catalog, samplers, generation and model loading and the trainer
all read this table: adding a family is one entry here plus its loader.

Nothing here imports torch or diffusers; pipeline classes are named, not imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.settings import ModelSources

# LoRA layouts: kohya's lora_unet_*/lora_te*_ with alphas (A1111, ComfyUI, our trainer's
# "safetensors"), diffusers' component-prefixed peft keys (our trainer's "diffusers"), and
# bare peft adapters (LoKr).
KOHYA, DIFFUSERS, PEFT = "kohya", "diffusers", "peft"


@dataclass(frozen=True)
class Component:
    """A file /models/load may name for a family: where it goes in the pipeline and which
    folder of the models root it comes from."""

    attribute: str  # pipeline attribute ("text_encoder_2")
    folder_type: str  # models-root type ("clip", "t5", "vae", "llm")
    # The llama.cpp architectures (general.architecture) a GGUF file in llama.cpp's tensor layout
    # may carry for this text encoder; empty: no check before loading.
    gguf_archs: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelFamily:
    id: str  # "sdxl": trainer configs' model.arch, LORAMESH_<ID>_CONFIG
    name: str  # "SDXL": job records, /health's model_architecture
    display_name: str
    preset: str  # its key in GET /architectures
    pipeline_class: str  # the diffusers text-to-image pipeline
    config_repo: str  # Hugging Face id holding component configs, tokenizers and scheduler
    # What /models/load loads it from: "checkpoint" (everything in one file) or "diffusion"
    # (the denoiser alone, encoders and VAE as separate files or from config_repo).
    model_type: str
    components: dict[str, Component]
    # The components GET /architectures lists as required and optional.
    required_components: tuple[str, ...]
    optional_components: tuple[str, ...]
    generation_defaults: dict[str, float]
    # Flow-matching transformer (rectified flow) or noise-prediction UNet (DDPM).
    flow: bool
    size_divisor: int
    # `prediction` load options that mean something, mapped to the scheduler's prediction_type.
    predictions: dict[str, str | None] = field(default_factory=dict)
    # sd.cpp's clip_skip counts layers from the end; diffusers' skips beyond the layer the
    # pipeline already uses: 1 (the last) for SD1.5, 2 (the penultimate) for SDXL. None: no CLIP.
    clip_skip_base: int | None = None
    # img2img and inpainting, or editing a reference (control) image instead.
    init_image: bool = True
    control_image: bool = False
    lora_formats: tuple[str, ...] = (KOHYA, DIFFUSERS, PEFT)
    # The layout the trainer's `save_format: safetensors` writes (Flux keeps diffusers', as ai-toolkit does).
    trainer_safetensors_format: str = KOHYA
    # Whether the trainer trains LoRAs for it.
    trainable: bool = False
    # Skip-layer guidance (the generation server's slg_scale, skip_layers, slg_start, slg_end):
    # an extra pass with some transformer layers left out steers away from what they add.
    skip_layer_guidance: bool = False
    # Makes videos (POST /txt2vid) rather than images.
    video: bool = False
    # A mixture of two experts (Wan 2.2 A14B): `transformer` denoises the high-noise steps,
    # `transformer_2` those after the pipeline's boundary_ratio; LoRAs name the expert they train.
    moe: bool = False
    # A VAE class of Wan's layout that diffusers does not load from single files (Qwen-Image's
    # AutoencoderKLQwenImage); None: AutoencoderKL, or AutoencoderKLWan for video families.
    vae_class: str | None = None
    # A guidance embedding (Flux): the generation server's distilled_guidance sets it.
    guidance_embedding: bool = False
    # diffusers' first-block cache can skip its transformer blocks (the server's easycache).
    block_cache: bool = False

    @property
    def default_sampler(self) -> tuple[str, str]:
        """(sampler, scheduler) a request without them gets."""
        return ("euler", "discrete") if self.flow else ("euler_a", "discrete")

    def config_source(self, models: ModelSources) -> str:
        """The diffusers folder or Hugging Face id supplying configs for single files
        (LORAMESH_<ID>_CONFIG, else config_repo)."""
        return models.single_file_config(self.id) or self.config_repo

    @property
    def preset_entry(self) -> dict:
        return {"display_name": self.display_name, "requiredComponents": list(self.required_components),
                "optionalComponents": list(self.optional_components),
                "generationDefaults": dict(self.generation_defaults)}


_CLIP_L = Component("text_encoder", "clip")
_VAE = Component("vae", "vae")
# A ControlNet beside the UNet or transformer (diffusers' ControlNet pipelines cover SD1.5, SDXL,
# Flux and Z-Image).
_CONTROLNET = Component("controlnet", "controlnet")
# T5 and UMT5 encoders in GGUF: city96's conversions say "t5encoder", full T5 models "t5".
_T5_GGUF = ("t5encoder", "t5")
_UNET_PREDICTIONS = {"eps": "epsilon", "v": "v_prediction"}

SD15 = ModelFamily(
    id="sd15", name="SD1.5", display_name="Stable Diffusion 1.5", preset="SD1",
    pipeline_class="StableDiffusionPipeline", config_repo="stable-diffusion-v1-5/stable-diffusion-v1-5",
    model_type="checkpoint", components={"vae": _VAE, "clip_l": _CLIP_L, "controlnet": _CONTROLNET},
    required_components=("clip",), optional_components=("vae", "lora", "controlnet"),
    generation_defaults={"width": 512, "height": 512, "steps": 20, "cfg_scale": 7.0},
    flow=False, size_divisor=8, predictions=_UNET_PREDICTIONS, clip_skip_base=1, trainable=True,
)
SDXL = ModelFamily(
    id="sdxl", name="SDXL", display_name="Stable Diffusion XL", preset="SDXL",
    pipeline_class="StableDiffusionXLPipeline", config_repo="stabilityai/stable-diffusion-xl-base-1.0",
    model_type="checkpoint", components={"vae": _VAE, "clip_l": _CLIP_L, "clip_g": Component("text_encoder_2", "clip"),
                                         "controlnet": _CONTROLNET},
    required_components=("clip_l", "clip_g"), optional_components=("vae", "lora", "controlnet"),
    generation_defaults={"width": 1024, "height": 1024, "steps": 25, "cfg_scale": 7.0},
    flow=False, size_divisor=8, predictions=_UNET_PREDICTIONS, clip_skip_base=2, trainable=True,
)
# Flux and Z-Image transformers pack latents into 2x2 patches on top of the VAE's 8x.
FLUX = ModelFamily(
    id="flux", name="Flux", display_name="Flux", preset="Flux",
    pipeline_class="FluxPipeline", config_repo="black-forest-labs/FLUX.1-dev",
    model_type="diffusion", components={"vae": _VAE, "clip_l": _CLIP_L, "t5xxl": Component("text_encoder_2", "t5", _T5_GGUF),
                                        "controlnet": _CONTROLNET},
    required_components=("clip_l", "t5xxl", "vae"), optional_components=("lora", "controlnet"),
    generation_defaults={"width": 1024, "height": 1024, "steps": 20, "cfg_scale": 1.0},
    flow=True, size_divisor=16, predictions={"flux_flow": None}, lora_formats=(DIFFUSERS, PEFT, KOHYA),
    guidance_embedding=True, block_cache=True,
    trainer_safetensors_format=DIFFUSERS, trainable=True,
)
# Kontext edits its reference (control) image; it has no separate img2img or inpainting.
# Its single files look like Flux's, so /models/load reports them as Flux.
FLUX_KONTEXT = ModelFamily(
    id="flux_kontext", name="Flux Kontext", display_name="Flux Kontext", preset="Flux Kontext",
    pipeline_class="FluxKontextPipeline", config_repo="black-forest-labs/FLUX.1-Kontext-dev",
    model_type="diffusion", components={k: v for k, v in FLUX.components.items() if k != "controlnet"},
    required_components=("clip_l", "t5xxl", "vae"), optional_components=("lora",),
    generation_defaults={"width": 1024, "height": 1024, "steps": 28, "cfg_scale": 1.0},
    flow=True, size_divisor=16, predictions={"flux_flow": None}, init_image=False, control_image=True,
    guidance_embedding=True, block_cache=True,
    lora_formats=(DIFFUSERS, PEFT, KOHYA),
)
ZIMAGE = ModelFamily(
    id="zimage", name="Z-Image", display_name="Z-Image", preset="Z-Image",
    pipeline_class="ZImagePipeline", config_repo="Tongyi-MAI/Z-Image-Turbo",
    model_type="diffusion", components={"vae": _VAE, "llm": Component("text_encoder", "llm", ("qwen3",)),
                                        "controlnet": _CONTROLNET},
    required_components=("llm", "vae"), optional_components=("lora", "controlnet"),
    generation_defaults={"width": 1024, "height": 1024, "steps": 8, "cfg_scale": 1.0},
    flow=True, size_divisor=16, lora_formats=(DIFFUSERS, PEFT), block_cache=True,
)

# SD3 / SD3.5: an MMDiT transformer over 2x2 patches, conditioned on CLIP-L, CLIP-G and T5.
# Stability's single files (sd3.5_large.safetensors) hold the transformer and the VAE, the
# text encoders come as separate files: a checkpoint, as the generation server loads it.
SD3 = ModelFamily(
    id="sd3", name="SD3", display_name="Stable Diffusion 3/3.5", preset="SD3",
    pipeline_class="StableDiffusion3Pipeline", config_repo="stabilityai/stable-diffusion-3.5-large",
    model_type="checkpoint", components={"vae": _VAE, "clip_l": _CLIP_L, "clip_g": Component("text_encoder_2", "clip"),
                                         "t5xxl": Component("text_encoder_3", "t5", _T5_GGUF),
                                         "controlnet": _CONTROLNET},
    required_components=("clip_l", "clip_g", "t5xxl"), optional_components=("vae", "lora", "controlnet"),
    generation_defaults={"width": 1024, "height": 1024, "steps": 20, "cfg_scale": 4.5},
    flow=True, size_divisor=16, predictions={"sd3_flow": None}, clip_skip_base=2, lora_formats=(DIFFUSERS, PEFT),
    skip_layer_guidance=True,
)

# Wan 2.1 text-to-video: a 3D-patch transformer over a causal video VAE's latents (4x fewer
# frames, 8x smaller), conditioned on UMT5-XXL. Wan's released files (and ComfyUI's repackaged
# ones) hold the transformer alone: a diffusion model with t5xxl and vae beside it.
WAN21 = ModelFamily(
    id="wan21", name="Wan2.1", display_name="Wan 2.1 (text to video)", preset="Wan2.1",
    pipeline_class="WanPipeline", config_repo="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    model_type="diffusion", components={"vae": _VAE, "t5xxl": Component("text_encoder", "t5", _T5_GGUF)},
    required_components=("t5xxl", "vae"), optional_components=("lora",),
    generation_defaults={"width": 832, "height": 480, "steps": 30, "cfg_scale": 6.0},
    flow=True, size_divisor=16, init_image=False, lora_formats=(DIFFUSERS, PEFT), video=True, block_cache=True,
)

# Qwen-Image: a 60-block MMDiT over 2x2 patches of a Wan-style 16-channel VAE (one frame), conditioned
# on the last hidden state of Qwen2.5-VL-7B; true classifier-free guidance against the negative
# prompt. Released files (Comfy-Org's, city96's GGUF) hold the transformer alone.
QWEN_IMAGE = ModelFamily(
    id="qwen_image", name="Qwen-Image", display_name="Qwen-Image", preset="Qwen-Image",
    pipeline_class="QwenImagePipeline", config_repo="Qwen/Qwen-Image",
    model_type="diffusion", components={"vae": _VAE, "llm": Component("text_encoder", "llm", ("qwen2vl",)),
                                        "controlnet": _CONTROLNET},
    required_components=("llm", "vae"), optional_components=("lora", "controlnet"),
    generation_defaults={"width": 1024, "height": 1024, "steps": 20, "cfg_scale": 2.5},
    flow=True, size_divisor=16, lora_formats=(DIFFUSERS, PEFT, KOHYA), vae_class="AutoencoderKLQwenImage",
    block_cache=True,
)

# Wan 2.2 A14B text-to-video: two Wan 2.1 14B-shaped transformers, the high-noise expert for the
# first steps (down to boundary_ratio 0.875 of the noise) and the low-noise one after. Released as
# two single files (wan2.2_t2v_high_noise_14B / low_noise_14B): /models/load takes the low-noise one
# as the model and the other as high_noise_diffusion_model, as stable-diffusion.cpp does.
WAN22 = ModelFamily(
    id="wan22", name="Wan2.2", display_name="Wan 2.2 A14B (text to video, two experts)", preset="Wan2.2",
    pipeline_class="WanPipeline", config_repo="Wan-AI/Wan2.2-T2V-A14B-Diffusers",
    model_type="diffusion", components=WAN21.components,
    required_components=("t5xxl", "vae"), optional_components=("lora",),
    generation_defaults=dict(WAN21.generation_defaults),
    flow=True, size_divisor=16, init_image=False, lora_formats=(DIFFUSERS, PEFT), video=True, moe=True,
)

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SD15, SDXL, FLUX, FLUX_KONTEXT, ZIMAGE, SD3, WAN21, WAN22,
                                                         QWEN_IMAGE)}
# Every component field /models/load knows, in the order responses list them.
COMPONENT_FIELDS = ("vae", "clip_l", "clip_g", "t5xxl", "controlnet", "llm", "llm_vision")


def family(name: str) -> ModelFamily:
    """The family of a job record's or plan's architecture name ("SDXL")."""
    return FAMILIES[name]


def by_id(family_id: str) -> ModelFamily:
    """The family of a trainer config's model.arch ("sdxl")."""
    return next(f for f in FAMILIES.values() if f.id == family_id)


def trainable() -> tuple[ModelFamily, ...]:
    return tuple(f for f in FAMILIES.values() if f.trainable)


def presets() -> dict[str, dict]:
    """GET /architectures: every family's preset, keyed by preset name."""
    return {f.preset: f.preset_entry for f in FAMILIES.values()}
