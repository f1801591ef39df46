"""The trainer's image-folder dataset (services/trainer/dataset.py) on small generated folders:
buckets, batching, crops, flips, masks and caption augmentation."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from services.trainer.dataset import TrainingDataset, bucket_for, inject_trigger


@dataclass(frozen=True)
class DatasetConfig:
    """The ai-toolkit dataset keys with ai-toolkit's defaults."""

    folder_path: str
    mask_path: str | None = None
    mask_min_value: float = 0.0
    default_caption: str = ""
    caption_ext: str = "txt"
    caption_dropout_rate: float = 0.05
    shuffle_tokens: bool = False
    token_dropout_rate: float = 0.0
    keep_tokens: int = 0
    is_reg: bool = False
    network_weight: float = 1.0
    bucket_step_size: int = 64
    bucket_no_upscale: bool = False
    random_crop: bool = False
    center_crop: bool = False
    resolution: tuple[int, ...] = (512,)
    flip_x: bool = False
    flip_y: bool = False
    num_repeats: int = 1
    cache_latents: bool = False
    cache_latents_to_disk: bool = False


def smooth_image(size: tuple[int, int], seed: int) -> Image.Image:
    """A smooth random picture: asymmetric, so flips and crops change it."""
    rng = np.random.default_rng(seed)
    width, height = size
    small = rng.integers(0, 256, size=(max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize((width, height), Image.Resampling.BICUBIC)


IMAGES = {  # name: (size, caption or None for no caption file)
    "a_square.png": ((96, 96), "a red cube, studio light"),
    "b_wide.jpg": ((160, 80), "[trigger] on a beach, sunset"),
    "c_tall.png": ((72, 140), None),
    "d_small.webp": ((40, 40), "tiny, icon"),
    "e_landscape.bmp": ((120, 90), "   "),
}


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    for index, (name, (size, caption)) in enumerate(IMAGES.items()):
        smooth_image(size, seed=index).save(root / name)
        if caption is not None:
            (root / name).with_suffix(".txt").write_text(caption + "\n")
    (root / "notes.md").write_text("not an image")
    return root


def make(folder: Path, trigger: str | None = None, seed: int = 0, **options) -> TrainingDataset:
    options.setdefault("resolution", (64,))
    options.setdefault("bucket_step_size", 16)
    return TrainingDataset([DatasetConfig(folder_path=str(folder), **options)], trigger_word=trigger, seed=seed)


def aspect_error(bucket: tuple[int, int], size: tuple[int, int]) -> float:
    return abs(math.log(bucket[0] / bucket[1]) - math.log(size[0] / size[1]))


# ---- buckets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1024, 1024), (1920, 1080), (1080, 1920), (700, 500), (3000, 1000), (333, 777)])
@pytest.mark.parametrize(("resolution", "step"), [(512, 64), (1024, 64), (768, 32), (300, 8)])
def test_bucket_is_stepped_within_area_and_close_in_aspect(size, resolution, step):
    width, height = bucket_for(*size, resolution, step)
    assert width % step == 0 and height % step == 0
    assert width * height <= resolution * resolution
    # Rounding each side of the ideal rectangle down to a step changes the aspect by at most this.
    assert aspect_error((width, height), size) <= -math.log(1 - step / min(width, height)) + 1e-9
    # It uses most of the area the resolution allows.
    assert width * height >= 0.6 * resolution * resolution


def test_bucket_of_a_square_image_is_the_resolution_square():
    assert bucket_for(1000, 1000, 512, 64) == (512, 512)
    assert bucket_for(300, 300, 1024, 64) == (1024, 1024)


def test_bucket_prefers_the_closest_aspect_among_full_size_buckets():
    width, height = bucket_for(700, 500, 512, 64)
    rivals = [(w, h) for w in range(64, 4097, 64) for h in range(64, 4097, 64) if width * height <= w * h <= 512 * 512]
    assert all(aspect_error((width, height), (700, 500)) <= aspect_error(r, (700, 500)) for r in rivals)


@pytest.mark.parametrize("size", [(100, 60), (60, 100), (200, 200), (130, 70), (2000, 900)])
def test_bucket_no_upscale_never_enlarges(size):
    width, height = bucket_for(*size, 512, 16, no_upscale=True)
    assert width <= size[0] and height <= size[1]
    assert width % 16 == 0 and height % 16 == 0 and width * height <= 512 * 512
    if size[0] * size[1] >= 512 * 512:
        assert (width, height) == bucket_for(*size, 512, 16)


def test_bucket_center_crop_is_square():
    assert bucket_for(300, 100, 64, 16, square=True) == (64, 64)
    assert bucket_for(40, 100, 64, 16, square=True, no_upscale=True) == (32, 32)


# ---- items and batches -----------------------------------------------------------------------


def test_items_per_image_and_resolution(folder):
    dataset = make(folder, resolution=(64, 96))
    assert dataset.image_count == len(IMAGES)
    assert len(dataset) == 2 * len(IMAGES)
    for item in dataset.items:
        width, height = item.bucket
        assert width % 16 == 0 and height % 16 == 0
    per_image = {}
    for item in dataset.items:
        per_image.setdefault(item.image_path.name, []).append(item.bucket)
    assert set(per_image) == set(IMAGES)
    for buckets in per_image.values():
        small, large = buckets
        assert small[0] * small[1] <= 64 * 64 < large[0] * large[1] <= 96 * 96
    assert per_image["a_square.png"] == [(64, 64), (96, 96)]


def test_bucket_no_upscale_in_the_dataset(folder):
    dataset = make(folder, resolution=(128,), bucket_no_upscale=True)
    for item in dataset.items:
        (width, height), _ = IMAGES[item.image_path.name]
        assert item.bucket[0] <= width and item.bucket[1] <= height
    small = next(item for item in dataset.items if item.image_path.name == "d_small.webp")
    assert small.bucket == (32, 32)
    sample = dataset.load(dataset.items.index(small), random.Random(0))
    assert sample.pixels.shape == (3, 32, 32)


def test_num_repeats_repeats_items(folder):
    dataset = make(folder, num_repeats=3, flip_x=True)
    assert len(dataset) == 3 * 2 * len(IMAGES)


def test_batches_share_a_bucket_and_cover_every_item_each_epoch(folder):
    dataset = make(folder, resolution=(64, 96), flip_x=True)
    stream = dataset.batches(3, random.Random(5))
    for _epoch in range(3):
        seen: list[int] = []
        while len(seen) < len(dataset):
            batch = next(stream)
            assert 1 <= len(batch) <= 3
            assert len({dataset.items[index].bucket for index in batch}) == 1
            seen.extend(batch)
        assert sorted(seen) == list(range(len(dataset)))


def test_describe_counts_images_items_and_buckets(folder):
    dataset = make(folder, flip_x=True)
    counts = dict(dataset.bucket_counts())
    assert sum(counts.values()) == len(dataset)
    line = dataset.describe()
    assert line.startswith(f"{len(IMAGES)} images → {2 * len(IMAGES)} items in {len(counts)} buckets (")
    assert "64x64: 4" in line  # the square and the small image, each with its flip


# ---- pixels ----------------------------------------------------------------------------------


def test_load_gives_bucket_sized_pixels_in_range(folder):
    dataset = make(folder)
    rng = random.Random(0)
    for index, item in enumerate(dataset.items):
        sample = dataset.load(index, rng)
        width, height = item.bucket
        assert sample.pixels.dtype == torch.float32
        assert sample.pixels.shape == (3, height, width)
        assert -1.0 <= sample.pixels.min() and sample.pixels.max() <= 1.0
        assert sample.pixels.std() > 0.05
        assert sample.target_size == (height, width)
        image_size, _ = IMAGES[item.image_path.name]
        assert sample.original_size == (image_size[1], image_size[0])
        assert sample.mask is None


def test_load_applies_exif_orientation(tmp_path):
    root = tmp_path / "exif"
    root.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated to portrait
    smooth_image((128, 64), 0).save(root / "rotated.jpg", exif=exif.tobytes())
    dataset = make(root)
    assert dataset.items[0].bucket[0] < dataset.items[0].bucket[1]
    assert dataset.load(0, random.Random(0)).original_size == (128, 64)


def test_flip_x_doubles_items_and_mirrors_pixels(folder):
    plain = make(folder)
    flipped = make(folder, flip_x=True)
    assert len(flipped) == 2 * len(plain)
    rng = random.Random(0)
    for index, item in enumerate(flipped.items):
        if not item.flip_x:
            continue
        twin = flipped.items.index(replace(item, flip_x=False))
        mirrored = flipped.load(index, rng).pixels
        assert torch.equal(mirrored, torch.flip(flipped.load(twin, rng).pixels, dims=[2]))


def test_flip_x_and_flip_y_give_four_variants(folder):
    dataset = make(folder, flip_x=True, flip_y=True)
    assert len(dataset) == 4 * len(IMAGES)
    variants = {(item.flip_x, item.flip_y) for item in dataset.items if item.image_path.name == "b_wide.jpg"}
    assert variants == {(False, False), (True, False), (False, True), (True, True)}
    index = next(i for i, item in enumerate(dataset.items) if item.flip_x and item.flip_y)
    plain = dataset.items.index(replace(dataset.items[index], flip_x=False, flip_y=False))
    rng = random.Random(0)
    expected = torch.flip(dataset.load(plain, rng).pixels, dims=[1, 2])
    assert torch.equal(dataset.load(index, rng).pixels, expected)


def test_random_crop_varies_and_is_not_cacheable(folder):
    dataset = make(folder, random_crop=True)
    index = next(i for i, item in enumerate(dataset.items) if item.image_path.name == "b_wide.jpg")
    assert not dataset.cacheable(index)
    rng = random.Random(1)
    samples = [dataset.load(index, rng) for _ in range(8)]
    assert len({sample.crop_top_left for sample in samples}) > 1
    assert any(not torch.equal(samples[0].pixels, other.pixels) for other in samples[1:])
    for sample in samples:
        assert sample.pixels.shape[1:] == sample.target_size


def test_centre_crop_is_deterministic_and_cacheable(folder):
    dataset = make(folder)
    index = next(i for i, item in enumerate(dataset.items) if item.image_path.name == "b_wide.jpg")
    assert all(dataset.cacheable(i) for i in range(len(dataset)))
    first = dataset.load(index, random.Random(1))
    second = dataset.load(index, random.Random(2))
    assert torch.equal(first.pixels, second.pixels)
    assert first.crop_top_left == second.crop_top_left
    assert first.crop_top_left[0] == 0 and first.crop_top_left[1] > 0  # a wide image is cropped at the sides


def test_center_crop_option_gives_square_samples(folder):
    dataset = make(folder, center_crop=True)
    assert {item.bucket for item in dataset.items} == {(64, 64)}
    assert dataset.load(0, random.Random(0)).pixels.shape == (3, 64, 64)


# ---- masks -----------------------------------------------------------------------------------


@pytest.fixture
def masks(folder) -> Path:
    """Masks for two images: the left half black and the right half white."""
    root = folder.parent / "masks"
    root.mkdir()
    for name in ("b_wide.jpg", "a_square.png"):
        (width, height), _ = IMAGES[name]
        array = np.zeros((height, width), dtype=np.uint8)
        array[:, width // 2 :] = 255
        Image.fromarray(array, "L").save(root / (Path(name).stem + ".png"))
    return root


def test_masks_follow_geometry_and_min_value(folder, masks):
    dataset = make(folder, mask_path=str(masks), mask_min_value=0.25, flip_x=True)
    rng = random.Random(0)
    for index, item in enumerate(dataset.items):
        sample = dataset.load(index, rng)
        width, height = item.bucket
        assert sample.mask is not None and sample.mask.shape == (1, height, width)
        assert sample.mask.dtype == torch.float32
        assert 0.25 - 1e-6 <= sample.mask.min() and sample.mask.max() <= 1.0 + 1e-6
        if item.mask_path is None:
            assert torch.equal(sample.mask, torch.ones(1, height, width))
            continue
        left, right = sample.mask[..., : width // 4], sample.mask[..., -width // 4 :]
        dark, light = (right, left) if item.flip_x else (left, right)
        assert torch.allclose(dark, torch.full_like(dark, 0.25), atol=1e-3)
        assert torch.allclose(light, torch.ones_like(light), atol=1e-3)
    wide = [i for i, item in enumerate(dataset.items) if item.image_path.name == "b_wide.jpg"]
    assert len(wide) == 2
    unflipped, flipped = (dataset.load(i, rng).mask for i in wide)
    assert torch.equal(flipped, torch.flip(unflipped, dims=[2]))


def test_mask_min_value_zero_keeps_black(folder, masks):
    dataset = make(folder, mask_path=str(masks))
    index = next(i for i, item in enumerate(dataset.items) if item.image_path.name == "a_square.png")
    mask = dataset.load(index, random.Random(0)).mask
    assert mask.min() == 0.0 and mask.max() == 1.0


# ---- captions --------------------------------------------------------------------------------


def raw_caption(dataset: TrainingDataset, name: str) -> str:
    return next(item.caption for item in dataset.items if item.image_path.name == name)


def test_captions_come_from_files_or_the_default(folder):
    dataset = make(folder, default_caption="a photo")
    assert raw_caption(dataset, "a_square.png") == "a red cube, studio light"
    assert raw_caption(dataset, "c_tall.png") == "a photo"  # no caption file
    assert raw_caption(dataset, "e_landscape.bmp") == "a photo"  # a blank caption file


def test_trigger_is_substituted_or_prepended(folder):
    dataset = make(folder, trigger="ohwx", caption_dropout_rate=0.0)
    rng = random.Random(0)
    captions = {item.image_path.name: dataset.caption(i, rng) for i, item in enumerate(dataset.items)}
    assert captions["b_wide.jpg"] == "ohwx on a beach, sunset"
    assert captions["a_square.png"] == "ohwx, a red cube, studio light"
    assert captions["c_tall.png"] == "ohwx"


def test_without_a_trigger_the_placeholder_vanishes(folder):
    dataset = make(folder, caption_dropout_rate=0.0)
    index = next(i for i, item in enumerate(dataset.items) if item.image_path.name == "b_wide.jpg")
    assert dataset.caption(index, random.Random(0)) == "on a beach, sunset"


def test_regularisation_captions_get_no_trigger_prepended(folder):
    dataset = make(folder, trigger="ohwx", caption_dropout_rate=0.0, is_reg=True)
    rng = random.Random(0)
    captions = {item.image_path.name: dataset.caption(i, rng) for i, item in enumerate(dataset.items)}
    assert captions["a_square.png"] == "a red cube, studio light"
    assert captions["b_wide.jpg"] == "ohwx on a beach, sunset"  # an explicit [trigger] is still filled in


def test_whole_caption_without_rng_is_deterministic(folder):
    dataset = make(folder, trigger="ohwx", caption_dropout_rate=0.9, shuffle_tokens=True, token_dropout_rate=0.9)
    index = next(i for i, item in enumerate(dataset.items) if item.image_path.name == "a_square.png")
    assert {dataset.caption(index, None) for _ in range(20)} == {"ohwx, a red cube, studio light"}


def test_sample_prompts_get_placeholders_filled_but_no_trigger_added(folder):
    assert make(folder, trigger="ohwx").with_trigger("a photo of [trigger], forest") == "a photo of ohwx, forest"
    assert make(folder, trigger="ohwx").with_trigger("a forest") == "a forest"
    assert make(folder).with_trigger("[trigger], a forest") == "a forest"


def test_inject_trigger():
    assert inject_trigger("[name] smiling, [trigger]", "sks") == "sks smiling, sks"
    assert inject_trigger("", "sks") == "sks"
    assert inject_trigger("a dog", "sks", add_if_missing=False) == "a dog"
    assert inject_trigger("[trigger], a dog", None) == "a dog"
    assert inject_trigger("a dog,cat ", None) == "a dog,cat"


def test_caption_dropout_rate(folder):
    dataset = make(folder, trigger="ohwx", caption_dropout_rate=0.3)
    rng = random.Random(42)
    draws = 4000
    dropped = sum(dataset.caption(index % len(dataset), rng) == "" for index in range(draws))
    assert abs(dropped / draws - 0.3) < 0.03


def test_shuffle_keeps_the_trigger_first_and_keep_tokens_in_place(tmp_path):
    root = tmp_path / "shuffle"
    root.mkdir()
    smooth_image((64, 64), 0).save(root / "x.png")
    (root / "x.txt").write_text("a man, red shirt, smiling, outdoors, daylight, [trigger] style, bokeh")
    dataset = make(root, trigger="ohwx", caption_dropout_rate=0.0, shuffle_tokens=True, keep_tokens=1)
    rng = random.Random(3)
    orders = set()
    for _ in range(50):
        tokens = dataset.caption(0, rng).split(", ")
        assert tokens[:2] == ["ohwx style", "a man"]
        assert sorted(tokens[2:]) == sorted(["red shirt", "smiling", "outdoors", "daylight", "bokeh"])
        orders.add(tuple(tokens))
    assert len(orders) > 10


def test_shuffle_keeps_a_prepended_trigger_first(folder):
    dataset = make(folder, trigger="ohwx", caption_dropout_rate=0.0, shuffle_tokens=True)
    index = next(i for i, item in enumerate(dataset.items) if item.image_path.name == "a_square.png")
    rng = random.Random(0)
    captions = {dataset.caption(index, rng) for _ in range(30)}
    assert captions == {"ohwx, a red cube, studio light", "ohwx, studio light, a red cube"}


def test_token_dropout_never_drops_the_trigger(tmp_path):
    root = tmp_path / "dropout"
    root.mkdir()
    smooth_image((64, 64), 0).save(root / "x.png")
    tokens = [f"tag{n}" for n in range(10)]
    (root / "x.txt").write_text(", ".join(tokens))
    dataset = make(root, trigger="ohwx", caption_dropout_rate=0.0, token_dropout_rate=0.5, keep_tokens=2)
    rng = random.Random(7)
    kept_counts = []
    for _ in range(300):
        caption = dataset.caption(0, rng).split(", ")
        assert caption[:3] == ["ohwx", "tag0", "tag1"]
        assert caption[3:] == [t for t in tokens[2:] if t in caption]  # order kept without shuffle_tokens
        kept_counts.append(len(caption) - 3)
    assert abs(sum(kept_counts) / len(kept_counts) - 4.0) < 0.5  # half of the 8 droppable tokens
    all_dropped = make(root, trigger="ohwx", caption_dropout_rate=0.0, token_dropout_rate=1.0)
    assert all_dropped.caption(0, rng) == "ohwx"


# ---- robustness and reproducibility ----------------------------------------------------------


def test_unreadable_images_are_skipped(folder):
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (folder / "truncated.jpg").write_bytes((folder / "b_wide.jpg").read_bytes()[:200])
    dataset = make(folder)
    assert {path.name for path, _ in dataset.skipped} == {"broken.png", "truncated.jpg"}
    assert all(reason.startswith("unreadable image") for _, reason in dataset.skipped)
    assert {item.image_path.name for item in dataset.items} == set(IMAGES)
    assert dataset.describe().endswith("; 2 unreadable files skipped")


def test_a_folder_without_images_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no images in"):
        make(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="no readable images"):
        make(tmp_path)


def test_several_datasets_keep_their_own_settings(folder, tmp_path):
    reg = tmp_path / "reg"
    reg.mkdir()
    smooth_image((64, 64), 9).save(reg / "r.png")
    configs = [
        DatasetConfig(folder_path=str(folder), resolution=(64,), bucket_step_size=16),
        DatasetConfig(folder_path=str(reg), resolution=(64,), bucket_step_size=16, is_reg=True, network_weight=0.5),
    ]
    dataset = TrainingDataset(configs, trigger_word="ohwx", seed=0)
    last = dataset.items[-1]
    assert (last.dataset_index, last.is_reg, last.network_weight) == (1, True, 0.5)
    assert dataset.items[0].dataset_index == 0 and not dataset.items[0].is_reg


def run_once(folder: Path, seed: int) -> tuple[list[list[int]], list[str], list[torch.Tensor]]:
    dataset = make(folder, trigger="ohwx", seed=seed, random_crop=True, flip_x=True, shuffle_tokens=True)
    rng = random.Random(seed)
    stream = dataset.batches(2, rng)
    batches = [next(stream) for _ in range(12)]
    captions = [dataset.caption(index, rng) for batch in batches for index in batch]
    pixels = [dataset.load(index, rng).pixels for index in batches[0]]
    return batches, captions, pixels


def test_same_seed_same_run(folder):
    first, second, other = run_once(folder, 11), run_once(folder, 11), run_once(folder, 12)
    assert first[0] == second[0] and first[1] == second[1]
    assert all(torch.equal(a, b) for a, b in zip(first[2], second[2], strict=True))
    assert first[0] != other[0]
