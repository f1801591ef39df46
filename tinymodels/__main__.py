"""Tiny randomly initialised models in the real architectures and file layouts, for the
tests and the offline demo (no machine here can download weights). One builder per model
family; each writes a folder that the services load exactly as they load real weights.

    python -m tinymodels wd14 --out var/models/wd14-tiny
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from tinymodels import captioners, diffusion, wd14

BUILDERS: dict[str, Callable[[Path], Path]] = {
    "wd14": wd14.build_wd14,
    "sdxl": diffusion.build_sdxl,
    "sd15": diffusion.build_sd15,
    "flux": diffusion.build_flux,
    "sd3": diffusion.build_sd3,
    "sdxl-single-file": diffusion.build_sdxl_single_file,
    "dataset": diffusion.build_dataset,
    "florence2": captioners.build_florence2,
    "llava": captioners.build_llava,
    "audio-lm": captioners.build_audio_lm,
}


def main() -> None:
    parser = argparse.ArgumentParser(description="Build tiny models for tests and the offline demo.")
    parser.add_argument("family", choices=sorted(BUILDERS))
    parser.add_argument("--out", type=Path, required=True, help="folder to write the model into")
    args = parser.parse_args()
    print(BUILDERS[args.family](args.out))


if __name__ == "__main__":
    main()
