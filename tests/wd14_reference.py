"""WD14 tagging as the reference taggers do it, one image at a time, written out step by
step: what the tests and the benchmark compare the service with."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
from PIL import Image

from services.tagger import wd14


def reference_pixels(image: Image.Image, size: int) -> np.ndarray:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    bgr = np.asarray(rgb)[:, :, ::-1]
    height, width = bgr.shape[:2]
    side = max(height, width)
    pad_top, pad_left = (side - height) // 2, (side - width) // 2
    square = np.pad(bgr, ((pad_top, side - height - pad_top), (pad_left, side - width - pad_left), (0, 0)),
                    mode="constant", constant_values=255)
    if side > size:
        square = cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)
    elif side < size:
        square = cv2.resize(square, (size, size), interpolation=cv2.INTER_CUBIC)
    return square.astype(np.float32)


def reference_tags(model_dir: Path, image: Image.Image, general_threshold=0.35, character_threshold=0.85):
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    model_input = session.get_inputs()[0]
    pixels = reference_pixels(image, model_input.shape[1])
    probs = session.run(None, {model_input.name: pixels[None]})[0][0]
    with open(model_dir / "selected_tags.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    labels = [(row["name"], int(row["category"]), float(p)) for row, p in zip(rows, probs, strict=True)]

    def shown(name):
        return name if name in wd14.KAOMOJIS else name.replace("_", " ")

    rating = {shown(name): p for name, category, p in labels if category == 9}
    tags = [(shown(name), p) for name, category, p in labels
            if (category == 0 and p >= general_threshold) or (category == 4 and p >= character_threshold)]
    return rating, dict(sorted(tags, key=lambda tag: tag[1], reverse=True))
