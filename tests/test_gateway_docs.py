"""The API reference at /docs: Swagger UI from the pinned wheel, served by the gateway with
no credentials and nothing from outside, over the gateway's own /openapi.json, which is a
valid OpenAPI document that documents the 202 answers and the error bodies. Headless
Chromium renders it and lists every route."""

from __future__ import annotations

import httpx
import pytest
from openapi_spec_validator import validate

from tests.browser import CHROMIUM, Browser

VERBS = ("get", "post", "put", "delete", "patch")


@pytest.fixture(scope="module")
def document(mesh) -> dict:
    answer = httpx.get(f"{mesh.rest_url}/openapi.json", timeout=30)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    return answer.json()


def test_openapi_json_is_valid_and_documents_202s_and_errors(document):
    validate(document)
    txt2img = document["paths"]["/txt2img"]["post"]["responses"]
    assert "202" in txt2img and "200" not in txt2img
    accepted = txt2img["202"]["content"]["application/json"]["schema"]["$ref"]
    assert document["components"]["schemas"][accepted.rsplit("/", 1)[1]]["properties"].keys() >= {"job_id", "status"}
    # The 202 routes are exactly those whose servicer answers 202.
    queued = {path for path, ops in document["paths"].items() for op in ops.values() if "202" in op["responses"]}
    assert queued == {"/txt2img", "/img2img", "/txt2vid", "/upscale", "/convert", "/models/download"}
    for path, operations in document["paths"].items():
        for verb, operation in operations.items():
            for status in ("400", "404", "default"):
                assert "$ref" in operation["responses"][status]["content"]["application/json"]["schema"], (verb, path)
    loss = document["paths"]["/sessions/{session_id}/loss"]["get"]
    assert [p["name"] for p in loss["parameters"]] == ["session_id", "after_step"]


def test_docs_and_their_assets_need_no_credentials(mesh):
    with httpx.Client(base_url=mesh.rest_url, timeout=30) as client:
        page = client.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assets = ["/docs/swagger-ui-bundle.js", "/docs/swagger-ui-standalone-preset.js", "/docs/swagger-ui.css",
                  "/docs/docs.js"]
        for asset in assets:
            assert f'"{asset}"' in page.text  # the page loads them from the gateway, no CDN
            answer = client.get(asset)
            assert answer.status_code == 200 and len(answer.content) > 100, asset
        assert "://" not in page.text
        assert client.get("/docs/swagger-ui.css").headers["content-type"].startswith("text/css")
        assert client.get("/docs/swagger-ui-bundle.js").headers["content-type"].startswith("text/javascript")
        # The assets of the page are files, not a folder to browse.
        assert client.get("/docs/index.html").status_code == 404


def test_chromium_renders_docs_listing_every_route(mesh, document, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (`make browser` installs it)")
    expected = {(verb.upper(), path) for path, ops in document["paths"].items() for verb in ops if verb in VERBS}
    browser = Browser(tmp_path / "profile")
    try:
        browser.open(f"{mesh.rest_url}/docs")
        count = browser.wait(f"document.querySelectorAll('.opblock').length >= {len(expected)}", timeout=60)
        listed = browser.js("""[...document.querySelectorAll('.opblock')].map(b => [
            b.querySelector('.opblock-summary-method').textContent.trim(),
            b.querySelector('.opblock-summary-path').getAttribute('data-path')])""")
        assert count, f"{len(listed)} of {len(expected)} routes rendered"
        assert {tuple(item) for item in listed} == expected
        assert browser.js("document.querySelector('.info .title').textContent").strip()
        shot = browser.screenshot()
        assert len(shot.getcolors(maxcolors=1 << 20) or []) > 20, "the page is not blank"
    finally:
        browser.close()
