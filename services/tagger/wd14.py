"""WD14 tagger models (SmilingWolf wd-v1-4-* and wd-*-tagger-v3): locating model.onnx +
selected_tags.csv, preprocessing exactly as the reference taggers do, batched scoring,
and the per-category thresholds."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
from PIL import Image

from services.common.hub import is_repo_id

DEFAULT_MODEL = "SmilingWolf/wd-v1-4-vit-tagger"
MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"

RATING, GENERAL, CHARACTER = 9, 0, 4
CATEGORY_NAMES = {RATING: "rating", GENERAL: "general", CHARACTER: "character"}
# Most images per session.run; larger batches are split so memory stays bounded.
MAX_BATCH = 32

# Tags whose underscores are part of the face they draw, kept as they are (the list the
# SmilingWolf tagger uses).
KAOMOJIS = frozenset({
    "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o",
    "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
})

_WHITE = (255, 255, 255)


@dataclass(frozen=True)
class TagScores:
    rating: dict[str, float]  # every rating label, in the order of selected_tags.csv
    tags: dict[str, float]  # general and character tags at or above their thresholds, best first


def locate_model(model_path: str | None) -> tuple[Path, Path]:
    """(model.onnx, selected_tags.csv) for a folder holding both, a path to model.onnx with
    the csv beside it, or a Hugging Face repo id (default DEFAULT_MODEL) fetched through
    the HF cache, honouring HF_HUB_OFFLINE."""
    model_path = model_path or DEFAULT_MODEL
    path = Path(model_path)
    if path.exists() or path.is_absolute() or not is_repo_id(model_path):
        return _locate_local(path)
    return _locate_on_hub(model_path)


def _locate_local(path: Path) -> tuple[Path, Path]:
    if path.suffix == ".onnx":
        onnx_path, folder = path, path.parent
    else:
        onnx_path, folder = path / MODEL_FILE, path
    if not folder.is_dir():
        problem = "is not a folder or an .onnx file" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"model folder {folder} {problem}")
    missing = [p.name for p in (onnx_path, folder / TAGS_FILE) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{' and '.join(missing)} not found in {folder}")
    return onnx_path, folder / TAGS_FILE


def _locate_on_hub(repo_id: str) -> tuple[Path, Path]:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    try:
        # The csv first: it is small, so a wrong repo id fails before a large download.
        csv_path = Path(hf_hub_download(repo_id, TAGS_FILE))
        onnx_path = Path(hf_hub_download(repo_id, MODEL_FILE))
    except EntryNotFoundError as exc:  # also raised when offline and not cached
        raise FileNotFoundError(
            f"{repo_id} is neither a local model folder nor a Hugging Face model with {MODEL_FILE} and "
            f"{TAGS_FILE} in the cache ({constants.HF_HUB_CACHE}), and it could not be downloaded"
            f"{' (HF_HUB_OFFLINE is set)' if constants.HF_HUB_OFFLINE else ''}: {exc}"
        ) from exc
    except HfHubHTTPError as exc:
        raise FileNotFoundError(f"{repo_id} could not be fetched from the Hugging Face hub: {exc}") from exc
    return onnx_path, csv_path


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
        self.n_tags = len(names)
        self._names = [display_name(n) for n in names]
        self._rating = np.flatnonzero(categories == RATING)
        self._general = np.flatnonzero(categories == GENERAL)
        self._character = np.flatnonzero(categories == CHARACTER)

    @classmethod
    def load(cls, onnx_path: Path, csv_path: Path, providers: list[str] | None = None) -> WD14Model:
        """Raises ValueError when the csv or the model is not in the WD14 layout, or when
        they do not belong together."""
        names, categories = _read_tags(csv_path)
        try:
            session = ort.InferenceSession(str(onnx_path), providers=providers or default_providers())
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ValueError(f"{onnx_path} is not a loadable ONNX model ({exc})") from exc
        shape = session.get_inputs()[0].shape
        if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
            raise ValueError(f"{onnx_path.name} does not take square NHWC 3-channel images (input shape {shape})")
        scored = session.get_outputs()[0].shape[-1]
        if not isinstance(scored, int):  # a symbolic size: learn it from one blank image
            blank = np.full((1, shape[1], shape[1], 3), 255, np.float32)
            scored = session.run(None, {session.get_inputs()[0].name: blank})[0].shape[-1]
        if scored != len(names):
            raise ValueError(f"{csv_path.name} lists {len(names)} tags but {onnx_path.name} scores {scored}; "
                             f"they do not belong to the same model")
        return cls(session, names, categories, onnx_path.stat().st_size)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """(size, size, 3) float32 BGR in 0..255, as the reference taggers prepare an image."""
        out = np.empty((self.input_size, self.input_size, 3), np.float32)
        self.preprocess_into(image, out)
        return out

    def preprocess_many(self, images: Iterable[Image.Image], workers: int) -> np.ndarray:
        """(N, size, size, 3) batch, preprocessed on `workers` threads straight into one array
        (cv2 and PIL release the GIL; images opened lazily are decoded there too)."""
        images = list(images)
        batch = np.empty((len(images), self.input_size, self.input_size, 3), np.float32)
        if workers <= 1 or len(images) <= 1:
            for image, out in zip(images, batch, strict=True):
                self.preprocess_into(image, out)
        else:
            with ThreadPoolExecutor(min(workers, len(images))) as pool:
                # list() re-raises the first failure.
                list(pool.map(self.preprocess_into, images, batch))
        return batch

    def preprocess_into(self, image: Image.Image, out: np.ndarray) -> None:
        """Alpha on white, padded square with white (centred), area-resized when shrinking
        and cubic-resized when enlarging, RGB to BGR."""
        if image.has_transparency_data:
            rgba = image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, _WHITE + (255,))
            canvas.alpha_composite(rgba)
            image = canvas
        # Opaque images are unchanged by compositing on white, so they skip it.
        rgb = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
        height, width = rgb.shape[:2]
        side = max(height, width)
        top, left = (side - height) // 2, (side - width) // 2
        square = cv2.copyMakeBorder(rgb, top, side - height - top, left, side - width - left,
                                    cv2.BORDER_CONSTANT, value=_WHITE)
        size = self.input_size
        if side != size:
            interpolation = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
            square = cv2.resize(square, (size, size), interpolation=interpolation)
        # Resizing treats channels independently, so swapping them after the resize gives
        # the same pixels at a fraction of the cost.
        cv2.cvtColor(square, cv2.COLOR_RGB2BGR, dst=square)
        out[...] = square

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, n_tags) float32 probabilities for an (N, size, size, 3) float32 batch."""
        if len(batch) == 0:
            return np.empty((0, self.n_tags), np.float32)
        parts = [
            self._session.run(None, {self._input: batch[i : i + MAX_BATCH]})[0]
            for i in range(0, len(batch), MAX_BATCH)
        ]
        return np.concatenate(parts, axis=0)

    def score(self, probs: np.ndarray, general_threshold: float, character_threshold: float) -> TagScores:
        """Ratings and the tags passing their category's threshold for one image's (n_tags,)
        probabilities."""
        rating = {self._names[i]: float(probs[i]) for i in self._rating}
        picked = np.concatenate([
            self._general[probs[self._general] >= general_threshold],
            self._character[probs[self._character] >= character_threshold],
        ])
        best_first = picked[np.argsort(-probs[picked], kind="stable")]
        return TagScores(rating=rating, tags={self._names[i]: float(probs[i]) for i in best_first})


def merge_max(frame_probs: np.ndarray) -> np.ndarray:
    """One score per tag for a video: the highest over its frames."""
    return frame_probs.max(axis=0)


def _read_tags(csv_path: Path) -> tuple[list[str], np.ndarray]:
    """Tag names and categories from selected_tags.csv (columns tag_id,name,category,count)."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [column for column in ("name", "category") if column not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{csv_path.name} lacks the column(s) {', '.join(missing)}; a WD14 tag list has "
                             f"the columns tag_id,name,category,count")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{csv_path.name} lists no tags")
    names, categories = [], []
    for line, row in enumerate(rows, start=2):
        category = _int_or_none(row["category"])
        if not row["name"] or category not in CATEGORY_NAMES:
            allowed = ", ".join(f"{number} ({label})" for number, label in CATEGORY_NAMES.items())
            raise ValueError(f"{csv_path.name} line {line} (name {row['name']!r}, category {row['category']!r}) "
                             f"needs a name and one of the categories {allowed}")
        names.append(row["name"])
        categories.append(category)
    return names, np.array(categories)


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None
