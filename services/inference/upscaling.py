"""ESRGAN-family upscaling: model files under the models root's `esrgan/` folder loaded with
spandrel (ESRGAN and Real-ESRGAN RRDBNet, Real-ESRGAN compact SRVGG and every other
single-image super-resolution or restoration architecture spandrel detects), held by the
service's Residency like the generation pipeline, one at a time, and run tile by tile.

Tiling: the image is cut into tiles of at most `tile_size` pixels a side that overlap by at
least `overlap_for(tile_size)` pixels, spread evenly; each tile is upscaled alone and the
overlapping parts of neighbours are blended with linear weights, so no seam shows. 0 = the
whole image in one pass.

Factor: one pass multiplies the size by the model's own scale. A request's `upscale_factor`
is the factor of one pass: when it differs from the model's, each pass's result is resized
with Lanczos to exactly factor x the pass's input. `repeats` passes give factor ** repeats.
"""

from __future__ import annotations

import importlib
import io
import math
import sys
import threading
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import PIL.Image

from loramesh.v1 import events_pb2
from services.common.errors import InvalidInput, Violations
from services.common.residency import OneResident, module_bytes

UPSCALER_TYPE = "esrgan"  # the model type (and GET /models list) upscalers come from
DEFAULT_TILE = 128
MIN_TILE = 16  # smaller tiles leave no room for the overlap that hides seams
MAX_TILE = 4096
MAX_FACTOR = 8
MAX_REPEATS = 4
# spandrel purposes that map an image to an image of the same content.
PURPOSES = ("SR", "Restoration")


@dataclass(frozen=True)
class UpscalerPlan:
    """The upscaler /upscaler/load loaded, as every replica sees it (recorded in NATS)."""

    model_name: str
    path: str
    scale: int
    tile_size: int = DEFAULT_TILE
    n_threads: int = -1  # -1 = torch's own thread count

    def key(self) -> str:
        return f"upscaler:{self.path}"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> UpscalerPlan:
        return cls(**data)


@dataclass
class UpscaleSpec:
    """One upscale of a job: /upscale's request, or txt2img/img2img's `upscale` settings."""

    plan: UpscalerPlan
    factor: int
    tile_size: int
    repeats: int = 1
    auto_unload: bool = False  # txt2img/img2img: unload the upscaler once the job is done

    def to_json(self) -> dict:
        return {**asdict(self), "plan": self.plan.to_json()}

    @classmethod
    def from_json(cls, data: dict) -> UpscaleSpec:
        return cls(**{**data, "plan": UpscalerPlan.from_json(data["plan"])})


# --------------------------------------------------------------------------- checks


def check_tile_size(bad: Violations, name: str, value, default: int) -> int:
    """0 (the whole image) or MIN_TILE..MAX_TILE pixels."""
    tile = bad.integer(name, value, default, 0, MAX_TILE)
    if isinstance(tile, int) and 0 < tile < MIN_TILE:
        bad.add(name, f"must be 0 (the whole image at once) or between {MIN_TILE} and {MAX_TILE} (got {tile})")
    return tile


def check_output_size(bad: Violations, width: int, height: int, factor: int, repeats: int, max_pixels: int,
                      fields: tuple[str, str]) -> None:
    """Refuses an upscale whose result would be over max_pixels (LORAMESH_MAX_IMAGE_PIXELS)."""
    out_w, out_h = output_size(width, height, factor, repeats)
    if out_w * out_h > max_pixels:
        for name in fields:
            bad.add(name, f"{width}x{height} upscaled {factor}x {repeats} time(s) is {out_w}x{out_h}, over this "
                          f"server's limit of {max_pixels:,} pixels (LORAMESH_MAX_IMAGE_PIXELS)")


def output_size(width: int, height: int, factor: int, repeats: int) -> tuple[int, int]:
    return width * factor ** repeats, height * factor ** repeats


# --------------------------------------------------------------------------- loading

_import_lock = threading.Lock()


def import_spandrel():
    """The spandrel package. It imports torchvision for two architectures no upscaler uses (LaMa
    inpainting, RestoreFormer faces); where torchvision is not installed (a CPU-only torch, for
    which PyPI has no matching torchvision build) a stand-in for the two functions they import
    lets the rest load. Models of those two architectures are refused anyway (not SR)."""
    with _import_lock:
        if "spandrel" in sys.modules:
            return sys.modules["spandrel"]
        try:
            importlib.import_module("torchvision.transforms.functional")
        except ModuleNotFoundError:
            return _import_without_torchvision()
        return importlib.import_module("spandrel")


def _import_without_torchvision():
    def unavailable(*_args, **_kwargs):
        raise RuntimeError("torchvision is not installed")

    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode, functional.rotate, functional.normalize = object, unavailable, unavailable
    stand_ins = {"torchvision": types.ModuleType("torchvision"),
                 "torchvision.transforms": types.ModuleType("torchvision.transforms"),
                 "torchvision.transforms.functional": functional}
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("spandrel")
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)


def load_descriptor(path: Path, name: str, device, dtype=None):
    """The spandrel model of an upscaler file, on `device` (in `dtype` when it is a half precision
    the architecture supports, else float32), in eval mode; InvalidInput naming
    `model_name` when the file is not an image-to-image model spandrel knows."""
    spandrel = import_spandrel()
    try:
        descriptor = spandrel.ModelLoader(device="cpu").load_from_file(path)
    except spandrel.UnsupportedModelError as exc:
        raise InvalidInput("model_name", f"{name} is not an upscaler model of an architecture this server knows "
                                         f"(ESRGAN, Real-ESRGAN, SRVGG compact, SPAN, ...)") from exc
    except Exception as exc:  # not a checkpoint at all: torch/safetensors raise many types
        raise InvalidInput("model_name", f"{name} could not be read as a .pth or .safetensors upscaler model "
                                         f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose not in PURPOSES:
        raise InvalidInput("model_name", f"{name} is a {descriptor.architecture.name} {descriptor.purpose} model, "
                                         f"not an upscaler: load an image super-resolution model (ESRGAN family)")
    if descriptor.input_channels not in (1, 3) or descriptor.output_channels not in (1, 3):
        raise InvalidInput("model_name", f"{name} maps {descriptor.input_channels} channels to "
                                         f"{descriptor.output_channels}; this server upscales RGB or grayscale images")
    if dtype is not None and _supports(descriptor, dtype):  # half precision where the model takes it
        descriptor.to(dtype)
    descriptor.to(device).eval()
    return descriptor


def _supports(descriptor, dtype) -> bool:
    import torch

    return {torch.float16: descriptor.supports_half, torch.bfloat16: descriptor.supports_bfloat16}.get(dtype, False)


class Upscaler:
    """A loaded upscaler: spandrel's model and how it is run."""

    def __init__(self, plan: UpscalerPlan, descriptor):
        self.plan = plan
        self.descriptor = descriptor
        self.scale = int(descriptor.scale)

    def tiles_per_pass(self, width: int, height: int, tile_size: int) -> int:
        if not tile_size or self._whole_image_only() or (width <= tile_size and height <= tile_size):
            return 1
        overlap = overlap_for(tile_size)
        return len(_grid(width, tile_size, overlap)[0]) * len(_grid(height, tile_size, overlap)[0])

    def total_tiles(self, width: int, height: int, spec: UpscaleSpec) -> int:
        total = 0
        for _ in range(spec.repeats):
            total += self.tiles_per_pass(width, height, spec.tile_size)
            width, height = width * spec.factor, height * spec.factor
        return total

    def upscale(self, image: PIL.Image.Image, spec: UpscaleSpec,
                on_tile: Callable[[], None] = lambda: None) -> PIL.Image.Image:
        """`image` upscaled by spec.factor, spec.repeats times; on_tile() after every tile
        (exceptions it raises, e.g. a cancel, propagate)."""
        alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
        mode = "L" if self.descriptor.input_channels == 1 else "RGB"
        out = image.convert(mode)
        for _ in range(spec.repeats):
            target = (out.width * spec.factor, out.height * spec.factor)
            out = self.one_pass(out, spec.tile_size, on_tile)
            if out.size != target:
                out = out.resize(target, PIL.Image.Resampling.LANCZOS)
        if alpha is not None:  # the models see colour only; transparency follows by Lanczos
            out = out.convert("RGBA" if out.mode == "RGB" else "LA")
            out.putalpha(alpha.resize(out.size, PIL.Image.Resampling.LANCZOS))
        return out

    def one_pass(self, image: PIL.Image.Image, tile_size: int, on_tile: Callable[[], None] = lambda: None):
        """One run of the model over the image (x its scale), tiled unless tile_size is 0."""
        import torch

        array = np.asarray(image, dtype=np.float32) / 255.0
        if array.ndim == 2:
            array = array[:, :, None]
        x = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)
        threads = self.plan.n_threads if self.plan.n_threads > 0 and self._device().type == "cpu" else 0
        previous = torch.get_num_threads()
        try:
            if threads:
                torch.set_num_threads(threads)
            with torch.inference_mode():
                y = upscale_tensor(self._run, x, self.scale,
                                   0 if self._whole_image_only() else tile_size, on_tile)
        finally:
            if threads:
                torch.set_num_threads(previous)
        out = (y[0].permute(1, 2, 0).clamp(0, 1).mul(255).round().to(torch.uint8)).numpy()
        return PIL.Image.fromarray(out[:, :, 0] if out.shape[2] == 1 else out)

    def _device(self):
        return next(iter(self.descriptor.model.parameters())).device

    def _whole_image_only(self) -> bool:
        # Models that tile themselves (or need the whole picture) say so.
        return self.descriptor.tiling.name == "INTERNAL"

    def _run(self, x):
        """The model on one tile (on CPU, float32 in and out), padded to its size needs."""
        req = self.descriptor.size_requirements
        h, w = x.shape[-2:]
        ph, pw = _needed(h, req), _needed(w, req)
        if req.square:
            ph = pw = max(ph, pw)
        parameter = next(iter(self.descriptor.model.parameters()))
        x = x.to(parameter.device, parameter.dtype)
        if ph != h or pw != w:
            import torch.nn.functional as F

            mode = "reflect" if ph - h < h and pw - w < w else "replicate"
            x = F.pad(x, (0, pw - w, 0, ph - h), mode=mode)
        y = self.descriptor(x)
        return y[..., : h * self.scale, : w * self.scale].float().cpu()


def _needed(size: int, req) -> int:
    size = max(size, req.minimum)
    return math.ceil(size / req.multiple_of) * req.multiple_of


def overlap_for(tile_size: int) -> int:
    """Pixels neighbouring tiles share: an eighth of the tile, 8 to 32."""
    return max(8, min(32, tile_size // 8))


def _grid(length: int, tile: int, overlap: int) -> tuple[list[int], int]:
    """Where tiles start along one axis, and their length: as few tiles of at most `tile`
    pixels as cover `length` overlapping by at least `overlap`, spread evenly so no pixel is
    computed more often than needed."""
    if length <= tile:
        return [0], length
    count = math.ceil((length - overlap) / (tile - overlap))
    size = math.ceil((length + (count - 1) * overlap) / count)
    step = (length - size) / (count - 1)
    return [round(i * step) for i in range(count)], size


def _ramp(length: int, overlap: int, start: bool, end: bool):
    """Blend weights along one axis of a tile: rising over the overlap where a neighbour
    comes before it, falling where one comes after, 1 elsewhere."""
    import torch

    weights = torch.ones(length)
    if overlap <= 0:
        return weights
    ramp = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap
    if start:
        weights[:overlap] = torch.minimum(weights[:overlap], ramp)
    if end:
        weights[length - overlap:] = torch.minimum(weights[length - overlap:], ramp.flip(0))
    return weights


def upscale_tensor(run: Callable, x, scale: int, tile_size: int, on_tile: Callable[[], None] = lambda: None):
    """`run` (a model, x `scale`) over `x` (1, C, H, W) in overlapping tiles of tile_size pixels
    blended linearly where they overlap; tile_size 0 = the whole image at once."""
    import torch

    _, _, height, width = x.shape
    if not tile_size or (height <= tile_size and width <= tile_size):
        y = run(x)
        on_tile()
        return y
    overlap = overlap_for(tile_size)
    (ys, tile_h), (xs, tile_w) = _grid(height, tile_size, overlap), _grid(width, tile_size, overlap)
    out = weight = None
    for top in ys:
        for left in xs:
            tile = x[:, :, top:top + tile_h, left:left + tile_w]
            y = run(tile)
            if out is None:
                out = torch.zeros((1, y.shape[1], height * scale, width * scale), dtype=torch.float32)
                weight = torch.zeros((1, 1, height * scale, width * scale), dtype=torch.float32)
            th, tw = y.shape[-2:]
            # Overlap actually shared with the previous/next tile (the last one may share more).
            w_rows = _ramp(th, _shared(top, ys, tile_h) * scale, top > 0, top != ys[-1])
            w_cols = _ramp(tw, _shared(left, xs, tile_w) * scale, left > 0, left != xs[-1])
            w = (w_rows[:, None] * w_cols[None, :])[None, None]
            region = (slice(None), slice(None), slice(top * scale, top * scale + th),
                      slice(left * scale, left * scale + tw))
            out[region] += y * w
            weight[region] += w
            on_tile()
    return out / weight


def _shared(start: int, starts: list[int], tile: int) -> int:
    """Pixels the tile at `start` shares with its nearest neighbour (the smallest overlap)."""
    index = starts.index(start)
    shares = []
    if index > 0:
        shares.append(starts[index - 1] + tile - start)
    if index + 1 < len(starts):
        shares.append(start + tile - starts[index + 1])
    return min(shares) if shares else 0


# --------------------------------------------------------------------------- the resident upscaler


class UpscalerHost(OneResident):
    """Keeps at most one upscaler resident; loads the plan's file when a job needs it. Loads
    and unloads are announced (`announce`: upscaler_loaded, upscaler_unloaded)."""

    unloaded_kind = events_pb2.EVENT_KIND_UPSCALER_UNLOADED

    def get(self, plan: UpscalerPlan) -> Upscaler:
        """The upscaler of `plan`'s file, loading it (after unloading any other) when needed."""
        with self._lock:
            self._make_current(plan.key(), plan.model_name)

            def load():
                descriptor = load_descriptor(Path(plan.path), plan.model_name, self.device, self.dtype)
                self.announce(events_pb2.EVENT_KIND_UPSCALER_LOADED,
                              {"model_name": plan.model_name, "scale": descriptor.scale})
                return Upscaler(plan, descriptor), str(self.device), module_bytes(descriptor.model)

            upscaler = self._residency.get(plan.key(), load)
            upscaler.plan = plan  # the same file, perhaps loaded with other threads or tiles
            return upscaler

    def resident(self) -> str | None:
        """The name of the upscaler resident here, if any."""
        return self._name if self._current() is not None else None


# --------------------------------------------------------------------------- requests


def parse_upscale(request: dict, plan: UpscalerPlan | None, settings) -> tuple[UpscaleSpec, dict, bytes]:
    """POST /upscale: the job's upscale, its params (GET /queue/{id}) and the input image as PNG."""
    from services.common import media

    if plan is None:
        raise InvalidInput("upscaler", "No upscaler loaded: load one with POST /upscaler/load first")
    bad = Violations()
    factor = bad.integer("upscale_factor", request.get("upscale_factor"), plan.scale, 1, MAX_FACTOR)
    tile = check_tile_size(bad, "tile_size", request.get("tile_size"), plan.tile_size)
    repeats = bad.integer("repeats", request.get("repeats"), 1, 1, MAX_REPEATS)
    raw = request.get("image_base64") or ""
    data = None
    if bad.require(bool(raw), "image_base64", "is required (a base64 PNG or JPEG)"):
        try:
            image = media.decode_image(media.decode_base64(raw, "image_base64"), "image_base64", settings.media)
        except InvalidInput as exc:
            for name, description in exc.violations:
                bad.add(name, description)
        else:
            if not bad:
                check_output_size(bad, image.width, image.height, factor, repeats, settings.media.max_image_pixels,
                                  ("upscale_factor", "repeats"))
            out = io.BytesIO()
            image.convert("RGBA" if image.mode in ("RGBA", "LA", "P") else "RGB").save(out, format="PNG")
            data = out.getvalue()
    bad.raise_if_any()
    params = {"model_name": plan.model_name, "upscale_factor": factor, "tile_size": tile, "repeats": repeats,
              "width": image.width, "height": image.height}
    return UpscaleSpec(plan=plan, factor=factor, tile_size=tile, repeats=repeats), params, data


def parse_generation_upscale(request: dict, plan: UpscalerPlan | None, width: int, height: int, max_pixels: int,
                             bad: Violations) -> UpscaleSpec | None:
    """txt2img/img2img's `upscale`, `upscale_repeats` and `upscale_auto_unload`: every image is
    upscaled by the loaded upscaler's own factor after generation."""
    repeats = bad.integer("upscale_repeats", request.get("upscale_repeats"), 1, 1, MAX_REPEATS)
    auto_unload = request.get("upscale_auto_unload")
    if not request.get("upscale"):
        return None
    if plan is None:
        bad.add("upscale", "needs a loaded upscaler: load one with POST /upscaler/load first, or leave it false")
        return None
    if isinstance(repeats, int) and isinstance(width, int) and isinstance(height, int):
        check_output_size(bad, width, height, plan.scale, repeats, max_pixels, ("upscale_repeats",))
    return UpscaleSpec(plan=plan, factor=plan.scale, tile_size=plan.tile_size, repeats=repeats,
                       auto_unload=True if auto_unload is None else bool(auto_unload))
