#!/usr/bin/env bash
# Regenerates the gateway files the envoy ConfigMap ships (envoy.yaml, openapi.json) from
# the descriptor set that `make protos` builds. Usage: generate.sh [OUT_DIR]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="$(realpath -m "${1:-$root/deploy/k8s/envoy}")"
python="${PY:-$root/.venv/bin/python}"  # the Makefile's PY: the virtualenv's Python
cd "$root"
export PYTHONPATH="$root:$root/gen"
"$python" -m gateway.envoy_config --preset k8s --descriptor gen/loramesh.pb --out "$out/envoy.yaml" >/dev/null
"$python" -m gateway.openapi --descriptor gen/loramesh.pb --out "$out/openapi.json" >/dev/null
echo "wrote $out/envoy.yaml and $out/openapi.json"
