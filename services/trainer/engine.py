"""The training engine: one LoRA/LoKr training run (or a full fine-tune of the denoiser)
on diffusers + peft, read top to bottom like diffusers' train_dreambooth_lora_sdxl.py. It
loads the model, adds the adapters, resumes from the newest checkpoint, and then trains
one optimizer step per `train_step()` call; the session runtime decides how many steps to
run, when to save and when to sample, and calls `save_final()` once training is done.
Nothing here knows about gRPC or NATS."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoKrConfig, LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from services.common.architectures import KOHYA, by_id
from services.common.devices import default_dtype, pick_device
from services.common.residency import module_bytes
from services.trainer import checkpoints
from services.trainer.architectures import ARCHITECTURES, SAMPLERS, Architecture, Flux, StableDiffusionFamily
from services.trainer.dataset import Sample, TrainingDataset
from services.trainer.extract import extract_lora
from services.trainer.job_config import JobConfig
from services.trainer.optim import build_lr_scheduler, build_optimizer

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# Linear layers of the attention and feed-forward blocks: what ai-toolkit's LoRA trains.
DENOISER_LINEAR = re.compile(r"(attentions|transformer_blocks|single_transformer_blocks)\.")
# Convolutions of the UNet's resnets and samplers: trained when `conv` is set (LoCon).
DENOISER_CONV = re.compile(r"(resnets\.\d+\.(conv1|conv2|conv_shortcut)|(down|up)samplers\.\d+\.conv)$")

Log = Callable[[str, str], None]


@dataclass
class StepResult:
    step: int
    loss: float
    learning_rate: float
    seconds: float


@dataclass
class SampleImage:
    step: int
    prompt: str
    path: Path


@dataclass
class FinalOutputs:
    """What a finished run leaves: the LoRA (extracted, for a full fine-tune) and, for a
    full fine-tune, the denoiser's weights."""

    lora: Path
    full_weights: Path | None


@dataclass
class RunInputs:
    """Where a run reads and writes, resolved and checked by the caller."""

    model_source: str
    single_file_config: str | None
    training_folder: Path
    dataset_folders: list[Path]
    mask_folders: list[Path | None]
    device: str
    notes: list[str] = field(default_factory=list)


def _attach_adapter(module: torch.nn.Module, config) -> None:
    """Adds the adapter as diffusers' add_adapter does, for diffusers and transformers
    models alike (peft_config is what peft's state-dict helpers read)."""
    inject_adapter_in_model(config, module, adapter_name="default")
    module.peft_config = {"default": config}
    module._hf_peft_config_loaded = True


def _adapter_metadata(prefix: str, config) -> dict:
    """The adapter config under the model's prefix: diffusers rebuilds ranks and alphas from it."""
    return {f"{prefix}.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}


class TrainingRun:
    def __init__(self, job: JobConfig, inputs: RunInputs, *, max_steps: int, log: Log | None = None):
        self.job = job
        self.process = job.process
        self.train = job.process.train
        self.inputs = inputs
        self.max_steps = max_steps
        # Full fine-tuning: the whole denoiser trains, no adapters; a LoRA is extracted at the end.
        self.full = job.process.network.type == "full"
        self.notes: list[str] = list(inputs.notes)
        self.step = 0
        self.last_checkpoint: checkpoints.Checkpoint | None = None
        self._log = log or (lambda level, message: None)
        self.name = job.name
        self.training_folder = inputs.training_folder

    # ---- setup -------------------------------------------------------------------------

    def note(self, message: str) -> None:
        """A config value that was replaced or ignored to run here: logged and shown in status."""
        if message not in self.notes:
            self.notes.append(message)
        self._log("warning", message)

    def load(self) -> None:
        started = time.perf_counter()
        self._choose_device()
        if self.process.logging.use_wandb:
            self.note("logging.use_wandb: wandb is not available offline; the loss history is at "
                      "GET /sessions/{session_id}/loss")
        arch_class = ARCHITECTURES[self.process.model.arch]
        self._log("info", f"loading {self.process.model.arch} model from {self.inputs.model_source}")
        pipe = arch_class.load(self.inputs.model_source, self.inputs.single_file_config, self.weight_dtype)
        pipe.set_progress_bar_config(disable=True)
        self.arch = self._architecture(arch_class, pipe)
        self._prepare_model()
        self._add_adapters()
        self.dataset = TrainingDataset(self._datasets(), trigger_word=self.process.trigger_word, seed=self.train.seed)
        for path, reason in self.dataset.skipped:
            self._log("warning", f"skipped {path}: {reason}")
        self._log("info", f"dataset: {self.dataset.describe()}")
        self.rng = random.Random(self.train.seed)
        self.generator = torch.Generator("cpu").manual_seed(self.train.seed)
        self._batches = self.dataset.batches(self.train.batch_size, self.rng)
        self._prepare_caches()
        self.optimizer, optimizer_notes = build_optimizer(self.train, self._param_groups(), self.device)
        for message in optimizer_notes:
            self.note(message)
        self.lr_scheduler = build_lr_scheduler(self.train, self.optimizer, self.max_steps)
        self.ema = [p.detach().clone() for p in self.trainable] if self.train.ema_config.use_ema else None
        self._resume()
        self._log("info", f"ready in {time.perf_counter() - started:.1f}s on {self.device} at step {self.step}: "
                          f"{sum(p.numel() for p in self.trainable):,} trainable parameters")

    def _choose_device(self) -> None:
        wanted = self.inputs.device
        self.device = pick_device(wanted)
        on_cuda = self.device.type == "cuda"
        if wanted.startswith("cuda") and not on_cuda:
            self.note(f"device {wanted} unavailable; trained on {self.device.type}")
        # The config's precision applies on CUDA; elsewhere half precision is slow or missing.
        self.weight_dtype = DTYPES[self.train.dtype] if on_cuda else default_dtype(self.device)
        self.autocast_dtype = DTYPES[self.train.mixed_precision] if on_cuda else None
        if not on_cuda and (self.train.dtype != "fp32" or self.train.mixed_precision != "fp32"):
            self.note(f"{self.train.mixed_precision} mixed precision needs CUDA; trained in float32 on cpu")
        if self.full and self.weight_dtype != torch.float32 and self.autocast_dtype in (None, torch.float32):
            # The denoiser keeps float32 master weights; its half-precision inputs need autocast.
            self.autocast_dtype = self.weight_dtype
            self.note(f"full fine-tuning keeps float32 weights: computed in {self.train.dtype} mixed precision")
        model = self.process.model
        for flag in ("quantize", "quantize_te"):
            if getattr(model, flag):
                self.note(f"model.{flag} is not available here; the model was loaded unquantized")
        if model.low_vram and not on_cuda:
            self.note(f"model.low_vram only offloads on CUDA; nothing to offload on {self.device.type}")
        if model.model_kwargs:
            self.note(f"model.model_kwargs {sorted(model.model_kwargs)} were ignored")

    def _architecture(self, arch_class, pipe) -> Architecture:
        train = self.train
        if issubclass(arch_class, StableDiffusionFamily):
            if train.bypass_guidance_embedding:
                self.note(f"bypass_guidance_embedding applies to flux only; ignored for {arch_class.name}")
            if train.noise_scheduler == "flowmatch":
                self.note(f"{arch_class.name} trains on its DDPM noise schedule; noise_scheduler flowmatch ignored")
            return arch_class(pipe, self.device, self.weight_dtype, zero_terminal_snr=train.zero_terminal_snr,
                              min_snr_gamma=train.min_snr_gamma)
        if train.noise_scheduler != "flowmatch":
            self.note(f"flux trains with flow matching; noise_scheduler {train.noise_scheduler} ignored")
        if train.min_snr_gamma:
            self.note("min_snr_gamma applies to DDPM schedules; not used for flux")
        if train.zero_terminal_snr:
            self.note("zero_terminal_snr applies to DDPM schedules; not used for flux")
        if train.train_text_encoder:
            self.note("text encoder training is not supported for flux; only the transformer is trained")
        return Flux(pipe, self.device, self.weight_dtype, bypass_guidance=train.bypass_guidance_embedding)

    @property
    def trains_text_encoders(self) -> bool:
        return self.train.train_text_encoder and not isinstance(self.arch, Flux) and not self.full

    @property
    def preserves_output(self) -> bool:
        # Differential output preservation compares with the base model, which a full
        # fine-tune does not keep.
        return self.train.diff_output_preservation and not self.full

    def _prepare_model(self) -> None:
        pipe = self.arch.pipe
        pipe.to(self.device)
        if getattr(pipe.vae.config, "force_upcast", False):
            # The SDXL VAE overflows in half precision.
            pipe.vae.to(torch.float32)
        for module in [pipe.vae, self.arch.denoiser, *self.arch.text_encoders().values()]:
            module.requires_grad_(False)
        if self.train.gradient_checkpointing:
            if self.train.train_unet:
                self.arch.denoiser.enable_gradient_checkpointing()
            if self.trains_text_encoders:
                for encoder in self.arch.text_encoders().values():
                    getattr(encoder, "activation_checkpointing_enable", encoder.gradient_checkpointing_enable)()

    def _adapter_config(self, targets: list[str], conv_targets: list[str]):
        network = self.process.network
        if network.type == "lokr":
            rank, alpha = network.linear, network.linear_alpha
            if network.lokr_full_rank:
                # A rank past half the layer size makes peft keep LoKr's second factor whole.
                rank = alpha = 100_000
            return LoKrConfig(r=rank, alpha=alpha, target_modules=targets + conv_targets,
                              decompose_factor=network.lokr_factor, init_weights=True)
        rank_pattern = {re.escape(name): network.conv for name in conv_targets}
        alpha_pattern = {re.escape(name): network.conv_alpha for name in conv_targets}
        return LoraConfig(r=network.linear, lora_alpha=network.linear_alpha, target_modules=targets + conv_targets,
                          rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, init_lora_weights="gaussian")

    def _add_adapters(self) -> None:
        network = self.process.network
        if self.full:
            self._train_whole_denoiser()
            return
        if network.type == "lora" and network.conv:
            self.note("network.conv is set: convolutions are trained too (LoCon)")
        self.adapted: dict[str, torch.nn.Module] = {}
        if self.train.train_unet:
            linear, conv = self._denoiser_targets()
            _attach_adapter(self.arch.denoiser, self._adapter_config(linear, conv))
            self.adapted[self.arch.denoiser_name] = self.arch.denoiser
        if self.trains_text_encoders:
            for name, encoder in self.arch.text_encoders().items():
                targets = [n for n, m in encoder.named_modules()
                           if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TEXT_ENCODER_TARGETS
                           and self._allowed(n)]
                _attach_adapter(encoder, self._adapter_config(targets, []))
                self.adapted[name] = encoder
        if not self.adapted:
            raise ValueError("nothing to train: both train_unet and train_text_encoder are off")
        for module in self.adapted.values():
            for param in module.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
        self.trainable = [p for m in self.adapted.values() for p in m.parameters() if p.requires_grad]

    def _train_whole_denoiser(self) -> None:
        """Full fine-tuning: every weight of the denoiser trains, in float32 like adapters."""
        denoiser = self.arch.denoiser
        if self.train.train_text_encoder and not isinstance(self.arch, Flux):
            self.note("full fine-tuning trains the denoiser only; train_text_encoder ignored")
        if self.train.diff_output_preservation:
            self.note("diff_output_preservation needs the base model beside the trained one; "
                      "off for full fine-tuning")
        if self.train.scale_weight_norms:
            self.note("scale_weight_norms limits LoRA weights; ignored for full fine-tuning")
        network = self.process.network
        if network.linear_alpha != network.linear:
            self.note(f"the LoRA extracted from a full fine-tune has alpha = rank = {network.linear}; "
                      f"linear_alpha {network.linear_alpha:g} ignored")
        denoiser.to(torch.float32)
        denoiser.requires_grad_(True)
        self.adapted = {self.arch.denoiser_name: denoiser}
        self.trainable = [p for p in denoiser.parameters() if p.requires_grad]

    def _allowed(self, name: str) -> bool:
        network = self.process.network
        if any(fragment in name for fragment in network.ignore_if_contains):
            return False
        return not network.only_if_contains or any(fragment in name for fragment in network.only_if_contains)

    def _denoiser_targets(self) -> tuple[list[str], list[str]]:
        linear, conv = [], []
        train_conv = bool(self.process.network.conv)
        for name, module in self.arch.denoiser.named_modules():
            if not self._allowed(name):
                continue
            if isinstance(module, torch.nn.Linear) and DENOISER_LINEAR.search(name):
                linear.append(name)
            elif train_conv and isinstance(module, torch.nn.Conv2d) and DENOISER_CONV.search(name):
                conv.append(name)
        if not linear and not conv:
            raise ValueError("network_kwargs leave no layer to train")
        return linear, conv

    def _datasets(self):
        return [
            replace(d, folder_path=str(folder), mask_path=str(mask) if mask else None)
            for d, folder, mask in zip(self.process.datasets, self.inputs.dataset_folders, self.inputs.mask_folders,
                                       strict=True)
        ]

    def _param_groups(self) -> list[dict]:
        groups = []
        for name, module in self.adapted.items():
            params = [p for p in module.parameters() if p.requires_grad]
            is_text = name != self.arch.denoiser_name
            lr = (self.train.text_encoder_lr or self.train.lr) if is_text else self.train.lr
            groups.append({"params": params, "lr": lr, "name": name})
        return groups

    # ---- caches ------------------------------------------------------------------------

    def _prepare_caches(self) -> None:
        """Latents of every cacheable item and text-encoder outputs of every caption are
        computed once (in memory or on disk) when the config asks for it."""
        self._latents: dict[int, torch.Tensor] = {}
        self._embeds: dict[str, dict[str, torch.Tensor]] = {}
        self.cache_latents = any(d.cache_latents or d.cache_latents_to_disk for d in self.process.datasets)
        wants_text_cache = self.train.cache_text_encoder_outputs or self.train.unload_text_encoder
        self.cache_text = wants_text_cache and not self.trains_text_encoders
        if wants_text_cache and self.trains_text_encoders:
            self.note("cache_text_encoder_outputs/unload_text_encoder are off while the text encoder trains "
                      "(its outputs change every step)")
        if self.cache_latents:
            to_disk = any(d.cache_latents_to_disk for d in self.process.datasets)
            count = 0
            for index in range(len(self.dataset)):
                if self.dataset.cacheable(index):
                    self._latents[index] = self._cached_latent(index, to_disk)
                    count += 1
            self._log("info", f"cached latents of {count} of {len(self.dataset)} items"
                              f"{' on disk' if to_disk else ''}")
        if self.cache_text:
            if any(d.shuffle_tokens or d.token_dropout_rate for d in self.process.datasets):
                self.note("cached text-encoder outputs: token shuffling and dropout are off (captions stay whole)")
            captions = {self.dataset.caption(i, None) for i in range(len(self.dataset))} | {""}
            captions |= {text for pair in self._sample_prompts() for text in pair if text}
            if self.preserves_output:
                captions |= {self._class_caption(c) for c in captions}
            to_disk = self.train.cache_text_encoder_outputs_to_disk
            for caption in sorted(captions):
                self._embeds[caption] = self._cached_embeds(caption, to_disk)
            self._log("info", f"cached text-encoder outputs of {len(captions)} captions{' on disk' if to_disk else ''}")
            if self.train.unload_text_encoder:
                for encoder in self.arch.text_encoders().values():
                    encoder.to("cpu")
                self._log("info", "text encoders unloaded from the training device")
        self._offloaded: list[torch.nn.Module] = []
        if self.process.model.low_vram and self.device.type == "cuda":
            # What the cached steps never touch waits on the CPU; sampling brings it back.
            if self.cache_latents and all(i in self._latents for i in range(len(self.dataset))):
                self._offloaded.append(self.arch.pipe.vae)
            if self.cache_text:
                self._offloaded.extend(self.arch.text_encoders().values())
            for module in self._offloaded:
                module.to("cpu")
            self._log("info", f"low_vram: {len(self._offloaded)} model parts kept on cpu between samples")

    def _cache_file(self, kind: str, key: str) -> Path:
        digest = hashlib.sha256(f"{self.inputs.model_source}|{key}".encode()).hexdigest()[:32]
        return checkpoints.run_dir(self.training_folder, self.name) / f"_{kind}_cache" / f"{digest}.safetensors"

    def _cached_latent(self, index: int, to_disk: bool) -> tuple[torch.Tensor, Sample]:
        """The item's latent and its sample without pixels (sizes for SDXL, the mask)."""
        item = self.dataset.items[index]
        path = self._cache_file("latent", f"{item.image_path}|{item.image_path.stat().st_mtime_ns}|{item.bucket}|"
                                          f"{item.flip_x}|{item.flip_y}|{item.mask_path}")
        if to_disk and path.is_file():
            tensors, sizes = load_file(str(path)), json.loads(checkpoints.read_metadata(path)["sizes"])
            meta = Sample(None, tensors.get("mask"), *(tuple(v) for v in sizes))
            return tensors["latent"], meta
        sample = self.dataset.load(index, self.rng)
        with torch.no_grad():
            latent = self.arch.encode_images(sample.pixels.unsqueeze(0))[0].to("cpu", torch.float32)
        meta = replace(sample, pixels=None)
        if to_disk:
            tensors = {"latent": latent, **({"mask": meta.mask} if meta.mask is not None else {})}
            sizes = [meta.original_size, meta.crop_top_left, meta.target_size]
            checkpoints.save_weights(path, tensors, {"sizes": json.dumps(sizes)})
        return latent, meta

    def _cached_embeds(self, caption: str, to_disk: bool) -> dict[str, torch.Tensor]:
        path = self._cache_file("text", caption)
        if to_disk and path.is_file():
            return load_file(str(path))
        with torch.no_grad():
            embeds = {k: v[0].to("cpu") for k, v in self.arch.encode_prompts([caption]).items()}
        if to_disk:
            checkpoints.save_weights(path, embeds, {})
        return embeds

    # ---- training ----------------------------------------------------------------------

    def train_step(self) -> StepResult:
        """One optimizer step over `gradient_accumulation` batches."""
        started = time.perf_counter()
        for module in self.adapted.values():
            module.train()
        total_loss = 0.0
        accumulation = self.train.gradient_accumulation
        for _ in range(accumulation):
            loss = self._batch_loss(next(self._batches))
            (loss / accumulation).backward()
            total_loss += loss.item() / accumulation
        if self.train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.train.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.train.scale_weight_norms:
            self._scale_weight_norms(self.train.scale_weight_norms)
        if self.ema is not None:
            decay = self.train.ema_config.ema_decay
            with torch.no_grad():
                for shadow, param in zip(self.ema, self.trainable, strict=True):
                    shadow.lerp_(param.detach(), 1 - decay)
        self.step += 1
        return StepResult(self.step, total_loss, self.lr_scheduler.get_last_lr()[0], time.perf_counter() - started)

    def _batch_loss(self, indices: list[int]) -> torch.Tensor:
        latents, samples = self._latents_for(indices)
        captions = [self._caption(i) for i in indices]
        with self._autocast():
            cond = self._condition(captions)
            noise = torch.randn(latents.shape, generator=self.generator).to(latents)
            if self.train.noise_offset:
                offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=self.generator)
                noise = noise + self.train.noise_offset * offset.to(latents)
            noised = self.arch.add_noise(latents, noise, self._noise_levels(len(indices)))
            prediction = self.arch.predict(noised, cond, samples)
            loss = self._loss(prediction, noised, indices, samples)
            if self.preserves_output:
                loss = loss + self._preservation_loss(noised, captions, samples)
        return loss

    def _caption(self, index: int) -> str:
        if not self.cache_text:
            return self.dataset.caption(index, self.rng)
        # Cached encoder outputs exist for whole captions and "" only.
        rate = self.process.datasets[self.dataset.items[index].dataset_index].caption_dropout_rate
        return "" if self.rng.random() < rate else self.dataset.caption(index, None)

    def _latents_for(self, indices: list[int]) -> tuple[torch.Tensor, list[Sample]]:
        rows, samples = [], []
        for index in indices:
            if index in self._latents:
                latent, sample = self._latents[index]
            else:
                sample = self.dataset.load(index, self.rng)
                with torch.no_grad():
                    latent = self.arch.encode_images(sample.pixels.unsqueeze(0))[0].float()
            rows.append(latent.to(self.device))
            samples.append(sample)
        return torch.stack(rows).to(self.weight_dtype), samples

    def _condition(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if self.cache_text and all(c in self._embeds for c in captions):
            rows = [self._embeds[c] for c in captions]
            return {k: torch.stack([r[k] for r in rows]).to(self.device, self.weight_dtype) for k in rows[0]}
        with torch.set_grad_enabled(self.trains_text_encoders):
            return self.arch.encode_prompts(captions)

    def _noise_levels(self, count: int) -> torch.Tensor:
        """Noise levels u in [0, 1] drawn per timestep_type, biased by content_or_style."""
        kind = self.train.timestep_type
        normal = torch.randn(count, generator=self.generator)
        uniform = torch.rand(count, generator=self.generator)
        if kind == "linear":
            u = uniform
        elif kind == "sigmoid":
            u = torch.sigmoid(normal)
        elif kind == "lognorm_blend":
            u = torch.where(torch.rand(count, generator=self.generator) < 0.75, torch.sigmoid(normal), uniform)
        elif kind == "weighted":
            # Mode-centred density (SD3's "mode" scheme): mid noise favoured, ends still drawn.
            u = 1 - uniform - 1.29 * (torch.cos(math.pi * uniform / 2) ** 2 - 1 + uniform)
        else:  # shift: uniform levels pushed toward high noise, as Flux's schedule shift does
            shift = 3.0
            u = shift * uniform / (1 + (shift - 1) * uniform)
        if self.train.content_or_style == "content":
            u = 1 - (1 - u) ** 3  # more high-noise steps: composition and subject
        elif self.train.content_or_style == "style":
            u = u**3  # more low-noise steps: texture and detail
        return u.clamp(0.0, 1.0)

    def _loss(self, prediction, noised, indices, samples) -> torch.Tensor:
        per_element = F.mse_loss(prediction.float(), noised.target.float(), reduction="none")
        if any(s.mask is not None for s in samples):
            # Masks weight the loss per latent pixel; a sample without one counts everywhere.
            weight = torch.stack([s.mask if s.mask is not None else torch.ones(1, *s.target_size) for s in samples])
            weight = F.interpolate(weight.float(), size=per_element.shape[-2:], mode="area")
            per_element = per_element * weight.to(per_element.device)
        per_sample = per_element.mean(dim=(1, 2, 3))
        if noised.weights is not None:
            per_sample = per_sample * noised.weights.float()
        network_weights = torch.tensor([self.dataset.items[i].network_weight for i in indices],
                                       device=per_sample.device)
        return (per_sample * network_weights).mean()

    def _preservation_loss(self, noised, captions, samples) -> torch.Tensor:
        """Differential output preservation: with the trigger word swapped for its class,
        the adapted model should predict what the base model predicts."""
        cond = self._condition([self._class_caption(c) for c in captions])
        with torch.no_grad():
            self._enable_adapters(False)
            try:
                base = self.arch.predict(noised, cond, samples)
            finally:
                self._enable_adapters(True)
        adapted = self.arch.predict(noised, cond, samples)
        return self.train.diff_output_preservation_multiplier * F.mse_loss(adapted.float(), base.float())

    def _enable_adapters(self, enabled: bool) -> None:
        for module in self.adapted.values():
            for layer in module.modules():
                if isinstance(layer, BaseTunerLayer):
                    layer.enable_adapters(enabled)

    def _class_caption(self, caption: str) -> str:
        trigger = self.process.trigger_word
        return caption.replace(trigger, self.train.diff_output_preservation_class) if trigger else caption

    def _autocast(self):
        if self.autocast_dtype is None or self.autocast_dtype == torch.float32:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _scale_weight_norms(self, max_norm: float) -> None:
        """Max-norm regularisation (kohya's scale_weight_norms): any LoRA whose delta
        weight B·A has a norm above max_norm is scaled back to it."""
        with torch.no_grad():
            for module in self.adapted.values():
                for layer in module.modules():
                    lora_a, lora_b = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
                    if not lora_a or "default" not in lora_a:
                        continue
                    down, up = lora_a["default"].weight, lora_b["default"].weight
                    delta = up.flatten(1) @ down.flatten(1) * layer.scaling["default"]
                    norm = delta.norm()
                    if norm > max_norm:
                        ratio = (max_norm / norm).sqrt()
                        down.mul_(ratio)
                        up.mul_(ratio)

    # ---- checkpoints -------------------------------------------------------------------

    def save_checkpoint(self) -> checkpoints.Checkpoint:
        """Writes the LoRA (a full run: the denoiser's weights) at the current step, then
        the optimizer state beside it, and keeps only the newest max_step_saves_to_keep
        checkpoints."""
        save = self.process.save
        path = checkpoints.checkpoint_path(self.training_folder, self.name, self.step)
        if self.full:
            tensors, adapter_metadata = self._denoiser_tensors(DTYPES[save.dtype]), {}
        else:
            with self._ema_weights():
                tensors, adapter_metadata = self._lora_tensors(DTYPES[save.dtype])
        checkpoints.save_weights(path, tensors, self._metadata(self.process.network.type, adapter_metadata))
        checkpoints.save_training_state(self.training_folder, self.name, {
            "step": self.step,
            "checkpoint": path.name,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "ema": [t.cpu() for t in self.ema] if self.ema is not None else None,
            "rng": {"python": self.rng.getstate(), "torch": self.generator.get_state()},
        })
        for old in checkpoints.prune_checkpoints(self.training_folder, self.name, save.max_step_saves_to_keep):
            self._log("info", f"removed old checkpoint {old.name}")
        self.last_checkpoint = checkpoints.Checkpoint(self.step, path)
        self._log("info", f"saved checkpoint {path}")
        return self.last_checkpoint

    def save_final(self) -> FinalOutputs:
        """The finished run's weights, once training is done (after the last checkpoint):
        the LoRA as `{name}.safetensors` beside the checkpoints, EMA applied. A full run
        also writes the denoiser's weights as `{name}_full.safetensors` and extracts its
        LoRA, of rank network.linear, from their difference to the base model's."""
        dtype = DTYPES[self.process.save.dtype]
        lora_path = checkpoints.final_path(self.training_folder, self.name)
        if not self.full:
            with self._ema_weights():
                tensors, adapter_metadata = self._lora_tensors(dtype)
            checkpoints.save_weights(lora_path, tensors, self._metadata(self.process.network.type, adapter_metadata))
            self._log("info", f"saved the final LoRA {lora_path}")
            return FinalOutputs(lora_path, None)
        full_path = checkpoints.final_path(self.training_folder, self.name, "_full")
        tuned = self._denoiser_tensors(torch.float32)
        checkpoints.save_weights(full_path, {k: v.to(dtype) for k, v in tuned.items()}, self._metadata("full", {}))
        self._log("info", f"saved the fine-tuned {self.arch.denoiser_name} {full_path}")
        tensors, adapter_metadata = self._extracted_lora(tuned)
        checkpoints.save_weights(lora_path, {k: v.to(dtype) for k, v in tensors.items()},
                                 self._metadata("lora", adapter_metadata))
        self._log("info", f"saved the LoRA extracted at rank {self.process.network.linear} {lora_path}")
        return FinalOutputs(lora_path, full_path)

    def _metadata(self, network_type: str, adapter_metadata: dict) -> dict[str, str]:
        return {
            checkpoints.STEP_METADATA_KEY: str(self.step),
            "name": self.name,
            "arch": self.process.model.arch,
            "network_type": network_type,
            "save_format": self.process.save.save_format,
            **({"lora_adapter_metadata": json.dumps(adapter_metadata, sort_keys=True)} if adapter_metadata else {}),
            "training_info": json.dumps({"step": self.step, "max_steps": self.max_steps}),
            **{k: str(v).replace("[name]", self.name) for k, v in self.process.meta.items()},
        }

    def _denoiser_tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The denoiser's state dict (diffusers key names), EMA applied, copied to the CPU in `dtype`."""
        denoiser = self.arch.denoiser
        state = denoiser.state_dict()
        if self.ema is not None:
            # The averages are read directly: swapping them in would hold a second model.
            state.update(zip([name for name, _ in denoiser.named_parameters()], self.ema, strict=True))
        return {k: v.detach().to("cpu", dtype, copy=True) for k, v in state.items()}

    def _extracted_lora(self, tuned: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        """The LoRA of the fine-tune, in the layout `_lora_tensors` writes for diffusers:
        every Linear and Conv2d layer network_kwargs allow, against the base denoiser
        reloaded from the model source (training keeps no second copy)."""
        denoiser, prefix = self.arch.denoiser, self.arch.denoiser_name
        modules = [name for name, module in denoiser.named_modules()
                   if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and self._allowed(name)]
        base = self._base_denoiser_state()
        rank = self.process.network.linear
        lora = extract_lora(base, tuned, rank, modules=modules, device=self.device)
        del base
        ranks = {key[: -len(".lora_B.weight")]: value.shape[1] for key, value in lora.items()
                 if key.endswith(".lora_B.weight")}
        if not ranks:
            raise ValueError("the fine-tuned weights equal the base model's: there is no LoRA to extract")
        # alpha = rank everywhere (scale 1); layers narrower than the rank get their own.
        narrow = {re.escape(name): r for name, r in ranks.items() if r != rank}
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(ranks), rank_pattern=narrow,
                            alpha_pattern=narrow)
        tensors = {f"{prefix}.{k}": v for k, v in lora.items()}
        return tensors, _adapter_metadata(prefix, config)

    def _base_denoiser_state(self) -> dict[str, torch.Tensor]:
        """The untrained denoiser's weights from the model source, on the CPU."""
        cls = type(self.arch.denoiser)
        source, name = self.inputs.model_source, self.arch.denoiser_name
        if source.endswith((".safetensors", ".ckpt")):
            model = cls.from_single_file(source, config=self.inputs.single_file_config, subfolder=name,
                                         torch_dtype=torch.float32)
        else:
            model = cls.from_pretrained(source, subfolder=name, torch_dtype=torch.float32)
        return model.state_dict()

    def _lora_tensors(self, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict]:
        """The adapters' weights with diffusers' key prefixes (unet., text_encoder., ...),
        in the layout `pipeline.load_lora_weights` reads ("diffusers") or, for the UNet
        models, kohya's lora_down/lora_up/alpha layout that A1111 and ComfyUI read
        ("safetensors"). Families whose registry entry says so (Flux) keep diffusers'
        layout in both, as ai-toolkit saves them; LoKr keeps peft's layout either way."""
        from diffusers.utils import convert_state_dict_to_kohya

        network = self.process.network
        kohya = (network.type != "lokr" and self.process.save.save_format == "safetensors"
                 and by_id(self.process.model.arch).trainer_safetensors_format == KOHYA)
        tensors, metadata = {}, {}
        for prefix, module in self.adapted.items():
            state = get_peft_model_state_dict(module)
            if kohya:
                converted = convert_state_dict_to_kohya({f"{prefix}.{k}": v for k, v in state.items()})
                for key, value in converted.items():
                    if key.endswith(".alpha"):
                        down = converted[key.replace(".alpha", ".lora_down.weight")]
                        value = torch.tensor(network.conv_alpha if down.ndim == 4 else network.linear_alpha)
                    tensors[key] = value.to(dtype, copy=True)
            else:
                # peft's lora_A/lora_B keys: load_lora_weights reads them for every layer type
                # (diffusers' older lora.down names cover attention projections only).
                tensors.update({f"{prefix}.{k}": v.to(dtype, copy=True) for k, v in state.items()})
                metadata.update(_adapter_metadata(prefix, module.peft_config["default"]))
        return tensors, metadata

    @contextlib.contextmanager
    def _ema_weights(self):
        """The EMA weights in place of the trained ones for the duration of the block."""
        if self.ema is None:
            yield
            return
        saved = [p.detach().clone() for p in self.trainable]
        for param, shadow in zip(self.trainable, self.ema, strict=True):
            param.data.copy_(shadow)
        try:
            yield
        finally:
            for param, kept in zip(self.trainable, saved, strict=True):
                param.data.copy_(kept)

    def _resume(self) -> None:
        latest = checkpoints.latest_checkpoint(self.training_folder, self.name)
        if latest is None:
            self._log("info", "no checkpoint found; training starts at step 0")
            return
        step = checkpoints.checkpoint_step(latest.path)
        saved_type = checkpoints.read_metadata(latest.path).get("network_type", "lora")
        if (saved_type == "full") != self.full:
            raise ValueError(f"checkpoint {latest.path.name} holds a {saved_type} network and this run trains "
                             f"{self.process.network.type}: use another name or training_folder")
        if self.full:
            self._load_denoiser(latest.path)
        else:
            self._load_lora(latest.path)
        state = checkpoints.load_training_state(self.training_folder, self.name)
        if state and state.get("step") == step:
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            if self.ema is not None and state.get("ema") is not None:
                self.ema = [t.to(p.device) for t, p in zip(state["ema"], self.trainable, strict=True)]
            rng = state.get("rng") or {}
            if "python" in rng:
                self.rng.setstate(rng["python"])
                self.generator.set_state(rng["torch"])
            restored = "optimizer, scheduler and EMA state"
        else:
            self.lr_scheduler.last_epoch = step
            if self.ema is not None:  # the average starts again from the restored weights
                self.ema = [p.detach().clone() for p in self.trainable]
            self.note(f"no optimizer state for step {step}; optimizer restarted, learning rate schedule at {step}")
            restored = "weights"
        self.step = step
        self.last_checkpoint = checkpoints.Checkpoint(step, latest.path)
        self._log("info", f"resumed from {latest.path.name} at step {step} ({restored})")

    def _load_denoiser(self, path: Path) -> None:
        """Puts a full run's checkpoint back into the denoiser (kept in float32)."""
        try:
            self.arch.denoiser.load_state_dict(load_file(str(path)))
        except RuntimeError as exc:
            raise ValueError(f"checkpoint {path.name} does not match this model's "
                             f"{self.arch.denoiser_name}: {str(exc)[:300]}") from exc

    def _load_lora(self, path: Path) -> None:
        """Puts a checkpoint's weights into the adapters, converting back from the saved
        layout the way diffusers' training scripts do when they resume."""
        from diffusers.utils import (
            convert_state_dict_to_diffusers,
            convert_state_dict_to_peft,
            convert_unet_state_dict_to_peft,
        )

        state = type(self.arch.pipe).lora_state_dict(str(path))
        state = state[0] if isinstance(state, tuple) else state
        is_lora = self.process.network.type != "lokr"
        for prefix, module in self.adapted.items():
            part = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(f"{prefix}.")}
            if is_lora and prefix == self.arch.denoiser_name:
                part = convert_unet_state_dict_to_peft(part)
            elif is_lora:
                part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
            part = {k: v.to(torch.float32) for k, v in part.items()}
            result = set_peft_model_state_dict(module, part, adapter_name="default")
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"checkpoint {path.name} does not match this network ({len(unexpected)} "
                                 f"unexpected keys, e.g. {unexpected[0]})")
        for param in self.trainable:
            param.data = param.data.float()

    # ---- samples -----------------------------------------------------------------------

    def _sample_prompts(self) -> list[tuple[str, str]]:
        sample = self.process.sample
        if sample is None:
            return []
        return [(self.dataset.with_trigger(p.prompt), p.neg if p.neg is not None else sample.neg)
                for p in sample.samples]

    def sample(self) -> list[SampleImage]:
        """Renders the config's sample prompts with the current weights."""
        sample = self.process.sample
        if sample is None or not sample.samples:
            return []
        sampler = sample.sampler
        if isinstance(self.arch, Flux) and sampler != "flowmatch":
            self.note(f"flux samples with flowmatch; sampler {sampler} ignored")
            sampler = "flowmatch"
        elif not isinstance(self.arch, Flux) and sampler == "flowmatch":
            self.note("flowmatch sampling needs a flow model; sampled with euler")
            sampler = "euler"
        pipe = self.arch.pipe
        original_scheduler = pipe.scheduler
        pipe.scheduler = SAMPLERS[sampler].from_config(original_scheduler.config)
        folder = checkpoints.run_dir(self.training_folder, self.name) / checkpoints.SAMPLES_DIR
        written = []
        for module in self.adapted.values():
            module.eval()
        for module in self._offloaded:
            module.to(self.device)
        try:
            for i, (entry, (prompt, neg)) in enumerate(zip(sample.samples, self._sample_prompts(), strict=True)):
                seed = entry.seed if entry.seed is not None else sample.seed + (i if sample.walk_seed else 0)
                with torch.no_grad(), self._autocast():
                    embeds = self._prompt_embeds(prompt)
                    negative = self._prompt_embeds(neg) if neg else None
                    image = self.arch.generate(
                        embeds, negative,
                        width=entry.width or sample.width, height=entry.height or sample.height,
                        steps=entry.sample_steps or sample.sample_steps,
                        guidance_scale=entry.guidance_scale if entry.guidance_scale is not None
                        else sample.guidance_scale,
                        cfg_rescale=sample.cfg_rescale,
                        generator=torch.Generator("cpu").manual_seed(seed),
                    )
                path = folder / f"{self.name}_{self.step:09d}_{i}.jpg"
                checkpoints.write_atomically(path, lambda tmp, image=image: image.save(tmp, format="JPEG",
                                                                                        quality=95))
                written.append(SampleImage(self.step, prompt, path))
                self._log("info", f"sample {i} written: {path}")
        finally:
            pipe.scheduler = original_scheduler
            for module in self._offloaded:
                module.to("cpu")
        return written

    def _prompt_embeds(self, prompt: str) -> dict[str, torch.Tensor]:
        if prompt in self._embeds:
            return {k: v.unsqueeze(0).to(self.device, self.weight_dtype) for k, v in self._embeds[prompt].items()}
        return self.arch.encode_prompts([prompt])

    # ---- teardown ----------------------------------------------------------------------

    def memory_bytes(self) -> int:
        """Bytes held by the pipeline's weights and the optimizer state."""
        modules = [m for m in self.arch.pipe.components.values() if isinstance(m, torch.nn.Module)]
        weights = module_bytes(*modules)
        state = sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                    for t in s.values() if torch.is_tensor(t))
        return weights + state

    def close(self) -> None:
        """Drops the model and optimizer so their memory returns to the device."""
        import gc

        for attr in ("arch", "optimizer", "lr_scheduler", "ema", "adapted", "trainable", "_latents", "_embeds"):
            if hasattr(self, attr):
                delattr(self, attr)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
