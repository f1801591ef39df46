"""The /v1 model catalog: each model id with its base weights, diffusers pipeline class and
the defaults a prompt gets when it leaves a field out. An operator points an id at other
weights (a local diffusers folder or another hub id) with LORAMESH_MODEL_<ID>."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogModel:
    id: str                   # "sd15", "sdxl", "flux", "flux_kontext", "zimage_turbo"
    base_model: str           # HF id, e.g. "black-forest-labs/FLUX.1-dev"
    pipeline_class: str       # diffusers class name
    architecture: str         # one of the architecture names above
    resolution_divisor: int
    default_width: int
    default_height: int
    default_steps: int
    default_guidance_scale: float
    requires_control_image: bool = False
    is_video_model: bool = False
    default_num_frames: int | None = None
    default_fps: int | None = None


CATALOG: dict[str, CatalogModel] = {
    model.id: model
    for model in (
        CatalogModel("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "StableDiffusionPipeline", "SD1.5",
                     resolution_divisor=8, default_width=512, default_height=512, default_steps=25,
                     default_guidance_scale=7.5),
        CatalogModel("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "StableDiffusionXLPipeline", "SDXL",
                     resolution_divisor=8, default_width=1024, default_height=1024, default_steps=30,
                     default_guidance_scale=7.0),
        # guidance_scale is FLUX.1-dev's distilled guidance (no true CFG).
        CatalogModel("flux", "black-forest-labs/FLUX.1-dev", "FluxPipeline", "Flux",
                     resolution_divisor=16, default_width=1024, default_height=1024, default_steps=25,
                     default_guidance_scale=4.0),
        CatalogModel("flux_kontext", "black-forest-labs/FLUX.1-Kontext-dev", "FluxKontextPipeline", "Flux Kontext",
                     resolution_divisor=16, default_width=1024, default_height=1024, default_steps=25,
                     default_guidance_scale=2.5, requires_control_image=True),
        # Distilled for 8 steps without classifier-free guidance (cfg 1.0).
        CatalogModel("zimage_turbo", "Tongyi-MAI/Z-Image-Turbo", "ZImagePipeline", "Z-Image",
                     resolution_divisor=16, default_width=1024, default_height=1024, default_steps=8,
                     default_guidance_scale=1.0),
    )
}


def model_source(model: CatalogModel) -> str:
    """LORAMESH_MODEL_<ID upper> (a local diffusers folder or another HF id) or base_model."""
    return os.environ.get(f"LORAMESH_MODEL_{model.id.upper()}") or model.base_model


def load_catalog_pipeline(model: CatalogModel, device, dtype, token: str | None):
    """from_pretrained(model_source(model), token=token) with the catalog's pipeline class,
    moved to `device`."""
    import diffusers

    pipeline_class = getattr(diffusers, model.pipeline_class)
    pipe = pipeline_class.from_pretrained(model_source(model), token=token, dtype=dtype)
    return pipe.to(device)
