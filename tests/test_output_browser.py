"""The /output browser and /thumb: listings, sorting, breadcrumbs, escaping, path
confinement, thumbnails and their cache, and the page as headless Chromium renders it."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import threading
import xml.etree.ElementTree as ElementTree
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import av
import grpc
import httpx
import pytest
from PIL import Image, ImageOps

from loramesh.v1 import inference_pb2, inference_pb2_grpc
from services.common.errors import InvalidInput, NotFound
from services.common.settings import MediaLimits
from services.inference.output_browser import CHUNK_BYTES, browse, thumbnail
from tests.conftest import write_image, write_video

JOB = "550e8400-e29b-41d4-a716-446655440000"
VIDEO_JOB = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
MAGENTA = (230, 30, 200)
GREEN = (20, 200, 60)
# Bands a centre crop must cut away.
RED = (255, 0, 0)
BLUE = (0, 0, 255)
CHROMIUM = Path("/usr/bin/chromium")


def banded_image(path: Path, centre: tuple[int, int, int], size=(360, 120)) -> Path:
    """A red | centre | blue image (side by side when wide, stacked when tall)."""
    width, height = size
    image = Image.new("RGB", size, centre)
    if width >= height:
        image.paste(RED, (0, 0, width // 3, height))
        image.paste(BLUE, (2 * width // 3, 0, width, height))
    else:
        image.paste(RED, (0, 0, width, height // 3))
        image.paste(BLUE, (0, 2 * height // 3, width, height))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


@pytest.fixture
def output_root(tmp_path) -> Path:
    """Laid out as the worker writes jobs: images, config.json, a video job, a thumbnail cache."""
    root = tmp_path / "output"
    banded_image(root / JOB / "image_0.png", MAGENTA)
    banded_image(root / JOB / "image_1.png", GREEN, size=(120, 360))
    (root / JOB / "config.json").write_text(json.dumps({"prompt": "a lighthouse", "seed": 42}))
    (root / JOB / ".thumbs").mkdir()
    write_video(root / VIDEO_JOB / "video.mp4")
    (root / VIDEO_JOB / "config.json").write_text("{}")
    (root / "queue_state.json").write_text("[]")
    (root / ".secret-notes").write_text("not listed")
    return root


def names(page: str) -> list[str]:
    """Entry names in the order the table lists them."""
    return [html.unescape(n) for n in re.findall(r'<td class="name"><a href="[^"]*"(?: data-open="\d+")?>([^<]*)</a>', page)]


def fetch(root: Path, path: str, sort=None, order=None) -> tuple[str, bytes]:
    """(content type, the whole body) of a /output answer."""
    content_type, chunks = browse(root, path, sort, order)
    return content_type, b"".join(chunks)


def page_of(root: Path, path: str = "", sort=None, order=None) -> str:
    content_type, body = fetch(root, path, sort, order)
    assert content_type.startswith("text/html")
    return body.decode()


def field_of(excinfo) -> str:
    return excinfo.value.violations[0][0]


# ---------------------------------------------------------------- folders


def test_root_lists_job_folders_first_and_hides_dotfiles(output_root):
    page = page_of(output_root)
    assert names(page) == [f"{JOB}/", f"{VIDEO_JOB}/", "queue_state.json"]
    assert "secret-notes" not in page and "/.thumbs" not in page
    assert f'href="/output/{JOB}"' in page
    assert 'data-stat="folders">2 folders' in page
    assert 'data-stat="files">1 file<' in page


def test_job_folder_lists_files_with_thumbnails_sizes_dates_and_statistics(output_root):
    page = page_of(output_root, JOB)
    assert names(page) == ["config.json", "image_0.png", "image_1.png"]
    assert f'<img class="thumb" src="/thumb/{JOB}/image_0.png" loading="lazy"' in page
    assert f'src="/thumb/{JOB}/config.json"' not in page
    total = sum(p.stat().st_size for p in (output_root / JOB).iterdir() if p.is_file())
    assert f'data-stat="size" data-bytes="{total}"' in page
    assert 'data-stat="folders">0 folders' in page and 'data-stat="files">3 files' in page
    assert re.search(r'<time datetime="\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00">', page)
    assert re.search(r'data-bytes="\d+">\d+(\.\d)? (B|KB)<', page)
    # Parent link back to the root, and the lightbox carries full-size sources.
    assert 'href="/output">Parent folder' in page
    assert f'data-src="/output/{JOB}/image_0.png"' in page
    assert 'id="lightbox"' in page


def test_video_rows_get_a_thumbnail_and_open_in_the_lightbox(output_root):
    page = page_of(output_root, VIDEO_JOB)
    assert f'src="/thumb/{VIDEO_JOB}/video.mp4"' in page
    assert 'data-media="video"' in page


def test_page_is_self_contained(output_root):
    page = page_of(output_root, JOB)
    assert "<style>" in page and "<script>" in page
    assert "<script src" not in page and 'rel="stylesheet"' not in page
    for url in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert url.startswith(("/output", "/thumb/", "?", "#", "data:")), url


def test_breadcrumbs_link_every_ancestor(output_root):
    (output_root / JOB / "upscaled" / "x4").mkdir(parents=True)
    page = page_of(output_root, f"{JOB}/upscaled/x4")
    crumbs = re.search(r'<nav class="crumbs"[^>]*>(.*?)</nav>', page, re.S).group(1)
    assert re.findall(r'href="([^"]*)"', crumbs) == ["/output", f"/output/{JOB}", f"/output/{JOB}/upscaled"]
    assert '<span aria-current="page">x4</span>' in crumbs
    assert f'href="/output/{JOB}/upscaled">Parent folder' in page
    assert "This folder is empty." in page
    # The root is its own (unlinked) crumb.
    assert '<span aria-current="page">output</span>' in page_of(output_root)


@pytest.fixture
def sortable(tmp_path) -> Path:
    root = tmp_path / "sortable"
    layout = {  # name: (size, age in hours)
        "b.png": (300, 1), "A.txt": (100, 3), "c.json": (200, 2),
    }
    for name, (size, age) in layout.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
        os.utime(path, (1_700_000_000 - age * 3600,) * 2)
    for name, age in (("zeta", 5), ("Alpha", 4)):
        (root / name).mkdir()
        os.utime(root / name, (1_700_000_000 - age * 3600,) * 2)
    return root


@pytest.mark.parametrize(("sort", "order", "expected"), [
    (None, None, ["Alpha/", "zeta/", "A.txt", "b.png", "c.json"]),
    ("name", "asc", ["Alpha/", "zeta/", "A.txt", "b.png", "c.json"]),
    ("name", "desc", ["zeta/", "Alpha/", "c.json", "b.png", "A.txt"]),
    ("size", "asc", ["Alpha/", "zeta/", "A.txt", "c.json", "b.png"]),
    ("size", "desc", ["Alpha/", "zeta/", "b.png", "c.json", "A.txt"]),
    ("date", "asc", ["zeta/", "Alpha/", "A.txt", "c.json", "b.png"]),
    ("date", "desc", ["Alpha/", "zeta/", "b.png", "c.json", "A.txt"]),
])
def test_sorting_keeps_folders_first(sortable, sort, order, expected):
    assert names(page_of(sortable, "", sort, order)) == expected


def test_sort_headers_mark_the_current_column_and_link_the_flipped_order(sortable):
    page = page_of(sortable, "", "size", "desc")
    assert re.search(r'<th class="col-size sorted" aria-sort="descending"><a href="\?sort=size&amp;order=asc">Size ▼', page)
    assert '<a href="?sort=name&amp;order=asc">Name</a>' in page
    assert '<a href="?sort=date&amp;order=asc">Modified (UTC)</a>' in page
    assert page.count(" sorted") == 1


@pytest.mark.parametrize(("sort", "order", "field"), [("colour", "asc", "sort"), ("name", "up", "order")])
def test_unknown_sort_or_order_is_refused_naming_the_choices(output_root, sort, order, field):
    with pytest.raises(InvalidInput) as excinfo:
        browse(output_root, "", sort, order)
    assert field_of(excinfo) == field
    assert all(choice in str(excinfo.value) for choice in (("name", "size", "date") if field == "sort" else ("asc", "desc")))


def test_hostile_names_are_escaped_and_quoted(output_root):
    hostile = "<img src=x onerror=alert(1)>.png"
    Image.new("RGB", (8, 8), BLUE).save(output_root / JOB / hostile)
    (output_root / JOB / 'a"b&c d#e?.txt').write_text("x")
    page = page_of(output_root, JOB)
    assert "<img src=x" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in page
    quoted = "%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E.png"
    assert f'href="/output/{JOB}/{quoted}"' in page
    assert f'src="/thumb/{JOB}/{quoted}"' in page
    assert f'href="/output/{JOB}/a%22b%26c%20d%23e%3F.txt">a&quot;b&amp;c d#e?.txt<' in page
    assert hostile in names(page)
    # The quoted link, once unquoted by the server, serves the file.
    assert browse(output_root, unquote(f"{JOB}/{quoted}"), None, None)[0] == "image/png"


# ---------------------------------------------------------------- files


@pytest.mark.parametrize(("name", "content_type"), [
    ("image_0.png", "image/png"), ("config.json", "application/json"),
    ("photo.JPG", "image/jpeg"), ("notes.unknownext", "application/octet-stream"),
])
def test_files_come_back_raw_with_their_content_type(output_root, name, content_type):
    path = output_root / JOB / name
    if not path.exists():
        path.write_bytes(b"\x00\x01payload")
    got_type, body = fetch(output_root, f"{JOB}/{name}")
    assert got_type == content_type
    assert body == path.read_bytes()


def test_video_file_is_served_as_video(output_root):
    content_type, body = fetch(output_root, f"{VIDEO_JOB}/video.mp4")
    assert content_type == "video/mp4" and body == (output_root / VIDEO_JOB / "video.mp4").read_bytes()


def test_files_are_read_in_bounded_chunks(output_root):
    data = os.urandom(3 * CHUNK_BYTES + 5)
    (output_root / JOB / "big.bin").write_bytes(data)
    _, chunks = browse(output_root, f"{JOB}/big.bin", None, None)
    sizes = [len(chunk) for chunk in chunks]
    assert sizes == [CHUNK_BYTES] * 3 + [5]
    (output_root / JOB / "empty.bin").write_bytes(b"")
    assert list(browse(output_root, f"{JOB}/empty.bin", None, None)[1]) == [b""]


def test_trailing_slash_and_dot_segments_name_the_same_folder(output_root):
    assert names(page_of(output_root, f"{JOB}/")) == names(page_of(output_root, f"./{JOB}"))


# ---------------------------------------------------------------- confinement


@pytest.fixture
def outside(tmp_path) -> Path:
    secret = tmp_path / "secret"
    secret.mkdir()
    write_image(secret / "private.png", size=(32, 32))
    (secret / "passwd").write_text("root:x:0:0")
    return secret


@pytest.mark.parametrize("path", ["..", "../secret/passwd", f"{JOB}/../../secret", "/etc/passwd",
                                  f"{JOB}\\image_0.png", "image\x00.png"])
@pytest.mark.parametrize("function", ["browse", "thumbnail"])
def test_escaping_paths_are_invalid(output_root, outside, path, function):
    with pytest.raises(InvalidInput) as excinfo:
        browse(output_root, path, None, None) if function == "browse" else thumbnail(output_root, path)
    assert field_of(excinfo) == "path"


def test_symlinks_out_of_the_root_are_refused_and_not_listed(output_root, outside):
    (output_root / "escape").symlink_to(outside)
    (output_root / JOB / "private.png").symlink_to(outside / "private.png")
    (output_root / "alias").symlink_to(output_root / JOB)  # inside: fine
    for path in ("escape", "escape/passwd", f"{JOB}/private.png"):
        with pytest.raises(InvalidInput):
            browse(output_root, path, None, None)
    with pytest.raises(InvalidInput):
        thumbnail(output_root, f"{JOB}/private.png")
    listed = names(page_of(output_root)) + names(page_of(output_root, JOB))
    assert "escape/" not in listed and "private.png" not in listed
    assert "alias/" in listed
    assert names(page_of(output_root, "alias")) == names(page_of(output_root, JOB))


def test_missing_paths_are_not_found(output_root):
    for call in (lambda: browse(output_root, f"{JOB}/image_9.png", None, None),
                 lambda: browse(output_root, "no-such-job", None, None),
                 lambda: thumbnail(output_root, f"{JOB}/image_9.png")):
        with pytest.raises(NotFound, match="image_9.png|no-such-job"):
            call()


def test_a_fresh_output_root_shows_an_empty_browser(tmp_path):
    page = page_of(tmp_path / "not-created-yet")
    assert "This folder is empty." in page and 'data-stat="files">0 files' in page


# ---------------------------------------------------------------- thumbnails


def decode(body: bytes) -> Image.Image:
    image = Image.open(BytesIO(body))
    image.load()
    return image


def near(pixel, colour, tolerance=24) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour, strict=False))


@pytest.mark.parametrize(("name", "colour"), [("image_0.png", MAGENTA), ("image_1.png", GREEN)])
def test_image_thumbnail_is_a_centre_crop_of_120_pixels(output_root, name, colour):
    content_type, body = thumbnail(output_root, f"{JOB}/{name}")
    assert content_type == "image/jpeg"
    thumb = decode(body)
    assert thumb.format == "JPEG" and thumb.size == (120, 120)
    # The red and blue bands lie outside the centred square.
    for point in ((3, 3), (60, 60), (116, 116), (3, 116), (116, 3)):
        assert near(thumb.getpixel(point), colour), (point, thumb.getpixel(point))


def test_thumbnail_is_cached_and_regenerated_when_the_source_changes(output_root):
    source = output_root / JOB / "image_0.png"
    cache = output_root / JOB / ".thumbs" / "image_0.jpg"
    first = thumbnail(output_root, f"{JOB}/image_0.png")[1]
    assert cache.read_bytes() == first
    written = cache.stat().st_mtime_ns
    assert thumbnail(output_root, f"{JOB}/image_0.png")[1] == first
    assert cache.stat().st_mtime_ns == written, "a fresh cache is served, not rewritten"

    Image.new("RGB", (200, 200), GREEN).save(source)
    later = source.stat().st_mtime + 5
    os.utime(source, (later, later))
    updated = decode(thumbnail(output_root, f"{JOB}/image_0.png")[1])
    assert near(updated.getpixel((60, 60)), GREEN)
    assert near(decode(cache.read_bytes()).getpixel((60, 60)), GREEN)
    assert [p.name for p in cache.parent.iterdir()] == ["image_0.jpg"], "no temporary files left behind"


def test_thumbnail_of_every_image_format_and_of_a_transparent_image(output_root):
    for extension in (".jpg", ".jpeg", ".gif", ".webp", ".bmp"):
        Image.new("RGB", (240, 160), MAGENTA).save(output_root / JOB / f"pic{extension}")
        assert decode(thumbnail(output_root, f"{JOB}/pic{extension}")[1]).size == (120, 120)
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(output_root / JOB / "clear.png")
    assert near(decode(thumbnail(output_root, f"{JOB}/clear.png")[1]).getpixel((60, 60)), (255, 255, 255))


def test_thumbnails_work_when_the_cache_cannot_be_written(output_root):
    (output_root / JOB / ".thumbs").rmdir()
    (output_root / JOB / ".thumbs").write_text("a file where the cache folder would go")
    assert decode(thumbnail(output_root, f"{JOB}/image_0.png")[1]).size == (120, 120)


def first_frame(path: Path) -> Image.Image:
    with av.open(str(path)) as container:
        return next(container.decode(video=0)).to_image()


def mean_colour(image: Image.Image) -> tuple[float, ...]:
    pixels = list(image.convert("RGB").getdata())
    return tuple(sum(p[i] for p in pixels) / len(pixels) for i in range(3))


def test_video_thumbnail_is_a_jpeg_of_its_first_frame(output_root):
    video = output_root / VIDEO_JOB / "video.mp4"
    content_type, body = thumbnail(output_root, f"{VIDEO_JOB}/video.mp4")
    assert content_type == "image/jpeg"
    thumb = decode(body)
    assert thumb.size == (120, 120)
    # The first frame scaled to cover 120x120 and centre-cropped, as image thumbnails are.
    frame = first_frame(video)
    expected = ImageOps.fit(frame, (120, 120), Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    difference = [abs(a - b) for a, b in zip(mean_colour(thumb), mean_colour(expected), strict=True)]
    assert max(difference) < 4, difference
    assert (output_root / VIDEO_JOB / ".thumbs" / "video.jpg").read_bytes() == body


def test_video_without_a_decodable_frame_gets_the_play_button(output_root):
    (output_root / VIDEO_JOB / "broken.mp4").write_bytes(b"not a video at all")
    content_type, body = thumbnail(output_root, f"{VIDEO_JOB}/broken.mp4")
    assert content_type == "image/svg+xml"
    svg = ElementTree.fromstring(body)
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    assert (svg.get("width"), svg.get("height")) == ("120", "120")


@pytest.mark.parametrize("path", [f"{JOB}/config.json", JOB, ""])
def test_thumbnail_of_anything_but_an_image_or_video_is_invalid(output_root, path):
    with pytest.raises(InvalidInput, match="not an image or video") as excinfo:
        thumbnail(output_root, path)
    assert field_of(excinfo) == "path"
    assert ".png" in str(excinfo.value) and ".mp4" in str(excinfo.value)


def test_thumbnail_refuses_decompression_bombs_and_corrupt_images(output_root):
    with pytest.raises(InvalidInput, match="limit"):
        thumbnail(output_root, f"{JOB}/image_0.png", limits=MediaLimits(max_image_pixels=1000))
    (output_root / JOB / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(InvalidInput, match="not a readable image"):
        thumbnail(output_root, f"{JOB}/broken.png")
    assert not (output_root / JOB / ".thumbs" / "image_0.jpg").exists()


# ---------------------------------------------------------------- in a real browser

# Appended to the page the test server hands Chromium: once the thumbnails have settled it
# records where each one sits and drives the lightbox, then writes the results into the DOM.
PROBE = """<script>
(() => {
  const report = (data) => {
    const out = document.createElement("pre");
    out.id = "probe";
    out.textContent = JSON.stringify(data);
    document.body.append(out);
  };
  const key = (name) => document.dispatchEvent(new KeyboardEvent("keydown", {key: name, bubbles: true}));
  const lightbox = () => {
    const box = document.getElementById("lightbox");
    const media = box.querySelector(".stage > *");
    return {hidden: box.hidden, tag: media && media.tagName, src: media && media.getAttribute("src"),
            caption: box.querySelector("figcaption").textContent};
  };
  const run = () => {
    if (document.body.dataset.thumbs !== "ready") return setTimeout(run, 50);
    const thumbs = Array.from(document.querySelectorAll("tr[data-media]")).map((row) => {
      const img = row.querySelector("img.thumb");
      const r = img.getBoundingClientRect();
      return {name: row.dataset.name, x: r.x, y: r.y, w: r.width, h: r.height, natural: img.naturalWidth};
    });
    const steps = [];
    document.querySelector("td.name a[data-open]").click();
    steps.push(lightbox());
    key("ArrowRight"); steps.push(lightbox());
    key("ArrowLeft"); key("ArrowLeft"); steps.push(lightbox());
    key("Escape"); steps.push(lightbox());
    document.querySelector("td.name a[data-open]").click();
    document.querySelector("#lightbox .stage > *").click(); steps.push(lightbox());
    report({ready: document.body.dataset.thumbs, loaded: Number(document.body.dataset.thumbsLoaded), thumbs, steps});
  };
  run();
})();
</script>"""


class OutputHandler(BaseHTTPRequestHandler):
    """What the gateway does for a browser: /output/... and /thumb/... to the two functions."""

    root: Path

    def do_GET(self):
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        try:
            if url.path.startswith("/thumb/"):
                content_type, body = thumbnail(self.root, unquote(url.path.removeprefix("/thumb/")))
            elif url.path == "/output" or url.path.startswith("/output/"):
                path = unquote(url.path.removeprefix("/output").removeprefix("/"))
                content_type, body = fetch(self.root, path, query.get("sort"), query.get("order"))
                if "probe" in query:
                    body = body.replace(b"</body>", PROBE.encode() + b"</body>")
            else:
                raise NotFound(url.path)
            status = 200
        except InvalidInput as exc:
            status, content_type, body = 400, "text/plain", str(exc).encode()
        except NotFound as exc:
            status, content_type, body = 404, "text/plain", str(exc).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def served(output_root):
    handler = type("Handler", (OutputHandler,), {"root": output_root})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join()


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1000,700",
        "--force-device-scale-factor=1", "--hide-scrollbars", "--virtual-time-budget=10000", *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_chromium_renders_the_browser_with_thumbnails_and_a_working_lightbox(served, output_root, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (`make browser` installs it)")
    Image.new("RGB", (90, 90), BLUE).save(output_root / JOB / "<i>blue.png")
    write_video(output_root / JOB / "clip.mp4")
    url = f"{served}/output/{JOB}"

    dom = chromium(tmp_path, "--dump-dom", f"{url}?probe=1").stdout
    match = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert match, dom[-2000:]
    probe = json.loads(html.unescape(match.group(1)))
    assert "<i>blue" not in dom, "names stay text"
    assert probe["ready"] == "ready"
    thumbs = {t["name"]: t for t in probe["thumbs"]}
    assert list(thumbs) == ["<i>blue.png", "clip.mp4", "image_0.png", "image_1.png"]
    assert probe["loaded"] == 4 and all(t["natural"] == 120 for t in thumbs.values()), thumbs

    first, right, wrapped, escaped, clicked = probe["steps"]
    assert first == {"hidden": False, "tag": "IMG", "src": f"/output/{JOB}/%3Ci%3Eblue.png",
                     "caption": "<i>blue.png (1 / 4)"}
    assert (right["tag"], right["src"]) == ("VIDEO", f"/output/{JOB}/clip.mp4")
    assert wrapped["src"] == f"/output/{JOB}/image_1.png", "previous from the first wraps to the last"
    assert escaped["hidden"] is True and escaped["tag"] is None
    assert clicked["hidden"] is True, "a click on the image closes the lightbox"

    shot_path = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot_path}", url)
    shot = Image.open(shot_path).convert("RGB")
    assert shot.size == (1000, 700)
    assert len(shot.getcolors(maxcolors=1 << 20)) > 50, "the page is not blank"

    def region(name: str) -> Image.Image:
        t = thumbs[name]
        return shot.crop((round(t["x"]) + 2, round(t["y"]) + 2, round(t["x"] + t["w"]) - 2, round(t["y"] + t["h"]) - 2))

    def share(image: Image.Image, colour, tolerance=24) -> float:
        pixels = list(image.getdata())
        return sum(near(p, colour, tolerance) for p in pixels) / len(pixels)

    # Each image's thumbnail shows its centre colour and none of the cropped-away bands.
    for name, colour in (("image_0.png", MAGENTA), ("image_1.png", GREEN), ("<i>blue.png", BLUE)):
        assert share(region(name), colour) > 0.9, name
    for name in ("image_0.png", "image_1.png"):
        assert share(region(name), RED) == 0 and share(region(name), BLUE) == 0
    # The video's poster is its first frame.
    poster = ImageOps.fit(first_frame(output_root / JOB / "clip.mp4"), (120, 120), Image.Resampling.LANCZOS)
    shown_poster = region("clip.mp4").resize((116, 116))
    difference = [abs(a - b) for a, b in zip(mean_colour(shown_poster), mean_colour(poster.crop((2, 2, 118, 118))),
                                             strict=True)]
    assert max(difference) < 12, difference
    # The colour comes from the thumbnail, not from anywhere else on the page.
    t = thumbs["image_0.png"]
    shot.paste((128, 128, 128), (int(t["x"]) - 1, int(t["y"]) - 1, int(t["x"] + t["w"]) + 2, int(t["y"] + t["h"]) + 2))
    assert share(shot, MAGENTA) == 0



# ---------------------------------------------------------------- through the gateway

# Over gRPC's default 4 MiB message limit, which a file sent in one message could not pass.
BIG = 9 << 20


@pytest.fixture(scope="module")
def big_file(outputs_dir) -> tuple[str, bytes]:
    data = os.urandom(BIG) + b"the end"
    folder = outputs_dir / "streamed-job"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "clip.mp4").write_bytes(data)
    (folder / "empty.json").write_bytes(b"")
    return "streamed-job/clip.mp4", data


def test_a_file_over_the_grpc_message_limit_downloads_byte_for_byte(mesh, big_file):
    path, data = big_file
    with httpx.stream("GET", f"{mesh.rest_url}/output/{path}", timeout=60) as answer:
        body = answer.read()
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "video/mp4"
    assert len(body) == len(data) and body == data  # raw bytes: no JSON array, no SSE framing
    empty = httpx.get(f"{mesh.rest_url}/output/streamed-job/empty.json", timeout=30)
    assert empty.status_code == 200 and empty.headers["content-type"] == "application/json"
    assert empty.content == b""


def test_native_clients_get_the_file_in_bounded_messages(mesh, big_file):
    path, data = big_file
    with grpc.insecure_channel(mesh.rest_url.removeprefix("http://")) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        messages = list(stub.BrowseOutput(inference_pb2.BrowseOutputRequest(path=path), timeout=60))
    assert messages[0].content_type == "video/mp4"
    assert all(len(m.data) <= CHUNK_BYTES for m in messages) and len(messages) > BIG // CHUNK_BYTES
    assert b"".join(m.data for m in messages) == data


def test_the_listing_and_errors_still_work_through_the_gateway(mesh, big_file):
    page = httpx.get(f"{mesh.rest_url}/output/streamed-job", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert names(page.text) == ["clip.mp4", "empty.json"]
    assert '<td class="size" data-bytes="9437191">9.0 MB</td>' in page.text
    missing = httpx.get(f"{mesh.rest_url}/output/streamed-job/nothing.png", timeout=30)
    assert missing.status_code == 404 and "nothing.png" in missing.json()["message"]
    outside = httpx.get(f"{mesh.rest_url}/output/streamed-job/..%2F..%2Fetc%2Fpasswd", timeout=30)
    assert outside.status_code == 400
