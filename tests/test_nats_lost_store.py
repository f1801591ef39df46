"""A NATS server that comes back without its store (a new pod, a wiped volume): the services
create their streams, buckets and queues again, and the mesh serves new work."""

from __future__ import annotations

import shutil
import time

import httpx

from launcher.mesh import Mesh, Ports


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


def test_services_recreate_their_nats_state_after_a_server_comes_back_empty(tmp_path, models_dir, inference_models):
    env = {"LORAMESH_INFERENCE_MODELS_DIR": str(inference_models["root"]),
           "LORAMESH_SDXL_CONFIG": str(models_dir / "tiny-sdxl-config"),
           "LORAMESH_OUTPUT_DIR": str(tmp_path / "outputs"), "LORAMESH_TRAINER_ACK_WAIT_S": "3",
           "LORAMESH_INFERENCE_ACK_WAIT_S": "3", "LORAMESH_SHUTDOWN_GRACE_S": "2", "HF_HUB_OFFLINE": "1"}
    mesh = Mesh(Ports.free(), var_dir=tmp_path / "var", env=env, services=("trainer", "inference")).start()
    try:
        with httpx.Client(base_url=mesh.rest_url, timeout=60) as client:
            assert client.get("/queue").status_code == 200

            # NATS stops, loses its store and starts again on the same port.
            mesh.held.add("nats")
            mesh.procs["nats"].terminate()
            mesh.procs["nats"].wait(timeout=30)
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
