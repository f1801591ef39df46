"""Tags a request: checks its `input` list in full, loads every image and video frame in
parallel, scores them all in one batched ONNX run, then applies each item's thresholds."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

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
        with ThreadPoolExecutor(self._workers) as pool:
            per_item = list(pool.map(lambda item: self._load_and_preprocess(item, model), items))
        batch = np.concatenate(per_item, axis=0)
        try:
            probs = model.predict(batch)
        except Exception as exc:  # onnxruntime raises its own types on shape/type mismatches
            raise InvalidInput("model_path", f"the model could not score these inputs ({exc})") from exc
        results: dict[str, wd14.TagScores] = {}
        start = 0
        for item, arrays in zip(items, per_item, strict=False):
            rows = probs[start : start + len(arrays)]
            start += len(arrays)
            merged = wd14.merge_max(rows) if len(rows) > 1 else rows[0]
            results[item.key] = model.score(merged, item.general_threshold, item.character_threshold)
        return results

    def _load_and_preprocess(self, item: TagItem, model: wd14.WD14Model) -> np.ndarray:
        limits = self._settings.media
        source = media.read_source(
            item.key, item.field, is_url=item.is_url, roots=self._settings.media_roots, limits=limits
        )
        if item.media_type == "video":
            frames = media.sample_video_frames(
                source, item.field, item.frame_interval, item.max_frame_count, limits
            )
            images = [frame.image for frame in frames]
        else:
            images = [media.decode_image(source, item.field, limits)]
        return np.stack([model.preprocess(image) for image in images])

    def free(self):
        self._hub_files.clear()
        return self._residency.free_all()


def _load(onnx_path: Path, csv_path: Path) -> tuple[wd14.WD14Model, str, int]:
    try:
        model = wd14.WD14Model.load(onnx_path, csv_path)
    except ValueError as exc:
        raise InvalidInput("model_path", str(exc)) from exc
    device = "cuda" if "CUDAExecutionProvider" in model.providers else "cpu"
    return model, device, model.nbytes
