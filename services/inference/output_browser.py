"""The output folder as people browse it: an HTML page per folder (sortable listing,
thumbnails, lightbox), raw bytes per file (read and sent in chunks, so neither memory nor
a gRPC message grows with the file), and cached thumbnails for images and videos.

Paths are relative to the output root and never leave it: `..`, absolute paths and
symlinks that lead outside are refused."""

from __future__ import annotations

import html
import mimetypes
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from urllib.parse import quote

from PIL import Image, ImageOps

from services.common.errors import InvalidInput, NotFound
from services.common.media import check_path_text, decode_image, first_video_frame, path_error, shown
from services.common.settings import MediaLimits

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mov", ".mkv")
SORTS = ("name", "size", "date")
ORDERS = ("asc", "desc")
THUMB_SIZE = (120, 120)
THUMBS_FOLDER = ".thumbs"
HTML_TYPE = "text/html; charset=utf-8"
# Bytes of a file per message: far below gRPC's default 4 MiB message limit, large enough
# that a big file costs few messages.
CHUNK_BYTES = 256 << 10

# mimetypes reads the system's tables, which lack some of these on minimal images.
_CONTENT_TYPES = {
    ".json": "application/json",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".mp4": "video/mp4",
    ".webm": "video/webm",
    ".avi": "video/x-msvideo",
    ".mov": "video/quicktime",
    ".mkv": "video/x-matroska",
}

# A video's thumbnail when no frame of it decodes.
VIDEO_PLACEHOLDER = b"""<svg xmlns="http://www.w3.org/2000/svg" width="120" height="120" viewBox="0 0 120 120">
<rect width="120" height="120" rx="8" fill="#1f2430"/>
<circle cx="60" cy="60" r="30" fill="#ffffff" fill-opacity="0.9"/>
<path d="M52 44 L78 60 L52 76 Z" fill="#1f2430"/>
</svg>
"""


def browse(root: Path, path: str, sort: str | None, order: str | None) -> tuple[str, Iterator[bytes]]:
    """(content_type, body chunks): the HTML browser for a folder, the raw bytes of a file.
    Every check happens here; the chunks only read what is already open."""
    sort_key = _choice("sort", sort, SORTS)
    sort_order = _choice("order", order, ORDERS)
    base = _real_root(root)
    parts = _parts(path)
    try:
        target = _resolve(base, parts, path)
        if target.is_dir() or (not parts and not target.exists()):
            page = _render_folder(base, parts, _listing(base, target, sort_key, sort_order), sort_key, sort_order)
            return HTML_TYPE, iter([page.encode()])
        if not target.is_file():
            raise NotFound(f"Not found: {shown(path)}")
        return content_type(target.name), _chunks(target.open("rb"))
    except (OSError, RuntimeError) as exc:  # link loops, unreadable files: the client's path, never ours
        raise path_error(exc, path, "path") from exc


def _chunks(file) -> Iterator[bytes]:
    """The rest of an open file in CHUNK_BYTES pieces (one empty piece for an empty file),
    closing it at the end."""
    with file:
        chunk = file.read(CHUNK_BYTES)
        yield chunk
        while chunk := file.read(CHUNK_BYTES):
            yield chunk


def thumbnail(root: Path, path: str, limits: MediaLimits | None = None) -> tuple[str, bytes]:
    """(content_type, body): a 120x120 centre-cropped JPEG of an image or of a video's first
    frame (cached in the folder's .thumbs/<stem>.jpg); an SVG play button for a video none of
    whose frames decodes."""
    parts = _parts(path)
    try:
        target = _resolve(_real_root(root), parts, path)
        if not target.exists():
            raise NotFound(f"Not found: {shown(path)}")
        extension = target.suffix.lower()
        if target.is_file() and extension in VIDEO_EXTENSIONS:
            limits = limits or MediaLimits()
            try:
                return "image/jpeg", _cached_thumbnail(target, limits, lambda: first_video_frame(target, "path", limits))
            except InvalidInput:
                return "image/svg+xml", VIDEO_PLACEHOLDER
        if not target.is_file() or extension not in IMAGE_EXTENSIONS:
            raise InvalidInput(
                "path", f"not an image or video (images: {', '.join(IMAGE_EXTENSIONS)}; "
                        f"videos: {', '.join(VIDEO_EXTENSIONS)}; got {shown(path)})"
            )
        return "image/jpeg", _cached_thumbnail(target, limits or MediaLimits())
    except (OSError, RuntimeError) as exc:
        raise path_error(exc, path, "path") from exc


def content_type(name: str) -> str:
    extension = Path(name).suffix.lower()
    if extension in _CONTENT_TYPES:
        return _CONTENT_TYPES[extension]
    guessed, _ = mimetypes.guess_type(name, strict=False)
    return guessed or "application/octet-stream"


def format_size(size: int) -> str:
    """1536 -> "1.5 KB" (binary multiples, as file browsers show them)."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KB", "MB", "GB", "TB"):
        value /= 1024
        if value < 1024 or unit == "TB":
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- paths


def _choice(field: str, value: str | None, allowed: tuple[str, ...]) -> str:
    if value is None or value == "":
        return allowed[0]
    if value.lower() not in allowed:
        raise InvalidInput(field, f"must be one of {', '.join(allowed)} (got {value!r})")
    return value.lower()


def _real_root(root: Path) -> Path:
    return Path(root).resolve()


def _parts(path: str) -> list[str]:
    """The components of a request path; empty and "." components are dropped."""
    check_path_text(path, "path")
    if "\\" in path:
        raise InvalidInput("path", f"must not contain backslashes (got {shown(path)})")
    if path.startswith("/"):
        raise InvalidInput("path", f"must be relative to the output folder, not absolute (got {shown(path)})")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise InvalidInput("path", f"must not contain '..' (got {shown(path)})")
    return parts


def _resolve(base: Path, parts: list[str], raw: str) -> Path:
    """The real path of `parts` under `base`, following symlinks; refuses one that leaves it."""
    target = base.joinpath(*parts).resolve()
    if not target.is_relative_to(base):
        raise InvalidInput("path", f"{shown(raw)} leads outside the output folder")
    if parts and not target.exists():
        raise NotFound(f"Not found: {shown(raw)}")
    return target


# ---------------------------------------------------------------- listing


@dataclass(frozen=True)
class Entry:
    name: str
    is_dir: bool
    size: int
    mtime: float
    kind: str  # "folder", "image", "video" or "file"


def _listing(base: Path, folder: Path, sort: str, order: str) -> list[Entry]:
    entries = []
    if folder.is_dir():
        for item in os.scandir(folder):
            if item.name.startswith("."):
                continue  # .thumbs and other hidden files
            try:
                if item.is_symlink() and not Path(item.path).resolve().is_relative_to(base):
                    continue  # a link out of the output folder is never shown (nor served)
                info = item.stat()
                is_dir = item.is_dir()
            except (OSError, RuntimeError):
                continue  # dangling link, link loop or vanished meanwhile
            entries.append(Entry(item.name, is_dir, 0 if is_dir else info.st_size, info.st_mtime, _kind(item.name, is_dir)))
    reverse = order == "desc"
    ordered = sorted(entries, key=lambda e: (e.name.casefold(), e.name), reverse=sort == "name" and reverse)
    # Stable sorts keep name order among equals; folders (no size of their own) keep it under "size".
    if sort == "size":
        ordered.sort(key=lambda e: e.size, reverse=reverse)
    elif sort == "date":
        ordered.sort(key=lambda e: e.mtime, reverse=reverse)
    return [e for e in ordered if e.is_dir] + [e for e in ordered if not e.is_dir]


def _kind(name: str, is_dir: bool) -> str:
    if is_dir:
        return "folder"
    extension = Path(name).suffix.lower()
    if extension in IMAGE_EXTENSIONS:
        return "image"
    if extension in VIDEO_EXTENSIONS:
        return "video"
    return "file"


# ---------------------------------------------------------------- thumbnails


def _cached_thumbnail(source: Path, limits: MediaLimits, decode=None) -> bytes:
    """`decode` gives the picture to thumbnail (default: the file as an image)."""
    cache = source.parent / THUMBS_FOLDER / f"{source.stem}.jpg"
    source_mtime = source.stat().st_mtime_ns
    try:
        # The cache carries its source's mtime: a changed source (or another file with the
        # same stem) makes it stale.
        if cache.stat().st_mtime_ns == source_mtime:
            return cache.read_bytes()
    except OSError:
        pass
    image = decode() if decode is not None else decode_image(source.read_bytes(), "path", limits)
    image = ImageOps.exif_transpose(image)
    thumb = ImageOps.fit(_flatten(image), THUMB_SIZE, Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    buffer = BytesIO()
    thumb.save(buffer, "JPEG", quality=85)
    data = buffer.getvalue()
    _store(cache, data, source_mtime)
    return data


def _flatten(image: Image.Image) -> Image.Image:
    """RGB, with transparent areas on white."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def _store(cache: Path, data: bytes, mtime_ns: int) -> None:
    """Writes the cache file atomically (replicas share the folder); a read-only output
    folder just means no cache."""
    try:
        cache.parent.mkdir(exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=cache.parent, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            os.utime(temporary, ns=(mtime_ns, mtime_ns))
            os.replace(temporary, cache)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError:
        pass


# ---------------------------------------------------------------- page


def _href(prefix: str, parts: list[str]) -> str:
    return html.escape(prefix + quote("/".join(parts), safe="/"))


def _render_folder(base: Path, parts: list[str], entries: list[Entry], sort: str, order: str) -> str:
    title = "/".join(parts) or "Output"
    crumbs = ['<a href="/output">output</a>' if parts else '<span aria-current="page">output</span>']
    for depth, part in enumerate(parts, 1):
        if depth == len(parts):
            crumbs.append(f'<span aria-current="page">{html.escape(part)}</span>')
        else:
            crumbs.append(f'<a href="{_href("/output/", parts[:depth])}">{html.escape(part)}</a>')

    rows = []
    if parts:
        parent = _href("/output/", parts[:-1]) if len(parts) > 1 else "/output"
        rows.append(
            f'<tr class="up"><td class="icon"><a href="{parent}" tabindex="-1"><svg class="glyph"><use href="#i-up"/>'
            f'</svg></a></td><td class="name" colspan="3"><a href="{parent}">Parent folder</a></td></tr>'
        )
    media_index = 0
    for entry in entries:
        href = _href("/output/", [*parts, entry.name])
        name = html.escape(entry.name)
        modified = datetime.fromtimestamp(entry.mtime, UTC)
        date = (f'<time datetime="{modified.isoformat(timespec="seconds")}">'
                f'{modified.strftime("%Y-%m-%d %H:%M")}</time>')
        if entry.kind in ("image", "video"):
            thumb = _href("/thumb/", [*parts, entry.name])
            opener = f'data-open="{media_index}"'
            icon = (f'<a href="{href}" {opener} tabindex="-1"><img class="thumb" src="{thumb}" loading="lazy"'
                    f' width="64" height="64" alt=""></a>')
            rows.append(
                f'<tr class="file {entry.kind}" data-media="{entry.kind}" data-src="{href}" data-name="{name}">'
                f'<td class="icon">{icon}</td><td class="name"><a href="{href}" {opener}>{name}</a></td>'
                f'<td class="size" data-bytes="{entry.size}">{format_size(entry.size)}</td><td class="date">{date}</td></tr>'
            )
            media_index += 1
        elif entry.is_dir:
            rows.append(
                f'<tr class="dir"><td class="icon"><a href="{href}" tabindex="-1"><svg class="glyph">'
                f'<use href="#i-folder"/></svg></a></td><td class="name"><a href="{href}">{name}/</a></td>'
                f'<td class="size">—</td><td class="date">{date}</td></tr>'
            )
        else:
            rows.append(
                f'<tr class="file"><td class="icon"><a href="{href}" tabindex="-1"><svg class="glyph">'
                f'<use href="#i-file"/></svg></a></td><td class="name"><a href="{href}">{name}</a></td>'
                f'<td class="size" data-bytes="{entry.size}">{format_size(entry.size)}</td><td class="date">{date}</td></tr>'
            )
    if not entries:
        rows.append('<tr class="empty"><td colspan="4">This folder is empty.</td></tr>')

    folders = sum(e.is_dir for e in entries)
    files = len(entries) - folders
    total = sum(e.size for e in entries if not e.is_dir)
    stats = (f'<span data-stat="folders">{folders} folder{"" if folders == 1 else "s"}</span> · '
             f'<span data-stat="files">{files} file{"" if files == 1 else "s"}</span> · '
             f'<span data-stat="size" data-bytes="{total}">{format_size(total)}</span>')

    headers = []
    for column, label in (("name", "Name"), ("size", "Size"), ("date", "Modified (UTC)")):
        current = column == sort
        next_order = ("desc" if order == "asc" else "asc") if current else "asc"
        arrow = (" ▲" if order == "asc" else " ▼") if current else ""
        aria = f' aria-sort="{"ascending" if order == "asc" else "descending"}"' if current else ""
        css = f' class="col-{column}{" sorted" if current else ""}"'
        colspan = ' colspan="2"' if column == "name" else ""
        headers.append(f'<th{css}{colspan}{aria}><a href="?sort={column}&amp;order={next_order}">{label}{arrow}</a></th>')

    return _PAGE.format(
        title=html.escape(title), breadcrumbs=' <span class="sep">/</span> '.join(crumbs), stats=stats,
        headers="".join(headers), rows="\n".join(rows), css=_CSS, js=_JS,
    )


_CSS = """
:root { color-scheme: light; --fg: #1d2330; --muted: #6b7385; --line: #e3e6ed; --accent: #3558d6; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); background: #f6f7fa; }
header { padding: 16px 24px 8px; }
nav.crumbs { font-size: 16px; font-weight: 600; word-break: break-all; }
nav.crumbs a { color: var(--accent); text-decoration: none; }
nav.crumbs a:hover { text-decoration: underline; }
nav.crumbs .sep { color: var(--muted); margin: 0 2px; }
.stats { color: var(--muted); margin-top: 4px; }
main { padding: 0 24px 24px; }
table { width: 100%; border-collapse: collapse; background: #fff; border: 1px solid var(--line); border-radius: 8px; overflow: hidden; }
th, td { padding: 6px 10px; text-align: left; border-bottom: 1px solid var(--line); vertical-align: middle; }
th { background: #eef0f5; font-weight: 600; white-space: nowrap; }
th a { color: inherit; text-decoration: none; }
th.sorted a { color: var(--accent); }
td.icon { width: 80px; text-align: center; }
td.size, th.col-size { width: 110px; text-align: right; white-space: nowrap; }
td.date, th.col-date { width: 170px; white-space: nowrap; color: var(--muted); }
td.name a { color: var(--fg); text-decoration: none; word-break: break-all; }
td.name a:hover { color: var(--accent); text-decoration: underline; }
tr.dir td.name a { font-weight: 600; }
tr.empty td { color: var(--muted); text-align: center; padding: 24px; }
img.thumb { display: block; margin: auto; width: 64px; height: 64px; object-fit: cover; border-radius: 4px; background: #e9ecf2; }
img.thumb.broken { visibility: hidden; }
svg.glyph { width: 32px; height: 32px; display: block; margin: auto; }
.lightbox { position: fixed; inset: 0; background: rgba(10, 12, 18, 0.92); display: flex; align-items: center; justify-content: center; z-index: 10; }
.lightbox[hidden] { display: none; }
.lightbox figure { margin: 0; max-width: 88vw; max-height: 92vh; display: flex; flex-direction: column; align-items: center; }
.lightbox img, .lightbox video { max-width: 88vw; max-height: 84vh; object-fit: contain; background: #000; }
.lightbox figcaption { color: #d8dbe3; margin-top: 8px; word-break: break-all; }
.lightbox button { position: absolute; background: none; border: 0; color: #fff; font-size: 40px; cursor: pointer; padding: 8px 16px; opacity: 0.8; }
.lightbox button:hover { opacity: 1; }
.lightbox .close { top: 8px; right: 12px; }
.lightbox .prev { left: 8px; top: 50%; transform: translateY(-50%); }
.lightbox .next { right: 8px; top: 50%; transform: translateY(-50%); }
"""

_JS = """
(() => {
  // Thumbnails: report when every one has settled (body[data-thumbs="ready"]), hide broken ones.
  const thumbs = Array.from(document.querySelectorAll("img.thumb"));
  let pending = thumbs.length;
  const finish = () => {
    document.body.dataset.thumbsLoaded = thumbs.filter((img) => img.complete && img.naturalWidth > 0).length;
    document.body.dataset.thumbs = "ready";
  };
  const settle = (img) => {
    if (img.complete && img.naturalWidth === 0) img.classList.add("broken");
    if (--pending === 0) finish();
  };
  if (!thumbs.length) finish();
  thumbs.forEach((img) => {
    if (img.complete) settle(img);
    else {
      img.addEventListener("load", () => settle(img), { once: true });
      img.addEventListener("error", () => settle(img), { once: true });
    }
  });

  // Lightbox: images and videos of this folder, full size, with previous/next.
  const media = Array.from(document.querySelectorAll("tr[data-media]")).map((row) => ({
    kind: row.dataset.media, src: row.dataset.src, name: row.dataset.name,
  }));
  const box = document.getElementById("lightbox");
  const stage = box.querySelector(".stage");
  const caption = box.querySelector("figcaption");
  let current = -1;
  const show = (index) => {
    current = (index + media.length) % media.length;
    const item = media[current];
    const element = document.createElement(item.kind === "video" ? "video" : "img");
    if (item.kind === "video") { element.controls = true; element.autoplay = true; }
    else element.alt = item.name;
    element.src = item.src;
    stage.replaceChildren(element);
    caption.textContent = `${item.name} (${current + 1} / ${media.length})`;
    box.hidden = false;
    box.dataset.index = current;
  };
  const close = () => {
    box.hidden = true;
    stage.replaceChildren();
    current = -1;
    delete box.dataset.index;
  };
  document.querySelectorAll("a[data-open]").forEach((link) => {
    link.addEventListener("click", (event) => {
      if (event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
      event.preventDefault();
      show(Number(link.dataset.open));
    });
  });
  box.addEventListener("click", (event) => {
    const button = event.target.closest("button");
    if (button) { event.stopPropagation(); button.classList.contains("close") ? close() : show(current + (button.classList.contains("next") ? 1 : -1)); return; }
    if (event.target.tagName !== "VIDEO") close();  // video clicks belong to its controls
  });
  document.addEventListener("keydown", (event) => {
    if (box.hidden) return;
    if (event.key === "Escape") close();
    else if (event.key === "ArrowRight") show(current + 1);
    else if (event.key === "ArrowLeft") show(current - 1);
  });
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="icon" href="data:,">
<style>{css}</style>
</head>
<body>
<svg width="0" height="0" style="position:absolute" aria-hidden="true">
  <symbol id="i-folder" viewBox="0 0 32 32"><path d="M3 8a2 2 0 0 1 2-2h7l3 3h12a2 2 0 0 1 2 2v14a2 2 0 0 1-2 2H5a2 2 0 0 1-2-2z" fill="#f2b84b"/><path d="M3 12h26v13a2 2 0 0 1-2 2H5a2 2 0 0 1-2-2z" fill="#f7cd6e"/></symbol>
  <symbol id="i-file" viewBox="0 0 32 32"><path d="M8 3h11l7 7v17a2 2 0 0 1-2 2H8a2 2 0 0 1-2-2V5a2 2 0 0 1 2-2z" fill="#c9d0de"/><path d="M19 3v7h7z" fill="#9aa4b8"/></symbol>
  <symbol id="i-up" viewBox="0 0 32 32"><path d="M16 6l9 10h-6v10h-6V16H7z" fill="#8a93a6"/></symbol>
</svg>
<header>
<nav class="crumbs" aria-label="Breadcrumb">{breadcrumbs}</nav>
<div class="stats">{stats}</div>
</header>
<main>
<table>
<thead><tr>{headers}</tr></thead>
<tbody>
{rows}
</tbody>
</table>
</main>
<div id="lightbox" class="lightbox" role="dialog" aria-modal="true" aria-label="Preview" hidden>
<button type="button" class="close" aria-label="Close">×</button>
<button type="button" class="prev" aria-label="Previous">‹</button>
<figure><div class="stage"></div><figcaption></figcaption></figure>
<button type="button" class="next" aria-label="Next">›</button>
</div>
<script>{js}</script>
</body>
</html>
"""
