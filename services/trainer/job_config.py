"""The ai-toolkit job config a client sends when it creates a training session, checked in full.

ai-toolkit reads its config loosely: a misspelt key is ignored and a wrong type fails minutes into a run, after
the model has loaded. Checking it here, strictly and against one table of field specs, lets the client see every
mistake in one answer before any GPU time is spent. The config travels as a protobuf Struct, where every number is
a double, so whole floats count as integers. Violations name the key path as the client sent it, under the
request field `config`.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from services.common import architectures
from services.common.errors import InvalidInput, Violations

__all__ = [
    "DatasetConfig",
    "EmaConfig",
    "JobConfig",
    "LoggingConfig",
    "ModelConfig",
    "NetworkConfig",
    "ProcessConfig",
    "SampleConfig",
    "SamplePrompt",
    "SaveConfig",
    "TrainConfig",
    "parse_job_config",
]

# model.arch: the ids of the families the registry marks trainable.
ARCHITECTURES = tuple(family.id for family in architectures.trainable())


# --- The parsed config -----------------------------------------------------------------------------------------


class _Plain:
    """Gives a config dataclass `to_dict`: snake_case keys, lists for tuples, nested configs as dicts."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]


def _plain(value: Any) -> Any:
    if isinstance(value, _Plain):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


@dataclass(frozen=True)
class NetworkConfig(_Plain):
    type: str
    linear: int
    linear_alpha: float
    conv: int | None
    conv_alpha: float | None
    lokr_full_rank: bool
    lokr_factor: int
    ignore_if_contains: tuple[str, ...]
    only_if_contains: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["network_kwargs"] = {key: out.pop(key) for key in ("ignore_if_contains", "only_if_contains")}
        return out


@dataclass(frozen=True)
class SaveConfig(_Plain):
    dtype: str
    save_every: int
    max_step_saves_to_keep: int
    save_format: str
    push_to_hub: bool


@dataclass(frozen=True)
class DatasetConfig(_Plain):
    folder_path: str
    mask_path: str | None
    mask_min_value: float
    default_caption: str
    caption_ext: str
    caption_dropout_rate: float
    shuffle_tokens: bool
    token_dropout_rate: float
    keep_tokens: int
    is_reg: bool
    network_weight: float
    bucket_step_size: int
    bucket_no_upscale: bool
    random_crop: bool
    center_crop: bool
    resolution: tuple[int, ...]
    controls: tuple[()]
    cache_latents: bool
    cache_latents_to_disk: bool
    flip_x: bool
    flip_y: bool
    num_repeats: int


@dataclass(frozen=True)
class EmaConfig(_Plain):
    use_ema: bool
    ema_decay: float


@dataclass(frozen=True)
class TrainConfig(_Plain):
    batch_size: int
    steps: int
    gradient_accumulation: int
    train_unet: bool
    train_text_encoder: bool
    gradient_checkpointing: bool
    noise_scheduler: str
    optimizer: str
    optimizer_params: dict[str, Any]
    lr: float
    text_encoder_lr: float | None
    lr_scheduler: str
    lr_scheduler_kwargs: dict[str, Any]
    unload_text_encoder: bool
    timestep_type: str
    content_or_style: str
    bypass_guidance_embedding: bool
    ema_config: EmaConfig
    dtype: str
    mixed_precision: str
    diff_output_preservation: bool
    diff_output_preservation_multiplier: float
    diff_output_preservation_class: str
    max_grad_norm: float
    noise_offset: float
    min_snr_gamma: float | None
    zero_terminal_snr: bool
    scale_weight_norms: float
    cache_text_encoder_outputs: bool
    cache_text_encoder_outputs_to_disk: bool
    skip_first_sample: bool
    disable_sampling: bool
    seed: int


@dataclass(frozen=True)
class ModelConfig(_Plain):
    name_or_path: str
    arch: str
    quantize: bool
    quantize_te: bool
    low_vram: bool
    model_kwargs: dict[str, Any]


@dataclass(frozen=True)
class SamplePrompt(_Plain):
    """One sample prompt; a None setting falls back to the one of the enclosing sample config."""

    prompt: str
    neg: str | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    guidance_scale: float | None = None
    sample_steps: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in super().to_dict().items() if value is not None}


@dataclass(frozen=True)
class SampleConfig(_Plain):
    sampler: str
    sample_every: int
    width: int
    height: int
    neg: str
    seed: int
    walk_seed: bool
    guidance_scale: float
    sample_steps: int
    num_frames: int
    fps: int
    cfg_rescale: float
    samples: tuple[SamplePrompt, ...]


@dataclass(frozen=True)
class LoggingConfig(_Plain):
    """ai-toolkit's `logging:` block. log_every sets how often a step's loss enters the session's loss history;
    wandb cannot be reached offline, so use_wandb is noted rather than refused; the rest is kept as sent."""

    log_every: int
    verbose: bool
    use_wandb: bool
    use_ui_logger: bool
    project_name: str
    run_name: str | None


@dataclass(frozen=True)
class ProcessConfig(_Plain):
    type: str
    training_folder: str
    device: str
    trigger_word: str | None
    performance_log_every: int
    logging: LoggingConfig
    network: NetworkConfig
    save: SaveConfig
    datasets: tuple[DatasetConfig, ...]
    train: TrainConfig
    model: ModelConfig
    sample: SampleConfig | None
    meta: dict[str, str | int | float | bool]


@dataclass(frozen=True)
class JobConfig(_Plain):
    job: str
    name: str
    process: ProcessConfig
    meta: dict[str, str | int | float | bool]

    def to_dict(self) -> dict[str, Any]:
        """The ai-toolkit shape again, with every default filled in."""
        return {
            "job": self.job,
            "config": {"name": self.name, "process": [self.process.to_dict()]},
            "meta": _plain(self.meta),
        }


# --- Checks: each takes (value, path, violations) and gives the normalised value or _BAD ------------------------

_BAD: Any = object()  # a value that failed its check; its violation is already recorded
_REQUIRED: Any = object()  # the default of a key that must be given


class _Refused(Exception):
    """A value of the right kind that is still not allowed; the message is the whole description."""


def _show(value: Any) -> str:
    """A value as the client wrote it (JSON words for true/false/null), short enough for a message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, int) and value.bit_length() > 64:
        return "a very large integer"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        if len(value) > 8:
            return f"a list of {len(value)} items"
        return "[" + ", ".join(_show(item) for item in value) + "]"
    return type(value).__name__


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _range_text(lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None and not (lo_open or hi_open):
        return f"from {lo} to {hi}"
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi}")
    return " and ".join(parts)


def _within(x: float, lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> bool:
    above = lo is None or (x > lo if lo_open else x >= lo)
    below = hi is None or (x < hi if hi_open else x <= hi)
    return above and below


class _Scalar:
    """A check of one JSON value: `convert` gives the normalised value, _BAD when it does not fit, or raises
    _Refused for a value that fits the type but is not allowed here."""

    def __init__(self, expect: str, convert: Callable[[Any], Any]):
        self.expect = expect
        self.convert = convert

    def __call__(self, value: Any, path: str, bad: Violations) -> Any:
        try:
            out = self.convert(value)
        except _Refused as refusal:
            bad.add(path, str(refusal))
            return _BAD
        bad.require(out is not _BAD, path, f"must be {self.expect} (got {_show(value)})")
        return out


def _integer(lo: int, hi: int | None = None, multiple_of: int | None = None) -> _Scalar:
    expect = f"an integer {_range_text(lo, hi)}" + (f" and a multiple of {multiple_of}" if multiple_of else "")

    def convert(value: Any) -> Any:
        n = _as_int(value)
        ok = n is not None and _within(n, lo, hi, False, False) and (not multiple_of or n % multiple_of == 0)
        return n if ok else _BAD

    return _Scalar(expect, convert)


def _number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    def convert(value: Any) -> Any:
        x = _as_number(value)
        return x if x is not None and _within(x, lo, hi, lo_open, hi_open) else _BAD

    return _Scalar(f"a number {_range_text(lo, hi, lo_open, hi_open)}".rstrip(), convert)


def _numbers(count: int, lo: float, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    one = _number(lo, hi, lo_open=lo_open, hi_open=hi_open).convert

    def convert(value: Any) -> Any:
        if not isinstance(value, (list, tuple)) or len(value) != count:
            return _BAD
        items = tuple(one(item) for item in value)
        return _BAD if any(item is _BAD for item in items) else items

    return _Scalar(f"a list of {count} numbers, each {_range_text(lo, hi, lo_open, hi_open)}", convert)


def _either(first: _Scalar, second: _Scalar) -> _Scalar:
    def convert(value: Any) -> Any:
        out = first.convert(value)
        return second.convert(value) if out is _BAD else out

    return _Scalar(f"{first.expect} or {second.expect}", convert)


def _choice(*choices: str, normalise: dict[str, str] | None = None) -> _Scalar:
    table = {choice: (normalise or {}).get(choice, choice) for choice in choices}
    return _Scalar(f"one of {', '.join(choices)}",
                   lambda value: table.get(value, _BAD) if isinstance(value, str) else _BAD)


def _string(nonempty: bool = False) -> _Scalar:
    def convert(value: Any) -> Any:
        return value if isinstance(value, str) and (value.strip() or not nonempty) else _BAD

    return _Scalar("a non-empty string" if nonempty else "a string", convert)


def _pattern(regex: str, expect: str, prepare: Callable[[str], str] = str) -> _Scalar:
    compiled = re.compile(regex)

    def convert(value: Any) -> Any:
        if not isinstance(value, str):
            return _BAD
        value = prepare(value)
        return value if compiled.fullmatch(value) else _BAD

    return _Scalar(expect, convert)


def _false_only(reason: str) -> _Scalar:
    """A flag ai-toolkit has that this deployment cannot honour."""

    def convert(value: Any) -> Any:
        if value is True:
            raise _Refused(reason)
        return value if value is False else _BAD

    return _Scalar("false", convert)


def _only_one_frame(value: Any) -> Any:
    if _as_int(value) == 1:
        return 1
    raise _Refused(f"must be 1: {', '.join(ARCHITECTURES[:-1])} and {ARCHITECTURES[-1]} make images, not video "
                   f"(got {_show(value)})")


def _no_controls(value: Any) -> Any:
    if not isinstance(value, (list, tuple)):
        return _BAD
    if value:
        raise _Refused("must be empty: control images are not supported by these architectures "
                       f"({', '.join(ARCHITECTURES)})")
    return ()


def _lokr_factor(value: Any) -> Any:
    n = _as_int(value)
    return n if n is not None and (n == -1 or n >= 1) else _BAD


def _resolution(value: Any) -> Any:
    sizes = [value] if not isinstance(value, (list, tuple)) else list(value)
    ints = tuple(_as_int(size) for size in sizes)
    ok = bool(ints) and all(n is not None and 64 <= n <= 4096 for n in ints)
    return ints if ok else _BAD


def _strings(value: Any) -> Any:
    ok = isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value)
    return tuple(value) if ok else _BAD


def _opaque_object(value: Any) -> Any:
    ok = isinstance(value, dict) and all(isinstance(key, str) for key in value)
    return copy.deepcopy(value) if ok else _BAD


class _Meta:
    """Free-form labels: string keys with string, number or boolean values."""

    expect = "an object of strings, numbers and booleans"

    def __call__(self, value: Any, path: str, bad: Violations) -> Any:
        if not isinstance(value, dict):
            bad.add(path, f"must be {self.expect} (got {_show(value)})")
            return _BAD
        ok = True
        for key, item in value.items():
            if not isinstance(key, str) or not (isinstance(item, str) or _as_number(item) is not None):
                bad.add(f"{path}.{key}", f"must be a string, number or boolean (got {_show(item)})")
                ok = False
        return dict(value) if ok else _BAD


@dataclass(frozen=True)
class _Field:
    """One key of an object. `default` is a raw value run through `check`, a function of the values checked so far
    (for defaults that follow another key), None, or _REQUIRED."""

    name: str
    check: Any
    default: Any = None
    aliases: tuple[str, ...] = ()


def _camel(name: str) -> str:
    return re.sub(r"_([a-z0-9])", lambda match: match.group(1).upper(), name)


_Build = Callable[[dict[str, Any], dict[str, str], Violations], Any]


class _Object:
    """A JSON object with a fixed set of keys, each also accepted in camelCase, checked key by key. `null` for a
    key means its default. `build` turns the checked values into the result (and checks rules across keys)."""

    def __init__(self, specs: tuple[_Field, ...], build: _Build | None = None, *, expect: str = "an object",
                 allowed_for: str = ""):
        self.specs = specs
        self.build = build
        self.expect = expect
        self.unknown = f"unknown key; allowed keys{allowed_for}: {', '.join(sorted(spec.name for spec in specs))}"
        self.spellings: dict[str, tuple[str, int]] = {}
        for spec in specs:
            names = dict.fromkeys(s for name in (spec.name, *spec.aliases) for s in (name, _camel(name)))
            for rank, spelling in enumerate(names):
                self.spellings.setdefault(spelling, (spec.name, rank))

    def __call__(self, raw: Any, path: str, bad: Violations) -> Any:
        if not isinstance(raw, dict):
            bad.add(path, f"must be {self.expect} (got {_show(raw)})")
            return _BAD
        sent: dict[str, list[tuple[int, str, Any]]] = {}
        for key, value in raw.items():
            known = self.spellings.get(key) if isinstance(key, str) else None
            if known is None:
                bad.add(f"{path}.{key}", self.unknown)
            else:
                sent.setdefault(known[0], []).append((known[1], key, value))
        values: dict[str, Any] = {}
        paths: dict[str, str] = {}
        for spec in self.specs:
            given = sorted(sent.get(spec.name, []), key=lambda entry: entry[0])
            key = given[0][1] if given else spec.name
            paths[spec.name] = f"{path}.{key}"
            for _rank, other, _value in given[1:]:
                bad.add(f"{path}.{other}", f"is the same setting as {key}; send it once, in one spelling")
            values[spec.name] = _check_field(spec, given[0][2] if given else None, values, paths[spec.name], bad)
        if self.build is not None:
            return self.build(values, paths, bad)
        return _BAD if _failed(values) else values


def _check_field(spec: _Field, value: Any, values: dict[str, Any], path: str, bad: Violations) -> Any:
    if value is None:
        if spec.default is _REQUIRED:
            bad.add(path, f"is required: {spec.check.expect}")
            return _BAD
        value = spec.default(values) if callable(spec.default) else spec.default
        if value is None or value is _BAD:
            return value
    return spec.check(value, path, bad)


class _List:
    """A JSON list of objects with a bound on how many it holds."""

    def __init__(self, item: _Object, expect: str, min_items: int, max_items: int | None = None):
        self.item = item
        self.expect = expect
        self.min_items = min_items
        self.max_items = max_items

    def __call__(self, raw: Any, path: str, bad: Violations) -> Any:
        if not isinstance(raw, (list, tuple)):
            bad.add(path, f"must be {self.expect} (got {_show(raw)})")
            return _BAD
        count_ok = _within(len(raw), self.min_items, self.max_items, False, False)
        if not count_ok:
            bad.add(path, f"must be {self.expect} (got {len(raw)} {'entry' if len(raw) == 1 else 'entries'})")
        items = tuple(self.item(value, f"{path}[{index}]", bad) for index, value in enumerate(raw))
        return items if count_ok and not any(item is _BAD for item in items) else _BAD


def _failed(values: dict[str, Any]) -> bool:
    return any(value is _BAD for value in values.values())


def _make(cls: type, values: dict[str, Any]) -> Any:
    return _BAD if _failed(values) else cls(**values)


def _into(cls: type) -> _Build:
    return lambda values, paths, bad: _make(cls, values)


_BOOL = _Scalar("true or false", lambda value: value if isinstance(value, bool) else _BAD)
_STRINGS = _Scalar("a list of strings", _strings)
_OPAQUE = _Scalar("an object", _opaque_object)
_OPTIONS = _Scalar("an object", lambda value: value if isinstance(value, dict) else _BAD)
_META = _Meta()
_FRACTION = _number(0, 1)

# --- The schema -------------------------------------------------------------------------------------------------


def _build_network(values: dict[str, Any], paths: dict[str, str], bad: Violations) -> Any:
    """network_kwargs is a nested object in ai-toolkit; its two lists sit on NetworkConfig itself."""
    kwargs = values.pop("network_kwargs")
    return _BAD if kwargs is _BAD else _make(NetworkConfig, {**values, **kwargs})


_NETWORK = _Object((
    # "full" trains every weight of the denoiser; `linear` is then the rank of the LoRA
    # extracted from the fine-tuned weights when the run ends.
    _Field("type", _choice("lora", "locon", "lokr", "full"), "lora"),
    _Field("linear", _integer(1, 1024), 16),
    _Field("linear_alpha", _number(0, lo_open=True), lambda values: values["linear"]),
    _Field("conv", _integer(0, 1024)),
    _Field("conv_alpha", _number(0, lo_open=True), lambda values: values["conv"] or None),
    _Field("lokr_full_rank", _BOOL, False),
    _Field("lokr_factor", _Scalar("-1 or an integer >= 1", _lokr_factor), -1),
    _Field("network_kwargs", _Object((
        _Field("ignore_if_contains", _STRINGS, []),
        _Field("only_if_contains", _STRINGS, []),
    )), {}),
), _build_network)

_SAVE_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
_SAVE = _Object((
    _Field("dtype", _choice("float16", "fp16", "bfloat16", "bf16", "float32", "fp32", normalise=_SAVE_DTYPES), "fp16"),
    _Field("save_every", _integer(1), 250),
    _Field("max_step_saves_to_keep", _integer(1), 4),
    _Field("save_format", _choice("diffusers", "safetensors"), "diffusers"),
    _Field("push_to_hub", _false_only("push_to_hub is not available: this deployment has no Hugging Face access"),
           False),
), _into(SaveConfig))


def _build_dataset(values: dict[str, Any], paths: dict[str, str], bad: Violations) -> Any:
    if values["random_crop"] is True and values["center_crop"] is True:
        bad.add(paths["center_crop"], "cannot be true together with random_crop; choose one way to crop")
        return _BAD
    return _make(DatasetConfig, values)


_DATASET = _Object((
    _Field("folder_path", _string(nonempty=True), _REQUIRED),
    _Field("mask_path", _string()),
    _Field("mask_min_value", _FRACTION, 0.0),
    _Field("default_caption", _string(), ""),
    _Field("caption_ext", _pattern(r"[A-Za-z0-9]+", "a file extension of letters and digits, such as txt",
                                   lambda ext: ext.removeprefix(".")), "txt"),
    _Field("caption_dropout_rate", _FRACTION, 0.05),
    _Field("shuffle_tokens", _BOOL, False),
    _Field("token_dropout_rate", _FRACTION, 0.0),
    _Field("keep_tokens", _integer(0), 0),
    _Field("is_reg", _BOOL, False),
    _Field("network_weight", _number(0), 1.0),
    _Field("bucket_step_size", _integer(8, 256), 64),
    _Field("bucket_no_upscale", _BOOL, False),
    _Field("random_crop", _BOOL, False),
    _Field("center_crop", _BOOL, False),
    _Field("resolution", _Scalar("an integer or a non-empty list of integers, each from 64 to 4096", _resolution),
           512),
    _Field("controls", _Scalar("an empty list", _no_controls), []),
    _Field("cache_latents", _BOOL, False),
    _Field("cache_latents_to_disk", _BOOL, False),
    _Field("flip_x", _BOOL, False),
    _Field("flip_y", _BOOL, False),
    _Field("num_repeats", _integer(1), 1),
), _build_dataset)

_WEIGHT_DECAY = _Field("weight_decay", _number(0))
_BETAS = _Field("betas", _numbers(2, 0, 1, hi_open=True))
_EPS = _Field("eps", _number(0, lo_open=True))
_ADAMW_PARAMS = (_WEIGHT_DECAY, _BETAS, _EPS, _Field("amsgrad", _BOOL))
_OPTIMIZER_PARAMS = {name: _Object(specs, allowed_for=f" for {name}") for name, specs in {
    "adamw": _ADAMW_PARAMS,
    "adamw8bit": _ADAMW_PARAMS,
    "adafactor": (
        _WEIGHT_DECAY,
        _Field("eps", _either(_number(0, lo_open=True), _numbers(2, 0, lo_open=True))),
        _Field("relative_step", _BOOL),
        _Field("scale_parameter", _BOOL),
        _Field("warmup_init", _BOOL),
        _Field("beta1", _number(0, 1, hi_open=True)),
        _Field("clip_threshold", _number(0, lo_open=True)),
        _Field("decay_rate", _number()),
    ),
    "prodigy": (
        _WEIGHT_DECAY, _BETAS, _EPS,
        _Field("d_coef", _number(0, lo_open=True)),
        _Field("use_bias_correction", _BOOL),
        _Field("safeguard_warmup", _BOOL),
        _Field("decouple", _BOOL),
    ),
}.items()}

_WARMUP_STEPS = _Field("warmup_steps", _integer(0))
_ETA_MIN = _Field("eta_min", _number(0))
_SCHEDULER_KWARGS = {name: _Object(specs, allowed_for=f" for {name}") for name, specs in {
    "constant": (_WARMUP_STEPS,),
    "constant_with_warmup": (_WARMUP_STEPS,),
    "linear": (_WARMUP_STEPS, _Field("end_factor", _FRACTION)),
    "cosine": (_WARMUP_STEPS, _ETA_MIN),
    "cosine_with_restarts": (_WARMUP_STEPS, _Field("num_cycles", _integer(1)), _ETA_MIN),
    "polynomial": (_WARMUP_STEPS, _Field("power", _number(0, lo_open=True)), _Field("lr_end", _number(0))),
}.items()}


def _options_for(choice: Any, raw: Any, schemas: dict[str, _Object], path: str, bad: Violations) -> Any:
    """Checks optimizer_params or lr_scheduler_kwargs against what the chosen optimizer or scheduler accepts;
    keys left out (or null) stay out, so the library's own defaults apply."""
    if choice is _BAD or raw is _BAD:
        return _BAD
    checked = schemas[choice](raw, path, bad)
    return _BAD if checked is _BAD else {key: value for key, value in checked.items() if value is not None}


def _build_train(values: dict[str, Any], paths: dict[str, str], bad: Violations) -> Any:
    values["optimizer_params"] = _options_for(values["optimizer"], values["optimizer_params"], _OPTIMIZER_PARAMS,
                                              paths["optimizer_params"], bad)
    values["lr_scheduler_kwargs"] = _options_for(values["lr_scheduler"], values["lr_scheduler_kwargs"],
                                                 _SCHEDULER_KWARGS, paths["lr_scheduler_kwargs"], bad)
    ok = True
    if values["train_unet"] is False and values["train_text_encoder"] is False:
        bad.add(paths["train_unet"], "train_unet and train_text_encoder cannot both be false: nothing would be trained")
        ok = False
    return _make(TrainConfig, values) if ok else _BAD


_PRECISION = _choice("fp16", "bf16", "fp32", "float16", "bfloat16", "float32", "no",
                     normalise={**_SAVE_DTYPES, "no": "fp32"})
_TRAIN = _Object((
    _Field("batch_size", _integer(1, 256), 1),
    _Field("steps", _integer(1, 1_000_000), 1000),
    _Field("gradient_accumulation", _integer(1, 1024), 1, aliases=("gradient_accumulation_steps",)),
    _Field("train_unet", _BOOL, True),
    _Field("train_text_encoder", _BOOL, False),
    _Field("gradient_checkpointing", _BOOL, True),
    _Field("noise_scheduler", _choice("ddpm", "euler", "flowmatch", "ddim"), "ddpm"),
    _Field("optimizer", _choice(*_OPTIMIZER_PARAMS), "adamw8bit"),
    _Field("optimizer_params", _OPTIONS, {}),
    _Field("lr", _number(0, 1, lo_open=True), 1e-4),
    _Field("text_encoder_lr", _number(0, 1, lo_open=True)),
    _Field("lr_scheduler", _choice(*_SCHEDULER_KWARGS), "constant"),
    _Field("lr_scheduler_kwargs", _OPTIONS, {}),
    _Field("unload_text_encoder", _BOOL, False),
    _Field("timestep_type", _choice("sigmoid", "linear", "lognorm_blend", "shift", "weighted"), "sigmoid"),
    _Field("content_or_style", _choice("balanced", "content", "style"), "balanced"),
    _Field("bypass_guidance_embedding", _BOOL, False),
    _Field("ema_config", _Object((
        _Field("use_ema", _BOOL, False),
        _Field("ema_decay", _number(0, 1, hi_open=True), 0.99),
    ), _into(EmaConfig)), {}),
    _Field("dtype", _PRECISION, "bf16"),
    _Field("mixed_precision", _PRECISION, "bf16"),
    _Field("diff_output_preservation", _BOOL, False),
    _Field("diff_output_preservation_multiplier", _number(0), 1.0),
    _Field("diff_output_preservation_class", _string(), "person"),
    _Field("max_grad_norm", _number(0), 1.0),
    _Field("noise_offset", _FRACTION, 0.0),
    _Field("min_snr_gamma", _number(0)),
    _Field("zero_terminal_snr", _BOOL, False),
    _Field("scale_weight_norms", _number(0), 0.0),
    _Field("cache_text_encoder_outputs", _BOOL, False),
    _Field("cache_text_encoder_outputs_to_disk", _BOOL, False),
    _Field("skip_first_sample", _BOOL, False),
    _Field("disable_sampling", _BOOL, False),
    _Field("seed", _integer(0), 42),
), _build_train)

_LEGACY_ARCH_FLAGS = {"is_xl": "sdxl", "is_flux": "flux"}


def _build_model(values: dict[str, Any], paths: dict[str, str], bad: Violations) -> Any:
    """Older ai-toolkit configs name the architecture with is_xl / is_flux flags instead of arch."""
    flags = {flag: values.pop(flag) for flag in (*_LEGACY_ARCH_FLAGS, "is_v2")}
    named = [(flag, arch) for flag, arch in _LEGACY_ARCH_FLAGS.items() if flags[flag] is True]
    arch = values["arch"]
    if len(named) > 1:
        bad.add(paths["is_flux"], "cannot be true together with is_xl: a model has one architecture")
        return _BAD
    if arch is None and not named:
        bad.add(paths["arch"], f"is required: one of {', '.join(ARCHITECTURES)}")
        return _BAD
    if arch is None:
        values["arch"] = named[0][1]
    elif named and arch is not _BAD and named[0][1] != arch:
        bad.add(paths[named[0][0]], f"says {named[0][1]} but arch is {arch!r}; drop the flag or make them agree")
        return _BAD
    return _BAD if _failed(flags) else _make(ModelConfig, values)


_MODEL = _Object((
    _Field("name_or_path", _string(nonempty=True), _REQUIRED),
    _Field("arch", _choice(*ARCHITECTURES)),
    _Field("quantize", _BOOL, False),
    _Field("quantize_te", _BOOL, False),
    _Field("low_vram", _BOOL, False),
    _Field("model_kwargs", _OPAQUE, {}),
    _Field("is_xl", _BOOL, False),
    _Field("is_flux", _BOOL, False),
    _Field("is_v2", _false_only(f"Stable Diffusion 2 models are not supported; set arch to one of "
                                f"{', '.join(ARCHITECTURES)}"), False),
), _build_model, expect="an object with name_or_path and arch")

_IMAGE_SIDE = _integer(64, 4096, multiple_of=8)
_SAMPLE_SEED = _integer(0)
_GUIDANCE = _number(0, 50)
_SAMPLE_STEPS = _integer(1, 200)
_SAMPLE_PROMPT = _Object((
    _Field("prompt", _string(), _REQUIRED),
    _Field("neg", _string()),
    _Field("seed", _SAMPLE_SEED),
    _Field("width", _IMAGE_SIDE),
    _Field("height", _IMAGE_SIDE),
    _Field("guidance_scale", _GUIDANCE),
    _Field("sample_steps", _SAMPLE_STEPS),
), _into(SamplePrompt), expect="an object with a prompt")


def _build_sample(values: dict[str, Any], paths: dict[str, str], bad: Violations) -> Any:
    """ai-toolkit takes either `samples` (objects) or the older `prompts` (strings); both at once is ambiguous."""
    samples, prompts = values.pop("samples"), values.pop("prompts")
    if samples is not None and prompts is not None:
        bad.add(paths["prompts"], "give either samples or prompts, not both")
        return _BAD
    if samples is _BAD or prompts is _BAD:
        return _BAD
    values["samples"] = samples if samples is not None else tuple(SamplePrompt(prompt) for prompt in prompts or ())
    return _make(SampleConfig, values)


_SAMPLE = _Object((
    _Field("sampler", _choice("ddpm", "ddim", "euler", "euler_a", "dpmpp_2m", "flowmatch"), "ddpm"),
    _Field("sample_every", _integer(1), 250),
    _Field("width", _IMAGE_SIDE, 1024),
    _Field("height", _IMAGE_SIDE, 1024),
    _Field("neg", _string(), ""),
    _Field("seed", _SAMPLE_SEED, 42),
    _Field("walk_seed", _BOOL, False),
    _Field("guidance_scale", _GUIDANCE, 7.0),
    _Field("sample_steps", _SAMPLE_STEPS, 20),
    _Field("num_frames", _Scalar("1", _only_one_frame), 1),
    _Field("fps", _integer(1), 1),
    _Field("cfg_rescale", _FRACTION, 0.0),
    _Field("samples", _List(_SAMPLE_PROMPT, "a list of sample objects", 0)),
    _Field("prompts", _STRINGS),
), _build_sample)

# ai-toolkit's keys; log_every defaults to every step (ai-toolkit's 100 suits its wandb, not a live chart).
_LOGGING = _Object((
    _Field("log_every", _integer(1), 1),
    _Field("verbose", _BOOL, False),
    _Field("use_wandb", _BOOL, False),
    _Field("use_ui_logger", _BOOL, False),
    _Field("project_name", _string(), "ai-toolkit"),
    _Field("run_name", _string()),
), _into(LoggingConfig))


def _build_process(values: dict[str, Any], paths: dict[str, str], bad: Violations) -> Any:
    network, train = values["network"], values["train"]
    if network is not _BAD and train is not _BAD and network.type == "full" and not train.train_unet:
        bad.add(f"{paths['train']}.train_unet", "must be true when network.type is full: full fine-tuning "
                                                "trains the denoiser (the UNet or transformer)")
        return _BAD
    return _make(ProcessConfig, values)


_PROCESS = _Object((
    _Field("type", _choice("diffusion_trainer", "sd_trainer"), _REQUIRED),
    _Field("training_folder", _string(nonempty=True), _REQUIRED),
    _Field("device", _pattern(r"cuda(:\d+)?|cpu|mps", "cuda, cuda:N, cpu or mps"), "cuda"),
    _Field("trigger_word", _string()),
    _Field("performance_log_every", _integer(1), 10),
    _Field("logging", _LOGGING, {}),
    _Field("network", _NETWORK, {}),
    _Field("save", _SAVE, {}),
    _Field("datasets", _List(_DATASET, "a non-empty list of dataset objects", 1), _REQUIRED),
    _Field("train", _TRAIN, {}),
    _Field("model", _MODEL, _REQUIRED),
    _Field("sample", _SAMPLE),
    _Field("meta", _META, {}),
), _build_process)

_NAME = _pattern(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}",
                 "1 to 100 characters of letters, digits, '.', '_' and '-', not starting with '.' "
                 "(it names the output folder and files)")


def _build_job(values: dict[str, Any], paths: dict[str, str], bad: Violations) -> Any:
    inner = values.pop("config")
    if inner is _BAD:
        return _BAD
    return _make(JobConfig, {**values, "name": inner["name"], "process": inner["process"][0]})


_JOB = _Object((
    _Field("job", _choice("extension", "train"), _REQUIRED),
    _Field("config", _Object((
        _Field("name", _NAME, _REQUIRED),
        _Field("process", _List(_PROCESS, "a list with exactly one process object", 1, 1), _REQUIRED),
    ), expect="an object with name and process"), _REQUIRED),
    _Field("meta", _META, {}),
), _build_job, expect="an ai-toolkit job config object")


def parse_job_config(raw: dict) -> JobConfig:
    """The checked, normalised job config; raises InvalidInput naming every bad key under `config`."""
    bad = Violations()
    job = _JOB(raw, "config", bad)
    bad.raise_if_any()
    if job is _BAD:  # every failed check records a violation, so this is a bug guard
        raise InvalidInput("config", "is not a valid ai-toolkit job config")
    return job
