"""The picture transforms a training task may ask for (`preprocessing_transforms`), applied in
the order given to every picture of its dataset before captioning:

    {"type": "resize", "size": N}                    shorter side to N, aspect kept
    {"type": "resize", "width": W, "height": H}      exactly W x H (aspect may change)
    {"type": "center_crop", "size": N}               the middle N x N
    {"type": "center_crop", "width": W, "height": H} the middle W x H
    {"type": "random_crop", "size": N, "seed": S}    an N x N (or W x H) window at a place drawn
                                                     from S (default 0) and the picture's index,
                                                     so a rerun gives the same dataset
    {"type": "convert", "format": "png"|"jpeg"|"webp", "quality": Q}
                                                     the file format written (default png);
                                                     quality 1..100 for jpeg and webp

Sizes are 64..4096 pixels. A crop larger than the picture takes the whole picture on that
side. The last `convert` sets the format; JPEG has no transparency, so transparent pixels
are laid on white. At most 16 transforms.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image

from services.common.errors import Violations

MAX_TRANSFORMS = 16
MIN_SIZE, MAX_SIZE = 64, 4096
FORMATS = {"png": "png", "jpeg": "jpg", "webp": "webp"}  # format -> file extension
DEFAULT_FORMAT = "png"
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Resize:
    size: int | None = None  # the shorter side; else width and height
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class CenterCrop:
    width: int
    height: int


@dataclass(frozen=True)
class RandomCrop:
    width: int
    height: int
    seed: int = 0


@dataclass(frozen=True)
class Convert:
    format: str
    quality: int | None = None


Transform = Resize | CenterCrop | RandomCrop | Convert

_SIZE_KEYS = ("size", "width", "height")
_KEYS = {
    "resize": _SIZE_KEYS,
    "center_crop": _SIZE_KEYS,
    "random_crop": (*_SIZE_KEYS, "seed"),
    "convert": ("format", "quality"),
}


def parse_transforms(raw: list[dict] | None, bad: Violations,
                     field: str = "preprocessing_transforms") -> list[Transform]:
    """The transforms of a request; every bad one is recorded in `bad`, named
    f"{field}[i].key", with what is allowed."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        bad.add(field, f"must be a list of transforms (got {type(raw).__name__})")
        return []
    if len(raw) > MAX_TRANSFORMS:
        bad.add(field, f"at most {MAX_TRANSFORMS} transforms are allowed (got {len(raw)})")
        return []
    transforms = []
    for i, spec in enumerate(raw):
        name = f"{field}[{i}]"
        if not isinstance(spec, Mapping):
            bad.add(name, f"must be an object with a \"type\" (got {type(spec).__name__})")
            continue
        kind = spec.get("type")
        if kind not in _KEYS:
            bad.add(f"{name}.type", f"must be one of {', '.join(_KEYS)} (got {kind!r})")
            continue
        unknown = [key for key in spec if key != "type" and key not in _KEYS[kind]]
        for key in unknown:
            bad.add(f"{name}.{key}", f"is not a {kind} setting; allowed: {', '.join(_KEYS[kind])}")
        if unknown:
            continue
        if kind == "convert":
            transform = _convert(spec, name, bad)
        else:
            transform = _sized(kind, spec, name, bad)
        if transform is not None:
            transforms.append(transform)
    return transforms


def _sized(kind: str, spec: Mapping[str, Any], name: str, bad: Violations) -> Transform | None:
    before = len(bad.items)
    size, width, height = (bad.integer(f"{name}.{key}", spec.get(key), None, MIN_SIZE, MAX_SIZE)
                           for key in _SIZE_KEYS)
    if "size" in spec and ("width" in spec or "height" in spec):
        bad.add(f"{name}.size", "give either size, or width and height, not both")
    elif "size" not in spec:
        for key in ("width", "height"):
            if key not in spec:
                bad.add(f"{name}.{key}", f"is required: give size, or width and height, each {MIN_SIZE}..{MAX_SIZE}")
    seed = bad.integer(f"{name}.seed", spec.get("seed"), 0, 0, MAX_SEED)
    if len(bad.items) > before:
        return None
    if kind == "resize":
        return Resize(size=size) if size is not None else Resize(width=width, height=height)
    width, height = (size, size) if size is not None else (width, height)
    return CenterCrop(width, height) if kind == "center_crop" else RandomCrop(width, height, seed)


def _convert(spec: Mapping[str, Any], name: str, bad: Violations) -> Convert | None:
    before = len(bad.items)
    fmt = spec.get("format")
    if fmt is None or fmt == "":
        bad.add(f"{name}.format", f"is required: one of {', '.join(FORMATS)}")
    else:
        bad.choice(f"{name}.format", fmt, FORMATS)
    quality = bad.integer(f"{name}.quality", spec.get("quality"), None, 1, 100)
    if quality is not None and spec.get("format") == "png":
        bad.add(f"{name}.quality", "applies to jpeg and webp only (png is lossless)")
    if len(bad.items) > before:
        return None
    return Convert(fmt, quality)


def apply_transforms(image: Image.Image, transforms: list[Transform], index: int) -> tuple[Image.Image, str]:
    """`image` transformed, and the file extension to save it as ("png" unless converted).
    `index` is the picture's place in the dataset: random crops draw from it."""
    for transform in transforms:
        if isinstance(transform, Resize):
            image = _resize(image, transform)
        elif isinstance(transform, CenterCrop):
            image = _crop(image, transform.width, transform.height, None)
        elif isinstance(transform, RandomCrop):
            # A string seed is hashed the same way in every process (unlike hash()).
            image = _crop(image, transform.width, transform.height, random.Random(f"{transform.seed}:{index}"))
    fmt, _ = output_format(transforms)
    return _storable(image, fmt), FORMATS[fmt]


def output_format(transforms: list[Transform]) -> tuple[str, dict[str, Any]]:
    """The Pillow format and save options the transforms ask for (the last convert wins)."""
    converts = [t for t in transforms if isinstance(t, Convert)]
    if not converts:
        return DEFAULT_FORMAT, {}
    last = converts[-1]
    return last.format, ({"quality": last.quality} if last.quality is not None else {})


def _resize(image: Image.Image, transform: Resize) -> Image.Image:
    width, height = image.size
    if transform.size is not None:
        scale = transform.size / min(width, height)
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
    else:
        target = (transform.width, transform.height)
    if target == image.size:
        return image
    return image.resize(target, Image.Resampling.LANCZOS)


def _crop(image: Image.Image, width: int, height: int, rng: random.Random | None) -> Image.Image:
    full_width, full_height = image.size
    width, height = min(width, full_width), min(height, full_height)
    if rng is None:
        left, top = (full_width - width) // 2, (full_height - height) // 2
    else:
        left, top = rng.randint(0, full_width - width), rng.randint(0, full_height - height)
    if (width, height) == image.size:
        return image
    return image.crop((left, top, left + width, top + height))


def _storable(image: Image.Image, fmt: str) -> Image.Image:
    """`image` in a mode the format stores and the trainer reads: RGB, RGBA or grey. JPEG
    has no transparency, so transparent pixels are laid on white."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if fmt == "jpeg" and has_alpha:
        return _on_white(image)
    if image.mode in (("RGB", "L") if fmt == "jpeg" else ("RGB", "RGBA", "L")):
        return image
    return image.convert("RGBA" if has_alpha and fmt != "jpeg" else "RGB")


def _on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, "white")
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background
