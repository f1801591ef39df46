"""Generates the Envoy bootstrap that serves the contract: REST through the gRPC-JSON
transcoder and native gRPC on the same ports, auth before the transcoder, JSON errors,
SSE for server streams, a WebSocket listener for the events bridge.

    python -m gateway.envoy_config --descriptor gen/loramesh.pb --out var/envoy.yaml
    python -m gateway.envoy_config --preset k8s --descriptor gen/loramesh.pb --out deploy/k8s/envoy/envoy.yaml
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from google.protobuf import descriptor_pb2

from gateway import web_assets
from gateway.routes import PACKAGE, SERVICE_UPSTREAMS, Messages, error_style, http_bindings, load_descriptor_set
from services.common.callers import SUBJECT_HEADER
from services.common.settings import SERVICE_PORTS

# Routes guarded at the gateway (docs/architecture.md, "The mesh").
JWT_PREFIX = "/api/v1/training"
API_KEY_PREFIX = "/v1/finetune"
# The `metrics` port of every loramesh pod in deploy/k8s (LORAMESH_METRICS_PORT of the services).
K8S_METRICS_PORT = 9464

_LUA_DIR = Path(__file__).parent / "lua"

# gRPC code carried in the JSON body of Envoy's own error replies.
_LOCAL_REPLY_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 405: 12, 408: 4, 413: 8, 415: 3, 429: 8, 500: 13, 501: 12,
                      502: 14, 503: 14, 504: 4}


@dataclass
class GatewayConfig:
    descriptor_path: Path
    # "tagger"/"captioner"/"trainer"/"inference" -> every replica's (host, port); a lone
    # (host, port) is a service with one endpoint.
    upstreams: dict[str, list[tuple[str, int]]]
    rest_ports: list[int] = field(default_factory=lambda: [8000, 8080])
    websocket_port: int = 8081
    events_bridge: tuple[str, int] = ("127.0.0.1", 8090)
    admin_port: int = 9901
    listen_address: str = "0.0.0.0"
    openapi_path: Path | None = None  # served at GET /openapi.json
    web: bool = True  # the API reference at /docs and the dashboard at /dashboard (gateway/web_assets.py)
    jwks_path: Path | None = None  # JWKS file for bearer tokens on /api/v1/training*; None: closed
    jwt_issuer: str | None = None  # when set, tokens must carry this `iss`
    jwt_audiences: tuple[str, ...] = ()  # when set, tokens must name one of these in `aud`
    api_keys_path: Path | None = None  # one accepted X-Key per line, for /v1/finetune*; None: closed
    max_request_bytes: int = 64 * 1024 * 1024
    access_log_path: str = "/dev/stdout"
    dns_upstreams: bool = False  # STRICT_DNS clusters (Kubernetes headless Services) instead of STATIC
    embed_descriptor: bool = False  # descriptor inline (proto_descriptor_bin) instead of a file path
    metrics_port: int | None = None  # serves GET /metrics (the admin's Prometheus stats) when set
    otlp_collector: tuple[str, int] | None = None  # OTLP/gRPC (host, port) that receives Envoy's spans

    def __post_init__(self) -> None:
        self.upstreams = {name: [tuple(endpoints)] if isinstance(endpoints[0], str) else
                          [tuple(endpoint) for endpoint in endpoints]
                          for name, endpoints in self.upstreams.items()}


def render(cfg: GatewayConfig) -> dict:
    descriptors = load_descriptor_set(cfg.descriptor_path)
    services = _services(descriptors)
    listeners = [_rest_listener(cfg, services, descriptors), _websocket_listener(cfg)]
    clusters = [_grpc_cluster(name, endpoints, cfg.dns_upstreams) for name, endpoints in sorted(cfg.upstreams.items())]
    clusters.append(_cluster("events_bridge", [cfg.events_bridge], cfg.dns_upstreams))
    if cfg.metrics_port is not None:
        listeners.append(_metrics_listener(cfg))
        clusters.append(_cluster(ADMIN_CLUSTER, [("127.0.0.1", cfg.admin_port)], False))
    if cfg.otlp_collector is not None:
        # By name or address alike (a collector's Service name, or 127.0.0.1).
        clusters.append(_http2_cluster(_cluster(OTLP_CLUSTER, [cfg.otlp_collector], dns=True)))
    return {
        "admin": {"address": _address("127.0.0.1", cfg.admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def write(cfg: GatewayConfig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(render(cfg), sort_keys=False, width=120))
    return path


def k8s_config(descriptor_path: Path) -> GatewayConfig:
    """The gateway as deploy/k8s runs it: Services by DNS name, files from the ConfigMap
    and the `loramesh-gateway-auth` Secret mounted under /etc/envoy. Each Service is
    headless, so its one DNS name resolves to every pod: every pod is an endpoint."""
    return GatewayConfig(
        descriptor_path=descriptor_path,
        upstreams={name: [(name, port)] for name, port in SERVICE_PORTS.items()},
        events_bridge=("events-bridge", 8090),
        openapi_path=Path("/etc/envoy/openapi.json"),
        jwks_path=Path("/etc/envoy/auth/jwks.json"),
        api_keys_path=Path("/etc/envoy/auth/api-keys"),
        dns_upstreams=True,
        embed_descriptor=True,
        web=False,
        metrics_port=K8S_METRICS_PORT,
    )


def _services(descriptors: descriptor_pb2.FileDescriptorSet) -> list[str]:
    return sorted(
        f"{PACKAGE}.{service.name}"
        for file in descriptors.file
        if file.package == PACKAGE
        for service in file.service
    )


def _address(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def _rest_listener(cfg: GatewayConfig, services: list[str],
                   descriptors: descriptor_pb2.FileDescriptorSet) -> dict:
    # One listener on every REST port, so the filter chain (and the descriptor) exists once.
    first, *others = cfg.rest_ports
    return {
        "name": "rest",
        "address": _address(cfg.listen_address, first),
        "additional_addresses": [{"address": _address(cfg.listen_address, port)} for port in others],
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                         ".HttpConnectionManager",
                "stat_prefix": "rest",
                "codec_type": "AUTO",  # HTTP/1.1 REST and h2c gRPC on one port
                "generate_request_id": True,
                # The id a call's progress events are published under (events.<service>.<id>.*).
                "always_set_request_id_in_response": True,
                "stream_idle_timeout": "0s",
                "access_log": [_access_log(cfg.access_log_path)],
                "local_reply_config": _json_local_replies(cfg.max_request_bytes),
                "route_config": _route_config(cfg, services),
                **_tracing(cfg),
                "http_filters": _http_filters(cfg, services, descriptors),
            },
        }]}],
    }


def _route_config(cfg: GatewayConfig, services: list[str]) -> dict:
    routes = []
    if cfg.openapi_path is not None:
        routes.append({
            "match": {"path": "/openapi.json"},
            "direct_response": {"status": 200, "body": {"filename": str(cfg.openapi_path)}},
            "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
            "typed_per_filter_config": {"envoy.filters.http.grpc_json_transcoder": {
                "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}},
        })
    if cfg.web:
        routes += _static_routes()
    # The transcoder rewrites REST paths to gRPC paths before routing, so one prefix per
    # service routes both REST and native gRPC calls.
    for service in services:
        upstream = SERVICE_UPSTREAMS.get(service.rsplit(".", 1)[1])
        if upstream in cfg.upstreams:
            routes.append({"match": {"prefix": f"/{service}/"}, "route": _upstream_route(upstream)})
    # Health and reflection of the tagger answer for the gateway's gRPC port.
    if "tagger" in cfg.upstreams:
        for prefix in ("/grpc.health.v1.Health/", "/grpc.reflection."):
            routes.append({"match": {"prefix": prefix}, "route": _upstream_route("tagger")})
    return {
        "name": "loramesh",
        "max_direct_response_body_size_bytes": 16 * 1024 * 1024,
        "virtual_hosts": [{"name": "loramesh", "domains": ["*"], "routes": routes}],
    }


def _static_routes() -> list[dict]:
    """/docs and /dashboard: files Envoy reads at start-up and answers from memory. Like
    /openapi.json they need no credentials; the dashboard's data comes from the REST routes."""
    routes = []
    for path, file in sorted(web_assets.static_files().items()):
        routes.append({
            "match": {"path": path},
            "direct_response": {"status": 200, "body": {"filename": str(file)}},
            "response_headers_to_add": [{"header": {"key": "content-type",
                                                    "value": web_assets.content_type(file)}}],
            "typed_per_filter_config": {"envoy.filters.http.grpc_json_transcoder": {
                "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}},
        })
    return routes


def _http_filters(cfg: GatewayConfig, services: list[str], descriptors) -> list[dict]:
    descriptor = (
        {"proto_descriptor_bin": base64.b64encode(_without_comments(descriptors)).decode()}
        if cfg.embed_descriptor
        else {"proto_descriptor": str(cfg.descriptor_path)}
    )
    replies, requests = _lua_sources(cfg, descriptors)
    return [
        # First, so that every answer passes it on the way out, Envoy's own refusals included.
        _lua_filter("loramesh.replies", replies),
        {
            # Every request is unary, so buffering it whole costs nothing and gives a hard 413.
            "name": "envoy.filters.http.buffer",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                "max_request_bytes": cfg.max_request_bytes,
            },
        },
        {
            # The token's subject reaches the services in this header; jwt_authn adds to what
            # the client sent, so a client's own value is removed first.
            "name": "envoy.filters.http.header_mutation",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                "mutations": {"request_mutations": [{"remove": SUBJECT_HEADER}]},
            },
        },
        _jwt_filter(cfg, descriptors),
        # After auth: the X-Key check, then a request body's content type and field names.
        _lua_filter("loramesh.requests", requests),
        {
            "name": "envoy.filters.http.grpc_json_transcoder",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3"
                         ".GrpcJsonTranscoder",
                **descriptor,
                "services": services,
                "convert_grpc_status": True,
                # A unary answer is transcoded whole; GET /queue of a long history is MBs.
                "max_response_body_size": 64 * 1024 * 1024,
                "request_validation_options": {
                    "reject_unknown_method": True,
                    "reject_unknown_query_parameters": True,
                    "reject_binding_body_field_collisions": True,
                },
                # Zero values are printed ("position": 0, "is_noisy": false) as the documented
                # answers show them; proto field names give snake_case out.
                "print_options": {
                    "add_whitespace": False,
                    "always_print_primitive_fields": True,
                    "preserve_proto_field_names": True,
                    "stream_sse_style_delimited": True,
                },
            },
        },
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        },
    ]


def _without_comments(descriptors: descriptor_pb2.FileDescriptorSet) -> bytes:
    """The descriptor set without source comments: Envoy does not need them, and an
    inline copy must stay small enough for a ConfigMap."""
    stripped = descriptor_pb2.FileDescriptorSet()
    stripped.CopyFrom(descriptors)
    for file in stripped.file:
        file.ClearField("source_code_info")
    return stripped.SerializeToString(deterministic=True)


def _guarded_paths(descriptors, prefix: str) -> list[str]:
    """gRPC paths of the RPCs whose REST route sits under `prefix`, so native gRPC calls
    to them are guarded like the REST route."""
    return sorted({
        f"/{PACKAGE}.{service}/{method}"
        for service, method, _, path, _ in http_bindings(descriptors)
        if path.startswith(prefix)
    })


def _jwt_filter(cfg: GatewayConfig, descriptors) -> dict:
    # A token without `exp` would be valid for ever: refused.
    provider = {"forward": True, "require_expiration": True,
                "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
                "claim_to_headers": [{"header_name": SUBJECT_HEADER, "claim_name": "sub"}]}
    if cfg.jwt_issuer:
        provider["issuer"] = cfg.jwt_issuer
    if cfg.jwt_audiences:
        provider["audiences"] = list(cfg.jwt_audiences)
    if cfg.jwks_path is not None:
        provider["local_jwks"] = {"filename": str(cfg.jwks_path)}
    else:
        # No JWKS configured: verify against a key nobody holds, so the guarded routes stay closed.
        provider["local_jwks"] = {"inline_string": _unusable_jwks()}
    requirement = {"provider_name": "loramesh"}
    rules = [{"match": {"prefix": JWT_PREFIX}, "requires": requirement}]
    rules += [{"match": {"path": path}, "requires": requirement} for path in _guarded_paths(descriptors, JWT_PREFIX)]
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"loramesh": provider},
            "rules": rules,
        },
    }


def _unusable_jwks() -> str:
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    return json.dumps({"keys": [json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))]})


def _lua_filter(name: str, source: str) -> dict:
    return {
        "name": name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": source},
        },
    }


def _lua_sources(cfg: GatewayConfig, descriptors) -> tuple[str, str]:
    """The two Lua filters (gateway/lua/replies.lua and requests.lua), each with the JSON
    reader and its CONFIG table, generated from the descriptor set's REST bindings."""
    messages = Messages(descriptors)
    exact, templates, routes, bodies = {}, [], {}, {}
    checked: dict[str, int] = {}  # message -> its index in the Lua `messages` table
    segment_styles: dict[str, set] = {}
    for number, (service, method, verb, path, body) in enumerate(http_bindings(descriptors), start=1):
        style = error_style(service, path)
        segment_styles.setdefault(path.split("/")[1], set()).add(style)
        routes[number] = {"style": style, "body": body,
                          "params": {name: True for name in re.findall(r"\{([^}=]+)", path)}}
        if "{" in path or "*" in path:
            templates.append((verb, _lua_pattern(path), number))
        else:
            exact[f"{verb} {path}"] = number
        body_type = messages.body_type(service, method, body)
        if body_type is not None:  # 0: a JSON body whose content type is checked, not its names
            bodies[number] = checked.setdefault(body_type, len(checked) + 1) if body_type else 0
    # More literal text first, so `/ollama/history/{id}` is tried before a catch-all.
    templates.sort(key=lambda t: -len(re.sub(r"\[\^/\]\+|\.\*", "", t[1])))
    lua_messages = {}
    pending = list(checked)
    while pending:
        type_name = pending.pop()
        fields = {}
        for name, (kind, nested) in messages.json_fields(type_name).items():
            if kind == "value":
                fields[name] = 0
            else:
                if nested not in checked:
                    checked[nested] = len(checked) + 1
                    pending.append(nested)
                fields[name] = checked[nested] if kind == "message" else -checked[nested]
        names = ", ".join(f.name for f in messages.by_name[type_name].field) or "none (send {})"
        lua_messages[checked[type_name]] = {"names": names, "fields": fields}
    replies = {
        "exact": exact,
        "templates": [list(t) for t in templates],
        "routes": routes,
        # A path no binding matches takes the style its first segment has in every binding.
        "segment_styles": {segment: styles.pop() for segment, styles in segment_styles.items()
                           if len(styles) == 1 and None not in styles},
        # gRPC code of a plain-text refusal (the transcoder's own) wrapped as a Status.
        "codes": {str(status): code for status, code in _LOCAL_REPLY_CODES.items()},
    }
    requests = {
        "api_keys_file": str(cfg.api_keys_path or ""),
        "key_prefix": API_KEY_PREFIX,
        "guarded_grpc": {path: True for path in _guarded_paths(descriptors, API_KEY_PREFIX)},
        "bodies": bodies,
        "messages": lua_messages,
    }
    json_reader = (_LUA_DIR / "json.lua").read_text()
    return tuple(
        f"local json = (function()\n{json_reader}\nend)()\n\nlocal CONFIG = {_lua_literal(config)}\n\n"
        + (_LUA_DIR / name).read_text()
        for name, config in (("replies.lua", replies), ("requests.lua", requests))
    )


def _lua_pattern(template: str) -> str:
    """A Lua pattern matching the paths of a google.api.http template (`{x}` and `*` one
    segment, `{x=**}` and `**` the rest)."""
    path = re.sub(r"\{[^}=]+\}", "*", template)
    path = re.sub(r"\{[^}=]+=([^}]*)\}", r"\1", path)
    parts = ["[^/]+" if seg == "*" else ".*" if seg == "**" else re.sub(r"([%^$().\[\]*+?-])", r"%\1", seg)
             for seg in path.split("/")]
    return "^" + "/".join(parts) + "$"


def _lua_literal(value) -> str:
    if isinstance(value, dict):
        items = ", ".join(f"[{_lua_literal(k)}] = {_lua_literal(v)}" for k, v in value.items() if v is not None)
        return "{" + items + "}"
    if isinstance(value, (list, tuple)):
        return "{" + ", ".join(_lua_literal(v) for v in value) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    # A JSON string with its non-ASCII characters left as they are is a valid Lua string literal.
    return json.dumps(str(value), ensure_ascii=False)


def _json_local_replies(max_request_bytes: int) -> dict:
    """Envoy's own replies (unknown route, 413, auth failures) as google.rpc.Status JSON with
    a plain-text message. The Lua filters' refusals already are that JSON: left as they are."""
    messages = {413: f"request body is larger than the {max_request_bytes} byte limit"}
    status_body = {"filter": {"metadata_filter": {"match_if_key_not_found": False, "matcher": {
        "filter": "loramesh", "path": [{"key": "status_body"}], "value": {"bool_match": True}}}}}
    # Native gRPC clients keep Envoy's own reply: the text as grpc-message.
    not_grpc = {"header_filter": {"header": {"name": "content-type", "string_match": {"prefix": "application/grpc"},
                                             "invert_match": True, "treat_missing_header_as_empty": True}}}
    mappers = [status_body] + [
        {
            "filter": {"and_filter": {"filters": [not_grpc, {"status_code_filter": {"comparison": {"op": "EQ", "value": {
                "default_value": status, "runtime_key": f"loramesh.local_reply.{status}"}}}}]}},
            "body_format_override": {
                "json_format": {"code": code, "message": messages.get(status, "%LOCAL_REPLY_BODY%"), "details": []},
                "content_type": "application/json",
            },
        }
        for status, code in sorted(_LOCAL_REPLY_CODES.items())
    ]
    return {"mappers": mappers}


def _access_log(path: str) -> dict:
    return {
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": path,
            "log_format": {"json_format": {
                "time": "%START_TIME%",
                "request_id": "%REQ(X-REQUEST-ID)%",
                "method": "%REQ(:METHOD)%",
                "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
                "protocol": "%PROTOCOL%",
                "status": "%RESPONSE_CODE%",
                "grpc_status": "%GRPC_STATUS%",
                "flags": "%RESPONSE_FLAGS%",
                "bytes_in": "%BYTES_RECEIVED%",
                "bytes_out": "%BYTES_SENT%",
                "duration_ms": "%DURATION%",
                "upstream": "%UPSTREAM_CLUSTER%",
            }},
        },
    }


def _websocket_listener(cfg: GatewayConfig) -> dict:
    return {
        "name": "websocket",
        "address": _address(cfg.listen_address, cfg.websocket_port),
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                         ".HttpConnectionManager",
                "stat_prefix": "websocket",
                "upgrade_configs": [{"upgrade_type": "websocket"}],
                "stream_idle_timeout": "0s",
                # The WebSocket closing handshake already ends both directions; a delayed
                # close would hold every client's close for a second.
                "delayed_close_timeout": "0s",
                "access_log": [_access_log(cfg.access_log_path)],
                "route_config": {"virtual_hosts": [{"name": "events", "domains": ["*"], "routes": [
                    {"match": {"prefix": "/"}, "route": {"cluster": "events_bridge", "timeout": "0s"}},
                ]}]},
                "http_filters": [{
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                }],
            },
        }]}],
    }


ADMIN_CLUSTER = "envoy_admin"
OTLP_CLUSTER = "opentelemetry_collector"


def _metrics_listener(cfg: GatewayConfig) -> dict:
    """GET /metrics on its own port: the admin's /stats/prometheus (requests by route
    cluster and response code, latency histograms, upstream health), while the admin itself
    stays on loopback."""
    return {
        "name": "metrics",
        "address": _address(cfg.listen_address, cfg.metrics_port),
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                         ".HttpConnectionManager",
                "stat_prefix": "metrics",
                "route_config": {"virtual_hosts": [{"name": "metrics", "domains": ["*"], "routes": [
                    {"match": {"path": "/metrics"},
                     "route": {"cluster": ADMIN_CLUSTER, "prefix_rewrite": "/stats/prometheus"}},
                ]}]},
                "http_filters": [{
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                }],
            },
        }]}],
    }


def otlp_collector(endpoint: str | None) -> tuple[str, int] | None:
    """(host, port) of an OTLP/gRPC endpoint URL (OTEL_EXPORTER_OTLP_ENDPOINT), 4317 when it names none."""
    if not endpoint:
        return None
    url = urllib.parse.urlsplit(endpoint)
    return (url.hostname or "127.0.0.1", url.port or 4317)


def _tracing(cfg: GatewayConfig) -> dict:
    """With a collector: a span per request through the gateway, exported over OTLP, whose
    W3C `traceparent` reaches the service so its spans join the same trace."""
    if cfg.otlp_collector is None:
        return {}
    return {"tracing": {
        "random_sampling": {"value": 100},
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": OTLP_CLUSTER}, "timeout": "1s"},
                "service_name": "envoy",
            },
        },
    }}


def _upstream_route(cluster: str) -> dict:
    """A route to a service's replicas. A call is retried on another replica only when it
    never reached one (refused connection, refused stream, reset before the request was
    sent), so a POST never runs twice; an error a replica returns is the answer."""
    return {
        "cluster": cluster,
        "timeout": "0s",
        "retry_policy": {
            "retry_on": "connect-failure,refused-stream,reset-before-request",
            "num_retries": 3,
            "retry_host_predicate": [{
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3"
                                          ".PreviousHostsPredicate"},
            }],
            "host_selection_retry_max_attempts": 5,
        },
    }


def _cluster(name: str, endpoints: list[tuple[str, int]], dns: bool) -> dict:
    return {
        "name": name,
        "type": "STRICT_DNS" if dns else "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _address(host, port)}} for host, port in endpoints]}]},
    }


def _http2_cluster(cluster: dict) -> dict:
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    return cluster


def _grpc_cluster(name: str, endpoints: list[tuple[str, int]], dns: bool) -> dict:
    cluster = _http2_cluster(_cluster(name, endpoints, dns))
    # grpc.health.v1 on every replica, every second, with or without traffic: a replica that
    # is gone or draining (NOT_SERVING on SIGTERM) leaves the rotation within about 2 s, and
    # a restarted one rejoins on its first SERVING answer.
    cluster["health_checks"] = [{
        "timeout": "1s",
        "interval": "1s",
        "no_traffic_interval": "1s",
        "unhealthy_threshold": 2,
        "healthy_threshold": 1,
        "grpc_health_check": {},
    }]
    # Between checks, a replica whose connections fail twice in a row (refused, reset) is
    # ejected at once; errors a replica returns never eject it.
    cluster["outlier_detection"] = {
        "split_external_local_origin_errors": True,
        "consecutive_local_origin_failure": 2,
        "enforcing_consecutive_5xx": 0,
        "enforcing_success_rate": 0,
        "base_ejection_time": "5s",
        "max_ejection_percent": 50,
    }
    return cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--descriptor", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", choices=["local", "k8s"], default="local")
    parser.add_argument("--jwt-issuer", help="the `iss` bearer tokens must carry")
    parser.add_argument("--jwt-audience", action="append", default=[],
                        help="an `aud` value tokens may name (repeat for several)")
    parser.add_argument("--otlp-endpoint", help="OTLP/gRPC collector URL that receives Envoy's spans")
    args = parser.parse_args()
    if args.preset == "k8s":
        cfg = k8s_config(args.descriptor)
    else:
        cfg = GatewayConfig(descriptor_path=args.descriptor.resolve(),
                            upstreams={name: [("127.0.0.1", port)] for name, port in SERVICE_PORTS.items()})
    cfg = dataclasses.replace(cfg, jwt_issuer=args.jwt_issuer, jwt_audiences=tuple(args.jwt_audience),
                              otlp_collector=otlp_collector(args.otlp_endpoint))
    print(write(cfg, args.out))


if __name__ == "__main__":
    main()
