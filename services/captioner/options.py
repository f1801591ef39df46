"""What a caption request asks for, checked before anything is read or loaded: the one
input, the model and its generation settings (defaults from the API document), and the
video settings. Each check reads the fields the client sent (absent ones give the default)
and records what is wrong in a Violations."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.common.errors import Violations
from services.common.hub import is_repo_id
from services.common.media import resolve_into
from services.common.settings import ModelSources

FLORENCE2, JOYCAPTION = "florence2", "joycaption"
DEFAULT_MODELS = {
    FLORENCE2: "microsoft/Florence-2-large-ft",
    JOYCAPTION: "fancyfeast/llama-joycaption-beta-one-hf-llava",
}
DEFAULT_MAX_NEW_TOKENS = {FLORENCE2: 1024, JOYCAPTION: 512}
TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
DEFAULT_TASK = "<DETAILED_CAPTION>"
DEFAULT_PROMPT = "Write a long descriptive caption for this image in a formal tone."
MAX_PROMPT_CHARS = 4000
SAMPLE_METHODS = ("uniform", "first")
COMBINE_METHODS = ("first", "longest", "combined")
DEFAULT_NUM_FRAMES = 8
MAX_FRAMES = 64
INPUTS = ("image_path", "image_url", "video_path", "video_url")


@dataclass(frozen=True)
class VisionOptions:
    model_type: str = FLORENCE2
    model_path: str = DEFAULT_MODELS[FLORENCE2]
    max_new_tokens: int = 1024
    num_beams: int = 3
    task: str = DEFAULT_TASK
    prompt: str = DEFAULT_PROMPT
    temperature: float = 0.6
    top_p: float = 0.9
    seed: int | None = None


_DEFAULTS = VisionOptions()


@dataclass(frozen=True)
class Source:
    field: str  # which input it came in, for error messages
    value: str
    is_url: bool
    is_video: bool


def vision_options(bad: Violations, fields: Mapping[str, Any], models: ModelSources,
                   prefix: str = "") -> VisionOptions:
    """Validated options with the model type's defaults filled in; bad fields go to `bad`,
    named with `prefix` ("options.") where the options are nested in the request."""
    def field(name: str) -> tuple[str, Any]:
        return prefix + name, fields.get(name)

    model_type = bad.choice(*field("model_type"), DEFAULT_MODELS, FLORENCE2)
    max_new_tokens = bad.integer(*field("max_new_tokens"), DEFAULT_MAX_NEW_TOKENS[model_type], 1, 4096)
    num_beams = bad.integer(*field("num_beams"), _DEFAULTS.num_beams, 1, 16)
    task = bad.choice(*field("task"), TASKS, DEFAULT_TASK)
    temperature = bad.number(*field("temperature"), _DEFAULTS.temperature, 0.0, 2.0)
    top_p = above_zero(bad, *field("top_p"), _DEFAULTS.top_p, high=1.0)
    prompt = bad.text(*field("prompt"), max_length=MAX_PROMPT_CHARS)
    return VisionOptions(
        model_type=model_type, model_path=fields.get("model_path") or default_model(model_type, models),
        max_new_tokens=max_new_tokens, num_beams=num_beams, task=task, prompt=prompt or DEFAULT_PROMPT,
        temperature=temperature, top_p=top_p, seed=bad.integer(*field("seed")),
    )


def above_zero(bad: Violations, field: str, value: Any, default: float | None = None,
               high: float | None = None) -> float | None:
    """A number greater than 0 (and at most `high`): Violations.number's bounds are inclusive."""
    number = bad.number(field, value, default, high=high)
    bad.require(number is None or number > 0, field, f"must be greater than 0 (got {number!r})")
    return number


def default_model(model_type: str, models: ModelSources) -> str:
    """LORAMESH_FLORENCE2_MODEL / LORAMESH_JOYCAPTION_MODEL, else the documented default."""
    return getattr(models, model_type) or DEFAULT_MODELS[model_type]


def check_model_path(bad: Violations, value: str, field: str, roots) -> None:
    """A Hugging Face repo id, or a model folder inside the model roots (checked here, so a
    relative path never resolves against the service's own folder)."""
    if value and not is_repo_id(value):
        resolve_into(bad, value, roots, field, "no such model folder")


def one_source(bad: Violations, inputs: Mapping[str, str | None]) -> Source | None:
    """The one input the request names among `inputs` (field name to value)."""
    given = [(field, value) for field, value in inputs.items() if value]
    if len(given) != 1:
        found = f"got {', '.join(f for f, _ in given)}" if given else "got none"
        # Named after the second input when there are several, the one to drop.
        bad.add(given[1][0] if given else "input", f"exactly one of {', '.join(inputs)} is required ({found})")
        return None
    field, value = given[0]
    return Source(field, value, is_url=field.endswith("_url"), is_video=field.startswith("video"))


def video_settings(bad: Violations, fields: Mapping[str, Any], source: Source | None,
                   max_frames: int) -> tuple[int, str, str]:
    """(num_frames, sample_method, combine_method) of a caption request."""
    count = bad.integer("num_frames", fields.get("num_frames"), DEFAULT_NUM_FRAMES, 1, min(MAX_FRAMES, max_frames))
    sample_method = bad.choice("sample_method", fields.get("sample_method"), SAMPLE_METHODS, "uniform")
    combine_method = bad.choice("combine_method", fields.get("combine_method"), COMBINE_METHODS, "first")
    bad.require(not fields.get("do_audio") or source is None or source.is_video, "do_audio",
                "applies to video inputs only (video_path or video_url)")
    return count, sample_method, combine_method


def combine(captions: list[str], method: str) -> str:
    """One caption for a video: the first frame's, the longest, or every distinct frame
    caption in time order joined by spaces."""
    if not captions:
        return ""
    if method == "longest":
        return max(captions, key=len)
    if method == "combined":
        kept = [c for i, c in enumerate(captions) if c and c not in captions[:i]]
        return " ".join(kept)
    return captions[0]
