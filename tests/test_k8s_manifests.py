"""The kustomize base, checked offline: every object validates against the Kubernetes
schemas, pods are hardened and probed, references resolve, and the generated gateway
files are current and load in Envoy."""

from __future__ import annotations

import json
import re
import shutil

import kubernetes_validate
import pytest
import yaml

from gateway import envoy_config, envoy_runner, openapi
from services.common.settings import REPO_ROOT

BASE = REPO_ROOT / "deploy" / "k8s"
K8S_VERSION = "1.33"
WORKLOADS = ("Deployment", "StatefulSet")
GRPC_SERVICES = {"tagger": 50053}
# Provided by the operator, documented in deploy/k8s/README.md.
OPERATOR_SECRETS = {"loramesh-gateway-auth"}


def load_kustomization(folder):
    """Objects and generated ConfigMap names of a kustomization, nested folders included."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    objects, generated = [], set()
    for resource in spec.get("resources", []):
        path = folder / resource
        if path.is_dir():
            nested_objects, nested_generated = load_kustomization(path)
            objects += nested_objects
            generated |= nested_generated
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for generator in spec.get("configMapGenerator", []):
        for file in generator["files"]:
            assert (folder / file).is_file(), f"{folder / file} is missing"
        generated.add(generator["name"])
    return objects, generated


OBJECTS, GENERATED = load_kustomization(BASE)


def named(kind):
    return {o["metadata"]["name"]: o for o in OBJECTS if o["kind"] == kind}


def pod_specs():
    for workload in (o for o in OBJECTS if o["kind"] in WORKLOADS):
        yield workload["metadata"]["name"], workload["spec"]["template"]


@pytest.mark.parametrize("obj", OBJECTS, ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_every_object_validates(obj):
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize(("name", "template"), list(pod_specs()), ids=lambda v: v if isinstance(v, str) else "")
def test_pods_are_hardened_with_resources_and_probes(name, template):
    spec = template["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in spec["containers"]:
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
        assert container["readinessProbe"] and container["livenessProbe"]


@pytest.mark.parametrize(("service", "port"), GRPC_SERVICES.items())
def test_grpc_services_request_a_gpu_and_use_grpc_probes(service, port):
    container = named("Deployment")[service]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["grpc"]["port"] == port
    assert container["livenessProbe"]["grpc"]["port"] == port
    assert any(p["containerPort"] == port for p in container["ports"])
    svc = named("Service")[service]
    assert svc["spec"]["clusterIP"] == "None", "headless, so Envoy spreads HTTP/2 over pods"
    assert svc["spec"]["ports"][0]["port"] == port


def test_services_select_pods_and_ports_exist():
    templates = dict(pod_specs())
    for name, service in named("Service").items():
        selector = service["spec"]["selector"]
        matches = [t for t in templates.values() if selector.items() <= t["metadata"]["labels"].items()]
        assert matches, f"Service {name} selects no pod"
        ports = {p["name"] for t in matches for c in t["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service {name} targets a missing port {port['targetPort']}"


def test_referenced_configmaps_secrets_and_claims_exist():
    config_maps = set(named("ConfigMap")) | GENERATED
    claims = set(named("PersistentVolumeClaim"))
    for name, template in pod_specs():
        spec = template["spec"]
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, name
            if "secret" in volume:
                assert volume["secret"]["secretName"] in OPERATOR_SECRETS, name
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, name
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps, name


def test_gateway_files_are_current_and_load_in_envoy(tmp_path):
    descriptor = REPO_ROOT / "gen" / "loramesh.pb"
    fresh = tmp_path / "envoy.yaml"
    envoy_config.write(envoy_config.k8s_config(descriptor), fresh)
    shipped = BASE / "envoy" / "envoy.yaml"
    assert fresh.read_text() == shipped.read_text(), "stale: run `make k8s`"
    assert json.loads((BASE / "envoy" / "openapi.json").read_text()) == openapi.build(descriptor), \
        "stale: run `make k8s`"

    # Envoy reads the mounted files at start; point them at local copies and validate.
    etc = tmp_path / "etc"
    (etc / "auth").mkdir(parents=True)
    shutil.copy(BASE / "envoy" / "openapi.json", etc / "openapi.json")
    (etc / "auth" / "jwks.json").write_text(envoy_config._unusable_jwks())
    (etc / "auth" / "api-keys").write_text("key\n")
    local = tmp_path / "local.yaml"
    local.write_text(re.sub(r"/etc/envoy/", f"{etc}/", shipped.read_text()))
    result = envoy_runner.validate(local)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_validation_catches_a_misspelt_field():
    broken = yaml.safe_load(yaml.safe_dump(named("Deployment")["tagger"]))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {"grpc": {"port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
