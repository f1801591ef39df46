"""A training archive (the finetune API's base64 ZIP) becomes a dataset folder: pictures
with their same-name captions, in archive order; hostile archives are refused naming the
entry, and a refusal leaves nothing behind."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from services.common.errors import InvalidInput
from services.common.settings import MediaLimits
from services.trainer.dataset import TrainingDataset
from services.trainer.intake import ArchiveLimits, unpack_dataset
from tests.test_trainer_dataset import DatasetConfig

MEDIA = MediaLimits()


def picture(color: str, size=(40, 30), fmt="PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=fmt)
    return out.getvalue()


def archive(entries: dict[str, bytes], links: tuple[str, ...] = ()) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if name in links:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, data)
    return out.getvalue()


def refused(data: bytes, tmp_path: Path, *words: str, limits: ArchiveLimits | None = None) -> None:
    with pytest.raises(InvalidInput) as info:
        unpack_dataset(data, tmp_path / "dataset", MEDIA, limits=limits or ArchiveLimits())
    assert info.value.violations[0][0].startswith("file_data"), info.value.violations
    for word in words:
        assert word in str(info.value), str(info.value)
    assert not (tmp_path / "dataset").exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder left either


def test_pictures_and_their_captions_become_a_dataset_folder(tmp_path):
    data = archive({
        "set/cat.png": picture("red"), "set/cat.txt": b"TOK a red cat\n",
        "other/cat.JPG": picture("blue", fmt="JPEG"),  # the same name in another folder
        "set/dog.webp": picture("green", fmt="WEBP"), "set/DOG.TXT": "\ufeffTOK a dog".encode(),
        "readme.md": b"# not a picture", "__MACOSX/set/._cat.png": b"junk", "set/.DS_Store": b"junk",
    })
    items = unpack_dataset(data, tmp_path / "dataset", MEDIA)
    assert [(i.image.name, i.caption) for i in items] == [
        ("0000_cat.png", "TOK a red cat"), ("0001_cat.jpg", None), ("0002_dog.webp", "TOK a dog")]
    folder = tmp_path / "dataset"
    assert sorted(p.name for p in folder.iterdir()) == [
        "0000_cat.png", "0000_cat.txt", "0001_cat.jpg", "0002_dog.txt", "0002_dog.webp"]
    assert Image.open(folder / "0000_cat.png").getpixel((0, 0)) == (255, 0, 0)
    assert (folder / "0000_cat.txt").read_text() == "TOK a red cat\n"
    # The trainer's own dataset reader takes the folder as it is.
    dataset = TrainingDataset([DatasetConfig(folder_path=str(folder))], trigger_word="TOK", seed=0)
    assert dataset.image_count == 3 and dataset.skipped == []


@pytest.mark.parametrize("name", ["../evil.png", "/etc/evil.png", "a/../../evil.png", "C:/evil.png",
                                  "a\\..\\evil.png"])
def test_entries_outside_the_folder_are_refused(tmp_path, name):
    refused(archive({"ok.png": picture("red"), name: picture("blue")}), tmp_path, "outside the dataset folder")


def test_links_are_refused(tmp_path):
    refused(archive({"ok.png": picture("red"), "link.png": b"/etc/passwd"}, links=("link.png",)), tmp_path,
            "is a link")


def test_zip_bombs_are_refused_whatever_their_headers_say(tmp_path):
    refused(archive({"bomb.png": b"\0" * (20 << 20)}), tmp_path, "inflates")
    # A header that understates the size: caught while inflating.
    honest = archive({"bomb.png": b"\0" * (20 << 20)})
    lying = bytearray(honest)
    for header in (b"PK\x03\x04", b"PK\x01\x02"):
        at = lying.find(header)
        size_at = at + (22 if header == b"PK\x03\x04" else 24)
        lying[size_at:size_at + 4] = (1000).to_bytes(4, "little")
    with pytest.raises(InvalidInput) as info:
        unpack_dataset(bytes(lying), tmp_path / "dataset", MEDIA)
    assert "bomb.png" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_counts_and_totals_are_limited(tmp_path):
    many = archive({f"{i}.png": picture("red") for i in range(6)})
    refused(many, tmp_path, "6 entries", "at most 5", limits=ArchiveLimits(max_entries=5))
    refused(many, tmp_path, "at most 300 are allowed", limits=ArchiveLimits(max_total_bytes=300))


def test_what_is_not_a_dataset_is_refused_naming_it(tmp_path):
    refused(b"not a zip at all", tmp_path, "is not a ZIP archive")
    refused(archive({"notes.txt": b"no pictures here"}), tmp_path, "holds no pictures")
    refused(archive({"ok.png": picture("red"), "broken.png": b"\x89PNG broken"}), tmp_path, "broken.png",
            "not a readable image")
    refused(archive({"cat.png": picture("red"), "cat.txt": b"\xff\xfe\xfa bad"}), tmp_path, "cat.txt", "UTF-8")
    big = archive({"huge.png": picture("red", size=(3000, 3000))})
    with pytest.raises(InvalidInput) as info:
        unpack_dataset(big, tmp_path / "dataset", MediaLimits(max_image_pixels=1_000_000))
    assert "huge.png" in info.value.violations[0][0] and "pixels" in str(info.value)
