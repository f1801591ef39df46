"""The lock files (requirements/*.txt, `make lock`): what each image's set resolves to, that the
sets agree with each other, and that they still match pyproject.toml (when PyPI answers)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ROOT / "requirements"
SETS = ("server-cpu", "server-cuda", "client", "gateway", "dev")
# Libraries whose majors break APIs often: pyproject caps them (a `<` bound or an exact pin).
FAST_MOVING = {"torch", "diffusers", "transformers", "peft", "accelerate", "huggingface-hub", "protobuf", "grpcio",
               "numpy", "pillow", "opencv-python-headless", "onnxruntime", "onnxruntime-gpu", "av", "safetensors"}


def pins(name: str) -> dict[str, str]:
    found = {}
    for line in (LOCKS / f"{name}.txt").read_text().splitlines():
        if line and not line.startswith((" ", "#", "-")):
            package, _, version = line.partition("==")
            found[canonicalize_name(package)] = version
    return found


def test_every_set_is_locked_to_exact_versions():
    for name in SETS:
        lines = [line for line in (LOCKS / f"{name}.txt").read_text().splitlines()
                 if line and not line.startswith((" ", "#"))]
        assert lines and all(re.fullmatch(r"[A-Za-z0-9._-]+==[\w.+!-]+", line) for line in lines), name


def test_the_cuda_set_has_onnxruntime_gpu_and_cuda_torch():
    cuda = pins("server-cuda")
    assert "onnxruntime-gpu" in cuda and "onnxruntime" not in cuda
    assert "+" not in cuda["torch"] and "nvidia-cudnn-cu13" in cuda  # PyPI's torch, with its CUDA runtime


def test_the_cpu_set_has_onnxruntime_and_cpu_torch():
    cpu = pins("server-cpu")
    assert "onnxruntime" in cpu and "onnxruntime-gpu" not in cpu
    assert cpu["torch"].endswith("+cpu")
    assert not [p for p in cpu if p.startswith(("nvidia-", "triton", "cuda-"))]


def test_client_and_gateway_sets_carry_no_model_libraries():
    model_libraries = {"torch", "diffusers", "transformers", "onnxruntime", "onnxruntime-gpu", "numpy", "opencv-python-headless"}
    for name in ("client", "gateway"):
        assert model_libraries.isdisjoint(pins(name)), name
    assert {"grpcio", "protobuf", "typer", "httpx"} <= set(pins("client"))
    assert {"nats-py", "websockets", "structlog"} <= set(pins("gateway"))


def test_the_sets_agree_on_shared_versions():
    cpu = pins("server-cpu")
    for name in ("server-cuda", "client", "gateway", "dev"):
        other = pins(name)
        differ = {p: (cpu[p], other[p]) for p in set(cpu) & set(other) if p != "torch" and cpu[p] != other[p]}
        assert differ == {}, name
    assert pins("dev").items() >= cpu.items()  # the development venv is the CPU server set and the tools


def test_the_venv_file_is_only_the_dev_lock():
    lines = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert lines == ["-r requirements/dev.txt"], "declare dependencies in pyproject.toml, then `make lock`"


def test_fast_moving_libraries_are_capped():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    uncapped = []
    for requirement in map(Requirement, declared):
        if canonicalize_name(requirement.name) in FAST_MOVING:
            if not any(spec.operator in ("<", "==", "~=") for spec in requirement.specifier):
                uncapped.append(str(requirement))
    assert uncapped == []


def reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port or 443), timeout=5).close()
        return True
    except OSError:
        return False


def test_the_locks_match_pyproject():
    sys.path.insert(0, str(LOCKS))
    try:
        import lock
    finally:
        sys.path.remove(str(LOCKS))
    if not reachable("https://pypi.org"):
        pytest.skip("PyPI does not answer from here: the locks cannot be re-resolved offline")
    local = os.environ.get("UV_FIND_LINKS") or os.environ.get("PIP_FIND_LINKS")
    if not local and not reachable(lock.TORCH_CPU_PAGE):
        pytest.skip("neither a local wheel folder nor the PyTorch CPU index has torch's CPU build")
    check = subprocess.run([sys.executable, str(LOCKS / "lock.py"), "--check"], capture_output=True, text=True,
                           cwd=ROOT, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
