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


# --------------------------------------------------------------------------- writing


def ggml_type(name: str):
    """The gguf package's type for a quantization id ("q8_0", "F16", ...)."""
    import gguf

    return gguf.GGMLQuantizationType[name.upper()]


def stored_type(kind, shape: tuple[int, ...]):
    """The type a tensor of `shape` is written in when `kind` is asked for: float types as
    asked; block-quantized types only for a matrix whose rows split into whole blocks, F32
    otherwise (as llama.cpp's and city96's converters keep such tensors)."""
    import gguf

    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return kind
    block, _ = gguf.GGML_QUANT_SIZES[kind]
    if len(shape) >= 2 and shape[-1] % block == 0:
        return kind
    return gguf.GGMLQuantizationType.F32


def default_type(name: str, shape: tuple[int, ...], kind):
    """The type of a tensor in a diffusion-model GGUF of `kind`, as city96's conversions are:
    linear weights (2-D `.weight`s) in `kind`, biases, norms and pad tokens in F32."""
    import gguf

    if name.endswith(".weight") and len(shape) == 2:
        return stored_type(kind, shape)
    return gguf.GGMLQuantizationType.F32


def write_tensors(out_path: Path, arch: str, tensors: list[tuple[str, tuple[int, ...], object]], read,
                  on_tensor=None) -> None:
    """Writes a GGUF of `tensors` (name, shape, GGML type), reading each tensor's float32
    data with read(name) only when it is written, so memory holds one tensor at a time.
    on_tensor(done, total) runs after each tensor; an exception from it stops the writing."""
    import gguf
    import numpy as np
    from gguf import quants

    writer = gguf.GGUFWriter(Path(out_path), arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    try:
        for name, shape, kind in tensors:
            if kind == gguf.GGMLQuantizationType.F32:
                writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
            elif kind == gguf.GGMLQuantizationType.F16:
                writer.add_tensor_info(name, shape, np.dtype(np.float16), 2 * int(np.prod(shape)))
            else:
                byte_shape = quants.quant_shape_to_byte_shape(shape, kind)
                writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for done, (name, shape, kind) in enumerate(tensors, 1):
            data = np.ascontiguousarray(read(name), dtype=np.float32).reshape(shape)
            writer.write_tensor_data(quants.quantize(data, kind))
            if on_tensor is not None:
                on_tensor(done, len(tensors))
    finally:
        writer.close()


def write_gguf(state_dict: dict, out_path: Path, qtype: str = "q8_0", arch: str = "flux") -> Path:
    """A GGUF model file of torch tensors under their own names, `general.architecture` =
    `arch`, typed by default_type (linear weights in `qtype`: "q8_0", "q4_0", ... any type gguf
    can write)."""
    kind = ggml_type(qtype)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    plan = [(name, tuple(t.shape), default_type(name, tuple(t.shape), kind)) for name, t in state_dict.items()]
    write_tensors(out_path, arch, plan, lambda name: state_dict[name].float().numpy())
    return out_path
