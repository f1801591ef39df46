"""POST /models/download, GET /models/civitai/{id} and GET /models/huggingface through the
gateway, against loopback stand-ins for the internet: a file server, CivitAI's REST API
(its real JSON) and a Hugging Face endpoint (HF_ENDPOINT) answering what huggingface_hub
asks. Each download is a queued job with progress events, lands in its type's folder, and
leaves no file when it fails."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from launcher.mesh import Mesh, Ports
from services.common.errors import InvalidInput
from services.common.settings import Settings
from services.inference import downloads
from tests.conftest import violated_fields

HF_TOKEN = "hf_test_token_123"
CIVITAI_TOKEN = "civitai-test-token"


def payload(size: int, seed: int) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (size // 32) + b"x" * (size % 32)


class Remote:
    """What the stand-in servers serve, and what they saw."""

    def __init__(self):
        self.files: dict[str, bytes] = {}  # /files/<name> -> body
        self.seen: list[tuple[str, str, str | None]] = []  # (method, path, authorization)
        self.civitai: dict[str, dict] = {}  # API path -> JSON
        self.hub: dict[str, tuple[bytes, str | None]] = {}  # "org/repo/rev/file" -> (body, sha256 etag)
        self.base = ""


class Handler(BaseHTTPRequestHandler):
    remote: Remote

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def do_HEAD(self):
        self._answer(head=True)

    def do_GET(self):
        self._answer(head=False)

    def _answer(self, head: bool) -> None:
        remote, path = self.remote, self.path.split("?")[0]
        remote.seen.append((self.command, path, self.headers.get("authorization")))
        if path.startswith("/files/half/"):  # promises the whole file, sends half, hangs up
            body = remote.files[path.removeprefix("/files/half/")]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if path.startswith("/files/slow/"):  # in 16 pieces, a pause between them
            body = remote.files[path.removeprefix("/files/slow/")]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            step = len(body) // 16 + 1
            for start in range(0, len(body), step):
                self.wfile.write(body[start:start + step])
                self.wfile.flush()
                time.sleep(0.05)
            return
        if path.startswith("/files/named/"):  # the URL names nothing; the header names the file
            name = path.removeprefix("/files/named/")
            return self._send(200, remote.files[name], {"Content-Disposition": f'attachment; filename="{name}"'}, head)
        if path.startswith("/files/"):
            body = remote.files.get(path.removeprefix("/files/"))
            return self._send(200 if body is not None else 404, body or b"", head=head)
        if path in remote.civitai:
            return self._send(200, json.dumps(remote.civitai[path]).encode(), {"Content-Type": "application/json"})
        if path.startswith("/api/download/models/"):  # CivitAI's download links redirect to its storage
            version = path.rsplit("/", 1)[1]
            return self._send(307, headers={"Location": f"{remote.base}/files/civitai-{version}"})
        if path.startswith("/api/v1/models/5005"):  # CivitAI having a bad day
            return self._send(500, b"Internal Server Error")
        if path.startswith("/api/v1/"):
            return self._send(404, b'{"error":"No model with id"}', {"Content-Type": "application/json"})
        match = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if match:
            repo, rev, file = match.groups()
            if not any(key.startswith(repo + "/") for key in remote.hub):
                return self._send(404, headers={"X-Error-Code": "RepoNotFound"}, head=head)
            entry = remote.hub.get(f"{repo}/{rev}/{file}")
            if entry is None:
                return self._send(404, headers={"X-Error-Code": "EntryNotFound"}, head=head)
            body, sha = entry
            headers = {"X-Repo-Commit": "a" * 40, "ETag": f'"{sha or "b" * 40}"'}
            if sha:
                headers.update({"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(body))})
            return self._send(200, body, headers, head)
        self._send(404)


@pytest.fixture(scope="module")
def remote():
    state = Remote()
    handler = type("BoundHandler", (Handler,), {"remote": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()


@pytest.fixture(scope="module")
def dl_mesh(tmp_path_factory, remote):
    """NATS, one inference service and Envoy, downloading from the loopback stand-ins."""
    root = tmp_path_factory.mktemp("downloads")
    models = root / "models"
    (models / "checkpoints").mkdir(parents=True)
    env = {"LORAMESH_INFERENCE_MODELS_DIR": str(models), "LORAMESH_MODEL_ROOTS": str(models),
           "LORAMESH_MEDIA_ROOTS": str(root), "LORAMESH_OUTPUT_DIR": str(root / "outputs"),
           "LORAMESH_WORKFLOWS_BASE_PATH": str(root / "workflows"), "LORAMESH_SHUTDOWN_GRACE_S": "2",
           "LORAMESH_INFERENCE_ACK_WAIT_S": "3",
           # The stand-ins live on loopback.
           "LORAMESH_DOWNLOAD_ALLOW_PRIVATE": "1", "LORAMESH_DOWNLOAD_MAX_BYTES": str(8 << 20),
           "LORAMESH_CIVITAI_BASE_URL": remote.base, "LORAMESH_CIVITAI_TOKEN": CIVITAI_TOKEN,
           "HF_ENDPOINT": remote.base, "HF_TOKEN": HF_TOKEN, "HF_HUB_OFFLINE": "0"}
    mesh = Mesh(Ports.free(), var_dir=root / "var", env=env, services=("inference",))
    mesh.start(timeout=180)
    mesh.models = models
    yield mesh
    mesh.stop()


@pytest.fixture
def client(dl_mesh):
    with httpx.Client(base_url=dl_mesh.rest_url, timeout=60) as c:
        yield c


def unique(stem: str, ext: str = ".safetensors") -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}{ext}"


def finish(client, job_id: str, timeout: float = 30) -> tuple[dict, list[dict]]:
    """The job once it has ended, and its events (job_added ... the final status)."""
    with client.stream("GET", f"/queue/{job_id}/events", timeout=timeout) as stream:
        events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
    return client.get(f"/queue/{job_id}").json(), events


def listed(client, list_key: str, name: str) -> dict | None:
    return next((m for m in client.get("/models").json()[list_key] if m["name"] == name), None)


def leftovers(folder: Path) -> list[str]:
    """Anything a download left in a folder: partial files are hidden ".<name>.<tag>.part"."""
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


# ---- the three sources ---------------------------------------------------------------------


def test_a_url_download_lands_in_its_subfolder_with_progress_and_a_hash_job(client, dl_mesh, remote):
    name = unique("lora")
    body = payload(3 << 20, seed=1)
    remote.files[name] = body
    r = client.post("/models/download", json={"model_type": "lora", "url": f"{remote.base}/files/slow/{name}",
                                              "subfolder": "style/anime"})
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["success"] is True and accepted["source"] == "url" and accepted["model_type"] == "lora"
    assert accepted["position"] >= 1 and accepted["download_job_id"] != accepted["hash_job_id"]

    job, events = finish(client, accepted["download_job_id"])
    assert job["status"] == "completed", job
    assert job["type"] == "download" and job["outputs"] == [f"style/anime/{name}"]
    target = dl_mesh.models / "loras" / "style" / "anime" / name
    assert target.read_bytes() == body
    progress = [e["data"] for e in events if e["event"] == "job_progress"]
    assert len(progress) >= 2, events  # the slow server gives the reporter time between pieces
    assert [p["bytes"] for p in progress] == sorted(p["bytes"] for p in progress)
    assert progress[-1]["bytes"] == progress[-1]["total_bytes"] == len(body)
    assert progress[-1]["percentage"] == 100.0 and 0 < progress[0]["percentage"] < 100
    assert events[-1]["data"]["status"] == "completed"

    hashing, _ = finish(client, accepted["hash_job_id"])
    assert hashing["status"] == "completed" and hashing["type"] == "hash", hashing
    entry = listed(client, "loras", f"style/anime/{name}")
    assert entry is not None and entry["size_bytes"] == len(body)
    assert entry["hash"] == hashlib.sha256(body).hexdigest()  # the hash job filled the cache
    r = client.get(f"/models/hash/lora/style%2Fanime%2F{name}")
    assert r.status_code == 200 and r.json()["hash"] == entry["hash"], r.text


def test_a_url_download_takes_its_name_from_content_disposition(client, dl_mesh, remote):
    name = unique("vae")
    remote.files[name] = payload(4096, seed=2)
    r = client.post("/models/download", json={"model_type": "vae", "url": f"{remote.base}/files/named/{name}"})
    assert r.status_code == 202, r.text
    job, _ = finish(client, r.json()["download_job_id"])
    assert job["status"] == "completed", job
    assert (dl_mesh.models / "vae" / name).read_bytes() == remote.files[name]
    assert listed(client, "vae", name) is not None


def civitai_version(model_id: int, version_id: int, filename: str, body: bytes, base: str, sha256: str | None = None):
    """A model version as CivitAI's API describes it (the fields it really sends)."""
    return {
        "id": version_id, "modelId": model_id, "name": "v1.0", "baseModel": "SDXL 1.0", "baseModelType": "Standard",
        "downloadUrl": f"{base}/api/download/models/{version_id}",
        "files": [
            {"id": version_id * 10, "name": "training-data.zip", "type": "Training Data", "sizeKB": 1.0,
             "primary": False, "hashes": {}, "downloadUrl": f"{base}/api/download/models/{version_id}?type=Training"},
            {"id": version_id * 10 + 1, "name": filename, "type": "Model", "sizeKB": len(body) / 1024,
             "primary": True, "metadata": {"fp": "fp16", "size": "pruned", "format": "SafeTensor"},
             "hashes": {"AutoV2": "ABCDEF0123", "SHA256": (sha256 or hashlib.sha256(body).hexdigest()).upper()},
             "downloadUrl": f"{base}/api/download/models/{version_id}"},
        ],
        "images": [],
    }


def add_civitai_model(remote: Remote, model_id: int, version_id: int, filename: str, body: bytes,
                      sha256: str | None = None) -> None:
    version = civitai_version(model_id, version_id, filename, body, remote.base, sha256)
    remote.civitai[f"/api/v1/models/{model_id}"] = {
        "id": model_id, "name": "Test Model", "description": "", "type": "Checkpoint", "nsfw": False,
        "creator": {"username": "tester"}, "tags": [], "modelVersions": [version]}
    remote.civitai[f"/api/v1/model-versions/{version_id}"] = {
        **version, "model": {"name": "Test Model", "type": "Checkpoint", "nsfw": False}}
    remote.files[f"civitai-{version_id}"] = body


def test_civitai_model_info_by_model_and_by_version(client, remote):
    body = payload(2048, seed=3)
    add_civitai_model(remote, 123456, 789012, "dreamy_xl.safetensors", body)
    for model_id in ("123456", "123456:789012"):
        r = client.get(f"/models/civitai/{model_id}")
        assert r.status_code == 200, r.text
        assert r.json() == {
            "success": True, "model_id": "123456", "version_id": "789012", "name": "Test Model",
            "version_name": "v1.0", "type": "checkpoint", "base_model": "SDXL 1.0",
            "filename": "dreamy_xl.safetensors", "file_size": len(body), "sha256": hashlib.sha256(body).hexdigest(),
            "download_url": f"{remote.base}/api/download/models/789012"}
    assert client.get("/models/civitai/999999").status_code == 404
    assert client.get("/models/civitai/123456:555").status_code == 404
    r = client.get("/models/civitai/abc")
    assert r.status_code == 400 and violated_fields(r) == ["id"]
    broken = client.get("/models/civitai/500500")
    assert broken.status_code == 502, broken.text
    assert "CivitAI answered HTTP 500" in broken.json()["error"]


def test_a_civitai_download_follows_the_redirect_and_sends_the_token_only_to_civitai(client, dl_mesh, remote):
    name = unique("civitai")
    body = payload(5000, seed=4)
    add_civitai_model(remote, 2001, 3001, name, body)
    r = client.post("/models/download", json={"model_type": "checkpoint", "model_id": "2001", "subfolder": "anime"})
    assert r.status_code == 202, r.text
    assert r.json()["source"] == "civitai"
    job, _ = finish(client, r.json()["download_job_id"])
    assert job["status"] == "completed", job
    assert (dl_mesh.models / "checkpoints" / "anime" / name).read_bytes() == body
    assert listed(client, "checkpoints", f"anime/{name}") is not None
    assert ("GET", "/api/v1/models/2001", f"Bearer {CIVITAI_TOKEN}") in remote.seen
    # Downloading it again is refused: existing models are never replaced.
    again = client.post("/models/download", json={"model_type": "checkpoint", "model_id": "2001",
                                                   "subfolder": "anime"})
    assert again.status_code == 409, again.text
    assert "exists already" in again.json()["message"]


def test_a_wrong_civitai_sha256_deletes_the_file_and_fails_the_job(client, dl_mesh, remote):
    name = unique("tampered")
    body = payload(4096, seed=5)
    add_civitai_model(remote, 2002, 3002, name, body, sha256="0" * 64)
    r = client.post("/models/download", json={"model_type": "lora", "source": "civitai", "model_id": "2002:3002"})
    assert r.status_code == 202, r.text
    job, events = finish(client, r.json()["download_job_id"])
    assert job["status"] == "failed"
    assert "SHA256 mismatch" in job["error"] and "0" * 64 in job["error"] and hashlib.sha256(body).hexdigest() in job["error"]
    assert events[-1]["data"]["status"] == "failed"
    assert not any(name in n for n in leftovers(dl_mesh.models / "loras"))
    hashing, _ = finish(client, r.json()["hash_job_id"])
    assert hashing["status"] == "failed" and "no file to hash" in hashing["error"]


def test_hugging_face_info_and_download(client, dl_mesh, remote):
    body = payload(6000, seed=6)
    sha = hashlib.sha256(body).hexdigest()
    name = unique("sd_xl_turbo")
    remote.hub[f"stabilityai/sdxl-turbo/main/{name}"] = (body, sha)
    remote.hub[f"stabilityai/sdxl-turbo/fp16/unet/{name}"] = (body, sha)

    r = client.get("/models/huggingface", params={"repo_id": "stabilityai/sdxl-turbo", "filename": name})
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True, "repo_id": "stabilityai/sdxl-turbo", "filename": name, "revision": "main",
                        "file_size": len(body),
                        "download_url": f"{remote.base}/stabilityai/sdxl-turbo/resolve/main/{name}"}
    missing = client.get("/models/huggingface", params={"repo_id": "stabilityai/sdxl-turbo", "filename": "no.safetensors"})
    assert missing.status_code == 404
    assert client.get("/models/huggingface", params={"repo_id": "nobody/nothing", "filename": name}).status_code == 404
    bad = client.get("/models/huggingface", params={"repo_id": "../etc", "filename": name})
    assert bad.status_code == 400 and violated_fields(bad) == ["repo_id"]
    bad = client.get("/models/huggingface", params={"repo_id": "stabilityai/sdxl-turbo"})
    assert bad.status_code == 400 and violated_fields(bad) == ["filename"]

    r = client.post("/models/download", json={"model_type": "diffusion", "repo_id": "stabilityai/sdxl-turbo",
                                              "filename": f"unet/{name}", "revision": "fp16"})
    assert r.status_code == 202, r.text
    assert r.json()["source"] == "huggingface"
    job, _ = finish(client, r.json()["download_job_id"])
    assert job["status"] == "completed", job
    assert (dl_mesh.models / "diffusion_models" / name).read_bytes() == body
    assert listed(client, "diffusion_models", name) is not None
    assert ("GET", f"/stabilityai/sdxl-turbo/resolve/fp16/unet/{name}", f"Bearer {HF_TOKEN}") in remote.seen


# ---- failures leave nothing ----------------------------------------------------------------


def test_a_file_the_source_says_is_too_large_is_refused_before_queuing(client, remote):
    add_civitai_model(remote, 2003, 3003, unique("big"), b"small")
    remote.civitai["/api/v1/models/2003"]["modelVersions"][0]["files"][1]["sizeKB"] = 9 * 1024  # 9 MiB > 8 MiB
    before = client.get("/queue").json()["total_count"]
    r = client.post("/models/download", json={"model_type": "checkpoint", "model_id": "2003"})
    assert r.status_code == 413, r.text
    assert violated_fields(r) == ["model_id"] and "LORAMESH_DOWNLOAD_MAX_BYTES" in r.json()["error"]
    assert client.get("/queue").json()["total_count"] == before


def test_an_interrupted_download_leaves_no_file(client, dl_mesh, remote):
    name = unique("cut")
    remote.files[name] = payload(1 << 20, seed=7)
    r = client.post("/models/download", json={"model_type": "checkpoint", "url": f"{remote.base}/files/half/{name}"})
    assert r.status_code == 202, r.text
    job, _ = finish(client, r.json()["download_job_id"])
    assert job["status"] == "failed" and "interrupted" in job["error"], job
    assert not any(name in n for n in leftovers(dl_mesh.models / "checkpoints"))
    assert listed(client, "checkpoints", name) is None


def test_a_file_over_the_size_limit_is_stopped_and_leaves_nothing(client, dl_mesh, remote):
    name = unique("huge")
    remote.files[name] = payload(9 << 20, seed=8)  # LORAMESH_DOWNLOAD_MAX_BYTES is 8 MiB here
    r = client.post("/models/download", json={"model_type": "checkpoint", "url": f"{remote.base}/files/{name}"})
    assert r.status_code == 202, r.text
    job, _ = finish(client, r.json()["download_job_id"])
    assert job["status"] == "failed" and "LORAMESH_DOWNLOAD_MAX_BYTES" in job["error"], job
    assert not any(name in n for n in leftovers(dl_mesh.models / "checkpoints"))


@pytest.mark.parametrize(("body", "field"), [
    ({"url": "http://127.0.0.1/x.safetensors"}, "model_type"),
    ({"model_type": "unet", "url": "http://127.0.0.1/x.safetensors"}, "model_type"),
    ({"model_type": "lora"}, "source"),
    ({"model_type": "lora", "source": "torrent", "url": "http://127.0.0.1/x.safetensors"}, "source"),
    ({"model_type": "lora", "url": "http://127.0.0.1/x.safetensors", "subfolder": "../checkpoints"}, "subfolder"),
    ({"model_type": "lora", "url": "http://127.0.0.1/x.safetensors", "subfolder": "/etc"}, "subfolder"),
    ({"model_type": "lora", "url": "ftp://example.com/x.safetensors"}, "url"),
    ({"model_type": "lora", "model_id": "12ab"}, "model_id"),
    ({"model_type": "lora", "repo_id": "org/repo"}, "filename"),
    ({"model_type": "lora", "repo_id": "org/repo", "filename": "notes.txt"}, "filename"),
    ({"model_type": "lora", "repo_id": "org/repo", "filename": "../x.safetensors"}, "filename"),
])
def test_bad_download_requests_are_refused_naming_the_field_and_queue_nothing(client, dl_mesh, body, field):
    before = client.get("/queue").json()["total_count"]
    r = client.post("/models/download", json=body)
    assert r.status_code == 400, r.text
    assert field in violated_fields(r), r.text
    assert "error" in r.json()
    assert client.get("/queue").json()["total_count"] == before
    assert not (dl_mesh.models.parent / "etc").exists()


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/x.safetensors", "http://localhost/x.safetensors",
                                 "http://10.1.2.3/x.safetensors", "http://169.254.169.254/latest/x.safetensors",
                                 "http://[::1]/x.safetensors", "http://[::ffff:192.168.0.1]/x.safetensors"])
def test_private_urls_are_refused_unless_the_setting_allows_them(tmp_path, url):
    """The check plan_download makes before anything is queued (the mesh above allows them)."""
    request = {"model_type": "lora", "url": url}
    with pytest.raises(InvalidInput) as refused:
        downloads.plan_download(request, tmp_path, Settings.load(environ={}))
    assert [f for f, _ in refused.value.violations] == ["url"]
    assert "private or loopback" in str(refused.value)
    allowed = downloads.plan_download(request, tmp_path, Settings.load(environ={"LORAMESH_DOWNLOAD_ALLOW_PRIVATE": "1"}))
    assert allowed.source == "url" and allowed.folder == str(tmp_path / "loras")
    assert not (tmp_path / "loras").exists()  # planning creates nothing
