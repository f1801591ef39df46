"""The models root: one folder per model type (checkpoints/, diffusion_models/, vae/, loras/,
...), listed with the GET /models filters, resolved to files without leaving the root, and
hashed."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import InvalidInput, NotFound
from services.common.media import check_path_text, path_error

# Model type -> its folder under the models root.
MODEL_TYPES: dict[str, str] = {
    "checkpoint": "checkpoints",
    "diffusion": "diffusion_models",
    "vae": "vae",
    "lora": "loras",
    "clip": "clip",
    "t5": "t5",
    "embedding": "embeddings",
    "controlnet": "controlnet",
    "llm": "llm",
    "esrgan": "esrgan",
    "taesd": "taesd",
}

# Model type -> the list it appears in, in the order GET /models answers.
LIST_KEYS: dict[str, str] = {
    "checkpoint": "checkpoints",
    "diffusion": "diffusion_models",
    "vae": "vae",
    "lora": "loras",
    "clip": "clip",
    "t5": "t5",
    "controlnet": "controlnets",
    "llm": "llm",
    "esrgan": "esrgan",
    "taesd": "taesd",
    "embedding": "embeddings",
}

MODEL_EXTENSIONS = (".safetensors", ".gguf", ".ckpt", ".pt", ".pth", ".bin", ".sft")
HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelFile:
    name: str  # relative to its type folder, "/"-separated
    type: str
    file_extension: str  # with the dot
    size_bytes: int
    mtime: float


def _allowed_types() -> str:
    return ", ".join(f'"{t}"' for t in MODEL_TYPES)


class ModelsRoot:
    def __init__(self, root: Path):
        self.root = Path(root)

    def folder(self, type: str, field: str = "type") -> Path:
        if type not in MODEL_TYPES:
            raise InvalidInput(field, f"unknown model type {type!r}; allowed: {_allowed_types()}")
        return self.root / MODEL_TYPES[type]

    def list(self, type: str | None = None, extension: str | None = None,
             search: str | None = None) -> dict[str, list[ModelFile]]:
        """Every list of LIST_KEYS, each sorted by name; filtered by type, extension (leading
        dot optional, any case) and a case-insensitive substring of the name."""
        if type:
            self.folder(type)
        suffix = None
        if extension:
            suffix = extension.lower() if extension.startswith(".") else "." + extension.lower()
        needle = search.lower() if search else None
        out: dict[str, list[ModelFile]] = {key: [] for key in LIST_KEYS.values()}
        for model_type, key in LIST_KEYS.items():
            if type and model_type != type:
                continue
            files = [f for f in self._walk(model_type)
                     if (suffix is None or f.file_extension == suffix) and (needle is None or needle in f.name.lower())]
            out[key] = sorted(files, key=lambda f: f.name)
        return out

    def _walk(self, type: str) -> list[ModelFile]:
        folder = self.folder(type)
        if not folder.is_dir():
            return []
        base = folder.resolve()
        found: list[ModelFile] = []
        # Linked folders are not followed (they would list files twice, or loop); linked files
        # are listed when they stay inside the folder. Hidden entries (.thumbs, .cache) are skipped.
        for dirpath, dirnames, filenames in os.walk(folder):
            current = Path(dirpath)
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for filename in filenames:
                if filename.startswith("."):
                    continue
                path = current / filename
                ext = _extension(filename)
                if ext not in MODEL_EXTENSIONS or not _inside(path, base):
                    continue
                try:
                    stat = path.stat()
                except OSError:  # a dangling link
                    continue
                if not path.is_file():
                    continue
                found.append(ModelFile(name=path.relative_to(folder).as_posix(), type=type, file_extension=ext,
                                       size_bytes=stat.st_size, mtime=stat.st_mtime))
        return found

    def path(self, type: str, name: str, field: str = "model_name") -> Path:
        """The file `name` of `type`; InvalidInput naming `field` for names that would leave the
        type's folder, NotFound when there is no such file."""
        folder = self.folder(type, field="model_type" if field == "model_name" else field)
        if not name:
            raise InvalidInput(field, "is required: a model name as GET /models lists it")
        check_path_text(name, field)
        if name.startswith(("/", "\\")) or Path(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
            raise InvalidInput(field, "must be a name relative to the models folder, not an absolute path")
        if ".." in name.replace("\\", "/").split("/"):
            raise InvalidInput(field, "must not contain '..'")
        path = folder / name
        try:
            if not path.exists() and not path.is_symlink():
                raise NotFound(f"Model not found: {name}")
            if not _inside(path, folder.resolve()):
                raise InvalidInput(field, "resolves outside the models folder (a link leaving it)")
            if not path.is_file():
                raise NotFound(f"Model not found: {name}")
        except (OSError, RuntimeError) as exc:
            raise path_error(exc, name, field) from exc
        return path

    def lora_path(self, name: str, field: str = "prompt") -> Path:
        """The LoRA a prompt names as <lora:NAME:weight>: loras/NAME with one of the model
        extensions (safetensors first), or NAME itself when it carries its extension."""
        if _extension(name) in MODEL_EXTENSIONS:
            try:
                return self.path("lora", name, field)
            except NotFound:
                pass
        for ext in MODEL_EXTENSIONS:
            try:
                return self.path("lora", name + ext, field)
            except NotFound:
                continue
        raise NotFound(f"LoRA not found: {name}")


def _extension(filename: str) -> str:
    return os.path.splitext(filename)[1].lower()


def _inside(path: Path, base: Path) -> bool:
    try:
        return path.resolve().is_relative_to(base)
    except (OSError, RuntimeError):  # a link loop
        return False


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
