"""POST /models/download, GET /models/civitai/{id} and GET /models/huggingface: model files
fetched from a URL, CivitAI or Hugging Face into the models root.

A request becomes a checked `DownloadPlan` before anything is queued: every field checked
(all bad fields at once), the source asked what the file is (CivitAI's API, the Hub's file
metadata), so an unknown model is a 404 and a known file that exists already a 409 at once.
The worker then runs `download`: the body streams into a hidden temporary file in the target
folder (model listings skip dot files), counted against LORAMESH_DOWNLOAD_MAX_BYTES and
hashed on the way; it takes its name only when complete and its SHA256 matches the one the
source gives, and never replaces an existing file. Anything else leaves no file behind.

Every hop of a download to a host other than the configured CivitAI and Hugging Face
endpoints is checked like any client URL: http(s) only, no private or loopback address
unless LORAMESH_DOWNLOAD_ALLOW_PRIVATE is set. Tokens (LORAMESH_CIVITAI_TOKEN, the Hub's
HF_TOKEN) go only to their own host, never to where it redirects.
"""

from __future__ import annotations

import dataclasses
import email.message
import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin

import httpx

from services.common import hub, media
from services.common.errors import (
    AlreadyExists,
    InvalidInput,
    NotFound,
    ServiceError,
    TooLarge,
    Unavailable,
    UpstreamError,
    Violations,
)
from services.common.settings import Settings
from services.inference.model_files import MODEL_EXTENSIONS, MODEL_TYPES

URL, CIVITAI, HUGGINGFACE = "url", "civitai", "huggingface"
SOURCES = (URL, CIVITAI, HUGGINGFACE)
# The fields that pick each source when `source` is absent, in the order they are tried.
SOURCE_FIELDS = {URL: ("url",), CIVITAI: ("model_id",), HUGGINGFACE: ("repo_id", "filename")}
DEFAULT_REVISION = "main"
CHUNK = 1 << 20
# Redirect hops one download may take (the Hub and CivitAI answer with one or two).
MAX_REDIRECTS = 5
MAX_NAME_CHARS = 200
# CivitAI's model types -> ours (types it has that we do not keep are refused).
CIVITAI_TYPES = {"Checkpoint": "checkpoint", "LORA": "lora", "LoCon": "lora", "DoRA": "lora",
                 "TextualInversion": "embedding", "VAE": "vae", "Controlnet": "controlnet", "Upscaler": "esrgan"}
_CIVITAI_ID = re.compile(r"^(\d{1,18})(?::(\d{1,18}))?$")
_REVISION = re.compile(r"^[\w.\-/]{1,128}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+()\- ]")


@dataclass(frozen=True)
class CivitaiFile:
    """GET /models/civitai/{id}: one model version's primary file."""

    model_id: str
    version_id: str
    name: str
    version_name: str
    type: str
    base_model: str
    filename: str
    file_size: int
    sha256: str
    download_url: str


@dataclass(frozen=True)
class HubFile:
    """GET /models/huggingface: one file of a Hub repository at a revision."""

    repo_id: str
    filename: str
    revision: str
    file_size: int
    download_url: str
    sha256: str | None  # LFS files only: their X-Linked-Etag is the content's SHA256


@dataclass(frozen=True)
class DownloadPlan:
    source: str
    model_type: str
    folder: str  # absolute: the type's folder, or the subfolder inside it
    subfolder: str  # as the client gave it, "/"-separated ("" for none)
    url: str  # the file's download URL
    filename: str | None  # None: from the response (Content-Disposition, else the URL's path)
    sha256: str | None = None  # what the content must hash to, when the source says
    size: int | None = None  # what the source says the file weighs
    trusted_host: str | None = None  # the configured endpoint's host: its hops skip the address check
    token_kind: str | None = None  # CIVITAI or HUGGINGFACE: whose token the first hop carries
    params: dict = dataclasses.field(default_factory=dict)  # the request as GET /queue/{id} shows it

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> DownloadPlan:
        return cls(**data)


# --------------------------------------------------------------------------- checks


def safe_filename(raw: str) -> str:
    """The last component of `raw` with only letters, digits and ._+()- and spaces; no leading
    dot (hidden files are not listed), at most MAX_NAME_CHARS characters (extension kept)."""
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE.sub("_", name).strip(" ").lstrip(".")
    if len(name) > MAX_NAME_CHARS:
        stem, ext = os.path.splitext(name)
        name = stem[: MAX_NAME_CHARS - len(ext)] + ext
    return name


def _has_model_extension(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in MODEL_EXTENSIONS


def _extensions() -> str:
    return ", ".join(MODEL_EXTENSIONS)


def _target_folder(bad: Violations, type_folder: Path, subfolder: str) -> Path | None:
    """The folder a download lands in; the nearest part of it that exists must stay inside the
    type's folder (no link leading out)."""
    folder = type_folder / subfolder if subfolder else type_folder
    existing = folder
    while not existing.exists() and existing != type_folder and existing != existing.parent:
        existing = existing.parent
    base = type_folder.resolve() if type_folder.exists() else type_folder
    if existing.exists() and (not existing.is_dir() or not existing.resolve().is_relative_to(base)):
        bad.add("subfolder", f"{media.shown(subfolder)} is not a folder inside the {type_folder.name}/ folder")
        return None
    return folder


def detect_source(request: dict) -> str | None:
    """The `source` given, else the first whose fields the request fills."""
    if request.get("source"):
        return request["source"]
    for source, names in SOURCE_FIELDS.items():
        if request.get(names[0]):
            return source
    return None


def download_limits(settings: Settings) -> media.MediaLimits:
    """The URL checks of a download: the media limits with the downloads' own private-address
    switch."""
    return dataclasses.replace(settings.media, allow_private_urls=settings.inference.download_allow_private)


def plan_download(request: dict, models_root: Path, settings: Settings) -> DownloadPlan:
    """Checks a /models/download body (proto field names) and asks the source about the file:
    InvalidInput naming every bad field, NotFound for a model the source does not have,
    AlreadyExists for a file that is there already, TooLarge above the size limit."""
    bad = Violations()
    model_type = request.get("model_type")
    if not model_type:
        bad.add("model_type", f"is required: one of {', '.join(MODEL_TYPES)}")
    else:
        model_type = bad.choice("model_type", model_type, MODEL_TYPES)
    source = bad.choice("source", request.get("source"), SOURCES)
    if "source" not in {f for f, _ in bad.items}:
        source = detect_source(request)
        if source is None:
            bad.add("source", "give url (a direct download), model_id (CivitAI) or repo_id and filename "
                              "(Hugging Face)")
    subfolder = ""
    if request.get("subfolder"):
        subfolder = media.relative_path(bad, request["subfolder"], "subfolder", "the model type's folder") or ""
    revision = request.get("revision") or DEFAULT_REVISION
    if source == URL:
        url = bad.text("url", request.get("url"), required=True)
        if url:
            try:
                media.checked_target(url, "url", download_limits(settings))
            except InvalidInput as exc:
                for item in exc.violations:
                    bad.add(*item)
    elif source == CIVITAI:
        model_id = request.get("model_id")
        if not model_id:
            bad.add("model_id", 'is required for a CivitAI download: "123456" or "123456:789012" (model:version)')
        elif not _CIVITAI_ID.match(model_id):
            bad.add("model_id", f'must be "123456" or "123456:789012" (model:version) (got {media.shown(model_id)})')
    elif source == HUGGINGFACE:
        repo_id, filename = request.get("repo_id"), request.get("filename")
        _check_hub_fields(bad, repo_id, filename, revision)
    folder = None
    if model_type and not {f for f, _ in bad.items} & {"model_type", "subfolder"}:
        folder = _target_folder(bad, models_root / MODEL_TYPES[model_type], subfolder)
    bad.raise_if_any()

    params = {name: request[name] for name in ("model_type", "model_id", "url", "repo_id", "filename",
                                               "subfolder", "revision") if request.get(name)}
    params["source"] = source
    plan = DownloadPlan(source=source, model_type=model_type, folder=str(folder), subfolder=subfolder, url="",
                        filename=None, params=params)
    max_bytes = settings.inference.download_max_bytes
    if source == URL:
        path_name = safe_filename(unquote(httpx.URL(request["url"]).path))
        plan = dataclasses.replace(plan, url=request["url"])
        # The response may name the file otherwise (Content-Disposition); checked again then.
        if path_name and _has_model_extension(path_name):
            _check_free(folder / path_name, subfolder, "url")
        return plan
    if source == CIVITAI:
        info = civitai_file(request["model_id"], settings)
        name, field, sha256, size = safe_filename(info.filename), "model_id", info.sha256 or None, info.file_size
        plan = dataclasses.replace(plan, url=info.download_url, trusted_host=_host(settings.inference.civitai_base_url),
                                   token_kind=CIVITAI)
    else:
        info = hub_file(request["repo_id"], request["filename"], revision, settings)
        name, field, sha256, size = safe_filename(info.filename), "filename", info.sha256, info.file_size
        params["revision"] = revision
        plan = dataclasses.replace(plan, url=info.download_url, trusted_host=_host(hub_endpoint()),
                                   token_kind=HUGGINGFACE)
    if not _has_model_extension(name):
        raise InvalidInput(field, f"{media.shown(name)} is not a model file; allowed extensions: {_extensions()}")
    if size and size > max_bytes:
        raise TooLarge(field, f"the file is {size} bytes, above the {max_bytes}-byte limit (LORAMESH_DOWNLOAD_MAX_BYTES)")
    _check_free(folder / name, subfolder, field)
    return dataclasses.replace(plan, filename=name, sha256=sha256, size=size or None)


def _check_hub_fields(bad: Violations, repo_id, filename, revision) -> None:
    if not repo_id:
        bad.add("repo_id", 'is required for a Hugging Face download, e.g. "stabilityai/sdxl-turbo"')
    elif not isinstance(repo_id, str) or not hub.is_repo_id(repo_id):
        bad.add("repo_id", f'must be a Hugging Face repository id "owner/name" (got {media.shown(str(repo_id))})')
    if not filename:
        bad.add("filename", "is required for a Hugging Face download: the file's path in the repository")
    elif (media.relative_path(bad, filename, "filename", "the repository") is not None
          and not _has_model_extension(filename)):
        bad.add("filename", f"{media.shown(filename)} is not a model file; allowed extensions: {_extensions()}")
    if not isinstance(revision, str) or not _REVISION.match(revision) or ".." in revision:
        bad.add("revision", f"must be a branch, tag or commit of letters, digits and ._-/ (got {media.shown(str(revision))})")


def _check_free(path: Path, subfolder: str, field: str) -> None:
    if path.exists() or path.is_symlink():
        shown = f"{subfolder}/{path.name}" if subfolder else path.name
        raise AlreadyExists(f"{field}: the model {shown} exists already; existing models are never replaced "
                            "(delete it first, or choose another subfolder)")


def _host(url: str) -> str:
    return httpx.URL(url).host


# --------------------------------------------------------------------------- CivitAI


def parse_civitai_id(raw: str) -> tuple[str, str | None]:
    match = _CIVITAI_ID.match(raw or "")
    if not match:
        raise InvalidInput("id", f'must be "123456" or "123456:789012" (model:version) (got {media.shown(raw or "")})')
    return match.group(1), match.group(2)


def _civitai_get(path: str, settings: Settings, what: str) -> dict:
    base = settings.inference.civitai_base_url
    headers = {"Accept": "application/json"}
    if settings.inference.civitai_token:
        headers["Authorization"] = f"Bearer {settings.inference.civitai_token}"
    try:
        with httpx.Client(timeout=settings.media.download_timeout_s, follow_redirects=True) as client:
            response = client.get(f"{base}{path}", headers=headers)
    except httpx.HTTPError as exc:
        raise UpstreamError(f"CivitAI is unreachable ({type(exc).__name__}); try again later") from exc
    if response.status_code == 404:
        raise NotFound(f"CivitAI has no {what}")
    if response.status_code in (401, 403):
        raise UpstreamError(f"CivitAI refused access to {what} (HTTP {response.status_code}); an early-access or "
                            "restricted model needs LORAMESH_CIVITAI_TOKEN")
    if response.status_code != 200:
        raise UpstreamError(f"CivitAI answered HTTP {response.status_code} for {what}")
    try:
        return response.json()
    except ValueError as exc:
        raise UpstreamError(f"CivitAI answered {what} with something that is not JSON") from exc


def civitai_file(raw_id: str, settings: Settings) -> CivitaiFile:
    """The primary file of a model's latest version ("123456") or of one version
    ("123456:789012"), from CivitAI's public REST API."""
    model_id, version_id = parse_civitai_id(raw_id)
    if version_id is None:
        model = _civitai_get(f"/api/v1/models/{model_id}", settings, f"model {model_id}")
        versions = model.get("modelVersions") or []
        if not versions:
            raise NotFound(f"CivitAI model {model_id} has no versions")
        version, model_name, model_type = versions[0], model.get("name", ""), model.get("type", "")
    else:
        version = _civitai_get(f"/api/v1/model-versions/{version_id}", settings, f"model version {version_id}")
        if str(version.get("modelId")) != model_id:
            raise NotFound(f"CivitAI model version {version_id} does not belong to model {model_id}")
        model_name, model_type = (version.get("model") or {}).get("name", ""), (version.get("model") or {}).get("type", "")
    files = version.get("files") or []
    chosen = next((f for f in files if f.get("primary")), None) or next(
        (f for f in files if f.get("type") == "Model"), None) or (files[0] if files else None)
    if chosen is None:
        raise NotFound(f"CivitAI model {model_id} version {version.get('id')} has no files")
    try:
        return CivitaiFile(
            model_id=model_id, version_id=str(version["id"]), name=model_name, version_name=version.get("name", ""),
            type=CIVITAI_TYPES.get(model_type, model_type.lower()), base_model=version.get("baseModel", ""),
            filename=chosen["name"], file_size=int(round(float(chosen.get("sizeKB") or 0) * 1024)),
            sha256=((chosen.get("hashes") or {}).get("SHA256") or "").lower(),
            download_url=chosen.get("downloadUrl") or version.get("downloadUrl") or "")
    except (KeyError, TypeError, ValueError) as exc:
        raise UpstreamError(f"CivitAI's answer for model {model_id} lacks {exc}") from exc


# --------------------------------------------------------------------------- Hugging Face


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_file(repo_id: str, filename: str, revision: str, settings: Settings) -> HubFile:
    """One file's size and download URL from the Hub (HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE
    honoured); its SHA256 when it is an LFS file."""
    bad = Violations()
    _check_hub_fields(bad, repo_id, filename, revision)
    bad.raise_if_any()
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if constants.HF_HUB_OFFLINE:
        raise Unavailable("Hugging Face is not reachable from this server (HF_HUB_OFFLINE is set)")
    url = hf_hub_url(repo_id, filename, revision=revision)
    try:
        meta = get_hf_file_metadata(url, timeout=settings.media.download_timeout_s)
    except GatedRepoError as exc:
        raise UpstreamError(f"Hugging Face repository {repo_id} is gated; set HF_TOKEN to an account with "
                            "access") from exc
    except RepositoryNotFoundError as exc:
        raise NotFound(f"Hugging Face repository not found: {repo_id}") from exc
    except RevisionNotFoundError as exc:
        raise NotFound(f"Hugging Face repository {repo_id} has no revision {revision}") from exc
    except EntryNotFoundError as exc:
        raise NotFound(f"Hugging Face repository {repo_id} has no file {filename} at {revision}") from exc
    except Exception as exc:  # whatever huggingface_hub's HTTP client raised: the Hub did not answer
        raise UpstreamError(f"Hugging Face did not answer ({type(exc).__name__}); try again later") from exc
    etag = (meta.etag or "").lower()
    return HubFile(repo_id=repo_id, filename=filename, revision=revision, file_size=meta.size or 0,
                   download_url=url, sha256=etag if _SHA256.match(etag) else None)


def _hub_headers() -> dict[str, str]:
    from huggingface_hub.utils import build_hf_headers

    return build_hf_headers()


# --------------------------------------------------------------------------- downloading


def staged_path(folder: Path, name: str, tag: str) -> Path:
    """The hidden temporary name one attempt writes under."""
    return folder / f".{name}.{tag}.part"


def _first_headers(plan: DownloadPlan, settings: Settings) -> dict[str, str]:
    if plan.token_kind == CIVITAI and settings.inference.civitai_token:
        return {"Authorization": f"Bearer {settings.inference.civitai_token}"}
    if plan.token_kind == HUGGINGFACE:
        return _hub_headers()
    return {}


def _open(client: httpx.Client, plan: DownloadPlan, settings: Settings) -> httpx.Response:
    """The response carrying the file, after following redirects; each hop off the trusted
    host is checked (scheme, address) and connects only to the address checked."""
    url, limits = plan.url, download_limits(settings)
    tokens = _first_headers(plan, settings)
    for _ in range(MAX_REDIRECTS + 1):
        parsed = httpx.URL(url)
        headers = {"Accept-Encoding": "identity"}
        if plan.trusted_host and parsed.host == plan.trusted_host:
            headers.update(tokens)
            request = client.build_request("GET", parsed, headers=headers)
        else:
            request = media.pinned_request(client, media.checked_target(url, "url", limits), headers=headers)
        response = client.send(request, stream=True)
        if not response.is_redirect:
            return response
        response.close()
        url = urljoin(url, response.headers.get("location", ""))
    raise ServiceError(f"the download took more than {MAX_REDIRECTS} redirects")


def response_filename(response: httpx.Response) -> str:
    """The name a response gives its file: Content-Disposition's, else the last part of the
    final URL's path."""
    disposition = response.headers.get("content-disposition")
    if disposition:
        message = email.message.Message()
        message["content-disposition"] = disposition
        name = message.get_filename()
        if name:
            return safe_filename(name)
    return safe_filename(unquote(response.url.path))


def download(plan: DownloadPlan, settings: Settings, tag: str,
             on_chunk: Callable[[int, int], None] = lambda done, total: None) -> tuple[str, str]:
    """Fetches the plan's file into its folder: (model name as GET /models lists it, SHA256).
    on_chunk(bytes so far, total or 0) runs after each chunk and may raise to stop (cancel,
    time limit). On any failure no file of it stays; an existing file is never replaced."""
    max_bytes = settings.inference.download_max_bytes
    folder = Path(plan.folder)
    staged: Path | None = None
    try:
        with httpx.Client(timeout=settings.media.download_timeout_s, follow_redirects=False) as client:
            response = _open(client, plan, settings)
            try:
                if response.status_code != 200:
                    raise ServiceError(f"download failed: HTTP {response.status_code} from {response.url.host}")
                name = plan.filename or response_filename(response)
                if not name or not _has_model_extension(name):
                    raise ServiceError(f"the download is named {media.shown(name)}, which is not a model file; "
                                       f"allowed extensions: {_extensions()}")
                declared = int(response.headers.get("content-length") or 0)
                total = declared or plan.size or 0
                if total > max_bytes:
                    raise ServiceError(f"the file is {total} bytes, above the {max_bytes}-byte limit "
                                       "(LORAMESH_DOWNLOAD_MAX_BYTES)")
                folder.mkdir(parents=True, exist_ok=True)
                _check_free(folder / name, plan.subfolder, "download")
                staged = staged_path(folder, name, tag)
                digest, done = hashlib.sha256(), 0
                with open(staged, "wb") as out:
                    for chunk in response.iter_bytes(CHUNK):
                        done += len(chunk)
                        if done > max_bytes:
                            raise ServiceError(f"the download passed the {max_bytes}-byte limit "
                                               "(LORAMESH_DOWNLOAD_MAX_BYTES); stopped")
                        out.write(chunk)
                        digest.update(chunk)
                        on_chunk(done, total)
            finally:
                response.close()
        if declared and done != declared:
            raise ServiceError(f"the download ended after {done} of {declared} bytes")
        sha256 = digest.hexdigest()
        if plan.sha256 and sha256 != plan.sha256:
            raise ServiceError(f"SHA256 mismatch: the source says {plan.sha256}, the downloaded file hashes to "
                               f"{sha256}; the file was deleted")
        try:
            os.link(staged, folder / name)
        except FileExistsError:
            raise ServiceError(f"{name} was created by something else while downloading; nothing was "
                               "replaced") from None
        return (f"{plan.subfolder}/{name}" if plan.subfolder else name), sha256
    except httpx.HTTPError as exc:
        reason = str(exc)[:200] or type(exc).__name__
        raise ServiceError(f"download interrupted: {reason}") from exc
    finally:
        if staged is not None:
            staged.unlink(missing_ok=True)
