"""Training tasks (/api/v1/training/, JWT) and finetunes (/v1/finetune, X-Key) end to end
through the gateway, on a mesh of its own with one trainer slot: preprocessing with the
captioner service, training, the LoRA at the end, priorities, webhooks, cancel, resume
after a killed trainer, and bad input that creates nothing."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import uuid
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from launcher.mesh import Auth, Mesh, Ports
from services.trainer import webhooks
from tinymodels import captioners as tiny_captioners
from tinymodels import diffusion as tiny_diffusion

API_KEY = "finetune-test-key"
SECRET = "webhook-test-secret"

# The document's example request: every optional field null.
DOCUMENT_REQUEST = {
    "training_type": "LORA", "entity_type": "SUBJECT", "entity_id": None, "trigger_word": "zxq",
    "rank": None, "steps": None, "learning_rate": None, "sample_prompts": None, "source_images": None,
    "base_model_path": None, "bypass_guidance_embedding": None, "webhook_url": None, "origin_instance": None,
    "origin_zone": None, "origin_version": None, "origin_tenant_id": None, "preprocessing_transforms": None,
    "preprocessing_captioning_strategy": None, "preprocessing_captioning_prompt": None,
}
# Every field of the document's TrainingTask, and those it types `X | null`.
TASK_FIELDS = (
    "id created_at updated_at origin_instance origin_zone origin_version origin_tenant_id training_type "
    "entity_type entity_id status progress current_step total_steps eta_seconds trigger_word training_folder rank "
    "save_every max_step_saves_to_keep batch_size steps learning_rate gradient_accumulation optimizer "
    "bypass_guidance_embedding base_model_path local_model_path sample_every sample_steps sample_prompts "
    "started_at completed_at logs error_message webhook_url celery_training_task_id celery_preprocessing_task_id "
    "celery_chain_task_id preprocessing_stage processed_files_count total_files_count preprocessing_started_at "
    "preprocessing_completed_at source_images processed_dataset_path preprocessing_transforms "
    "preprocessing_captioning_strategy preprocessing_captioning_prompt priority priority_changed_at").split()
NULL_WHEN_NEW = (
    "origin_zone origin_version origin_tenant_id entity_id eta_seconds local_model_path started_at completed_at "
    "error_message celery_training_task_id celery_preprocessing_task_id preprocessing_stage processed_files_count "
    "total_files_count preprocessing_started_at preprocessing_completed_at processed_dataset_path "
    "preprocessing_transforms preprocessing_captioning_prompt priority_changed_at").split()


class Receiver(BaseHTTPRequestHandler):
    """A webhook receiver that refuses the first delivery of each event and records all."""

    seen: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        event = self.headers.get(webhooks.EVENT_HEADER)
        first = not any(e == event and tid == json.loads(body)["id"] for e, tid, _, _ in self.seen)
        status = 503 if first else 200
        self.seen.append((event, json.loads(body)["id"], self.headers.get(webhooks.SIGNATURE_HEADER), body))
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tasks")


@pytest.fixture(scope="module")
def media(root) -> Path:
    folder = root / "media"
    tiny_diffusion.build_dataset(folder / "shapes", count=4)
    return folder


@pytest.fixture(scope="module")
def models(root) -> Path:
    folder = root / "models"
    tiny_diffusion.build_sdxl(folder / "tiny-sdxl")
    tiny_captioners.build_florence2(folder / "florence2")
    tiny_captioners.build_llava(folder / "joycaption")
    return folder


@pytest.fixture(scope="module")
def keys():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="tasks", alg="RS256", use="sig")

    def token(subject: str, expires_in: int = 3600) -> str:
        return jwt.encode({"sub": subject, "exp": int(time.time()) + expires_in}, key, algorithm="RS256",
                          headers={"kid": "tasks"})

    return json.dumps({"keys": [jwk]}), token


@pytest.fixture(scope="module")
def mesh(root, media, models, keys):
    jwks, token = keys
    env = {
        "LORAMESH_MEDIA_ROOTS": str(media), "LORAMESH_MODEL_ROOTS": str(models),
        "LORAMESH_FLORENCE2_MODEL": str(models / "florence2"), "LORAMESH_JOYCAPTION_MODEL": str(models / "joycaption"),
        "LORAMESH_TRAINING_BASE_MODEL": str(models / "tiny-sdxl"),
        "LORAMESH_TRAINER_MAX_SESSIONS": "1", "LORAMESH_TRAINER_ACK_WAIT_S": "3",
        "LORAMESH_ALLOW_PRIVATE_URLS": "1", "LORAMESH_WEBHOOK_SECRET": SECRET, "LORAMESH_WEBHOOK_BACKOFF_S": "0.2",
        "LORAMESH_SHUTDOWN_GRACE_S": "2", "HF_HUB_OFFLINE": "1",
    }
    mesh = Mesh(Ports.free(), var_dir=root / "var", env=env, services=("trainer", "captioner"),
                auth=Auth(jwks=jwks, api_keys=[API_KEY])).start(timeout=120)
    yield mesh
    mesh.stop()


@pytest.fixture(scope="module")
def receiver():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


@pytest.fixture(scope="module")
def alice(mesh, keys):
    with httpx.Client(base_url=mesh.rest_url, timeout=60,
                      headers={"authorization": f"Bearer {keys[1]('alice')}"}) as client:
        yield client


@pytest.fixture(scope="module")
def bob(mesh, keys):
    with httpx.Client(base_url=mesh.rest_url, timeout=60,
                      headers={"authorization": f"Bearer {keys[1]('bob')}"}) as client:
        yield client


@pytest.fixture(scope="module")
def keyed(mesh):
    with httpx.Client(base_url=mesh.rest_url, timeout=60, headers={"x-key": API_KEY}) as client:
        yield client


def sources(media: Path) -> list[str]:
    return sorted(str(p) for p in (media / "shapes").iterdir() if p.suffix in (".png", ".jpg"))


def task_request(media: Path, models: Path, **fields) -> dict:
    return {**DOCUMENT_REQUEST, "source_images": sources(media), "base_model_path": str(models / "tiny-sdxl"),
            "steps": 4, "rank": 4, "learning_rate": 1e-3, **fields}


def wait_task(client: httpx.Client, task_id: str, done, timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        task = client.get(f"/api/v1/training/{task_id}").json()
        if done(task):
            return task
        if time.monotonic() > deadline:
            raise AssertionError(f"task did not get there: {json.dumps(task)[:3000]}")
        time.sleep(0.3)


def finished(task: dict) -> bool:
    return task["status"] in ("COMPLETED", "FAILED", "CANCELLED")


def render(pipeline_dir: Path, lora: Path | None):
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora.parent, weight_name=lora.name)
    image = pipe("zxq, a red disc", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    return image


def test_the_documented_flow_trains_a_lora_that_changes_the_output(alice, bob, media, models, receiver):
    r = alice.post("/api/v1/training/", json=task_request(media, models, webhook_url=receiver))
    assert r.status_code == 200, r.text
    created = r.json()
    assert set(TASK_FIELDS) <= set(created), set(TASK_FIELDS) - set(created)
    assert all(created[name] is None for name in NULL_WHEN_NEW), {n: created[n] for n in NULL_WHEN_NEW}
    assert created["status"] == "PENDING" and created["trigger_word"] == "zxq"
    assert (created["save_every"], created["max_step_saves_to_keep"], created["batch_size"],
            created["gradient_accumulation"], created["optimizer"], created["sample_every"],
            created["sample_steps"]) == (2000, 4, 1, 1, "adamw8bit", 250, 25)
    assert created["preprocessing_captioning_strategy"] == "trigger_only" and created["priority"] == 1
    assert created["origin_instance"] == "unknown" and created["total_steps"] == 4

    task = wait_task(alice, created["id"], finished)
    assert task["status"] == "COMPLETED", task["error_message"] or task["logs"]
    assert task["progress"] == 100 and task["current_step"] == 4
    assert task["processed_files_count"] == task["total_files_count"] == 4
    assert task["preprocessing_stage"] == "completed" and task["processed_dataset_path"]
    for stage in ("downloading", "validating", "captioning"):
        assert f"preprocessing stage: {stage}" in task["logs"]
    assert "captions by strategy trigger_only" in task["logs"]
    captions = sorted(Path(task["processed_dataset_path"]).glob("*.txt"))
    # The dataset brings its own captions for three of its four pictures; the fourth gets the trigger word.
    assert [c.read_text() for c in captions].count("zxq") == 1
    lora = Path(task["output_lora_path"])
    base = render(models / "tiny-sdxl", None)
    assert abs(render(models / "tiny-sdxl", lora) - base).mean() > 1e-3

    r = alice.get("/api/v1/training/", params={"limit": 5})
    assert r.status_code == 200, r.text
    listed = r.json()
    assert [t["id"] for t in listed][:1] == [task["id"]]
    assert bob.get(f"/api/v1/training/{task['id']}").status_code == 404
    assert all(t["id"] != task["id"] for t in bob.get("/api/v1/training/").json())
    assert alice.post(f"/api/v1/training/{task['id']}/cancel").status_code == 400

    assert wait_for_deliveries(task["id"], 2)
    deliveries = [d for d in Receiver.seen if d[1] == task["id"]]
    assert [d[0] for d in deliveries] == ["COMPLETED", "COMPLETED"]
    for _, _, signature, body in deliveries:
        assert webhooks.verify(body, SECRET, signature)
    final = alice.get(f"/api/v1/training/{task['id']}").json()
    assert final["webhook_deliveries"][0]["delivered"] and final["webhook_deliveries"][0]["attempts"] == 2


def wait_for_deliveries(task_id: str, count: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(1 for d in Receiver.seen if d[1] == task_id) >= count:
            time.sleep(0.5)  # nothing more should come
            return sum(1 for d in Receiver.seen if d[1] == task_id) == count
        time.sleep(0.1)
    return False


def archive(media: Path, entries: dict[str, bytes] | None = None, *, pictures: bool = True) -> str:
    """A base64 ZIP of the shapes dataset (pictures and their captions) plus `entries`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        if pictures:
            for path in sorted((media / "shapes").iterdir()):
                if path.is_file():
                    zf.write(path, f"set/{path.name}")
        for name, data in (entries or {}).items():
            zf.writestr(name, data)
    return base64.b64encode(buffer.getvalue()).decode()


def wait_finetune(client: httpx.Client, finetune_id: str, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = client.get("/v1/finetune_details", params={"finetune_id": finetune_id})
        assert r.status_code == 200, r.text
        details = r.json()["finetune_details"]
        if details["status"] in ("Ready", "Error", "Cancelled") or time.monotonic() > deadline:
            return details
        time.sleep(0.5)


def test_a_full_finetune_keeps_the_weights_and_an_extracted_lora_close_to_them(keyed, media, models, mesh):
    r = keyed.post("/v1/finetune", json={"file_data": archive(media), "finetune_comment": "shapes", "mode": "product",
                                         "iterations": 100, "learning_rate": 2e-3, "lora_rank": 16})
    assert r.status_code == 200, r.text
    details = wait_finetune(keyed, r.json()["finetune_id"])
    assert details["status"] == "Ready", details
    assert (details["finetune_type"], details["lora_rank"], details["iterations"], details["trigger_word"],
            details["priority"], details["captioning"]) == ("full", 16, 100, "TOK", "quality", True)
    import torch
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    base = render(models / "tiny-sdxl", None)
    extracted = render(models / "tiny-sdxl", Path(details["lora_path"]))
    pipe = DiffusionPipeline.from_pretrained(models / "tiny-sdxl")
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.load_state_dict(load_file(details["full_weights_path"]))
    full = pipe("zxq, a red disc", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]
    assert abs(full - base).mean() > 1e-3
    assert abs(extracted - full).mean() < abs(base - full).mean()
    # The pictures without a caption file were captioned by the captioner, steered by the mode.
    log = (Path(mesh.log_dir) / "captioner.log").read_text()
    assert "CaptionBatch" in log


def test_a_lora_finetune_captions_through_the_captioner_and_keeps_given_captions(keyed, alice, media):
    r = keyed.post("/v1/finetune", json={"file_data": archive(media), "finetune_comment": "lora", "mode": "character",
                                         "iterations": 100, "finetune_type": "lora", "trigger_word": "sks"})
    assert r.status_code == 200, r.text
    finetune_id = r.json()["finetune_id"]
    details = wait_finetune(keyed, finetune_id)
    assert details["status"] == "Ready" and details["learning_rate"] == 1e-4 and details["full_weights_path"] == ""
    dataset = next(p / "dataset" for p in Path(details["lora_path"]).parents if (p / "dataset").is_dir())
    captions = sorted(p.read_text() for p in dataset.glob("*.txt"))
    given = sorted(p.read_text().strip() for p in (media / "shapes").glob("*.txt"))
    assert [c for c in captions if c in given] == given  # the archive's own captions are kept
    assert "captions by strategy joycaption" in details["logs"]
    made = [c for c in captions if c not in given]
    assert len(made) == 1 and made[0].startswith("sks, ") and len(made[0]) > len("sks, ")
    # Another caller (a bearer token here) cannot read it.
    assert alice.get(f"/api/v1/training/{finetune_id}").status_code == 404


def test_waiting_tasks_start_highest_priority_first(alice, media, models):
    transforms = [{"type": "resize", "size": 80}, {"type": "center_crop", "size": 64}]
    blocker = alice.post("/api/v1/training/", json=task_request(
        media, models, steps=40, preprocessing_captioning_strategy="florence2",
        preprocessing_transforms=transforms)).json()
    assert blocker.get("preprocessing_transforms") == transforms, blocker
    wait_task(alice, blocker["id"], lambda t: t["status"] == "TRAINING" or finished(t))
    queued = {}
    for priority in (1, 3, 2):
        r = alice.post("/api/v1/training/", json=task_request(media, models, steps=1, priority=priority))
        assert r.status_code == 200, r.text
        queued[priority] = r.json()["id"]
    # A priority change moves a waiting task and is stamped.
    moved = alice.post(f"/api/v1/training/{queued[1]}/priority", json={"priority": 0}).json()
    assert moved["priority"] == 0 and moved["priority_changed_at"] is not None
    moved = alice.post(f"/api/v1/training/{queued[1]}/priority", json={"priority": 1}).json()
    done = {p: wait_task(alice, tid, finished) for p, tid in queued.items()}
    assert all(t["status"] == "COMPLETED" for t in done.values()), [t["logs"] for t in done.values()]
    order = sorted(done, key=lambda p: done[p]["started_at"])
    assert order == [3, 2, 1]
    blocker = wait_task(alice, blocker["id"], finished)
    assert done[3]["started_at"] >= blocker["completed_at"]
    # The blocker's pictures were transformed, and the one without a caption file was
    # described by the captioner's Florence-2.
    from PIL import Image

    dataset = Path(blocker["processed_dataset_path"])
    assert {Image.open(p).size for p in dataset.glob("*.png")} == {(64, 64)}
    made = [c.read_text() for c in dataset.glob("*.txt") if not c.read_text().startswith("TOK")]
    assert len(made) == 1 and made[0].startswith("zxq, ") and len(made[0]) > 5
    assert "captions by strategy florence2" in blocker["logs"]


def test_cancel_stops_a_task_and_announces_it_once(alice, media, models, receiver):
    running = alice.post("/api/v1/training/", json=task_request(media, models, steps=400, save_every=5,
                                                                 webhook_url=receiver)).json()
    waiting = alice.post("/api/v1/training/", json=task_request(media, models, webhook_url=receiver)).json()
    wait_task(alice, running["id"], lambda t: t["current_step"] >= 6 or finished(t))
    assert alice.post(f"/api/v1/training/{waiting['id']}/cancel").json()["status"] == "CANCELLED"
    r = alice.post(f"/api/v1/training/{running['id']}/cancel")
    assert r.status_code == 200, r.text
    task = wait_task(alice, running["id"], finished, timeout=60)
    assert task["status"] == "CANCELLED" and task["current_step"] < 400
    checkpoints = sorted(Path(task["training_folder"]).rglob("*.safetensors"))
    assert checkpoints, "the last checkpoint is kept"
    for task_id in (running["id"], waiting["id"]):
        assert wait_for_deliveries(task_id, 2)
        assert [d[0] for d in Receiver.seen if d[1] == task_id] == ["CANCELLED", "CANCELLED"]


def test_a_task_that_fails_says_why_and_announces_it(alice, media, models, receiver):
    (media / "broken.png").write_bytes(b"not a picture at all")
    task = alice.post("/api/v1/training/", json=task_request(
        media, models, source_images=[str(media / "broken.png")], webhook_url=receiver)).json()
    task = wait_task(alice, task["id"], finished)
    assert task["status"] == "FAILED" and "source_images[0]" in task["error_message"], task["error_message"]
    assert "not a readable image" in task["error_message"]
    assert wait_for_deliveries(task["id"], 2)
    assert [d[0] for d in Receiver.seen if d[1] == task["id"]] == ["FAILED", "FAILED"]


def test_a_killed_trainer_resumes_the_task_from_its_checkpoint(alice, media, models, mesh):
    task = alice.post("/api/v1/training/", json=task_request(media, models, steps=60, save_every=10)).json()
    wait_task(alice, task["id"], lambda t: t["current_step"] >= 22 or finished(t))
    mesh.stop_service("trainer", crash=True)
    mesh.start_service("trainer")
    task = wait_task(alice, task["id"], finished)
    assert task["status"] == "COMPLETED", task["logs"]
    assert "resumed from" in task["logs"] and "(attempt 2)" in task["logs"]
    assert Path(task["output_lora_path"]).is_file()


def zip_bomb() -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("set/a.png", b"\0" * (50 << 20))
    return base64.b64encode(buffer.getvalue()).decode()


def test_bad_input_is_refused_naming_the_field_and_creates_nothing(mesh, alice, keyed, keys, media, models):
    before = alice.get("/api/v1/training/", params={"limit": 1000}).json()
    folders = set((media / "tasks").iterdir())
    good = task_request(media, models)

    assert httpx.post(mesh.rest_url + "/api/v1/training/", json=good).status_code == 401
    expired = {"authorization": f"Bearer {keys[1]('alice', expires_in=-3600)}"}
    assert httpx.post(mesh.rest_url + "/api/v1/training/", json=good, headers=expired).status_code == 401
    assert httpx.get(mesh.rest_url + "/v1/finetune_details", params={"finetune_id": str(uuid.uuid4())},
                     headers={"x-key": "wrong"}).status_code == 403
    # A client cannot claim another subject: the gateway's own header is the token's.
    spoofed = alice.get("/api/v1/training/", headers={"x-loramesh-subject": "bob"}).json()
    assert [t["id"] for t in spoofed] == [t["id"] for t in before][:10]

    def refused(client, path, body, field):
        r = client.post(path, json=body)
        assert r.status_code == 422, (field, r.status_code, r.text)
        locs = [item["loc"][1:] for item in r.json()["detail"]]
        wanted = [int(part) if part.isdigit() else part for part in field.replace("[", ".").replace("]", "").split(".")]
        assert wanted in locs, (field, locs)

    refused(alice, "/api/v1/training/", {**good, "webhook_url": "ftp://example.com/hook"}, "webhook_url")
    refused(alice, "/api/v1/training/", {**good, "source_images": ["/etc/passwd"]}, "source_images[0]")
    refused(alice, "/api/v1/training/", {**good, "training_type": "HALF"}, "training_type")
    refused(alice, "/api/v1/training/", {**good, "steps": 0}, "steps")
    refused(alice, "/api/v1/training/", {**good, "preprocessing_captioning_strategy": "guess"},
            "preprocessing_captioning_strategy")
    refused(alice, "/api/v1/training/", {**good, "trigger_word": ""}, "trigger_word")
    refused(alice, "/api/v1/training/", {**good, "steps": 1.5}, "steps")  # a wrong type, refused by the gateway
    finetune = {"file_data": archive(media), "finetune_comment": "bad", "mode": "product"}
    refused(keyed, "/v1/finetune", {**finetune, "file_data": "not base64!"}, "file_data")
    refused(keyed, "/v1/finetune", {**finetune, "file_data": archive(media, {"../evil.png": b"x"})}, "file_data")
    refused(keyed, "/v1/finetune", {**finetune, "file_data": archive(media, {"/abs.png": b"x"})}, "file_data")
    refused(keyed, "/v1/finetune", {**finetune, "file_data": zip_bomb()}, "file_data")
    refused(keyed, "/v1/finetune", {**finetune, "file_data": archive(media, {"a.txt": b"hi"}, pictures=False)},
            "file_data")
    for field, value in (("iterations", 99), ("iterations", 1001), ("lora_rank", 8), ("mode", "anime"),
                         ("learning_rate", 0.1), ("finetune_type", "half"), ("priority", "now")):
        refused(keyed, "/v1/finetune", {**finetune, field: value}, field)
    r = keyed.get("/v1/finetune_details", params={"finetune_id": "no-such-id"})
    assert r.status_code == 404 and "no-such-id" in r.json()["message"]
    r = keyed.get("/v1/finetune_details")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "finetune_id"
    assert alice.get("/api/v1/training/not-a-uuid").status_code == 404
    assert alice.get(f"/api/v1/training/{'0' * 8}-0000-0000-0000-{'0' * 12}").status_code == 404

    assert [t["id"] for t in alice.get("/api/v1/training/", params={"limit": 1000}).json()] == \
        [t["id"] for t in before]
    assert set((media / "tasks").iterdir()) == folders
