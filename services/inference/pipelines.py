"""The resident generation pipeline and its LoRAs. One pipeline is kept at a time (one model
per GPU), owned by the service's Residency so /vram/free and memory budgets see and can drop
it. LoRAs are hot-swapped as peft adapters on that pipeline: each file is loaded once and
then only re-weighted, so switching LoRAs never reloads the base model."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

import PIL.Image

from loramesh.v1 import events_pb2
from services.common import architectures
from services.common.errors import InvalidInput, NotFound
from services.common.residency import OneResident, module_bytes
from services.inference import generation, model_loading, samplers
from services.inference.generation import LoraWeight
from services.inference.job_spec import ImageSpec

# Adapters kept loaded beside the base weights; the least recently used go first.
MAX_ADAPTERS = 8


def resolve_model_classes() -> None:
    """diffusers imports its classes lazily, on first use, and two threads doing that at once
    (a request being checked while the model thread loads a pipeline) can meet a half-imported
    module: "cannot import name 'StableDiffusionPipeline'". Resolved once at start-up, on one
    thread, they are plain attributes from then on."""
    import diffusers

    names = {family.pipeline_class for family in architectures.FAMILIES.values()}
    names |= samplers.scheduler_class_names()
    names |= {"AutoPipelineForImage2Image", "AutoPipelineForInpainting", "AutoencoderKL", "AutoencoderKLWan",
              "WanTransformer3DModel", "AutoencoderKLQwenImage", "QwenImageTransformer2DModel"}
    # ControlNet variants and EasyCache.
    names |= {"AutoPipelineForText2Image", "ControlNetModel", "FirstBlockCacheConfig",
              *(f"StableDiffusion{xl}ControlNet{task}Pipeline" for xl in ("", "XL")
                for task in ("", "Img2Img", "Inpaint"))}
    names |= {"FluxControlNetModel", "FluxControlNetPipeline", "FluxControlNetImg2ImgPipeline",
              "FluxControlNetInpaintPipeline", "ZImageControlNetModel", "ZImageControlNetPipeline",
              "SD3ControlNetModel", "StableDiffusion3ControlNetPipeline", "QwenImageControlNetModel",
              "QwenImageControlNetPipeline"}
    for name in sorted(names):
        getattr(diffusers, name)


class LoadedPipeline:
    def __init__(self, key: str, architecture: str, pipe):
        self.key = key
        self.architecture = architecture
        self.family = architectures.family(architecture)
        self.pipe = pipe
        pipe.set_progress_bar_config(disable=True)
        self._scheduler_config = pipe.scheduler.config
        self._variants: dict[str, object] = {"txt2img": pipe}
        self._schedulers: dict[tuple[str, str], object] = {}
        # (file identity (path, mtime, size), expert) -> adapter name, least recently used first;
        # the expert ("high", "low") only on two-expert models, where one file may sit in both
        self._adapters: OrderedDict[tuple[tuple[str, int, int], str | None], str] = OrderedDict()
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ LoRAs

    def set_loras(self, loras: list[LoraWeight]) -> None:
        """Hot-swap: adapters already loaded stay loaded (cached by path+mtime+size);
        a changed scale only re-weights; never reloads the base model."""
        with self._lock:
            weights: dict[str, float] = {}
            keep = {(self._identity(other.path), other.transformer if self.family.moe else None) for other in loras}
            for lora in loras:
                name = self._adapter(lora.path, lora.transformer, keep)
                weights[name] = weights.get(name, 0.0) + float(lora.scale)
            # A zero weight is left out entirely, so the image is exactly the base model's.
            active = {name: scale for name, scale in weights.items() if scale != 0.0}
            if not self._adapters:
                return
            if self.family.moe:
                self._set_expert_adapters(active)
                return
            if not active:
                self.pipe.disable_lora()
                return
            self.pipe.enable_lora()
            self.pipe.set_adapters(list(active), adapter_weights=list(active.values()))

    def _experts(self) -> list:
        """The denoisers holding adapters: both experts of a two-expert model."""
        models = (getattr(self.pipe, name, None) for name in ("transformer", "transformer_2"))
        return [m for m in models if m is not None and getattr(m, "_hf_peft_config_loaded", False)]

    def _set_expert_adapters(self, active: dict[str, float]) -> None:
        """Each expert runs the active adapters it holds; one holding none of them runs bare.
        (diffusers' pipeline-wide set_adapters wants every adapter in every denoiser.)"""
        for model in self._experts():
            wanted = [name for name in active if name in model.peft_config]
            if not wanted:
                model.disable_lora()
                continue
            model.enable_lora()
            model.set_adapters(wanted, [active[name] for name in wanted])

    def adapters(self) -> list[str]:
        """Names of the adapters loaded now, least recently used first."""
        return list(self._adapters.values())

    @staticmethod
    def _identity(path: Path) -> tuple[str, int, int]:
        resolved = Path(path).resolve()
        try:
            stat = resolved.stat()
        except FileNotFoundError as exc:
            raise NotFound(f"LoRA not found: {path}") from exc
        return str(resolved), stat.st_mtime_ns, stat.st_size

    def _adapter(self, path: Path, transformer: str | None, keep: set) -> str:
        key = (self._identity(path), transformer if self.family.moe else None)
        name = self._adapters.get(key)
        if name is not None:
            self._adapters.move_to_end(key)
            return name
        self._evict(keep)
        name = "lora_" + hashlib.sha256(repr(key).encode()).hexdigest()[:16]
        # Two-expert models: "low" goes into the low-noise expert (transformer_2).
        into = {"load_into_transformer_2": True} if key[1] == "low" else {}
        try:
            with warnings.catch_warnings():
                # Several adapters on one model is the point of hot-swapping.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                self.pipe.load_lora_weights(key[0][0], adapter_name=name, **into)
        except Exception as exc:  # diffusers/peft raise many types for keys they cannot place
            self._forget(name)
            layouts = ", ".join(self.family.lora_formats)
            raise InvalidInput("loras", f"{Path(path).name} is not a LoRA that fits this {self.architecture} "
                                        f"model, which reads {layouts} layouts ({exc})") from exc
        self._adapters[key] = name
        return name

    def _evict(self, keep: set) -> None:
        while len(self._adapters) >= MAX_ADAPTERS:
            victim = next((identity for identity in self._adapters if identity not in keep), None)
            if victim is None:
                return
            self._forget(self._adapters.pop(victim))

    def _forget(self, name: str) -> None:
        if self.family.moe:  # the adapter sits in one expert, which diffusers' pipeline-wide delete assumes not
            for model in self._experts():
                if name in model.peft_config:
                    model.delete_adapters(name)
            return
        try:
            self.pipe.delete_adapters(name)
        except Exception:  # a failed load may have placed the adapter in some components only
            pass

    # ------------------------------------------------------------------ generation

    def variant(self, task: str, controlnet: bool = False):
        """The pipeline for "txt2img", "img2img" or "inpaint", sharing this one's modules; with
        `controlnet`, diffusers' ControlNet pipeline for the task, on the loaded ControlNet."""
        key = f"{task}+controlnet" if controlnet else task
        with self._lock:
            if key not in self._variants:
                from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

                auto = {"txt2img": AutoPipelineForText2Image, "img2img": AutoPipelineForImage2Image,
                        "inpaint": AutoPipelineForInpainting}[task]
                extra = {"controlnet": self.pipe.controlnet} if controlnet else {}
                derived = auto.from_pipe(self.pipe, **extra)
                derived.set_progress_bar_config(disable=True)
                self._variants[key] = derived
            return self._variants[key]

    def scheduler(self, sampling: samplers.Sampling, flow_shift: float | None = None):
        """The scheduler for a sampling pair, built once from the model's own scheduler config;
        with `flow_shift`, a fixed shift of the flow-matching noise schedule."""
        if flow_shift is None and "shift" not in self._scheduler_config:
            # Wan's own (UniPC) scheduler names its shift flow_shift; the flow-matching Euler one
            # it is swapped for reads `shift`, so the model's own shift is carried over.
            flow_shift = self._scheduler_config.get("flow_shift") if self.family.flow else None
        key = (sampling.sampler, sampling.scheduler, flow_shift)
        if key not in self._schedulers:
            scheduler = samplers.build_scheduler(sampling, self._scheduler_config)
            if flow_shift is not None:
                scheduler = type(scheduler).from_config(scheduler.config, shift=flow_shift, use_dynamic_shifting=False)
            self._schedulers[key] = scheduler
        return self._schedulers[key]

    def generate(self, request: ImageSpec, on_step: Callable[[int, int], None],
                 images: Mapping[str, PIL.Image.Image] = MappingProxyType({}),
                 on_latents: generation.OnLatents | None = None) -> PIL.Image.Image:
        """One image; `images` holds the input images the request names. on_step(step,
        total_steps) after every denoising step (1-based), then on_latents(pipe, latents, step,
        total_steps) (live previews); exceptions they raise (Cancelled) propagate. Generator: torch.Generator("cpu").manual_seed(seed),
        so output equals the plain diffusers pipeline called with the same arguments."""
        if request.controlnet_image is not None and request.controlnet_strength == 0.0:
            # No influence is the model alone: Flux's ControlNet pipelines draw the control
            # image's latents from the generator and would change the noise.
            request = dataclasses.replace(request, controlnet_image=None)
        with self._lock:
            sampling = samplers.resolve(self.architecture, request.sampler, request.scheduler)
            pipe = self.variant(request.task, controlnet=request.controlnet_image is not None)
            pipe.scheduler = self.scheduler(sampling)
            with model_loading.vae_tiling_for(pipe.vae, request.vae_tiling):
                return generation.generate(pipe, self.family, request, images, sampling, on_step, on_latents)


    def generate_video(self, request: ImageSpec, on_step: Callable[[int, int], None],
                       on_latents: generation.OnLatents | None = None):
        """One video's frames ((frames, height, width, 3) uint8), as generate makes an image:
        equal to the plain diffusers pipeline with the same arguments, scheduler and seed."""
        with self._lock:
            sampling = samplers.resolve(self.architecture, request.sampler, request.scheduler)
            self.pipe.scheduler = self.scheduler(sampling, request.flow_shift)
            return generation.generate_video(self.pipe, self.family, request, sampling, on_step, on_latents)


class PipelineHost(OneResident):
    """Keeps at most one pipeline resident (one model per GPU). Loads and unloads are announced
    (`announce`: model_loading_progress, model_loaded, model_unloaded)."""

    unloaded_kind = events_pb2.EVENT_KIND_MODEL_UNLOADED

    def get(self, key: str, architecture: str, load: Callable[[], object], name: str = "") -> LoadedPipeline:
        """The pipeline for `key` (the model `name`), loading it (after unloading any other) when
        needed. The Residency owns it (under the name `key`); this host only remembers which key
        is current, so a /vram/free really releases the memory."""
        with self._lock:
            self._make_current(key, name)

            def load_resident():
                import torch

                started = time.perf_counter()
                pipe = load()
                modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
                if getattr(pipe, "controlnet", None) is not None:  # kept beside the components
                    modules.append(pipe.controlnet)
                nbytes = module_bytes(*modules)
                self.announce(events_pb2.EVENT_KIND_MODEL_LOADED, {
                    "model_name": name, "model_architecture": architecture, "bytes": nbytes,
                    "seconds": round(time.perf_counter() - started, 3)})
                return LoadedPipeline(key, architecture, pipe), str(self.device), nbytes

            return self._residency.get(key, load_resident)

    def loading_stage(self, name: str) -> Callable[[str, int, int], None]:
        """What a load reports its stages to: model_loading_progress events for `name`."""
        def report(stage: str, step: int, total: int) -> None:
            self.announce(events_pb2.EVENT_KIND_MODEL_LOADING_PROGRESS, {
                "model_name": name, "stage": stage, "step": step, "total_steps": total,
                "progress": round(step / total, 3) if total else 1.0})
        return report

    def loaded(self) -> LoadedPipeline | None:
        resident = self._current()
        return resident.model if resident is not None else None

    def resident(self) -> tuple[str, str] | None:
        """The name and architecture of the model resident here, if any."""
        loaded = self.loaded()
        return (self._name, loaded.architecture) if loaded is not None else None
