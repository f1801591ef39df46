"""Every block of the generation server's "cURL Examples by Model Type" (tests/data holds the
section verbatim), run as written through the gateway: the request bodies are the document's,
with its file names pointing at tiny files of the same format, images and videos made smaller,
and fewer steps, frames and images per batch."""

from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import write_random_lora
from tests.test_inference_server import wait_job

EXAMPLES = Path(__file__).parent / "data" / "generation_curl_examples.md"

# The document's file names -> the tiny file of the same kind and format in the models root
# (names the tiny root already uses are not listed).
TINY_NAMES = {
    "v1-5-pruned-emaonly.safetensors": "SD1x/tiny-sd15.safetensors",
    "sd_xl_base_1.0.safetensors": "tiny-sdxl.safetensors",
    "sdxl_vae-fp16-fix.safetensors": "tiny-sd-vae.safetensors",
    "ae.safetensors": "tiny-flux-ae.safetensors",
}
# Per section, the component names whose tiny file differs from another section's file of the
# same name (the tiny Flux and SD3.5 have text encoders of different sizes; real ones share them).
TINY_NAMES_BY_SECTION = {
    "FLUX.1-dev / FLUX.1-schnell": {"clip_l.safetensors": "tiny-clip_l.safetensors",
                                    "t5xxl_fp16.safetensors": "tiny-t5xxl.safetensors"},
}


@dataclass
class Block:
    section: str  # the "####" heading
    title: str  # the bold line above the block
    route: str
    body: dict


def read_examples() -> list[Block]:
    """The POST blocks of the examples, in order; a shell substitution `'$(base64 -w0 F)'`
    inside a body becomes the string "$base64:F"."""
    blocks, section, title = [], "", ""
    text = EXAMPLES.read_text()
    for match in re.finditer(r"^#### ([^\n]+)$|^\*\*([^\n]+)\*\*$|^```bash\n(.*?)^```", text, re.M | re.S):
        heading, bold, code = match.groups()
        if heading:
            section = heading.strip()
        elif bold:
            title = bold.strip()
        elif code and "-X POST" in code:
            route = re.search(r"-X POST http://localhost:8080(/\S+)", code).group(1)
            raw = re.search(r"-d '(.*)'\s*$", code, re.S).group(1)
            raw = re.sub(r"'\$\(base64 -w0 ([^)]+)\)'", r"$base64:\1", raw)
            blocks.append(Block(section, title, route, json.loads(raw)))
    return blocks


BLOCKS = read_examples()


def smaller(value: int) -> int:
    """An eighth of a documented size, on the 16-pixel grid every family accepts, at least the
    server's minimum of 64."""
    return max(64, round(value / 128) * 16)


def as_run_here(block: Block, files: dict[str, str]) -> dict:
    names = {**TINY_NAMES, **TINY_NAMES_BY_SECTION.get(block.section, {})}
    body = {}
    for key, value in block.body.items():
        if isinstance(value, str) and value.startswith("$base64:"):
            value = files[value.removeprefix("$base64:")]
        elif isinstance(value, str) and key in ("model_name", "vae", "clip_l", "clip_g", "t5xxl", "llm", "controlnet"):
            value = names.get(value, value)
        elif key in ("width", "height"):
            value = smaller(value)
        elif key == "steps":
            value = min(value, 3)  # img2img at strength 0.4 still runs a step
        elif key == "video_frames":
            value = 5
        elif key == "batch_count":
            value = min(value, 2)
        body[key] = value
    return body


def block(section: str, title: str) -> Block:
    found = [b for b in BLOCKS if b.section == section and b.title.startswith(title)]
    assert len(found) == 1, (section, title)
    return found[0]


# Each scenario runs its blocks in order on one loaded model. The LoRA section's blocks name no
# model to load: each runs after the load of the family its LoRA is for.
SCENARIOS = {
    "sd15": [block("SD1.x / SD1.5", "Load SD1.5"), block("SD1.x / SD1.5", "Generate image with SD1.5")],
    "sdxl": [block("SDXL", "Load SDXL"), block("SDXL", "Generate 1024x1024")],
    "sd35": [block("SD3 / SD3.5 Large", "Load SD3.5"), block("SD3 / SD3.5 Large", "Generate with SD3.5")],
    "flux_dev": [block("FLUX.1-dev / FLUX.1-schnell", "Load Flux-dev"),
                 block("FLUX.1-dev / FLUX.1-schnell", "Generate with Flux (cfg_scale=1.0"),
                 block("Using LoRAs", "Generate with LoRA (Flux example)")],
    "flux_schnell": [block("FLUX.1-dev / FLUX.1-schnell", "Load Flux-schnell"),
                     block("FLUX.1-dev / FLUX.1-schnell", "Generate with Flux-schnell")],
    "qwen_image": [block("Qwen-Image (Multimodal with LLM)", "Load Qwen-Image"),
                   block("Qwen-Image (Multimodal with LLM)", "Generate with Qwen-Image")],
    "z_image": [block("Z-Image Turbo", "Load Z-Image Turbo"), block("Z-Image Turbo", "Generate with Z-Image Turbo"),
                block("Z-Image Turbo", "Z-Image with LoRA")],
    "wan21_1.3b": [block("Wan2.1 T2V (Text-to-Video)", "Load Wan2.1 T2V 1.3B"),
                   block("Wan2.1 T2V (Text-to-Video)", "Generate video with Wan2.1")],
    "wan21_14b_gguf": [block("Wan2.1 T2V (Text-to-Video)", "Load Wan2.1 T2V 14B"),
                       block("Wan2.1 T2V (Text-to-Video)", "Generate video with Wan2.1")],
    "loras_sd15": [block("SD1.x / SD1.5", "Load SD1.5"), block("Using LoRAs", "Multiple LoRAs")],
    "controlnet_then_img2img": [block("Using ControlNet", "Load model with ControlNet"),
                                block("Using ControlNet", "Generate with control image"),
                                block("img2img (Image-to-Image)", "Transform an existing image")],
}


def test_every_example_block_is_in_a_scenario():
    used = {id(b) for blocks in SCENARIOS.values() for b in blocks}
    assert len(BLOCKS) == 23 and all(id(b) in used for b in BLOCKS), [b.title for b in BLOCKS if id(b) not in used]


@pytest.fixture(scope="module")
def client(mesh):
    with httpx.Client(base_url=mesh.rest_url, timeout=300) as client:
        yield client


def _png(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


@pytest.fixture(scope="module")
def files() -> dict[str, str]:
    """The images the examples read with $(base64 -w0 ...): white edges on black for the
    ControlNet, a picture for img2img."""
    edges = np.zeros((512, 512), np.uint8)
    edges[100:110, 80:430] = edges[400:410, 80:430] = edges[100:410, 80:90] = edges[100:410, 420:430] = 255
    rng = np.random.default_rng(5)
    picture = (rng.random((512, 512, 3)) * 255).astype(np.uint8)
    return {"canny_edges.png": _png(Image.fromarray(edges).convert("RGB")), "input.png": _png(Image.fromarray(picture))}


@pytest.fixture(scope="module")
def example_loras(inference_models):
    """The LoRAs the examples name, each for the family its example runs on; put back as they
    were afterwards (other tests write their own add_detail)."""
    folder = inference_models["loras"]
    wanted = {"realism_lora": inference_models["flux_config"], "zimage_amberrayne_v1": inference_models["zimage"],
              "add_detail": inference_models["sd15_config"], "enhance_colors": inference_models["sd15_config"]}
    saved = {}
    for seed, (name, config) in enumerate(wanted.items()):
        path = folder / f"{name}.safetensors"
        saved[path] = path.read_bytes() if path.exists() else None
        write_random_lora(config, path, seed=seed)
    yield
    for path, content in saved.items():
        if content is None:
            path.unlink()
        else:
            path.write_bytes(content)


def _check_video(data: bytes, width: int, height: int, frames: int) -> None:
    with av.open(io.BytesIO(data)) as container:
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(decoded) == frames and decoded[0].shape == (height, width, 3)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_the_example_runs_as_written(client, files, example_loras, scenario):
    for example in SCENARIOS[scenario]:
        body = as_run_here(example, files)
        r = client.post(example.route, json=body)
        what = f"{example.section}: {example.title}"
        if example.route == "/models/load":
            assert r.status_code == 200, (what, r.text)
            loaded = r.json()
            assert loaded["success"] is True and loaded["model_name"] == body["model_name"], what
            for component in ("vae", "clip_l", "clip_g", "t5xxl", "llm", "controlnet"):
                assert loaded["loaded_components"].get(component) == body.get(component), (what, component)
            continue
        assert r.status_code == 202, (what, r.text)
        job = wait_job(client, r.json()["job_id"], timeout=600)
        assert job["status"] == "completed", (what, job)
        count = body.get("batch_count", 1)
        assert len(job["outputs"]) == count, what
        for output in job["outputs"]:
            served = client.get(f"/output/{output}")
            assert served.status_code == 200, what
            if example.route == "/txt2vid":
                assert output.endswith(".mp4")
                _check_video(served.content, body["width"], body["height"], body["video_frames"])
            else:
                assert Image.open(io.BytesIO(served.content)).size == (body["width"], body["height"]), what
