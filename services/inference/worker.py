"""Runs inference jobs on this replica, one at a time (one per GPU), in queue order.

A job arrives on the NATS work queue; the worker marks it processing, keeps the message
alive with in_progress() heartbeats, publishes progress after every denoising step,
writes the outputs, records the result and only then acks. If the process dies, the
message comes back and another worker (or this one, restarted) runs the job again; a
job already recorded as finished is acked without running, so none runs twice to
completion. Out-of-memory fails only the job that hit it; a CUDA error that leaves the
device unusable ends the process so the job is redelivered to a healthy worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import nats.errors
import nats.js.errors
import torch
from PIL import Image

from loramesh.v1 import events_pb2
from services.common import architectures, logs, media, metrics
from services.common import jobs as jobs_queue
from services.common.bus import EventPublisher
from services.common.errors import ServiceError
from services.common.model_thread import ModelThread
from services.common.settings import Settings
from services.inference import catalog, conversion, downloads, jobs, previews
from services.inference.generation import Cancelled, LoraWeight
from services.inference.job_spec import CONVERT, DOWNLOAD, HASH, JPEG, MP4, PNG, TXT2VID, UPSCALE, ImageSpec, LoraSpec
from services.inference.jobs import JobRecord, JobStore, OutputImage, Progress
from services.inference.model_files import ModelsRoot
from services.inference.model_loading import load_pipeline
from services.inference.pipelines import PipelineHost
from services.inference.previews import PreviewSettings
from services.inference.upscaling import UpscalerHost, UpscaleSpec

log = logs.get(__name__)

# Seconds between progress writes to the job record (events go out on every step).
PROGRESS_WRITE_S = 0.5
# Progress events of steps within this many seconds leave together.
PROGRESS_BATCH_S = 0.25
EXIT_DEVICE_LOST = 70


class TimeLimitExceeded(ServiceError):
    """The job ran past LORAMESH_JOB_TIME_LIMIT_S; raised at its next step, it fails the job."""


def _stop_if_asked(cancel: threading.Event, started: float, limit: float) -> None:
    """Between steps of a job: Cancelled when it was cancelled, TimeLimitExceeded once it has
    run longer than LORAMESH_JOB_TIME_LIMIT_S (0: no limit)."""
    if cancel.is_set():
        raise Cancelled()
    if limit and time.perf_counter() - started > limit:
        raise TimeLimitExceeded(f"the job ran longer than the {limit:g} s limit (LORAMESH_JOB_TIME_LIMIT_S)")


def _ended_by(exc: Exception, what: str, record: JobRecord) -> tuple[str, str | None]:
    """How a job ends when its work raised `exc` (called inside the except block): cancelled,
    failed with a client-facing error's message, or failed with an unexpected error, logged."""
    if isinstance(exc, Cancelled):
        return jobs.CANCELLED, None
    if isinstance(exc, ServiceError):
        return jobs.FAILED, str(exc)
    log.exception(f"{what} failed", job_id=record.job_id)
    return jobs.FAILED, f"{type(exc).__name__}: {exc}"


def is_device_lost(exc: BaseException) -> bool:
    """CUDA errors after which the context is unusable (illegal access, ECC, launch failures)."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("CUDA error" in text or "CUBLAS_STATUS" in text) \
        and not isinstance(exc, torch.OutOfMemoryError)


class Worker:
    def __init__(self, settings: Settings, store: JobStore, events: EventPublisher, host: PipelineHost,
                 thread: ModelThread, upscalers: UpscalerHost | None = None):
        self.settings = settings
        self.store = store
        self.events = events
        self.host = host
        self.thread = thread
        self.upscalers = upscalers
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.current: asyncio.Task | None = None
        self.current_job_id: str | None = None  # for server_status

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._pull_loop())

    async def stop(self) -> None:
        """On shutdown: stop taking jobs; a running job gets the grace period to finish,
        otherwise its message returns to the queue when this process exits."""
        self._stopping.set()
        if self._task:
            self._task.cancel()
        if self.current:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self.current), self.settings.shutdown_grace_s)

    async def _pull_loop(self) -> None:
        await jobs_queue.pull_loop(self.store.pull_subscription, self._take, self._stopping)

    async def _take(self, msg) -> None:
        self.current = asyncio.get_running_loop().create_task(self._run(msg))
        try:
            await asyncio.shield(self.current)
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            # NATS went away mid-job: unacked, the job comes back once it returns.
            log.warning("job interrupted by NATS", error=str(exc))
        except Exception:
            log.exception("job could not be run")
        self.current = None

    # ---- one job -----------------------------------------------------------------------

    async def _run(self, msg) -> None:
        payload = json.loads(msg.data)
        job_id = payload["job_id"]
        # Its submitter may still be announcing it: wait (a nak would send it behind others).
        record = await self.store.wait_queued(job_id, min(jobs.QUEUED_WAIT_S, self.store.ack_wait / 2))
        if record is None or record.is_final:
            await msg.ack()  # cancelled while pending, or finished before a redelivery
            return
        if msg.metadata.num_delivered > jobs.MAX_DELIVER:
            await self._finish(record, jobs.FAILED, f"gave up after {jobs.MAX_DELIVER} attempts: the worker "
                                                    f"running it stopped each time")
            await msg.ack()
            return
        cancel = threading.Event()
        self.current_job_id = job_id

        async def on_cancel(_msg) -> None:
            cancel.set()

        control = await self.store.nc.subscribe(jobs.control_subject(job_id), cb=on_cancel)
        heartbeat = asyncio.get_running_loop().create_task(self._heartbeat(msg))
        try:
            record = await self.store.update(job_id, self._start)
            if record.status != jobs.PROCESSING:
                await msg.ack()
                return
            if record.cancel_requested:
                cancel.set()
            await jobs.publish_status(self.events, record, jobs.PENDING)
            status, error = await self._generate(record, payload.get("hf_token"), cancel)
            await self._finish(record, status, error)
            await msg.ack()
        except Superseded:
            # This worker's heartbeats lapsed (NATS away, a stalled machine) and the job went
            # to another, whose attempt now owns it: its result is the one that counts.
            log.warning("job taken over by another worker; result dropped", job_id=job_id)
        finally:
            self.current_job_id = None
            heartbeat.cancel()
            with contextlib.suppress(nats.errors.Error):
                await control.unsubscribe()

    def _start(self, r: JobRecord) -> None:
        if r.status in (jobs.PENDING, jobs.PROCESSING):
            r.status, r.started_at = jobs.PROCESSING, time.time()
            r.owner, r.attempts = self.settings.replica, r.attempts + 1
            r.progress, r.outputs, r.output_info, r.error = None, [], [], None

    async def _heartbeat(self, msg) -> None:
        while True:
            await asyncio.sleep(max(self.store.ack_wait / 3, 0.2))
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                await msg.in_progress()

    async def _generate(self, record: JobRecord, hf_token: str | None, cancel: threading.Event) -> tuple[str, str | None]:
        if record.spec.type == CONVERT:
            return await self._convert(record, cancel)
        if record.spec.type == DOWNLOAD:
            return await self._download(record, cancel)
        if record.spec.type == HASH:
            return await self._hash(record, cancel)
        staging = _staging(self.settings.inference.output_dir, record)
        try:
            return await self._generate_staged(record, hf_token, cancel, staging)
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, True)
            if record.spec.type != UPSCALE and record.spec.upscale and record.spec.upscale.auto_unload:
                await self._unload_upscaler(record.spec.upscale)

    async def _unload_upscaler(self, used: UpscaleSpec) -> None:
        """txt2img/img2img's upscale_auto_unload: the upscaler the job used is unloaded for
        everyone, unless another has been loaded since."""
        current = await self.store.read_state(jobs.UPSCALER_STATE)
        if current and current.get("path") == used.plan.path:
            await self.store.write_state(jobs.UPSCALER_STATE, None)
            await self.store.nc.publish(jobs.UNLOAD_UPSCALER_SUBJECT, b"")

    async def _generate_staged(self, record: JobRecord, hf_token: str | None, cancel: threading.Event,
                               staging: Path) -> tuple[str, str | None]:
        loop = asyncio.get_running_loop()
        reporter = ProgressReporter(self, record, loop)
        try:
            inputs = {name: await self.store.read_input(record, name) for name in record.inputs}
            preview_settings = PreviewSettings.from_json(await self.store.read_state(previews.SETTINGS_KEY))
            outputs, info, timings = await self.thread.run(self._render, record, inputs, hf_token, cancel,
                                                           reporter, preview_settings)
        except Cancelled:
            return jobs.CANCELLED, None
        except torch.OutOfMemoryError as exc:
            log.warning("job ran out of memory", job_id=record.job_id)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return jobs.FAILED, f"out of memory: {str(exc).splitlines()[0]}"
        except ServiceError as exc:
            return jobs.FAILED, str(exc)
        except Exception as exc:
            if is_device_lost(exc):
                log.error("device lost; exiting so the job goes to a healthy worker", job_id=record.job_id,
                          error=str(exc))
                os._exit(EXIT_DEVICE_LOST)
            log.exception("job failed", job_id=record.job_id)
            return jobs.FAILED, f"{type(exc).__name__}: {exc}"
        finally:
            await reporter.flush()

        def done(r: JobRecord) -> None:
            _check_still_ours(r, record)
            r.outputs, r.output_info, r.timings = outputs, info, timings

        await self.store.update(record.job_id, done)
        # Only the attempt that owns the job puts its files where the record says.
        await asyncio.to_thread(_publish_files, staging, staging.parent)
        return jobs.COMPLETED, None

    async def _convert(self, record: JobRecord, cancel: threading.Event) -> tuple[str, str | None]:
        """A /convert job on the model thread: the GGUF is written under a temporary name beside
        its output, with a progress event per batch of tensors, and takes the output's name
        only while this attempt still owns the job; nothing of it stays otherwise."""
        plan = record.spec.conversion
        staged = conversion.staged_path(plan, record.job_id, record.attempts)
        reporter = ProgressReporter(self, record, asyncio.get_running_loop())
        started, limit = time.perf_counter(), self.settings.inference.job_time_limit_s

        def on_tensor(done: int, total: int) -> None:
            _stop_if_asked(cancel, started, limit)
            reporter.report(0, done, total)

        try:
            try:
                seconds = await self.thread.run(conversion.convert, plan, staged, on_tensor)
            except Exception as exc:
                return _ended_by(exc, "conversion", record)
            finally:
                await reporter.flush()

            def done(r: JobRecord) -> None:
                _check_still_ours(r, record)
                r.timings = {"convert": seconds}

            await self.store.update(record.job_id, done)
            try:
                await asyncio.to_thread(conversion.publish, staged, Path(plan.output_path), plan.output_name)
            except ServiceError as exc:
                return jobs.FAILED, str(exc)
            return jobs.COMPLETED, None
        finally:
            await asyncio.to_thread(staged.unlink, True)

    async def _download(self, record: JobRecord, cancel: threading.Event) -> tuple[str, str | None]:
        """A /models/download job (downloads.py) in a thread of its own: its progress counts
        KiB as steps (bytes would overflow them) and each event carries the exact bytes; the
        job's outputs name the model as GET /models lists it."""
        plan = record.spec.download
        reporter = ProgressReporter(self, record, asyncio.get_running_loop())
        started, limit = time.perf_counter(), self.settings.inference.job_time_limit_s
        last = [0.0]

        def on_chunk(done: int, total: int) -> None:
            _stop_if_asked(cancel, started, limit)
            if time.monotonic() - last[0] >= PROGRESS_BATCH_S or done == total:
                last[0] = time.monotonic()
                reporter.report(0, done >> 10, total >> 10, {"bytes": done, "total_bytes": total})

        try:
            name, _ = await asyncio.to_thread(downloads.download, plan, self.settings,
                                              f"{record.job_id}-{record.attempts}", on_chunk)
        except Exception as exc:
            return _ended_by(exc, "download", record)
        finally:
            await reporter.flush()
        await self.store.update(record.job_id, partial(_named_output, record, name))
        return jobs.COMPLETED, None

    async def _hash(self, record: JobRecord, cancel: threading.Event) -> tuple[str, str | None]:
        """The hash job behind a download: once the download has ended (on any replica), its
        file's SHA256 goes into the hash cache, as GET /models/hash computes it."""
        download_id, plan = record.spec.params["download_job_id"], record.spec.download
        started, limit = time.perf_counter(), self.settings.inference.job_time_limit_s
        try:
            while (source := await self.store.find(download_id)) is not None and not source.is_final:
                _stop_if_asked(cancel, started, limit)
                await asyncio.sleep(0.5)
            if source is None or source.status != jobs.COMPLETED or not source.outputs:
                state = "is gone" if source is None else source.status
                return jobs.FAILED, f"download job {download_id} {state}; there is no file to hash"
            name = source.outputs[0]
            path = await asyncio.to_thread(ModelsRoot(self.settings.inference.models_dir).path, plan.model_type, name)
            await self.store.model_hash(plan.model_type, name, path)
        except Exception as exc:
            return _ended_by(exc, "hashing", record)
        await self.store.update(record.job_id, partial(_named_output, record, name))
        return jobs.COMPLETED, None

    def _render(self, record: JobRecord, inputs: dict[str, bytes], hf_token: str | None, cancel: threading.Event,
                reporter: ProgressReporter, preview_settings: PreviewSettings,
                ) -> tuple[list[str], list[OutputImage], dict]:
        """Runs on the model thread: loads (or reuses) the pipeline, applies the LoRAs and
        makes every image (or the video) of the job, with live previews as the settings ask."""
        spec = record.spec
        started = time.perf_counter()
        limit = self.settings.inference.job_time_limit_s
        report = reporter.report
        if spec.type == UPSCALE:
            return self._render_upscale(record, inputs["input"], cancel, report)
        loaded = self.host.get(spec.model.key, spec.architecture, lambda: self._load(record, hf_token),
                               spec.model.name)
        loaded.set_loras([LoraWeight(self._lora_file(lora), lora.scale, lora.transformer) for lora in spec.loras])
        timings: dict = {"load_pipeline": round(time.perf_counter() - started, 4), "prompts": []}
        images = {name: Image.open(io.BytesIO(data)) for name, data in inputs.items()}
        final_folder = self.settings.inference.output_dir / record.job_id
        folder = _staging(self.settings.inference.output_dir, record)
        folder.mkdir(parents=True, exist_ok=True)
        outputs, info = [], []
        jpeg = spec.output_format == JPEG
        steps = metrics.STEPS.labels("inference", spec.type)
        for index, image_spec in enumerate(spec.images):
            began = time.perf_counter()

            def on_step(step: int, total: int, index: int = index) -> None:
                _stop_if_asked(cancel, started, limit)
                steps.inc()
                report(index, step, total)

            on_latents = self._previews(record, image_spec, preview_settings, reporter)
            if spec.type == TXT2VID:
                frames = loaded.generate_video(image_spec, on_step, on_latents=on_latents)
                name = f"video_{index}.mp4"
                width, height = media.encode_mp4(frames, image_spec.fps, folder / name)
                info.append(OutputImage(file_path=str(final_folder / name), format=MP4, width=width, height=height,
                                        seed=image_spec.seed, num_frames=len(frames), fps=image_spec.fps))
            else:
                image = loaded.generate(image_spec, on_step, images, on_latents=on_latents)
                if spec.upscale:
                    image = self.upscalers.get(spec.upscale.plan).upscale(
                        image, spec.upscale, lambda: _stop_if_asked(cancel, started, limit))
                name = f"image_{index}.{'jpg' if jpeg else 'png'}"
                image.save(folder / name, format="JPEG" if jpeg else "PNG", **({"quality": 95} if jpeg else {}))
                info.append(OutputImage(file_path=str(final_folder / name), format=spec.output_format,
                                        width=image.width, height=image.height, seed=image_spec.seed))
            outputs.append(f"{record.job_id}/{name}")
            timings["prompts"].append({"index": index, "seconds": round(time.perf_counter() - began, 4)})
        config = {"job_id": record.job_id, "type": spec.type, "architecture": spec.architecture,
                  "model": spec.model.name, "params": spec.params,
                  "images": [asdict(i) for i in spec.images], "loras": [asdict(lora) for lora in spec.loras]}
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return outputs, info, timings

    def _previews(self, record: JobRecord, image: ImageSpec, settings: PreviewSettings, reporter: ProgressReporter):
        """The on_latents callback that sends one image's (or video's) job_preview events, or None
        when previews are off. A preview that cannot be made is logged once and the job goes on
        without previews: they never fail a job."""
        if not settings.active:
            return None
        family = architectures.family(record.spec.architecture)
        plan = record.spec.model.plan
        named = plan.paths.get(previews.TAE_TYPE) if plan else None
        tae = Path(named) if named else previews.find_tae(self.settings.inference.models_dir / previews.TAE_TYPE,
                                                           family)
        previewer = previews.Previewer(settings, family, image.width, image.height, tae)
        frame_count = max(image.video_frames, 1)

        def on_latents(pipe, latents, step: int, total: int) -> None:
            if previewer.mode == previews.NONE or not previewer.due(step):
                return
            try:
                preview = previewer.render(pipe, latents)
            except Exception:
                log.exception("preview failed; the job goes on without previews", job_id=record.job_id)
                previewer.mode = previews.NONE
                return
            reporter.preview(preview.event_data(step, total, frame_count))

        return on_latents

    def _render_upscale(self, record: JobRecord, data: bytes, cancel: threading.Event,
                        report) -> tuple[list[str], list[OutputImage], dict]:
        """An /upscale job on the model thread: its image through the upscaler, a progress step
        per tile, written as image_0.png."""
        spec, started = record.spec.upscale, time.perf_counter()
        limit = self.settings.inference.job_time_limit_s
        upscaler = self.upscalers.get(spec.plan)
        load_seconds = round(time.perf_counter() - started, 4)
        image = Image.open(io.BytesIO(data))
        total, done = upscaler.total_tiles(image.width, image.height, spec), [0]

        def on_tile() -> None:
            _stop_if_asked(cancel, started, limit)
            done[0] += 1
            report(0, done[0], total)

        out = upscaler.upscale(image, spec, on_tile)
        folder = _staging(self.settings.inference.output_dir, record)
        folder.mkdir(parents=True, exist_ok=True)
        out.save(folder / "image_0.png", format="PNG")
        (folder / "config.json").write_text(json.dumps({"job_id": record.job_id, "type": UPSCALE,
                                                        "params": record.spec.params}, indent=2) + "\n")
        final = self.settings.inference.output_dir / record.job_id / "image_0.png"
        info = [OutputImage(file_path=str(final), format=PNG, width=out.width, height=out.height, seed=0)]
        timings = {"load_upscaler": load_seconds, "upscale": round(time.perf_counter() - started - load_seconds, 4)}
        return [f"{record.job_id}/image_0.png"], info, timings

    def _load(self, record: JobRecord, hf_token: str | None):
        model, models = record.spec.model, self.settings.models
        if model.catalog:
            return catalog.load_catalog_pipeline(catalog.CATALOG[model.catalog], models, self.host.device,
                                                 self.host.dtype, hf_token)
        return load_pipeline(model.plan, self.host.device, self.host.dtype, models,
                             self.host.loading_stage(model.name))

    def _lora_file(self, lora: LoraSpec) -> Path:
        """The local file of a LoRA; URLs are downloaded once into a cache folder."""
        if lora.url is None:
            return Path(lora.path)
        cache = Path(tempfile.gettempdir()) / "loramesh-loras"
        target = cache / (hashlib.sha256(lora.url.encode()).hexdigest()[:32] + ".safetensors")
        if not target.is_file():
            data = media.fetch_url(lora.url, "loras.path", self.settings.media)
            cache.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".part")
            partial.write_bytes(data)
            partial.replace(target)
        return target

    # ---- results and events ------------------------------------------------------------

    async def _finish(self, record: JobRecord, status: str, error: str | None) -> None:
        previous = record.status

        def end(r: JobRecord) -> None:
            _check_still_ours(r, record)
            r.status, r.error, r.completed_at = status, error, time.time()
            if status == jobs.COMPLETED and r.progress:
                r.progress.percentage = 100.0

        record = await self.store.update(record.job_id, end)
        await self.store.drop_inputs(record)
        await jobs.publish_status(self.events, record, previous)
        metrics.observe_job("inference", record.spec.type, status, record.started_at)
        log.info("job ended", job_id=record.job_id, status=status, error=error)



def _staging(output_dir: Path, record: JobRecord) -> Path:
    """Where an attempt writes its files until it knows the job is still its own: a worker
    whose job was taken over must not overwrite the files of the one that took it."""
    return output_dir / record.job_id / f".attempt-{record.attempts}"


def _publish_files(staging: Path, folder: Path) -> None:
    for path in staging.iterdir():
        path.replace(folder / path.name)
    # Attempts before this one (a worker that exited mid-job) left their staging behind;
    # the job is this attempt's now, so theirs can go.
    for stale in folder.glob(".attempt-*"):
        if stale != staging:
            shutil.rmtree(stale, ignore_errors=True)


def _named_output(ours: JobRecord, name: str, current: JobRecord) -> None:
    """A download or hash job's result: the model file it made or hashed."""
    _check_still_ours(current, ours)
    current.outputs = [name]


class Superseded(Exception):
    """Another worker started the job after this one did."""


def _check_still_ours(current: JobRecord, ours: JobRecord) -> None:
    """Refuses a result of an attempt that is no longer the job's latest, or a second end."""
    if current.attempts != ours.attempts or current.is_final:
        raise Superseded


class ProgressReporter:
    """Carries progress from the model thread to NATS without holding up the steps: every
    step becomes a job_progress event, sent in order by one task on the event loop at most
    PROGRESS_BATCH_S after the step; the job record is rewritten at most twice a second."""

    def __init__(self, worker: Worker, record: JobRecord, loop: asyncio.AbstractEventLoop):
        self.worker = worker
        self.record = record
        self.loop = loop
        self.last_write = 0.0
        self.progress: Progress | None = None
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closing = asyncio.Event()
        self.sender = loop.create_task(self._send_all())

    def report(self, index: int, step: int, total: int, extra: dict | None = None) -> None:
        """Called on the model thread after each step; `extra` goes into the event as is."""
        self.progress = Progress.at(self.record.spec, index, step, total)
        write = time.monotonic() - self.last_write >= PROGRESS_WRITE_S
        if write:
            self.last_write = time.monotonic()
        self.loop.call_soon_threadsafe(self.queue.put_nowait, partial(self._send, self.progress, write, extra))

    def preview(self, data: dict) -> None:
        """Called on the model thread with a job_preview's fields; sent after the step's progress."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, partial(self._send_preview, data))

    async def _send_all(self) -> None:
        finished = False
        while not finished:
            batch = [await self.queue.get()]
            # Steps that end close together go out in one wake-up of NATS and its readers,
            # which on a busy CPU would otherwise preempt the denoising threads every step.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closing.wait(), PROGRESS_BATCH_S)
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            for item in batch:
                if item is None:
                    finished = True
                    break
                await item()

    async def _send(self, progress: Progress, write: bool, extra: dict | None) -> None:
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
            await self.worker.events.publish(self.record.job_id, events_pb2.EVENT_KIND_PROGRESS,
                                             {"job_id": self.record.job_id, **asdict(progress), **(extra or {})},
                                             confirmed=False)
            if write:
                await self.worker.store.update(self.record.job_id, lambda r: setattr(r, "progress", progress))

    async def _send_preview(self, data: dict) -> None:
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
            await self.worker.events.publish(self.record.job_id, events_pb2.EVENT_KIND_PREVIEW,
                                             {"job_id": self.record.job_id, **data}, confirmed=False)

    async def flush(self) -> None:
        """Sends what is left and writes the last progress into the record."""
        self.closing.set()
        self.queue.put_nowait(None)
        await self.sender
        if self.progress is not None:
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                await self.worker.store.update(self.record.job_id, lambda r: setattr(r, "progress", self.progress))
