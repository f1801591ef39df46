"""Live previews and the generation server's WebSocket events, through the gateway: GET/PUT
/preview/settings, job_preview events in each mode (proj, tae, vae, none) on the WebSocket and
on /queue/{id}/events, every documented event of a job, a model and an upscaler in order, a
replica's periodic server_status, and the seed's JavaScript example in headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import subprocess
import time
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from websockets.asyncio.client import connect as ws_connect
from websockets.sync.client import connect as ws_sync_connect

from services.common import architectures
from services.common.errors import InvalidInput
from services.inference import previews
from tests.conftest import wait_for
from tinymodels.model_files import build_taesd_decoder_file

CHROMIUM = Path("/usr/bin/chromium")
DEFAULTS = {"enabled": True, "mode": "tae", "interval": 1, "max_size": 256, "quality": 75}
FINAL = ("completed", "failed", "cancelled")


@pytest.fixture(scope="module")
def client(mesh):
    with httpx.Client(base_url=mesh.rest_url, timeout=120) as c:
        yield c
        c.put("/preview/settings", json=DEFAULTS)


@pytest.fixture
def settings(client):
    """Preview settings a test changes go back to the documented defaults after it."""
    yield lambda **body: _put(client, body)
    _put(client, DEFAULTS)


def _put(client, body: dict) -> dict:
    r = client.put("/preview/settings", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def ws_url(mesh) -> str:
    return f"ws://127.0.0.1:{mesh.ports.websocket}"


async def job_events(mesh, client: httpx.Client, path: str, body: dict, until: str = "job_status_changed"
                     ) -> tuple[str, list[dict]]:
    """Submits a job with a WebSocket open and returns its id and every message about it, up to
    its final job_status_changed."""
    async with ws_connect(ws_url(mesh) + "/?service=inference") as ws:
        await asyncio.sleep(0.2)  # the bridge's subscription is live before the job exists
        r = await asyncio.to_thread(client.post, path, json=body)
        assert r.status_code in (200, 202), r.text  # /v1/inference answers 200 with a request_id
        job_id = r.json().get("job_id") or r.json()["request_id"]
        seen: list[dict] = []
        async with asyncio.timeout(180):
            while True:
                message = json.loads(await ws.recv())
                if message["data"].get("job_id") != job_id:
                    continue
                seen.append(message)
                if message["event"] == until and message["data"].get("status", "") in FINAL:
                    return job_id, seen


def picture(data_url: str) -> Image.Image:
    assert data_url.startswith("data:image/jpeg;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))
    assert image.format == "JPEG"
    return image.convert("RGB")


# ---- settings --------------------------------------------------------------------------------


def test_preview_settings_are_the_documented_defaults_and_change_field_by_field(client, settings):
    assert client.get("/preview/settings").json() == DEFAULTS
    # The document's own example body, then one field alone: the others stay.
    assert settings(**DEFAULTS) == {"success": True, "settings": DEFAULTS}
    changed = settings(mode="proj", interval=3)
    assert changed["settings"] == {**DEFAULTS, "mode": "proj", "interval": 3}
    assert client.get("/preview/settings").json() == {**DEFAULTS, "mode": "proj", "interval": 3}
    assert settings(quality=40)["settings"] == {**DEFAULTS, "mode": "proj", "interval": 3, "quality": 40}


@pytest.mark.parametrize("body, field", [
    ({"interval": 0}, "interval"), ({"interval": 101}, "interval"), ({"quality": 101}, "quality"),
    ({"quality": 0}, "quality"), ({"max_size": 63}, "max_size"), ({"max_size": 1025}, "max_size"),
    ({"mode": "fast"}, "mode"), ({"mode": ""}, "mode"),
])
def test_bad_preview_settings_are_refused_naming_the_field_and_change_nothing(client, settings, body, field):
    settings(mode="vae", interval=2)
    r = client.put("/preview/settings", json={"enabled": False, **body})
    assert r.status_code == 400, r.text
    assert field in r.json()["message"] and r.json()["error"]
    assert client.get("/preview/settings").json() == {**DEFAULTS, "mode": "vae", "interval": 2}


def test_wrong_types_and_unknown_fields_are_400s(client):
    for body in ({"interval": "often"}, {"max_size": 1.5}, {"colour": "red"}, [1, 2]):
        r = client.put("/preview/settings", json=body)
        assert r.status_code == 400, (body, r.text)
    assert client.get("/preview/settings").json() == DEFAULTS


def test_settings_validation_in_process():
    current = previews.PreviewSettings()
    with pytest.raises(InvalidInput) as bad:
        current.updated({"interval": 0, "quality": 101, "mode": "fast", "enabled": 1})
    assert {name for name, _ in bad.value.violations} == {"interval", "quality", "mode", "enabled"}
    assert current.updated({"max_size": 64}).max_size == 64


def test_every_family_has_a_latent_format():
    """A new family cannot ship without its preview projection."""
    assert set(previews.LATENT_FORMATS) == {family.id for family in architectures.FAMILIES.values()}


# ---- the tiny autoencoder file --------------------------------------------------------------


def test_a_taesd_decoder_file_in_the_original_layout_decodes_as_its_source_decoder(tmp_path):
    import diffusers

    path = build_taesd_decoder_file(tmp_path / "taesd" / "taesd_decoder.safetensors", 4, seed=5)
    torch.manual_seed(5)
    source = diffusers.AutoencoderTiny(latent_channels=4).eval()
    tae = previews.load_tae(path, "cpu", torch.float32)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours, theirs = tae.decode(latents).sample, source.decode(latents).sample
    assert torch.equal(ours, theirs)
    other = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert not torch.allclose(tae.decode(other).sample, ours), "the decoder follows its input"
    assert previews.find_tae(tmp_path / "taesd", architectures.SD15) == path
    assert previews.find_tae(tmp_path / "taesd", architectures.SDXL) is None


# ---- previews of jobs -----------------------------------------------------------------------


def test_one_job_gives_every_event_in_order_with_a_preview_per_interval(mesh, client, sdxl_loaded, settings):
    settings(mode="proj", interval=2, max_size=64)
    job_id, seen = asyncio.run(job_events(mesh, client, "/txt2img", {
        "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 4, "seed": 3}))
    names = [m["event"] for m in seen]
    assert names[:2] == ["job_added", "job_status_changed"] and seen[1]["data"]["status"] == "processing"
    assert seen[1]["data"]["previous_status"] == "pending"
    assert names[-1] == "job_status_changed" and seen[-1]["data"]["status"] == "completed"
    assert seen[-1]["data"]["previous_status"] == "processing"
    assert seen[-1]["data"]["outputs"] == [f"{job_id}/image_0.png"]
    middle = seen[2:-1]
    progress = [(m["data"]["step"], m["data"]["total_steps"]) for m in middle if m["event"] == "job_progress"]
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    shown = [m for m in middle if m["event"] == "job_preview"]
    assert [m["data"]["step"] for m in shown] == [2, 4]
    # Each preview follows its step's progress.
    for preview in shown:
        before = middle[:middle.index(preview)]
        assert [m for m in before if m["event"] == "job_progress"][-1]["data"]["step"] == preview["data"]["step"]
    first = shown[0]["data"]
    assert set(first) == {"job_id", "step", "frame_count", "width", "height", "is_noisy", "image"}
    assert first["frame_count"] == 1 and first["is_noisy"] is True and shown[1]["data"]["is_noisy"] is False
    image = picture(first["image"])
    assert image.size == (first["width"], first["height"]) == (64, 64)
    assert picture(shown[0]["data"]["image"]).tobytes() != picture(shown[1]["data"]["image"]).tobytes()
    # Every message carries the documented ISO timestamp with milliseconds.
    assert all(len(m["timestamp"]) == 24 and m["timestamp"].endswith("Z") and m["timestamp"][19] == "."
               for m in seen)


def _last_preview(mesh, client, mode: str, settings, **body) -> tuple[dict, Image.Image, str]:
    settings(mode=mode, interval=1, max_size=256, quality=95)
    job_id, seen = asyncio.run(job_events(mesh, client, "/txt2img", {
        "prompt": "a red barn", "width": 64, "height": 64, "steps": 3, "seed": 11, **body}))
    shown = [m["data"] for m in seen if m["event"] == "job_preview"]
    return shown, Image.open(io.BytesIO(client.get(f"/output/{job_id}/image_0.png").content)).convert("RGB"), job_id


def test_each_mode_previews_its_own_way_and_none_sends_none(mesh, client, sdxl_loaded, settings):
    finals = {}
    for mode in ("proj", "tae", "vae"):
        shown, output, _ = _last_preview(mesh, client, mode, settings)
        assert [p["step"] for p in shown] == [1, 2, 3], mode
        # Brightness only: JPEG halves the colour resolution, which a noisy tiny model's image feels.
        finals[mode] = np.asarray(picture(shown[-1]["image"]).convert("L"), dtype=np.float32)
        assert picture(shown[-1]["image"]).size == (64, 64)
    # The VAE's preview of the last step is the image itself (but for JPEG); the cheaper ones are not.
    target = np.asarray(output.convert("L"), dtype=np.float32)
    off = {mode: float(np.abs(final - target).mean()) for mode, final in finals.items()}
    assert off["vae"] < 6 and off["vae"] < min(off["proj"], off["tae"]) / 2, off
    assert np.abs(finals["proj"] - finals["tae"]).mean() > 5
    shown, _, _ = _last_preview(mesh, client, "none", settings)
    assert shown == []
    settings(mode="vae", enabled=False)
    _, seen = asyncio.run(job_events(mesh, client, "/txt2img", {"prompt": "x", "width": 64, "height": 64,
                                                                 "steps": 2}))
    assert "job_preview" not in [m["event"] for m in seen] and "job_progress" in [m["event"] for m in seen]


def test_previews_keep_to_max_size_and_quality(mesh, client, sdxl_loaded, settings):
    settings(mode="vae", interval=1, max_size=64, quality=10)
    _, seen = asyncio.run(job_events(mesh, client, "/txt2img", {
        "prompt": "wide", "width": 128, "height": 64, "steps": 1, "seed": 1}))
    low = [m["data"] for m in seen if m["event"] == "job_preview"][0]
    assert (low["width"], low["height"]) == (64, 32)
    settings(mode="vae", interval=1, max_size=64, quality=100)
    _, seen = asyncio.run(job_events(mesh, client, "/txt2img", {
        "prompt": "wide", "width": 128, "height": 64, "steps": 1, "seed": 1}))
    high = [m["data"] for m in seen if m["event"] == "job_preview"][0]
    assert len(high["image"]) > len(low["image"])


def test_queue_events_carry_the_previews_too(mesh, client, sdxl_loaded, settings):
    settings(mode="proj", interval=1, max_size=64)
    job_id = client.post("/txt2img", json={"prompt": "sse", "width": 64, "height": 64, "steps": 2}).json()["job_id"]
    with client.stream("GET", f"/queue/{job_id}/events") as stream:
        events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
    shown = [e for e in events if e["event"] == "job_preview"]
    assert [e["data"]["step"] for e in shown] == [1, 2]
    assert shown[0]["data"]["job_id"] == job_id and picture(shown[0]["data"]["image"]).size == (64, 64)


def test_a_named_taesd_is_checked_against_the_family(client, sdxl_loaded):
    bad = client.post("/models/load", json={"model_name": "tiny-sdxl.safetensors", "model_type": "checkpoint",
                                            "taesd": "taef1_decoder.safetensors"})
    assert bad.status_code == 400 and "taesd" in bad.json()["message"] and "4" in bad.json()["message"]
    escape = client.post("/models/load", json={"model_name": "tiny-sdxl.safetensors", "model_type": "checkpoint",
                                               "taesd": "../checkpoints/tiny-sdxl.safetensors"})
    assert escape.status_code == 400 and "taesd" in escape.json()["message"]
    missing = client.post("/models/load", json={"model_name": "tiny-sdxl.safetensors", "model_type": "checkpoint",
                                                "taesd": "nothing.safetensors"})
    assert missing.status_code == 404
    assert client.get("/health").json()["model_name"] == "tiny-sdxl.safetensors"
    good = client.post("/models/load", json={"model_name": "tiny-sdxl.safetensors", "model_type": "checkpoint",
                                             "taesd": "taesdxl_decoder.safetensors"})
    assert good.status_code == 200, good.text


def test_a_video_previews_its_middle_frame_with_the_frame_count(mesh, client, settings):
    settings(mode="proj", interval=1, max_size=64)
    job_id, seen = asyncio.run(job_events(mesh, client, "/v1/inference", {"model": "wan21_1b_t2v", "prompts": [{
        "prompt": "waves", "width": 64, "height": 64, "num_frames": 5, "sample_steps": 2, "seed": 1}]}))
    shown = [m["data"] for m in seen if m["event"] == "job_preview"]
    assert [p["step"] for p in shown] == [1, 2]
    assert all(p["frame_count"] == 5 for p in shown)
    assert picture(shown[0]["image"]).size == (64, 64)


# ---- cancelled jobs, models, upscalers, server status ----------------------------------------


def test_a_cancelled_pending_job_gives_job_cancelled(mesh, client, sdxl_loaded):
    async def run() -> tuple[str, list[dict]]:
        async with ws_connect(ws_url(mesh) + "/?service=inference") as ws:
            await asyncio.sleep(0.2)
            await asyncio.to_thread(client.post, "/txt2img", json={"prompt": "busy", "width": 128, "height": 128,
                                                                    "steps": 12, "batch_count": 2})
            pending = (await asyncio.to_thread(client.post, "/txt2img", json={
                "prompt": "never", "width": 64, "height": 64, "steps": 2})).json()["job_id"]
            r = await asyncio.to_thread(client.delete, f"/queue/{pending}")
            assert r.status_code == 200, r.text
            seen = []
            async with asyncio.timeout(30):
                while not seen or seen[-1]["event"] != "job_status_changed":
                    message = json.loads(await ws.recv())
                    if message["data"].get("job_id") == pending:
                        seen.append(message)
            return pending, seen

    pending, seen = asyncio.run(run())
    assert [m["event"] for m in seen] == ["job_added", "job_cancelled", "job_status_changed"]
    assert seen[1]["data"] == {"job_id": pending, "previous_status": "pending"}
    assert seen[2]["data"] == {"job_id": pending, "status": "cancelled", "previous_status": "pending",
                               "outputs": []}
    # The job's own event stream carries it too.
    with client.stream("GET", f"/queue/{pending}/events") as stream:
        names = [json.loads(line[5:])["event"] for line in stream.iter_lines() if line.startswith("data:")]
    assert names == ["job_added", "job_cancelled", "job_status_changed"]


async def _model_events(mesh, action, names: set[str], count: int) -> list[dict]:
    async with ws_connect(ws_url(mesh) + "/?service=inference") as ws:
        await asyncio.sleep(0.2)
        await asyncio.to_thread(action)
        seen = []
        async with asyncio.timeout(120):
            while len([m for m in seen if m["event"] in names]) < count:
                message = json.loads(await ws.recv())
                if message["event"] in names:
                    seen.append(message)
        return seen


def idle(client: httpx.Client) -> None:
    """Waits for the queue to empty: an earlier job would load its model meanwhile."""
    assert wait_for(lambda: (lambda q: q["pending_count"] + q["processing_count"] == 0)(client.get("/queue").json()),
                    180)


def test_loading_and_unloading_a_model_is_announced(mesh, client, sdxl_loaded):
    sd15 = "SD1x/tiny-sd15.safetensors"

    def load():
        r = client.post("/models/load", json={"model_name": sd15, "model_type": "checkpoint"})
        assert r.status_code == 200, r.text

    idle(client)
    client.post("/models/load", json={"model_name": "tiny-sdxl.safetensors", "model_type": "checkpoint"})
    names = {"model_loading_progress", "model_loaded", "model_unloaded"}
    seen = asyncio.run(_model_events(mesh, load, names, 6))
    events = [(m["event"], m["data"]["model_name"]) for m in seen]
    # The SDXL model leaves, then the SD1.5 one loads stage by stage and is announced loaded.
    assert events[0] == ("model_unloaded", "tiny-sdxl.safetensors"), events
    stages = [m["data"] for m in seen if m["event"] == "model_loading_progress"]
    assert [(s["step"], s["total_steps"], s["model_name"]) for s in stages] == [
        (0, 3, sd15), (1, 3, sd15), (2, 3, sd15), (3, 3, sd15)]
    assert events[-1] == ("model_loaded", sd15)
    loaded = seen[-1]["data"]
    assert loaded["model_architecture"] == "SD1.5" and loaded["replica"] and loaded["bytes"] > 0

    unloaded = asyncio.run(_model_events(mesh, lambda: client.post("/models/unload"), {"model_unloaded"}, 1))
    assert unloaded[0]["data"]["model_name"] == sd15
    client.post("/models/load", json={"model_name": "tiny-sdxl.safetensors", "model_type": "checkpoint"})


def test_loading_and_unloading_an_upscaler_is_announced(mesh, client):
    idle(client)

    def load():
        r = client.post("/upscaler/load", json={"model_name": "realesr-compact-x2.pth"})
        assert r.status_code == 200, r.text

    loaded = asyncio.run(_model_events(mesh, load, {"upscaler_loaded"}, 1))
    assert loaded[0]["data"]["model_name"] == "realesr-compact-x2.pth" and loaded[0]["data"]["scale"] == 2
    unloaded = asyncio.run(_model_events(mesh, lambda: client.post("/upscaler/unload"), {"upscaler_unloaded"}, 1))
    assert unloaded[0]["data"]["model_name"] == "realesr-compact-x2.pth"


def test_each_replica_reports_its_status_periodically(mesh, client, sdxl_loaded):
    async def two() -> list[dict]:
        async with ws_connect(ws_url(mesh) + "/?event=server_status") as ws:
            async with asyncio.timeout(30):
                return [json.loads(await ws.recv()) for _ in range(2)]

    first, second = asyncio.run(two())
    assert first["event"] == second["event"] == "server_status"
    status = first["data"]
    assert status["service"] == "inference" and status["replica"]
    assert {"model_loaded", "model_name", "model_architecture", "upscaler_loaded", "upscaler_name",
            "current_job_id", "resident_bytes"} <= set(status)
    assert first["timestamp"] < second["timestamp"]


# ---- the seed's JavaScript example in headless Chromium -------------------------------------

SEED_EXAMPLE = """
const ws = new WebSocket('ws://localhost:8081');

ws.onmessage = (event) => {
    const msg = JSON.parse(event.data);

    switch (msg.event) {
        case 'job_progress':
            console.log(`Progress: ${msg.data.step}/${msg.data.total_steps}`);
            break;
        case 'job_preview':
            // Display preview image
            document.getElementById('preview').src = msg.data.image;
            break;
        case 'job_status_changed':
            console.log(`Job ${msg.data.job_id}: ${msg.data.status}`);
            break;
    }
};
"""


def _page(ws: str) -> str:
    """A page running the seed's example as written (only its address points at this mesh), with
    console.log kept where the test can read it."""
    return f"""<!doctype html><html><body><img id="preview"><script>
window.logged = [];
const log = console.log;
console.log = (...args) => {{ window.logged.push(args.join(' ')); log(...args); }};
</script><script>{SEED_EXAMPLE.replace("ws://localhost:8081", ws)}</script>
<script>ws.addEventListener('open', () => {{ window.opened = true; }});</script></body></html>"""


class Chromium:
    """Headless Chromium driven over the DevTools protocol."""

    def __init__(self, tmp_path: Path, url: str):
        profile = tmp_path / "chromium-profile"
        self.proc = subprocess.Popen([
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--remote-debugging-port=0", f"--user-data-dir={profile}", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        assert wait_for(port_file.exists, 30), "Chromium did not start"
        time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10).read())
        page = next(t for t in targets if t["type"] == "page")
        self.ws = ws_sync_connect(page["webSocketDebuggerUrl"], max_size=None)
        self.next_id = 0

    def evaluate(self, expression: str):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": "Runtime.evaluate",
                                 "params": {"expression": expression, "returnByValue": True}}))
        while True:
            answer = json.loads(self.ws.recv(timeout=30))
            if answer.get("id") == self.next_id:
                return answer["result"]["result"].get("value")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        self.proc.terminate()
        self.proc.wait(10)


def test_the_seed_javascript_example_runs_unchanged_in_chromium(mesh, client, sdxl_loaded, settings, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (`make browser` installs it)")
    settings(mode="proj", interval=1, max_size=64)
    page = tmp_path / "example.html"
    page.write_text(_page(ws_url(mesh)))
    browser = Chromium(tmp_path, page.as_uri())
    try:
        assert wait_for(lambda: browser.evaluate("window.opened === true"), 30), "the page's WebSocket did not open"
        job_id = client.post("/txt2img", json={"prompt": "a kite", "width": 64, "height": 64, "steps": 3,
                                               "seed": 2}).json()["job_id"]
        done = f"Job {job_id}: completed"
        assert wait_for(lambda: done in (browser.evaluate("window.logged") or []), 120)
        logged = browser.evaluate("window.logged")
        preview = browser.evaluate("document.getElementById('preview').src")
        shown = browser.evaluate("[document.getElementById('preview').naturalWidth, "
                                 "document.getElementById('preview').naturalHeight]")
    finally:
        browser.close()
    ours = [line for line in logged if line.startswith(("Progress", f"Job {job_id}"))]
    assert ours[0] == f"Job {job_id}: processing" and ours[-1] == done
    assert [line for line in ours if line.startswith("Progress")][-3:] == ["Progress: 1/3", "Progress: 2/3",
                                                                            "Progress: 3/3"]
    assert preview.startswith("data:image/jpeg;base64,") and shown == [64, 64]
