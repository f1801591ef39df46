"""Tagging throughput: 64 images in one REST request through the mesh versus a
one-image-at-a-time reference loop (decode, preprocess, session.run per image) on the
same ONNX model, in one run. Prints images/s for both and the ratio."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "gen")]

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import start_mesh, workdir  # noqa: E402
from tests.wd14_reference import reference_pixels  # noqa: E402

IMAGES = 64
ROUNDS = 3


def reference_loop(model_dir: Path, paths: list[Path]) -> None:
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    name, size = session.get_inputs()[0].name, session.get_inputs()[0].shape[1]
    for path in paths:
        session.run(None, {name: reference_pixels(Image.open(path), size)[None]})


def main() -> None:
    with workdir() as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        paths = []
        (root / "media").mkdir(parents=True)
        for i in range(IMAGES):
            small = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
            path = root / "media" / f"img{i:02d}.png"
            Image.fromarray(small).resize((768, 640), Image.BICUBIC).save(path)
            paths.append(path)
        mesh = start_mesh(root)
        try:
            with httpx.Client(timeout=300) as client:
                body = {"input": [str(p) for p in paths]}
                assert client.post(mesh.rest_url + "/tag", json=body).status_code == 200  # load the model
                mesh_times, ref_times = [], []
                for _ in range(ROUNDS):
                    start = time.perf_counter()
                    r = client.post(mesh.rest_url + "/tag", json=body)
                    mesh_times.append(time.perf_counter() - start)
                    assert r.status_code == 200 and len(r.json()) == IMAGES, r.text[:200]
                    start = time.perf_counter()
                    reference_loop(root / "models" / "wd14", paths)
                    ref_times.append(time.perf_counter() - start)
        finally:
            mesh.stop()
    mesh_rate = IMAGES / min(mesh_times)
    ref_rate = IMAGES / min(ref_times)
    print(f"mesh (REST, one request)      {mesh_rate:8.1f} images/s")
    print(f"reference (one image at once) {ref_rate:8.1f} images/s")
    print(f"ratio mesh/reference          {mesh_rate / ref_rate:8.2f}x   (target >= 1.5x)")


if __name__ == "__main__":
    main()
