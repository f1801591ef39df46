"""Checkpoint files of a training run, laid out as ai-toolkit lays them out so its users
can resume and load them the way they already do:

    {training_folder}/{name}/{name}_{step:09d}.safetensors   the LoRA (a full run: the denoiser's
                                                              weights), step in its metadata
    {training_folder}/{name}/optimizer.pt                     optimizer, scheduler, EMA and RNG
                                                              state of the newest checkpoint
    {training_folder}/{name}/samples/                         sample images
    {training_folder}/{name}/{name}.safetensors              the final LoRA (a full run: extracted)
    {training_folder}/{name}/{name}_full.safetensors         a full run's final denoiser weights

Every file is written to a temporary name and renamed into place, so a crash never leaves
a half-written file under a checkpoint's name."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TRAINING_STATE_FILE = "optimizer.pt"
SAMPLES_DIR = "samples"
STEP_METADATA_KEY = "step"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path


def run_dir(training_folder: Path, name: str) -> Path:
    return Path(training_folder) / name


def checkpoint_path(training_folder: Path, name: str, step: int) -> Path:
    return run_dir(training_folder, name) / f"{name}_{step:09d}.safetensors"


def final_path(training_folder: Path, name: str, suffix: str = "") -> Path:
    """Where the finished run's weights go: ai-toolkit's final `{name}.safetensors`."""
    return run_dir(training_folder, name) / f"{name}{suffix}.safetensors"


def list_checkpoints(training_folder: Path, name: str) -> list[Checkpoint]:
    """The run's checkpoints, oldest first."""
    pattern = re.compile(rf"^{re.escape(name)}_(\d{{9}})\.safetensors$")
    folder = run_dir(training_folder, name)
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            match = pattern.match(path.name)
            if match and path.is_file():
                found.append(Checkpoint(int(match.group(1)), path))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(training_folder: Path, name: str) -> Checkpoint | None:
    found = list_checkpoints(training_folder, name)
    return found[-1] if found else None


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Runs `write(tmp)` on a temporary file beside `path`, flushes it to disk and renames
    it to `path`; on any failure the temporary file is removed and `path` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_weights(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    contiguous = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
    return write_atomically(path, lambda tmp: save_file(contiguous, str(tmp), metadata={"format": "pt", **metadata}))


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint was saved at: its metadata, else its file name."""
    raw = read_metadata(path).get(STEP_METADATA_KEY)
    if raw is not None and raw.isdigit():
        return int(raw)
    return int(path.stem.rsplit("_", 1)[-1])


def save_training_state(training_folder: Path, name: str, state: dict) -> Path:
    path = run_dir(training_folder, name) / TRAINING_STATE_FILE
    return write_atomically(path, lambda tmp: torch.save(state, tmp))


def load_training_state(training_folder: Path, name: str) -> dict | None:
    path = run_dir(training_folder, name) / TRAINING_STATE_FILE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def prune_checkpoints(training_folder: Path, name: str, keep: int) -> list[Path]:
    """Deletes all but the newest `keep` checkpoints; returns what it deleted."""
    found = list_checkpoints(training_folder, name)
    doomed = [c.path for c in found[: max(0, len(found) - keep)]]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed
