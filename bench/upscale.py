"""Upscaling 16 images with an ESRGAN 4x (RRDBNet, 16 filters, 2 blocks, random weights):

1. the service: 16 queued POST /upscale jobs through REST, tiled (128-pixel tiles, the
   documented default), waited for and their PNGs fetched;
2. spandrel in-process on the same images, the whole image at once, PNG-encoded;
3. spandrel in-process, tiled exactly as the service tiles (upscaling.upscale_tensor).

Prints the service's time against each (target ratio <= 1.10 against the tiled one, which
does the same arithmetic).
"""

from __future__ import annotations

import base64
import io
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "gen")]

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import median, start_mesh, workdir  # noqa: E402
from services.inference import upscaling  # noqa: E402
from tinymodels import model_files as tiny_model_files  # noqa: E402

IMAGES, SIZE, TILE, ROUNDS = 16, (256, 192), 128, 3
MODEL = "RealESRGAN_x4plus.pth"
# Polling takes CPU from the jobs it waits for (2 cores); one poll per quarter second costs
# at most that once, at the end.
POLL_S = 0.25


def pictures() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(IMAGES):
        buffer = io.BytesIO()
        Image.fromarray((rng.random((SIZE[1], SIZE[0], 3)) * 255).astype(np.uint8)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def in_process(model, images: list[bytes], tile: int) -> None:
    """The plain code: decode, run spandrel's model (tiled or not), encode the PNG."""
    with torch.inference_mode():
        for data in images:
            array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0
            x = torch.from_numpy(array).permute(2, 0, 1)[None]
            y = upscaling.upscale_tensor(model, x, 4, tile) if tile else model(x)
            out = (y[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            Image.fromarray(out).save(io.BytesIO(), format="PNG")


def through_rest(client: httpx.Client, images: list[bytes]) -> None:
    ids = []
    for data in images:
        r = client.post("/upscale", json={"image_base64": base64.b64encode(data).decode(), "tile_size": TILE})
        assert r.status_code == 202, r.text
        ids.append(r.json()["job_id"])
    # One worker takes jobs in order: once the last is done, all are.
    while client.get(f"/queue/{ids[-1]}").json()["status"] not in ("completed", "failed", "cancelled"):
        time.sleep(POLL_S)
    for job_id in ids:
        job = client.get(f"/queue/{job_id}").json()
        assert job["status"] == "completed", job
        assert client.get(f"/output/{job['outputs'][0]}").status_code == 200


def main() -> None:
    with workdir() as tmp:
        root = Path(tmp)
        models = root / "inference-models"
        path = tiny_model_files.build_esrgan_file(models / "esrgan" / MODEL, scale=4, num_filters=16, num_blocks=2)
        model = upscaling.load_descriptor(path, MODEL, "cpu")
        images = pictures()
        mesh = start_mesh(root, {"LORAMESH_INFERENCE_MODELS_DIR": str(models),
                                 "LORAMESH_OUTPUT_DIR": str(root / "outputs")})
        try:
            with httpx.Client(base_url=mesh.rest_url, timeout=600) as client:
                loaded = client.post("/upscaler/load", json={"model_name": MODEL, "tile_size": TILE})
                assert loaded.status_code == 200, loaded.text
                through_rest(client, images[:2])  # warm-ups
                in_process(model, images[:2], TILE)
                ours, whole, tiled = [], [], []
                # Rounds alternate, so every side sees the same machine noise.
                for _ in range(ROUNDS):
                    for runs, run in ((whole, lambda: in_process(model, images, 0)),
                                      (tiled, lambda: in_process(model, images, TILE)),
                                      (ours, lambda: through_rest(client, images))):
                        started = time.perf_counter()
                        run()
                        runs.append(time.perf_counter() - started)
        finally:
            mesh.stop()
    ours_s, whole_s, tiled_s = median(ours), median(whole), median(tiled)
    print(f"ESRGAN 4x upscale of {IMAGES} images {SIZE[0]}x{SIZE[1]}, {TILE}-pixel tiles, median of {ROUNDS}")
    print(f"  REST jobs (submit, wait, fetch)  {ours_s * 1000:8.1f} ms")
    print(f"  spandrel in-process, tiled       {tiled_s * 1000:8.1f} ms")
    print(f"  spandrel in-process, whole       {whole_s * 1000:8.1f} ms")
    print(f"  ratio vs tiled                   {ours_s / tiled_s:8.2f}   (target <= 1.10)")
    print(f"  ratio vs whole image             {ours_s / whole_s:8.2f}")


if __name__ == "__main__":
    main()
