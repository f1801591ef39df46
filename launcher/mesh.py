"""Starts the whole mesh on one machine: NATS, the four services (each as one or more
replicas behind Envoy), the events bridge and Envoy; waits until every part is healthy;
restarts a part that exits (`Mesh.supervise`); stops everything cleanly on Ctrl-C.
`make run` runs this; the tests start the same Mesh on free ports."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import envoy_config, envoy_runner, openapi
from launcher.supervisor import Supervisor
from services.common.settings import (
    MAX_REPLICAS,
    REPO_ROOT,
    SERVICE_PORTS,
    VAR_DIR,
    GatewaySettings,
    Settings,
    SettingsError,
)

SERVICES = tuple(SERVICE_PORTS)
# Where `make run` serves each process's Prometheus metrics (further replicas take free ports).
METRICS_PORTS = {"trainer": 9451, "captioner": 9452, "tagger": 9453, "inference": 9454, "envoy": 9455}
GEN_DIR = REPO_ROOT / "gen"
BIN_DIR = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Ports:
    nats: int = 4222
    nats_monitor: int = 8222
    services: dict[str, int] = field(default_factory=lambda: dict(SERVICE_PORTS))
    rest: list[int] = field(default_factory=lambda: [8000, 8080])
    websocket: int = 8081
    bridge: int = 8090
    admin: int = 9901
    # Prometheus /metrics of each service's first replica and of Envoy ("envoy").
    metrics: dict[str, int] = field(default_factory=lambda: dict(METRICS_PORTS))

    @classmethod
    def from_settings(cls, settings: Settings) -> Ports:
        return cls(nats=settings.gateway.nats_port,
                   services={name: getattr(settings.ports, name) for name in SERVICES})

    @classmethod
    def free(cls) -> Ports:
        return cls(
            nats=free_port(), nats_monitor=free_port(), services={n: free_port() for n in SERVICES},
            rest=[free_port(), free_port()], websocket=free_port(), bridge=free_port(), admin=free_port(),
            metrics={n: free_port() for n in METRICS_PORTS},
        )


@dataclass(frozen=True)
class Replica:
    """One process of a service: the first is named after the service and listens on its
    configured port, the others are "<service>-2", "<service>-3", ... on free ports."""

    name: str
    service: str
    port: int
    metrics_port: int = 0


def plan_replicas(ports: Ports, services: tuple[str, ...], counts: Mapping[str, int]) -> dict[str, Replica]:
    """Every service process the mesh runs, by process name."""
    unknown = sorted(set(counts) - set(services))
    if unknown:
        raise ValueError(f"replicas asked for {', '.join(unknown)}, which this mesh does not start "
                         f"(it starts {', '.join(services)})")
    taken = {ports.nats, ports.nats_monitor, *ports.services.values(), *ports.rest, ports.websocket, ports.bridge,
             ports.admin, *ports.metrics.values()}
    replicas = {}
    for service in services:
        count = counts.get(service, 1)
        if not 1 <= count <= MAX_REPLICAS:
            raise ValueError(f"{service} may run 1 to {MAX_REPLICAS} replicas (asked for {count})")
        for index in range(1, count + 1):
            port = ports.services[service] if index == 1 else _free_port_except(taken)
            taken.add(port)
            metrics_port = ports.metrics[service] if index == 1 else _free_port_except(taken)
            taken.add(metrics_port)
            name = service if index == 1 else f"{service}-{index}"
            replicas[name] = Replica(name, service, port, metrics_port)
    return replicas


def _free_port_except(taken: set[int]) -> int:
    while (port := free_port()) in taken:
        pass
    return port


@dataclass
class Auth:
    """What the gateway checks: a JWKS for JWT bearer tokens and the accepted X-Key values."""

    jwks: str | None
    api_keys: list[str]
    dev_token: str | None = None  # printed for local use when the mesh made its own key
    issuer: str | None = None  # the `iss` tokens must carry (None: any)
    audiences: tuple[str, ...] = ()  # one of these must be in a token's `aud` (empty: any)


class Mesh:
    def __init__(self, ports: Ports, var_dir: Path = VAR_DIR, env: dict[str, str] | None = None,
                 auth: Auth | None = None, services: tuple[str, ...] = SERVICES,
                 replicas: Mapping[str, int] | None = None):
        self.ports = ports
        self.services = services  # Envoy still routes to all four; the others answer 503 when left out
        # Service processes by name ("inference", "inference-2", ...); `replicas` gives the
        # count per service (1 when not named), as LORAMESH_REPLICAS does for `make run`.
        self.replicas = plan_replicas(ports, services, replicas or {})
        self.var_dir = var_dir
        self.env = {**os.environ, **(env or {})}
        self.env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(GEN_DIR)])
        self.env["PATH"] = os.pathsep.join([str(BIN_DIR), self.env.get("PATH", "")])
        self.env["LORAMESH_NATS_URL"] = self.nats_url
        for name, port in ports.services.items():
            self.env[f"LORAMESH_{name.upper()}_PORT"] = str(port)
        self.auth = auth or Auth(jwks=None, api_keys=[])
        self.procs: dict[str, subprocess.Popen] = {}
        self.commands: dict[str, list[str]] = {}
        self.proc_env: dict[str, dict[str, str]] = {}
        # Processes stopped on purpose (stop_service), which the supervisor leaves alone.
        self.held: set[str] = set()
        self.supervisor: Supervisor | None = None
        self.log_dir = var_dir / "logs"
        self.envoy_config_path = var_dir / "envoy.yaml"

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.ports.nats}"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.rest[0]}"

    def start(self, timeout: float = 60.0) -> Mesh:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_nats(timeout)
            for replica in self.replicas.values():
                self._spawn(replica.name, [sys.executable, "-m", f"services.{replica.service}"],
                            {f"LORAMESH_{replica.service.upper()}_PORT": str(replica.port),
                             "LORAMESH_METRICS_PORT": str(replica.metrics_port)})
            self._spawn("events-bridge", [sys.executable, "-m", "gateway.events_bridge", "--nats", self.nats_url,
                                          "--host", "127.0.0.1", "--port", str(self.ports.bridge)])
            self._start_envoy()
            deadline = time.monotonic() + timeout
            for name in self.replicas:
                self._wait_serving(name, deadline)
            envoy_runner.wait_ready(self.ports.admin, max(1.0, deadline - time.monotonic()))
            self._wait_in_rotation(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_nats(self, timeout: float) -> None:
        self._spawn("nats", ["nats-server", "-a", "127.0.0.1", "-p", str(self.ports.nats),
                             "-m", str(self.ports.nats_monitor), "-js", "-sd", str(self.var_dir / "nats")])
        wait_port(self.ports.nats, timeout, "nats")

    def restart_nats(self, timeout: float = 30.0) -> None:
        """Stops NATS cleanly and starts it again on the same port and store folder."""
        self.held.add("nats")
        try:
            proc = self.procs["nats"]
            proc.terminate()
            proc.wait(timeout=timeout)
            self._start_nats(timeout)
        finally:
            self.held.discard("nats")

    def _start_envoy(self) -> None:
        descriptor = GEN_DIR / "loramesh.pb"
        openapi_path = self.var_dir / "openapi.json"
        openapi_path.write_text(json.dumps(openapi.build(descriptor), indent=2))
        auth_dir = self.var_dir / "gateway-auth"
        auth_dir.mkdir(parents=True, exist_ok=True)
        jwks_path = None
        if self.auth.jwks:
            jwks_path = auth_dir / "jwks.json"
            jwks_path.write_text(self.auth.jwks)
        api_keys_path = auth_dir / "api-keys"
        api_keys_path.write_text("".join(f"{key}\n" for key in self.auth.api_keys))
        config = envoy_config.GatewayConfig(
            descriptor_path=descriptor,
            upstreams=self.upstreams(),
            rest_ports=self.ports.rest,
            websocket_port=self.ports.websocket,
            events_bridge=("127.0.0.1", self.ports.bridge),
            admin_port=self.ports.admin,
            openapi_path=openapi_path,
            jwks_path=jwks_path,
            jwt_issuer=self.auth.issuer,
            jwt_audiences=self.auth.audiences,
            api_keys_path=api_keys_path,
            access_log_path=str(self.log_dir / "envoy-access.log"),
            metrics_port=self.ports.metrics["envoy"],
            otlp_collector=envoy_config.otlp_collector(self.env.get("OTEL_EXPORTER_OTLP_ENDPOINT")),
        )
        envoy_config.write(config, self.envoy_config_path)
        self._spawn_envoy()

    def upstreams(self) -> dict[str, list[tuple[str, int]]]:
        """Envoy's endpoints per service: every replica started, or the configured port of a
        service left out (which then answers 503)."""
        endpoints = {name: [("127.0.0.1", port)] for name, port in self.ports.services.items()}
        for service in self.services:
            endpoints[service] = [("127.0.0.1", r.port) for r in self.replicas.values() if r.service == service]
        return endpoints

    def _spawn_envoy(self) -> None:
        self.procs["envoy"] = envoy_runner.start(self.envoy_config_path, self.log_dir / "envoy.log")

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.commands[name] = argv
        self.proc_env[name] = {**self.env, **(env or {})}
        log = open(self.log_dir / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.proc_env[name],
                                            cwd=REPO_ROOT, start_new_session=True)
        log.close()

    def _wait_serving(self, name: str, deadline: float) -> None:
        while True:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.log_dir / name}.log")
            if self.healthy(name):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not report SERVING; see {self.log_dir / name}.log")
            time.sleep(0.2)

    def healthy(self, name: str) -> bool:
        """One check of a process's health: gRPC SERVING for a service, Envoy's /ready,
        a listening port for NATS and the events bridge."""
        if name == "nats":
            return port_open(self.ports.nats)
        if name == "events-bridge":
            return port_open(self.ports.bridge)
        if name == "envoy":
            try:
                envoy_runner.wait_ready(self.ports.admin, timeout=0)
                return True
            except TimeoutError:
                return False
        with grpc.insecure_channel(f"127.0.0.1:{self.replicas[name].port}") as channel:
            try:
                return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status \
                    == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False

    def gateway_view(self) -> dict[int, bool]:
        """Whether Envoy currently sends traffic to each service endpoint, by port: passing
        its active health check and not ejected."""
        url = f"http://127.0.0.1:{self.ports.admin}/clusters?format=json"
        with urllib.request.urlopen(url, timeout=2) as response:
            clusters = json.load(response)["cluster_statuses"]
        view = {}
        for cluster in clusters:
            if cluster["name"] not in SERVICE_PORTS:
                continue
            for host in cluster.get("host_statuses", []):
                # Each true flag (failed_active_health_check, failed_outlier_check,
                # pending_active_hc, ...) takes the host out of rotation.
                status = host["health_status"]
                view[host["address"]["socket_address"]["port_value"]] = (
                    status.get("eds_health_status") == "HEALTHY" and not any(v is True for v in status.values()))
        return view

    def _wait_in_rotation(self, deadline: float) -> None:
        """Until Envoy's health checks have passed on every replica, so that the first
        calls already spread over all of them."""
        while True:
            view = self.gateway_view()
            if all(view.get(r.port) for r in self.replicas.values()):
                return
            if time.monotonic() > deadline:
                missing = [r.name for r in self.replicas.values() if not view.get(r.port)]
                raise TimeoutError(f"Envoy does not route to {', '.join(missing)}; see {self.log_dir}/envoy.log")
            time.sleep(0.2)

    def respawn(self, name: str) -> None:
        """Starts an exited process again with its command, env and log file."""
        if name == "envoy":
            self._spawn_envoy()
        else:
            self._spawn(name, self.commands[name], self.proc_env[name])

    def supervise(self, report: Callable[[str], None] = print) -> Supervisor:
        """Restarts any process that exits from now until stop(). Opt-in: the tests' shared
        mesh stops services on purpose and must not see them come back."""
        self.supervisor = Supervisor(self, report).start()
        return self.supervisor

    def stop_service(self, name: str, crash: bool = False, grace: float = 30.0) -> None:
        """SIGTERM and wait, or with `crash` SIGKILL, as a dying machine would: no
        shutdown hooks run. A supervised mesh leaves the service stopped until start_service."""
        self.held.add(name)
        proc = self.procs[name]
        proc.kill() if crash else proc.terminate()
        proc.wait(timeout=grace)

    def start_service(self, name: str, timeout: float = 60.0) -> None:
        self._spawn(name, self.commands[name], self.proc_env[name])
        self.held.discard(name)
        self._wait_serving(name, time.monotonic() + timeout)

    def stop(self, grace: float = 15.0) -> None:
        # No restarts from here on, so nothing starts behind the stop.
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        # The gateway and services first, while NATS still answers their goodbyes; NATS last.
        names = list(self.procs)
        for group in ([n for n in names if n != "nats"], [n for n in names if n == "nats"]):
            for name in group:
                if self.procs[name].poll() is None:
                    self.procs[name].send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for name in group:
                proc = self.procs[name]
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()

    def __enter__(self) -> Mesh:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_port(port: int, timeout: float, name: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{name} is not listening on port {port}")


def local_auth(var_dir: Path, gateway: GatewaySettings) -> Auth:
    """Auth from LORAMESH_JWKS_FILE / LORAMESH_API_KEYS, or a development key pair and API
    key kept under var/ so a local user can call the protected routes."""
    keys = list(gateway.api_keys)
    jwks_file = gateway.jwks_file
    dev_dir = var_dir / "dev-auth"
    dev_dir.mkdir(parents=True, exist_ok=True)
    if not keys:
        key_file = dev_dir / "api-key"
        if not key_file.exists():
            key_file.write_text(secrets.token_urlsafe(24))
        keys = [key_file.read_text().strip()]
    if jwks_file:
        return Auth(jwks=Path(jwks_file).read_text(), api_keys=keys, issuer=gateway.jwt_issuer,
                    audiences=gateway.jwt_audiences)
    jwks, token = dev_jwt(dev_dir)
    return Auth(jwks=jwks, api_keys=keys, dev_token=token, issuer=DEV_ISSUER)


DEV_ISSUER = "loramesh-dev"


def dev_jwt(dev_dir: Path) -> tuple[str, str]:
    """A development RSA key (made once), its JWKS, and a token signed with it valid for 30 days."""
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem_file = dev_dir / "jwt-private.pem"
    if not pem_file.exists():
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        pem_file.chmod(0o600)
    private_key = serialization.load_pem_private_key(pem_file.read_bytes(), password=None)
    public_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key()))
    public_jwk.update(kid="dev", alg="RS256", use="sig")
    now = int(time.time())
    token = jwt.encode({"iss": DEV_ISSUER, "sub": "dev", "iat": now, "exp": now + 30 * 86400},
                       private_key, algorithm="RS256", headers={"kid": "dev"})
    return json.dumps({"keys": [public_jwk]}), token


def main() -> None:
    try:
        settings = Settings.load()  # a bad LORAMESH_* variable stops here, before anything starts
    except SettingsError as exc:
        sys.exit(str(exc))
    ports = Ports.from_settings(settings)
    env = {}
    demo_dir = VAR_DIR / "models"
    from tinymodels import captioners as tiny_captioners
    from tinymodels import diffusion as tiny_diffusion
    from tinymodels import model_files as tiny_model_files
    from tinymodels import wd14 as tiny_wd14

    wd14_dir = demo_dir / "wd14-tiny"
    if not (wd14_dir / "model.onnx").exists():
        tiny_wd14.build_wd14(wd14_dir)
    demo_image = VAR_DIR / "media" / "cat.png"
    if not demo_image.exists():
        tiny_wd14.write_demo_image(demo_image)
    # A tiny SDXL single-file checkpoint and a captioned dataset to try a training session on.
    sdxl_file = demo_dir / "sdxl-tiny.safetensors"
    if not sdxl_file.exists():
        tiny_diffusion.build_sdxl_single_file(sdxl_file, config_dir=demo_dir / "sdxl-tiny-config")
    dataset = VAR_DIR / "media" / "pop_tart"
    if not dataset.exists():
        tiny_diffusion.build_dataset(dataset)
    captioners = {"LORAMESH_FLORENCE2_MODEL": ("florence2-tiny", tiny_captioners.build_florence2),
                  "LORAMESH_JOYCAPTION_MODEL": ("joycaption-tiny", tiny_captioners.build_llava),
                  "LORAMESH_AUDIO_MODEL": ("audio-lm-tiny", tiny_captioners.build_audio_lm)}
    for folder, build in captioners.values():
        if not (demo_dir / folder / "config.json").exists():
            build(demo_dir / folder)
    # A generation-server models root with one tiny model of each kind, and tiny folders
    # for the /v1 catalog entries.
    inference_root = demo_dir / "inference"
    configs = inference_root / "configs"
    # The diffusers folders each family's single files take their configs from.
    families = {"SD15": "sd15", "FLUX": "flux", "SD3": "sd3", "WAN21": "wan21", "WAN22": "wan22",
                "QWEN_IMAGE": "qwen_image", "ZIMAGE": "zimage"}
    if not all((configs / folder / "model_index.json").exists() for folder in families.values()):
        tiny_model_files.build_models_root(inference_root)
    if not (demo_dir / "zimage-tiny" / "model_index.json").exists():
        tiny_diffusion.build_zimage(demo_dir / "zimage-tiny")
    if not _hub_reachable():
        defaults = {"LORAMESH_TAGGER_MODEL": str(wd14_dir), "LORAMESH_SDXL_CONFIG": str(demo_dir / "sdxl-tiny-config"),
                    **{f"LORAMESH_{family}_CONFIG": str(configs / folder) for family, folder in families.items()},
                    "LORAMESH_MODEL_WAN21_1B_T2V": str(configs / "wan21"),
                    "LORAMESH_MODEL_WAN21_14B_T2V": str(configs / "wan21"),
                    "LORAMESH_MODEL_WAN22_14B_T2V": str(configs / "wan22"),
                    "LORAMESH_MODEL_SDXL": str(demo_dir / "sdxl-tiny-config"),
                    "LORAMESH_TRAINING_BASE_MODEL": str(demo_dir / "sdxl-tiny-config"),
                    "LORAMESH_MODEL_SD15": str(configs / "sd15"), "LORAMESH_MODEL_FLUX": str(configs / "flux"),
                    "LORAMESH_MODEL_FLUX_KONTEXT": str(configs / "flux"),
                    "LORAMESH_MODEL_ZIMAGE_TURBO": str(demo_dir / "zimage-tiny"),
                    **{name: str(demo_dir / folder) for name, (folder, _) in captioners.items()}}
        env.update({name: value for name, value in defaults.items() if name not in os.environ})
    session_config = write_demo_session(VAR_DIR / "demo-session.json", VAR_DIR / "media", sdxl_file)
    auth = local_auth(VAR_DIR, settings.gateway)
    mesh = Mesh(ports, VAR_DIR, env=env, auth=auth, replicas=settings.gateway.replicas)
    print("starting NATS, trainer, captioner, tagger, inference, events bridge and Envoy ...", flush=True)
    mesh.start(timeout=120)
    rest = ", ".join(f"http://localhost:{p}" for p in ports.rest)
    print(f"""
loramesh is up (logs in {mesh.log_dir})
  REST + gRPC   {rest}
  OpenAPI       http://localhost:{ports.rest[0]}/openapi.json (reference: /docs)
  dashboard     http://localhost:{ports.rest[0]}/dashboard
  WebSocket     ws://localhost:{ports.websocket}
  NATS          {mesh.nats_url}
  gRPC services {_replica_list(mesh)}
  metrics       {_metrics_list(mesh)}
  tagger model  {mesh.env.get('LORAMESH_TAGGER_MODEL', 'SmilingWolf/wd-v1-4-vit-tagger')}
  training demo model {sdxl_file}, dataset {dataset} (see README)
  inference     models root {mesh.env.get('LORAMESH_INFERENCE_MODELS_DIR', inference_root)}, outputs at /output
  media roots   {mesh.env.get('LORAMESH_MEDIA_ROOTS', 'default (see README)')}
  X-Key         {auth.api_keys[0]}
  JWT (dev)     {auth.dev_token or 'from LORAMESH_JWKS_FILE'}
A part that exits is restarted; Ctrl-C stops everything.

First commands (paste into another shell; the paths are this clone's):
{first_commands(ports.rest, VAR_DIR / "media", demo_dir, BIN_DIR / "loramesh", session_config)}""", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    mesh.supervise(report=lambda line: print(line, flush=True))
    try:
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    print("stopping ...", flush=True)
    mesh.stop()


def first_commands(rest_ports: list[int], media: Path, models: Path, cli: Path, session_config: Path) -> str:
    """One command per service to paste into a shell, with this clone's own paths: what
    `make run` prints once the mesh is up."""
    api, server = f"http://localhost:{rest_ports[0]}", f"http://localhost:{rest_ports[-1]}"
    image = str(media / "cat.png")

    def post(url: str, body: dict) -> str:
        return f"curl -s -X POST {url} -H 'Content-Type: application/json' -d {shlex.quote(json.dumps(body))}"

    lines = {
        "tagger": post(f"{api}/tag", {"input": [image]}),
        "captioner": post(f"{api}/caption", {"image_path": image}),
        "trainer": f"{shlex.quote(str(cli))} --url {api} train {shlex.quote(str(session_config))} --steps 100",
        "inference": post(f"{api}/v1/inference", {"model": "sdxl", "prompts": [
            {"prompt": "a pop tart", "width": 64, "height": 64, "sample_steps": 8, "seed": 42}]}),
        "generation": post(f"{server}/models/load", {"model_name": "tiny-sdxl.safetensors",
                                                     "model_type": "checkpoint"})
        + " && echo && " + post(f"{server}/txt2img", {"prompt": "a lovely cat", "width": 64, "height": 64, "steps": 8}),
        "CLI": f"{shlex.quote(str(cli))} --url {api} tag {shlex.quote(str(media))} --write-txt",
    }
    return "\n".join(f"  {name:<11}{command}" for name, command in lines.items())


def write_demo_session(path: Path, media: Path, model: Path) -> Path:
    """The README's demo training config (ai-toolkit's format) with this clone's paths."""
    process = {"type": "diffusion_trainer", "training_folder": str(media / "output"), "trigger_word": "TOK",
               "network": {"type": "lora", "linear": 8, "linear_alpha": 8}, "save": {"save_every": 100},
               "train": {"batch_size": 2, "lr": 0.0001},
               "datasets": [{"folder_path": str(media / "pop_tart"), "resolution": [64]}],
               "model": {"name_or_path": str(model), "arch": "sdxl"}}
    path.write_text(json.dumps({"job": "extension", "config": {"name": "demo", "process": [process]}}, indent=2) + "\n")
    return path


def _replica_list(mesh: Mesh) -> str:
    """Every service process Envoy routes to, e.g. `trainer :50051, inference :50054 + inference-2 :40123`."""
    by_service: dict[str, list[str]] = {}
    for replica in mesh.replicas.values():
        by_service.setdefault(replica.service, []).append(f"{replica.name} :{replica.port}")
    return ", ".join(" + ".join(names) for names in by_service.values())


def _metrics_list(mesh: Mesh) -> str:
    """Every process's /metrics, e.g. `envoy :9455, trainer :9451, ...`."""
    ports = [("envoy", mesh.ports.metrics["envoy"]), *((r.name, r.metrics_port) for r in mesh.replicas.values())]
    return ", ".join(f"{name} :{port}" for name, port in ports) + " (GET /metrics)"


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=2).close()
        return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
