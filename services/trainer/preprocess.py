"""Dataset preprocessing of training tasks and finetunes: the client's pictures (server paths,
http(s) URLs, or a ZIP archive) become a training folder of `0000.png` ... with a `.txt`
caption each.

Stages, reported in this order: "downloading" (reading the sources; a finetune's archive
was unpacked into a folder when it was created, intake.py, and that folder is its source),
"validating" (every file decodes as a picture within the limits, before any work is done),
"transforming" (transforms.py), "captioning". A caption the client gave (an archive's
`.txt`, or a `.txt` beside a server path) is kept as is; the others are the trigger word
(`trigger_only`) or "<trigger word>, <caption>" from the captioner's batched gRPC API.

Everything is written into a staging folder beside the destination, renamed to it at the
end; a failed or cancelled run leaves neither, and a rerun starts clean. Decoding and
transforming run in worker threads, a few files at a time, so memory follows the workers,
not the dataset. Nothing here knows about tasks, queues or gRPC servers.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import grpc
from PIL import ImageOps

from loramesh.v1 import captioner_pb2, captioner_pb2_grpc
from services.common import logs, media
from services.common.errors import (
    FailedPrecondition,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Violations,
)
from services.common.settings import Settings
from services.trainer import transforms as tf
from services.trainer.intake import CAPTION_SUFFIX, IMAGE_SUFFIXES, ArchiveLimits

log = logs.get(__name__)

CAPTIONING_STRATEGIES = ("trigger_only", "florence2", "joycaption")
MAX_SOURCE_IMAGES = 1000
MAX_PROMPT_CHARS = 2000
PROMPT_FIELD = "preprocessing_captioning_prompt"
# The Florence-2 task tokens the captioner's CaptionOptions.task takes (captioner.proto).
FLORENCE2_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
TRIGGER = "{trigger}"  # in a JoyCaption instruction: replaced by the trigger word

# JoyCaption instructions for the finetune API's modes. Captions teach the model what is
# *not* the concept, so each mode leaves out what the trigger word should come to mean.
MODE_PROMPTS: dict[str, str] = {
    "general": (
        "Write a long, detailed description of this image in plain sentences: the subjects, what they "
        "are doing, the setting, the composition, the lighting, the colors and the style. Describe only "
        "what is visible."
    ),
    "character": (
        "Write a descriptive caption for this image. Refer to the main person or character only as "
        f"{TRIGGER}, never by another name or as 'a person'. Describe their pose, expression, clothing "
        "and accessories, what they are doing, the setting and the lighting. Do not describe permanent "
        "features such as face shape, eye color, hair color, skin tone or body type."
    ),
    "style": (
        "Write a descriptive caption of the content of this image: the subjects, objects, setting, "
        "composition and lighting. Do not describe the artistic style, medium, technique, brushwork or "
        "color palette, and do not name any artist."
    ),
    "product": (
        f"Write a descriptive caption for this image. Refer to the product only as {TRIGGER}, and do not "
        "describe its brand, shape, colors or materials. Describe where it is placed, what surrounds it, "
        "the background, the camera angle and the lighting."
    ),
}

# Images per CaptionBatch call, and calls in flight at once (several captioner replicas
# each take one; a single replica overlaps one call's transfer with another's generation).
CAPTION_BATCH = 16
CAPTION_CALLS = 2
DOWNLOADS = 4  # URL fetches at once
WORKERS = max(2, min(8, os.cpu_count() or 2))  # decode/transform threads at once
STAGING_SUFFIX = ".staging"
SOURCES = ".sources"  # inside the staging folder: downloads and unpacked archives

Report = Callable[[str, int, int, str], Awaitable[None]]  # (stage, processed, total, message)


class Cancelled(Exception):
    """The run was cancelled between two files; nothing was left behind."""


@dataclass(frozen=True)
class CaptionPlan:
    strategy: str  # one of CAPTIONING_STRATEGIES
    prompt: str | None  # joycaption: the instruction; florence2: a task token or None
    trigger_word: str


@dataclass
class PreprocessResult:
    dataset_path: Path
    images: int
    captions_kept: int  # captions the client gave
    captioned: int  # captions from the captioner
    strategy: str


@dataclass
class _Picture:
    """One picture of the dataset: where its bytes are, how errors name it, its caption."""

    where: str  # "source_images[2]", "source_images[2]: 'a.png'", "file_data: 'a.png'"
    path: Path | None  # None until a URL is downloaded
    url: str | None = None
    caption: str | None = None  # the client's caption, kept as is


# --- request-time checks ---------------------------------------------------------------------

def check_sources(sources: list[str], settings: Settings, bad: Violations, field: str = "source_images") -> None:
    """Checks what can be checked without fetching: 1..MAX_SOURCE_IMAGES entries, each an
    http(s) URL to an allowed address or an existing picture or folder of pictures inside
    the media roots; at most MAX_SOURCE_IMAGES pictures in all."""
    if not isinstance(sources, list) or not sources:
        bad.add(field, f"at least one image path, folder or http(s) URL is required (at most {MAX_SOURCE_IMAGES})")
        return
    if len(sources) > MAX_SOURCE_IMAGES:
        bad.add(field, f"at most {MAX_SOURCE_IMAGES} entries are allowed (got {len(sources)})")
        return
    pictures = 0
    for i, source in enumerate(sources):
        name = f"{field}[{i}]"
        if not isinstance(source, str) or not source.strip():
            bad.add(name, "must be an image path, a folder or an http(s) URL")
            continue
        if _is_url(source):
            try:
                media.check_url(source, name, settings.media)
            except InvalidInput as exc:
                for violation in exc.violations:
                    bad.add(*violation)
            pictures += 1
            continue
        path = media.resolve_into(bad, source, settings.media_roots, name, "no such file or folder")
        if path is None:
            continue
        if path.is_dir():
            found = len(_folder_pictures(path))
            bad.require(found > 0, name, f"the folder holds no pictures ({', '.join(IMAGE_SUFFIXES)})")
            pictures += found
        elif bad.require(path.suffix.lower() in IMAGE_SUFFIXES, name,
                         f"must be a picture ({', '.join(IMAGE_SUFFIXES)}) or a folder of them "
                         f"(got {media.shown(source)})"):
            pictures += 1
    bad.require(pictures <= MAX_SOURCE_IMAGES, field,
                f"at most {MAX_SOURCE_IMAGES} pictures in all are allowed (the entries hold {pictures})")


def check_captioning(strategy: str | None, prompt: str | None, bad: Violations,
                     field: str = "preprocessing_captioning_strategy") -> tuple[str, str | None]:
    """(strategy, prompt) to caption with: no strategy is trigger_only (which needs no
    prompt and ignores one); florence2 takes a task token (None: the captioner's default);
    joycaption an instruction (None: MODE_PROMPTS["general"]), where {trigger} stands for
    the trigger word."""
    strategy = bad.choice(field, strategy, CAPTIONING_STRATEGIES, "trigger_only")
    prompt = bad.text(PROMPT_FIELD, prompt, max_length=MAX_PROMPT_CHARS).strip() or None
    if strategy == "trigger_only":
        return strategy, None
    if strategy == "florence2":
        bad.require(prompt is None or prompt in FLORENCE2_TASKS, PROMPT_FIELD,
                    f"with florence2 must be one of {', '.join(FLORENCE2_TASKS)} (got {media.shown(prompt or '')})")
        return strategy, prompt
    return strategy, prompt or MODE_PROMPTS["general"]


# --- the captioner ---------------------------------------------------------------------------

class CaptionerClient:
    """Async client of the captioner's CaptionBatch over native gRPC (grpc.aio channel)."""

    def __init__(self, address: str):
        self.address = address
        self._channel: grpc.aio.Channel | None = None  # made on first use, inside the running loop

    async def caption(self, images: list[Path], plan: CaptionPlan) -> list[str]:
        """The captioner's caption of each image (paths inside its media roots), in order,
        one CaptionBatch call per CAPTION_BATCH images."""
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address)
        stub = captioner_pb2_grpc.CaptionerServiceStub(self._channel)
        options = captioner_pb2.CaptionOptions(model_type=plan.strategy)
        if plan.strategy == "florence2" and plan.prompt:
            options.task = plan.prompt
        elif plan.strategy == "joycaption" and plan.prompt:
            options.prompt = plan.prompt.replace(TRIGGER, plan.trigger_word)
        captions: list[str] = []
        for start in range(0, len(images), CAPTION_BATCH):
            chunk = images[start:start + CAPTION_BATCH]
            request = captioner_pb2.CaptionBatchRequest(image_paths=[str(p) for p in chunk], options=options,
                                                        batch_size=len(chunk))
            try:
                reply = await stub.CaptionBatch(request)
            except grpc.aio.AioRpcError as exc:
                raise self._error(exc) from exc
            captions.extend(item.caption for item in reply.captions)
        return captions

    def _error(self, exc: grpc.aio.AioRpcError):
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.INVALID_ARGUMENT and not details.startswith("image_"):
            return InvalidInput(PROMPT_FIELD, f"the captioner refused the captioning settings: {details}")
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
            # The pictures themselves: the captioner does not see the tasks folder. Its answer
            # names server folders, so it goes to the log only.
            log.warning("captioner cannot read the dataset", address=self.address, details=details)
            return FailedPrecondition("captioner: it cannot read the dataset's pictures; the tasks folder must "
                                      "be inside the captioner's media roots")
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            return FailedPrecondition(f"captioner: {details}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return ResourceExhausted(f"captioner: {details}")
        log.warning("captioner call failed", address=self.address, code=code.name, details=details)
        return Unavailable(f"captioner: the captioning service is unreachable or failed ({code.name}); "
                           "try again later")

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


# --- the stages ------------------------------------------------------------------------------

async def preprocess_sources(sources: list[str], dest: Path, transforms: list[tf.Transform], plan: CaptionPlan,
                             captioner: CaptionerClient | None, settings: Settings, report: Report,
                             is_cancelled: Callable[[], bool], field: str = "source_images") -> PreprocessResult:
    """The dataset of server paths and URLs (checked with check_sources) in `dest`."""
    report = _in_order(report)

    async def gather(staging: Path) -> list[_Picture]:
        pictures = await asyncio.to_thread(_list_sources, sources, settings, field)
        downloads = staging / SOURCES
        downloads.mkdir()

        def fetch(index: int, picture: _Picture) -> None:
            if picture.url is not None:
                target = downloads / f"{index:04d}"
                target.write_bytes(media.fetch_url(picture.url, picture.where, settings.media))
                picture.path = target
            else:
                picture.caption = _sibling_caption(picture.path, settings, picture.where)

        await _each("downloading", pictures, fetch, report, is_cancelled, DOWNLOADS, "files read")
        return pictures

    return await _run(dest, gather, transforms, plan, captioner, settings, report, is_cancelled)


async def _run(dest: Path, gather: Callable[[Path], Awaitable[list[_Picture]]], transforms: list[tf.Transform],
               plan: CaptionPlan, captioner: CaptionerClient | None, settings: Settings, report: Report,
               is_cancelled: Callable[[], bool]) -> PreprocessResult:
    staging = dest.with_name(dest.name + STAGING_SUFFIX)
    # A rerun (after a crash, or of a failed run) starts from nothing.
    await asyncio.to_thread(_remove, staging, dest)
    staging.mkdir(parents=True)
    try:
        pictures = await gather(staging)
        limits = settings.media

        def validate(index: int, picture: _Picture) -> None:
            media.decode_image(picture.path, picture.where, limits).close()

        # Every file is checked before any is transformed, so a bad one fails the run at once;
        # decoding again in the next stage keeps one picture per worker in memory.
        await _each("validating", pictures, validate, report, is_cancelled, WORKERS, "pictures checked")
        outputs: list[Path] = [Path()] * len(pictures)
        fmt, save_options = tf.output_format(transforms)

        def transform(index: int, picture: _Picture) -> None:
            with media.decode_image(picture.path, picture.where, limits) as image:
                upright = ImageOps.exif_transpose(image)  # phone photos carry their rotation in EXIF
                result, extension = tf.apply_transforms(upright, transforms, index)
                target = staging / f"{index:04d}.{extension}"
                result.save(target, format=fmt.upper(), **save_options)
            outputs[index] = target
            if picture.caption is not None:
                _write_caption(target, picture.caption)

        await _each("transforming", pictures, transform, report, is_cancelled, WORKERS, "pictures transformed")
        captioned = await _caption(pictures, outputs, plan, captioner, report, is_cancelled)
        await asyncio.to_thread(_publish, staging, dest)
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, staging, True)
        raise
    kept = sum(p.caption is not None for p in pictures)
    return PreprocessResult(dest, len(pictures), kept, captioned, plan.strategy)


async def _caption(pictures: list[_Picture], outputs: list[Path], plan: CaptionPlan,
                   captioner: CaptionerClient | None, report: Report, is_cancelled: Callable[[], bool]) -> int:
    """Writes the caption of every picture the client gave none for; returns how many came
    from the captioner."""
    wanted = [outputs[i] for i, p in enumerate(pictures) if p.caption is None]
    total = len(wanted)
    if not wanted:
        await report("captioning", 0, 0, "every picture has its own caption")
        return 0
    if plan.strategy == "trigger_only":
        for target in wanted:
            _write_caption(target, plan.trigger_word)
        await report("captioning", total, total, f"{total} captions set to the trigger word")
        return 0
    if captioner is None:
        raise FailedPrecondition(f"captioning with {plan.strategy} needs the captioner")
    await report("captioning", 0, total, f"captioning {total} pictures with {plan.strategy}")
    chunks = [wanted[i:i + CAPTION_BATCH] for i in range(0, total, CAPTION_BATCH)]
    done = 0
    lock = asyncio.Semaphore(CAPTION_CALLS)

    async def one(chunk: list[Path]) -> None:
        nonlocal done
        async with lock:
            if is_cancelled():
                raise Cancelled("cancelled while captioning")
            captions = await captioner.caption(chunk, plan)
        for target, caption in zip(chunk, captions, strict=True):
            _write_caption(target, ", ".join(part for part in (plan.trigger_word.strip(), caption.strip()) if part))
        done += len(chunk)
        await report("captioning", done, total, f"{done}/{total} pictures captioned")

    await _all([one(chunk) for chunk in chunks])
    return total


# --- the parts -------------------------------------------------------------------------------

T = TypeVar("T")


async def _each(stage: str, items: Sequence[T], work: Callable[[int, T], None], report: Report,
                is_cancelled: Callable[[], bool], workers: int, done_text: str) -> None:
    """Runs `work(index, item)` in threads, `workers` at a time, reporting after each item.
    Cancellation and failures stop the workers between items; every thread has finished
    when this returns or raises, so the caller can remove what they wrote."""
    total = len(items)
    await report(stage, 0, total, f"0/{total} {done_text}")
    pending = iter(range(total))
    done = 0
    stop = False

    async def worker() -> None:
        nonlocal done, stop
        for index in pending:
            if stop:
                return
            if is_cancelled():
                stop = True
                raise Cancelled(f"cancelled while {stage}")
            try:
                await asyncio.to_thread(work, index, items[index])
            except BaseException:
                stop = True
                raise
            done += 1
            await report(stage, done, total, f"{done}/{total} {done_text}")

    await _all([worker() for _ in range(min(workers, total))])


async def _all(coroutines) -> None:
    """Awaits every coroutine to its end (none is cancelled midway), then raises the first
    failure."""
    results = await asyncio.gather(*coroutines, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


def _list_sources(sources: list[str], settings: Settings, field: str) -> list[_Picture]:
    """Every picture the sources name, in order: URLs as they are, server paths resolved
    inside the media roots, a folder's pictures by name."""
    pictures = []
    for i, source in enumerate(sources):
        name = f"{field}[{i}]"
        if _is_url(source):
            pictures.append(_Picture(name, None, url=source))
            continue
        path = media.resolve_path(source, settings.media_roots, name)
        if not path.is_dir():
            pictures.append(_Picture(name, path))
            continue
        for entry in _folder_pictures(path):
            where = f"{name}: {media.shown(entry.name)}"
            pictures.append(_Picture(where, media.resolve_path(str(entry), settings.media_roots, where)))
    if len(pictures) > MAX_SOURCE_IMAGES:
        raise InvalidInput(field, f"at most {MAX_SOURCE_IMAGES} pictures in all are allowed "
                                  f"(the entries hold {len(pictures)})")
    if not pictures:
        raise InvalidInput(field, "the entries hold no pictures")
    return pictures


def _folder_pictures(folder: Path) -> list[Path]:
    """The pictures directly inside `folder`, by name; hidden files are skipped."""
    return sorted(entry for entry in folder.iterdir()
                  if not entry.name.startswith(".") and entry.suffix.lower() in IMAGE_SUFFIXES and entry.is_file())


def _sibling_caption(picture: Path, settings: Settings, where: str) -> str | None:
    """The text of the `.txt` beside a server-side picture, if there is one inside the roots."""
    text = picture.with_suffix(CAPTION_SUFFIX)
    if not text.is_file():
        return None
    try:
        path = media.resolve_path(str(text), settings.media_roots, where)
    except (InvalidInput, NotFound):
        return None  # a link out of the roots is no caption of ours
    data = path.read_bytes()
    most = ArchiveLimits().max_caption_bytes
    if len(data) > most:
        raise InvalidInput(where, f"caption {media.shown(text.name)} is {len(data)} bytes; at most {most} are allowed")
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise InvalidInput(where, f"caption {media.shown(text.name)} is not UTF-8 text") from exc


def _in_order(report: Report) -> Report:
    """`report` called one at a time, so the caller sees each stage's counts in order and
    never has to merge two concurrent updates of its record."""
    lock = asyncio.Lock()

    async def ordered(stage: str, processed: int, total: int, message: str) -> None:
        async with lock:
            await report(stage, processed, total, message)

    return ordered


def _publish(staging: Path, dest: Path) -> None:
    shutil.rmtree(staging / SOURCES)
    staging.rename(dest)


def _write_caption(picture: Path, caption: str) -> None:
    picture.with_suffix(CAPTION_SUFFIX).write_text(caption, encoding="utf-8")


def _is_url(source: str) -> bool:
    return "://" in source or urlsplit(source).scheme in ("http", "https")


def _remove(*paths: Path) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
