"""The server-side paths of a job config, checked against the configured roots: the
dataset and mask folders (media roots), the training folder (media roots; created on
demand) and the model (model roots, or a Hugging Face id)."""

from __future__ import annotations

from pathlib import Path

from services.common import media
from services.common.architectures import by_id
from services.common.errors import Violations
from services.common.hub import is_repo_id
from services.common.settings import Settings
from services.trainer.engine import RunInputs
from services.trainer.job_config import JobConfig

PROCESS = "config.config.process[0]"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def resolve_inputs(job: JobConfig, settings: Settings) -> RunInputs:
    """Every path of the config resolved, or InvalidInput/NotFound naming the key."""
    process = job.process
    violations = Violations()
    folders, masks = [], []
    for i, dataset in enumerate(process.datasets):
        key = f"{PROCESS}.datasets[{i}]"
        folders.append(_folder(dataset.folder_path, settings.media_roots, f"{key}.folder_path", violations))
        masks.append(_folder(dataset.mask_path, settings.media_roots, f"{key}.mask_path", violations)
                     if dataset.mask_path else None)
    model = _model(process.model.name_or_path, settings.model_roots, f"{PROCESS}.model.name_or_path", violations)
    training_folder = _output_folder(process.training_folder, settings.media_roots, f"{PROCESS}.training_folder",
                                     violations)
    violations.raise_if_any()
    # A single file needs its family's component configs and tokenizers; LORAMESH_<ARCH>_CONFIG
    # points at a local diffusers folder where the hub is out of reach.
    config = by_id(process.model.arch).config_source(settings.models)
    return RunInputs(
        model_source=model, single_file_config=config if model.endswith(SINGLE_FILE_SUFFIXES) else None,
        training_folder=training_folder, dataset_folders=folders, mask_folders=masks, device=process.device,
    )


def _folder(raw: str, roots, key: str, violations: Violations) -> Path | None:
    path = media.resolve_into(violations, raw, roots, key, "no such folder")
    if path is not None and not path.is_dir():
        violations.add(key, f"must be a folder (got the file {raw})")
    return path


def _model(raw: str, roots, key: str, violations: Violations) -> str:
    if is_repo_id(raw):
        return raw
    path = media.resolve_into(violations, raw, roots, key, "no such model file or folder")
    if path is None:
        return raw
    if path.is_file() and not path.name.endswith(SINGLE_FILE_SUFFIXES):
        violations.add(key, f"a single-file model must be .safetensors or .ckpt (got {path.name})")
    elif path.is_dir() and not (path / "model_index.json").is_file():
        violations.add(key, f"{raw} is not a diffusers pipeline folder (no model_index.json)")
    return str(path)


def _output_folder(raw: str, roots, key: str, violations: Violations) -> Path:
    """An existing or new folder inside the roots: the nearest existing ancestor is
    resolved (symlinks included) and must lie inside them."""
    path = Path(raw).expanduser()
    if not path.is_absolute() or ".." in path.parts or "\x00" in raw:
        violations.add(key, f"must be an absolute path without '..' inside {', '.join(map(str, roots))} "
                            f"(got {raw!r})")
        return path
    existing = path
    while not existing.exists():
        existing = existing.parent
    real = existing.resolve() / path.relative_to(existing)
    if not any(real == root or real.is_relative_to(root) for root in roots):
        violations.add(key, f"{raw!r} is outside the allowed roots {', '.join(map(str, roots))}")
    elif real.exists() and not real.is_dir():
        violations.add(key, f"must be a folder (got the file {raw})")
    return real
