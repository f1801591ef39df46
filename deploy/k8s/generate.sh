#!/usr/bin/env bash
# Regenerates the gateway files the envoy ConfigMap ships (envoy.yaml, openapi.json) from
# the descriptor set that `make protos` builds. Usage: generate.sh [OUT_DIR]
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
"$python" -m gateway.envoy_config --preset k8s --descriptor gen/loramesh.pb --out "$out/envoy.yaml" \
  "${jwt_args[@]}" >/dev/null
"$python" -m gateway.openapi --descriptor gen/loramesh.pb --out "$out/openapi.json" >/dev/null
echo "wrote $out/envoy.yaml and $out/openapi.json"
