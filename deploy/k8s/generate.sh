#!/usr/bin/env bash
# Regenerates the gateway files the envoy ConfigMap ships, from the contract.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
python="${PYTHON:-.venv/bin/python}"
export PYTHONPATH="$root:$root/gen"
"$python" -m gateway.envoy_config --preset k8s --descriptor gen/loramesh.pb --out deploy/k8s/envoy/envoy.yaml
"$python" -m gateway.openapi --descriptor gen/loramesh.pb --out deploy/k8s/envoy/openapi.json
