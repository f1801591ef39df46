"""Dataset preprocessing throughput: 64 small pictures resized, center-cropped and captioned
with Florence-2 (a) through `preprocess_sources`, which decodes and transforms in worker
threads and captions over gRPC in CaptionBatch calls of 16 on a real captioner service, and
(b) a plain in-process loop doing the same work one picture at a time (decode, transform,
one Florence-2 `generate` as the captioner runs it, write the picture and its caption), on
the same tiny model in one run. Prints images/s for both and the ratio."""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "gen")]

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoProcessor, Florence2ForConditionalGeneration  # noqa: E402

from bench.common import median, workdir  # noqa: E402
from launcher.mesh import Auth, Mesh, Ports  # noqa: E402
from services.common.errors import Violations  # noqa: E402
from services.common.settings import Settings  # noqa: E402
from services.trainer import preprocess as pre  # noqa: E402
from services.trainer.transforms import parse_transforms  # noqa: E402
from tests.conftest import write_image  # noqa: E402
from tinymodels import captioners as tiny_captioners  # noqa: E402

IMAGES = 64
ROUNDS = 1  # the one-at-a-time loop takes minutes on two cores
SIZE = 64
TRANSFORMS = [{"type": "resize", "size": SIZE}, {"type": "center_crop", "size": SIZE}]
TRIGGER = "TOK"
# The captioner's Florence-2 defaults (services/captioner/options.py), which the mesh path uses.
TASK, NUM_BEAMS, MAX_NEW_TOKENS = "<DETAILED_CAPTION>", 3, 1024


def plain_loop(model, processor, paths: list[Path], out: Path) -> None:
    out.mkdir(parents=True)
    limit = min(MAX_NEW_TOKENS, model.config.text_config.max_position_embeddings - 1)
    for index, path in enumerate(paths):
        image = Image.open(path).convert("RGB")
        scale = SIZE / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
        left, top = (image.width - SIZE) // 2, (image.height - SIZE) // 2
        image = image.crop((left, top, left + SIZE, top + SIZE))
        image.save(out / f"{index:04d}.png")
        inputs = processor(text=TASK, images=image, return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(**inputs, max_new_tokens=limit, num_beams=NUM_BEAMS, do_sample=False)
        text = processor.batch_decode(ids, skip_special_tokens=False)[0]
        caption = processor.post_process_generation(text, task=TASK, image_size=image.size)[TASK].strip()
        (out / f"{index:04d}.txt").write_text(f"{TRIGGER}, {caption}")


async def mesh_path(client: pre.CaptionerClient, sources: list[str], dest: Path, settings: Settings) -> None:
    bad = Violations()
    transforms = parse_transforms(TRANSFORMS, bad)
    bad.raise_if_any()

    async def report(stage: str, processed: int, total: int, message: str) -> None:
        pass

    result = await pre.preprocess_sources(sources, dest, transforms, pre.CaptionPlan("florence2", TASK, TRIGGER),
                                          client, settings, report, lambda: False)
    assert result.captioned == result.images


async def run_mesh(address: str, folder: Path, warmup: Path, out: Path, settings: Settings) -> list[float]:
    client = pre.CaptionerClient(address)
    try:
        await mesh_path(client, [str(warmup)], out / "warmup", settings)  # loads the model
        times = []
        for round_ in range(ROUNDS):
            started = time.perf_counter()
            await mesh_path(client, [str(folder)], out / f"round-{round_}", settings)
            times.append(time.perf_counter() - started)
        return times
    finally:
        await client.close()


def main() -> None:
    with workdir() as tmp:
        root = Path(tmp)
        media, models = root / "media", root / "models"
        model_dir = tiny_captioners.build_florence2(models / "florence2")
        paths = [write_image(media / "pictures" / f"{i:03d}.png", (96, 96), seed=i) for i in range(IMAGES)]
        warmup = write_image(media / "warmup.png", (96, 96), seed=IMAGES)

        model = Florence2ForConditionalGeneration.from_pretrained(model_dir).eval()
        processor = AutoProcessor.from_pretrained(model_dir)
        theirs = []
        for round_ in range(ROUNDS):
            out = media / "plain" / str(round_)
            started = time.perf_counter()
            plain_loop(model, processor, paths, out)
            theirs.append(time.perf_counter() - started)
            shutil.rmtree(out)
        del model

        env = {"LORAMESH_MEDIA_ROOTS": str(media), "LORAMESH_MODEL_ROOTS": str(models),
               "LORAMESH_FLORENCE2_MODEL": str(model_dir), "HF_HUB_OFFLINE": "1"}
        mesh = Mesh(Ports.free(), var_dir=root / "var", env=env, auth=Auth(jwks=None, api_keys=[]),
                    services=("captioner",)).start(timeout=120)
        try:
            address = f"127.0.0.1:{mesh.ports.services['captioner']}"
            ours = asyncio.run(run_mesh(address, media / "pictures", warmup, media / "tasks", Settings(
                media_roots=(media,))))
        finally:
            mesh.stop()
    rate_ours, rate_theirs = IMAGES / median(ours), IMAGES / median(theirs)
    print(f"tiny Florence-2 {TASK}, {IMAGES} pictures 96x96, {TRANSFORMS}")
    print(f"  preprocess_sources + captioner gRPC  {rate_ours:8.2f} images/s")
    print(f"  plain one-at-a-time loop             {rate_theirs:8.2f} images/s")
    print(f"  ratio                                {rate_ours / rate_theirs:8.2f}x  (target >= 1.0)")


if __name__ == "__main__":
    main()
