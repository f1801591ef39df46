"""GGUF diffusion models (flux1-dev-Q4_K_S.gguf, z_image_turbo-Q8_0.gguf, ...): what a file
holds, read from its header with gguf's GGUFReader (memory-mapped; nothing is dequantized),
and the pieces diffusers' GGUF support loads a transformer with. Quantized weights stay
quantized in memory and are dequantized layer by layer as the model runs."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import InvalidInput

# Types torch holds as plain tensors; every other type needs diffusers' dequantization.
_PLAIN_TYPES = ("F32", "F16")


@dataclass(frozen=True)
class GGUFInfo:
    tensor_names: list[str]
    tensor_types: Counter  # GGML type name ("Q8_0", "F32", ...) -> number of tensors


def is_gguf(path) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def inspect(path: Path, field: str = "model_name") -> GGUFInfo:
    """The tensor names and types of a GGUF file; InvalidInput naming `field` when the file is
    not GGUF (bad magic, truncated, unknown version)."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(path)
        tensors = [(t.name, t.tensor_type.name) for t in reader.tensors]
    except Exception as exc:  # gguf raises ValueError, struct errors or IndexError for a bad header
        raise InvalidInput(field, f"{path.name} is not a readable GGUF file: {exc}") from None
    return GGUFInfo(tensor_names=[name for name, _ in tensors], tensor_types=Counter(kind for _, kind in tensors))


def loadable_types() -> list[str]:
    """The GGML tensor types diffusers can load: the plain float types and those its GGUF
    dequantization kernels cover."""
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    return [*_PLAIN_TYPES, *(t.name for t in SUPPORTED_GGUF_QUANT_TYPES if t.name not in _PLAIN_TYPES)]


def check_loadable(path: Path, architecture: str, architectures: list[str], field: str = "model_name") -> None:
    """InvalidInput naming `field` when diffusers cannot read `architecture` from GGUF or the
    file holds tensor types its kernels cannot dequantize."""
    path = Path(path)
    if architecture not in architectures:
        raise InvalidInput(field, f"{path.name} is a {architecture} model in GGUF, which diffusers cannot read for "
                                  f"{architecture}; GGUF loads for {', '.join(architectures)} diffusion models "
                                  "(use the .safetensors release otherwise)")
    loadable = loadable_types()
    unknown = sorted(t for t in inspect(path, field).tensor_types if t not in loadable)
    if unknown:
        raise InvalidInput(field, f"{path.name} holds {', '.join(unknown)} tensors, which diffusers cannot "
                                  f"dequantize; loadable types: {', '.join(loadable)}")


def load_state_dict(path) -> dict:
    """The file's tensors under their stored names, quantized ones as diffusers GGUFParameters
    (row splits and concatenations keep them quantized, so layout converters work on them)."""
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    return load_gguf_checkpoint(str(path))


def single_file_kwargs(path, dtype) -> dict:
    """What from_single_file needs besides the weights: a GGUF quantization config computing
    in `dtype` for a .gguf file, nothing otherwise."""
    if not is_gguf(path):
        return {}
    from diffusers import GGUFQuantizationConfig

    return {"quantization_config": GGUFQuantizationConfig(compute_dtype=dtype)}
