"""A NATS server that comes back without its store (a new pod, a wiped volume): the services
create their streams, buckets and queues again, and the mesh serves new work."""

from __future__ import annotations

import shutil
import signal
import time

import httpx

from launcher.mesh import Mesh, Ports
from tests.conftest import write_image


def wait_for(check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.5)


def assert_unavailable(client: httpx.Client) -> None:
    """Routes that need NATS answer 503 UNAVAILABLE at once while it is away, saying why."""
    calls = [("GET", "/queue", None), ("GET", "/sessions", None), ("GET", "/queue/some-job", None),
             ("POST", "/txt2img", {"prompt": "a cat", "width": 64, "height": 64, "steps": 2})]
    for method, path, body in calls:
        started = time.monotonic()
        r = client.request(method, path, json=body)
        assert r.status_code == 503, (path, r.status_code, r.text)
        assert r.json()["code"] == 14 and "NATS" in r.json()["message"], r.text
        assert time.monotonic() - started < 4.0, path  # not the 5 s request timeout


def test_services_recreate_their_nats_state_after_a_server_comes_back_empty(tmp_path, models_dir, inference_models):
    image = write_image(tmp_path / "media" / "cat.png")
    env = {"LORAMESH_INFERENCE_MODELS_DIR": str(inference_models["root"]),
           "LORAMESH_SDXL_CONFIG": str(models_dir / "tiny-sdxl-config"),
           "LORAMESH_OUTPUT_DIR": str(tmp_path / "outputs"), "LORAMESH_TRAINER_ACK_WAIT_S": "3",
           "LORAMESH_INFERENCE_ACK_WAIT_S": "3", "LORAMESH_SHUTDOWN_GRACE_S": "2", "HF_HUB_OFFLINE": "1",
           "LORAMESH_MEDIA_ROOTS": str(tmp_path / "media"), "LORAMESH_MODEL_ROOTS": str(models_dir),
           "LORAMESH_TAGGER_MODEL": str(models_dir / "wd14-vit-v1")}
    mesh = Mesh(Ports.free(), var_dir=tmp_path / "var", env=env, services=("trainer", "inference", "tagger")).start()
    try:
        with httpx.Client(base_url=mesh.rest_url, timeout=60) as client:
            assert client.get("/queue").status_code == 200

            # A hung NATS: requests wait out their timeout, then answer 503, not 500.
            mesh.procs["nats"].send_signal(signal.SIGSTOP)
            try:
                r = client.get("/queue")
                assert r.status_code == 503 and r.json()["code"] == 14, r.text
            finally:
                mesh.procs["nats"].send_signal(signal.SIGCONT)
            wait_for(lambda: client.get("/queue").status_code == 200)

            # NATS stops, loses its store and starts again on the same port.
            mesh.held.add("nats")
            mesh.procs["nats"].terminate()
            mesh.procs["nats"].wait(timeout=30)
            assert_unavailable(client)
            # Tagging keeps no state in NATS: it goes on without it.
            assert client.post("/tag", json={"input": [str(image)]}).status_code == 200
            shutil.rmtree(mesh.var_dir / "nats")
            mesh._start_nats(30)
            mesh.held.discard("nats")

            wait_for(lambda: client.get("/queue").status_code == 200)
            assert client.get("/sessions").status_code == 200
            loaded = wait_for(lambda: client.post("/models/load", json={"model_name": "tiny-sdxl.safetensors"}))
            assert loaded.status_code == 200, loaded.text
            job = client.post("/txt2img", json={"prompt": "a cat", "width": 64, "height": 64, "steps": 2})
            assert job.status_code == 202, job.text
            job_id = job.json()["job_id"]
            done = wait_for(lambda: (r := client.get(f"/queue/{job_id}").json())["status"] in (
                "completed", "failed") and r)
            assert done["status"] == "completed", done
    finally:
        mesh.stop()
