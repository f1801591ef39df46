"""Turns a ZIP archive a client sends for training (the finetune API's `file_data`) into a
dataset folder the trainer reads: each picture, with the same-name `.txt` caption when the
archive has one.

The archive is untrusted: entries that would land outside the folder (absolute names, `..`),
links, more entries than allowed, more bytes than allowed, entries that inflate far beyond
their compressed size (ZIP bombs, whatever their headers claim) and pictures over the pixel
limit are refused with the entry named. Nothing is left behind when an archive is refused.
"""

from __future__ import annotations

import io
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from services.common import media
from services.common.errors import InvalidInput
from services.common.settings import MediaLimits

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIX = ".txt"
_CHUNK = 1 << 16


@dataclass(frozen=True)
class ArchiveLimits:
    max_entries: int = 5_000
    max_total_bytes: int = 2 << 30  # uncompressed, all entries together
    # Uncompressed ÷ compressed size of one entry; pictures barely compress, so a much
    # higher ratio is a bomb, not a dataset.
    max_ratio: float = 100.0
    max_caption_bytes: int = 64 << 10


@dataclass(frozen=True)
class DatasetItem:
    image: Path
    caption: str | None  # None: the archive had no caption for it


def unpack_dataset(archive: bytes, dest: Path, media_limits: MediaLimits, field: str = "file_data",
                   limits: ArchiveLimits = ArchiveLimits()) -> list[DatasetItem]:
    """Unpacks the pictures of `archive` and their captions into `dest` (created; it must not
    exist yet), named 0000_<name>.<ext> in archive order so that equal names from different
    folders stay apart. Entries other than pictures and captions are skipped."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(archive))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError) as exc:
        raise InvalidInput(field, f"is not a ZIP archive ({exc})") from exc
    with zf:
        entries = _checked_entries(zf, field, limits)
        pictures = [e for e in entries if PurePosixPath(e.filename).suffix.lower() in IMAGE_SUFFIXES]
        if not pictures:
            raise InvalidInput(field, f"the archive holds no pictures ({', '.join(IMAGE_SUFFIXES)})")
        captions = {_stem_key(e.filename): e for e in entries
                    if PurePosixPath(e.filename).suffix.lower() == CAPTION_SUFFIX}
        staging = Path(tempfile.mkdtemp(prefix=".intake-", dir=dest.parent))
        try:
            items = []
            budget = [limits.max_total_bytes]
            for index, entry in enumerate(pictures):
                name = PurePosixPath(entry.filename)
                where = f"{field}: {media.shown(entry.filename)}"
                data = _read(zf, entry, where, limits, budget)
                media.decode_image(data, where, media_limits)  # a real picture, under the pixel limit
                target = staging / f"{index:04d}_{name.stem}{name.suffix.lower()}"
                target.write_bytes(data)
                caption = None
                if (text_entry := captions.get(_stem_key(entry.filename))) is not None:
                    caption = _caption(_read(zf, text_entry, f"{field}: {media.shown(text_entry.filename)}", limits,
                                             budget), text_entry, field, limits)
                    target.with_suffix(CAPTION_SUFFIX).write_text(caption + "\n", encoding="utf-8")
                items.append(DatasetItem(dest / target.name, caption))
            staging.rename(dest)
            return items
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _checked_entries(zf: zipfile.ZipFile, field: str, limits: ArchiveLimits) -> list[zipfile.ZipInfo]:
    infos = zf.infolist()
    if len(infos) > limits.max_entries:
        raise InvalidInput(field, f"the archive has {len(infos)} entries; at most {limits.max_entries} are allowed")
    declared = sum(info.file_size for info in infos)
    if declared > limits.max_total_bytes:
        raise InvalidInput(field, f"the archive unpacks to {declared} bytes; at most {limits.max_total_bytes} "
                                  f"are allowed")
    entries = []
    for info in infos:
        name = PurePosixPath(info.filename)
        where = media.shown(info.filename)
        if _escapes(info.filename):
            raise InvalidInput(field, f"entry {where} would unpack outside the dataset folder")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise InvalidInput(field, f"entry {where} is a link; links are not unpacked")
        if info.is_dir() or any(part.startswith(".") or part == "__MACOSX" for part in name.parts):
            continue  # folders, and hidden files such as macOS resource forks
        if info.file_size > limits.max_ratio * max(info.compress_size, 1) and info.file_size > _CHUNK:
            raise InvalidInput(field, f"entry {where} inflates {info.file_size // max(info.compress_size, 1)}x; "
                                      f"at most {limits.max_ratio:g}x is allowed")
        entries.append(info)
    return entries


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, limits: ArchiveLimits, budget: list[int]) -> bytes:
    """The entry's bytes, counted as they inflate: a header that understates the size is
    caught by the ratio and the total budget, not trusted."""
    most = min(budget[0], max(int(limits.max_ratio * max(info.compress_size, 1)), _CHUNK))
    out = bytearray()
    try:
        with zf.open(info) as stream:
            while chunk := stream.read(_CHUNK):
                out += chunk
                if len(out) > most:
                    raise InvalidInput(where, "inflates beyond the archive's limits (a ZIP bomb?)")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, RuntimeError, NotImplementedError) as exc:
        raise InvalidInput(where, f"cannot be unpacked ({exc})") from exc
    budget[0] -= len(out)
    return bytes(out)


def _caption(data: bytes, info: zipfile.ZipInfo, field: str, limits: ArchiveLimits) -> str:
    where = f"{field}: {media.shown(info.filename)}"
    if len(data) > limits.max_caption_bytes:
        raise InvalidInput(where, f"caption is {len(data)} bytes; at most {limits.max_caption_bytes} are allowed")
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise InvalidInput(where, "caption is not UTF-8 text") from exc


def _escapes(filename: str) -> bool:
    """Whether an entry name could land outside the folder it is unpacked into: absolute
    (also as a Windows drive or with backslashes), or climbing with "..". """
    parts = PurePosixPath(filename).parts
    return (filename.startswith("/") or "\\" in filename or ".." in parts
            or bool(parts) and ":" in parts[0])


def _stem_key(filename: str) -> str:
    """A picture and its caption pair up by folder and name, case aside."""
    path = PurePosixPath(filename)
    return str(path.with_suffix("")).lower()
