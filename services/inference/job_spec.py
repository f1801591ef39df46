"""What an inference job runs, typed: built once when either API accepts a request
(submissions.py), stored with the job's record in NATS, and read as is by the worker, the
status routes and the event publisher.

A job makes one image per `ImageSpec`; input images (img2img, masks, Kontext references)
are named here and kept in the object store until the job ends.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from services.inference.conversion import ConversionPlan
from services.inference.downloads import DownloadPlan
from services.inference.model_loading import LoadPlan
from services.inference.upscaling import UpscaleSpec

TXT2IMG, IMG2IMG = "txt2img", "img2img"
# POST /txt2vid and /v1 video models: each ImageSpec (video_frames set) makes one MP4.
TXT2VID = "txt2vid"
# POST /convert: no images; the job writes one GGUF file (its `conversion`).
CONVERT = "convert"
# POST /models/download: a DOWNLOAD job fetches the file (its `download` plan) and names it in
# its outputs; the HASH job queued behind it hashes that file into the hash cache.
DOWNLOAD, HASH = "download", "hash"
# POST /upscale: no ImageSpec; the job upscales its input image ("input") by its `upscale`.
UPSCALE = "upscale"
SERVER_API, V1_API = "server", "v1"
PNG, JPEG, MP4 = "png", "jpeg", "mp4"
# The generation-server document's skip-layer guidance settings (slg_scale 0 = off).
SLG_DEFAULTS: dict[str, Any] = {"slg_scale": 0.0, "skip_layers": [7, 8, 9], "slg_start": 0.01, "slg_end": 0.2}


@dataclass
class ImageSpec:
    """One image to make, every setting resolved (defaults filled, seed chosen)."""

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    guidance_scale: float = 7.0
    seed: int = 0
    sampler: str | None = None  # a samplers.SAMPLERS name (or "flowmatch"); None = the family's default
    scheduler: str | None = None  # a samplers.SCHEDULERS name; None = the family's default
    clip_skip: int | None = None  # sd.cpp convention: None = model default, 1 = last layer, 2 = one skipped
    distilled_guidance: float | None = None  # Flux guidance embedding; None = guidance_scale is it
    eta: float = 0.0
    strength: float = 0.75  # img2img: how much of the schedule runs
    # Names of the job's input images: img2img source, inpainting mask (white repaints),
    # reference image of an editing model (Flux Kontext's ctrl_img).
    init: str | None = None
    mask: str | None = None
    control: str | None = None
    # VAE tiling for this image: [tile width, tile height (0 = the VAE's own), overlap 0-1];
    # None = as the model was loaded.
    vae_tiling: list[float] | None = None
    # Skip-layer guidance (families with skip_layer_guidance): between slg_start and slg_end
    # (fractions of the steps) a pass without the transformer layers `skip_layers` is made,
    # and the prediction is pushed away from it by slg_scale. 0 = off.
    slg_scale: float = SLG_DEFAULTS["slg_scale"]
    skip_layers: list[int] = field(default_factory=lambda: list(SLG_DEFAULTS["skip_layers"]))
    slg_start: float = SLG_DEFAULTS["slg_start"]
    slg_end: float = SLG_DEFAULTS["slg_end"]
    # The input image the loaded ControlNet is conditioned on (resized to the output size), and
    # its weight (diffusers' controlnet_conditioning_scale).
    controlnet_image: str | None = None
    controlnet_strength: float = 0.9
    # EasyCache for transformer models: [threshold, start, end] (start and end fractions of the
    # steps); None = every step runs every block.
    easycache: list[float] | None = None
    # Video models: frames to make (0 = an image), frames per second of the MP4, and the
    # flow-matching shift of the noise schedule (None = the model's own).
    video_frames: int = 0
    fps: int = 16
    flow_shift: float | None = None
    # Two-expert video models (Wan 2.2): where in the noise schedule (a fraction of it) the
    # low-noise expert takes over, None = the model's own boundary_ratio; and the high-noise
    # expert's guidance, None = guidance_scale (which the low-noise expert always uses).
    moe_boundary: float | None = None
    high_noise_guidance_scale: float | None = None

    @property
    def task(self) -> str:
        """The pipeline variant it needs: "txt2img", "img2img" or "inpaint"."""
        if self.init is not None:
            return "inpaint" if self.mask is not None else "img2img"
        return "txt2img"


@dataclass
class LoraSpec:
    path: str  # a local .safetensors file, or the URL it is downloaded from
    scale: float
    url: str | None = None
    # Two-expert models: "high" or "low", the expert it applies to; None = as the file says
    # (diffusers' default placement).
    transformer: str | None = None


@dataclass
class ModelRef:
    """What a job runs on: a /v1 catalog entry, or the plan /models/load recorded."""

    catalog: str | None = None
    plan: LoadPlan | None = None

    @property
    def key(self) -> str:
        """Equal for jobs that can share a loaded pipeline."""
        return f"catalog:{self.catalog}" if self.catalog else self.plan.key()

    @property
    def name(self) -> str:
        return self.catalog or self.plan.model_name


@dataclass
class JobSpec:
    type: str  # TXT2IMG, IMG2IMG, TXT2VID, CONVERT, DOWNLOAD, HASH or UPSCALE; /v1 requests are TXT2IMG, IMG2IMG or TXT2VID by their model
    api: str  # SERVER_API or V1_API
    model: ModelRef
    architecture: str  # a services.common.architectures family name ("SDXL")
    images: list[ImageSpec]
    loras: list[LoraSpec] = field(default_factory=list)
    output_format: str = PNG
    # The request as GET /queue/{id} shows it, with the seed used.
    params: dict[str, Any] = field(default_factory=dict)
    conversion: ConversionPlan | None = None  # CONVERT jobs only
    download: DownloadPlan | None = None  # DOWNLOAD and HASH jobs only
    # UPSCALE jobs; txt2img/img2img with `upscale`: every image is upscaled after generation.
    upscale: UpscaleSpec | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["model"] = {"catalog": self.model.catalog, "plan": self.model.plan.to_json() if self.model.plan else None}
        data["conversion"] = self.conversion.to_json() if self.conversion else None
        data["download"] = self.download.to_json() if self.download else None
        data["upscale"] = self.upscale.to_json() if self.upscale else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> JobSpec:
        model = data["model"]
        return cls(
            type=data["type"], api=data["api"], architecture=data["architecture"],
            model=ModelRef(model.get("catalog"), LoadPlan.from_json(model["plan"]) if model.get("plan") else None),
            images=[ImageSpec(**image) for image in data["images"]],
            loras=[LoraSpec(**lora) for lora in data["loras"]],
            output_format=data["output_format"], params=data["params"],
            conversion=ConversionPlan.from_json(data["conversion"]) if data.get("conversion") else None,
            download=DownloadPlan.from_json(data["download"]) if data.get("download") else None,
            upscale=UpscaleSpec.from_json(data["upscale"]) if data.get("upscale") else None,
        )
