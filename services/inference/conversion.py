"""POST /convert: a model file of the models root (.safetensors or .gguf), of a family that
/models/load reads from GGUF, rewritten as a GGUF diffusion model that /models/load reads
back (city96's layout: the tensors under their own names, linear weights quantized to
`output_type`).

A request becomes a checked `ConversionPlan` before anything is queued (every bad field at
once); the worker runs `convert`, which writes the file under a hidden temporary name beside
its output and removes it on any failure, and `publish` gives it its name without ever
replacing a file. A baked-in VAE lands under `vae.` (stable-diffusion.cpp's convert layout),
and `tensor_type_rules` ("^vae\\.=f16,attn=q8_0": comma-separated regex=type, first match
wins, searched anywhere in the name) pick other types for some tensors.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.common import architectures, media
from services.common.errors import InvalidInput, ServiceError, Violations
from services.inference import gguf_files, model_loading

# general.architecture of each family's GGUF files, as released conversions name them; the
# families are those diffusers loads from GGUF.
GGUF_ARCHITECTURES = {architectures.FLUX.name: "flux", architectures.ZIMAGE.name: "lumina2",
                      architectures.SD3.name: "sd3", architectures.WAN21.name: "wan", architectures.WAN22.name: "wan",
                      architectures.QWEN_IMAGE.name: "qwen_image"}
assert set(GGUF_ARCHITECTURES) == set(model_loading._GGUF_LOADABLE)
# GET /options' list: the types gguf writes and diffusers loads.
OUTPUT_TYPES = tuple(t for t, _, _ in model_loading.QUANTIZATION_TYPES)
INPUT_SUFFIXES = (".safetensors", ".sft", ".gguf")
VAE_PREFIX = "vae."
MAX_RULES = 64


@dataclass(frozen=True)
class ConversionPlan:
    input_path: str  # absolute paths, resolved inside the models root
    output_path: str
    output_name: str  # the output as the client sees it: relative to the models root
    output_type: str
    architecture: str
    vae_path: str | None = None
    tensor_type_rules: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"input_path": self.input_path, "output_path": self.output_path, "output_name": self.output_name,
                "output_type": self.output_type, "architecture": self.architecture, "vae_path": self.vae_path,
                "tensor_type_rules": [list(rule) for rule in self.tensor_type_rules]}

    @classmethod
    def from_json(cls, data: dict) -> ConversionPlan:
        return cls(**{**data, "tensor_type_rules": [tuple(rule) for rule in data["tensor_type_rules"]]})


# --------------------------------------------------------------------------- checks


def _relative(violations: Violations, raw, field_name: str, required: bool) -> str | None:
    """A path relative to the models root, as text; None (and a violation when wrong) otherwise."""
    if raw is None or raw == "":
        if required:
            violations.add(field_name, "is required: a path relative to the models root, e.g. "
                                       "diffusion_models/flux1-dev.safetensors")
        return None
    return media.relative_path(violations, raw, field_name, "the models root")


def _existing(violations: Violations, root: Path, raw, field_name: str, what: str, required: bool) -> Path | None:
    """An existing model file inside the models root, with one of INPUT_SUFFIXES."""
    name = _relative(violations, raw, field_name, required)
    if name is None:
        return None
    if Path(name).suffix.lower() not in INPUT_SUFFIXES:
        violations.add(field_name, f"{media.shown(name)}: {what} must be a .safetensors or .gguf file")
        return None
    roots = (root, root.resolve())
    path = media.resolve_into(violations, str(root / name), roots, field_name, f"no such {what} in the models root",
                              shown_as=name)
    if path is not None and not path.is_file():
        violations.add(field_name, f"{media.shown(name)} is not a file")
        return None
    return path


def _output(violations: Violations, root: Path, raw, default: str | None) -> tuple[Path, str] | None:
    """Where the GGUF goes: a new .gguf file inside the models root (never an existing one)."""
    given = _relative(violations, raw, "output_path", required=False)
    if raw not in (None, "") and given is None:
        return None
    name = given or default
    if name is None:
        return None
    if Path(name).suffix.lower() != ".gguf":
        violations.add("output_path", f"{media.shown(name)} must end in .gguf")
        return None
    path = root / name
    # The nearest folder that exists must be inside the root (no link leading out of it).
    folder = path.parent
    while not folder.exists() and folder != root:
        folder = folder.parent
    if not folder.resolve().is_relative_to(root.resolve()) or folder.is_file():
        violations.add("output_path", f"{media.shown(name)} is not a place inside the models root")
        return None
    if path.exists() or path.is_symlink():
        violations.add("output_path", f"{media.shown(name)} exists already; name a new file (existing models are "
                                      "never replaced)")
        return None
    return path, name


def parse_rules(text, violations: Violations) -> list[tuple[str, str]]:
    """stable-diffusion.cpp's tensor_type_rules: "regex=type" items separated by commas."""
    if text is None or text == "":
        return []
    if not isinstance(text, str):
        violations.add("tensor_type_rules", "must be a string")
        return []
    rules = []
    items = [item.strip() for item in text.split(",") if item.strip()]
    if len(items) > MAX_RULES:
        violations.add("tensor_type_rules", f"at most {MAX_RULES} rules")
        return []
    for item in items:
        pattern, equals, kind = item.rpartition("=")
        where = f"rule {media.shown(item)}"
        if not equals or not pattern:
            violations.add("tensor_type_rules", f'{where} is not "regex=type" (e.g. "^vae\\.=f16")')
            continue
        try:
            re.compile(pattern)
        except re.error as exc:
            violations.add("tensor_type_rules", f"{where}: invalid regular expression ({exc})")
            continue
        if kind.lower() not in OUTPUT_TYPES:
            violations.add("tensor_type_rules", f"{where}: unknown type {media.shown(kind)}; allowed: "
                                                f"{', '.join(OUTPUT_TYPES)}")
            continue
        rules.append((pattern, kind.lower()))
    return rules


def compiled_rules(rules: list[tuple[str, str]]) -> list:
    """parse_rules' (regex, type id) pairs as (compiled regex, GGML type), as tensor typing takes them."""
    return [(re.compile(pattern), gguf_files.ggml_type(kind)) for pattern, kind in rules]


def _architecture(violations: Violations, path: Path, name: str) -> str | None:
    try:
        architecture = model_loading.detect_architecture(path)
    except InvalidInput as exc:
        for _, description in exc.violations:
            violations.add("input_path", description)
        return None
    if architecture not in GGUF_ARCHITECTURES:
        violations.add("input_path", f"{media.shown(name)} is an {architecture} model; conversion to GGUF covers "
                                     f"{', '.join(GGUF_ARCHITECTURES)} diffusion models, the ones that load back "
                                     "from GGUF here")
        return None
    return architecture


def plan_conversion(root: Path, request: dict) -> ConversionPlan:
    """Checks a /convert body (proto field names): InvalidInput naming every bad field. Reads
    only file headers."""
    root = Path(root)
    bad = Violations()
    output_type = request.get("output_type")
    if not isinstance(output_type, str) or output_type.lower() not in OUTPUT_TYPES:
        got = "" if output_type in (None, "") else f" (got {media.shown(str(output_type))})"
        bad.add("output_type", f"must be one of {', '.join(OUTPUT_TYPES)}, as GET /options lists them{got}")
        output_type = None
    else:
        output_type = output_type.lower()
    input_name = request.get("input_path")
    source = _existing(bad, root, input_name, "input_path", "model", required=True)
    architecture = _architecture(bad, source, input_name) if source is not None else None
    vae = _existing(bad, root, request.get("vae_path"), "vae_path", "VAE", required=False)
    if vae is not None:
        try:
            _tensor_shapes(vae)
        except Exception as exc:  # safetensors and gguf raise their own errors for a bad header
            bad.add("vae_path", f"{media.shown(request['vae_path'])} is not a readable model file: "
                                f"{media.shown(str(exc))}")
    rules = parse_rules(request.get("tensor_type_rules"), bad)
    default = None
    if source is not None and output_type is not None:
        default = f"diffusion_models/{Path(input_name).stem}.{output_type}.gguf"
    output = _output(bad, root, request.get("output_path"), default)
    bad.raise_if_any()
    return ConversionPlan(input_path=str(source), output_path=str(output[0]), output_name=output[1],
                          output_type=output_type, architecture=architecture, vae_path=str(vae) if vae else None,
                          tensor_type_rules=rules)


# --------------------------------------------------------------------------- converting


class _Source:
    """Tensors of one .safetensors or .gguf file, read one at a time as float32 numpy."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if gguf_files.is_gguf(self.path):
            from gguf import GGUFReader

            self._gguf = {t.name: t for t in GGUFReader(self.path).tensors}
            self.shapes = {n: tuple(int(d) for d in reversed(t.shape.tolist())) for n, t in self._gguf.items()}
        else:
            from safetensors import safe_open

            self._file = safe_open(str(self.path), framework="pt")
            self.shapes = {n: tuple(self._file.get_slice(n).get_shape()) for n in self._file.keys()}

    def read(self, name: str):
        if gguf_files.is_gguf(self.path):
            from gguf import quants

            tensor = self._gguf[name]
            return quants.dequantize(tensor.data, tensor.tensor_type).reshape(self.shapes[name])
        return self._file.get_tensor(name).float().numpy()


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return _Source(path).shapes


def tensor_types(plan: ConversionPlan, shapes: dict[str, tuple[int, ...]]) -> dict:
    """The GGML type of each tensor: the first rule whose regex is found in its name, else the
    default for `output_type` (gguf_files.default_type)."""
    kind = gguf_files.ggml_type(plan.output_type)
    rules = compiled_rules(plan.tensor_type_rules)
    return {name: gguf_files.tensor_type(name, shape, kind, rules) for name, shape in shapes.items()}


def staged_path(plan: ConversionPlan, job_id: str, attempt: int) -> Path:
    """The hidden temporary name an attempt writes under (model listings skip dot files)."""
    output = Path(plan.output_path)
    return output.parent / f".{output.name}.{job_id}-{attempt}.part"


def convert(plan: ConversionPlan, staged: Path, on_tensor=None) -> float:
    """Writes the plan's GGUF to `staged`; seconds taken. on_tensor(done, total) runs after
    each tensor and may raise to stop (cancel, time limit); on any failure `staged` is gone."""
    started = time.perf_counter()
    model = _Source(Path(plan.input_path))
    sources = {name: (model, name) for name in model.shapes}
    if plan.vae_path:
        vae = _Source(Path(plan.vae_path))
        sources.update({VAE_PREFIX + name: (vae, name) for name in vae.shapes})
    shapes = {name: source.shapes[inner] for name, (source, inner) in sources.items()}
    types = tensor_types(plan, shapes)
    staged.parent.mkdir(parents=True, exist_ok=True)
    try:
        gguf_files.write_tensors(staged, GGUF_ARCHITECTURES[plan.architecture],
                                 [(name, shapes[name], types[name]) for name in sources],
                                 lambda name: sources[name][0].read(sources[name][1]), on_tensor)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return round(time.perf_counter() - started, 4)


def publish(staged: Path, output: Path, output_name: str) -> None:
    """Gives the written file its name, unless a file took that name meanwhile (a hard link
    fails rather than replacing it); `staged` is gone afterwards either way."""
    try:
        os.link(staged, output)
    except FileExistsError:
        raise ServiceError(f"output_path {output_name} was created by something else while converting; "
                           "nothing was replaced") from None
    finally:
        staged.unlink(missing_ok=True)
