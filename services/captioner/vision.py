"""Image captioning with Florence-2 and JoyCaption (a LLaVA model), batched: one
processor call and one `generate` per batch of images."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from PIL import Image

from services.captioner.options import FLORENCE2, VisionOptions
from services.common.devices import default_dtype
from services.common.errors import FailedPrecondition
from services.common.residency import Freed, Residency, module_bytes

SYSTEM_PROMPT = "You are a helpful image captioner."


class VisionCaptioner:
    def __init__(self, residency: Residency, device: torch.device):
        self.residency = residency
        self.device = device
        self.dtype = default_dtype(device)
        self._loaded: set[str] = set()

    def caption(self, images: Iterable[Image.Image], options: VisionOptions, batch_size: int = 8,
                on_batch: Callable[[int, int], None] | None = None, total: int | None = None) -> list[str]:
        """Captions in input order, taking `batch_size` images at a time: a lazy `images`
        (with its `total` for progress) is decoded one batch at a time. `on_batch(done,
        total)` after each batch."""
        total = len(images) if total is None else total
        model, processor = self.load(options)
        captions: list[str] = []
        pending = iter(images)
        while batch := [image.convert("RGB") for image in itertools.islice(pending, batch_size)]:
            if options.seed is not None:
                torch.manual_seed(options.seed)
            if options.model_type == FLORENCE2:
                captions.extend(self._florence2(model, processor, batch, options))
            else:
                captions.extend(self._joycaption(model, processor, batch, options))
            if on_batch is not None:
                on_batch(len(captions), total)
        return captions

    def _florence2(self, model, processor, images, options: VisionOptions) -> list[str]:
        inputs = processor(text=[options.task] * len(images), images=images, return_tensors="pt")
        inputs = _to(inputs, self.device, self.dtype)
        # The decoder starts fresh, so its own position table bounds the caption.
        limit = _positions(model) - 1
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=min(options.max_new_tokens, limit),
                                 num_beams=options.num_beams, do_sample=False)
        texts = processor.batch_decode(out, skip_special_tokens=False)
        return [
            str(processor.post_process_generation(text, task=options.task, image_size=image.size)[options.task]).strip()
            for text, image in zip(texts, images, strict=True)
        ]

    def _joycaption(self, model, processor, images, options: VisionOptions) -> list[str]:
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": options.prompt}]},
        ]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The chat template already starts with the begin-of-text token.
        inputs = processor(text=[prompt] * len(images), images=images, return_tensors="pt", padding=True,
                           add_special_tokens=False)
        inputs = _to(inputs, self.device, self.dtype)
        sampling = options.temperature > 0
        limit = _positions(model) - inputs["input_ids"].shape[1]
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max(1, min(options.max_new_tokens, limit)),
                                 do_sample=sampling,
                                 **({"temperature": options.temperature, "top_p": options.top_p} if sampling else {}))
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]

    def load(self, options: VisionOptions):
        """The model and processor, loaded once and kept by the residency manager."""
        name = f"{options.model_type}:{options.model_path}"
        self._loaded.add(name)
        return self.residency.get(name, lambda: self._load(options))

    def _load(self, options: VisionOptions):
        from transformers import AutoModelForCausalLM, AutoProcessor

        path = options.model_path
        remote = _uses_remote_code(path)
        try:
            if options.model_type == FLORENCE2 and remote:
                # The original Florence-2 checkpoints ship their own modelling code.
                model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=self.dtype, trust_remote_code=True)
            elif options.model_type == FLORENCE2:
                from transformers import Florence2ForConditionalGeneration

                model = Florence2ForConditionalGeneration.from_pretrained(path, dtype=self.dtype)
            else:
                from transformers import LlavaForConditionalGeneration

                model = LlavaForConditionalGeneration.from_pretrained(path, dtype=self.dtype)
            processor = AutoProcessor.from_pretrained(path, trust_remote_code=remote)
        except OSError as exc:
            raise FailedPrecondition(f"model_path: cannot load {path!r}: {exc}") from exc
        if getattr(processor, "tokenizer", None) is not None:
            processor.tokenizer.padding_side = "left"  # generation continues the prompts' right ends
        model.to(self.device).eval()
        return (model, processor), str(self.device), module_bytes(model)

    def unload(self) -> list[Freed]:
        freed = [f for f in (self.residency.unload(name) for name in sorted(self._loaded)) if f]
        self._loaded.clear()
        return freed


def _positions(model) -> int:
    """How many positions the language model can attend over (max_new_tokens is capped
    to fit: asking for more than a model can hold fails instead of stopping early)."""
    config = getattr(model.config, "text_config", model.config)
    return int(getattr(config, "max_position_embeddings", None) or 1 << 20)


def _uses_remote_code(path: str) -> bool:
    """Whether the checkpoint's config maps to its own modelling code (a local folder,
    or a hub id read through the HF cache)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        from huggingface_hub import hf_hub_download

        try:
            config = Path(hf_hub_download(path, "config.json"))
        except Exception as exc:  # offline and not cached, or no such repo
            raise FailedPrecondition(f"model_path: cannot find {path!r} locally or in the Hugging Face cache "
                                     f"({type(exc).__name__})") from exc
    return "auto_map" in json.loads(config.read_text())


def _to(inputs, device: torch.device, dtype: torch.dtype):
    """Moves a processor's output to the model: pixel tensors also to its dtype."""
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
            for k, v in inputs.items()}
