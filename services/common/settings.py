"""Settings from environment variables (LORAMESH_*), read once per process."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
VAR_DIR = REPO_ROOT / "var"

# Default gRPC ports of the four services (DESIGN.md).
SERVICE_PORTS = {"trainer": 50051, "captioner": 50052, "tagger": 50053, "inference": 50054}

# Where server-side paths may point unless LORAMESH_MEDIA_ROOTS / LORAMESH_MODEL_ROOTS say otherwise.
DEFAULT_MEDIA_ROOTS = ("/workspaces", "/work", "/data", str(VAR_DIR / "media"))
DEFAULT_MODEL_ROOTS = ("/models", "/work/models", str(VAR_DIR / "models"))


def _paths(name: str, default: tuple[str, ...]) -> tuple[Path, ...]:
    raw = os.environ.get(name)
    parts = raw.split(os.pathsep) if raw else default
    return tuple(Path(p).expanduser().resolve() for p in parts if p.strip())


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


@dataclass(frozen=True)
class MediaLimits:
    """Limits on everything a request can make the service read or decode."""

    max_download_bytes: int = field(default_factory=lambda: _int("LORAMESH_MAX_DOWNLOAD_BYTES", 256 << 20))
    download_timeout_s: float = field(default_factory=lambda: _float("LORAMESH_DOWNLOAD_TIMEOUT_S", 30.0))
    max_redirects: int = 3
    allow_private_urls: bool = field(default_factory=lambda: _bool("LORAMESH_ALLOW_PRIVATE_URLS", False))
    max_image_pixels: int = field(default_factory=lambda: _int("LORAMESH_MAX_IMAGE_PIXELS", 64_000_000))
    max_video_frames: int = field(default_factory=lambda: _int("LORAMESH_MAX_VIDEO_FRAMES", 500))
    max_video_seconds: float = field(default_factory=lambda: _float("LORAMESH_MAX_VIDEO_SECONDS", 3600.0))


@dataclass(frozen=True)
class TrainerLimits:
    """How the trainer shares sessions between replicas."""

    # Sessions one replica runs at once (each holds its model in memory while it waits).
    max_sessions: int = field(default_factory=lambda: _int("LORAMESH_TRAINER_MAX_SESSIONS", 1))
    # Seconds without a heartbeat before a dead replica's session goes to another.
    ack_wait_s: float = field(default_factory=lambda: _float("LORAMESH_TRAINER_ACK_WAIT_S", 60.0))
    # How long an abort waits for the running replica to save its checkpoint.
    abort_timeout_s: float = field(default_factory=lambda: _float("LORAMESH_TRAINER_ABORT_TIMEOUT_S", 300.0))


@dataclass(frozen=True)
class InferenceSettings:
    """Where the inference service reads models and writes images, and how it queues."""

    # The generation-server API's models root (checkpoints/, diffusion_models/, vae/, loras/, ...).
    models_dir: Path = field(default_factory=lambda: Path(os.environ.get(
        "LORAMESH_INFERENCE_MODELS_DIR", str(VAR_DIR / "models" / "inference"))).expanduser().resolve())
    # Job folders (<job id>/image_0.png, config.json); GET /output serves this folder.
    output_dir: Path = field(default_factory=lambda: Path(os.environ.get(
        "LORAMESH_OUTPUT_DIR", str(VAR_DIR / "outputs"))).expanduser().resolve())
    # Relative LoRA paths of the v1 API resolve against this (ai-toolkit's training folder).
    workflows_base_path: Path = field(default_factory=lambda: Path(os.environ.get(
        "LORAMESH_WORKFLOWS_BASE_PATH", str(VAR_DIR / "media" / "output"))).expanduser().resolve())
    # The v1 API's status_url and result_url start with this.
    public_base_url: str = field(default_factory=lambda: os.environ.get(
        "LORAMESH_PUBLIC_BASE_URL", "http://localhost:8000").rstrip("/"))
    # Seconds without a heartbeat before a dead worker's job goes to another.
    ack_wait_s: float = field(default_factory=lambda: _float("LORAMESH_INFERENCE_ACK_WAIT_S", 60.0))
    # Seconds a job stays in /queue after its last change (its output files stay).
    history_s: float = field(default_factory=lambda: _float("LORAMESH_INFERENCE_HISTORY_S", 7 * 24 * 3600.0))


@dataclass(frozen=True)
class Settings:
    service: str
    port: int
    bind_host: str = field(default_factory=lambda: os.environ.get("LORAMESH_BIND_HOST", "0.0.0.0"))
    nats_url: str = field(default_factory=lambda: os.environ.get("LORAMESH_NATS_URL", "nats://127.0.0.1:4222"))
    media_roots: tuple[Path, ...] = field(default_factory=lambda: _paths("LORAMESH_MEDIA_ROOTS", DEFAULT_MEDIA_ROOTS))
    model_roots: tuple[Path, ...] = field(default_factory=lambda: _paths("LORAMESH_MODEL_ROOTS", DEFAULT_MODEL_ROOTS))
    # "auto" picks CUDA when present.
    device: str = field(default_factory=lambda: os.environ.get("LORAMESH_DEVICE", "auto"))
    # Seconds in-flight calls get to finish after SIGTERM.
    shutdown_grace_s: float = field(default_factory=lambda: _float("LORAMESH_SHUTDOWN_GRACE_S", 30.0))
    # Most bytes of models one service keeps resident before evicting the least recently used.
    max_resident_bytes: int = field(default_factory=lambda: _int("LORAMESH_MAX_RESIDENT_BYTES", 0))
    media: MediaLimits = field(default_factory=MediaLimits)
    trainer: TrainerLimits = field(default_factory=TrainerLimits)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    replica: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    @classmethod
    def for_service(cls, service: str) -> Settings:
        port = _int(f"LORAMESH_{service.upper()}_PORT", SERVICE_PORTS[service])
        return cls(service=service, port=port)
