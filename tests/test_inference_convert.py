"""POST /convert through the gateway: the tiny Flux transformer converted to Q8_0 and Q4_0 GGUF
on the job queue (202, progress events, GET /queue/{id}), each loaded back through
/models/load and generating close to the unquantized model; a baked-in VAE and tensor type
rules; bad requests refused naming the field with nothing written or queued; cancelled
conversions leave no file."""

from __future__ import annotations

import json
import time
import uuid

import numpy as np
import pytest
from gguf import GGUFReader
from PIL import Image
from safetensors.torch import load_file

from services.inference import conversion, gguf_files
from tests.conftest import violated_fields
from tests.test_inference_gguf import FLUX_JOB, FLUX_LOAD, client  # noqa: F401 (the module's client fixture)
from tests.test_inference_server import txt2img, wait_job

SOURCE = "diffusion_models/tiny-flux.safetensors"


@pytest.fixture
def fresh(inference_models):
    """Names for new files under diffusion_models/converted/, removed afterwards (other tests
    list that folder), with a check that no temporary file stays behind."""
    folder = inference_models["root"] / "diffusion_models" / "converted"
    made = []

    def name(label: str) -> str:
        made.append(f"diffusion_models/converted/{label}-{uuid.uuid4().hex[:8]}.gguf")
        return made[-1]

    yield name
    leftovers = sorted(p.name for p in folder.glob(".*.part")) if folder.exists() else []
    for relative in made:
        (inference_models["root"] / relative).unlink(missing_ok=True)
    assert leftovers == []


def _convert(client, **body) -> tuple[dict, dict]:  # noqa: F811
    r = client.post("/convert", json=body)
    assert r.status_code == 202, r.text
    accepted = r.json()
    with client.stream("GET", f"/queue/{accepted['job_id']}/events") as stream:
        events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
    job = wait_job(client, accepted["job_id"])
    return accepted, {**job, "events": events}


def _generate(client, outputs_dir, model_name: str) -> np.ndarray:  # noqa: F811
    r = client.post("/models/load", json={**FLUX_LOAD, "model_name": model_name})
    assert r.status_code == 200, r.text
    job = txt2img(client, **FLUX_JOB)
    assert job["status"] == "completed", job
    return np.asarray(Image.open(outputs_dir / job["outputs"][0]).convert("RGB"), dtype=np.float64)


def test_flux_converts_to_q8_0_and_q4_0_and_generates_close_to_the_unquantized_model(client, fresh, inference_models,  # noqa: F811
                                                                                    outputs_dir):
    root = inference_models["root"]
    tensors = len(load_file(inference_models["flux"]))
    images, targets = {}, {}
    for qtype in ("q8_0", "q4_0"):
        target = targets[qtype] = fresh(f"tiny-flux-{qtype}")
        accepted, job = _convert(client, input_path=SOURCE, output_type=qtype, output_path=target)
        assert accepted["status"] == "pending" and accepted["position"] >= 1 and accepted["output_path"] == target
        assert job["status"] == "completed" and job["type"] == "convert", job
        assert job["params"] == {"input_path": SOURCE, "output_type": qtype, "output_path": target}
        assert job["progress"]["total_steps"] == tensors and job["progress"]["percentage"] == 100.0
        names = [e["event"] for e in job["events"]]
        assert names[0] == "job_added" and names[-1] == "job_status_changed" and "job_progress" in names
        assert job["events"][-1]["data"]["status"] == "completed"
        assert {e["data"]["total_steps"] for e in job["events"] if e["event"] == "job_progress"} == {tensors}

        types = gguf_files.inspect(root / target).tensor_types
        assert set(types) == {"F32", qtype.upper()} and types[qtype.upper()] > 0
        assert job["job_id"] in [item["job_id"] for item in client.get("/queue").json()["items"]]
        images[qtype] = _generate(client, outputs_dir, target.removeprefix("diffusion_models/"))
    # The Q8_0 conversion holds exactly the weights of the reference Q8_0 file of the same model.
    reference = {t.name: t.data for t in GGUFReader(inference_models["flux_gguf_q8_0"]).tensors}
    converted = {t.name: t.data for t in GGUFReader(root / targets["q8_0"]).tensors}
    assert set(converted) == set(reference)
    assert all(np.array_equal(converted[name], reference[name]) for name in reference)
    plain = _generate(client, outputs_dir, "tiny-flux.safetensors")
    q8_diff, q4_diff = np.abs(images["q8_0"] - plain).mean(), np.abs(images["q4_0"] - plain).mean()
    print(f"converted through /convert, mean pixel difference from the unquantized model: Q8_0 {q8_diff:.3f}, "
          f"Q4_0 {q4_diff:.3f}")
    assert plain.std() > 10
    assert 0 < q8_diff < 1.0 and q8_diff < q4_diff < 6.0


def test_a_baked_vae_and_tensor_type_rules(client, fresh, inference_models):  # noqa: F811
    root = inference_models["root"]
    target = fresh("tiny-flux-vae")
    _, job = _convert(client, input_path=SOURCE, output_type="q4_0", output_path=target,
                      vae_path="vae/tiny-flux-ae.safetensors", tensor_type_rules="^vae\\.=f16, ^img_in\\.=q8_0")
    assert job["status"] == "completed", job
    vae = load_file(inference_models["flux_vae"])
    reader = {t.name: t for t in GGUFReader(root / target).tensors}
    assert {name for name in reader if name.startswith("vae.")} == {"vae." + name for name in vae}
    assert {reader["vae." + name].tensor_type.name for name in vae} == {"F16"}
    for name, tensor in vae.items():
        stored = np.asarray(reader["vae." + name].data, dtype=np.float32).reshape(tensor.shape)
        assert np.allclose(stored, tensor.numpy(), atol=1e-2, rtol=1e-3), name
    assert reader["img_in.weight"].tensor_type.name == "Q8_0"
    assert reader["txt_in.weight"].tensor_type.name == "Q4_0" and reader["txt_in.bias"].tensor_type.name == "F32"
    # The baked file is still a Flux diffusion model /models/load takes.
    r = client.post("/models/load", json={**FLUX_LOAD, "model_name": target.removeprefix("diffusion_models/")})
    assert r.status_code == 200, r.text


BAD = [
    ({"output_type": "q4_k"}, "output_type"),
    ({"output_type": "q9_9"}, "output_type"),
    ({"output_type": None}, "output_type"),
    ({"output_path": "../outside.gguf"}, "output_path"),
    ({"output_path": "/tmp/outside.gguf"}, "output_path"),
    ({"output_path": "diffusion_models/flux1-schnell-Q8_0.gguf"}, "output_path"),
    ({"output_path": "diffusion_models/not-gguf.safetensors"}, "output_path"),
    ({"input_path": "diffusion_models/missing.safetensors"}, "input_path"),
    ({"input_path": None}, "input_path"),
    ({"input_path": "../models/diffusion_models/tiny-flux.safetensors"}, "input_path"),
    ({"input_path": "checkpoints/tiny-sdxl.safetensors"}, "input_path"),
    ({"vae_path": "vae/missing.safetensors"}, "vae_path"),
    ({"tensor_type_rules": "([=q8_0"}, "tensor_type_rules"),
    ({"tensor_type_rules": "^vae\\.=q9"}, "tensor_type_rules"),
    ({"tensor_type_rules": "no-type-given"}, "tensor_type_rules"),
]


@pytest.mark.parametrize("change,field", BAD, ids=[f"{f}:{list(c.values())[0]}" for c, f in BAD])
def test_bad_conversions_are_refused_naming_the_field_and_change_nothing(client, inference_models, change,  # noqa: F811
                                                                        field):
    root = inference_models["root"]
    before = sorted(p for p in root.rglob("*") if p.is_file())
    queued = client.get("/queue").json()["total_count"]
    body = {"input_path": SOURCE, "output_type": "q8_0", "output_path": "diffusion_models/converted/bad.gguf",
            **change}
    r = client.post("/convert", json={k: v for k, v in body.items() if v is not None})
    assert r.status_code == 400, r.text
    assert violated_fields(r) == [field] and r.json()["error"], r.json()
    if "sdxl" in str(body["input_path"]):
        assert "SDXL" in r.json()["message"] and "Flux" in r.json()["message"]
    assert sorted(p for p in root.rglob("*") if p.is_file()) == before
    assert client.get("/queue").json()["total_count"] == queued


def test_a_cancelled_conversion_leaves_no_file(client, fresh, inference_models):  # noqa: F811
    root = inference_models["root"]
    # Pending behind a long generation, cancelled through the queue: it never runs.
    assert client.post("/models/load", json={**FLUX_LOAD, "model_name": "tiny-flux.safetensors"}).status_code == 200
    busy = client.post("/txt2img", json={**FLUX_JOB, "steps": 30, "batch_count": 2}).json()
    target = fresh("cancelled")
    r = client.post("/convert", json={"input_path": SOURCE, "output_type": "q8_0", "output_path": target})
    assert r.status_code == 202 and r.json()["status"] == "pending", r.text
    assert client.delete(f"/queue/{r.json()['job_id']}").status_code == 200
    assert wait_job(client, busy["job_id"])["status"] == "completed"
    time.sleep(0.5)
    assert client.get(f"/queue/{r.json()['job_id']}").json()["status"] == "cancelled"
    assert not (root / target).exists()

    # Stopped midway while writing (what a cancel of a running job raises at the next tensor).
    plan = conversion.plan_conversion(root, {"input_path": SOURCE, "output_type": "q4_0",
                                             "output_path": fresh("stopped")})
    staged = conversion.staged_path(plan, "job", 1)

    def stop_at_five(done: int, total: int) -> None:
        if done == 5:
            assert staged.stat().st_size > 0  # half written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        conversion.convert(plan, staged, stop_at_five)
    assert not staged.exists() and not (root / plan.output_name).exists()
