#!/usr/bin/env bash
# Regenerates the gateway files the envoy ConfigMap ships (envoy.yaml, openapi.json) from
# the descriptor set that `make protos` builds, and the NATS configs (nats/nats.conf and
# components/nats-tls/nats.conf). Usage: generate.sh [OUT_DIR] (every file in OUT_DIR
# instead, the TLS one as nats-tls.conf).
# LORAMESH_JWT_ISSUER and LORAMESH_JWT_AUDIENCES (comma-separated), when set, are written
# into the gateway's JWT check; tokens must always carry `exp`.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="$(realpath -m "${1:-$root/deploy/k8s/envoy}")"
python="${PY:-$root/.venv/bin/python}"  # the Makefile's PY: the virtualenv's Python
cd "$root"
export PYTHONPATH="$root:$root/gen"
jwt_args=()
[ -n "${LORAMESH_JWT_ISSUER:-}" ] && jwt_args+=(--jwt-issuer "$LORAMESH_JWT_ISSUER")
IFS=, read -ra audiences <<< "${LORAMESH_JWT_AUDIENCES:-}"
for audience in "${audiences[@]}"; do [ -n "$audience" ] && jwt_args+=(--jwt-audience "$audience"); done
# OTEL_EXPORTER_OTLP_ENDPOINT, when set, sends Envoy's spans to that collector (OTLP/gRPC).
trace_args=()
[ -n "${OTEL_EXPORTER_OTLP_ENDPOINT:-}" ] && trace_args+=(--otlp-endpoint "$OTEL_EXPORTER_OTLP_ENDPOINT")
"$python" -m gateway.envoy_config --preset k8s --descriptor gen/loramesh.pb --out "$out/envoy.yaml" \
  "${jwt_args[@]}" "${trace_args[@]}" >/dev/null
"$python" -m gateway.openapi --descriptor gen/loramesh.pb --out "$out/openapi.json" >/dev/null
echo "wrote $out/envoy.yaml and $out/openapi.json"
# The NATS StatefulSet's config: its three-node cluster and the per-service users and
# permissions of services/common/nats_auth.py (passwords come from the pods' environment).
nats_out="$(realpath -m "${1:-$root/deploy/k8s/nats}")"
routes=()
for i in 0 1 2; do routes+=(--route "nats://nats-$i.nats:6222"); done
"$python" -m services.common.nats_auth --out "$nats_out/nats.conf" "${routes[@]}"
# The same with TLS required of clients, for the nats-tls component (certificates in /etc/nats-tls).
tls_out="${1:+$out/nats-tls.conf}"
tls_out="${tls_out:-$root/deploy/k8s/components/nats-tls/nats.conf}"
"$python" -m services.common.nats_auth --out "$tls_out" "${routes[@]}" --tls-dir /etc/nats-tls
echo "wrote $nats_out/nats.conf and $tls_out"
