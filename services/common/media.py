"""Loading what requests point at: server-side paths confined to configured roots,
http(s) URLs with size/time/address limits, and image/video decoding with bomb limits.
Every failure is an InvalidInput/NotFound naming the request field."""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import io
import ipaddress
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
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


# Linux limits (NAME_MAX, PATH_MAX): longer paths cannot name a file, and the OS error they
# raise would otherwise surface as an internal error.
MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 4096
# How much of a client's value a message repeats; a status message must stay small.
SHOWN_CHARS = 120


def shown(value: str, limit: int = SHOWN_CHARS) -> str:
    """`value` quoted for a message, cut to `limit` characters with how much was left out."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value) - limit} more characters)"


def check_path_text(raw: str, field: str, shown_as: str | None = None) -> None:
    """Refuses path text no file can have: NUL bytes, text that is not valid UTF-8 (lone
    surrogates), a component over 255 bytes, a path over 4096 bytes. Checked before the
    file system is asked, so nothing it says depends on server folders. Messages repeat
    `shown_as` (what the client sent, when `raw` has a server folder joined to it)."""
    if "\x00" in raw:
        raise InvalidInput(field, "must not contain NUL bytes")
    try:
        encoded = raw.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(field, "must be valid UTF-8 text (it contains an unpaired surrogate)") from exc
    if len(encoded) > MAX_PATH_BYTES:
        raise InvalidInput(field, f"path longer than {MAX_PATH_BYTES} bytes ({len(encoded)} bytes)")
    longest = max(encoded.split(b"/"), key=len)
    if len(longest) > MAX_COMPONENT_BYTES:
        raise InvalidInput(field, f"path component longer than {MAX_COMPONENT_BYTES} bytes "
                                  f"({len(longest)} bytes) in {shown(raw if shown_as is None else shown_as)}")


def relative_path(violations: Violations, raw, field: str, inside: str) -> str | None:
    """`raw` as a "/"-separated path relative to a folder (`inside` names it in messages): no
    absolute start, no '..', no hidden component. None, with the violation added, when bad."""
    if not isinstance(raw, str):
        violations.add(field, "must be a string")
        return None
    try:
        check_path_text(raw, field)
    except InvalidInput as exc:
        for item in exc.violations:
            violations.add(*item)
        return None
    text = raw.replace("\\", "/")
    if text.startswith(("/", "~")) or (len(text) > 1 and text[1] == ":"):
        violations.add(field, f"must be a path relative to {inside}, not an absolute one (got {shown(raw)})")
        return None
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        violations.add(field, "must not contain '..'")
        return None
    if any(p.startswith(".") for p in parts):
        violations.add(field, "must not name hidden files or folders (a part starting with '.')")
        return None
    return "/".join(parts)


def path_error(exc: OSError | RuntimeError, raw: str, field: str) -> InvalidInput | NotFound:
    """The client's error for what the file system said about `raw` (the client's text):
    the reason only, never the file name in the OS error (a server folder after links)."""
    if isinstance(exc, RuntimeError) or exc.errno == errno.ELOOP:
        return InvalidInput(field, f"{shown(raw)} is a symbolic link loop")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return NotFound(f"{field}: no such file: {shown(raw)}")
    if exc.errno == errno.ENAMETOOLONG:
        return InvalidInput(field, f"{shown(raw)} leads to a path too long for the file system")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return InvalidInput(field, f"{shown(raw)} is not readable by the service")
    return InvalidInput(field, f"{shown(raw)} cannot be read ({exc.strerror or type(exc).__name__})")


def resolve_path(raw: str, roots: tuple[Path, ...], field: str, shown_as: str | None = None) -> Path:
    """The real path of an existing file inside one of `roots`. Refuses `..`, paths
    outside the roots and symlinks that lead out of them. Messages repeat the client's
    path (`shown_as`, else `raw`; shortened), never the roots."""
    echo = raw if shown_as is None else shown_as
    if not raw:
        raise InvalidInput(field, "is required")
    check_path_text(raw, field, echo)
    try:
        candidate = Path(raw).expanduser()
    except RuntimeError as exc:  # "~nobody/x": no such user
        raise InvalidInput(field, f"must be an absolute path inside the allowed roots (got {shown(echo)})") from exc
    if candidate != Path(raw):
        check_path_text(str(candidate), field, echo)
    if ".." in candidate.parts:
        raise InvalidInput(field, f"must not contain '..' (got {shown(echo)})")
    if not candidate.is_absolute():
        raise InvalidInput(field, f"must be an absolute path inside the allowed roots (got {shown(echo)})")
    if not _inside(candidate.absolute(), roots):
        raise InvalidInput(field, f"{shown(echo)} is outside the allowed roots")
    try:
        real = candidate.resolve()
        if not _inside(real, roots):
            raise InvalidInput(field, f"{shown(echo)} is a link that leads outside the allowed roots")
        real.stat()
    except (OSError, RuntimeError) as exc:
        raise path_error(exc, echo, field) from exc
    return real


def resolve_into(violations: Violations, raw: str, roots: tuple[Path, ...], field: str,
                 missing: str, shown_as: str | None = None) -> Path | None:
    """resolve_path for requests that report every bad field at once: a failure goes into
    `violations` (`missing` names what does not exist) and gives None."""
    try:
        return resolve_path(raw, roots, field, shown_as)
    except NotFound:
        violations.add(field, f"{missing}: {shown(raw if shown_as is None else shown_as)}")
    except InvalidInput as exc:
        for name, description in exc.violations:
            violations.add(name, description)
    return None


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _blocked(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether `address` is anything but a public unicast one (IPv4 inside IPv6 included)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
        if embedded is not None and _blocked(embedded):
            return True
    return (not address.is_global or address.is_private or address.is_loopback or address.is_link_local
            or address.is_multicast or address.is_reserved or address.is_unspecified)


@dataclass(frozen=True)
class Target:
    """One hop of a download or webhook: the URL as the client wrote it and the one address it may use."""

    url: httpx.URL
    address: str


def checked_target(raw: str, field: str, limits: MediaLimits) -> Target:
    """Checks the scheme, resolves the host once and checks every address it resolves to;
    the request then connects to the address checked here and nowhere else. The URL is
    parsed once, by the client that fetches it, so the check and the fetch agree on the host."""
    try:
        url = httpx.URL(raw)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise InvalidInput(field, f"must be an http:// or https:// URL (got {shown(raw)})") from exc
    if url.scheme not in ("http", "https") or not url.raw_host:
        raise InvalidInput(field, f"must be an http:// or https:// URL (got {shown(raw)})")
    host = url.raw_host.decode("ascii")
    try:
        infos = socket.getaddrinfo(host, url.port or (443 if url.scheme == "https" else 80),
                                   type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else "not a valid host name"
        raise InvalidInput(field, f"host {shown(host)} does not resolve ({reason})") from exc
    addresses = [ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in infos]
    if not addresses:
        raise InvalidInput(field, f"host {shown(host)} does not resolve")
    if not limits.allow_private_urls and any(_blocked(a) for a in addresses):
        raise InvalidInput(field, f"{shown(host)} resolves to a private or loopback address, which is not allowed")
    return Target(url=url, address=str(addresses[0]))


def check_url(url: str, field: str, limits: MediaLimits) -> None:
    """Refuses anything but http(s) to a public address (unless private ones are allowed).
    fetch_url checks again at every hop and connects only to the address it checked."""
    if limits.allow_private_urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidInput(field, f"must be an http:// or https:// URL (got {shown(url)})")
        return
    checked_target(url, field, limits)


def pinned_request(client: httpx.Client | httpx.AsyncClient, target: Target, method: str = "GET",
                   content: bytes | None = None, headers: dict[str, str] | None = None) -> httpx.Request:
    """A request to the checked address: the URL carries the IP, while the Host header, TLS SNI
    and the certificate check use the host name, so no second DNS answer is ever used."""
    url = target.url
    return client.build_request(
        method, url.copy_with(host=target.address), content=content,
        headers={**(headers or {}), "Host": url.netloc.decode("ascii")},
        extensions={"sni_hostname": url.raw_host.decode("ascii")},
    )


def fetch_url(url: str, field: str, limits: MediaLimits) -> bytes:
    """Downloads a URL within the size and time limits, checking every redirect hop."""
    with httpx.Client(timeout=limits.download_timeout_s, follow_redirects=False) as client:
        for _ in range(limits.max_redirects + 1):
            target = checked_target(url, field, limits)
            try:
                response = client.send(pinned_request(client, target), stream=True)
                try:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise InvalidInput(field, f"download failed: HTTP {response.status_code} from {shown(url)}")
                    declared = int(response.headers.get("content-length") or 0)
                    if declared > limits.max_download_bytes:
                        raise InvalidInput(field, _too_large(declared, limits))
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        body += chunk
                        if len(body) > limits.max_download_bytes:
                            raise InvalidInput(field, _too_large(len(body), limits))
                    return bytes(body)
                finally:
                    response.close()
            except httpx.TimeoutException as exc:
                raise Unavailable(f"{field}: download timed out after {limits.download_timeout_s:g}s: "
                                  f"{shown(url)}") from exc
            except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
                reason = str(exc)[:200] or type(exc).__name__
                raise Unavailable(f"{field}: download of {shown(url)} failed ({reason})") from exc
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
        raise InvalidInput(field, f"is not a readable image ({_reason(exc)})") from exc


def _reason(exc: Exception) -> str:
    """What went wrong reading a file, without the file's real path (it may name server
    folders the client never sent) and never longer than a line."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a known image format"
    if getattr(exc, "filename", None) is not None:  # OSError and av.FFmpegError
        return getattr(exc, "strerror", None) or type(exc).__name__
    return str(exc)[:200] or type(exc).__name__


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
        raise InvalidInput(field, f"is not a readable video ({_reason(exc)})") from exc
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
    return list(iter_frames(container, stream, rate, field, limits, keep))


def iter_frames(container, stream, rate: float, field: str, limits: MediaLimits,
                keep: Callable[[int, float], bool | None]) -> Iterator[Frame]:
    """decode_frames one frame at a time, so a reader holds only the frames it keeps."""
    kept = 0
    try:
        for index, frame in enumerate(container.decode(stream)):
            time_s = float(frame.time) if frame.time is not None else index / rate
            decision = keep(index, time_s) if time_s <= limits.max_video_seconds else None
            if decision is None:
                break
            if decision:
                kept += 1
                yield Frame(index, time_s, frame.to_image())
    except (av.FFmpegError, OSError) as exc:
        if not kept:
            raise InvalidInput(field, f"is not a readable video ({_reason(exc)})") from exc
    if not kept:
        raise InvalidInput(field, "has no decodable video frames")


def sample_video_frames(
    source: Path | bytes, field: str, interval_s: float, max_count: int, limits: MediaLimits
) -> list[Frame]:
    """Frames at 0, interval, 2*interval... seconds (the first frame at or after each
    mark), at most `max_count`, decoding no further than the duration limit."""
    return list(iter_video_frames(source, field, interval_s, max_count, limits))


def iter_video_frames(
    source: Path | bytes, field: str, interval_s: float, max_count: int, limits: MediaLimits
) -> Iterator[Frame]:
    """sample_video_frames one frame at a time; the video stays open until the last."""
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
        yield from iter_frames(container, stream, rate, field, limits, keep)


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


# H.264 where the installed PyAV has it (every browser plays it), else what MP4 still carries.
_MP4_CODECS = ("libx264", "h264", "mpeg4")


def mp4_codec() -> str:
    for name in _MP4_CODECS:
        try:
            av.codec.Codec(name, "w")
        except (av.FFmpegError, ValueError):
            continue
        return name
    raise RuntimeError("the installed PyAV can encode none of " + ", ".join(_MP4_CODECS))


def encode_mp4(frames, fps: int, out: Path) -> tuple[int, int]:
    """Writes RGB frames (an array of frames x height x width x 3, uint8) as an MP4 at `fps`:
    yuv420p, which needs even dimensions, so an odd last row or column is dropped; returns the
    video's (width, height). Encoded on one thread from fully written frames; even so libx264
    may code a few macroblocks of equal frames differently from one process to another."""
    height, width = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
    with av.open(str(out), mode="w", format="mp4") as container:
        stream = container.add_stream(mp4_codec(), rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.thread_count = 1
        if stream.codec_context.name == "libx264":
            stream.options = {"crf": "18", "preset": "medium"}
        for index, frame in enumerate(frames):
            image = _yuv420p(frame[:height, :width])
            image.pts, image.time_base = index, Fraction(1, fps)
            for packet in stream.encode(image):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return width, height


def _yuv420p(rgb) -> av.VideoFrame:
    """An RGB array as a yuv420p frame whose row padding is zeroed: x264 reads past the
    width, and padding left as it was allocated made equal frames encode differently."""
    import numpy as np

    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
    for plane in frame.planes:
        rows = np.frombuffer(plane, dtype=np.uint8).reshape(plane.height, plane.line_size).copy()
        rows[:, plane.width:] = 0
        plane.update(rows.tobytes())
    return frame


def first_video_frame(source: Path | bytes, field: str, limits: MediaLimits) -> Image.Image:
    """A video's first decodable frame (a poster for thumbnails)."""
    with open_video(source, field, limits) as (container, stream, rate):
        frame = next(iter_frames(container, stream, rate, field, limits, lambda index, time_s: True))
        return frame.image
