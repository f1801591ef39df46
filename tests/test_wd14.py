"""The WD14 tagger domain (services/tagger/wd14.py) against a step-by-step reference
implementation of the SmilingWolf taggers, on the tiny model in the real WD14 layout."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from services.tagger import wd14
from tests.wd14_reference import reference_pixels, reference_tags
from tinymodels import wd14 as tiny_wd14

REPO_ROOT = Path(__file__).resolve().parents[1]
KAOMOJI_NAMES = {">_<", "^_^"}  # the kaomoji in the tiny model's tag list


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_wd14.build_wd14(tmp_path_factory.mktemp("models") / "wd14")


@pytest.fixture(scope="module")
def model(model_dir) -> wd14.WD14Model:
    return wd14.WD14Model.load(model_dir / "model.onnx", model_dir / "selected_tags.csv")


def smooth_picture(size, seed, mode="RGB") -> Image.Image:
    """A smooth random picture; in RGBA its alpha varies from transparent to opaque."""
    rng = np.random.default_rng(seed)
    width, height = size
    cells = rng.integers(0, 256, size=(max(2, height // 40), max(2, width // 40), 4), dtype=np.uint8)
    picture = Image.fromarray(cells, "RGBA").resize(size, Image.BICUBIC)
    return picture if mode == "RGBA" else picture.convert(mode)


def saved(image: Image.Image, path: Path, **save_options) -> Image.Image:
    """The image as the service sees it: written to a file and decoded again."""
    image.save(path, **save_options)
    return Image.open(path)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, Image.Image]:
    folder = tmp_path_factory.mktemp("pictures")
    palette = smooth_picture((260, 300), seed=6).convert("P", palette=Image.ADAPTIVE, colors=32)
    rgb = smooth_picture((300, 260), seed=7)
    most_common_colour = max(rgb.getcolors(1 << 24))[1]
    return {
        "transparent": saved(smooth_picture((500, 420), seed=1, mode="RGBA"), folder / "transparent.png"),
        "tall": saved(smooth_picture((300, 700), seed=2), folder / "tall.png"),
        "wide": saved(smooth_picture((700, 300), seed=3), folder / "wide.png"),
        "smaller_than_input": saved(smooth_picture((200, 150), seed=4), folder / "small.png"),
        "larger_than_input": saved(smooth_picture((900, 800), seed=5), folder / "large.jpg"),
        "exactly_input_size": saved(smooth_picture((448, 448), seed=8), folder / "exact.png"),
        "palette_with_transparency": saved(palette, folder / "palette.png", transparency=0),
        "grayscale": saved(smooth_picture((320, 240), seed=9, mode="L"), folder / "gray.png"),
        "grayscale_with_alpha": saved(smooth_picture((240, 320), seed=10, mode="LA"), folder / "gray_alpha.png"),
        # An RGB PNG with a tRNS chunk: one colour is transparent.
        "rgb_with_colour_key": saved(rgb, folder / "colour_key.png", transparency=most_common_colour),
    }




def test_scores_match_the_reference_for_every_kind_of_picture(model, model_dir, pictures):
    batch = model.preprocess_many(pictures.values(), workers=3)
    probs = model.predict(batch)
    for (label, picture), picture_probs in zip(pictures.items(), probs, strict=True):
        expected_rating, expected_tags = reference_tags(model_dir, picture)
        result = model.score(picture_probs, general_threshold=0.35, character_threshold=0.85)
        assert list(result.rating) == list(expected_rating), label
        assert list(result.tags) == list(expected_tags), label
        for name, score in {**expected_rating, **expected_tags}.items():
            assert {**result.rating, **result.tags}[name] == pytest.approx(score, abs=1e-5), (label, name)


def test_preprocessing_gives_the_reference_pixels(model, pictures):
    for label, picture in pictures.items():
        expected = reference_pixels(picture, model.input_size)
        assert model.preprocess(picture).dtype == np.float32
        assert np.array_equal(model.preprocess(picture), expected), label


def test_preprocess_many_equals_one_at_a_time(model, pictures):
    one_by_one = np.stack([model.preprocess(p) for p in pictures.values()])
    for workers in (1, 4):
        assert np.array_equal(model.preprocess_many(iter(pictures.values()), workers=workers), one_by_one)
    assert model.preprocess_many([], workers=2).shape == (0, model.input_size, model.input_size, 3)


def test_transparent_areas_count_as_white(model):
    clear = Image.new("RGBA", (300, 200), (0, 0, 0, 0))
    assert np.all(model.preprocess(clear) == 255)


def test_tiny_model_tags_pictures_differently(model, pictures):
    results = [model.score(p, 0.35, 0.85) for p in model.predict(model.preprocess_many(pictures.values(), 2))]
    for result in results:
        assert 0 < len(result.tags) < model.n_tags - 4, "some tags pass 0.35 and some do not"
    assert len({tuple(result.tags) for result in results}) > len(results) // 2


def test_tiny_model_has_the_wd14_layout(model_dir, model):
    graph = onnx.load(model_dir / "model.onnx").graph
    (image_input,), (output,) = graph.input, graph.output
    assert image_input.name == "input_1:0" and output.name == "predictions_sigmoid"
    dims = [d.dim_value or d.dim_param for d in image_input.type.tensor_type.shape.dim]
    assert dims[1:] == [448, 448, 3] and isinstance(dims[0], str)
    with open(model_dir / "selected_tags.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["tag_id", "name", "category", "count"]
    names_by_category = {c: [r["name"] for r in rows if r["category"] == c] for c in ("9", "0", "4")}
    assert names_by_category["9"] == ["general", "sensitive", "questionable", "explicit"]
    assert KAOMOJI_NAMES <= set(names_by_category["0"]) and "long_hair" in names_by_category["0"]
    assert "hatsune_miku" in names_by_category["4"]
    assert len(rows) == model.n_tags and model.input_size == 448
    assert model.providers == ["CPUExecutionProvider"] or model.providers[0] == "CUDAExecutionProvider"
    assert model.nbytes == (model_dir / "model.onnx").stat().st_size


def test_smaller_input_size_is_read_from_the_model(tmp_path, pictures):
    folder = tiny_wd14.build_wd14(tmp_path / "wd14-224", input_size=224, seed=3)
    small = wd14.WD14Model.load(folder / "model.onnx", folder / "selected_tags.csv")
    assert small.input_size == 224
    picture = pictures["tall"]
    probs = small.predict(small.preprocess(picture)[None])[0]
    expected_rating, _ = reference_tags(folder, picture)
    assert small.score(probs, 0.35, 0.85).rating == pytest.approx(expected_rating, abs=1e-5)


def test_large_batches_are_split_with_the_same_scores(model, pictures, monkeypatch):
    batch = model.preprocess_many(list(pictures.values()) * 2, workers=2)
    whole = model.predict(batch)
    monkeypatch.setattr(wd14, "MAX_BATCH", 3)
    assert model.predict(batch).shape == (len(batch), model.n_tags)
    np.testing.assert_allclose(model.predict(batch), whole, atol=1e-5)
    single = np.concatenate([model.predict(batch[i : i + 1]) for i in range(len(batch))])
    np.testing.assert_allclose(single, whole, atol=1e-5)
    assert model.predict(batch[:0]).shape == (0, model.n_tags)


def probs_for(model: wd14.WD14Model, model_dir: Path, scores: dict[str, float]) -> np.ndarray:
    """A probability vector with the given raw tag names set and every other tag at 0.01."""
    with open(model_dir / "selected_tags.csv", newline="") as f:
        names = [row["name"] for row in csv.DictReader(f)]
    probs = np.full(len(names), 0.01, np.float32)
    for name, score in scores.items():
        probs[names.index(name)] = score
    return probs


def test_thresholds_apply_per_category(model, model_dir):
    probs = probs_for(model, model_dir, {
        "long_hair": 0.5, "smile": 0.49, "hatsune_miku": 0.6, "pikachu": 0.9, "explicit": 0.7,
    })
    strict_characters = model.score(probs, general_threshold=0.5, character_threshold=0.85)
    assert list(strict_characters.tags) == ["pikachu", "long hair"]
    loose_characters = model.score(probs, general_threshold=0.95, character_threshold=0.6)
    assert list(loose_characters.tags) == ["pikachu", "hatsune miku"]
    # Ratings are all reported, whatever the thresholds.
    assert loose_characters.rating == pytest.approx(
        {"general": 0.01, "sensitive": 0.01, "questionable": 0.01, "explicit": 0.7})


def test_tag_names_keep_kaomoji_underscores_and_sort_by_confidence(model, model_dir):
    probs = probs_for(model, model_dir, {
        ">_<": 0.8, "^_^": 0.4, "looking_at_viewer": 0.95, "saber_(fate)": 0.99, "1girl": 0.6,
    })
    result = model.score(probs, general_threshold=0.35, character_threshold=0.85)
    assert list(result.tags) == ["saber (fate)", "looking at viewer", ">_<", "1girl", "^_^"]
    assert list(result.tags.values()) == sorted(result.tags.values(), reverse=True)
    assert wd14.display_name("(o)_(o)") == "(o)_(o)" and wd14.display_name("0_0") == "0_0"


def test_merge_max_keeps_each_tags_highest_frame():
    frames = np.array([[0.1, 0.9, 0.3], [0.5, 0.2, 0.3], [0.4, 0.1, 0.35]], np.float32)
    np.testing.assert_array_equal(wd14.merge_max(frames), np.array([0.5, 0.9, 0.35], np.float32))


def test_locate_model_in_a_folder_or_by_its_onnx_file(model_dir):
    expected = (model_dir / "model.onnx", model_dir / "selected_tags.csv")
    assert wd14.locate_model(str(model_dir)) == expected
    assert wd14.locate_model(str(model_dir / "model.onnx")) == expected


def test_locate_model_names_what_is_missing(model_dir, tmp_path):
    lone_onnx = tmp_path / "lone"
    lone_onnx.mkdir()
    shutil.copy(model_dir / "model.onnx", lone_onnx)
    with pytest.raises(FileNotFoundError, match=re.escape(f"selected_tags.csv not found in {lone_onnx}")):
        wd14.locate_model(str(lone_onnx))
    with pytest.raises(FileNotFoundError, match=re.escape(f"selected_tags.csv not found in {lone_onnx}")):
        wd14.locate_model(str(lone_onnx / "model.onnx"))
    with pytest.raises(FileNotFoundError,
                       match=re.escape(f"model.onnx and selected_tags.csv not found in {tmp_path}")):
        wd14.locate_model(str(tmp_path / "model.onnx"))
    with pytest.raises(FileNotFoundError, match=re.escape(f"model folder {tmp_path / 'nowhere'} does not exist")):
        wd14.locate_model(str(tmp_path / "nowhere"))


def test_hub_model_offline_and_not_cached_is_a_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "PYTHONPATH": str(REPO_ROOT)}
    script = (
        "from services.tagger import wd14\n"
        "try:\n    wd14.locate_model(None)\n"
        "except FileNotFoundError as error:\n    print(error)"
    )
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    message = run.stdout
    assert wd14.DEFAULT_MODEL in message and "HF_HUB_OFFLINE" in message
    assert str(tmp_path / "hf" / "hub") in message, "names the cache it looked in"


def write_tags(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_tag_list_must_fit_the_model(model_dir, tmp_path):
    onnx_path = model_dir / "model.onnx"
    with open(model_dir / "selected_tags.csv", newline="") as f:
        rows = list(csv.reader(f))
    header, tags = rows[0], rows[1:]

    short = write_tags(tmp_path / "short.csv", header, tags[:-1])
    with pytest.raises(ValueError, match=f"lists {len(tags) - 1} tags but model.onnx scores {len(tags)}"):
        wd14.WD14Model.load(onnx_path, short)

    no_category = write_tags(tmp_path / "no_category.csv", ["tag_id", "name", "count"],
                             [[t[0], t[1], t[3]] for t in tags])
    with pytest.raises(ValueError, match="lacks the column.* category"):
        wd14.WD14Model.load(onnx_path, no_category)

    unknown_category = write_tags(tmp_path / "unknown.csv", header, [tags[0], [1, "artist_name", 1, 5], *tags[2:]])
    with pytest.raises(ValueError, match=r"line 3 .*'artist_name'.* 9 \(rating\), 0 \(general\), 4 \(character\)"):
        wd14.WD14Model.load(onnx_path, unknown_category)

    empty = write_tags(tmp_path / "empty.csv", header, [])
    with pytest.raises(ValueError, match="lists no tags"):
        wd14.WD14Model.load(onnx_path, empty)

    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="is not a loadable ONNX model"):
        wd14.WD14Model.load(not_onnx, model_dir / "selected_tags.csv")


def test_cli_builds_a_loadable_model(tmp_path):
    out = tmp_path / "cli-model"
    run = subprocess.run([sys.executable, "-m", "tinymodels", "wd14", "--out", str(out)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    loaded = wd14.WD14Model.load(*wd14.locate_model(str(out)))
    assert loaded.input_size == 448 and loaded.n_tags == 50
