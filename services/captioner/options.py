"""What a caption request asks for, checked before anything is read or loaded: the one
input, the model and its generation settings (defaults from the API document), and the
video settings."""

from __future__ import annotations

import os
from dataclasses import dataclass

from services.common.errors import Violations
from services.common.media import resolve_into

FLORENCE2, JOYCAPTION = "florence2", "joycaption"
DEFAULT_MODELS = {
    FLORENCE2: "microsoft/Florence-2-large-ft",
    JOYCAPTION: "fancyfeast/llama-joycaption-beta-one-hf-llava",
}
DEFAULT_MAX_NEW_TOKENS = {FLORENCE2: 1024, JOYCAPTION: 512}
TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
DEFAULT_TASK = "<DETAILED_CAPTION>"
DEFAULT_PROMPT = "Write a long descriptive caption for this image in a formal tone."
SAMPLE_METHODS = ("uniform", "first")
COMBINE_METHODS = ("first", "longest", "combined")
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


@dataclass(frozen=True)
class Source:
    field: str  # which input it came in, for error messages
    value: str
    is_url: bool
    is_video: bool


def vision_options(bad: Violations, *, model_type: str, model_path: str, max_new_tokens: int | None,
                   num_beams: int | None, task: str, prompt: str, temperature: float | None, top_p: float | None,
                   seed: int | None, prefix: str = "") -> VisionOptions:
    """Validated options with the model type's defaults filled in; bad fields go to `bad`."""
    model_type = model_type or FLORENCE2
    if model_type not in DEFAULT_MODELS:
        bad.add(f"{prefix}model_type", f"must be one of {', '.join(DEFAULT_MODELS)} (got {model_type!r})")
        model_type = FLORENCE2
    if max_new_tokens is not None and not 1 <= max_new_tokens <= 4096:
        bad.add(f"{prefix}max_new_tokens", f"must be between 1 and 4096 (got {max_new_tokens})")
    if num_beams is not None and not 1 <= num_beams <= 16:
        bad.add(f"{prefix}num_beams", f"must be between 1 and 16 (got {num_beams})")
    if task and task not in TASKS:
        bad.add(f"{prefix}task", f"must be one of {', '.join(TASKS)} (got {task!r})")
    if temperature is not None and not 0.0 <= temperature <= 2.0:
        bad.add(f"{prefix}temperature", f"must be between 0.0 and 2.0 (got {temperature})")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        bad.add(f"{prefix}top_p", f"must be greater than 0.0 and at most 1.0 (got {top_p})")
    if len(prompt) > 4000:
        bad.add(f"{prefix}prompt", f"must be at most 4000 characters (got {len(prompt)})")
    return VisionOptions(
        model_type=model_type,
        model_path=model_path or default_model(model_type),
        max_new_tokens=max_new_tokens if max_new_tokens is not None else DEFAULT_MAX_NEW_TOKENS[model_type],
        num_beams=num_beams if num_beams is not None else 3,
        task=task or DEFAULT_TASK,
        prompt=prompt or DEFAULT_PROMPT,
        temperature=temperature if temperature is not None else 0.6,
        top_p=top_p if top_p is not None else 0.9,
        seed=seed,
    )


def default_model(model_type: str) -> str:
    """LORAMESH_FLORENCE2_MODEL / LORAMESH_JOYCAPTION_MODEL, else the documented default."""
    return os.environ.get(f"LORAMESH_{model_type.upper()}_MODEL") or DEFAULT_MODELS[model_type]


def check_model_path(bad: Violations, value: str, field: str, roots) -> None:
    """A local model path must lie inside the model roots; anything else is a hub id."""
    if value and value.startswith(("/", ".", "~")):
        resolve_into(bad, value, roots, field, "no such model folder")


def one_source(bad: Violations, **inputs: str) -> Source | None:
    given = [(field, value) for field, value in inputs.items() if value]
    if len(given) != 1:
        names = ", ".join(INPUTS)
        found = f"got {', '.join(f for f, _ in given)}" if given else "got none"
        bad.add("input" if not given else given[1][0], f"exactly one of {names} is required ({found})")
        return None
    field, value = given[0]
    return Source(field, value, is_url=field.endswith("_url"), is_video=field.startswith("video"))


def video_settings(bad: Violations, source: Source | None, *, num_frames: int | None, sample_method: str,
                   combine_method: str, do_audio: bool, max_frames: int) -> tuple[int, str, str]:
    limit = min(MAX_FRAMES, max_frames)
    count = num_frames if num_frames is not None else 8
    if not 1 <= count <= limit:
        bad.add("num_frames", f"must be between 1 and {limit} (got {count})")
    if sample_method and sample_method not in SAMPLE_METHODS:
        bad.add("sample_method", f"must be one of {', '.join(SAMPLE_METHODS)} (got {sample_method!r})")
    if combine_method and combine_method not in COMBINE_METHODS:
        bad.add("combine_method", f"must be one of {', '.join(COMBINE_METHODS)} (got {combine_method!r})")
    if do_audio and source is not None and not source.is_video:
        bad.add("do_audio", "applies to video inputs only (video_path or video_url)")
    return count, sample_method or "uniform", combine_method or "first"


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
