"""The /v1 model catalog: each model id with its base weights, diffusers pipeline class and
the defaults a prompt gets when it leaves a field out. An operator points an id at other
weights (a local diffusers folder or another hub id) with LORAMESH_MODEL_<ID>."""

from __future__ import annotations

from dataclasses import dataclass

from services.common import architectures
from services.common.architectures import ModelFamily
from services.common.settings import ModelSources


@dataclass(frozen=True)
class CatalogModel:
    id: str                   # "sd15", "sdxl", "flux", "flux_kontext", "zimage_turbo", "wan22_14b_t2v", ...
    family: ModelFamily       # its weights' HF id, pipeline class, size divisor, samplers
    default_width: int
    default_height: int
    default_steps: int
    default_guidance_scale: float
    is_video_model: bool = False
    default_num_frames: int | None = None
    default_fps: int | None = None
    # Its weights' Hugging Face id when not the family's (a larger model of the same family).
    repo: str | None = None

    @property
    def base_model(self) -> str:
        return self.repo or self.family.config_repo

    @property
    def architecture(self) -> str:
        return self.family.name

    @property
    def resolution_divisor(self) -> int:
        return self.family.size_divisor

    @property
    def requires_control_image(self) -> bool:
        return self.family.control_image


CATALOG: dict[str, CatalogModel] = {
    model.id: model
    for model in (
        CatalogModel("sd15", architectures.SD15,
                     default_width=512, default_height=512, default_steps=25,
                     default_guidance_scale=7.5),
        CatalogModel("sdxl", architectures.SDXL,
                     default_width=1024, default_height=1024, default_steps=30,
                     default_guidance_scale=7.0),
        # guidance_scale is FLUX.1-dev's distilled guidance (no true CFG).
        CatalogModel("flux", architectures.FLUX,
                     default_width=1024, default_height=1024, default_steps=25,
                     default_guidance_scale=4.0),
        CatalogModel("flux_kontext", architectures.FLUX_KONTEXT,
                     default_width=1024, default_height=1024, default_steps=25,
                     default_guidance_scale=2.5),
        # Distilled for 8 steps without classifier-free guidance: diffusers' guidance_scale 0
        # (guidance_scale reaches diffusers as it is on this API).
        CatalogModel("zimage_turbo", architectures.ZIMAGE,
                     default_width=1024, default_height=1024, default_steps=8,
                     default_guidance_scale=0.0),
        # Text-to-video: each prompt item makes one MP4 (num_frames, fps). The defaults are the
        # reference server's: 41 frames at 16 fps, 25 steps, guidance 4.
        CatalogModel("wan21_1b_t2v", architectures.WAN21,
                     default_width=832, default_height=480, default_steps=25, default_guidance_scale=4.0,
                     is_video_model=True, default_num_frames=41, default_fps=16),
        CatalogModel("wan21_14b_t2v", architectures.WAN21,
                     default_width=1280, default_height=720, default_steps=25, default_guidance_scale=4.0,
                     is_video_model=True, default_num_frames=41, default_fps=16,
                     repo="Wan-AI/Wan2.1-T2V-14B-Diffusers"),
        # Two experts: its LoRAs say which one they apply to ("transformer": "low" or "high").
        CatalogModel("wan22_14b_t2v", architectures.WAN22,
                     default_width=1280, default_height=720, default_steps=25, default_guidance_scale=4.0,
                     is_video_model=True, default_num_frames=41, default_fps=16),
    )
}


def model_source(model: CatalogModel, models: ModelSources) -> str:
    """LORAMESH_MODEL_<ID upper> (a local diffusers folder or another HF id) or base_model."""
    return models.catalog_model(model.id) or model.base_model


def load_catalog_pipeline(model: CatalogModel, models: ModelSources, device, dtype, token: str | None):
    """from_pretrained(model_source(model), token=token) with the family's pipeline class,
    moved to `device`."""
    import diffusers

    pipeline_class = getattr(diffusers, model.family.pipeline_class)
    pipe = pipeline_class.from_pretrained(model_source(model, models), token=token, dtype=dtype)
    return pipe.to(device)
