"""Live-preview overhead per denoising step, for each mode against no previews, in one run:
a step of an SDXL UNet (classifier-free guidance, so a batch of two) alone, and the same step
followed by the preview the service makes of its latents (services/inference/previews.py:
`proj`, `tae` with a TAESDXL decoder, `vae` with the model's VAE; JPEG at the default 256 px,
quality 75). Prints the added time per step as a percentage.

By default the tiny SDXL (CPU-sized) at 512x512; `--real` builds SDXL's published UNet, VAE
and TAESDXL sizes with random weights and runs 1024x1024 (a GPU's job: about 10 GB).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "gen")]

import torch  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402

from services.common import architectures  # noqa: E402
from services.inference import previews  # noqa: E402
from tinymodels import diffusion as tiny_diffusion  # noqa: E402
from tinymodels.model_files import build_taesd_decoder_file  # noqa: E402

ROUNDS = 6
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
SDXL_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                scaling_factor=0.13025, sample_size=1024)


def components(real: bool, root: Path, device, dtype):
    if real:
        unet, vae, size = UNet2DConditionModel(**SDXL_UNET), AutoencoderKL(**SDXL_VAE), 1024
    else:
        pipe = tiny_diffusion.tiny_sdxl_pipeline(0)
        unet, vae, size = pipe.unet, pipe.vae, 512
    tae = build_taesd_decoder_file(root / "taesd" / "taesdxl_decoder.safetensors", 4)
    return unet.to(device, dtype).eval(), vae.to(device, dtype).eval(), tae, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="SDXL's real sizes at 1024x1024 (needs a GPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory(prefix="loramesh-bench-") as tmp:
        unet, vae, tae, size = components(args.real, Path(tmp), device, dtype)
        config = unet.config
        latent = size // 8
        generator = torch.Generator(device).manual_seed(0)
        latents = torch.randn(2, 4, latent, latent, generator=generator, device=device, dtype=dtype)
        text = torch.randn(2, 77, config.cross_attention_dim, generator=generator, device=device, dtype=dtype)
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2, pooled, generator=generator, device=device, dtype=dtype),
                 "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, device=device, dtype=dtype)}
        pipe = SimpleNamespace(vae=vae)
        makers = {mode: previews.Previewer(previews.PreviewSettings(mode=mode), architectures.SDXL, size, size, tae)
                  for mode in (previews.PROJ, previews.TAE, previews.VAE)}

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()

        def step(mode: str | None) -> float:
            sync()
            started = time.perf_counter()
            with torch.inference_mode():
                unet(latents, 500, encoder_hidden_states=text, added_cond_kwargs=added)
                if mode is not None:
                    makers[mode].render(pipe, latents[:1])
            sync()
            return time.perf_counter() - started

        modes = [None, *makers]
        for mode in modes:  # warm-up: kernels, the TAE's first load
            step(mode)
        times: dict = {mode: [] for mode in modes}
        for _ in range(ROUNDS):  # rounds alternate, so every mode sees the same machine noise
            for mode in modes:
                times[mode].append(step(mode))
        base = sorted(times[None])[ROUNDS // 2]
        print(f"SDXL UNet step at {size}x{size} on {device.type} ({dtype}): {base * 1000:.1f} ms without previews")
        for mode in makers:
            median = sorted(times[mode])[ROUNDS // 2]
            print(f"  preview mode {mode:4}: {median * 1000:8.1f} ms per step, "
                  f"overhead {100 * (median - base) / base:+.1f}% (ratio {median / base:.3f})")


if __name__ == "__main__":
    main()
