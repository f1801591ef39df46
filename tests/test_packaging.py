"""The installable package and the images: the wheel built from a copy of the tree carries the
generated stubs and the `loramesh` command, installs into a fresh venv with only its declared
light dependencies, and the Dockerfiles stay buildable (checked statically: no Docker daemon
is needed)."""

from __future__ import annotations

import ast
import configparser
import fnmatch
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROTOS = sorted(p.stem for p in (ROOT / "protos" / "loramesh" / "v1").glob("*.proto"))
HEAVY = {"torch", "diffusers", "transformers", "onnxruntime", "onnxruntime-gpu", "nats-py", "numpy"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel .` of the files a clone has (tracked, plus new ones git does not ignore)."""
    tmp = tmp_path_factory.mktemp("packaging")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    src = tmp / "src"
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "--wheel-dir", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=180)
    assert build.returncode == 0, build.stderr
    (built,) = (tmp / "dist").glob("loramesh-*.whl")
    return built


def wheel_metadata(wheel: Path) -> tuple[list[str], configparser.ConfigParser, dict]:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA")).rsplit("/", 1)[0]
        entry_points = configparser.ConfigParser()
        entry_points.read_string(zf.read(f"{info}/entry_points.txt").decode())
        metadata = Parser().parsestr(zf.read(f"{info}/METADATA").decode())
    return names, entry_points, metadata


def test_the_wheel_carries_every_stub_and_the_command(wheel):
    names, entry_points, _ = wheel_metadata(wheel)
    for proto in PROTOS:
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert f"loramesh/v1/{proto}{suffix}" in names
    assert "loramesh/__init__.py" not in names  # a namespace package, shared with the checkout
    # The client's typed methods, for editors and type checkers.
    assert {"loramesh/client/py.typed", "loramesh/client/services.pyi", "loramesh/cli.py"} <= set(names)
    assert not [n for n in names if n.startswith(("services/", "tests/", "gen/", "loramesh.pb"))]
    assert entry_points["console_scripts"]["loramesh"] == "loramesh.cli:app"


def test_the_base_install_is_light_and_the_extras_name_the_rest(wheel):
    _, _, metadata = wheel_metadata(wheel)
    requires = [Requirement(r) for r in metadata.get_all("Requires-Dist")]
    base = {canonicalize_name(r.name) for r in requires if r.marker is None}
    assert {"grpcio", "protobuf", "googleapis-common-protos", "httpx", "websockets", "typer", "rich"} <= base
    assert base.isdisjoint(HEAVY)
    assert {"server", "cpu", "cuda", "gateway", "dev"} <= set(metadata.get_all("Provides-Extra"))

    def extra(name: str) -> set[str]:
        return {canonicalize_name(r.name) for r in requires if r.marker and r.marker.evaluate({"extra": name})}

    assert "torch" in extra("server") and "torch" not in extra("gateway")
    assert "onnxruntime" in extra("cpu") and "onnxruntime-gpu" in extra("cuda")


def closure(requirements: list[Requirement]) -> set[str]:
    """Every installed distribution these requirements pull in here (markers evaluated)."""
    seen: set[str] = set()
    todo = [(r, "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        for wanted in req.extras:  # a dependency's own extras bring their requirements too
            todo += [(Requirement(r), wanted) for r in md.requires(name) or []]
        if name in seen:
            continue
        seen.add(name)
        todo += [(Requirement(r), "") for r in md.requires(name) or []]
    return seen


def fresh_venv(tmp: Path, wheel: Path, extras: tuple[str, ...]) -> Path:
    """A venv with the wheel and copies of exactly the distributions its requirements (with
    `extras`) pull in, taken from this environment: nothing else is importable there."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    _, _, metadata = wheel_metadata(wheel)
    wanted = [Requirement(r) for r in metadata.get_all("Requires-Dist")]
    wanted = [r for r in wanted if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in extras)]
    for name in closure([Requirement(str(r).split(";")[0]) for r in wanted]):
        dist = md.distribution(name)
        for file in dist.files:
            if file.parts[0] != ".." and dist.locate_file(file).exists():  # its console scripts stay behind
                (site / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(dist.locate_file(file), site / file)
    install = subprocess.run([sys.executable, "-m", "uv", "pip", "install", "--offline", "--no-deps", "--quiet",
                              "--python", str(venv / "bin" / "python"), str(wheel)],
                             capture_output=True, text=True, timeout=120)
    assert install.returncode == 0, install.stderr
    return venv


def run_in(venv: Path, *args: str, cwd: Path, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(cwd), "PYTHONPATH": pythonpath}
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def third_party_imports(folder: Path) -> set[str]:
    """Every non-stdlib module the code under `folder` imports, lazy imports included."""
    modules = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules.add(node.module)
    return {m for m in modules if m.split(".")[0] not in sys.stdlib_module_names | {"loramesh", "__future__"}}


def test_a_fresh_venv_with_the_light_dependencies_runs_the_client_side(wheel, tmp_path):
    venv = fresh_venv(tmp_path, wheel, extras=())
    modules = [f"loramesh.v1.{p}_pb2_grpc" for p in PROTOS] + sorted(third_party_imports(ROOT / "loramesh"))
    imported = run_in(venv, "python", "-c", f"import {', '.join(modules)}", cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert run_in(venv, "python", "-c", "import torch", cwd=tmp_path).returncode != 0  # really a light venv
    if not (ROOT / "loramesh" / "cli.py").exists():
        pytest.skip("loramesh/cli.py (the command's code) is not in the tree yet")
    helped = run_in(venv, "loramesh", "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "Usage" in helped.stdout


def test_the_gateway_set_runs_the_events_bridge_without_torch(wheel, tmp_path):
    venv = fresh_venv(tmp_path, wheel, extras=("gateway",))
    # The checkout's modules are importable, its dependencies only as the gateway extra declares.
    helped = run_in(venv, "python", "-m", "gateway.events_bridge", "--help", cwd=tmp_path, pythonpath=str(ROOT))
    assert helped.returncode == 0, helped.stderr
    assert "--nats" in helped.stdout


# --- Dockerfiles --------------------------------------------------------------------------

DOCKERFILES = {"Dockerfile": "server", "Dockerfile.gateway": "gateway"}


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined; heredoc bodies skipped."""
    lines, out, heredoc = (ROOT / dockerfile).read_text().splitlines(), [], None
    current = ""
    for line in lines:
        if heredoc:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if line.endswith("\\"):
            continue
        if marker := re.search(r"<<-?(\w+)\s*$", current.strip()):
            heredoc = marker.group(1)
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def build_args(steps: list[tuple[str, str]]) -> dict[str, str]:
    return dict(rest.split("=", 1) for word, rest in steps if word == "ARG" and "=" in rest)


def dockerignored(path: str) -> bool:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip()]
    parts = Path(path).parts
    return any(fnmatch.fnmatch("/".join(parts[:i]), p.removeprefix("**/")) or
               fnmatch.fnmatch(parts[i - 1], p.removeprefix("**/")) for p in patterns for i in range(1, len(parts) + 1))


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_stages_are_pinned_and_copy_what_exists(dockerfile):
    steps = instructions(dockerfile)
    args = build_args(steps)
    bases = [rest.split()[0] for word, rest in steps if word == "FROM"]
    assert len(bases) >= 2, "a build stage and a runtime stage"
    for base in bases:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        assert re.search(r"@sha256:[0-9a-f]{64}$|:\d+\.\d+\.\d+[\w.-]*$", image), f"pin {image} by digest or exact tag"
    for word, rest in steps:
        if word == "COPY" and not rest.startswith("--from"):
            *sources, _ = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{dockerfile}: COPY {source} does not exist"
                assert not dockerignored(source), f"{dockerfile}: COPY {source} is in .dockerignore"


def test_the_service_image_installs_the_variant_lock_and_checks_the_onnx_runtime():
    text = (ROOT / "Dockerfile").read_text()
    steps = instructions("Dockerfile")
    assert "ARG VARIANT=cpu" in text and "requirements/server-$VARIANT.txt" in text
    for variant in ("cpu", "cuda"):
        assert (ROOT / "requirements" / f"server-{variant}.txt").exists()
    # The build fails when the CUDA variant's onnxruntime does not offer CUDA.
    (check,) = [rest for word, rest in steps if word == "RUN" and "get_available_providers()" in rest]
    assert "cuda = os.environ['VARIANT'] == 'cuda'" in check
    assert "assert ('CUDAExecutionProvider' if cuda else 'CPUExecutionProvider') in providers" in check
    env = " ".join(rest for word, rest in steps if word == "ENV")
    for cache in ("HF_MODULES_CACHE=/cache/hf-modules", "TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor",
                  "TRITON_CACHE_DIR=/cache/triton"):
        assert cache in env
    assert "chown -R 10001:10001 /cache" in text


def test_the_gateway_image_installs_the_gateway_lock_and_no_torch():
    text = (ROOT / "Dockerfile.gateway").read_text()
    assert "pip install -r requirements/gateway.txt" in text and "! pip show -q torch" in text
    assert "server-" not in text


def test_ci_runs_the_readme_test_command():
    lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[-1] == "make test"

