"""Live previews of running jobs: the settings every replica reads (GET/PUT /preview/settings,
kept in NATS), and the preview image of one denoising step's latents.

Modes: `proj` multiplies the latents by a per-family latent-to-RGB matrix (the factors
ComfyUI publishes for each latent space; cheap and rough); `tae` decodes them with a tiny
autoencoder (TAESD, TAESDXL, TAESD3, TAEF1 in diffusers' `AutoencoderTiny`) from the models
root's `taesd/` folder; `vae` decodes them with the model's own VAE (exact, slow); `none`
makes none. A family without a tiny autoencoder (the video families and Qwen-Image, whose
3D latents AutoencoderTiny cannot decode), or a `tae` file that is missing, previews with
`proj` instead. Previews show the latents as they are after the step: noisy until the last.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import threading
from dataclasses import dataclass
from pathlib import Path

from services.common import architectures, logs
from services.common.architectures import ModelFamily
from services.common.errors import InvalidInput, Violations

log = logs.get(__name__)

NONE, PROJ, TAE, VAE = "none", "proj", "tae", "vae"
MODES = (NONE, PROJ, TAE, VAE)
# Key of the settings in the inference_state bucket.
SETTINGS_KEY = "preview_settings"
TAE_TYPE = "taesd"  # the models-root type (and folder) of tiny autoencoders


@dataclass(frozen=True)
class PreviewSettings:
    enabled: bool = True
    mode: str = TAE
    interval: int = 1  # a preview every this many steps
    max_size: int = 256  # longest side, pixels
    quality: int = 75  # JPEG

    @property
    def active(self) -> bool:
        return self.enabled and self.mode != NONE

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict | None) -> PreviewSettings:
        return cls(**data) if data else cls()

    def updated(self, changes: dict) -> PreviewSettings:
        """These settings with `changes` (PUT /preview/settings: the fields given), each checked
        against the documented ranges; every bad field at once as InvalidInput."""
        check = Violations()
        values = self.to_json()
        for name, value in changes.items():
            if name == "enabled":
                if not isinstance(value, bool):
                    check.add(name, "must be true or false")
                values[name] = value
            elif name == "mode":
                if value not in MODES:
                    check.add(name, f"must be one of {', '.join(MODES)} (got {value!r})")
                values[name] = value
            elif name in _RANGES:
                values[name] = check.integer(name, value, low=_RANGES[name][0], high=_RANGES[name][1])
            else:
                check.add(name, f"unknown field; known: {', '.join(values)}")
        check.raise_if_any()
        return PreviewSettings(**values)


_RANGES = {"interval": (1, 100), "max_size": (64, 1024), "quality": (1, 100)}


@dataclass(frozen=True)
class LatentFormat:
    """How one family's latents look in RGB: a row of (R, G, B) weights per latent channel and a
    bias (ComfyUI's latent_rgb_factors), and the names its tiny autoencoders are published
    under (madebyollin's taesd, taesdxl, taesd3, taef1)."""
    factors: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    tae_names: tuple[str, ...] = ()

    @property
    def channels(self) -> int:
        return len(self.factors)


_SD15 = LatentFormat(((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721),
                      (-0.2120, -0.2616, -0.7177)), tae_names=("taesd",))
_SDXL = LatentFormat(((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362),
                      (-0.3165, -0.2492, -0.2188)), (0.1084, -0.0175, -0.0011), ("taesdxl",))
_SD3 = LatentFormat((
    (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293), (-0.1448, -0.1463, -0.1189),
), (0.2394, 0.2135, 0.1925), ("taesd3",))
_FLUX = LatentFormat((
    (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778),
), (-0.0329, -0.0718, -0.0851), ("taef1",))
# Wan 2.1's VAE space, which Wan 2.2 A14B and Qwen-Image share.
_WAN21 = LatentFormat((
    (-0.1299, -0.1692, 0.2932), (0.0671, 0.0406, 0.0442), (0.3568, 0.2548, 0.1747), (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328), (0.0296, -0.0956, -0.0665), (-0.3477, -0.4059, -0.2925), (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364), (-0.1293, 0.0740, 0.1636), (0.0680, 0.3019, 0.1128), (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699), (0.0060, -0.0633, 0.0005), (0.3477, 0.2275, 0.2950), (0.1984, 0.0913, 0.1861),
), (-0.1835, -0.0868, -0.3360))

LATENT_FORMATS: dict[str, LatentFormat] = {
    architectures.SD15.id: _SD15, architectures.SDXL.id: _SDXL, architectures.SD3.id: _SD3,
    architectures.FLUX.id: _FLUX, architectures.FLUX_KONTEXT.id: _FLUX, architectures.ZIMAGE.id: _FLUX,
    architectures.WAN21.id: _WAN21, architectures.WAN22.id: _WAN21, architectures.QWEN_IMAGE.id: _WAN21,
}


# ---- tiny autoencoders ----------------------------------------------------------------------


def check_tae_file(path: Path, family: ModelFamily, field_name: str) -> None:
    """Refuses (InvalidInput on `field_name`) a file that is not a tiny autoencoder for `family`;
    reads only its header."""
    fmt = LATENT_FORMATS[family.id]
    if not fmt.tae_names:
        raise InvalidInput(field_name, f"{family.name} has no tiny autoencoder (AutoencoderTiny decodes 2D latents "
                                       "only); its previews use the projection; leave it null")
    channels = _tae_latent_channels(path)
    if channels is None:
        raise InvalidInput(field_name, f"{path.name} is not a TAESD decoder (neither diffusers' AutoencoderTiny "
                                       "layout nor the original taesd_decoder layout)")
    if channels != fmt.channels:
        raise InvalidInput(field_name, f"{path.name} decodes {channels}-channel latents; {family.name} latents have "
                                       f"{fmt.channels} ({' or '.join(fmt.tae_names)} files fit)")


def find_tae(folder: Path, family: ModelFamily) -> Path | None:
    """The family's tiny autoencoder in the models root's taesd/ folder, by its published name
    (taesdxl_decoder.safetensors, taesdxl.safetensors or a diffusers folder taesdxl/)."""
    for name in LATENT_FORMATS[family.id].tae_names:
        for candidate in (folder / f"{name}_decoder.safetensors", folder / f"{name}.safetensors", folder / name):
            if candidate.is_file() or (candidate / "config.json").is_file():
                return candidate
    return None


def _tae_state(path: Path) -> dict:
    from safetensors.torch import load_file

    if path.is_dir():
        path = path / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    if any(key.startswith("decoder.") for key in state):
        return state
    # The original taesd_decoder layout: an nn.Sequential whose first entry (a clamp) has no
    # weights; diffusers' DecoderTiny applies that clamp in forward and numbers its layers from 0.
    converted = {}
    for key, value in state.items():
        index, _, rest = key.partition(".")
        if not index.isdigit():
            return {}
        converted[f"decoder.layers.{int(index) - 1}.{rest}"] = value
    return converted


def _tae_latent_channels(path: Path) -> int | None:
    from safetensors import safe_open

    if path.is_dir():
        path = path / "diffusion_pytorch_model.safetensors"
    try:
        with safe_open(str(path), "pt") as f:
            for key in ("decoder.layers.0.weight", "1.weight"):
                if key in f.keys():
                    return f.get_slice(key).get_shape()[1]
    except (OSError, ValueError, RuntimeError):
        return None
    return None


_tae_cache: dict[tuple[str, float, str, str], object] = {}
_tae_lock = threading.Lock()


def load_tae(path: Path, device, dtype):
    """diffusers' AutoencoderTiny with the file's decoder (its encoder is never used here); a
    diffusers folder brings its own config, a single file takes TAESD's (the published
    architecture) with the file's latent channels. Kept once per file, device and dtype."""
    import diffusers

    key = (str(path), path.stat().st_mtime, str(device), str(dtype))
    with _tae_lock:
        if key in _tae_cache:
            return _tae_cache[key]
        if path.is_dir():
            tae = diffusers.AutoencoderTiny.from_pretrained(str(path), torch_dtype=dtype)
        else:
            state = _tae_state(path)
            tae = diffusers.AutoencoderTiny(latent_channels=state["decoder.layers.0.weight"].shape[1])
            missing, _ = tae.load_state_dict(state, strict=False)
            if [name for name in missing if name.startswith("decoder.")]:
                raise InvalidInput(TAE_TYPE, f"{path.name} lacks decoder weights AutoencoderTiny needs")
        tae = tae.to(device=device, dtype=dtype).eval()
        _tae_cache.clear()  # one at a time: a replica runs one family
        _tae_cache[key] = tae
        return tae


# ---- rendering -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preview:
    jpeg: bytes
    width: int
    height: int

    def event_data(self, step: int, total: int, frame_count: int) -> dict:
        """The documented job_preview fields (job_id added by the caller)."""
        return {"step": step, "frame_count": frame_count, "width": self.width, "height": self.height,
                "is_noisy": step < total,
                "image": "data:image/jpeg;base64," + base64.b64encode(self.jpeg).decode()}


class Previewer:
    """Makes one job's previews on the model thread, from the running pipeline's latents."""

    def __init__(self, settings: PreviewSettings, family: ModelFamily, width: int, height: int,
                 tae_path: Path | None = None):
        self.settings = settings
        self.family = family
        self.format = LATENT_FORMATS[family.id]
        self.width, self.height = width, height
        self.tae_path = tae_path if self.format.tae_names else None
        self.mode = settings.mode
        if self.mode == TAE and self.tae_path is None:
            self.mode = PROJ

    def due(self, step: int) -> bool:
        return self.settings.active and step % self.settings.interval == 0

    def render(self, pipe, latents) -> Preview:
        """The preview of `latents` as `pipe` holds them after a step (packed for Flux and
        Qwen-Image, with a frame axis for video); a video shows its middle frame."""
        import torch

        with torch.inference_mode():
            latents = self._spatial(pipe, latents[:1])
            if self.mode == VAE:
                rgb = self._vae_decode(pipe, latents)
            else:
                if latents.ndim == 5:
                    latents = latents[:, :, latents.shape[2] // 2]
                if self.mode == TAE:
                    tae = load_tae(self.tae_path, latents.device, pipe.vae.dtype)
                    rgb = tae.decode(self._at_preview_size(latents).to(tae.dtype)).sample
                else:
                    rgb = self._project(latents)
            return self._jpeg(rgb[0])

    def _spatial(self, pipe, latents):
        if latents.ndim == 3:  # (batch, patches, channels x 2 x 2): Flux and Qwen-Image pack them
            latents = pipe._unpack_latents(latents, self.height, self.width, pipe.vae_scale_factor)
        return latents

    def _at_preview_size(self, latents):
        """Latents averaged down to what decodes to max_size: the tiny autoencoder's cost grows
        with its output's area, and a larger picture would only be shrunk afterwards."""
        import torch

        longest = max(latents.shape[-2:]) * 8
        if longest <= self.settings.max_size:
            return latents
        scale = self.settings.max_size / longest
        size = (max(1, round(latents.shape[-2] * scale)), max(1, round(latents.shape[-1] * scale)))
        return torch.nn.functional.interpolate(latents.float(), size=size, mode="area")

    def _project(self, latents):
        import torch

        if latents.shape[1] != self.format.channels:
            raise ValueError(f"{self.family.name} latents have {latents.shape[1]} channels, the projection "
                             f"{self.format.channels}")
        factors = torch.tensor(self.format.factors, dtype=torch.float32, device=latents.device)
        bias = torch.tensor(self.format.bias, dtype=torch.float32, device=latents.device)
        return torch.einsum("bchw,cr->brhw", latents.float(), factors) + bias.view(1, 3, 1, 1)

    def _vae_decode(self, pipe, latents):
        """What the pipeline does after its last step, for these latents: undo the latent
        normalisation its VAE config names, decode (one latent frame of a video)."""
        import torch

        vae = pipe.vae
        config = vae.config
        if latents.ndim == 5:  # Wan's VAE space (Wan, Qwen-Image): per-channel mean and std
            middle = latents.shape[2] // 2
            latents = latents[:, :, middle:middle + 1]
            mean = torch.tensor(config.latents_mean, device=latents.device).view(1, -1, 1, 1, 1)
            std = torch.tensor(config.latents_std, device=latents.device).view(1, -1, 1, 1, 1)
            decoded = vae.decode((latents * std + mean).to(vae.dtype)).sample
            return decoded[:, :, 0]
        if getattr(config, "latents_mean", None) is not None:
            mean = torch.tensor(config.latents_mean, device=latents.device).view(1, -1, 1, 1)
            std = torch.tensor(config.latents_std, device=latents.device).view(1, -1, 1, 1)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
        return vae.decode(latents.to(vae.dtype)).sample

    def _jpeg(self, rgb) -> Preview:
        """(3, h, w) in [-1, 1] → a JPEG no larger than max_size on its longest side."""
        import numpy as np
        import PIL.Image
        import torch

        pixels = ((rgb.float().clamp(-1, 1) + 1) * 127.5).round().to("cpu", dtype=torch.uint8)
        image = PIL.Image.fromarray(np.ascontiguousarray(pixels.permute(1, 2, 0).numpy()))
        # A latent projection is 1/8 of the image's size: shown at the image's own size, up to max_size.
        longest = min(self.settings.max_size, max(self.width, self.height))
        scale = longest / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, PIL.Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=self.settings.quality)
        return Preview(buffer.getvalue(), image.width, image.height)
