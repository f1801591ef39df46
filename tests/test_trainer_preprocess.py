"""Dataset preprocessing of training tasks: server paths, URLs and archives become a training
folder of transformed pictures with captions (kept, the trigger word, or the real captioner's
over gRPC with the tiny Florence-2); bad input is refused naming it, and a failed or
cancelled run leaves nothing behind."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from launcher.mesh import Mesh, Ports, free_port
from loramesh.v1 import captioner_pb2, captioner_pb2_grpc
from services.common.errors import FailedPrecondition, InvalidInput, Unavailable, Violations
from services.common.settings import MediaLimits, Settings
from services.trainer import preprocess as pre
from services.trainer.dataset import TrainingDataset
from services.trainer.intake import unpack_dataset
from services.trainer.transforms import apply_transforms, parse_transforms
from tests.conftest import write_image
from tests.test_trainer_dataset import DatasetConfig
from tinymodels import captioners as tiny_captioners

TRIGGER = "TOK"
NO_CANCEL = lambda: False  # noqa: E731


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("preprocess")


@pytest.fixture(scope="module")
def media(root) -> Path:
    folder = root / "media"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def settings(media) -> Settings:
    return Settings(media_roots=(media,), media=MediaLimits(allow_private_urls=True))


@pytest.fixture(scope="module")
def captioner(root, media):
    """A captioner service (and the NATS it publishes events on) with the tiny Florence-2 as
    its default, reading pictures from the media folder."""
    models = root / "models"
    florence2 = tiny_captioners.build_florence2(models / "florence2")
    env = {"LORAMESH_MEDIA_ROOTS": str(media), "LORAMESH_MODEL_ROOTS": str(models),
           "LORAMESH_FLORENCE2_MODEL": str(florence2), "LORAMESH_SHUTDOWN_GRACE_S": "1", "HF_HUB_OFFLINE": "1"}
    mesh = Mesh(Ports.free(), var_dir=root / "var", env=env, services=("captioner",)).start(timeout=120)
    yield f"127.0.0.1:{mesh.ports.services['captioner']}"
    mesh.stop()


class Reports:
    def __init__(self):
        self.seen: list[tuple[str, int, int]] = []

    async def __call__(self, stage: str, processed: int, total: int, message: str) -> None:
        assert message
        self.seen.append((stage, processed, total))

    def stages(self) -> list[str]:
        return list(dict.fromkeys(stage for stage, _, _ in self.seen))

    def of(self, stage: str) -> list[int]:
        return [processed for s, processed, _ in self.seen if s == stage]


def png_bytes(color, size=(120, 80), fmt="PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=fmt)
    return out.getvalue()


def zipped(entries: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return out.getvalue()


def plan(strategy="trigger_only", prompt=None) -> pre.CaptionPlan:
    return pre.CaptionPlan(strategy, prompt, TRIGGER)


def nothing_left(dest: Path) -> None:
    assert not dest.exists()
    assert not dest.with_name(dest.name + pre.STAGING_SUFFIX).exists()


# --- transforms ------------------------------------------------------------------------------

def parsed(raw):
    bad = Violations()
    transforms = parse_transforms(raw, bad)
    assert not bad, bad.items
    return transforms


def window_at(picture: Image.Image, window: Image.Image) -> tuple[int, int] | None:
    """Where `window` lies in `picture`, or None."""
    whole, part = np.asarray(picture), np.asarray(window)
    height, width = part.shape[:2]
    for y, x in zip(*np.nonzero((whole == part[0, 0]).all(axis=-1)), strict=True):
        if np.array_equal(whole[y:y + height, x:x + width], part):
            return int(x), int(y)
    return None


def test_each_transform_does_what_it_says_in_order(tmp_path):
    picture = Image.open(write_image(tmp_path / "p.png", (200, 100), seed=3)).convert("RGB")

    out, ext = apply_transforms(picture, parsed([{"type": "resize", "size": 64}]), 0)
    assert out.size == (128, 64) and ext == "png"
    out, _ = apply_transforms(picture, parsed([{"type": "resize", "width": 70, "height": 90}]), 0)
    assert out.size == (70, 90)
    out, _ = apply_transforms(picture, parsed([{"type": "center_crop", "size": 64}]), 0)
    assert out.tobytes() == picture.crop((68, 18, 132, 82)).tobytes()
    out, _ = apply_transforms(picture, parsed([{"type": "center_crop", "width": 300, "height": 64}]), 0)
    assert out.size == (200, 64)  # never wider than the picture

    # Random crops: a window of the picture, the same for the same seed and index.
    crop = parsed([{"type": "random_crop", "size": 64, "seed": 7}])
    windows = [apply_transforms(picture, crop, index)[0] for index in range(6)]
    places = [window_at(picture, window) for window in windows]
    assert None not in places and len(set(places)) > 1 and {w.size for w in windows} == {(64, 64)}
    assert places == [window_at(picture, apply_transforms(picture, crop, i)[0]) for i in range(6)]
    other_seed = parsed([{"type": "random_crop", "size": 64, "seed": 8}])
    assert [window_at(picture, apply_transforms(picture, other_seed, i)[0]) for i in range(6)] != places

    # Order matters: resize then crop keeps more of the picture than crop then resize.
    first = apply_transforms(picture, parsed([{"type": "resize", "size": 64}, {"type": "center_crop", "size": 64}]), 0)
    second = apply_transforms(picture, parsed([{"type": "center_crop", "size": 64}, {"type": "resize", "size": 64}]), 0)
    assert first[0].size == second[0].size == (64, 64) and first[0].tobytes() != second[0].tobytes()

    transparent = Image.new("RGBA", (80, 80), (255, 0, 0, 0))
    out, ext = apply_transforms(transparent, parsed([{"type": "convert", "format": "jpeg", "quality": 90}]), 0)
    assert ext == "jpg" and out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)
    assert apply_transforms(picture, parsed([{"type": "convert", "format": "webp"}]), 0)[1] == "webp"


def test_bad_transforms_are_refused_naming_each_key():
    bad = Violations()
    parse_transforms([
        {"type": "resize", "size": 32},
        {"type": "blur", "radius": 2},
        {"type": "center_crop", "size": 64, "width": 64},
        {"type": "random_crop", "width": 128, "colour": "red"},
        {"type": "convert", "format": "gif"},
        {"type": "convert", "format": "png", "quality": 80},
        {"type": "resize", "width": "wide", "height": 64.5},
        "resize",
        {"type": "random_crop", "size": 64, "seed": -1},
    ], bad)
    named = {name: text for name, text in bad.items}
    assert set(named) == {
        "preprocessing_transforms[0].size", "preprocessing_transforms[1].type", "preprocessing_transforms[2].size",
        "preprocessing_transforms[3].colour", "preprocessing_transforms[4].format",
        "preprocessing_transforms[5].quality", "preprocessing_transforms[6].width",
        "preprocessing_transforms[6].height", "preprocessing_transforms[7]", "preprocessing_transforms[8].seed"}
    assert "between 64 and 4096" in named["preprocessing_transforms[0].size"]
    assert "resize, center_crop, random_crop, convert" in named["preprocessing_transforms[1].type"]
    assert "allowed: size, width, height, seed" in named["preprocessing_transforms[3].colour"]
    assert "png, jpeg, webp" in named["preprocessing_transforms[4].format"]
    bad = Violations()
    parse_transforms([{"type": "resize", "size": 64}] * 17, bad)
    assert bad.items == [("preprocessing_transforms", "at most 16 transforms are allowed (got 17)")]
    bad = Violations()
    parse_transforms([{"type": "center_crop", "width": 64}], bad)
    assert [name for name, _ in bad.items] == ["preprocessing_transforms[0].height"]


# --- request checks --------------------------------------------------------------------------

def test_check_sources_names_each_bad_entry(media, settings, tmp_path):
    folder = media / "check"
    write_image(folder / "a.png", (64, 64))
    write_image(folder / "pictures" / "b.jpg", (64, 64))
    (folder / "empty").mkdir()
    (folder / "notes.txt").write_text("text")
    outside = write_image(tmp_path / "outside.png", (64, 64))

    bad = Violations()
    pre.check_sources([str(folder / "a.png"), str(folder / "pictures"), "http://example.com/x.png"],
                      settings, bad)
    assert not bad, bad.items

    strict = Settings(media_roots=(media,), media=MediaLimits(allow_private_urls=False))
    bad = Violations()
    pre.check_sources(["ftp://example.com/x.png", "http://127.0.0.1:9/x.png", str(outside),
                       str(folder / "missing.png"), str(folder / "empty"), str(folder / "notes.txt"),
                       str(folder / ".." / "check" / "a.png"), str(folder / "a.png")], strict, bad)
    named = dict(bad.items)
    assert sorted(named) == [f"source_images[{i}]" for i in range(7)]
    assert "http:// or https://" in named["source_images[0]"]
    assert "private or loopback" in named["source_images[1]"]
    assert "outside the allowed roots" in named["source_images[2]"]
    assert "no such file or folder" in named["source_images[3]"]
    assert "holds no pictures" in named["source_images[4]"]
    assert "must be a picture" in named["source_images[5]"]
    assert "'..'" in named["source_images[6]"]

    for sources, text in (([], "at least one"), ([str(folder / "a.png")] * 1001, "at most 1000 entries")):
        bad = Violations()
        pre.check_sources(sources, strict, bad)
        assert len(bad.items) == 1 and bad.items[0][0] == "source_images" and text in bad.items[0][1]


def test_check_captioning_defaults_and_refusals():
    bad = Violations()
    assert pre.check_captioning(None, None, bad) == ("trigger_only", None)
    assert pre.check_captioning("florence2", "<CAPTION>", bad) == ("florence2", "<CAPTION>")
    assert pre.check_captioning("florence2", None, bad) == ("florence2", None)
    assert pre.check_captioning("joycaption", "Describe {trigger}.", bad) == ("joycaption", "Describe {trigger}.")
    assert pre.check_captioning("joycaption", None, bad) == ("joycaption", pre.MODE_PROMPTS["general"])
    assert not bad, bad.items
    assert "{trigger}" in pre.MODE_PROMPTS["character"] and "{trigger}" in pre.MODE_PROMPTS["product"]
    assert set(pre.MODE_PROMPTS) == {"general", "character", "style", "product"}

    for strategy, prompt, field, text in (
        ("blip", None, "preprocessing_captioning_strategy", "trigger_only, florence2, joycaption"),
        ("florence2", "describe it", "preprocessing_captioning_prompt", "<DETAILED_CAPTION>"),
        ("joycaption", "x" * 2001, "preprocessing_captioning_prompt", "at most 2000 characters"),
        ("joycaption", 5, "preprocessing_captioning_prompt", "must be a string"),
    ):
        bad = Violations()
        pre.check_captioning(strategy, prompt, bad)
        assert len(bad.items) == 1 and bad.items[0][0] == field and text in bad.items[0][1], bad.items


# --- preprocessing ---------------------------------------------------------------------------

async def test_server_paths_and_urls_become_a_dataset(media, settings, media_server, media_dir):
    folder = media / "paths"
    write_image(folder / "set" / "b.png", (200, 120), seed=1)
    write_image(folder / "set" / "a.jpg", (150, 150), seed=2)
    (folder / "set" / "a.txt").write_text("TOK my own words\n")
    (folder / "set" / ".hidden.png").write_bytes(b"not looked at")
    single = write_image(folder / "single.webp", (90, 160), seed=3)
    web = write_image(media_dir / "preprocess-web" / "remote.png", (100, 100), seed=4)
    url = f"{media_server}/{web.relative_to(media_dir)}"
    transforms = parsed([{"type": "resize", "size": 64}, {"type": "center_crop", "size": 64}])
    dest = media / "tasks" / "t1" / "dataset"
    reports = Reports()

    result = await pre.preprocess_sources([str(folder / "set"), str(single), url], dest, transforms, plan(), None,
                                          settings, reports, NO_CANCEL)

    assert result == pre.PreprocessResult(dest, 4, 1, 0, "trigger_only")
    assert sorted(p.name for p in dest.iterdir()) == [f"{i:04d}.{ext}" for i in range(4) for ext in ("png", "txt")]
    assert [Image.open(dest / f"{i:04d}.png").size for i in range(4)] == [(64, 64)] * 4
    # Folder pictures by name (a.jpg, b.png), then the file, then the URL.
    expected = Image.open(folder / "set" / "a.jpg").convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)
    assert Image.open(dest / "0000.png").convert("RGB").tobytes() == expected.tobytes()
    assert [(dest / f"{i:04d}.txt").read_text() for i in range(4)] == ["TOK my own words", TRIGGER, TRIGGER, TRIGGER]
    assert reports.stages() == ["downloading", "validating", "transforming", "captioning"]
    assert reports.of("transforming") == [0, 1, 2, 3, 4]
    assert not dest.with_name("dataset" + pre.STAGING_SUFFIX).exists()
    dataset = TrainingDataset([DatasetConfig(folder_path=str(dest))], trigger_word=TRIGGER, seed=0)
    assert dataset.image_count == 4 and dataset.skipped == []


async def test_an_unpacked_archive_keeps_its_captions_and_the_rest_get_the_trigger(media, settings):
    """What a finetune does: its archive is unpacked when it is created, and the folder is
    the source of its preprocessing."""
    archive = zipped({"x/cat.png": png_bytes("red"), "x/cat.txt": b"TOK a red cat",
                      "x/dog.jpg": png_bytes("blue", fmt="JPEG")})
    upload = media / "tasks" / "t2" / "upload"
    upload.parent.mkdir(parents=True)
    unpack_dataset(archive, upload, settings.media)
    dest = media / "tasks" / "t2" / "dataset"
    reports = Reports()
    result = await pre.preprocess_sources([str(upload)], dest, parsed([{"type": "convert", "format": "jpeg",
                                                                         "quality": 70}]),
                                          plan(), None, settings, reports, NO_CANCEL)
    assert (result.images, result.captions_kept, result.captioned) == (2, 1, 0)
    assert sorted(p.name for p in dest.iterdir()) == ["0000.jpg", "0000.txt", "0001.jpg", "0001.txt"]
    assert Image.open(dest / "0000.jpg").format == "JPEG"
    assert (dest / "0000.txt").read_text() == "TOK a red cat" and (dest / "0001.txt").read_text() == TRIGGER


async def test_captions_are_the_captioners_with_the_trigger_word(media, settings, captioner, monkeypatch):
    monkeypatch.setattr(pre, "CAPTION_BATCH", 3)  # batches as in production, fewer pictures to caption
    folder = media / "captioned"
    for i in range(6):
        write_image(folder / f"{i:02d}.png", (96, 96), seed=10 + i)
    (folder / "02.txt").write_text("TOK kept as written")
    dest = media / "tasks" / "t3" / "dataset"
    reports = Reports()
    client = pre.CaptionerClient(captioner)
    try:
        result = await pre.preprocess_sources([str(folder)], dest, parsed([{"type": "resize", "size": 64}]),
                                              plan("florence2", "<CAPTION>"), client, settings, reports, NO_CANCEL)
    finally:
        await client.close()
    assert (result.images, result.captions_kept, result.captioned) == (6, 1, 5)
    # Captioned in two CaptionBatch calls (3 + 2), with a report after each.
    assert reports.of("captioning")[0] == 0 and reports.of("captioning")[-1] == 5
    assert len(reports.of("captioning")) == 3 and sorted(reports.of("captioning")) == reports.of("captioning")

    pictures = [dest / f"{i:04d}.png" for i in range(6) if i != 2]
    async with grpc.aio.insecure_channel(captioner) as channel:
        stub = captioner_pb2_grpc.CaptionerServiceStub(channel)
        direct = []
        for chunk in (pictures[:3], pictures[3:]):
            reply = await stub.CaptionBatch(captioner_pb2.CaptionBatchRequest(
                image_paths=[str(p) for p in chunk], batch_size=len(chunk),
                options=captioner_pb2.CaptionOptions(model_type="florence2", task="<CAPTION>")))
            direct += [item.caption for item in reply.captions]
    assert all(direct) and len(set(direct)) > 1
    assert [p.with_suffix(".txt").read_text() for p in pictures] == [f"{TRIGGER}, {c}" for c in direct]
    assert (dest / "0002.txt").read_text() == "TOK kept as written"


async def test_captioner_refusals_and_outages_fail_the_run_cleanly(media, settings, captioner, tmp_path):
    folder = media / "refused"
    write_image(folder / "a.png", (64, 64))
    dest = media / "tasks" / "t4" / "dataset"
    client = pre.CaptionerClient(captioner)
    try:
        with pytest.raises(InvalidInput) as info:
            await pre.preprocess_sources([str(folder)], dest, [], plan("florence2", "<OD>"), client, settings,
                                         Reports(), NO_CANCEL)
        assert info.value.violations[0][0] == "preprocessing_captioning_prompt"
        assert "options.task" in str(info.value)
        nothing_left(dest)

        # A dataset folder the captioner cannot see: a server fault, told without its folders.
        elsewhere = tmp_path / "roots"
        write_image(elsewhere / "b.png", (64, 64))
        with pytest.raises(FailedPrecondition) as info:
            await pre.preprocess_sources([str(elsewhere / "b.png")], elsewhere / "dataset", [],
                                         plan("florence2", None), client, Settings(media_roots=(elsewhere,)),
                                         Reports(), NO_CANCEL)
        assert "media roots" in str(info.value) and str(tmp_path) not in str(info.value)
        nothing_left(elsewhere / "dataset")
    finally:
        await client.close()

    down = pre.CaptionerClient(f"127.0.0.1:{free_port()}")
    with pytest.raises(Unavailable) as info:
        await pre.preprocess_sources([str(folder)], dest, [], plan("joycaption", "Describe {trigger}."), down,
                                     settings, Reports(), NO_CANCEL)
    await down.close()
    assert "captioner" in str(info.value)
    nothing_left(dest)


async def test_cancelling_stops_between_files_and_leaves_no_dataset(media, settings):
    folder = media / "cancelled"
    for i in range(12):
        write_image(folder / f"{i:02d}.png", (64, 64), seed=i)
    dest = media / "tasks" / "t5" / "dataset"
    # What a crashed run left: an old dataset and a staging folder; a new run starts clean.
    (dest / "old.png").parent.mkdir(parents=True)
    (dest / "old.png").write_bytes(b"stale")
    staging = dest.with_name(dest.name + pre.STAGING_SUFFIX)
    staging.mkdir()
    (staging / "0000.png").write_bytes(b"stale")

    reports = Reports()
    with pytest.raises(pre.Cancelled):
        await pre.preprocess_sources([str(folder)], dest, [], plan(), None, settings, reports,
                                     lambda: len(reports.of("transforming")) > 3)
    assert 0 < max(reports.of("transforming")) < 12 and "captioning" not in reports.stages()
    nothing_left(dest)

    result = await pre.preprocess_sources([str(folder)], dest, [], plan(), None, settings, Reports(), NO_CANCEL)
    assert result.images == 12 and "old.png" not in {p.name for p in dest.iterdir()}


async def test_a_source_that_is_not_a_picture_fails_the_run_naming_it(media, settings, media_server, media_dir):
    folder = media / "broken"
    write_image(folder / "good.png", (64, 64))
    (folder / "broken.png").write_bytes(b"\x89PNG but not really")
    dest = media / "tasks" / "t6" / "dataset"
    with pytest.raises(InvalidInput) as info:
        await pre.preprocess_sources([str(folder)], dest, [], plan(), None, settings, Reports(), NO_CANCEL)
    assert info.value.violations[0][0] == "source_images[0]: 'broken.png'"
    assert "not a readable image" in str(info.value)
    nothing_left(dest)

    text = media_dir / "preprocess-web" / "page.png"
    text.parent.mkdir(exist_ok=True)
    text.write_text("<html>not a picture</html>")
    url = f"{media_server}/preprocess-web/page.png"
    with pytest.raises(InvalidInput) as info:
        await pre.preprocess_sources([str(folder / "good.png"), url], dest, [], plan(), None, settings, Reports(),
                                     NO_CANCEL)
    assert info.value.violations[0][0] == "source_images[1]"
    nothing_left(dest)
