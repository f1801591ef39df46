"""Training-task webhooks against a real loopback receiver: what arrives, the signature,
retries with backoff, failures reported in the outcome, and which URLs a task may name."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from services.common.errors import InvalidInput
from services.common.settings import MediaLimits
from services.trainer import webhooks

ALLOW_LOOPBACK = MediaLimits(allow_private_urls=True)
PUBLIC_ONLY = MediaLimits(allow_private_urls=False)
SECRET = "s3cret-key"
BODY = json.dumps({"id": "task-1", "status": "COMPLETED", "progress": 100}).encode()


class Receiver:
    """A loopback webhook receiver: answers each POST with the next of `answers` (the last
    one repeats), after `delay_s`, and records what it was sent."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, dict]] = [(200, {})]
        self.delay_s = 0.0
        self.requests: list[tuple[str, dict, bytes, int]] = []  # path, headers, body, answer
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                status, headers = receiver.answers.pop(0) if len(receiver.answers) > 1 else receiver.answers[0]
                receiver.requests.append((self.path, dict(self.headers), body, status))
                time.sleep(receiver.delay_s)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks/training"

    def accepted(self) -> list:
        return [r for r in self.requests if 200 <= r[3] < 300]


@pytest.fixture
def receiver():
    rec = Receiver()
    threading.Thread(target=rec.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield rec
    rec.httpd.shutdown()
    rec.httpd.server_close()


class Sleeps:
    """An injected sleep: records each wait instead of waiting."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


async def _deliver(url: str, *, secret: str | None = SECRET, limits: MediaLimits = ALLOW_LOOPBACK,
                   attempts: int = 3, backoff_s: float = 0.5, timeout_s: float = 5.0,
                   sleep=None, delivery_id: str = "d-1") -> webhooks.WebhookOutcome:
    return await webhooks.deliver(url, BODY, event="COMPLETED", delivery_id=delivery_id, secret=secret,
                                  limits=limits, attempts=attempts, backoff_s=backoff_s, timeout_s=timeout_s,
                                  sleep=sleep or Sleeps())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- delivery


async def test_one_delivery_carries_the_body_headers_and_a_valid_signature(receiver):
    sleeps = Sleeps()
    outcome = await _deliver(receiver.url, sleep=sleeps, delivery_id="task-1:COMPLETED")
    assert outcome.delivered and outcome.attempts == 1 and outcome.status_code == 200
    assert outcome.error == "" and abs(outcome.delivered_at - time.time()) < 60
    assert sleeps.waits == []
    [(path, headers, body, _)] = receiver.requests
    assert path == "/hooks/training" and body == BODY
    assert headers["Content-Type"] == "application/json"
    assert headers[webhooks.EVENT_HEADER] == "COMPLETED"
    assert headers[webhooks.DELIVERY_HEADER] == "task-1:COMPLETED"
    signature = headers[webhooks.SIGNATURE_HEADER]
    assert signature.startswith("sha256=")
    assert webhooks.verify(body, SECRET, signature)
    assert not webhooks.verify(body, "another-secret", signature)
    assert not webhooks.verify(body + b" ", SECRET, signature)
    assert json.loads(json.dumps(outcome.to_dict())) == {
        "event": "COMPLETED", "delivered": True, "attempts": 1, "status_code": 200, "error": "",
        "delivered_at": outcome.delivered_at}


async def test_without_a_secret_there_is_no_signature_header(receiver):
    assert (await _deliver(receiver.url, secret=None)).delivered
    [(_, headers, _, _)] = receiver.requests
    assert webhooks.SIGNATURE_HEADER not in headers
    assert headers[webhooks.EVENT_HEADER] == "COMPLETED"


def test_verify_refuses_malformed_signatures():
    good = webhooks.sign(BODY, SECRET)
    for bad in ("", "sha256=", good.upper(), good[:-1], "sha1=" + good[7:], good + "0", "sha256=é"):
        assert not webhooks.verify(BODY, SECRET, bad)
    assert webhooks.verify(BODY, SECRET, good)


async def test_a_refused_first_attempt_is_retried_with_the_same_delivery_id(receiver):
    receiver.answers = [(500, {}), (204, {})]
    sleeps = Sleeps()
    outcome = await _deliver(receiver.url, attempts=5, backoff_s=0.5, sleep=sleeps)
    assert outcome.delivered and outcome.attempts == 2 and outcome.status_code == 204
    assert sleeps.waits == [0.5]
    assert len(receiver.accepted()) == 1
    assert [r[1][webhooks.DELIVERY_HEADER] for r in receiver.requests] == ["d-1", "d-1"]
    assert [r[2] for r in receiver.requests] == [BODY, BODY]


async def test_a_receiver_that_always_refuses_gets_every_attempt_with_doubling_waits(receiver):
    receiver.answers = [(503, {})]
    sleeps = Sleeps()
    outcome = await _deliver(receiver.url, attempts=4, backoff_s=1.5, sleep=sleeps)
    assert not outcome.delivered and outcome.attempts == 4
    assert outcome.status_code == 503 and "503" in outcome.error
    assert outcome.delivered_at is None
    assert sleeps.waits == [1.5, 3.0, 6.0]
    assert len(receiver.requests) == 4 and receiver.accepted() == []


async def test_waits_stop_growing_at_the_cap(receiver):
    receiver.answers = [(500, {})]
    sleeps = Sleeps()
    await _deliver(receiver.url, attempts=12, backoff_s=1.0, sleep=sleeps)
    assert sleeps.waits[:4] == [1.0, 2.0, 4.0, 8.0]
    assert max(sleeps.waits) == webhooks.MAX_WAIT_S == sleeps.waits[-1]


async def test_the_outcome_names_the_last_failure(receiver):
    receiver.answers = [(500, {}), (404, {})]
    outcome = await _deliver(receiver.url, attempts=2)
    assert outcome.status_code == 404 and outcome.error == "HTTP 404"


async def test_a_redirect_is_not_followed(receiver):
    receiver.answers = [(302, {"location": f"http://127.0.0.1:{receiver.port}/elsewhere"})]
    outcome = await _deliver(receiver.url, attempts=2)
    assert not outcome.delivered and outcome.status_code == 302
    assert "redirects are not followed" in outcome.error
    assert [r[0] for r in receiver.requests] == ["/hooks/training", "/hooks/training"]


async def test_a_closed_port_is_a_reported_failure_not_an_exception():
    sleeps = Sleeps()
    outcome = await _deliver(f"http://127.0.0.1:{_free_port()}/hook", attempts=3, backoff_s=0.25, sleep=sleeps)
    assert not outcome.delivered and outcome.attempts == 3 and outcome.status_code is None
    assert "connection failed" in outcome.error and len(outcome.error) <= webhooks.MAX_ERROR_CHARS
    assert "Traceback" not in outcome.error
    assert sleeps.waits == [0.25, 0.5]


async def test_a_slow_receiver_times_out_without_blocking_the_event_loop(receiver):
    receiver.delay_s = 1.0
    ticks = 0

    async def tick():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    started = time.monotonic()
    outcome = await _deliver(receiver.url, attempts=1, timeout_s=0.3)
    elapsed = time.monotonic() - started
    ticker.cancel()
    assert not outcome.delivered and "no answer within 0.3s" in outcome.error
    assert elapsed < 0.9
    assert ticks >= 10  # the loop kept running while the POST waited


async def test_a_host_that_now_resolves_to_loopback_is_not_contacted(receiver, monkeypatch):
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *a, **k:
                        real("127.0.0.1" if host == "hooks.test" else host, port, *a, **k))
    outcome = await _deliver(f"http://hooks.test:{receiver.port}/hook", limits=PUBLIC_ONLY, attempts=2)
    assert not outcome.delivered and outcome.attempts == 2 and outcome.status_code is None
    assert "private or loopback" in outcome.error
    assert receiver.requests == []


async def test_the_post_goes_to_the_address_that_was_checked(receiver, monkeypatch):
    # A rebinding resolver: the first answer is the receiver, every later one an address
    # nothing listens on. Only a connection pinned to the checked address arrives.
    real = socket.getaddrinfo
    lookups = []

    def getaddrinfo(host, port, *args, **kwargs):
        if host != "rebind.test":
            return real(host, port, *args, **kwargs)
        lookups.append(host)
        return real("127.0.0.1" if len(lookups) == 1 else "127.0.0.2", port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    outcome = await _deliver(f"http://rebind.test:{receiver.port}/hook", attempts=1)
    assert outcome.delivered and lookups == ["rebind.test"]
    [(_, headers, _, _)] = receiver.requests
    assert headers["Host"] == f"rebind.test:{receiver.port}"


# ---------------------------------------------------------------- which URLs a task may name


@pytest.mark.parametrize("url", [
    "ftp://93.184.216.34/hook", "not a url", "javascript:alert(1)", "file:///etc/passwd", "http://",
    "http://127.0.0.1:8080/hook", "http://[::1]/hook", "http://10.0.0.1/hook", "http://169.254.169.254/latest",
])
def test_bad_webhook_urls_are_refused_naming_the_field(url):
    with pytest.raises(InvalidInput) as info:
        webhooks.check_webhook_url(url, "webhook_url", PUBLIC_ONLY)
    assert [name for name, _ in info.value.violations] == ["webhook_url"]
    assert "http:// or https://" in str(info.value) or "private or loopback" in str(info.value)


def test_a_too_long_url_is_refused_with_the_limit():
    url = "https://93.184.216.34/" + "a" * 2100
    with pytest.raises(InvalidInput) as info:
        webhooks.check_webhook_url(url, "webhook_url", ALLOW_LOOPBACK)
    assert info.value.violations == [("webhook_url", f"must be at most 2048 characters (got {len(url)})")]
    webhooks.check_webhook_url(url[:2048], "webhook_url", ALLOW_LOOPBACK)


def test_public_and_allowed_private_urls_pass():
    webhooks.check_webhook_url("https://93.184.216.34/hooks/training?x=1", "webhook_url", PUBLIC_ONLY)
    webhooks.check_webhook_url("http://127.0.0.1:9000/hook", "webhook_url", ALLOW_LOOPBACK)
    with pytest.raises(InvalidInput, match="http:// or https://"):
        webhooks.check_webhook_url("javascript:alert(1)", "webhook_url", ALLOW_LOOPBACK)
