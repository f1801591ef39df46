"""Shared fixtures: test media, tiny models, and one real mesh (NATS, four gRPC services,
events bridge, Envoy) on free loopback ports for the whole session."""

from __future__ import annotations

import json
import threading
import time
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import httpx
import jwt
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from PIL import Image

from launcher.mesh import Auth, Mesh, Ports
from tinymodels import captioners as tiny_captioners
from tinymodels import diffusion as tiny_diffusion
from tinymodels import model_files as tiny_model_files
from tinymodels import wd14 as tiny_wd14

API_KEY = "test-key-123"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def violated_fields(response) -> list[str]:
    """The fields a google.rpc.BadRequest answer names."""
    return [v["field"] for d in response.json().get("details", []) for v in d.get("field_violations", [])]


def write_image(path: Path, size=(320, 240), seed=0, mode="RGB") -> Path:
    """A smooth random image (natural-looking enough to give varied tag scores)."""
    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.integers(0, 256, size=(max(2, h // 16), max(2, w // 16), 4), dtype=np.uint8)
    image = Image.fromarray(small, "RGBA").resize((w, h), Image.BICUBIC)
    if mode != "RGBA":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def write_video(path: Path, frames=12, fps=8, size=(96, 64), seed=0, codec=None) -> Path:
    """A short video whose frames differ from each other."""
    rng = np.random.default_rng(seed)
    codec = codec or {".mp4": "libx264", ".webm": "libvpx", ".gif": "gif"}[path.suffix]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        for _i in range(frames):
            small = rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
            rgb = np.asarray(Image.fromarray(small).resize(size, Image.BICUBIC))
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_counting_video(path, frames=40, fps=10, size=(64, 48), audio=False):
    """A video whose frame i is a flat grey of level 5*i, so a frame tells its index."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv444p"
        stream.options = {"crf": "0"}
        sound = container.add_stream("aac", rate=16000) if audio else None
        for i in range(frames):
            pixels = np.full((size[1], size[0], 3), 5 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if sound is not None:
            t = np.arange(int(16000 * frames / fps)) / 16000
            samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in sound.encode(frame):
                container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)
    return path


def write_tone(path, seconds=1.0, rate=16000):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=rate)
        t = np.arange(int(rate * seconds)) / rate
        samples = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="session")
def mesh_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mesh")


@pytest.fixture(scope="session")
def media_dir(mesh_root) -> Path:
    media = mesh_root / "media"
    write_image(media / "cat.png", (320, 240), seed=1)
    write_image(media / "dog.png", (200, 300), seed=2)
    write_image(media / "transparent.png", (500, 500), seed=3, mode="RGBA")
    write_video(media / "video.mp4", frames=16, fps=8, seed=4)
    return media


@pytest.fixture(scope="session")
def models_dir(mesh_root) -> Path:
    models = mesh_root / "models"
    tiny_wd14.build_wd14(models / "wd14-vit-v1")
    tiny_diffusion.build_sdxl_single_file(models / "tiny-sdxl.safetensors", config_dir=models / "tiny-sdxl-config")
    tiny_captioners.build_florence2(models / "florence2")
    tiny_captioners.build_llava(models / "joycaption")
    tiny_captioners.build_audio_lm(models / "audio-lm")
    return models


@pytest.fixture(scope="session")
def inference_models(mesh_root, models_dir) -> dict[str, Path]:
    """The generation-server models root (checkpoints/, diffusion_models/, vae/, loras/, ...)
    and the diffusers folders the /v1 catalog entries run on."""
    paths = tiny_model_files.build_models_root(mesh_root / "inference-models")
    paths["zimage"] = tiny_diffusion.build_zimage(models_dir / "tiny-zimage")
    return paths


@pytest.fixture(scope="session")
def outputs_dir(mesh_root) -> Path:
    return mesh_root / "outputs"


@pytest.fixture(scope="session")
def workflows_dir(media_dir) -> Path:
    """Where relative /v1 LoRA paths resolve (the trainer's training folder)."""
    folder = media_dir / "workflows"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def dataset_dir(media_dir) -> Path:
    """Eight small captioned pictures with masks, as the training sessions' dataset."""
    return tiny_diffusion.build_dataset(media_dir / "pop_tart")


@pytest.fixture(scope="session")
def jwt_keys():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="test", alg="RS256", use="sig")
    token = jwt.encode({"iss": "loramesh-test", "sub": "tester", "exp": int(time.time()) + 3600}, key,
                       algorithm="RS256", headers={"kid": "test"})
    return json.dumps({"keys": [jwk]}), token


@pytest.fixture(scope="session")
def mesh(mesh_root, media_dir, models_dir, dataset_dir, jwt_keys, inference_models, outputs_dir,
         workflows_dir) -> Mesh:
    jwks, token = jwt_keys
    env = {
        "LORAMESH_MEDIA_ROOTS": str(media_dir),
        "LORAMESH_MODEL_ROOTS": str(models_dir),
        "LORAMESH_TAGGER_MODEL": str(models_dir / "wd14-vit-v1"),
        # Test media is served from loopback.
        "LORAMESH_ALLOW_PRIVATE_URLS": "1",
        "LORAMESH_SHUTDOWN_GRACE_S": "2",
        # Component configs of single-file SDXL checkpoints (the hub's are out of reach).
        "LORAMESH_SDXL_CONFIG": str(models_dir / "tiny-sdxl-config"),
        "LORAMESH_TRAINER_MAX_SESSIONS": "3",
        # The captioner's default models: the documented requests name none.
        "LORAMESH_FLORENCE2_MODEL": str(models_dir / "florence2"),
        "LORAMESH_JOYCAPTION_MODEL": str(models_dir / "joycaption"),
        "LORAMESH_AUDIO_MODEL": str(models_dir / "audio-lm"),
        # A killed trainer's session is picked up again after this many seconds.
        "LORAMESH_TRAINER_ACK_WAIT_S": "3",
        # Inference: the generation-server models root, the /v1 catalog's local folders.
        "LORAMESH_INFERENCE_MODELS_DIR": str(inference_models["root"]),
        "LORAMESH_OUTPUT_DIR": str(outputs_dir),
        "LORAMESH_WORKFLOWS_BASE_PATH": str(workflows_dir),
        "LORAMESH_SD15_CONFIG": str(inference_models["sd15_config"]),
        "LORAMESH_FLUX_CONFIG": str(inference_models["flux_config"]),
        "LORAMESH_SD3_CONFIG": str(inference_models["sd3_config"]),
        "LORAMESH_WAN21_CONFIG": str(inference_models["wan21_config"]),
        "LORAMESH_WAN22_CONFIG": str(inference_models["wan22_config"]),
        "LORAMESH_QWEN_IMAGE_CONFIG": str(inference_models["qwen_image_config"]),
        "LORAMESH_ZIMAGE_CONFIG": str(inference_models["zimage_config"]),
        "LORAMESH_MODEL_SDXL": str(models_dir / "tiny-sdxl-config"),
        "LORAMESH_MODEL_SD15": str(inference_models["sd15_config"]),
        "LORAMESH_MODEL_FLUX": str(inference_models["flux_config"]),
        "LORAMESH_MODEL_FLUX_KONTEXT": str(inference_models["flux_config"]),
        "LORAMESH_MODEL_ZIMAGE_TURBO": str(inference_models["zimage"]),
        "LORAMESH_MODEL_WAN21_1B_T2V": str(inference_models["wan21_config"]),
        "LORAMESH_MODEL_WAN21_14B_T2V": str(inference_models["wan21_config"]),
        "LORAMESH_MODEL_WAN22_14B_T2V": str(inference_models["wan22_config"]),
        # A killed inference worker's job is picked up again after this many seconds.
        "LORAMESH_INFERENCE_ACK_WAIT_S": "3",
        # Each inference replica's server_status on the WebSocket, every second.
        "LORAMESH_STATUS_INTERVAL_S": "1",
        "HF_HUB_OFFLINE": "1",
    }
    mesh = Mesh(Ports.free(), var_dir=mesh_root / "var", env=env,
                auth=Auth(jwks=jwks, api_keys=[API_KEY], dev_token=token))
    mesh.start(timeout=120)
    yield mesh
    mesh.stop()


@pytest.fixture(scope="session")
def media_server(media_dir):
    """Serves the media folder over http on loopback."""
    handler = partial(_QuietHandler, directory=str(media_dir))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def write_random_lora(pipeline_dir: Path, out_path: Path, seed: int = 0, rank: int = 4) -> Path:
    """A LoRA (diffusers layout, as `save_lora_weights` writes it) on the attention
    projections of a pipeline folder's denoiser, with random non-zero weights so it visibly
    changes the image."""
    import torch
    from diffusers import DiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    pipe = DiffusionPipeline.from_pretrained(pipeline_dir)
    component = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    model = inject_adapter_in_model(config, getattr(pipe, component))
    layers = get_peft_model_state_dict(model)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(out_path.parent, **{f"{component}_lora_layers": layers}, weight_name=out_path.name)
    return out_path


class RoutesHandler(BaseHTTPRequestHandler):
    """A loopback web server's answers, set by a test: path -> (status, headers, body);
    it records the Host header of every request."""

    routes: dict = {}
    seen_hosts: list = []

    def do_GET(self):
        self.seen_hosts.append(self.headers.get("host"))
        status, headers, body = self.routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def sdxl_loaded(mesh):
    """The tiny single-file SDXL checkpoint loaded through /models/load."""
    with httpx.Client(base_url=mesh.rest_url, timeout=120) as client:
        r = client.post("/models/load", json={"model_name": "tiny-sdxl.safetensors", "model_type": "checkpoint"})
        assert r.status_code == 200, r.text


def wait_for(check, timeout: float) -> bool:
    """Polls `check` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False
