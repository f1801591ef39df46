"""Hostile paths and URLs: every path problem is a short 400/404 naming the field and never the
server's folders; status headers stay small whatever the client sends; URL fetches connect to
the address they checked, at every hop."""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from http.server import ThreadingHTTPServer

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2

from services.common import media, server
from services.common.errors import InvalidInput, NotFound, Violations
from services.common.settings import MediaLimits
from tests.conftest import RoutesHandler, write_image

ALLOW_LOOPBACK = MediaLimits(allow_private_urls=True, max_download_bytes=10_000, download_timeout_s=5)
PUBLIC_ONLY = MediaLimits(allow_private_urls=False, max_download_bytes=10_000, download_timeout_s=5)


@pytest.fixture
def root(tmp_path):
    folder = tmp_path / "server-only-root"
    write_image(folder / "cat.png")
    return folder.resolve()


def _refusal(raw: str, root, field="input[0]") -> str:
    """The one description resolve_path gives for `raw`, checked for what every refusal needs."""
    with pytest.raises((InvalidInput, NotFound)) as info:
        media.resolve_path(raw, (root,), field)
    message = str(info.value)
    assert field in message
    assert "server-only-root" not in message.replace(raw[:media.SHOWN_CHARS], "")
    assert len(message.encode()) < 600, message
    bad = Violations()
    assert media.resolve_into(bad, raw, (root,), field, "no such file") is None
    assert [name for name, _ in bad.items] == [field]
    assert len(bad.items[0][1].encode()) < 600
    return message


@pytest.mark.parametrize(("make", "expected"), [
    (lambda root: f"{root}/{'a' * 300}.png", "path component longer than 255 bytes"),
    (lambda root: f"{root}/{'é' * 150}.png", "path component longer than 255 bytes"),
    (lambda root: f"{root}/{'abcd/' * 1000}x.png", "path longer than 4096 bytes"),
    (lambda root: f"{root}/{'x' * 100_000}", "path longer than 4096 bytes"),
    (lambda root: f"{root}/a\x00b.png", "NUL"),
    (lambda root: f"{root}/\ud800.png", "UTF-8"),
    (lambda root: "~no-such-user-here/cat.png", "absolute path"),
])
def test_impossible_paths_are_invalid_input(root, make, expected):
    assert expected in _refusal(make(root), root)


def test_a_long_path_does_not_leak_the_root(root):
    message = _refusal("/" + "x" * 300, root)
    assert "path component longer than 255 bytes" in message
    assert str(root) not in message


def test_symlink_loops_are_invalid_input(root):
    (root / "loop").symlink_to(root / "loop")
    (root / "a").symlink_to(root / "b")
    (root / "b").symlink_to(root / "a")
    for raw in (f"{root}/loop", f"{root}/loop/cat.png", f"{root}/a/cat.png"):
        assert "symbolic link loop" in _refusal(raw, root)


def test_links_that_grow_past_the_path_limit_are_refused(root):
    # Each link is short, but what it leads to is longer than the OS allows.
    deep = "d" * 200
    (root / "long").symlink_to(root / "/".join([deep] * 19))
    message = _refusal(f"{root}/long/{deep}/{deep}/cat.png", root)
    assert "too long" in message or "no such file" in message


def test_a_missing_file_is_not_found_with_the_clients_path_only(root):
    with pytest.raises(NotFound) as info:
        media.resolve_path(f"{root}/missing.png", (root,), "image_path")
    assert "image_path" in str(info.value) and "missing.png" in str(info.value)


def test_roots_are_never_listed(root, tmp_path):
    for raw in ("relative/cat.png", "/etc/passwd.png"):
        with pytest.raises(InvalidInput) as info:
            media.resolve_path(raw, (root,), "f")
        assert str(root) not in str(info.value)


def test_a_huge_url_is_echoed_only_in_part():
    with pytest.raises(InvalidInput) as info:
        media.check_url("ftp://" + "h" * 100_000, "input[0].media_url", PUBLIC_ONLY)
    assert len(str(info.value)) < 400
    assert "more characters" in str(info.value)


def test_an_unreadable_image_does_not_name_its_real_path(root):
    real = root / "inner" / "corrupt.png"
    real.parent.mkdir()
    real.write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    (root / "link.png").symlink_to(real)
    path = media.resolve_path(f"{root}/link.png", (root,), "f")
    with pytest.raises(InvalidInput) as info:
        media.decode_image(path, "f", MediaLimits())
    assert "inner" not in str(info.value)


# ---------------------------------------------------------------- gRPC status bounds


METHOD = "/loramesh.test.Raising/Call"


class _Raising(grpc.GenericRpcHandler):
    """One method that raises what the test sets, with health messages as its types."""

    def __init__(self):
        self.error: Exception | None = None

    def service(self, details):
        if details.method != METHOD:
            return None

        async def check(request, context):
            raise self.error

        return grpc.unary_unary_rpc_method_handler(
            check, health_pb2.HealthCheckRequest.FromString, health_pb2.HealthCheckResponse.SerializeToString)


@pytest.fixture
async def raising_server():
    handler = _Raising()
    grpc_server = grpc.aio.server(interceptors=[server.CallInterceptor()])
    grpc_server.add_generic_rpc_handlers((handler,))
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = channel.unary_unary(METHOD,
                               request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                               response_deserializer=health_pb2.HealthCheckResponse.FromString)
    yield handler, stub
    await channel.close()
    await grpc_server.stop(None)


def _details(error: grpc.aio.AioRpcError) -> error_details_pb2.BadRequest:
    raw = dict(error.trailing_metadata())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    detail = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(detail)
    return detail


def test_status_messages_and_details_are_bounded():
    huge = InvalidInput("f" * 10_000, "x" * 200_000, *[(f"input[{i}]", "é" * 5_000) for i in range(100)])
    status = server.status_for(huge)
    assert len(status.message.encode()) <= server.MAX_MESSAGE_BYTES
    assert "more bytes" in status.message
    detail = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(detail)
    assert len(detail.SerializeToString()) <= server.MAX_DETAILS_BYTES
    assert all(len(v.field.encode()) <= server.MAX_FIELD_BYTES for v in detail.field_violations)
    assert all(len(v.description.encode()) <= server.MAX_MESSAGE_BYTES for v in detail.field_violations)
    assert "more problems not shown" in detail.field_violations[-1].description
    assert server.bounded("short") == "short"
    cut = server.bounded("é" * 1000, 100)
    assert len(cut.encode()) <= 100 and cut.startswith("é")


async def test_a_huge_invalid_input_reaches_the_client_small(raising_server):
    handler, stub = raising_server
    handler.error = InvalidInput("field", "x" * 200_000)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(health_pb2.HealthCheckRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(info.value.details().encode()) <= server.MAX_MESSAGE_BYTES
    detail = _details(info.value)
    assert detail.field_violations[0].field == "field"
    assert len(detail.field_violations[0].description.encode()) <= server.MAX_MESSAGE_BYTES


async def test_an_unexpected_error_shows_no_exception_text(raising_server):
    # The request id stays under gRPC's 8 KiB metadata soft limit: above it gRPC may refuse
    # the call itself, at random, before our handler runs.
    handler, stub = raising_server
    handler.error = OSError(36, "File name too long", "/srv/secret/" + "x" * 100_000)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(health_pb2.HealthCheckRequest(), metadata=(("x-request-id", "r" * 4_000),), timeout=10)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in info.value.details()
    assert len(info.value.details()) < 300


# ---------------------------------------------------------------- URL fetches




@pytest.fixture
def http_server():
    RoutesHandler.routes, RoutesHandler.seen_hosts = {}, []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RoutesHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd, RoutesHandler
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def rebinding_dns(monkeypatch):
    """getaddrinfo for names under .test: the first answer for each name from `first`, every
    later one from `later` (a rebinding resolver); every other name resolves as usual."""
    real = socket.getaddrinfo
    answers: dict[str, tuple[str, str]] = {}
    lookups: dict[str, int] = {}

    def getaddrinfo(host, port, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in answers:
            return real(host, port, *args, **kwargs)
        lookups[name] = lookups.get(name, 0) + 1
        address = answers[name][0 if lookups[name] == 1 else 1]
        return real(address, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers, lookups


def _dead_loopback_address() -> str:
    """A loopback address nothing listens on (the test servers bind 127.0.0.1 only)."""
    return "127.0.0.2"


def test_fetch_connects_to_the_checked_address_not_a_second_answer(http_server, rebinding_dns):
    httpd, handler = http_server
    answers, lookups = rebinding_dns
    port = httpd.server_address[1]
    handler.routes["/cat.png"] = (200, {}, b"meow")
    answers["rebind.test"] = ("127.0.0.1", _dead_loopback_address())
    assert media.fetch_url(f"http://rebind.test:{port}/cat.png", "u", ALLOW_LOOPBACK) == b"meow"
    assert lookups["rebind.test"] == 1
    assert handler.seen_hosts == [f"rebind.test:{port}"]


def test_every_redirect_hop_is_resolved_once_and_pinned(http_server, rebinding_dns):
    httpd, handler = http_server
    answers, lookups = rebinding_dns
    port = httpd.server_address[1]
    answers["first.test"] = ("127.0.0.1", _dead_loopback_address())
    answers["second.test"] = ("127.0.0.1", _dead_loopback_address())
    handler.routes["/start"] = (302, {"location": f"http://second.test:{port}/cat.png"}, b"")
    handler.routes["/cat.png"] = (200, {}, b"meow")
    assert media.fetch_url(f"http://first.test:{port}/start", "u", ALLOW_LOOPBACK) == b"meow"
    assert lookups == {"first.test": 1, "second.test": 1}
    assert handler.seen_hosts == [f"first.test:{port}", f"second.test:{port}"]


def test_a_host_resolving_to_loopback_is_refused(http_server, rebinding_dns):
    httpd, handler = http_server
    answers, _ = rebinding_dns
    handler.routes["/cat.png"] = (200, {}, b"meow")
    answers["inside.test"] = ("127.0.0.1", "127.0.0.1")
    with pytest.raises(InvalidInput, match="private or loopback"):
        media.fetch_url(f"http://inside.test:{httpd.server_address[1]}/cat.png", "u", PUBLIC_ONLY)
    for url in ("http://[::1]/x", "http://[::ffff:127.0.0.1]/x", "http://224.0.0.1/x", "http://0.0.0.0/x",
                "http://169.254.169.254/latest", "http://[fe80::1]/x", "http://10.0.0.1/x"):
        with pytest.raises(InvalidInput, match="private or loopback"):
            media.check_url(url, "u", PUBLIC_ONLY)
    assert handler.seen_hosts == []


def test_a_redirect_to_a_loopback_url_is_refused_at_the_hop(http_server, rebinding_dns, monkeypatch):
    # The first hop must be a public address that answers; with no route out of the test
    # machine, a loopback HTTP proxy stands in for the internet (httpx honours HTTP_PROXY),
    # and the fetch itself still goes to the address that was checked.
    httpd, handler = http_server
    answers, _ = rebinding_dns
    port = httpd.server_address[1]
    answers["public.test"] = ("93.184.216.34", "93.184.216.34")
    handler.routes[f"http://93.184.216.34:{port}/start"] = (302, {"location": f"http://127.0.0.1:{port}/cat.png"}, b"")
    handler.routes[f"http://93.184.216.34:{port}/ftp"] = (302, {"location": "file:///etc/passwd"}, b"")
    handler.routes["/cat.png"] = (200, {}, b"meow")
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{port}")
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(InvalidInput, match="private or loopback"):
        media.fetch_url(f"http://public.test:{port}/start", "u", PUBLIC_ONLY)
    with pytest.raises(InvalidInput, match="http:// or https://"):
        media.fetch_url(f"http://public.test:{port}/ftp", "u", PUBLIC_ONLY)
    assert handler.seen_hosts == [f"public.test:{port}", f"public.test:{port}"]


def _tls_server(tmp_path, hostname: str):
    """An HTTPS server on 127.0.0.1 whose certificate names only `hostname`, and its CA file."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RoutesHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    sni: list = []
    context.sni_callback = lambda sock, server_name, ctx: sni.append(server_name)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, cert_file, sni


def test_https_keeps_sni_and_the_certificate_check(tmp_path, rebinding_dns, monkeypatch):
    answers, lookups = rebinding_dns
    RoutesHandler.routes, RoutesHandler.seen_hosts = {"/cat.png": (200, {}, b"meow")}, []
    httpd, ca_file, sni = _tls_server(tmp_path, "secure.test")
    try:
        port = httpd.server_address[1]
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
        answers["secure.test"] = ("127.0.0.1", _dead_loopback_address())
        assert media.fetch_url(f"https://secure.test:{port}/cat.png", "u", ALLOW_LOOPBACK) == b"meow"
        assert sni == ["secure.test"]
        assert RoutesHandler.seen_hosts == [f"secure.test:{port}"]
        # A name the certificate does not carry fails the check, though the address is the same.
        answers["other.test"] = ("127.0.0.1", "127.0.0.1")
        with pytest.raises(Exception, match="download"):
            media.fetch_url(f"https://other.test:{port}/cat.png", "u", ALLOW_LOOPBACK)
    finally:
        httpd.shutdown()
        httpd.server_close()


# ---------------------------------------------------------------- through the gateway


@pytest.mark.parametrize("make", [
    lambda media_dir: f"{media_dir}/{'a' * 300}.png",
    lambda media_dir: f"{media_dir}/{'b' * 100_000}.png",
    lambda media_dir: f"{media_dir}/{'c/' * 3000}x.png",
])
def test_gateway_answers_400_for_impossible_paths(mesh, media_dir, make):
    r = httpx.post(mesh.rest_url + "/tag", json={"input": [make(media_dir)]}, timeout=60)
    assert r.status_code == 400, r.text[:500]
    assert "input[0]" in r.json()["message"]
    assert len(r.content) < 8 * 1024
    ok = httpx.post(mesh.rest_url + "/tag", json={"input": [str(media_dir / "cat.png")]}, timeout=60)
    assert ok.status_code == 200


def test_messages_show_what_the_client_sent_not_the_folder_joined_to_it(root):
    bad = Violations()
    joined = f"{root}/{'l' * 300}.safetensors"
    assert media.resolve_into(bad, joined, (root,), "loras[0].path", "no such LoRA file",
                              shown_as="l" * 300 + ".safetensors") is None
    assert str(root) not in bad.items[0][1] and "255 bytes" in bad.items[0][1]
    assert media.resolve_into(bad, f"{root}/missing.safetensors", (root,), "loras[1].path", "no such LoRA file",
                              shown_as="missing.safetensors") is None
    assert bad.items[1] == ("loras[1].path", "no such LoRA file: 'missing.safetensors'")


LONG = "x" * 300  # one component over the file system's 255 bytes


@pytest.mark.parametrize("method, route, body, field", [
    ("POST", "/caption", lambda m: {"image_path": f"{m}/{LONG}.png"}, "image_path"),
    ("POST", "/caption", lambda m: {"image_path": f"{m}/cat.png", "model_path": LONG}, "model_path"),
    ("POST", "/audio/caption", lambda m: {"audio_path": f"{m}/{LONG}.wav"}, "audio_path"),
    ("POST", "/models/load", lambda m: {"model_name": f"{LONG}.safetensors"}, "model_name"),
    ("GET", f"/models/hash/checkpoint/{LONG}.safetensors", None, "model_name"),
    ("POST", "/v1/inference", lambda m: {"model": "sdxl", "loras": [{"path": f"{LONG}.safetensors"}],
                                         "prompts": [{"prompt": "x"}]}, "loras[0].path"),
    ("POST", "/sessions", lambda m: {"sessionId": "long-path", "config": {"job": "extension", "config": {
        "name": "x", "process": [{"type": "diffusion_trainer", "training_folder": f"{m}/out",
                                  "datasets": [{"folder_path": f"{m}/{LONG}"}],
                                  "model": {"name_or_path": f"/{LONG}/m.safetensors", "arch": "sdxl"}}]}}},
     "config.config.process[0].datasets[0].folder_path"),
    ("GET", f"/output/{LONG}.png", None, "path"),
    ("GET", f"/thumb/{LONG}.png", None, "path"),
])
def test_every_path_taking_route_answers_400_for_an_impossible_path(mesh, media_dir, method, route, body, field):
    r = httpx.request(method, mesh.rest_url + route, json=body(media_dir) if body else None, timeout=60)
    assert r.status_code == (422 if route.startswith("/v1/") else 400), r.text[:500]
    assert field in r.text and len(r.content) < 8 * 1024
    assert str(mesh.var_dir) not in r.text and "/models" not in r.text.replace(route, "")
