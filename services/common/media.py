"""Loading what requests point at: server-side paths confined to configured roots,
http(s) URLs with size/time/address limits, and image/video decoding with bomb limits.
Every failure is an InvalidInput/NotFound naming the request field."""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import av
import httpx
from PIL import Image, UnidentifiedImageError

from services.common.errors import InvalidInput, NotFound, Unavailable, Violations
from services.common.settings import MediaLimits

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".gifv", ".gif", ".mov", ".mkv", ".avi"})


def extension(path_or_url: str) -> str:
    """Lower-case extension of a path or of a URL's path (".png"), "" when none."""
    path = urlsplit(path_or_url).path if "://" in path_or_url else path_or_url
    return Path(path).suffix.lower()


def resolve_path(raw: str, roots: tuple[Path, ...], field: str) -> Path:
    """The real path of an existing file inside one of `roots`. Refuses `..`, paths
    outside the roots and symlinks that lead out of them."""
    if not raw:
        raise InvalidInput(field, "is required")
    if "\x00" in raw:
        raise InvalidInput(field, "must not contain NUL bytes")
    candidate = Path(raw).expanduser()
    if ".." in candidate.parts:
        raise InvalidInput(field, f"must not contain '..' (got {raw!r})")
    if not candidate.is_absolute():
        raise InvalidInput(field, f"must be an absolute path inside {_roots_text(roots)} (got {raw!r})")
    if not _inside(candidate.absolute(), roots):
        raise InvalidInput(field, f"{raw!r} is outside the allowed roots {_roots_text(roots)}")
    real = candidate.resolve()
    if not _inside(real, roots):
        raise InvalidInput(field, f"{raw!r} is a link that leads outside the allowed roots {_roots_text(roots)}")
    if not real.exists():
        raise NotFound(f"{field}: no such file: {raw}")
    return real


def resolve_into(violations: Violations, raw: str, roots: tuple[Path, ...], field: str,
                 missing: str) -> Path | None:
    """resolve_path for requests that report every bad field at once: a failure goes into
    `violations` (`missing` names what does not exist) and gives None."""
    try:
        return resolve_path(raw, roots, field)
    except NotFound:
        violations.add(field, f"{missing}: {raw}")
    except InvalidInput as exc:
        for name, description in exc.violations:
            violations.add(name, description)
    return None


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _roots_text(roots: tuple[Path, ...]) -> str:
    return "[" + ", ".join(str(r) for r in roots) + "]"


def check_url(url: str, field: str, limits: MediaLimits) -> None:
    """Refuses anything but http(s) to a public address (unless private ones are allowed)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(field, f"must be an http:// or https:// URL (got {url!r})")
    if limits.allow_private_urls:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise InvalidInput(field, f"host {parts.hostname!r} does not resolve ({exc.strerror})") from exc
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise InvalidInput(field, f"{parts.hostname} resolves to a private or loopback address, which is not allowed")


def fetch_url(url: str, field: str, limits: MediaLimits) -> bytes:
    """Downloads a URL within the size and time limits, checking every redirect hop."""
    with httpx.Client(timeout=limits.download_timeout_s, follow_redirects=False) as client:
        for _ in range(limits.max_redirects + 1):
            check_url(url, field, limits)
            try:
                with client.stream("GET", url) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise InvalidInput(field, f"download failed: HTTP {response.status_code} from {url}")
                    declared = int(response.headers.get("content-length") or 0)
                    if declared > limits.max_download_bytes:
                        raise InvalidInput(field, _too_large(declared, limits))
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        body += chunk
                        if len(body) > limits.max_download_bytes:
                            raise InvalidInput(field, _too_large(len(body), limits))
                    return bytes(body)
            except httpx.TimeoutException as exc:
                raise Unavailable(f"{field}: download timed out after {limits.download_timeout_s:g}s: {url}") from exc
            except httpx.HTTPError as exc:
                raise Unavailable(f"{field}: download failed: {exc}") from exc
    raise InvalidInput(field, f"more than {limits.max_redirects} redirects")


def _too_large(size: int, limits: MediaLimits) -> str:
    return f"download is larger than the {limits.max_download_bytes} byte limit (at least {size} bytes)"


def decode_image(source: Path | bytes, field: str, limits: MediaLimits) -> Image.Image:
    """A fully loaded image (first frame of animated ones); refuses corrupt files and
    images over the pixel limit before decoding their pixels."""
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise InvalidInput(
                field, f"image is {width}x{height} pixels; the limit is {limits.max_image_pixels} pixels"
            )
        image.load()
        return image
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInput(field, f"is not a readable image ({exc})") from exc


@dataclass(frozen=True)
class Frame:
    index: int
    time_s: float
    image: Image.Image


@contextlib.contextmanager
def open_video(source: Path | bytes, field: str, limits: MediaLimits):
    """(container, stream, frame rate) of a video's first video stream, after the checks
    every reader needs: it opens, it has a video stream, its frames are within the pixel
    limit."""
    try:
        container = av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source))
    except (av.FFmpegError, OSError) as exc:
        raise InvalidInput(field, f"is not a readable video ({exc})") from exc
    with container:
        if not container.streams.video:
            raise InvalidInput(field, "has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if stream.width * stream.height > limits.max_image_pixels:
            raise InvalidInput(field, f"video frames are {stream.width}x{stream.height}; the limit is "
                                      f"{limits.max_image_pixels} pixels")
        yield container, stream, float(stream.average_rate or stream.guessed_rate or 25)


def decode_frames(container, stream, rate: float, field: str, limits: MediaLimits,
                  keep: Callable[[int, float], bool | None]) -> list[Frame]:
    """Decodes frames in order, keeping those `keep(index, time_s)` is True for and
    stopping when it returns None or at the duration limit. A decode error after the
    first kept frame ends the list; before it, the video is refused."""
    frames: list[Frame] = []
    try:
        for index, frame in enumerate(container.decode(stream)):
            time_s = float(frame.time) if frame.time is not None else index / rate
            decision = keep(index, time_s) if time_s <= limits.max_video_seconds else None
            if decision is None:
                break
            if decision:
                frames.append(Frame(index, time_s, frame.to_image()))
    except (av.FFmpegError, OSError) as exc:
        if not frames:
            raise InvalidInput(field, f"is not a readable video ({exc})") from exc
    if not frames:
        raise InvalidInput(field, "has no decodable video frames")
    return frames


def sample_video_frames(
    source: Path | bytes, field: str, interval_s: float, max_count: int, limits: MediaLimits
) -> list[Frame]:
    """Frames at 0, interval, 2*interval... seconds (the first frame at or after each
    mark), at most `max_count`, decoding no further than the duration limit."""
    kept = 0
    next_mark = 0.0

    def keep(index: int, time_s: float) -> bool | None:
        nonlocal kept, next_mark
        if kept >= max_count:
            return None
        if time_s + 1e-6 < next_mark:
            return False
        kept += 1
        while next_mark <= time_s + 1e-6:
            next_mark += interval_s
        return True

    with open_video(source, field, limits) as (container, stream, rate):
        return decode_frames(container, stream, rate, field, limits, keep)


def read_source(path_or_url: str, field: str, *, is_url: bool, roots: tuple[Path, ...],
                limits: MediaLimits) -> Path | bytes:
    """A local path resolved inside the roots, or the downloaded bytes of a URL."""
    if is_url:
        return fetch_url(path_or_url, field, limits)
    return resolve_path(path_or_url, roots, field)


def decode_base64(raw: str, field: str) -> bytes:
    """The bytes of raw base64 or of a base64 data URL ("data:image/png;base64,...")."""
    text = raw.strip()
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise InvalidInput(field, "a data URL must be base64 encoded (data:<type>;base64,...)")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(field, f"is not valid base64 ({exc})") from exc
