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
    return quantization_kwargs(dtype) if is_gguf(path) else {}


# --------------------------------------------------------------------------- text encoders and VAEs
# Component files (llm, t5xxl, clip_*, vae) in GGUF are dequantized once at load to the pipeline
# dtype: transformers and diffusers' VAEs have no quantized layers to keep them in.


def file_architecture(path: Path, field: str) -> str | None:
    """`general.architecture` of a GGUF header (None when absent, as in stable-diffusion.cpp's
    conversions); InvalidInput naming `field` when the file is not GGUF."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError, struct errors or IndexError for a bad header
        raise InvalidInput(field, f"{path.name} is not a readable GGUF file: {exc}") from None
    arch = reader.fields.get("general.architecture")
    return None if arch is None else bytes(arch.parts[arch.data[0]]).decode(errors="replace")


def has_llama_cpp_names(tensor_names) -> bool:
    """Whether tensors carry llama.cpp's names (token_embd, blk.N.*, enc.blk.N.*), as llama.cpp's
    and city96's converters write them, rather than the names of the file they came from (as
    stable-diffusion.cpp's converter keeps them)."""
    return "token_embd.weight" in set(tensor_names)


def check_component(path: Path, field: str, llama_cpp_archs: tuple[str, ...], what: str) -> None:
    """Before anything loads: InvalidInput naming `field` when a component file is not GGUF, or
    is a llama.cpp-layout model of another architecture than `llama_cpp_archs` (what `what`, the
    component's role, is read from; empty: any)."""
    info = inspect(path, field)
    arch = file_architecture(path, field)
    if llama_cpp_archs and has_llama_cpp_names(info.tensor_names) and arch not in llama_cpp_archs:
        raise InvalidInput(field, f"{Path(path).name} is a llama.cpp {arch!r} model; {what} is read from GGUF "
                                  f"files of architecture {', '.join(repr(a) for a in llama_cpp_archs)}")


def dequantized_state_dict(path: Path, dtype, field: str, names: dict[str, str] | None = None) -> dict:
    """The file's tensors dequantized (gguf's own kernels) to torch tensors in `dtype`, one at a
    time so memory holds the float copy of one tensor beyond the result. `names` (file name ->
    name in the result) keeps only those tensors, renamed; None keeps all under their own."""
    import torch
    from gguf import GGUFReader, dequantize

    try:
        reader = GGUFReader(Path(path))
    except Exception as exc:  # gguf raises ValueError, struct errors or IndexError for a bad header
        raise InvalidInput(field, f"{Path(path).name} is not a readable GGUF file: {exc}") from None
    out = {}
    for tensor in reader.tensors:
        name = tensor.name if names is None else names.get(tensor.name)
        if name is None:
            continue
        try:
            weights = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise InvalidInput(field, f"{Path(path).name} holds {tensor.tensor_type.name} tensors, which the gguf "
                                      "package cannot dequantize") from None
        out[name] = torch.from_numpy(weights.copy()).to(dtype)
    return out


def encoder_state_dict(path: Path, model, dtype, field: str) -> dict:
    """The weights of a GGUF text encoder or LLM for the transformers `model` (built empty): a
    llama.cpp-layout file (qwen3, qwen2vl, t5encoder, ...) under `model`'s parameter names, mapped
    by transformers' GGUF name map for the file's architecture; any other file under its stored
    names (the caller matches them as it does a safetensors file's)."""
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    info = inspect(path, field)
    if not has_llama_cpp_names(info.tensor_names):
        return dequantized_state_dict(path, dtype, field)
    arch = file_architecture(path, field)
    config = getattr(model.config, "text_config", None) or model.config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None)
    try:
        names = get_gguf_hf_weights_map(model, TensorProcessor(), model_type=arch, num_layers=layers)
    except NotImplementedError:
        raise InvalidInput(field, f"{Path(path).name} is a llama.cpp {arch!r} model, an architecture the gguf "
                                  "package does not know") from None
    return dequantized_state_dict(path, dtype, field, names)


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
                  on_tensor=None, metadata: dict | None = None) -> None:
    """Writes a GGUF of `tensors` (name, shape, GGML type), reading each tensor's float32
    data with read(name) only when it is written, so memory holds one tensor at a time.
    on_tensor(done, total) runs after each tensor; an exception from it stops the writing.
    `metadata` adds header keys (str, int as uint32, float as float32, or lists of them)."""
    import gguf
    import numpy as np
    from gguf import quants

    writer = gguf.GGUFWriter(Path(out_path), arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, (list, tuple)):
            writer.add_array(key, list(value))
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, int(value))
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


def tensor_type(name: str, shape: tuple[int, ...], kind, rules=()):
    """The type of one tensor: the first of `rules` (compiled regex, GGML type) whose regex is
    found in its name (stored_type of it), else default_type for `kind`; None when nothing
    asks for a type (no rule matches and `kind` is None)."""
    chosen = next((rule_kind for pattern, rule_kind in rules if pattern.search(name)), None)
    if chosen is not None:
        return stored_type(chosen, shape)
    return None if kind is None else default_type(name, shape, kind)


# --------------------------------------------------------------------------- quantizing on load


def bits_per_weight(kind) -> float:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[kind]
    return 8 * size / block


def quantize_state_dict(state: dict, kind, rules=()) -> dict:
    """A transformer's tensors (torch tensors, or a GGUF file's GGUFParameters) typed as a GGUF
    file of `kind` (a GGML type, or None to leave untyped tensors as they are) and `rules`
    would type them (tensor_type), quantized with the gguf package into the GGUFParameters
    diffusers' GGUF loading takes. A tensor already quantized to as few bits per weight as
    asked, or fewer, stays as it is (requantizing it to more bits cannot restore what was
    lost); one with more bits is dequantized and quantized again; one typed F32/F16/BF16 ends
    up as a plain float tensor."""
    import gguf
    import numpy as np
    import torch
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor
    from gguf import quants

    plain = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)
    out = {}
    for name, tensor in state.items():
        current = getattr(tensor, "quant_type", None)
        shape = tuple(tensor.quant_shape) if current is not None else tuple(tensor.shape)
        target = tensor_type(name, shape, kind, rules) if tensor.is_floating_point() or current else None
        if target is None or (current is not None and target not in plain
                              and bits_per_weight(current) <= bits_per_weight(target)):
            out[name] = tensor
            continue
        values = dequantize_gguf_tensor(tensor).float() if current is not None else tensor.float()
        if target in plain:
            out[name] = values
            continue
        data = quants.quantize(np.ascontiguousarray(values.numpy()), target)
        out[name] = GGUFParameter(torch.from_numpy(data), quant_type=target)
    return out


def quantization_kwargs(dtype) -> dict:
    """from_single_file's GGUF quantization config computing in `dtype`."""
    from diffusers import GGUFQuantizationConfig

    return {"quantization_config": GGUFQuantizationConfig(compute_dtype=dtype)}
