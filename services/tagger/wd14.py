"""WD14 tagger models (SmilingWolf wd-v1-4-*): locating model.onnx + selected_tags.csv,
preprocessing exactly as the reference taggers do, batched scoring, and thresholds."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
from PIL import Image

DEFAULT_MODEL = "SmilingWolf/wd-v1-4-vit-tagger"
MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"

RATING, GENERAL, CHARACTER = 9, 0, 4
# Most images per session.run; larger requests are split so memory stays bounded.
MAX_BATCH = 32

# Tags whose underscores are part of the face they draw, kept as they are.
KAOMOJIS = frozenset({
    "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o",
    "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
})


@dataclass(frozen=True)
class TagScores:
    rating: dict[str, float]
    tags: dict[str, float]  # general and character tags above their thresholds, best first


def locate_model(model_path: str | None) -> tuple[Path, Path]:
    """(model.onnx, selected_tags.csv) for a folder, a model.onnx path, or a Hugging Face
    repo id (downloaded through the HF cache; honours HF_HUB_OFFLINE)."""
    model_path = model_path or DEFAULT_MODEL
    path = Path(model_path)
    if path.is_absolute() or path.exists():
        folder = path.parent if path.suffix == ".onnx" else path
        onnx_path = path if path.suffix == ".onnx" else folder / MODEL_FILE
        csv_path = folder / TAGS_FILE
        for needed in (onnx_path, csv_path):
            if not needed.is_file():
                raise FileNotFoundError(f"{needed.name} not found in {folder}")
        return onnx_path, csv_path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(model_path, MODEL_FILE)), Path(hf_hub_download(model_path, TAGS_FILE))
    except LocalEntryNotFoundError as exc:
        raise FileNotFoundError(
            f"{model_path} is not in the Hugging Face cache and cannot be downloaded now "
            f"(offline or unreachable); pass model_path as a local folder"
        ) from exc
    except HfHubHTTPError as exc:
        raise FileNotFoundError(f"{model_path} could not be fetched from the Hugging Face hub: {exc}") from exc


def display_name(tag: str) -> str:
    return tag if tag in KAOMOJIS else tag.replace("_", " ")


def default_providers() -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class WD14Model:
    def __init__(self, session: ort.InferenceSession, names: list[str], categories: np.ndarray, nbytes: int):
        self._session = session
        self._input = session.get_inputs()[0].name
        self.input_size = int(session.get_inputs()[0].shape[1])
        self.providers = session.get_providers()
        self.nbytes = nbytes
        self._names = [display_name(n) for n in names]
        self._rating = np.flatnonzero(categories == RATING)
        self._general = np.flatnonzero(categories == GENERAL)
        self._character = np.flatnonzero(categories == CHARACTER)

    @classmethod
    def load(cls, onnx_path: Path, csv_path: Path, providers: list[str] | None = None) -> WD14Model:
        names, categories = _read_tags(csv_path)
        try:
            session = ort.InferenceSession(str(onnx_path), providers=providers or default_providers())
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ValueError(f"{onnx_path} is not a loadable ONNX model ({exc})") from exc
        shape = session.get_inputs()[0].shape
        if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
            raise ValueError(f"{onnx_path} does not take square NHWC RGB input (input shape {shape})")
        outputs = session.get_outputs()[0].shape[-1]
        if isinstance(outputs, int) and outputs != len(names):
            raise ValueError(f"{csv_path.name} lists {len(names)} tags but {onnx_path.name} scores {outputs}")
        return cls(session, names, categories, onnx_path.stat().st_size)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """(size, size, 3) float32 BGR in 0..255: alpha on white, padded square with white,
        area-resized when shrinking and cubic-resized when enlarging."""
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            canvas.alpha_composite(rgba)
            rgb = np.asarray(canvas.convert("RGB"))
        else:
            # Compositing an opaque image on white changes nothing, so skip the copy.
            rgb = np.asarray(image.convert("RGB"))
        height, width = rgb.shape[:2]
        side = max(height, width)
        top, left = (side - height) // 2, (side - width) // 2
        square = cv2.copyMakeBorder(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), top, side - height - top, left, side - width - left,
                                    cv2.BORDER_CONSTANT, value=(255, 255, 255))
        size = self.input_size
        if side != size:
            interpolation = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
            square = cv2.resize(square, (size, size), interpolation=interpolation)
        return square.astype(np.float32)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, n_tags) probabilities for an (N, size, size, 3) batch."""
        parts = [
            self._session.run(None, {self._input: batch[i : i + MAX_BATCH]})[0]
            for i in range(0, len(batch), MAX_BATCH)
        ]
        return np.concatenate(parts, axis=0)

    def score(self, probs: np.ndarray, general_threshold: float, character_threshold: float) -> TagScores:
        rating = {self._names[i]: float(probs[i]) for i in self._rating}
        picked = [i for i in self._general if probs[i] >= general_threshold]
        picked += [i for i in self._character if probs[i] >= character_threshold]
        picked.sort(key=lambda i: -probs[i])
        return TagScores(rating=rating, tags={self._names[i]: float(probs[i]) for i in picked})


def merge_max(frame_probs: np.ndarray) -> np.ndarray:
    """One score per tag for a video: the highest over its frames."""
    return frame_probs.max(axis=0)


def _read_tags(csv_path: Path) -> tuple[list[str], np.ndarray]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"name", "category"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{csv_path.name} lacks the column(s) {', '.join(sorted(missing))}")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{csv_path.name} lists no tags")
    try:
        categories = np.array([int(row["category"]) for row in rows])
    except ValueError as exc:
        raise ValueError(f"{csv_path.name} has a non-integer category ({exc})") from exc
    return [row["name"] for row in rows], categories
