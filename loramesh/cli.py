"""The `loramesh` command line: tag and caption datasets, train, generate, and look at the
mesh, over the Python client (native gRPC through the gateway).

Progress bars move on the services' own events (the trainer's log stream, a job's event
stream, each answered batch), never on a timer. Results go to stdout (`--json` for
machine-readable output), progress and notes to stderr. Anything a user can get wrong (a
missing folder, an unreachable gateway, a config the trainer refuses) ends with one line
on stderr and exit code 1.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.prompt import Prompt
from rich.table import Column, Table
from rich.text import Text

from loramesh.client import Client, LorameshError
from loramesh.client.errors import NotFound

app = typer.Typer(help="LoRA training, captioning, tagging and generation on a loramesh gateway.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

# No markup: tags, captions and paths are printed as they are, brackets included.
out = Console(highlight=False, markup=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, markup=False)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FINAL_SESSION_STATES = ("completed", "aborted", "failed")
FINAL_JOB_STATUSES = ("completed", "failed", "cancelled")


class UserError(Exception):
    """Something the user can fix; printed as one line."""


class Options:
    def __init__(self, url: str | None, token: str | None, api_key: str | None, as_json: bool):
        self.url, self.token, self.api_key, self.as_json = url, token, api_key, as_json


@app.callback()
def main(
    ctx: typer.Context,
    url: Annotated[str | None, typer.Option(envvar="LORAMESH_URL", help="Gateway URL (default http://localhost:8000).")] = None,
    token: Annotated[str | None, typer.Option(envvar="LORAMESH_TOKEN", help="JWT for the training task routes.")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="LORAMESH_API_KEY", help="X-Key for the finetune routes.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    ctx.obj = Options(url, token, api_key, as_json)


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """Every expected failure inside becomes one line on stderr and exit code 1."""
    try:
        yield
    except LorameshError as exc:
        message = exc.message or exc.code.name
        if "outside the allowed roots" in message:
            message += " (the services read files only inside their media roots: LORAMESH_MEDIA_ROOTS where they run)"
        fail(message)
    except (UserError, ValueError, OSError) as exc:
        fail(str(exc))


@contextlib.contextmanager
def connected(ctx: typer.Context) -> Iterator[Client]:
    """A client on a reachable gateway, inside guarded()."""
    options: Options = ctx.obj
    with guarded(), Client(options.url, token=options.token, api_key=options.api_key) as client:
        try:
            client.wait_ready(timeout=5)
        except LorameshError:
            raise UserError(f"cannot reach the loramesh gateway at {client.url} "
                            "(start it with `make run`, or point --url / LORAMESH_URL at it)") from None
        yield client


def fail(message: str) -> None:
    err.print(Text.assemble(("error:", "red"), " ", " ".join(message.split())), soft_wrap=True)
    raise typer.Exit(1)


def as_dict(message: Message) -> dict:
    """A message as the REST routes print it."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def print_json(value: Any) -> None:
    out.out(json.dumps(value, indent=2, ensure_ascii=False), highlight=False)


def new_table(*headers: str, title: str | None = None) -> Table:
    """Ids and paths fold onto more lines instead of being cut, so they can be copied."""
    return Table(*(Column(h, overflow="fold") for h in headers), title=title)


def progress_bar(*extra: TextColumn) -> Progress:
    # Narrow enough for an 80-column terminal with the training metrics; off when stderr is
    # not a terminal (a log file gets the notes and the result only).
    return Progress(TextColumn("{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), *extra, console=err,
                    disable=not err.is_terminal)


# ---- datasets: tag and caption --------------------------------------------------------------

def dataset_images(sources: list[Path]) -> list[Path]:
    """The images named on the command line, folders expanded (not recursively), in order."""
    images: list[Path] = []
    for source in sources:
        if source.is_dir():
            found = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not found:
                raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {source}")
            images += found
        elif source.is_file():
            images.append(source)
        else:
            raise UserError(f"no such file or folder: {source}")
    # Absolute, so the services (which read them inside their media roots) find them.
    return [Path(os.path.abspath(p)) for p in dict.fromkeys(images)]


def batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def write_texts(texts: dict[Path, str], overwrite: bool) -> tuple[int, int]:
    """Writes each image's caption or tags beside it as `<stem>.txt`; an existing file is
    kept unless `overwrite`. Returns (written, kept)."""
    written = kept = 0
    for image, text in texts.items():
        target = image.with_suffix(".txt")
        if target.exists() and not overwrite:
            kept += 1
            continue
        target.write_text(text + "\n", encoding="utf-8")
        written += 1
    return written, kept


def report_texts(written: int, kept: int) -> None:
    err.print(f"wrote {written} .txt file(s)" + (f"; kept {kept} existing (use --overwrite to replace them)"
                                                  if kept else ""))


def tag_line(tags: dict[str, float]) -> str:
    """kohya-style caption: the tags, best first, comma-separated."""
    return ", ".join(name for name, _ in sorted(tags.items(), key=lambda item: (-item[1], item[0])))


Sources = Annotated[list[Path], typer.Argument(help="Image files or dataset folders.", show_default=False)]


@app.command()
def tag(
    ctx: typer.Context,
    sources: Sources,
    threshold: Annotated[float | None, typer.Option(min=0, max=1, help="Minimum confidence of general tags (server default 0.35).")] = None,
    character_threshold: Annotated[float | None, typer.Option(min=0, max=1, help="Minimum confidence of character tags (server default 0.85).")] = None,
    model_path: Annotated[str | None, typer.Option(help="Tagger model folder or id (server default).")] = None,
    write_txt: Annotated[bool, typer.Option("--write-txt", help="Write <image>.txt with the tags beside each image.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing .txt files.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, max=256, help="Images per request.")] = 32,
) -> None:
    """Tag images with WD14 in batches; optionally write kohya-style .txt files."""
    with guarded():
        images = dataset_images(sources)
    with connected(ctx) as client:
        answers: dict[str, dict] = {}
        with progress_bar() as progress:
            task = progress.add_task("tagging", total=len(images))
            for batch in batches(images, batch_size):
                items = [{"media_path": str(p), "general_threshold": threshold,
                          "character_threshold": character_threshold} for p in batch]
                items = [{k: v for k, v in item.items() if v is not None} for item in items]
                answer = client.tagger.tag(input=items, model_path=model_path)
                answers.update(json_format.MessageToDict(answer))
                progress.advance(task, len(batch))
        texts = {p: tag_line(answers.get(str(p), {}).get("tags", {})) for p in images}
        if write_txt:
            report_texts(*write_texts(texts, overwrite))
        if ctx.obj.as_json:
            print_json({str(p): answers.get(str(p), {}) for p in images})
            return
        table = new_table("image", "tags")
        for image, line in texts.items():
            table.add_row(image.name, line)
        out.print(table)


@app.command()
def caption(
    ctx: typer.Context,
    sources: Sources,
    model: Annotated[str, typer.Option(help="florence2 or joycaption.")] = "florence2",
    model_path: Annotated[str | None, typer.Option(help="Caption model folder or id (server default).")] = None,
    task: Annotated[str | None, typer.Option(help="Florence-2 task, e.g. <DETAILED_CAPTION>.")] = None,
    prompt: Annotated[str | None, typer.Option(help="JoyCaption instruction.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(min=1, help="Most tokens per caption.")] = None,
    write_txt: Annotated[bool, typer.Option("--write-txt", help="Write <image>.txt with the caption beside each image.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing .txt files.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, max=64, help="Images per request.")] = 8,
) -> None:
    """Caption images with Florence-2 or JoyCaption in batches; optionally write .txt files."""
    if model not in ("florence2", "joycaption"):
        fail(f"--model must be florence2 or joycaption (got {model!r})")
    with guarded():
        images = dataset_images(sources)
    with connected(ctx) as client:
        options = {"model_type": model, "model_path": model_path, "task": task, "prompt": prompt,
                   "max_new_tokens": max_new_tokens}
        options = {k: v for k, v in options.items() if v is not None}
        captions: dict[Path, str] = {}
        with progress_bar() as progress:
            bar = progress.add_task("captioning", total=len(images))
            for batch in batches(images, batch_size):
                answer = client.captioner.caption_batch(image_paths=[str(p) for p in batch], options=options,
                                                        batch_size=batch_size)
                captions.update((Path(c.source), c.caption) for c in answer.captions)
                progress.advance(bar, len(batch))
        if write_txt:
            report_texts(*write_texts(captions, overwrite))
        if ctx.obj.as_json:
            print_json({str(p): captions.get(p, "") for p in images})
            return
        table = new_table("image", "caption")
        for image in images:
            table.add_row(image.name, captions.get(image, ""))
        out.print(table)


# ---- training --------------------------------------------------------------------------------

def load_config(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"no such config file: {path}")
    kind = path.suffix.lower()
    if kind not in (".yaml", ".yml", ".json"):
        raise UserError(f"{path}: the config must be a .yaml, .yml or .json file")
    text = path.read_text(encoding="utf-8")
    if kind == ".json":
        try:
            config = json.loads(text)
        except ValueError as exc:
            raise UserError(f"{path} is not valid JSON: {exc}") from None
    else:
        import yaml

        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UserError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: the config must be an object with `job` and `config` (an ai-toolkit job config)")
    return config


def session_name(config: dict) -> str:
    name = (config.get("config") or {}).get("name") if isinstance(config.get("config"), dict) else None
    if not isinstance(name, str) or not name:
        raise UserError("the config has no config.name; give --session-id")
    return name


@app.command()
def train(
    ctx: typer.Context,
    config_file: Annotated[Path, typer.Argument(metavar="CONFIG", help="ai-toolkit job config (.yaml or .json).")],
    steps: Annotated[int, typer.Option(min=1, help="Steps to grant.")],
    follow: Annotated[bool, typer.Option("--follow/--no-follow", help="Follow the training until the steps are trained.")] = True,
    session_id: Annotated[str | None, typer.Option(help="Session id (default: the config's name).")] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Most steps the session may train (default: train.steps).")] = None,
) -> None:
    """Create or resume a training session, grant STEPS and follow loss, lr, it/s and samples.
    Ctrl-C asks whether to abort (saving a checkpoint) or detach."""
    with guarded():
        config = load_config(config_file)
        sid = session_id or session_name(config)
    with connected(ctx) as client:
        since = time.time() - 2  # the log replays from the start: older warnings were seen before
        session = open_session(client, sid, config, max_steps)
        start = session.completed_steps
        session = client.trainer.grant_steps(session_id=sid, steps=steps)
        target = session.allowed_steps
        err.print(f"session {sid}: granted {steps} steps (trained {start}, budget {target} of {session.max_steps})")
        if follow:
            try:
                session = follow_session(client, sid, start, target, since)
            except KeyboardInterrupt:
                session = interrupted(client, sid)
        if ctx.obj.as_json:
            print_json(as_dict(session))
        elif session.state == "failed":
            fail(f"session {sid} failed: {session.error}")
        elif session.last_checkpoint_path:
            out.print(f"checkpoint: {session.last_checkpoint_path} (step {session.last_checkpoint_step}, "
                      f"state {session.state})")
        else:
            out.print(f"session {sid}: {session.state}, {session.completed_steps}/{session.allowed_steps} steps")


def open_session(client: Client, sid: str, config: dict, max_steps: int | None):
    """The live session `sid`, created from `config` when there is none. An aborted or failed
    one is recreated, which resumes from its newest checkpoint."""
    try:
        session = client.trainer.get_session(session_id=sid)
    except NotFound:
        session = None
    if session is not None and session.state == "completed":
        raise UserError(f"session {sid} has trained its max_steps ({session.max_steps}); delete it or give "
                        "another --session-id")
    if session is not None and session.state in ("aborted", "failed"):
        client.trainer.delete_session(session_id=sid)
        session = None
    if session is None:
        session = client.trainer.create_session(session_id=sid, config=config, max_steps=max_steps)
        err.print(f"session {sid} created ({session.state})")
    return session


def follow_session(client: Client, sid: str, start: int, target: int, since: float):
    """Follows the session's log stream until the grant is trained (or the session ends):
    each progress line moves the bar, samples are printed as they are written."""
    stream = client.trainer.stream_session_logs(session_id=sid, follow=True)
    metrics = TextColumn("{task.fields[metrics]}")
    with stream, progress_bar(metrics) as progress:
        bar = progress.add_task("training", total=target - start, metrics="")
        for line in stream:
            step = line.step if line.HasField("step") else None
            if line.kind == "preview" and step is not None and step > start:
                progress.console.print(f"sample: {line.message.removeprefix('sample written: ')}")
            elif line.level in ("warning", "error") and line.time.seconds >= since:
                progress.console.print(f"{line.level}: {line.message}")
            if line.kind == "progress" and step is not None and step > start:
                session = client.trainer.get_session(session_id=sid)
                progress.update(bar, completed=min(step, target) - start, metrics=training_metrics(session))
            elif line.kind == "status":
                session = client.trainer.get_session(session_id=sid)
                if session.state in FINAL_SESSION_STATES or (
                        session.state == "waiting" and session.completed_steps >= target
                        and session.last_checkpoint_step >= target):
                    progress.update(bar, completed=min(session.completed_steps, target) - start,
                                    metrics=training_metrics(session))
                    break
    return client.trainer.get_session(session_id=sid)


def training_metrics(session) -> str:
    parts = []
    if session.HasField("loss"):
        parts.append(f"loss {session.loss:.4f}")
    if session.HasField("learning_rate"):
        parts.append(f"lr {session.learning_rate:.2g}")
    if session.HasField("steps_per_second"):
        parts.append(f"{session.steps_per_second:.2f} it/s")
    return " ".join(parts)


def interrupted(client: Client, sid: str):
    try:
        choice = Prompt.ask("\nabort the session (saves a checkpoint) or detach (it keeps training)?",
                            choices=["abort", "detach"], default="detach", console=err)
    except EOFError:  # no terminal to answer from
        choice = "detach"
    if choice == "abort":
        err.print("aborting; waiting for the checkpoint ...")
        return client.trainer.abort_session(session_id=sid)
    err.print(f"detached; session {sid} keeps training (`loramesh sessions` shows it)")
    return client.trainer.get_session(session_id=sid)


# ---- generation ------------------------------------------------------------------------------

def parse_lora(spec: str) -> tuple[str, float]:
    """PATH:W (or PATH alone, weight 1.0)."""
    path, _, weight = spec.rpartition(":")
    if not path or "/" in weight or "\\" in weight:
        return spec, 1.0
    try:
        return path, float(weight)
    except ValueError:
        raise UserError(f"--lora {spec!r}: the weight after the last ':' must be a number, e.g. my.safetensors:0.8") \
            from None


def lora_name(path: str) -> str:
    suffix = Path(path).suffix
    return path[: -len(suffix)] if suffix in (".safetensors", ".ckpt", ".pt", ".bin", ".gguf") else path


@app.command()
def generate(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    model: Annotated[str | None, typer.Option(help="A catalog model (`loramesh models`: sdxl, flux, ...) or a "
                                                   "checkpoint file name of the models root; default: the loaded model.")] = None,
    lora: Annotated[list[str] | None, typer.Option(help="PATH:WEIGHT of a LoRA; repeat for several.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder the outputs are saved in.")] = Path("."),
    width: Annotated[int | None, typer.Option(min=64, max=4096)] = None,
    height: Annotated[int | None, typer.Option(min=64, max=4096)] = None,
    steps: Annotated[int | None, typer.Option(min=1, max=150)] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    negative: Annotated[str | None, typer.Option(help="Negative prompt.")] = None,
) -> None:
    """Generate an image: submit, follow its progress (and previews where the terminal shows
    images), save the outputs."""
    with guarded():
        loras = [parse_lora(spec) for spec in lora or []]
    with connected(ctx) as client:
        catalog = {m.id for m in client.inference.list_catalog_models().models}
        if model in catalog:
            item = {"prompt": prompt, "width": width, "height": height, "sample_steps": steps, "seed": seed,
                    "neg": negative}
            job_id = client.inference.create_inference(
                model=model, prompts=[{k: v for k, v in item.items() if v is not None}],
                loras=[{"path": path, "network_multiplier": weight} for path, weight in loras]).request_id
        else:
            if model:
                with err.status(f"loading {model} ..."):
                    client.inference.load_model(model_name=model)
            elif client.inference.list_models().loaded_model.WhichOneof("kind") != "string_value":
                raise UserError("no model is loaded; pass --model (a catalog id: "
                                f"{', '.join(sorted(catalog))}, or a checkpoint name from `loramesh models`)")
            # The generation server takes LoRAs as prompt tags naming files of its loras/ folder.
            tags = "".join(f" <lora:{lora_name(path)}:{weight:g}>" for path, weight in loras)
            job_id = client.inference.txt2img(prompt=prompt + tags, negative_prompt=negative, width=width,
                                              height=height, steps=steps, seed=seed).job_id
        err.print(f"job {job_id} queued")
        follow_job(client, job_id)
        job = client.inference.get_job(job_id=job_id)
        if job.status != "completed":
            raise UserError(f"job {job_id} {job.status}" + (f": {job.error}" if job.HasField("error") else ""))
        out_dir.mkdir(parents=True, exist_ok=True)
        saved = []
        for output in job.outputs:
            target = out_dir / Path(output).name
            target.write_bytes(client.inference.download_output(output))
            saved.append(str(target))
        if ctx.obj.as_json:
            print_json({"job_id": job_id, "outputs": saved, "params": json_format.MessageToDict(job.params)})
        else:
            for path in saved:
                out.print(f"saved {path}")


def follow_job(client: Client, job_id: str) -> None:
    """Follows a job's event stream to its end: progress moves the bar, previews are shown
    inline on terminals that display images."""
    with client.inference.stream_job_events(job_id=job_id) as stream, progress_bar() as progress:
        bar = progress.add_task("generating", total=None)
        for event in stream:
            data = json_format.MessageToDict(event.data)
            if event.event == "job_progress" and data.get("total_steps"):
                progress.update(bar, total=data["total_steps"], completed=data.get("step", 0))
            elif event.event == "job_preview" and data.get("image"):
                show_image(progress.console, data["image"])
            elif event.event == "job_status_changed" and data.get("status") in FINAL_JOB_STATUSES:
                if data.get("status") == "completed":
                    task = progress.tasks[0]
                    progress.update(bar, completed=task.total or 1, total=task.total or 1)
                break


def show_image(console: Console, data_url: str) -> None:
    """Draws an image inline with iTerm2's protocol (iTerm2, WezTerm); other terminals skip it."""
    if os.environ.get("TERM_PROGRAM") not in ("iTerm.app", "WezTerm") or not console.is_terminal:
        return
    payload = data_url.split(",", 1)[-1]
    size = len(base64.b64decode(payload))
    console.file.write(f"\x1b]1337;File=inline=1;size={size};height=8:{payload}\a\n")
    console.file.flush()


# ---- tables ----------------------------------------------------------------------------------

@app.command()
def sessions(ctx: typer.Context) -> None:
    """Training sessions, newest first."""
    with connected(ctx) as client:
        found = client.trainer.list_sessions().sessions
        if ctx.obj.as_json:
            return print_json([as_dict(s) for s in found])
        table = new_table("session", "state", "steps", "max", "loss", "checkpoint")
        for s in found:
            table.add_row(s.session_id, s.state, f"{s.completed_steps}/{s.allowed_steps}", str(s.max_steps),
                          f"{s.loss:.4f}" if s.HasField("loss") else "", s.last_checkpoint_path)
        out.print(table)


@app.command()
def jobs(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help="pending, processing, completed, failed or cancelled.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, max=1000)] = None,
) -> None:
    """Generation jobs in the queue and its history."""
    with connected(ctx) as client:
        queue = client.inference.list_queue(status=status, limit=limit)
        if ctx.obj.as_json:
            return print_json(as_dict(queue))
        table = new_table("job", "type", "status", "progress", "created", "outputs")
        for job in queue.items:
            table.add_row(job.job_id, job.type, job.status, f"{job.progress.percentage:.0f}%", job.created_at,
                          ", ".join(job.outputs))
        out.print(table)
        err.print(f"{queue.pending_count} pending, {queue.processing_count} processing, "
                  f"{queue.completed_count} completed, {queue.failed_count} failed, {queue.total_count} in all")


@app.command()
def models(ctx: typer.Context) -> None:
    """The catalog models of the async API and the model files of the generation server."""
    with connected(ctx) as client:
        catalog = client.inference.list_catalog_models().models
        files = client.inference.list_models()
        kinds = [f.name for f in files.DESCRIPTOR.fields if f.message_type and f.message_type.name == "ModelFile"]
        if ctx.obj.as_json:
            return print_json({"catalog": [as_dict(m) for m in catalog], "files": as_dict(files)})
        table = new_table("catalog model", "base model", "video", "default steps", title="catalog (--model)")
        for m in catalog:
            table.add_row(m.id, m.base_model, "yes" if m.is_video_model else "", str(m.default_steps))
        out.print(table)
        table = new_table("type", "name", "size", "loaded", title="model files")
        for kind in kinds:
            for f in getattr(files, kind):
                table.add_row(f.type, f.name, human_bytes(f.size_bytes), "yes" if f.is_loaded else "")
        out.print(table)


@app.command()
def free(
    ctx: typer.Context,
    timeout: Annotated[float | None, typer.Option(min=0.1, max=600, help="Seconds to wait for replicas.")] = None,
) -> None:
    """Free accelerator memory in every service (`POST /vram/free`)."""
    with connected(ctx) as client:
        answer = client.memory.free_vram(timeout_seconds=timeout)
        if ctx.obj.as_json:
            return print_json(as_dict(answer))
        table = new_table("service", "replica", "freed", "message")
        for report in answer.reports:
            table.add_row(report.service, report.replica, human_bytes(report.bytes_freed), report.message)
        out.print(table)
        out.print(f"total freed: {human_bytes(answer.total_bytes_freed)}")
        if answer.unanswered:
            err.print(f"did not answer: {', '.join(answer.unanswered)}")


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


if __name__ == "__main__":
    sys.exit(app(prog_name="loramesh"))
