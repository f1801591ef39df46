"""Starts a mesh on free ports with the tiny models for a benchmark run."""

from __future__ import annotations

import tempfile
from pathlib import Path

from launcher.mesh import Auth, Mesh, Ports
from tinymodels import wd14 as tiny_wd14


def start_mesh(root: Path, env: dict[str, str] | None = None) -> Mesh:
    media, models = root / "media", root / "models"
    media.mkdir(parents=True, exist_ok=True)
    tiny_wd14.build_wd14(models / "wd14")
    env = {
        "LORAMESH_MEDIA_ROOTS": str(media),
        "LORAMESH_MODEL_ROOTS": str(models),
        "LORAMESH_TAGGER_MODEL": str(models / "wd14"),
        "HF_HUB_OFFLINE": "1",
        **(env or {}),
    }
    return Mesh(Ports.free(), var_dir=root / "var", env=env, auth=Auth(jwks=None, api_keys=[])).start()


def workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="loramesh-bench-")


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]
