"""Tags a request: checks its `input` list in full, then takes its images and sampled
video frames in request order, wd14.MAX_BATCH at a time: decodes them in parallel, scores
the batch in one ONNX run, folds the scores into each item's running maximum and lets the
batch go before decoding the next. Memory follows the batch, not the request (a request of
256 long videos holds no more frames than one of 32 images). Each item's thresholds are
applied at the end."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from services.common import media
from services.common.errors import InvalidInput, NotFound
from services.common.hub import is_repo_id
from services.common.residency import Residency
from services.common.settings import Settings
from services.tagger import wd14
from services.tagger.inputs import TagItem, parse_inputs


class Tagger:
    def __init__(self, settings: Settings, residency: Residency):
        self._settings = settings
        self._residency = residency
        self._workers = max(2, os.cpu_count() or 2)
        # The default model; operators can point it at a local folder.
        self.default_model = settings.models.tagger or wd14.DEFAULT_MODEL
        # Where each hub id's files are, so a request does not ask the hub again.
        self._hub_files: dict[str, tuple[Path, Path]] = {}

    def model(self, model_path: str) -> wd14.WD14Model:
        onnx_path, csv_path = self._locate(model_path or self.default_model)
        return self._residency.get(
            str(onnx_path), lambda: _load(onnx_path, csv_path)
        )

    def _locate(self, model_path: str) -> tuple[Path, Path]:
        is_hub_id = is_repo_id(model_path)
        if is_hub_id and model_path in self._hub_files:
            return self._hub_files[model_path]
        where = model_path if is_hub_id else str(
            media.resolve_path(model_path, self._settings.model_roots, "model_path"))
        try:
            files = wd14.locate_model(where)
        except FileNotFoundError as exc:
            raise NotFound(f"model_path: {exc}") from exc
        if is_hub_id:
            self._hub_files[model_path] = files
        return files

    def tag(self, raw_input: Any, model_path: str) -> dict[str, wd14.TagScores]:
        """Scores keyed by each item's path or URL as the client wrote it, for the decoded
        JSON `input` of a request; InvalidInput lists every bad field before any file is read."""
        items = parse_inputs(raw_input, self._settings.media.max_video_frames)
        model = self.model(model_path)
        merged: list[np.ndarray | None] = [None] * len(items)  # each item's highest score per tag
        pending = self._pictures(items)
        with ThreadPoolExecutor(self._workers) as pool:
            while chunk := list(itertools.islice(pending, wd14.MAX_BATCH)):
                owners = [index for index, _ in chunk]
                probs = self._score(model, pool, [load for _, load in chunk])
                del chunk  # its frames go before the next batch is decoded
                for index, row in zip(owners, probs, strict=True):
                    merged[index] = row if merged[index] is None else np.maximum(merged[index], row)
        return {item.key: model.score(scores, item.general_threshold, item.character_threshold)
                for item, scores in zip(items, merged, strict=True)}

    def _pictures(self, items: list[TagItem]) -> Iterator[tuple[int, Callable[[], Image.Image]]]:
        """(item index, a call giving the decoded picture) for every image and sampled video
        frame, in request order. An image is read and decoded when called, on a pool thread;
        a video is decoded as its frames are taken, so it holds only those of the current batch."""
        limits = self._settings.media
        for index, item in enumerate(items):
            if item.media_type != "video":
                yield index, partial(self._decode_image, item)
                continue
            source = self._read(item)
            for frame in media.iter_video_frames(source, item.field, item.frame_interval, item.max_frame_count,
                                                 limits):
                yield index, partial(_given, frame.image)

    def _read(self, item: TagItem) -> Path | bytes:
        return media.read_source(item.key, item.field, is_url=item.is_url, roots=self._settings.media_roots,
                                 limits=self._settings.media)

    def _decode_image(self, item: TagItem) -> Image.Image:
        return media.decode_image(self._read(item), item.field, self._settings.media)

    @staticmethod
    def _score(model: wd14.WD14Model, pool: ThreadPoolExecutor, loads: list[Callable[[], Image.Image]]) -> np.ndarray:
        """(N, n_tags) probabilities of one batch, its pictures decoded and preprocessed in parallel."""
        batch = np.empty((len(loads), model.input_size, model.input_size, 3), np.float32)
        list(pool.map(lambda load, out: model.preprocess_into(load(), out), loads, batch))  # re-raises a failure
        try:
            return model.predict(batch)
        except Exception as exc:  # onnxruntime raises its own types on shape/type mismatches
            raise InvalidInput("model_path", f"the model could not score these inputs ({exc})") from exc

    def free(self):
        self._hub_files.clear()
        return self._residency.free_all()


def _given(image: Image.Image) -> Image.Image:
    return image


def _load(onnx_path: Path, csv_path: Path) -> tuple[wd14.WD14Model, str, int]:
    try:
        model = wd14.WD14Model.load(onnx_path, csv_path)
    except ValueError as exc:
        raise InvalidInput("model_path", str(exc)) from exc
    device = "cuda" if "CUDAExecutionProvider" in model.providers else "cpu"
    return model, device, model.nbytes
