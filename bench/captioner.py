"""Captioning throughput: 32 images through the batch RPC (REST through the mesh) against
a one-image-at-a-time Florence-2 `generate` loop on the same tiny model, in one run.
Prints images/s for both and the ratio (the gain from batching)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "gen")]

import httpx  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoProcessor, Florence2ForConditionalGeneration  # noqa: E402

from bench.common import median, start_mesh, workdir  # noqa: E402
from tests.conftest import write_image  # noqa: E402
from tinymodels import captioners as tiny_captioners  # noqa: E402

IMAGES = 32
ROUNDS = 3
OPTIONS = {"task": "<CAPTION>", "max_new_tokens": 16, "num_beams": 3}


def reference_loop(model, processor, paths: list[Path]) -> None:
    for path in paths:
        image = Image.open(path).convert("RGB")
        inputs = processor(text=OPTIONS["task"], images=image, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=OPTIONS["max_new_tokens"], num_beams=OPTIONS["num_beams"],
                                 do_sample=False)
        processor.post_process_generation(processor.batch_decode(out, skip_special_tokens=False)[0],
                                          task=OPTIONS["task"], image_size=image.size)


def main() -> None:
    with workdir() as tmp:
        root = Path(tmp)
        model_dir = tiny_captioners.build_florence2(root / "models" / "florence2")
        paths = [write_image(root / "media" / f"{i}.png", (96, 64), seed=i) for i in range(IMAGES)]
        model = Florence2ForConditionalGeneration.from_pretrained(model_dir).eval()
        processor = AutoProcessor.from_pretrained(model_dir)
        theirs = []
        for _ in range(ROUNDS):
            started = time.perf_counter()
            reference_loop(model, processor, paths)
            theirs.append(time.perf_counter() - started)
        mesh = start_mesh(root)
        try:
            body = {"image_paths": [str(p) for p in paths], "batch_size": IMAGES,
                    "options": {**OPTIONS, "model_path": str(model_dir)}}
            with httpx.Client(base_url=mesh.rest_url, timeout=600) as client:
                assert client.post("/caption/batch", json=body).status_code == 200  # loads the model
                ours = []
                for _ in range(ROUNDS):
                    started = time.perf_counter()
                    assert client.post("/caption/batch", json=body).status_code == 200
                    ours.append(time.perf_counter() - started)
        finally:
            mesh.stop()
    rate_ours, rate_theirs = IMAGES / median(ours), IMAGES / median(theirs)
    print(f"tiny Florence-2, {IMAGES} images, {OPTIONS}")
    print(f"  batch RPC through the gateway  {rate_ours:8.1f} images/s")
    print(f"  one-at-a-time generate loop    {rate_theirs:8.1f} images/s")
    print(f"  ratio                          {rate_ours / rate_theirs:8.2f}x  (target >= 2x)")


if __name__ == "__main__":
    main()
