"""The kustomize base, checked offline: every object validates against the Kubernetes
schemas, pods are hardened and probed, names and ports line up across objects, and the
generated gateway files are current and load in Envoy."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import jwt
import kubernetes_validate
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway import envoy_config, envoy_runner
from services.common import nats_auth
from services.common.settings import REPO_ROOT, SERVICE_PORTS
from services.inference import jobs as inference_jobs

BASE = REPO_ROOT / "deploy" / "k8s"
BIN_DIR = Path(sys.executable).parent
K8S_VERSION = "1.33"
WORKLOADS = ("Deployment", "StatefulSet")
RUN_AS_USER = 10001
# Provided by the operator, with the keys deploy/k8s/README.md documents.
OPERATOR_SECRETS = {"loramesh-gateway-auth": {"jwks.json", "api-keys"},
                    "loramesh-webhook": {"LORAMESH_WEBHOOK_SECRET"},
                    "loramesh-nats-users": {user.name for user in nats_auth.USERS}}
# The largest object the API server stores.
MAX_OBJECT_BYTES = 1024 * 1024


# Custom resources have no schema in kubernetes_validate: these are ours, after the CRD
# the operator installs (KEDA 2.x keda.sh_scaledobjects.yaml), as strict as the built-in
# kinds: a misspelt field fails. `behavior` is checked as the HorizontalPodAutoscaler
# KEDA makes from it (test_keda_scales_inference_on_its_work_queue).
_STRING = {"type": "string", "minLength": 1}
_COUNT = {"type": "integer", "minimum": 0}
_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
_OBJECT_META = {
    "type": "object", "required": ["name"], "additionalProperties": False,
    "properties": {
        "name": _NAME, "namespace": _NAME,
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
_TRIGGER = {
    "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
    "properties": {
        "type": _STRING, "name": _STRING, "useCachedMetrics": {"type": "boolean"},
        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
        "authenticationRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                              "properties": {"name": _STRING, "kind": {"enum": ["TriggerAuthentication",
                                                                              "ClusterTriggerAuthentication"]}}},
    },
}
SCALED_OBJECT_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": _OBJECT_META,
        "spec": {
            "type": "object", "required": ["scaleTargetRef", "triggers"], "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                   "properties": {"apiVersion": _STRING, "kind": _STRING, "name": _NAME,
                                                  "envSourceContainerName": _STRING}},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": _COUNT, "initialCooldownPeriod": _COUNT, "idleReplicaCount": _COUNT,
                "minReplicaCount": _COUNT, "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {"type": "object", "required": ["failureThreshold", "replicas"],
                             "additionalProperties": False,
                             "properties": {"failureThreshold": _COUNT, "replicas": _COUNT,
                                            "behavior": {"enum": ["static", "currentReplicas",
                                                                  "currentReplicasIfHigher",
                                                                  "currentReplicasIfLower"]}}},
                "advanced": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False,
                                                          "properties": {"name": _NAME, "behavior": {"type": "object"}}},
                        "scalingModifiers": {"type": "object", "required": ["formula", "target"],
                                             "additionalProperties": False,
                                             "properties": {"formula": _STRING, "target": _STRING,
                                                            "activationTarget": _STRING,
                                                            "metricType": {"enum": ["AverageValue", "Value"]}}},
                    },
                },
                "triggers": {"type": "array", "minItems": 1, "items": _TRIGGER},
            },
        },
    },
}
CUSTOM_SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT_SCHEMA}
# Metadata each KEDA trigger type reads: (required, optional) keys.
TRIGGER_METADATA = {
    "nats-jetstream": ({"natsServerMonitoringEndpoint", "account", "stream", "consumer", "lagThreshold"},
                       {"activationLagThreshold", "useHttps"}),
}


def validate(obj: dict) -> None:
    """Kubernetes' own schema for built-in kinds, ours for custom resources; raises
    kubernetes_validate.ValidationError or jsonschema.ValidationError."""
    schema = CUSTOM_SCHEMAS.get((obj.get("apiVersion"), obj.get("kind")))
    if schema is None:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        return
    jsonschema.Draft7Validator(schema).validate(obj)
    for trigger in obj["spec"]["triggers"] if obj["kind"] == "ScaledObject" else []:
        if trigger["type"] not in TRIGGER_METADATA:
            raise jsonschema.ValidationError(f"unknown trigger type {trigger['type']!r}")
        required, optional = TRIGGER_METADATA[trigger["type"]]
        keys = set(trigger["metadata"])
        if not required <= keys or not keys <= required | optional:
            raise jsonschema.ValidationError(
                f"{trigger['type']} metadata: missing {sorted(required - keys)}, unknown {sorted(keys - required - optional)}"
            )


def load_kustomization(folder: Path) -> tuple[list[dict], dict]:
    """The objects a kustomization produces (generated ConfigMaps included, without the
    name hash kustomize appends and rewrites references to) and its `images` entries."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    objects, images = [], {image["name"]: image for image in spec.get("images", [])}
    for resource in spec.get("resources", []):
        path = folder / resource
        if path.is_dir():
            nested_objects, nested_images = load_kustomization(path)
            objects += nested_objects
            images |= nested_images
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for generator in spec.get("configMapGenerator", []):
        files = {Path(file).name: folder / file for file in generator.get("files", [])}
        for path in files.values():
            assert path.is_file(), f"{path} is missing (deploy/k8s/generate.sh writes the gateway files)"
        data = {key: path.read_text() for key, path in files.items()}
        for env_file in generator.get("envs", []):
            lines = (folder / env_file).read_text().splitlines()
            data |= dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]},
                        "data": data})
    return objects, images


OBJECTS, IMAGES = load_kustomization(BASE)


def named(kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in OBJECTS if o["kind"] == kind}


def pod_templates() -> dict[str, dict]:
    return {o["metadata"]["name"]: o["spec"]["template"] for o in OBJECTS if o["kind"] in WORKLOADS}


def container(workload: str) -> dict:
    return pod_templates()[workload]["spec"]["containers"][0]


def grpc_services() -> dict[str, int]:
    """The contract's services this base deploys, with their gRPC ports."""
    return {name: port for name, port in SERVICE_PORTS.items() if name in named("Deployment")}


def references(spec: dict):
    """(kind, name, keys) of every ConfigMap, Secret and claim a pod spec uses; keys is
    the set of keys it picks, or None for all of them."""
    for volume in spec.get("volumes", []):
        for source in volume.get("projected", {}).get("sources", [volume]):
            if "configMap" in source:
                yield "ConfigMap", source["configMap"]["name"], _keys(source["configMap"])
            if "secret" in source:
                secret = source["secret"]
                yield "Secret", secret.get("secretName") or secret["name"], _keys(secret)
            if "persistentVolumeClaim" in source:
                yield "PersistentVolumeClaim", source["persistentVolumeClaim"]["claimName"], None
    for c in spec["containers"]:
        for source in c.get("envFrom", []):
            for ref, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                if ref in source:
                    yield kind, source[ref]["name"], None
        for env in c.get("env", []):
            for ref, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                if ref in env.get("valueFrom", {}):
                    yield kind, env["valueFrom"][ref]["name"], {env["valueFrom"][ref]["key"]}


def _keys(source: dict) -> set[str] | None:
    return {item["key"] for item in source["items"]} if "items" in source else None


@pytest.mark.parametrize("obj", OBJECTS, ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_every_object_validates_and_fits(obj):
    validate(obj)
    assert len(json.dumps(obj)) < MAX_OBJECT_BYTES


def test_validation_catches_a_misspelt_field():
    broken = yaml.safe_load(yaml.safe_dump(named("Deployment")["tagger"]))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {"grpc": {"port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def _scaled_object() -> dict:
    return yaml.safe_load(yaml.safe_dump(named("ScaledObject")["inference"]))


@pytest.mark.parametrize("break_it", [
    lambda so: so["spec"].update(minReplicas=1),
    lambda so: so["spec"]["scaleTargetRef"].pop("name"),
    lambda so: so["spec"].update(triggers=[]),
    lambda so: so["spec"]["triggers"][0]["metadata"].update(lagthreshold="1"),
    lambda so: so["spec"]["triggers"][0]["metadata"].pop("consumer"),
    lambda so: so["spec"]["triggers"][0]["metadata"].update(lagThreshold=1),
    lambda so: so["spec"]["triggers"][0].update(type="nats-jetstreams"),
], ids=["misspelt-field", "no-target", "no-trigger", "misspelt-key", "missing-key", "number-not-string", "unknown-type"])
def test_scaled_object_validation_catches_mistakes(break_it):
    broken = _scaled_object()
    break_it(broken)
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def test_keda_scales_inference_on_its_work_queue():
    scaled = named("ScaledObject")["inference"]["spec"]
    target = scaled["scaleTargetRef"]
    assert (target.get("apiVersion", "apps/v1"), target.get("kind", "Deployment")) == ("apps/v1", "Deployment")
    assert target["name"] in named("Deployment")
    assert container(target["name"])["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]

    (trigger,) = scaled["triggers"]
    metadata = trigger["metadata"]
    assert trigger["type"] == "nats-jetstream"
    namespace = yaml.safe_load((BASE / "kustomization.yaml").read_text())["namespace"]
    monitor = next(p["port"] for p in named("Service")["nats"]["spec"]["ports"] if p["name"] == "monitor")
    assert metadata["natsServerMonitoringEndpoint"] == f"nats.{namespace}.svc.cluster.local:{monitor}"
    assert "accounts" not in (BASE / "nats" / "nats.conf").read_text(), "only the global account ($G) exists"
    assert metadata["account"] == "$G"
    assert (metadata["stream"], metadata["consumer"]) == (inference_jobs.QUEUE_STREAM, inference_jobs.QUEUE_CONSUMER)
    assert metadata["lagThreshold"] == "1", "one job per GPU worker"

    # The HorizontalPodAutoscaler KEDA creates from it is a valid one.
    hpa = {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "keda-hpa-inference"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target["name"]},
            "minReplicas": scaled["minReplicaCount"], "maxReplicas": scaled["maxReplicaCount"],
            "metrics": [{"type": "External", "external": {
                "metric": {"name": "s0-nats-jetstream-INFERENCE_JOBS"},
                "target": {"type": "AverageValue", "averageValue": metadata["lagThreshold"]}}}],
            "behavior": scaled.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior", {}),
        },
    }
    kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)


def test_inference_pods_share_one_writable_outputs_volume():
    spec = pod_templates()["inference"]["spec"]
    c = container("inference")
    env = {e["name"]: e.get("value") for e in c["env"]}
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == env["LORAMESH_OUTPUT_DIR"])
    assert not mount.get("readOnly", False)
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    claim = named("PersistentVolumeClaim")[volume["persistentVolumeClaim"]["claimName"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "every replica writes, any replica serves /output"
    assert spec["securityContext"]["fsGroup"] == RUN_AS_USER
    models = next(m for m in c["volumeMounts"] if m["name"] == "models")
    assert models["readOnly"] is True and env["LORAMESH_INFERENCE_MODELS_DIR"].startswith(models["mountPath"] + "/")
    # Rollouts replace pods without asking for an extra GPU.
    assert named("Deployment")["inference"]["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


@pytest.mark.parametrize(("name", "template"), pod_templates().items(), ids=list(pod_templates()))
def test_pods_are_hardened_with_resources_and_probes(name, template):
    spec = template["spec"]
    assert spec["automountServiceAccountToken"] is False
    pod_security = spec["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == RUN_AS_USER
    assert pod_security["seccompProfile"]["type"] == "RuntimeDefault"
    scratch = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
    for c in spec["containers"]:
        security = c["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
        assert any(m["mountPath"] == "/tmp" and m["name"] in scratch for m in c["volumeMounts"]), \
            f"{name}: a read-only root needs a writable /tmp"
        assert {"cpu", "memory"} <= c["resources"]["requests"].keys()
        assert "memory" in c["resources"]["limits"]
        assert c["readinessProbe"] and c["livenessProbe"]
    assert template["metadata"]["labels"]["app.kubernetes.io/name"] == name


def test_images_are_the_project_image_or_pinned():
    for name, template in pod_templates().items():
        for c in template["spec"]["containers"]:
            image = c["image"]
            if image in IMAGES:
                continue  # the kustomization's `images` entry sets registry and tag
            repository, _, tag = image.rpartition(":")
            assert repository and tag not in {"", "latest"}, f"{name}: pin a version of {image}"


@pytest.mark.parametrize("service", grpc_services())
def test_grpc_services_get_a_gpu_grpc_probes_and_a_headless_service(service):
    port = SERVICE_PORTS[service]
    c = container(service)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["readinessProbe"]["grpc"]["port"] == port
    assert c["livenessProbe"]["grpc"]["port"] == port
    assert {"name": "grpc", "containerPort": port} in c["ports"]
    svc = named("Service")[service]
    assert svc["spec"]["clusterIP"] == "None", "headless, so Envoy spreads HTTP/2 connections over pods"
    assert svc["spec"]["ports"] == [{"name": "grpc", "port": port, "targetPort": "grpc", "appProtocol": "grpc"}]


@pytest.mark.parametrize("service", grpc_services())
def test_grpc_services_have_time_to_drain(service):
    spec = pod_templates()[service]["spec"]
    c = container(service)
    settings = {}
    for source in c["envFrom"]:
        settings |= named("ConfigMap")[source["configMapRef"]["name"]]["data"]
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(settings["LORAMESH_SHUTDOWN_GRACE_S"])
    assert spec["terminationGracePeriodSeconds"] > pre_stop + drain


def test_services_select_pods_and_target_their_ports():
    templates = pod_templates()
    for name, service in named("Service").items():
        selector = service["spec"]["selector"]
        matches = [t for t in templates.values() if selector.items() <= t["metadata"]["labels"].items()]
        assert matches, f"Service {name} selects no pod"
        ports = {p["name"] for t in matches for c in t["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service {name} targets a missing port {port['targetPort']}"


def test_statefulsets_are_governed_by_a_headless_service():
    for statefulset in named("StatefulSet").values():
        assert named("Service")[statefulset["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"


def test_referenced_configmaps_secrets_and_claims_exist():
    claims = set(named("PersistentVolumeClaim"))
    config_maps = named("ConfigMap")
    readme = (BASE / "README.md").read_text()
    for workload, template in pod_templates().items():
        for kind, name, keys in references(template["spec"]):
            if kind == "PersistentVolumeClaim":
                assert name in claims, f"{workload}: no claim {name}"
            elif kind == "ConfigMap":
                assert name in config_maps, f"{workload}: no ConfigMap {name}"
                assert keys is None or keys <= config_maps[name]["data"].keys()
            else:
                assert name in OPERATOR_SECRETS, f"{workload}: Secret {name} is neither in the base nor documented"
                assert keys is not None and keys <= OPERATOR_SECRETS[name]
    for secret, keys in OPERATOR_SECRETS.items():
        assert secret in readme and all(key in readme for key in keys), "document the Secret in deploy/k8s/README.md"


def nats_pod_environment() -> dict[str, str]:
    """What the NATS pod's environment holds, with stand-in values for Secrets and fields."""
    return {e["name"]: e.get("value", "stand-in") for e in container("nats")["env"]}


def test_nats_config_loads_and_matches_the_pod():
    conf = BASE / "nats" / "nats.conf"
    env = {**os.environ, **nats_pod_environment()}
    result = subprocess.run([BIN_DIR / "nats-server", "--config", conf, "-t"], capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr
    # Every password the config reads is in the pod's environment, from the users' Secret.
    wanted = set(re.findall(r"password: \$(\w+)", conf.read_text()))
    assert wanted == {nats_auth.password_variable(user.name) for user in nats_auth.USERS}
    assert wanted <= nats_pod_environment().keys()
    assert re.search(r"^server_name: \$POD_NAME$", conf.read_text(), re.M) and "POD_NAME" in nats_pod_environment()
    ports = {p["name"]: p["containerPort"] for p in container("nats")["ports"]}
    assert re.search(rf"^port: {ports['client']}$", conf.read_text(), re.M)
    assert re.search(rf"^http_port: {ports['monitor']}$", conf.read_text(), re.M)
    assert re.search(r"^\s*store_dir: /data$", conf.read_text(), re.M)
    assert {"name": "data", "mountPath": "/data"} in container("nats")["volumeMounts"]


def envoy_bootstrap() -> dict:
    return yaml.safe_load(named("ConfigMap")["envoy-config"]["data"]["envoy.yaml"])


def test_envoy_listens_on_the_pod_ports_and_reaches_services_on_their_ports():
    bootstrap = envoy_bootstrap()["static_resources"]
    listened = {
        address["socket_address"]["port_value"]
        for listener in bootstrap["listeners"]
        for address in [listener["address"], *(a["address"] for a in listener.get("additional_addresses", []))]
    }
    assert listened == {p["containerPort"] for p in container("envoy")["ports"]}

    services = {name: {p["port"] for p in s["spec"]["ports"]} for name, s in named("Service").items()}
    reached = set()
    for cluster in bootstrap["clusters"]:
        for group in cluster["load_assignment"]["endpoints"]:
            for endpoint in group["lb_endpoints"]:
                address = endpoint["endpoint"]["address"]["socket_address"]
                host, port = address["address"], address["port_value"]
                if host in services:
                    assert port in services[host], f"Envoy reaches {host} on {port}, its Service has {services[host]}"
                    reached.add(host)
                elif cluster["name"] == envoy_config.ADMIN_CLUSTER:  # /metrics from its own loopback admin
                    assert (host, port) == ("127.0.0.1", envoy_bootstrap()["admin"]["address"]["socket_address"]
                                            ["port_value"])
                else:
                    assert host in SERVICE_PORTS, f"Envoy reaches {host}, which is no Service of the base"
    assert reached >= set(grpc_services()) | {"events-bridge"}


def test_envoy_finds_every_file_it_reads_in_its_mounts():
    volumes = {v["name"]: v for v in pod_templates()["envoy"]["spec"]["volumes"]}
    mounted = set()
    for mount in container("envoy")["volumeMounts"]:
        for source in volumes[mount["name"]].get("projected", {}).get("sources", []):
            kind, ref = ("ConfigMap", source["configMap"]) if "configMap" in source else ("Secret", source["secret"])
            paths = [item["path"] for item in ref["items"]] if "items" in ref else named(kind)[ref["name"]]["data"]
            mounted |= {f"{mount['mountPath']}/{path}" for path in paths}
    text = named("ConfigMap")["envoy-config"]["data"]["envoy.yaml"]
    read = set(re.findall(r"/etc/envoy/[\w./-]+", text))
    assert {"/etc/envoy/openapi.json", "/etc/envoy/auth/jwks.json", "/etc/envoy/auth/api-keys"} <= read
    assert read <= mounted, f"not mounted: {read - mounted}"


def _jwks() -> str:
    public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    return json.dumps({"keys": [json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))]})


def test_gateway_files_are_current_and_load_in_envoy(tmp_path):
    fresh = tmp_path / "fresh"
    env = {**os.environ, "PY": sys.executable}
    result = subprocess.run(["bash", BASE / "generate.sh", fresh], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for file, shipped in (("envoy.yaml", "envoy/envoy.yaml"), ("openapi.json", "envoy/openapi.json"),
                          ("nats.conf", "nats/nats.conf"), ("nats-tls.conf", "components/nats-tls/nats.conf")):
        assert (fresh / file).read_text() == (BASE / shipped).read_text(), f"{shipped} is stale: run `make k8s`"

    # The pod's /etc/envoy, laid out locally: the shipped files and an operator's Secret.
    etc = tmp_path / "etc"
    (etc / "auth").mkdir(parents=True)
    (etc / "openapi.json").write_text((BASE / "envoy" / "openapi.json").read_text())
    (etc / "auth" / "jwks.json").write_text(_jwks())
    (etc / "auth" / "api-keys").write_text("a-key\n")
    local = tmp_path / "envoy.yaml"
    local.write_text((BASE / "envoy" / "envoy.yaml").read_text().replace("/etc/envoy/", f"{etc}/"))
    result = envoy_runner.validate(local)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
