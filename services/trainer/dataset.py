"""The image-folder dataset of the LoRA trainer, with ai-toolkit's dataset semantics: images
with `.txt` captions, aspect-ratio buckets, crops, flips, masks and caption augmentation.

It knows nothing about models: it yields pixel tensors in [-1, 1] and caption strings, and
every random choice goes through the `random.Random` the caller passes, so a run is
reproducible from its seed."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from services.trainer.job_config import DatasetConfig

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
TRIGGER_PLACEHOLDERS = ("[trigger]", "[name]")

# What Pillow raises for files it cannot decode; any of them means "skip this image".
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class DatasetItem:
    """One training example: an image at one resolution and one flip variant."""

    image_path: Path
    caption: str  # raw caption text, before trigger injection and augmentation
    mask_path: Path | None
    bucket: tuple[int, int]  # (width, height)
    flip_x: bool
    flip_y: bool
    is_reg: bool
    network_weight: float
    dataset_index: int


@dataclass
class Sample:
    """What load() returns; sizes are (height, width) as SDXL's micro-conditioning wants them."""

    pixels: torch.Tensor  # float32 [3, H, W] in [-1, 1]
    mask: torch.Tensor | None  # float32 [1, H, W] in [mask_min_value, 1]
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]


@dataclass(frozen=True)
class _SourceImage:
    path: Path
    width: int
    height: int
    caption: str
    mask_path: Path | None


def bucket_for(
    width: int,
    height: int,
    resolution: int,
    step: int,
    *,
    no_upscale: bool = False,
    square: bool = False,
) -> tuple[int, int]:
    """The (width, height) bucket of an image at one resolution.

    Both sides are multiples of `step` (at least one step) and the area is at most
    resolution². Among the buckets nearest the ideal rectangle of that area and the image's
    aspect ratio, the one with the closest aspect ratio wins (ties: the larger area), so
    buckets stay near full resolution while cropping little. With `no_upscale` an image smaller
    than the bucket gets a bucket that fits inside it; `square` gives the resolution's square."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if resolution < 1 or step < 1:
        raise ValueError(f"resolution and bucket step must be positive, got {resolution} and {step}")
    if square:
        side = _floor_to_step(resolution, step)
        if no_upscale:
            side = min(side, _floor_to_step(min(width, height), step))
        return side, side

    area = resolution * resolution
    max_width = max_height = math.inf
    if no_upscale:
        area = min(area, width * height)
        max_width, max_height = max(width, step), max(height, step)
    aspect = width / height
    widths = _step_neighbours(math.sqrt(area * aspect), step)
    heights = _step_neighbours(math.sqrt(area / aspect), step)

    candidates = {(step, step)}
    for w in widths:
        candidates.add((w, _floor_to_step(area / w, step)))
        for h in heights:
            candidates.add((w, h))
    for h in heights:
        candidates.add((_floor_to_step(area / h, step), h))

    def fits(bucket: tuple[int, int]) -> bool:
        w, h = bucket
        return (w * h <= area or bucket == (step, step)) and w <= max_width and h <= max_height

    def score(bucket: tuple[int, int]) -> tuple[float, int]:
        w, h = bucket
        return abs(math.log(w / h) - math.log(aspect)), -w * h

    return min(filter(fits, candidates), key=score)


def _floor_to_step(value: float, step: int) -> int:
    return max(step, int(value // step) * step)


def _step_neighbours(ideal: float, step: int) -> tuple[int, int]:
    below = _floor_to_step(ideal, step)
    return below, below + step


def inject_trigger(caption: str, trigger: str | None, *, add_if_missing: bool = True) -> str:
    """ai-toolkit's trigger handling: `[trigger]` and `[name]` become the trigger word, and a
    caption that still lacks it gets it prepended as a token. Without a trigger word the
    placeholders vanish, and the comma-separated tokens are tidied so none is left empty."""
    text = caption
    for placeholder in TRIGGER_PLACEHOLDERS:
        text = text.replace(placeholder, trigger or "")
    if not trigger:
        return ", ".join(_tokens(text)) if text != caption else text.strip()
    text = text.strip()
    if add_if_missing and trigger not in text:
        return f"{trigger}, {text}" if _tokens(text) else trigger
    return text


def _tokens(text: str) -> list[str]:
    return [token for token in (part.strip() for part in text.split(",")) if token]


class TrainingDataset:
    """Every (image, resolution, flip variant, repeat) of the configured folders as one item.

    Flipped copies are separate items, as in ai-toolkit, so each variant's latents stay cacheable.
    Unreadable images are skipped and listed in `skipped`. batches() and load() given no `rng`
    draw from the dataset's own `random.Random(seed)`."""

    def __init__(self, datasets: Sequence[DatasetConfig], *, trigger_word: str | None, seed: int):
        if not datasets:
            raise ValueError("no datasets configured")
        self.configs = list(datasets)
        self.trigger_word = trigger_word.strip() if trigger_word and trigger_word.strip() else None
        self.seed = seed
        self.rng = random.Random(seed)
        self.skipped: list[tuple[Path, str]] = []
        self.items: list[DatasetItem] = []
        self.image_count = 0
        for dataset_index, config in enumerate(self.configs):
            images = self._scan(config)
            self.image_count += len(images)
            self.items.extend(self._items_for(config, dataset_index, images))

    def __len__(self) -> int:
        return len(self.items)

    # ---- discovery -------------------------------------------------------------------------

    def _scan(self, config: DatasetConfig) -> list[_SourceImage]:
        folder = Path(config.folder_path)
        paths = _image_files(folder)
        if not paths:
            raise ValueError(f"no images in {folder}")
        masks = _masks_by_stem(Path(config.mask_path)) if config.mask_path else {}
        caption_ext = config.caption_ext.lstrip(".")
        images: list[_SourceImage] = []
        for path in paths:
            try:
                width, height = _open_rgb(path).size
            except _DECODE_ERRORS as exc:
                self.skipped.append((path, f"unreadable image: {exc}"))
                continue
            mask_path = masks.get(path.stem)
            if mask_path is not None:
                try:
                    _open_mask(mask_path)
                except _DECODE_ERRORS as exc:
                    self.skipped.append((path, f"unreadable mask {mask_path.name}: {exc}"))
                    continue
            try:
                caption = _read_caption(path.with_name(f"{path.stem}.{caption_ext}"))
            except OSError as exc:
                self.skipped.append((path, f"unreadable caption: {exc}"))
                continue
            images.append(_SourceImage(path, width, height, caption or config.default_caption or "", mask_path))
        if not images:
            first_path, first_reason = self.skipped[-len(paths)]
            raise ValueError(
                f"no readable images in {folder} ({len(paths)} skipped; {first_path.name}: {first_reason})"
            )
        return images

    def _items_for(
        self, config: DatasetConfig, dataset_index: int, images: list[_SourceImage]
    ) -> list[DatasetItem]:
        resolutions = (config.resolution,) if isinstance(config.resolution, int) else tuple(config.resolution)
        if not resolutions:
            raise ValueError(f"resolution is empty for {config.folder_path}")
        if config.num_repeats < 1:
            raise ValueError(f"num_repeats must be at least 1 for {config.folder_path}, got {config.num_repeats}")
        flips = [(False, False)]
        if config.flip_x:
            flips.append((True, False))
        if config.flip_y:
            flips += [(flip_x, True) for flip_x, _ in flips]
        items: list[DatasetItem] = []
        for image in images:
            for resolution in resolutions:
                bucket = bucket_for(
                    image.width,
                    image.height,
                    resolution,
                    config.bucket_step_size,
                    no_upscale=config.bucket_no_upscale,
                    square=config.center_crop,
                )
                for flip_x, flip_y in flips:
                    items.append(
                        DatasetItem(
                            image_path=image.path,
                            caption=image.caption,
                            mask_path=image.mask_path,
                            bucket=bucket,
                            flip_x=flip_x,
                            flip_y=flip_y,
                            is_reg=config.is_reg,
                            network_weight=config.network_weight,
                            dataset_index=dataset_index,
                        )
                    )
        return items * config.num_repeats

    # ---- batching --------------------------------------------------------------------------

    def batches(self, batch_size: int, rng: random.Random | None = None) -> Iterator[list[int]]:
        """Endless epochs of index lists that share one bucket (tensors of a batch must stack).
        Each epoch covers every item once; batch order is shuffled across buckets."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        rng = rng or self.rng
        while True:
            order = list(range(len(self.items)))
            rng.shuffle(order)
            by_bucket: dict[tuple[int, int], list[int]] = {}
            for index in order:
                by_bucket.setdefault(self.items[index].bucket, []).append(index)
            epoch = [
                indices[start : start + batch_size]
                for indices in by_bucket.values()
                for start in range(0, len(indices), batch_size)
            ]
            rng.shuffle(epoch)
            yield from epoch

    # ---- pixels ----------------------------------------------------------------------------

    def load(self, index: int, rng: random.Random | None = None) -> Sample:
        """Resize to cover the bucket, crop (centred, or at a random spot with random_crop),
        flip as the item says, and scale to [-1, 1]; the mask gets the same geometry."""
        item = self.items[index]
        config = self.configs[item.dataset_index]
        rng = rng or self.rng
        image = _open_rgb(item.image_path)
        width, height = image.size
        bucket_width, bucket_height = item.bucket
        scale = max(bucket_width / width, bucket_height / height)
        resized = (max(bucket_width, round(width * scale)), max(bucket_height, round(height * scale)))
        if config.random_crop:
            left = rng.randint(0, resized[0] - bucket_width)
            top = rng.randint(0, resized[1] - bucket_height)
        else:
            left = (resized[0] - bucket_width) // 2
            top = (resized[1] - bucket_height) // 2
        box = (left, top, left + bucket_width, top + bucket_height)

        pixels = _flip(_resize(image, resized).crop(box), item)
        pixel_array = np.asarray(pixels, dtype=np.float32) / 127.5 - 1.0
        pixel_tensor = torch.from_numpy(pixel_array).permute(2, 0, 1).contiguous()

        mask_tensor = None
        if config.mask_path:
            mask_tensor = torch.ones(1, bucket_height, bucket_width)
            if item.mask_path is not None:
                mask = _open_mask(item.mask_path)
                if mask.size != image.size:
                    mask = mask.resize(image.size, Image.Resampling.BILINEAR)
                mask = _flip(mask.resize(resized, Image.Resampling.BILINEAR).crop(box), item)
                mask_tensor = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]
            mask_tensor = _apply_mask_floor(mask_tensor, config.mask_min_value)

        # The crop's corner in the flipped resized image, which is what the sample shows.
        if item.flip_x:
            left = resized[0] - left - bucket_width
        if item.flip_y:
            top = resized[1] - top - bucket_height
        return Sample(
            pixels=pixel_tensor,
            mask=mask_tensor,
            original_size=(height, width),
            crop_top_left=(top, left),
            target_size=(bucket_height, bucket_width),
        )

    def cacheable(self, index: int) -> bool:
        """Whether load() gives the same pixels every time, so the item's latents may be cached."""
        return not self.configs[self.items[index].dataset_index].random_crop

    # ---- captions --------------------------------------------------------------------------

    def caption(self, index: int, rng: random.Random | None) -> str:
        """One augmented draw of the item's caption: whole-caption dropout, then token shuffle
        and token dropout that never move or drop the trigger word or the first keep_tokens.

        With `rng=None` it is the whole caption (trigger injected, nothing dropped or shuffled),
        the one text whose encoder outputs can be cached."""
        item = self.items[index]
        config = self.configs[item.dataset_index]
        trigger = self.trigger_word
        tokens = _tokens(inject_trigger(item.caption, trigger, add_if_missing=False))
        # ai-toolkit fills in [trigger] on regularisation images but does not add the word to them.
        prepend = [trigger] if trigger and not item.is_reg and not any(trigger in t for t in tokens) else []
        if rng is None:
            return ", ".join(prepend + tokens)
        if config.caption_dropout_rate > 0 and rng.random() < config.caption_dropout_rate:
            return ""

        triggers, kept, free = [], [], []
        for position, token in enumerate(tokens):
            if trigger and trigger in token:
                triggers.append(position)
            elif position < config.keep_tokens:
                kept.append(position)
            else:
                free.append(position)
        if config.shuffle_tokens:
            rng.shuffle(free)
            order = triggers + kept + free
        else:
            order = list(range(len(tokens)))
        if config.token_dropout_rate > 0:
            dropped = {p for p in free if config.token_dropout_rate >= 1 or rng.random() < config.token_dropout_rate}
            order = [p for p in order if p not in dropped]
        return ", ".join(prepend + [tokens[p] for p in order])

    def with_trigger(self, prompt: str) -> str:
        """A sample prompt with `[trigger]`/`[name]` filled in; as in ai-toolkit, sample prompts
        do not get the trigger word added when they lack it."""
        return inject_trigger(prompt, self.trigger_word, add_if_missing=False)

    # ---- reporting -------------------------------------------------------------------------

    def bucket_counts(self) -> list[tuple[tuple[int, int], int]]:
        """Items per bucket, largest first (ties in order of first appearance)."""
        return Counter(item.bucket for item in self.items).most_common()

    def describe(self) -> str:
        """One log line: images, items and the bucket histogram."""
        counts = self.bucket_counts()
        histogram = ", ".join(f"{w}x{h}: {n}" for (w, h), n in counts)
        line = (
            f"{_plural(self.image_count, 'image')} → {_plural(len(self.items), 'item')} "
            f"in {_plural(len(counts), 'bucket')} ({histogram})"
        )
        if self.skipped:
            line += f"; {_plural(len(self.skipped), 'unreadable file')} skipped"
        return line


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _image_files(folder: Path) -> list[Path]:
    """Images directly in `folder`, by name. Dot-files (such as macOS `._x.jpg` forks) are
    skipped, as ai-toolkit's globbing does."""
    return sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def _masks_by_stem(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise ValueError(f"mask_path is not a folder: {folder}")
    masks: dict[str, Path] = {}
    for path in _image_files(folder):
        masks.setdefault(path.stem, path)
    return masks


def _read_caption(path: Path) -> str:
    if not path.is_file():
        return ""
    return path.read_text(encoding="utf-8", errors="replace").strip()


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def _open_mask(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("L")


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Lanczos when shrinking (sharp, alias-free); bicubic when enlarging (no ringing halos)."""
    if image.size == size:
        return image
    shrinking = size[0] <= image.width and size[1] <= image.height
    return image.resize(size, Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC)


def _flip(image: Image.Image, item: DatasetItem) -> Image.Image:
    if item.flip_x:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if item.flip_y:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return image


def _apply_mask_floor(mask: torch.Tensor, min_value: float) -> torch.Tensor:
    """ai-toolkit maps the mask's [0, 1] linearly onto [mask_min_value, 1], so masked-out areas
    still train a little while the mask's gradations are kept."""
    return mask * (1.0 - min_value) + min_value
