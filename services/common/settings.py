"""Every LORAMESH_* environment variable, read and checked in one place, once per process.

Each setting is a dataclass field whose metadata names its variable; `Settings.load()` reads
them all and converts each by its type, so a bad value stops the process at start-up with a
message naming the variable and what it allows. Nothing else reads the environment.
Fields left `None` mean "the built-in default" of the module that uses them (a model id, a
config folder), which the README table lists.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import typing
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
VAR_DIR = REPO_ROOT / "var"

# Default gRPC ports of the four services.
SERVICE_PORTS = {"trainer": 50051, "captioner": 50052, "tagger": 50053, "inference": 50054}
# Most processes of one service the launcher runs on one machine (LORAMESH_REPLICAS).
MAX_REPLICAS = 16

# Where server-side paths may point unless LORAMESH_MEDIA_ROOTS / LORAMESH_MODEL_ROOTS say otherwise.
DEFAULT_MEDIA_ROOTS = tuple(Path(p) for p in ("/workspaces", "/work", "/data", str(VAR_DIR / "media")))
DEFAULT_MODEL_ROOTS = tuple(Path(p) for p in ("/models", "/work/models", str(VAR_DIR / "models")))

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


class SettingsError(ValueError):
    """A LORAMESH_* variable holds a value its setting cannot take."""


def env(name: str, default=None, *, factory=None):
    """A setting read from the environment variable `name`."""
    if factory is not None:
        return field(default_factory=factory, metadata={"env": name})
    return field(default=default, metadata={"env": name})


def _convert(name: str, raw: str, kind) -> object:
    """`raw` as `kind` (int, float, bool, str, Path, tuple[Path, ...], tuple[str, ...], X | None)."""
    args = typing.get_args(kind)
    if type(None) in args:  # X | None: empty means None
        if not raw.strip():
            return None
        kind = next(a for a in args if a is not type(None))
        args = typing.get_args(kind)
    text = raw.strip()
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise SettingsError(f"{name} must be one of 1/true/yes/on or 0/false/no/off (got {raw!r})")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise SettingsError(f"{name} must be a whole number (got {raw!r})") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise SettingsError(f"{name} must be a number (got {raw!r})") from None
    if kind is Path:
        if not text:
            raise SettingsError(f"{name} must be a folder or file path (got an empty value)")
        return Path(text).expanduser().resolve()
    if typing.get_origin(kind) is tuple and args[0] is Path:
        paths = tuple(Path(p).expanduser().resolve() for p in text.split(os.pathsep) if p.strip())
        if not paths:
            raise SettingsError(f"{name} must be one or more folders separated by '{os.pathsep}' (got {raw!r})")
        return paths
    if typing.get_origin(kind) is tuple:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if typing.get_origin(kind) is dict:  # "name=count,name=count"
        pairs = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            try:
                pairs[key.strip()] = int(value)
            except ValueError:
                raise SettingsError(f"{name} must be name=number pairs separated by commas, "
                                    f"e.g. inference=2,tagger=2 (got {raw!r})") from None
        return pairs
    return raw


def _load(cls, environ: typing.Mapping[str, str], **given):
    """An instance of the settings dataclass `cls`, each env-backed field from `environ`."""
    hints = typing.get_type_hints(cls)
    values = dict(given)
    for f in dataclasses.fields(cls):
        if f.name in values:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = _load(hints[f.name], environ)
        elif "env" in f.metadata and f.metadata["env"] in environ:
            values[f.name] = _convert(f.metadata["env"], environ[f.metadata["env"]], hints[f.name])
    settings = cls(**values)
    if hasattr(settings, "check"):
        settings.check()
    return settings


def _at_least(name: str, value: float, low: float) -> None:
    if value < low:
        raise SettingsError(f"{name} must be at least {low:g} (got {value:g})")


@dataclass(frozen=True)
class MediaLimits:
    """Limits on everything a request can make the service read or decode."""

    max_download_bytes: int = env("LORAMESH_MAX_DOWNLOAD_BYTES", 256 << 20)
    download_timeout_s: float = env("LORAMESH_DOWNLOAD_TIMEOUT_S", 30.0)
    max_redirects: int = 3
    allow_private_urls: bool = env("LORAMESH_ALLOW_PRIVATE_URLS", False)
    max_image_pixels: int = env("LORAMESH_MAX_IMAGE_PIXELS", 64_000_000)
    max_video_frames: int = env("LORAMESH_MAX_VIDEO_FRAMES", 500)
    max_video_seconds: float = env("LORAMESH_MAX_VIDEO_SECONDS", 3600.0)

    def check(self) -> None:
        _at_least("LORAMESH_MAX_DOWNLOAD_BYTES", self.max_download_bytes, 1)
        _at_least("LORAMESH_DOWNLOAD_TIMEOUT_S", self.download_timeout_s, 0.001)
        _at_least("LORAMESH_MAX_IMAGE_PIXELS", self.max_image_pixels, 1)
        _at_least("LORAMESH_MAX_VIDEO_FRAMES", self.max_video_frames, 1)
        _at_least("LORAMESH_MAX_VIDEO_SECONDS", self.max_video_seconds, 0.001)


@dataclass(frozen=True)
class TrainerLimits:
    """How the trainer shares sessions between replicas."""

    # Sessions one replica runs at once (each holds its model in memory while it waits).
    max_sessions: int = env("LORAMESH_TRAINER_MAX_SESSIONS", 1)
    # Seconds without a heartbeat before a dead replica's session goes to another.
    ack_wait_s: float = env("LORAMESH_TRAINER_ACK_WAIT_S", 60.0)
    # How long an abort waits for the running replica to save its checkpoint.
    abort_timeout_s: float = env("LORAMESH_TRAINER_ABORT_TIMEOUT_S", 300.0)
    # Folder of the training tasks and finetunes (<id>/dataset, <id>/training); it must lie
    # inside the media roots, where the captioner reads the images it captions (unset: a
    # "tasks" folder in the last media root).
    tasks_dir: Path | None = env("LORAMESH_TASKS_DIR")
    # The base model of a training task that names none, and of every finetune (the finetune
    # API names none): a Hugging Face id or a diffusers folder inside the model roots.
    base_model: str = env("LORAMESH_TRAINING_BASE_MODEL", "black-forest-labs/FLUX.1-dev")
    # host:port of the captioner's gRPC API (empty: the captioner port on this host).
    captioner_address: str = env("LORAMESH_CAPTIONER_ADDRESS", "")
    # Key of the HMAC-SHA256 signature of each webhook body (unset: webhooks go unsigned).
    webhook_secret: str | None = env("LORAMESH_WEBHOOK_SECRET")
    # Deliveries of one webhook before it is given up, and the wait before the second one
    # (doubled after each refusal).
    webhook_attempts: int = env("LORAMESH_WEBHOOK_ATTEMPTS", 5)
    webhook_backoff_s: float = env("LORAMESH_WEBHOOK_BACKOFF_S", 1.0)
    webhook_timeout_s: float = env("LORAMESH_WEBHOOK_TIMEOUT_S", 10.0)
    # Loss points kept per session for GET /sessions/{id}/loss (the oldest are dropped).
    loss_history_points: int = env("LORAMESH_TRAINER_LOSS_HISTORY_POINTS", 10_000)

    def check(self) -> None:
        _at_least("LORAMESH_TRAINER_MAX_SESSIONS", self.max_sessions, 1)
        _at_least("LORAMESH_TRAINER_ACK_WAIT_S", self.ack_wait_s, 1)
        _at_least("LORAMESH_TRAINER_ABORT_TIMEOUT_S", self.abort_timeout_s, 0.001)
        _at_least("LORAMESH_WEBHOOK_ATTEMPTS", self.webhook_attempts, 1)
        _at_least("LORAMESH_WEBHOOK_BACKOFF_S", self.webhook_backoff_s, 0)
        _at_least("LORAMESH_WEBHOOK_TIMEOUT_S", self.webhook_timeout_s, 0.001)
        _at_least("LORAMESH_TRAINER_LOSS_HISTORY_POINTS", self.loss_history_points, 1)


@dataclass(frozen=True)
class InferenceSettings:
    """Where the inference service reads models and writes images, and how it queues."""

    # The generation-server API's models root (checkpoints/, diffusion_models/, vae/, loras/, ...).
    models_dir: Path = env("LORAMESH_INFERENCE_MODELS_DIR", VAR_DIR / "models" / "inference")
    # Job folders (<job id>/image_0.png, config.json); GET /output serves this folder.
    output_dir: Path = env("LORAMESH_OUTPUT_DIR", VAR_DIR / "outputs")
    # Relative LoRA paths of the v1 API resolve against this (ai-toolkit's training folder).
    workflows_base_path: Path = env("LORAMESH_WORKFLOWS_BASE_PATH", VAR_DIR / "media" / "output")
    # The v1 API's status_url and result_url start with this.
    public_base_url: str = env("LORAMESH_PUBLIC_BASE_URL", "http://localhost:8000")
    # Seconds without a heartbeat before a dead worker's job goes to another.
    ack_wait_s: float = env("LORAMESH_INFERENCE_ACK_WAIT_S", 60.0)
    # Seconds a job stays in /queue after its last change (its output files stay).
    history_s: float = env("LORAMESH_INFERENCE_HISTORY_S", 7 * 24 * 3600.0)
    # Most work one job may ask for: width x height x steps x images (video frames count as
    # images). The default takes 2048x2048, 150 steps, 4 images; a bigger job is a 400.
    max_job_work: int = env("LORAMESH_MAX_JOB_WORK", 2048 * 2048 * 150 * 4)
    # Seconds a job may run before it is stopped at its next step and fails (0: no limit).
    job_time_limit_s: float = env("LORAMESH_JOB_TIME_LIMIT_S", 3600.0)
    # Seconds between a replica's server_status events on the WebSocket (0: none).
    status_interval_s: float = env("LORAMESH_STATUS_INTERVAL_S", 10.0)
    # POST /models/download: the largest file it fetches, whether its URLs may point at
    # private or loopback addresses, and CivitAI's API (its token is needed for early-access models).
    download_max_bytes: int = env("LORAMESH_DOWNLOAD_MAX_BYTES", 64 << 30)
    download_allow_private: bool = env("LORAMESH_DOWNLOAD_ALLOW_PRIVATE", False)
    civitai_base_url: str = env("LORAMESH_CIVITAI_BASE_URL", "https://civitai.com")
    civitai_token: str | None = env("LORAMESH_CIVITAI_TOKEN")

    def check(self) -> None:
        if not self.public_base_url.startswith(("http://", "https://")):
            raise SettingsError(f"LORAMESH_PUBLIC_BASE_URL must start with http:// or https:// "
                                f"(got {self.public_base_url!r})")
        object.__setattr__(self, "public_base_url", self.public_base_url.rstrip("/"))
        _at_least("LORAMESH_INFERENCE_ACK_WAIT_S", self.ack_wait_s, 1)
        _at_least("LORAMESH_INFERENCE_HISTORY_S", self.history_s, 1)
        _at_least("LORAMESH_MAX_JOB_WORK", self.max_job_work, 1)
        _at_least("LORAMESH_JOB_TIME_LIMIT_S", self.job_time_limit_s, 0)
        _at_least("LORAMESH_STATUS_INTERVAL_S", self.status_interval_s, 0)
        _at_least("LORAMESH_DOWNLOAD_MAX_BYTES", self.download_max_bytes, 1)
        if not self.civitai_base_url.startswith(("http://", "https://")):
            raise SettingsError(f"LORAMESH_CIVITAI_BASE_URL must start with http:// or https:// "
                                f"(got {self.civitai_base_url!r})")
        object.__setattr__(self, "civitai_base_url", self.civitai_base_url.rstrip("/"))


@dataclass(frozen=True)
class ModelSources:
    """Where each service's models come from: a Hugging Face id or a local folder. None is the
    built-in default named in the README (the real model's Hugging Face id)."""

    tagger: str | None = env("LORAMESH_TAGGER_MODEL")
    florence2: str | None = env("LORAMESH_FLORENCE2_MODEL")
    joycaption: str | None = env("LORAMESH_JOYCAPTION_MODEL")
    audio: str | None = env("LORAMESH_AUDIO_MODEL")
    # Component configs and tokenizers for single-file models, by architecture id.
    sd15_config: str | None = env("LORAMESH_SD15_CONFIG")
    sdxl_config: str | None = env("LORAMESH_SDXL_CONFIG")
    flux_config: str | None = env("LORAMESH_FLUX_CONFIG")
    zimage_config: str | None = env("LORAMESH_ZIMAGE_CONFIG")
    sd3_config: str | None = env("LORAMESH_SD3_CONFIG")
    wan21_config: str | None = env("LORAMESH_WAN21_CONFIG")
    wan22_config: str | None = env("LORAMESH_WAN22_CONFIG")
    qwen_image_config: str | None = env("LORAMESH_QWEN_IMAGE_CONFIG")
    # The weights each /v1 catalog entry runs on, by catalog id.
    model_sd15: str | None = env("LORAMESH_MODEL_SD15")
    model_sdxl: str | None = env("LORAMESH_MODEL_SDXL")
    model_flux: str | None = env("LORAMESH_MODEL_FLUX")
    model_flux_kontext: str | None = env("LORAMESH_MODEL_FLUX_KONTEXT")
    model_zimage_turbo: str | None = env("LORAMESH_MODEL_ZIMAGE_TURBO")
    model_wan21_1b_t2v: str | None = env("LORAMESH_MODEL_WAN21_1B_T2V")
    model_wan21_14b_t2v: str | None = env("LORAMESH_MODEL_WAN21_14B_T2V")
    model_wan22_14b_t2v: str | None = env("LORAMESH_MODEL_WAN22_14B_T2V")

    def single_file_config(self, architecture_id: str) -> str | None:
        return getattr(self, f"{architecture_id}_config", None)

    def catalog_model(self, catalog_id: str) -> str | None:
        return getattr(self, f"model_{catalog_id}", None)


# What PUT /ollama/settings and /assistant/settings accept, and the variables below too.
LLM_TIMEOUT_RANGE = (1, 600)
LLM_MAX_HISTORY_RANGE = (1, 1000)


def _check_llm(prefix: str, base_url: str, timeout_seconds: int, max_history: int) -> None:
    if not base_url.startswith(("http://", "https://")):
        raise SettingsError(f"LORAMESH_{prefix}_URL must start with http:// or https:// (got {base_url!r})")
    for name, value, (low, high) in (("TIMEOUT_S", timeout_seconds, LLM_TIMEOUT_RANGE),
                                     ("MAX_HISTORY", max_history, LLM_MAX_HISTORY_RANGE)):
        if not low <= value <= high:
            raise SettingsError(f"LORAMESH_{prefix}_{name} must be between {low} and {high} (got {value})")


@dataclass(frozen=True)
class OllamaDefaults:
    """The Ollama prompt enhancer's settings until PUT /ollama/settings changes them (in NATS)."""

    enabled: bool = env("LORAMESH_OLLAMA_ENABLED", True)
    base_url: str = env("LORAMESH_OLLAMA_URL", "http://localhost:11434")
    model: str = env("LORAMESH_OLLAMA_MODEL", "llama3.2")
    timeout_seconds: int = env("LORAMESH_OLLAMA_TIMEOUT_S", 60)
    # Most enhancements kept in the history (the oldest go first).
    max_history: int = env("LORAMESH_OLLAMA_MAX_HISTORY", 100)
    # Sent as a bearer token (a proxy in front of Ollama); never returned or logged.
    api_key: str = field(default="", repr=False, metadata={"env": "LORAMESH_OLLAMA_API_KEY"})

    def check(self) -> None:
        _check_llm("OLLAMA", self.base_url, self.timeout_seconds, self.max_history)


@dataclass(frozen=True)
class AssistantDefaults:
    """The UI assistant's settings until PUT /assistant/settings changes them (in NATS)."""

    enabled: bool = env("LORAMESH_ASSISTANT_ENABLED", True)
    base_url: str = env("LORAMESH_ASSISTANT_URL", "http://localhost:11434")
    model: str = env("LORAMESH_ASSISTANT_MODEL", "llama3.2")
    timeout_seconds: int = env("LORAMESH_ASSISTANT_TIMEOUT_S", 120)
    # Most conversation messages kept and sent back to the model.
    max_history: int = env("LORAMESH_ASSISTANT_MAX_HISTORY", 50)
    api_key: str = field(default="", repr=False, metadata={"env": "LORAMESH_ASSISTANT_API_KEY"})

    def check(self) -> None:
        _check_llm("ASSISTANT", self.base_url, self.timeout_seconds, self.max_history)


@dataclass(frozen=True)
class Observability:
    """Where a process publishes its metrics and sends its traces."""

    # Port of the Prometheus /metrics endpoint (0: none); `make run` gives each process its own.
    metrics_port: int = env("LORAMESH_METRICS_PORT", 0)
    # OTLP/gRPC collector of traces (unset: nothing is traced); the standard OpenTelemetry
    # variable, so the exporter's other OTEL_EXPORTER_OTLP_* variables apply as usual.
    otlp_endpoint: str | None = env("OTEL_EXPORTER_OTLP_ENDPOINT")

    def check(self) -> None:
        if not 0 <= self.metrics_port <= 65535:
            raise SettingsError(f"LORAMESH_METRICS_PORT must be a port between 1 and 65535, or 0 for none "
                                f"(got {self.metrics_port})")
        if self.otlp_endpoint and not self.otlp_endpoint.startswith(("http://", "https://")):
            raise SettingsError(f"OTEL_EXPORTER_OTLP_ENDPOINT must be an http:// or https:// URL, e.g. "
                                f"http://otel-collector:4317 (got {self.otlp_endpoint!r})")


@dataclass(frozen=True)
class ServicePorts:
    trainer: int = env("LORAMESH_TRAINER_PORT", SERVICE_PORTS["trainer"])
    captioner: int = env("LORAMESH_CAPTIONER_PORT", SERVICE_PORTS["captioner"])
    tagger: int = env("LORAMESH_TAGGER_PORT", SERVICE_PORTS["tagger"])
    inference: int = env("LORAMESH_INFERENCE_PORT", SERVICE_PORTS["inference"])

    def check(self) -> None:
        for name, port in dataclasses.asdict(self).items():
            if not 1 <= port <= 65535:
                raise SettingsError(f"LORAMESH_{name.upper()}_PORT must be a port between 1 and 65535 (got {port})")


@dataclass(frozen=True)
class GatewaySettings:
    """What the launcher gives Envoy: the keys protected routes accept, the NATS port and the
    replicas it runs of each service."""

    # JWKS that /api/v1/training/* bearer tokens must verify against (None: a development key).
    jwks_file: Path | None = env("LORAMESH_JWKS_FILE")
    # X-Key values accepted on /v1/finetune* (empty: a development key).
    api_keys: tuple[str, ...] = env("LORAMESH_API_KEYS", ())
    # The `iss` bearer tokens must carry, and the `aud` values one of which they must name
    # (unset: not checked; tokens must always carry `exp`).
    jwt_issuer: str | None = env("LORAMESH_JWT_ISSUER")
    jwt_audiences: tuple[str, ...] = env("LORAMESH_JWT_AUDIENCES", ())
    nats_port: int = env("LORAMESH_NATS_PORT", 4222)
    # Processes the launcher runs per service ("inference=2,tagger=2"); services not named run one.
    replicas: dict[str, int] = env("LORAMESH_REPLICAS", factory=dict)

    def check(self) -> None:
        for name, count in self.replicas.items():
            if name not in SERVICE_PORTS:
                raise SettingsError(f"LORAMESH_REPLICAS names an unknown service (got {name}={count}); "
                                    f"allowed: {', '.join(SERVICE_PORTS)}")
            if not 1 <= count <= MAX_REPLICAS:
                raise SettingsError(f"LORAMESH_REPLICAS must give {name} between 1 and {MAX_REPLICAS} "
                                    f"replicas (got {name}={count})")


@dataclass(frozen=True)
class NatsSettings:
    """How a process authenticates to NATS and how many copies JetStream keeps. Unset: no
    credentials, no TLS, one copy (`make run`'s single server)."""

    # A per-service user and its password (deploy/k8s: the loramesh-nats-users Secret).
    user: str | None = env("LORAMESH_NATS_USER")
    password: str | None = field(default=None, repr=False, metadata={"env": "LORAMESH_NATS_PASSWORD"})
    # A .creds file (user JWT and NKey seed) instead of a user and password.
    creds: Path | None = env("LORAMESH_NATS_CREDS")
    # The CA that signed the server's certificate (turns TLS on), and a client certificate
    # and key when the server asks for one (mutual TLS).
    tls_ca: Path | None = env("LORAMESH_NATS_TLS_CA")
    tls_cert: Path | None = env("LORAMESH_NATS_TLS_CERT")
    tls_key: Path | None = env("LORAMESH_NATS_TLS_KEY")
    # Copies of every stream, bucket and object store the services create (3 on a
    # three-node cluster); streams are updated to it, existing buckets keep theirs.
    replicas: int = env("LORAMESH_NATS_REPLICAS", 1)

    def check(self) -> None:
        if not 1 <= self.replicas <= 5:
            raise SettingsError(f"LORAMESH_NATS_REPLICAS must be between 1 and 5 (got {self.replicas})")
        if (self.user is None) != (self.password is None):
            raise SettingsError("LORAMESH_NATS_USER and LORAMESH_NATS_PASSWORD must be set together")
        if self.creds is not None and self.user is not None:
            raise SettingsError("set either LORAMESH_NATS_CREDS or LORAMESH_NATS_USER/LORAMESH_NATS_PASSWORD, not both")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError("LORAMESH_NATS_TLS_CERT and LORAMESH_NATS_TLS_KEY must be set together")
        for name, path in (("LORAMESH_NATS_CREDS", self.creds), ("LORAMESH_NATS_TLS_CA", self.tls_ca),
                           ("LORAMESH_NATS_TLS_CERT", self.tls_cert), ("LORAMESH_NATS_TLS_KEY", self.tls_key)):
            if path is not None and not path.is_file():
                raise SettingsError(f"{name} must name a readable file (got {path})")

    @classmethod
    def load(cls, environ: typing.Mapping[str, str] | None = None) -> NatsSettings:
        return _load(cls, os.environ if environ is None else environ)


@dataclass(frozen=True)
class Settings:
    service: str = ""
    bind_host: str = env("LORAMESH_BIND_HOST", "0.0.0.0")
    nats_url: str = env("LORAMESH_NATS_URL", "nats://127.0.0.1:4222")
    media_roots: tuple[Path, ...] = env("LORAMESH_MEDIA_ROOTS", DEFAULT_MEDIA_ROOTS)
    model_roots: tuple[Path, ...] = env("LORAMESH_MODEL_ROOTS", DEFAULT_MODEL_ROOTS)
    # "auto" picks CUDA when present; otherwise a torch device name ("cpu", "cuda", "cuda:1").
    device: str = env("LORAMESH_DEVICE", "auto")
    # Seconds in-flight calls get to finish after SIGTERM.
    shutdown_grace_s: float = env("LORAMESH_SHUTDOWN_GRACE_S", 30.0)
    # Most bytes of models one service keeps resident before evicting the least recently used.
    max_resident_bytes: int = env("LORAMESH_MAX_RESIDENT_BYTES", 0)
    media: MediaLimits = field(default_factory=MediaLimits)
    trainer: TrainerLimits = field(default_factory=TrainerLimits)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    models: ModelSources = field(default_factory=ModelSources)
    ports: ServicePorts = field(default_factory=ServicePorts)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    ollama: OllamaDefaults = field(default_factory=OllamaDefaults)
    assistant: AssistantDefaults = field(default_factory=AssistantDefaults)
    nats: NatsSettings = field(default_factory=NatsSettings)
    observability: Observability = field(default_factory=Observability)
    replica: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    @property
    def port(self) -> int:
        return getattr(self.ports, self.service)

    def check(self) -> None:
        if not self.nats_url.startswith(("nats://", "tls://", "ws://", "wss://")):
            raise SettingsError(f"LORAMESH_NATS_URL must be a nats:// (or tls://, ws://) URL (got {self.nats_url!r})")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda", "mps", "xpu"):
            raise SettingsError(f'LORAMESH_DEVICE must be "auto", "cpu", "cuda" or "cuda:<index>" (got {self.device!r})')
        _at_least("LORAMESH_SHUTDOWN_GRACE_S", self.shutdown_grace_s, 0)
        _at_least("LORAMESH_MAX_RESIDENT_BYTES", self.max_resident_bytes, 0)
        tasks_dir = self.trainer.tasks_dir
        if tasks_dir is not None and not any(tasks_dir.is_relative_to(root) for root in self.media_roots):
            raise SettingsError(f"LORAMESH_TASKS_DIR must lie inside LORAMESH_MEDIA_ROOTS "
                                f"(got {tasks_dir}, roots {', '.join(map(str, self.media_roots))})")

    @property
    def tasks_dir(self) -> Path:
        return self.trainer.tasks_dir or self.media_roots[-1] / "tasks"

    @property
    def captioner_address(self) -> str:
        return self.trainer.captioner_address or f"127.0.0.1:{self.ports.captioner}"

    @classmethod
    def load(cls, service: str = "", environ: typing.Mapping[str, str] | None = None) -> Settings:
        """Every setting from the environment; SettingsError names the first bad variable."""
        return _load(cls, os.environ if environ is None else environ, service=service)
