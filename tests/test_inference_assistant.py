"""The generation server's Ollama and assistant routes (seed 004, "Ollama Integration" and
"Assistant Integration") through the gateway, against a loopback server speaking Ollama's
HTTP API with scripted answers."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.conftest import violated_fields

DEFAULTS = {
    "ollama": {"enabled": True, "base_url": "http://localhost:11434", "model": "llama3.2", "timeout_seconds": 60,
               "max_history": 100, "api_key": ""},
    "assistant": {"enabled": True, "base_url": "http://localhost:11434", "model": "llama3.2", "timeout_seconds": 120,
                  "max_history": 50, "api_key": ""},
}


class FakeOllama(BaseHTTPRequestHandler):
    """Ollama's /api/version, /api/tags, /api/generate and /api/chat (stream false), answering
    what the test scripts; it records every request (path, JSON body, Authorization)."""

    requests: list = []
    generate_answers: list = []  # next /api/generate "response" texts (an int: that HTTP error)
    chat_answers: list = []  # next /api/chat message contents
    models = ["llama3.2:latest", "mistral:7b", "neural-chat:latest"]

    def do_GET(self):
        self._record(None)
        if self.path == "/api/version":
            self._answer(200, {"version": "0.5.7"})
        elif self.path == "/api/tags":
            self._answer(200, {"models": [{"name": n, "model": n, "size": 1000, "digest": "abc",
                                           "details": {"family": "llama"}} for n in self.models]})
        else:
            self._answer(404, {"error": "not found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
        self._record(body)
        if self.path == "/api/generate":
            answer = self.generate_answers.pop(0)
            if isinstance(answer, int):
                self._answer(answer, {"error": f"model '{body['model']}' not found, try pulling it first"})
                return
            self._answer(200, {"model": body["model"], "created_at": "2024-01-01T00:00:00Z", "response": answer,
                               "done": True, "done_reason": "stop"})
        elif self.path == "/api/chat":
            self._answer(200, {"model": body["model"], "created_at": "2024-01-01T00:00:00Z",
                               "message": {"role": "assistant", "content": self.chat_answers.pop(0)}, "done": True})
        else:
            self._answer(404, {"error": "not found"})

    def _record(self, body):
        self.requests.append({"path": self.path, "body": body, "authorization": self.headers.get("authorization")})

    def _answer(self, status, data):
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def ollama_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOllama)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def client(mesh):
    with httpx.Client(base_url=mesh.rest_url, timeout=30) as c:
        yield c
        # Later tests see the defaults and empty histories again.
        for kind, settings in DEFAULTS.items():
            assert c.put(f"/{kind}/settings", json=settings).status_code == 200
        c.delete("/ollama/history")
        c.delete("/assistant/history")


@pytest.fixture
def fake(client, ollama_url):
    """Both clients pointed at the fake server with the documented settings; empty histories."""
    FakeOllama.requests.clear()
    FakeOllama.generate_answers.clear()
    FakeOllama.chat_answers.clear()
    for kind in DEFAULTS:
        r = client.put(f"/{kind}/settings", json={**DEFAULTS[kind], "base_url": ollama_url})
        assert r.status_code == 200, r.text
        assert client.delete(f"/{kind}/history").json() == {"success": True}
    return FakeOllama


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def enhance(client, fake, prompt: str, answer: str) -> dict:
    fake.generate_answers.append(answer)
    r = client.post("/ollama/enhance", json={"prompt": prompt})
    assert r.status_code == 200, r.text
    return r.json()


# ---- Ollama ------------------------------------------------------------------------------


def test_update_ollama_settings_as_documented(client, ollama_url):
    body = {"enabled": True, "base_url": ollama_url, "model": "llama3.2", "timeout_seconds": 60, "max_history": 100,
            "api_key": "optional_key"}
    r = client.put("/ollama/settings", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["success"] is True
    assert {k: answer["settings"][k] for k in body if k != "api_key"} == {k: v for k, v in body.items()
                                                                          if k != "api_key"}
    assert "optional_key" not in r.text

    r = client.get("/ollama/settings")
    assert r.status_code == 200
    assert r.json() == {**body, "api_key": "***masked***"}
    assert "optional_key" not in r.text


def test_enhance_prompt_as_documented(client, fake):
    client.put("/ollama/settings", json={"api_key": "sk-secret-123"})
    fake.generate_answers.append('"a beautiful fluffy orange tabby cat sitting gracefully on a windowsill"')
    before = time.time()
    r = client.post("/ollama/enhance", json={"prompt": "a cat", "system_prompt": "Custom system prompt (optional)"})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert set(answer) == {"success", "id", "original_prompt", "enhanced_prompt", "model_used", "created_at"}
    assert answer["success"] is True
    assert answer["original_prompt"] == "a cat"
    # The quotes the model wrapped it in are gone.
    assert answer["enhanced_prompt"] == "a beautiful fluffy orange tabby cat sitting gracefully on a windowsill"
    assert answer["model_used"] == "llama3.2"
    assert isinstance(answer["created_at"], int) and before - 1 <= answer["created_at"] <= time.time() + 1

    call = fake.requests[-1]
    assert call["path"] == "/api/generate"
    assert call["body"]["model"] == "llama3.2" and call["body"]["prompt"] == "a cat"
    assert call["body"]["system"] == "Custom system prompt (optional)" and call["body"]["stream"] is False
    assert call["authorization"] == "Bearer sk-secret-123"

    r = client.get(f"/ollama/history/{answer['id']}")
    assert r.status_code == 200
    assert r.json() == {**answer, "error_message": ""}

    # Without a system prompt the default instruction is sent.
    enhance(client, fake, "a dog", "a loyal golden retriever")
    assert "image generation" in fake.requests[-1]["body"]["system"]


def test_enhancement_history_pages_newest_first(client, fake):
    ids = [enhance(client, fake, f"prompt {i}", f"enhanced {i}")["id"] for i in range(5)]
    r = client.get("/ollama/history")
    assert r.status_code == 200
    page = r.json()
    assert page["total_count"] == 5
    assert [item["id"] for item in page["items"]] == ids[::-1]
    item = page["items"][0]
    assert set(item) == {"id", "original_prompt", "enhanced_prompt", "model_used", "created_at", "success",
                         "error_message"}
    assert (item["original_prompt"], item["enhanced_prompt"], item["success"]) == ("prompt 4", "enhanced 4", True)

    page = client.get("/ollama/history", params={"limit": 2, "offset": 1}).json()
    assert page["total_count"] == 5
    assert [item["id"] for item in page["items"]] == [ids[3], ids[2]]
    assert client.get("/ollama/history", params={"offset": 5}).json() == {"total_count": 5, "items": []}

    for params, field in (({"limit": 0}, "limit"), ({"offset": -1}, "offset")):
        r = client.get("/ollama/history", params=params)
        assert r.status_code == 400, r.text
        assert violated_fields(r) == [field] and field in r.json()["error"]

    assert client.delete(f"/ollama/history/{ids[0]}").json() == {"success": True}
    r = client.get(f"/ollama/history/{ids[0]}")
    assert r.status_code == 404 and ids[0] in r.json()["error"]
    assert client.delete(f"/ollama/history/{ids[0]}").status_code == 404
    assert client.get("/ollama/history").json()["total_count"] == 4

    assert client.delete("/ollama/history").json() == {"success": True}
    assert client.get("/ollama/history").json() == {"total_count": 0, "items": []}
    assert client.get(f"/ollama/history/{ids[1]}").status_code == 404


def test_history_keeps_at_most_max_history(client, fake):
    assert client.put("/ollama/settings", json={"max_history": 3}).status_code == 200
    ids = [enhance(client, fake, f"p{i}", f"e{i}")["id"] for i in range(5)]
    page = client.get("/ollama/history").json()
    assert page["total_count"] == 3
    assert [item["id"] for item in page["items"]] == ids[:1:-1]
    assert client.get("/ollama/status").json()["history_count"] == 3


def test_ollama_status_and_models(client, fake, ollama_url):
    enhance(client, fake, "a cat", "a fine cat")
    r = client.get("/ollama/status")
    assert r.status_code == 200
    assert r.json() == {"enabled": True, "connected": True, "base_url": ollama_url, "model": "llama3.2",
                        "max_history": 100, "history_count": 1}
    assert fake.requests[-1]["path"] == "/api/version"

    r = client.get("/ollama/models")
    assert r.status_code == 200
    assert r.json() == {"models": fake.models}
    assert fake.requests[-1]["path"] == "/api/tags"


def test_bad_ollama_settings_name_the_field_and_change_nothing(client, fake):
    before = client.get("/ollama/settings").json()
    for body, fields in (
        ({"base_url": "ftp://x"}, ["base_url"]),
        ({"base_url": "http://user:pw@host:11434"}, ["base_url"]),
        ({"timeout_seconds": 0, "max_history": 5000}, ["timeout_seconds", "max_history"]),
        ({"model": "", "base_url": "localhost:11434"}, ["base_url", "model"]),
    ):
        r = client.put("/ollama/settings", json=body)
        assert r.status_code == 400, (body, r.text)
        assert sorted(violated_fields(r)) == sorted(fields), r.text
        for field in fields:
            assert field in r.json()["error"]
    # A field the document does not have is named by the gateway.
    r = client.put("/ollama/settings", json={"temperature": 5})
    assert r.status_code == 400 and "temperature" in r.text
    r = client.put("/assistant/settings", json={"base_url": "ftp://x", "temperature": 5})
    assert r.status_code == 400 and "temperature" in r.text
    assert client.get("/ollama/settings").json() == before


def test_unreachable_ollama_is_a_quick_502_naming_the_server(client, fake):
    dead = closed_port_url()
    assert client.put("/ollama/settings", json={"base_url": dead}).status_code == 200
    started = time.monotonic()
    r = client.post("/ollama/enhance", json={"prompt": "a cat"})
    assert r.status_code == 502, r.text
    assert dead in r.json()["error"] and "/api/generate" in r.json()["error"]
    assert time.monotonic() - started < 5

    # The failed attempt is in the history with its reason.
    [item] = client.get("/ollama/history").json()["items"]
    assert item["success"] is False and item["enhanced_prompt"] == "" and dead in item["error_message"]

    r = client.get("/ollama/status")
    assert r.status_code == 200 and r.json()["connected"] is False and r.json()["enabled"] is True
    r = client.get("/ollama/models")
    assert r.status_code == 502 and "/api/tags" in r.json()["error"]
    assert time.monotonic() - started < 10


def test_an_unknown_model_is_a_400_naming_it(client, fake):
    assert client.put("/ollama/settings", json={"model": "nosuchmodel"}).status_code == 200
    fake.generate_answers.append(404)
    r = client.post("/ollama/enhance", json={"prompt": "a cat"})
    assert r.status_code == 400, r.text
    assert "nosuchmodel" in r.json()["error"]


def test_bad_enhance_requests_and_a_disabled_client_store_nothing(client, fake):
    r = client.post("/ollama/enhance", json={"prompt": "  "})
    assert r.status_code == 400 and violated_fields(r) == ["prompt"]
    r = client.post("/ollama/enhance", json={"prompt": "x" * 10_001})
    assert r.status_code == 400 and violated_fields(r) == ["prompt"]

    assert client.put("/ollama/settings", json={"enabled": False}).status_code == 200
    r = client.post("/ollama/enhance", json={"prompt": "a cat"})
    assert r.status_code == 400 and "disabled" in r.json()["error"]
    assert client.get("/ollama/status").json()["enabled"] is False
    assert client.get("/ollama/history").json()["total_count"] == 0
    assert fake.requests == []


def test_api_keys_stay_out_of_the_logs(mesh, client, fake):
    client.put("/ollama/settings", json={"api_key": "sk-never-logged"})
    enhance(client, fake, "a cat", "a fine cat")
    assert fake.requests[-1]["authorization"] == "Bearer sk-never-logged"
    logs = "".join(p.read_text(errors="replace") for p in mesh.log_dir.glob("inference*.log"))
    assert "llm settings changed" in logs
    assert "sk-never-logged" not in logs and "sk-secret-123" not in logs


# ---- assistant ---------------------------------------------------------------------------


def test_update_and_get_assistant_settings_as_documented(client, ollama_url):
    body = {"enabled": True, "base_url": ollama_url, "model": "llama3.2", "timeout_seconds": 120, "max_history": 50,
            "api_key": "optional_key"}
    r = client.put("/assistant/settings", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["success"] is True
    assert {k: r.json()["settings"][k] for k in body if k != "api_key"} == {k: v for k, v in body.items()
                                                                            if k != "api_key"}
    r = client.get("/assistant/settings")
    assert r.json() == {**body, "api_key": "***masked***"}
    assert "optional_key" not in r.text
    # Each client keeps its own settings.
    assert client.get("/ollama/settings").json()["timeout_seconds"] == 60


def test_assistant_chat_as_documented_keeps_only_actions_that_can_run(client, fake):
    fake.chat_answers.append(json.dumps({
        "message": "I'll load the SDXL model for you. Here's what I'm doing...",
        "actions": [
            {"type": "load_model", "parameters": {"model_name": "tiny-sdxl.safetensors", "model_type": "checkpoint"}},
            {"type": "load_model", "parameters": {"model_name": "sdxl-model.safetensors", "model_type": "checkpoint"}},
            {"type": "load_model", "parameters": {"model_name": "../../etc/passwd", "model_type": "checkpoint"}},
            {"type": "delete_outputs", "parameters": {}},
        ],
    }))
    request = {"message": "Load the SDXL model",
               "context": {"current_view": "dashboard", "settings": {}, "model_info": {}, "available_models": {}}}
    r = client.post("/assistant/chat", json=request)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "success": True,
        "message": "I'll load the SDXL model for you. Here's what I'm doing...",
        "actions": [{"type": "load_model",
                     "parameters": {"model_name": "tiny-sdxl.safetensors", "model_type": "checkpoint"}}],
    }

    call = fake.requests[-1]
    assert call["path"] == "/api/chat" and call["body"]["stream"] is False and call["body"]["model"] == "llama3.2"
    system, user = call["body"]["messages"][0], call["body"]["messages"][-1]
    assert system["role"] == "system"
    assert "tiny-sdxl.safetensors" in system["content"] and '"current_view": "dashboard"' in system["content"]
    assert user == {"role": "user", "content": "Load the SDXL model"}

    r = client.get("/assistant/history")
    assert r.status_code == 200
    history = r.json()
    assert history["count"] == 2
    assert [(m["role"], m["content"]) for m in history["messages"]] == [
        ("user", "Load the SDXL model"), ("assistant", "I'll load the SDXL model for you. Here's what I'm doing...")]
    assert all(isinstance(m["timestamp"], int) and abs(m["timestamp"] - time.time()) < 60
               for m in history["messages"])

    # The next turn sends the conversation so far; a plain-text answer has no actions.
    fake.chat_answers.append("Sure, the model is loading now.")
    r = client.post("/assistant/chat", json={"message": "Thanks"})
    assert r.json() == {"success": True, "message": "Sure, the model is loading now.", "actions": []}
    sent = fake.requests[-1]["body"]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert sent[1]["content"] == "Load the SDXL model" and sent[3]["content"] == "Thanks"
    assert client.get("/assistant/history").json()["count"] == 4

    assert client.delete("/assistant/history").json() == {"success": True}
    assert client.get("/assistant/history").json() == {"messages": [], "count": 0}


def test_assistant_answer_with_a_json_block_and_a_diffusion_model(client, fake):
    fake.chat_answers.append('Loading Flux.\n```json\n{"actions": [{"type": "load_model", "parameters": '
                             '{"model_name": "tiny-flux.safetensors", "model_type": "diffusion"}}]}\n```')
    r = client.post("/assistant/chat", json={"message": "load flux"})
    assert r.status_code == 200, r.text
    assert r.json()["message"] == "Loading Flux."
    assert r.json()["actions"] == [{"type": "load_model", "parameters": {"model_name": "tiny-flux.safetensors",
                                                                         "model_type": "diffusion"}}]


def test_assistant_history_keeps_at_most_max_history(client, fake):
    assert client.put("/assistant/settings", json={"max_history": 3}).status_code == 200
    for i in range(3):
        fake.chat_answers.append(f"answer {i}")
        assert client.post("/assistant/chat", json={"message": f"question {i}"}).status_code == 200
    history = client.get("/assistant/history").json()
    assert history["count"] == 3
    assert [m["content"] for m in history["messages"]] == ["answer 1", "question 2", "answer 2"]
    assert client.get("/assistant/status").json()["history_count"] == 3


def test_assistant_status(client, fake, ollama_url):
    r = client.get("/assistant/status")
    assert r.status_code == 200
    assert r.json() == {"enabled": True, "connected": True, "base_url": ollama_url, "model": "llama3.2",
                        "timeout_seconds": 120, "history_count": 0}


def test_assistant_bad_requests_and_an_unreachable_server_store_nothing(client, fake):
    r = client.post("/assistant/chat", json={"message": ""})
    assert r.status_code == 400 and violated_fields(r) == ["message"]
    r = client.put("/assistant/settings", json={"timeout_seconds": 601})
    assert r.status_code == 400 and violated_fields(r) == ["timeout_seconds"]
    assert client.get("/assistant/settings").json()["timeout_seconds"] == 120

    dead = closed_port_url()
    assert client.put("/assistant/settings", json={"base_url": dead}).status_code == 200
    started = time.monotonic()
    r = client.post("/assistant/chat", json={"message": "hello"})
    assert r.status_code == 502, r.text
    assert dead in r.json()["error"] and "/api/chat" in r.json()["error"]
    assert client.get("/assistant/status").json()["connected"] is False
    assert time.monotonic() - started < 5
    assert client.get("/assistant/history").json() == {"messages": [], "count": 0}
