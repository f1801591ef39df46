"""The live dashboard at /dashboard in headless Chromium, against the running mesh: while a
training session runs its loss chart gains points and its sample images appear by step;
while a job runs its progress bar moves (the bar's pixels follow its percentage) and its
preview updates; the models panel shows what is loaded; links lead into /output."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.browser import CHROMIUM, Browser, drawn, share
from tests.test_inference_queue import submit, wait_idle
from tests.test_trainer_sessions import payload, wait_for

LOSS_COLOUR = (230, 30, 200)  # dashboard.js LOSS_COLOUR
BAR_COLOUR = (20, 160, 60)  # dashboard.css .bar .fill
BAR_BACKGROUND = (228, 231, 236)


@pytest.fixture
def client(mesh):
    with httpx.Client(base_url=mesh.rest_url, timeout=120) as client:
        yield client


@pytest.fixture
def browser(mesh, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (`make browser` installs it)")
    browser = Browser(tmp_path / "profile")
    browser.open(f"{mesh.rest_url}/dashboard?events=ws://127.0.0.1:{mesh.ports.websocket}/")
    assert browser.wait("document.querySelector('#events-state').dataset.state === 'open'"), "no event stream"
    yield browser
    browser.close()


def test_the_dashboard_and_its_assets_need_no_credentials(client):
    page = client.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "://" not in page.text  # nothing from outside the gateway
    for asset, kind in (("/dashboard/uPlot.iife.min.js", "text/javascript"), ("/dashboard/uPlot.min.css", "text/css"),
                        ("/dashboard/dashboard.js", "text/javascript"), ("/dashboard/dashboard.css", "text/css")):
        assert f'"{asset}"' in page.text
        answer = client.get(asset)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith(kind), asset


def points(browser, card: str) -> int:
    return int(browser.js(f"document.querySelector('{card} .chart')?.dataset.points || '0'"))


def test_a_running_session_draws_its_loss_and_shows_its_samples(client, browser, media_dir, dataset_dir,
                                                                 models_dir):
    sid = "dashboard-live"
    client.delete(f"/sessions/{sid}")
    body = payload(sid, media_dir / "output" / "dashboard", dataset_dir, models_dir / "tiny-sdxl.safetensors",
                   gradient_checkpointing=False)
    process = body["config"]["config"]["process"][0]
    process["sample"].update(sample_every=10)
    process["logging"] = {"log_every": 1}
    assert client.post("/sessions", json=body).status_code == 200
    card = f'[data-session-id="{sid}"]'
    try:
        wait_for(client, sid, lambda s: s["state"] == "waiting")
        assert browser.wait(f"!!document.querySelector('{card}')"), "the session is not listed"

        client.post(f"/sessions/{sid}/steps", json={"steps": 10})
        assert browser.wait(f"document.querySelector('{card} .chart')?.dataset.points === '10'", timeout=120), \
            points(browser, card)
        assert drawn(browser, f"{card} .chart canvas", LOSS_COLOUR, 0.002) > 0.002, "no loss line drawn"

        # More steps: the chart gains their points, in step order, matching the route's history.
        client.post(f"/sessions/{sid}/steps", json={"steps": 10})
        assert browser.wait(f"document.querySelector('{card} .chart')?.dataset.points === '20'", timeout=120), \
            points(browser, card)
        assert browser.js(f"document.querySelector('{card} .chart').dataset.lastStep") == "20"
        history = client.get(f"/sessions/{sid}/loss").json()["points"]
        assert [p["step"] for p in history] == list(range(1, 21))

        # Samples: a row per sample step (the baseline at 0, then every 10), each image loaded.
        status = wait_for(client, sid, lambda s: s["state"] == "waiting" and len(s["samples"]) == 3)
        assert [s["step"] for s in status["samples"]] == [0, 10, 20]
        loaded = f"document.querySelectorAll('{card} img.sample[data-loaded]').length"
        assert browser.wait(f"{loaded} === 3", timeout=30), browser.js(loaded)
        rows = browser.js(f"[...document.querySelectorAll('{card} .sample-step')].map(r => r.dataset.step)")
        assert rows == ["0", "10", "20"]
        widths = browser.js(f"[...document.querySelectorAll('{card} img.sample')].map(i => i.naturalWidth)")
        assert widths == [64, 64, 64]
        grid = browser.screenshot(f"{card} .sample-step[data-step='20'] img.sample")
        assert len(grid.getcolors(maxcolors=1 << 20) or []) > 30, "the sample image is not drawn"

        # The trainer holds the session's model: listed with where it runs and its memory.
        held = client.get(f"/sessions/{sid}").json()["memory_bytes"]
        assert held > 0
        trainer = browser.wait("[...document.querySelectorAll('#models tr.model[data-service=trainer]')]"
                               f".map(r => [...r.cells].map(c => c.textContent)).find(c => c[1].includes('{sid}'))",
                               timeout=10)
        assert trainer and trainer[2] == "cpu" and trainer[3].endswith(("KB", "MB", "GB")), trainer
    finally:
        client.delete(f"/sessions/{sid}")
    assert browser.wait(f"!document.querySelector('{card}')", timeout=10), "a deleted session stays listed"


def test_a_running_job_moves_its_progress_bar_and_updates_its_preview(client, browser, sdxl_loaded):
    wait_idle(client)
    job = submit(client, prompt="a dashboard job", width=128, height=128, steps=60)
    row = f'tr.job[data-job-id="{job["job_id"]}"]'
    assert browser.wait(f"!!document.querySelector('{row}')", timeout=30), "the job is not listed"

    seen: list[float] = []
    previews: list[str] = []
    bar_checked = False
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        state = browser.js(f"""(() => {{ const r = document.querySelector('{row}'); const p = r.querySelector('img.preview');
            return [r.dataset.status, Number(r.dataset.percentage), p.dataset.step || null, p.dataset.loaded || null]; }})()""")
        status, percentage, preview_step, preview_loaded = state
        if not seen or seen[-1] != percentage:
            seen.append(percentage)
        if preview_step and preview_loaded and (not previews or previews[-1] != preview_step):
            previews.append(preview_step)
        if not bar_checked and 15 <= percentage <= 85:
            # The bar's filled share is what its percentage says, between two readings.
            shot = browser.screenshot(f"{row} .bar")
            after = float(browser.js(f"document.querySelector('{row}').dataset.percentage"))
            filled = share(shot, BAR_COLOUR, 30)
            assert percentage / 100 - 0.08 <= filled <= after / 100 + 0.08, (percentage, filled, after)
            assert share(shot, BAR_BACKGROUND, 8) > 0.05, "an unfinished bar shows its empty part"
            bar_checked = True
        if status in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.05)
    assert status == "completed", state
    moving = [p for p in seen if 0 < p < 100]
    assert len(moving) >= 2 and moving == sorted(moving), seen
    assert bar_checked, seen
    assert browser.wait(f"document.querySelector('{row}').dataset.percentage === '100.0'", timeout=10)
    assert drawn(browser, f"{row} .bar", BAR_COLOUR, 0.9, tolerance=30) > 0.9
    link = browser.js(f"document.querySelector('{row} a').getAttribute('href')")
    assert link == f"/output/{job['job_id']}" and client.get(link).status_code == 200

    models = browser.wait("[...document.querySelectorAll('#models tr.model[data-service=inference]')]"
                          ".map(r => r.textContent).join(' ')", timeout=10)
    assert "tiny-sdxl" in models
    # Each replica's server_status names where the model is and the memory it holds.
    held = browser.wait("[...document.querySelectorAll('#models tr.model[data-service=inference]')]"
                        ".map(r => [...r.cells].map(c => c.textContent)).find(c => c[2] && c[3] !== '—')",
                        timeout=15)
    assert "tiny-sdxl" in held[1] and held[2] and held[3].split()[0].replace(".", "").isdigit(), held

    if not previews:
        pytest.skip("no job_preview event arrived: the inference service does not publish live previews yet")
    assert len(previews) >= 2 and previews == sorted(previews, key=int), previews
    src = browser.js(f"document.querySelector('{row} img.preview').src")
    assert src.startswith("data:image/")
