"""The generation server's LLM features, over a server speaking Ollama's HTTP API
(`POST /api/generate`, `POST /api/chat`, `GET /api/tags`, `GET /api/version`): prompt
enhancement with its history (`/ollama/*`) and the web UI's assistant with its conversation
(`/assistant/*`). Knows nothing of gRPC.

Settings, history and conversation live in NATS key-value, so every replica answers alike:

    KV bucket  inference_llm           the settings of each client ("ollama", "assistant"),
                                       API keys included (never returned or logged)
    KV bucket  inference_enhancements  one Enhancement per history id
    KV bucket  inference_assistant     one ChatMessage per key; keys sort in time order

An unreachable, slow or failing LLM server is an `UpstreamError` (502) naming the server
and the call, after at most the configured timeout; a refusal of a request of ours (an
unknown model) is a `FailedPrecondition` (400).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from dataclasses import asdict, dataclass, fields

import httpx
import nats.js.errors

from services.common import jobs, logs
from services.common.errors import (
    FailedPrecondition,
    InvalidInput,
    NotFound,
    Unavailable,
    UpstreamError,
    Violations,
)
from services.common.media import shown
from services.common.settings import LLM_MAX_HISTORY_RANGE, LLM_TIMEOUT_RANGE, AssistantDefaults, OllamaDefaults
from services.inference.model_files import ModelsRoot

log = logs.get(__name__)

SETTINGS_BUCKET = "inference_llm"
OLLAMA, ASSISTANT = "ollama", "assistant"
MASKED = "***masked***"
# Connecting gets at most this long (a closed port or a dead host fails fast); status
# probes get it as their whole timeout.
CONNECT_TIMEOUT_S = 3.0
# An answer larger than this is not one Ollama gives (and would not fit a NATS record).
MAX_ANSWER_BYTES = 512 << 10
MAX_PROMPT_CHARS = 10_000
MAX_CONTEXT_BYTES = 32 << 10
MAX_MODEL_NAME_CHARS = 200
MAX_URL_CHARS = 2048
MAX_API_KEY_CHARS = 4096
MAX_PAGE = 1000
# Most models the assistant is told about, and most actions kept from one answer.
MAX_LISTED_MODELS = 200
MAX_ACTIONS = 10
# The one documented action kind, and the model types it may name (those /models/load takes).
LOAD_MODEL = "load_model"
LOADABLE_TYPES = ("checkpoint", "diffusion")

ENHANCE_SYSTEM_PROMPT = (
    "You rewrite prompts for an image generation model. Expand the user's prompt into one detailed, "
    "vivid prompt: subject, setting, style, lighting, composition, camera. Keep the user's intent. "
    "Answer with the prompt only: no preamble, no quotes, no explanation."
)
ASSISTANT_SYSTEM_PROMPT = """You are the assistant of an image generation server's web UI. Answer briefly and helpfully.
Reply with one JSON object and nothing else:
{{"message": "<your answer to the user>", "actions": [<actions for the UI to run, or none>]}}
The only action is loading a model:
{{"type": "load_model", "parameters": {{"model_name": "<a name listed below>", "model_type": "checkpoint" or "diffusion"}}}}
Only name models listed here.
Checkpoints: {checkpoints}
Diffusion models: {diffusion}
The UI's current state: {context}"""

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][\w.:/@+-]*$")
_API_KEY = re.compile(r"^[!-~]*$")
_FENCED_JSON = re.compile(r"```(?:json)?\s*(\{.*?\})\s*```", re.DOTALL)


# ---- settings ------------------------------------------------------------------------------


@dataclass
class LlmSettings:
    enabled: bool
    base_url: str
    model: str
    timeout_seconds: int
    max_history: int
    api_key: str = ""

    def __repr__(self) -> str:  # the key stays out of logs and tracebacks
        return f"LlmSettings({self.base_url!r}, model={self.model!r}, enabled={self.enabled})"

    def public(self) -> dict:
        """The settings as the routes answer them: the key masked, "" when there is none."""
        return {**asdict(self), "api_key": MASKED if self.api_key else ""}

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> LlmSettings:
        data = json.loads(raw)
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def changed(self, request: dict) -> LlmSettings:
        """These settings with the request's fields applied (fields left out keep their
        value); InvalidInput naming every bad field, unknown ones included."""
        check = Violations()
        known = [f.name for f in fields(self)]
        for name in request:
            if name not in known:
                check.add(name, f"unknown field; allowed: {', '.join(known)}")
        out = LlmSettings(**asdict(self))
        if "enabled" in request:
            out.enabled = check.require(isinstance(request["enabled"], bool), "enabled", "must be true or false") \
                and request["enabled"]
        if "base_url" in request:
            out.base_url = _checked_base_url(check, request["base_url"]) or self.base_url
        if "model" in request:
            model = check.text("model", request["model"], required=True, max_length=MAX_MODEL_NAME_CHARS)
            if model.strip() and len(model) <= MAX_MODEL_NAME_CHARS:
                check.require(bool(_MODEL_NAME.match(model)), "model",
                              f"must be a model name as the server lists it, e.g. llama3.2 (got {shown(model)})")
            out.model = model
        out.timeout_seconds = check.integer("timeout_seconds", request.get("timeout_seconds"), self.timeout_seconds,
                                            *LLM_TIMEOUT_RANGE)
        out.max_history = check.integer("max_history", request.get("max_history"), self.max_history,
                                        *LLM_MAX_HISTORY_RANGE)
        if "api_key" in request:
            out.api_key = check.text("api_key", request["api_key"], max_length=MAX_API_KEY_CHARS)
            # It travels in a header: printable ASCII only (the answer never shows it back).
            check.require(bool(_API_KEY.match(out.api_key)), "api_key",
                          'must be printable ASCII without spaces, or "" for none')
        check.raise_if_any()
        return out


def _checked_base_url(check: Violations, value) -> str | None:
    """An http(s) URL with a host and nothing after its path, without a trailing slash."""
    allowed = "must be an http:// or https:// URL of the server, e.g. http://localhost:11434"
    if not isinstance(value, str) or len(value) > MAX_URL_CHARS:
        check.add("base_url", f"{allowed} of at most {MAX_URL_CHARS} characters")
        return None
    try:
        url = httpx.URL(value.strip())
    except (httpx.InvalidURL, ValueError):
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        check.add("base_url", f"{allowed} (got {shown(value)})")
        return None
    if url.userinfo or url.query or url.fragment:
        check.add("base_url", "must not carry credentials, a query or a fragment (set api_key for a key)")
        return None
    return str(url).rstrip("/")


class SettingsStore:
    """Each client's settings in NATS; the LORAMESH_* defaults until the first change."""

    def __init__(self, js, defaults: dict[str, OllamaDefaults | AssistantDefaults]):
        self.js = js
        self.defaults = {kind: LlmSettings(**asdict(d)) for kind, d in defaults.items()}
        self.kv = None

    async def setup(self) -> None:
        self.kv = await jobs.key_value(self.js, SETTINGS_BUCKET)

    async def get(self, kind: str) -> LlmSettings:
        try:
            return LlmSettings.from_json((await self.kv.get(kind)).value)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return self.defaults[kind]

    async def update(self, kind: str, request: dict) -> LlmSettings:
        """Applies the request with compare-and-set; nothing is written when a field is bad."""
        for _ in range(50):
            try:
                entry = await self.kv.get(kind)
                current, revision = LlmSettings.from_json(entry.value), entry.revision
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                current, revision = self.defaults[kind], None
            new = current.changed(request)
            try:
                if revision is None:
                    await self.kv.create(kind, new.to_json())
                else:
                    await self.kv.update(kind, new.to_json(), last=revision)
                return new
            except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyAlreadyExistsError):
                continue
        raise Unavailable(f"could not change the {kind} settings: too many concurrent changes; try again")


# ---- the Ollama API ----------------------------------------------------------------------


class OllamaClient:
    """Calls to the server one client's settings name, each bounded by their timeout."""

    def __init__(self, settings: LlmSettings, label: str):
        self.settings = settings
        self.label = label  # "Ollama server", "assistant server"

    async def version(self) -> str:
        answer = await self._call("GET", "/api/version", timeout=min(CONNECT_TIMEOUT_S, self.settings.timeout_seconds))
        return str(answer.get("version", ""))

    async def models(self) -> list[str]:
        answer = await self._call("GET", "/api/tags")
        return [m["name"] for m in answer.get("models") or [] if isinstance(m, dict) and isinstance(m.get("name"), str)]

    async def generate(self, prompt: str, system: str) -> str:
        answer = await self._call("POST", "/api/generate", {
            "model": self.settings.model, "prompt": prompt, "system": system, "stream": False})
        return _text(answer.get("response"), self._where("POST", "/api/generate"))

    async def chat(self, messages: list[dict], json_format: bool = False) -> str:
        body = {"model": self.settings.model, "messages": messages, "stream": False}
        if json_format:
            body["format"] = "json"
        answer = await self._call("POST", "/api/chat", body)
        message = answer.get("message")
        return _text(message.get("content") if isinstance(message, dict) else None, self._where("POST", "/api/chat"))

    def _where(self, method: str, path: str) -> str:
        return f"the {self.label} at {self.settings.base_url} ({method} {path})"

    async def _call(self, method: str, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        timeout = timeout or self.settings.timeout_seconds
        where = self._where(method, path)
        headers = {"authorization": f"Bearer {self.settings.api_key}"} if self.settings.api_key else {}
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_S)),
                                         trust_env=False, follow_redirects=False) as client:
                async with client.stream(method, self.settings.base_url + path, json=body, headers=headers) as r:
                    data = bytearray()
                    async for chunk in r.aiter_bytes():
                        data += chunk
                        if len(data) > MAX_ANSWER_BYTES:
                            raise UpstreamError(f"{where} answered with more than {MAX_ANSWER_BYTES} bytes")
        except httpx.TimeoutException as exc:
            raise UpstreamError(f"{where} did not answer within {timeout:g} s") from exc
        except (httpx.HTTPError, httpx.InvalidURL, OSError, UnicodeError) as exc:
            raise UpstreamError(f"{where} is unreachable: {exc or type(exc).__name__}") from exc
        try:
            answer = json.loads(data)
        except ValueError:
            answer = None
        if r.status_code >= 400:
            reason = str(answer.get("error") or "") if isinstance(answer, dict) else bytes(data).decode(errors="replace")
            message = f"{where} answered {r.status_code}" + (f": {shown(reason.strip())}" if reason.strip() else "")
            # A 4xx is our request refused (an unknown model, a bad key): retrying will not help.
            raise (FailedPrecondition if r.status_code < 500 else UpstreamError)(message)
        if not isinstance(answer, dict):
            raise UpstreamError(f"{where} answered with something other than a JSON object")
        return answer


def _text(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UpstreamError(f"{where} answered without any text")
    return value.strip()


# ---- records ---------------------------------------------------------------------------------


@dataclass
class Enhancement:
    """One GET /ollama/history item."""

    id: str
    original_prompt: str
    enhanced_prompt: str
    model_used: str
    created_at: float
    success: bool
    error_message: str = ""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Enhancement:
        return cls(**json.loads(raw))

    def fields(self) -> dict:
        """The documented fields; times in whole seconds, as the document prints them."""
        return {**asdict(self), "created_at": int(self.created_at)}


@dataclass
class ChatMessage:
    key: str
    role: str  # "user" or "assistant"
    content: str
    timestamp: float

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ChatMessage:
        return cls(**json.loads(raw))


class EnhancementStore(jobs.RecordStore[Enhancement]):
    record_type = Enhancement
    bucket = "inference_enhancements"

    def not_found(self, key: str) -> str:
        return f"History entry not found: {shown(key)}"


class ChatStore(jobs.RecordStore[ChatMessage]):
    record_type = ChatMessage
    bucket = "inference_assistant"


async def _setup(store: jobs.RecordStore) -> None:
    store.kv = await jobs.key_value(store.js, store.bucket)


async def _clear(store: jobs.RecordStore) -> None:
    await store.js.purge_stream(f"KV_{store.bucket}")


async def _delete_keys(store: jobs.RecordStore, keys: list[str]) -> None:
    for key in keys:
        await store.kv.purge(key)


# ---- the routes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    enabled: bool
    connected: bool
    settings: LlmSettings
    history_count: int


@dataclass(frozen=True)
class HistoryPage:
    total_count: int
    items: list[Enhancement]


@dataclass(frozen=True)
class Action:
    type: str
    parameters: dict


@dataclass(frozen=True)
class Reply:
    message: str
    actions: list[Action]


class _LlmFeature:
    kind: str
    label: str

    def __init__(self, settings: SettingsStore):
        self.settings_store = settings

    async def settings(self) -> LlmSettings:
        return await self.settings_store.get(self.kind)

    async def update_settings(self, request: dict) -> LlmSettings:
        settings = await self.settings_store.update(self.kind, request)
        log.info("llm settings changed", client=self.kind, fields=sorted(request), base_url=settings.base_url,
                 model=settings.model, enabled=settings.enabled)
        await self._trim(settings.max_history)
        return settings

    async def _trim(self, max_history: int) -> None:
        raise NotImplementedError

    async def _connected(self, settings: LlmSettings) -> bool:
        """Whether the server answers now; a disabled client does not call it."""
        if not settings.enabled:
            return False
        try:
            await OllamaClient(settings, self.label).version()
        except (Unavailable, FailedPrecondition):
            return False
        return True

    async def _enabled_client(self) -> OllamaClient:
        settings = await self.settings()
        if not settings.enabled:
            raise FailedPrecondition(f"the {self.kind} client is disabled; enable it with "
                                     f'PUT /{self.kind}/settings {{"enabled": true}}')
        return OllamaClient(settings, self.label)


class PromptEnhancer(_LlmFeature):
    """/ollama/*: prompts rewritten by the model, each kept in the history."""

    kind, label = OLLAMA, "Ollama server"

    def __init__(self, settings: SettingsStore, history: EnhancementStore):
        super().__init__(settings)
        self.history_store = history

    async def setup(self) -> None:
        await _setup(self.history_store)

    async def enhance(self, prompt: str, system_prompt: str | None) -> Enhancement:
        """The enhanced prompt, recorded; a failed call is recorded too (success false) and
        raised. Invalid input is refused before anything is called or stored."""
        check = Violations()
        check.text("prompt", prompt, required=True, max_length=MAX_PROMPT_CHARS)
        check.text("system_prompt", system_prompt, max_length=MAX_PROMPT_CHARS)
        check.raise_if_any()
        client = await self._enabled_client()
        entry = Enhancement(id=str(uuid.uuid4()), original_prompt=prompt, enhanced_prompt="",
                            model_used=client.settings.model, created_at=time.time(), success=False)
        try:
            entry.enhanced_prompt = _unquoted(await client.generate(prompt, system_prompt or ENHANCE_SYSTEM_PROMPT))
            entry.success = True
        except (Unavailable, FailedPrecondition) as exc:
            entry.error_message = str(exc)
            log.warning("prompt enhancement failed", id=entry.id, error=str(exc))
            raise
        finally:
            await self.history_store.kv.put(entry.id, entry.to_json())
            await self._trim(client.settings.max_history)
        log.info("prompt enhanced", id=entry.id, model=entry.model_used)
        return entry

    async def history(self, limit: int | None, offset: int | None) -> HistoryPage:
        """Newest first."""
        check = Violations()
        limit = check.integer("limit", limit, 50, 1, MAX_PAGE)
        offset = check.integer("offset", offset, 0, 0)
        check.raise_if_any()
        entries = await self._entries()
        return HistoryPage(total_count=len(entries), items=entries[offset:offset + limit])

    async def entry(self, id: str) -> Enhancement:
        return await self.history_store.get(id)

    async def delete(self, id: str) -> None:
        await self.history_store.get(id)  # NotFound for an unknown id
        await self.history_store.kv.purge(id)

    async def clear(self) -> None:
        await _clear(self.history_store)

    async def status(self) -> Status:
        settings = await self.settings()
        return Status(settings.enabled, await self._connected(settings), settings, len(await self._entries()))

    async def models(self) -> list[str]:
        return await OllamaClient(await self.settings(), self.label).models()

    async def _entries(self) -> list[Enhancement]:
        return sorted(await self.history_store.all(), key=lambda e: e.created_at, reverse=True)

    async def _trim(self, max_history: int) -> None:
        await _delete_keys(self.history_store, [e.id for e in (await self._entries())[max_history:]])


class Assistant(_LlmFeature):
    """/assistant/*: a conversation with the model, which may suggest actions for the UI."""

    kind, label = ASSISTANT, "assistant server"

    def __init__(self, settings: SettingsStore, chat: ChatStore, root: ModelsRoot):
        super().__init__(settings)
        self.chat_store = chat
        self.root = root

    async def setup(self) -> None:
        await _setup(self.chat_store)

    async def chat(self, message: str, context: dict | None) -> Reply:
        """The model's answer and the actions it suggests that can run here. Nothing is
        stored when the request is invalid or the model does not answer."""
        check = Violations()
        check.text("message", message, required=True, max_length=MAX_PROMPT_CHARS)
        context_text = json.dumps(context or {}, sort_keys=True)
        check.require(len(context_text.encode()) <= MAX_CONTEXT_BYTES, "context",
                      f"must be at most {MAX_CONTEXT_BYTES} bytes as JSON (got {len(context_text.encode())})")
        check.raise_if_any()
        client = await self._enabled_client()
        past = await self.history()
        listed = await asyncio.to_thread(self.root.list)
        names = {t: [f.name for f in listed[key]][:MAX_LISTED_MODELS]
                 for t, key in (("checkpoint", "checkpoints"), ("diffusion", "diffusion_models"))}
        system = ASSISTANT_SYSTEM_PROMPT.format(checkpoints=", ".join(names["checkpoint"]) or "none",
                                                diffusion=", ".join(names["diffusion"]) or "none",
                                                context=context_text)
        messages = [{"role": "system", "content": system},
                    *({"role": m.role, "content": m.content} for m in past),
                    {"role": "user", "content": message}]
        asked = time.time()
        text, raw_actions = parse_reply(await client.chat(messages, json_format=True))
        actions, dropped = await asyncio.to_thread(self.checked_actions, raw_actions)
        if dropped:
            log.info("assistant actions dropped", dropped=dropped)
        for role, content, at in (("user", message, asked), ("assistant", text, time.time())):
            record = ChatMessage(key=_chat_key(at), role=role, content=content, timestamp=at)
            await self.chat_store.kv.put(record.key, record.to_json())
        await self._trim(client.settings.max_history)
        return Reply(text, actions)

    def checked_actions(self, raw: list) -> tuple[list[Action], list[str]]:
        """The actions that can run here: `load_model` of a checkpoint or diffusion model in
        the models root, with only its model_name and model_type. The rest, and why."""
        kept, dropped = [], []
        for item in raw[:MAX_ACTIONS]:
            kind = item.get("type") if isinstance(item, dict) else None
            parameters = item.get("parameters") if isinstance(item, dict) else None
            if kind != LOAD_MODEL or not isinstance(parameters, dict):
                dropped.append(f"unknown action {shown(str(kind))}")
                continue
            name, model_type = parameters.get("model_name"), parameters.get("model_type") or "checkpoint"
            if model_type not in LOADABLE_TYPES or not isinstance(name, str):
                dropped.append(f"load_model of {shown(str(name))} as {shown(str(model_type))}")
                continue
            try:
                self.root.path(model_type, name)
            except (InvalidInput, NotFound):
                dropped.append(f"load_model of {shown(name)}: no such {model_type}")
                continue
            kept.append(Action(LOAD_MODEL, {"model_name": name, "model_type": model_type}))
        if len(raw) > MAX_ACTIONS:
            dropped.append(f"{len(raw) - MAX_ACTIONS} actions past the first {MAX_ACTIONS}")
        return kept, dropped

    async def history(self) -> list[ChatMessage]:
        """Oldest first."""
        return sorted(await self.chat_store.all(), key=lambda m: m.key)

    async def clear(self) -> None:
        await _clear(self.chat_store)

    async def status(self) -> Status:
        settings = await self.settings()
        return Status(settings.enabled, await self._connected(settings), settings, len(await self.history()))

    async def _trim(self, max_history: int) -> None:
        messages = await self.history()
        await _delete_keys(self.chat_store, [m.key for m in messages[:max(0, len(messages) - max_history)]])


def parse_reply(text: str) -> tuple[str, list]:
    """The message and raw actions of the model's answer: the JSON object asked for, one in a
    ```json block (the rest of the text is the message), or plain text without actions."""
    data, rest = _json_object(text.strip()), ""
    if data is None and (match := _FENCED_JSON.search(text)):
        data, rest = _json_object(match.group(1)), (text[:match.start()] + text[match.end():]).strip()
    if data is None:
        return text.strip(), []
    message = data.get("message") if isinstance(data.get("message"), str) else ""
    actions = data.get("actions") if isinstance(data.get("actions"), list) else []
    return (message.strip() or rest or text.strip()), actions


def _json_object(text: str) -> dict | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _unquoted(text: str) -> str:
    """Models often wrap the prompt in quotes despite being told not to."""
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1].strip()
    return text


def _chat_key(at: float) -> str:
    """Keys that sort in time order across replicas."""
    return f"{int(at * 1e6):020d}-{uuid.uuid4().hex[:8]}"
