"""What `kubectl apply -k` would create, checked offline: the base and every component in
deploy/k8s/components rendered by `kubectl kustomize` (hashed ConfigMap names, patches and
replacements applied), then properties every render must keep. No local cluster (kind)
can run here (no container runtime), so these checks stand in for applying it."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.common import nats_auth
from services.common.settings import REPO_ROOT, SERVICE_PORTS
from services.inference import jobs as inference_jobs
from services.trainer import store as session_store
from services.trainer import task_store
from tests.test_k8s_manifests import validate

BASE = REPO_ROOT / "deploy" / "k8s"
COMPONENTS = sorted(p.parent.name for p in (BASE / "components").glob("*/kustomization.yaml"))
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
GPU = "nvidia.com/gpu"
# Processes that hold models on a GPU, and those that connect to NATS.
GPU_SERVICES = set(SERVICE_PORTS)
NATS_CLIENTS = {*SERVICE_PORTS, "events-bridge"}
# Secrets made outside make_secrets.py: the ingress controller's certificate (cert-manager or by hand).
OTHER_SECRETS = {"loramesh-ingress-tls"}
# Storage components set the claims' class; both at once would fight over it.
EXCLUSIVE = {"storage-rwx", "storage-per-node"}

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl renders the kustomizations")


def render(components: list[str], tmp_path: Path) -> list[dict]:
    """`kubectl kustomize` of an overlay holding the base and `components`."""
    overlay = tmp_path / "overlay"
    overlay.mkdir(exist_ok=True)
    base = os.path.relpath(BASE, overlay)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [base], "components": [f"{base}/components/{c}" for c in components]}))
    result = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


VARIANTS = {"base": [], **{c: [c] for c in COMPONENTS},
            "together": [c for c in COMPONENTS if c not in EXCLUSIVE] + ["storage-rwx"]}


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def rendered(request, tmp_path_factory) -> list[dict]:
    return render(VARIANTS[request.param], tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def made_secrets(tmp_path_factory) -> dict[str, set[str]]:
    """The Secrets and keys `make k8s-secrets` writes, by running it."""
    out = tmp_path_factory.mktemp("secrets")
    result = subprocess.run([sys.executable, BASE / "make_secrets.py", "--out", out], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return {s["metadata"]["name"]: set(s["data"]) for s in yaml.safe_load_all((out / "secrets.yaml").read_text())}


def of_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def workloads(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] in WORKLOADS}


def service_of(c: dict) -> str | None:
    """The loramesh process a container runs (`python -m services.<name>` or the bridge)."""
    command = " ".join(c.get("command", []) + c.get("args", []))
    if "gateway.events_bridge" in command:
        return "events-bridge"
    found = re.search(r"-m services\.(\w+)", command)
    return found and found.group(1)


def selects(selector: dict, labels: dict) -> bool:
    if not selector:
        return True
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        value, op = labels.get(expression["key"]), expression["operator"]
        if (op == "In" and value not in expression["values"]) or (op == "NotIn" and value in expression["values"]) \
                or (op == "Exists" and value is None) or (op == "DoesNotExist" and value is not None):
            return False
    return True


def check_prometheus_operator(obj: dict) -> None:
    """The Prometheus Operator's monitors (no schema here): what they scrape must exist."""
    spec = obj["spec"]
    endpoints = spec.get("podMetricsEndpoints") or spec.get("endpoints")
    assert obj["metadata"]["name"] and "selector" in spec and endpoints, obj["metadata"]
    assert all(e.get("port") or e.get("targetPort") for e in endpoints)


def test_every_component_renders_and_validates(rendered):
    kinds = {o["kind"] for o in rendered}
    assert {"Deployment", "StatefulSet", "Service", "NetworkPolicy", "PodDisruptionBudget"} <= kinds
    for obj in rendered:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            check_prometheus_operator(obj)
            continue
        validate(obj)
        assert obj["metadata"].get("annotations", {}).get("config.kubernetes.io/local-config") is None


def test_every_pod_runs_non_root_hardened_and_probed(rendered):
    for name, workload in workloads(rendered).items():
        spec = workload["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"].get("runAsUser", 1) != 0, name
        assert spec.get("automountServiceAccountToken") is False, name
        for c in spec["containers"] + spec.get("initContainers", []):
            security = c["securityContext"]
            assert security.get("runAsUser", 1) != 0 and security.get("privileged", False) is False, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"]["drop"] == ["ALL"] and not security["capabilities"].get("add"), name
        for c in spec["containers"]:
            assert c.get("readinessProbe") and c.get("livenessProbe"), f"{name}/{c['name']} needs probes"


def test_every_gpu_pod_requests_a_gpu_and_tolerates_gpu_nodes(rendered):
    gpu_pods = set()
    for name, workload in workloads(rendered).items():
        spec = workload["spec"]["template"]["spec"]
        for c in spec["containers"]:
            wants = service_of(c) in GPU_SERVICES
            resources = c.get("resources", {})
            asked = {k for k in ("requests", "limits") if any(r.startswith("nvidia.com/") for r in resources.get(k, {}))}
            assert asked == ({"requests", "limits"} if wants else set()), f"{name}/{c['name']}: GPU in {asked}"
            if wants:
                gpu_pods.add(name)
                assert any(t["key"] == GPU for t in spec.get("tolerations", [])), name
    assert gpu_pods == GPU_SERVICES


def test_gpu_pods_write_caches_to_scratch_and_read_models_only(rendered):
    config = {}
    for cm in of_kind(rendered, "ConfigMap").values():
        if cm["metadata"]["name"].startswith("loramesh-config"):
            config = cm["data"]
    for name, workload in workloads(rendered).items():
        spec = workload["spec"]["template"]["spec"]
        scratch = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for c in spec["containers"]:
            if service_of(c) not in GPU_SERVICES:
                continue
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            for variable in ("HF_MODULES_CACHE", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
                folder = Path(config[variable])
                mount = next(m for path, m in mounts.items() if folder.is_relative_to(path))
                assert mount["name"] in scratch and not mount.get("readOnly"), f"{name}: {variable} not writable"
            models = next(m for path, m in mounts.items() if Path(config["HF_HOME"]).is_relative_to(path))
            assert models["readOnly"] is True, f"{name}: the model files are mounted read-only"


def test_every_referenced_object_exists_or_is_made_by_make_secrets(rendered, made_secrets):
    config_maps, secrets = of_kind(rendered, "ConfigMap"), of_kind(rendered, "Secret")
    claims = set(of_kind(rendered, "PersistentVolumeClaim"))
    for name, workload in workloads(rendered).items():
        spec = workload["spec"]["template"]["spec"]
        templates = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        mounted = set()
        for c in spec["containers"]:
            mounted |= {m["name"] for m in c.get("volumeMounts", [])}
            for env in c.get("env", []):
                ref = env.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    key_ref = ref["secretKeyRef"]
                    have = secrets.get(key_ref["name"], {}).get("data") or made_secrets.get(key_ref["name"], set())
                    assert key_ref.get("optional") or key_ref["key"] in have, f"{name}: Secret {key_ref}"
                if "configMapKeyRef" in ref:
                    assert ref["configMapKeyRef"]["key"] in config_maps[ref["configMapKeyRef"]["name"]]["data"]
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config_maps, name
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets | made_secrets, name
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        assert mounted <= volumes.keys() | templates, f"{name}: mounts a missing volume"
        for volume in volumes.values():
            for source in volume.get("projected", {}).get("sources", [volume]):
                if "configMap" in source:
                    cm = config_maps[source["configMap"]["name"]]
                    assert {i["key"] for i in source["configMap"].get("items", [])} <= cm["data"].keys()
                if "secret" in source:
                    ref = source["secret"]
                    secret_name = ref.get("secretName") or ref["name"]
                    have = secrets.get(secret_name, {}).get("data") or made_secrets.get(secret_name)
                    assert have is not None, f"{name}: Secret {secret_name} is neither rendered nor made"
                    assert {i["key"] for i in ref.get("items", [])} <= set(have)
                if "persistentVolumeClaim" in source:
                    assert source["persistentVolumeClaim"]["claimName"] in claims, name
    for ingress in of_kind(rendered, "Ingress").values():
        for tls in ingress["spec"].get("tls", []):
            assert tls["secretName"] in secrets | made_secrets | dict.fromkeys(OTHER_SECRETS)


def test_config_maps_are_generated_so_edits_roll_pods(rendered):
    for name in of_kind(rendered, "ConfigMap"):
        assert re.fullmatch(r"[a-z0-9-]+-[a-z0-9]{10}", name), f"{name} is not generated (no content hash)"


def test_network_policies_cover_every_component(rendered):
    policies = list(of_kind(rendered, "NetworkPolicy").values())
    for name, workload in workloads(rendered).items():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        mine = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
        assert any(p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") for p in mine), \
            f"{name}: not under the default deny"
        assert any(p["spec"].get("ingress") for p in mine), f"{name}: nothing may reach it"
    # Every port a Service offers is open to someone in a policy of the pods behind it.
    for service in of_kind(rendered, "Service").values():
        pods = [w["spec"]["template"] for w in workloads(rendered).values()
                if selects({"matchLabels": service["spec"]["selector"]}, w["spec"]["template"]["metadata"]["labels"])]
        for port in service["spec"]["ports"]:
            for pod in pods:
                numbers = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
                target = port.get("targetPort", port["port"])
                allowed = any(
                    not rule.get("ports") or any(p["port"] in (target, numbers.get(target, target)) for p in rule["ports"])
                    for p in policies if selects(p["spec"]["podSelector"], pod["metadata"]["labels"])
                    for rule in p["spec"].get("ingress", []))
                assert allowed, f"Service {service['metadata']['name']} port {port['name']}: no policy lets anyone in"


def test_only_the_services_reach_nats_and_only_envoy_reaches_the_services(rendered):
    policies = [p["spec"] for p in of_kind(rendered, "NetworkPolicy").values()]
    templates = {n: w["spec"]["template"]["metadata"]["labels"] for n, w in workloads(rendered).items()}

    def callers(target: str, port: str) -> set[str]:
        """The workloads some policy lets reach `target` on `port` (None: anyone)."""
        found = set()
        for spec in policies:
            if not selects(spec["podSelector"], templates[target]):
                continue
            for rule in spec.get("ingress", []):
                if rule.get("ports") and port not in {p["port"] for p in rule["ports"]}:
                    continue
                if not rule.get("from"):
                    return {None}
                for peer in rule["from"]:
                    if "podSelector" in peer and "namespaceSelector" not in peer:
                        found |= {n for n, labels in templates.items() if selects(peer["podSelector"], labels)}
                    else:
                        found.add(f"namespace:{peer.get('namespaceSelector')}")
        return found

    assert callers("nats", "client") == NATS_CLIENTS
    assert callers("nats", "cluster") == {"nats"}
    for service in GPU_SERVICES:
        assert callers(service, "grpc") == {"envoy"} | ({"trainer"} if service == "captioner" else set())
    assert callers("events-bridge", "websocket") == {"envoy"}


def test_every_workload_has_a_disruption_budget_and_spreads(rendered):
    budgets = list(of_kind(rendered, "PodDisruptionBudget").values())
    for name, workload in workloads(rendered).items():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        mine = [b for b in budgets if selects(b["spec"]["selector"], labels)]
        assert len(mine) == 1, f"{name}: {len(mine)} PodDisruptionBudgets"
        budget = mine[0]["spec"]
        replicas = workload["spec"].get("replicas", 1)
        # A budget that allows no disruption at all would block every node drain.
        allowed = budget["maxUnavailable"] if "maxUnavailable" in budget else replicas - budget["minAvailable"]
        assert allowed >= 1 or replicas > 1, f"{name}: its budget blocks drains"
        spread = workload["spec"]["template"]["spec"].get("topologySpreadConstraints", [])
        assert any(s["topologyKey"] == "kubernetes.io/hostname" and selects(s["labelSelector"], labels)
                   for s in spread), f"{name}: replicas may pile up on one node"


def test_nats_is_a_three_node_cluster_and_services_keep_three_copies(rendered):
    nats = of_kind(rendered, "StatefulSet")["nats"]
    assert nats["spec"]["replicas"] == 3
    assert of_kind(rendered, "Service")["nats"]["spec"]["publishNotReadyAddresses"] is True
    conf = next(cm["data"]["nats.conf"] for n, cm in of_kind(rendered, "ConfigMap").items() if n.startswith("nats-config"))
    routes = re.search(r"routes: \[(.*)\]", conf).group(1)
    assert sorted(re.findall(r"nats://(nats-\d)\.nats:6222", routes)) == ["nats-0", "nats-1", "nats-2"]
    config = next(cm["data"] for n, cm in of_kind(rendered, "ConfigMap").items() if n.startswith("loramesh-config"))
    assert config["LORAMESH_NATS_REPLICAS"] == "3"


def test_with_tls_every_nats_client_can_check_the_servers_certificate(rendered, made_secrets):
    conf = next(cm["data"]["nats.conf"] for n, cm in of_kind(rendered, "ConfigMap").items() if n.startswith("nats-config"))
    config = next(cm["data"] for n, cm in of_kind(rendered, "ConfigMap").items() if n.startswith("loramesh-config"))
    files = re.findall(r'_file: "([^"]+)"', conf)
    if not files:
        assert "LORAMESH_NATS_TLS_CA" not in config
        return

    def mounted_files(spec: dict, c: dict) -> set[str]:
        volumes = {v["name"]: v for v in spec["volumes"]}
        found = set()
        for mount in c["volumeMounts"]:
            ref = volumes.get(mount["name"], {}).get("secret")  # (claim templates are no volumes)
            if ref:
                keys = [i["path"] for i in ref["items"]] if "items" in ref else made_secrets[ref["secretName"]]
                found |= {f"{mount['mountPath']}/{key}" for key in keys}
        return found

    nats = of_kind(rendered, "StatefulSet")["nats"]["spec"]["template"]["spec"]
    assert set(files) <= mounted_files(nats, nats["containers"][0])
    for workload in workloads(rendered).values():
        spec = workload["spec"]["template"]["spec"]
        for c in spec["containers"]:
            if service_of(c) in NATS_CLIENTS:
                assert any(s["configMapRef"]["name"].startswith("loramesh-config") for s in c["envFrom"])
                assert config["LORAMESH_NATS_TLS_CA"] in mounted_files(spec, c), workload["metadata"]["name"]


def test_every_nats_client_connects_as_its_own_user(rendered, made_secrets):
    users = {user.name for user in nats_auth.USERS}
    seen = set()
    for name, workload in workloads(rendered).items():
        for c in workload["spec"]["template"]["spec"]["containers"]:
            service = service_of(c)
            if service is None:
                continue
            env = {e["name"]: e for e in c.get("env", [])}
            user = env["LORAMESH_NATS_USER"]["value"]
            password = env["LORAMESH_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]
            assert user == service and user in users, f"{name}: connects as {user}"
            assert (password["name"], password["key"]) == ("loramesh-nats-users", user)
            assert not password.get("optional")
            seen.add(user)
    assert seen == users
    assert made_secrets["loramesh-nats-users"] == users


def test_keda_scales_the_trainer_on_every_queue_it_pulls_from(rendered):
    scaled = of_kind(rendered, "ScaledObject")
    if not scaled:
        assert {"inference", "trainer"} <= of_kind(rendered, "HorizontalPodAutoscaler").keys()
        return
    wanted = {("trainer", session_store.QUEUE_STREAM, session_store.QUEUE_CONSUMER),
              *(("trainer", task_store.QUEUE_STREAM, task_store.consumer_name(p)) for p in task_store.PRIORITIES),
              ("inference", inference_jobs.QUEUE_STREAM, inference_jobs.QUEUE_CONSUMER)}
    found = {(so["spec"]["scaleTargetRef"]["name"], t["metadata"]["stream"], t["metadata"]["consumer"])
             for so in scaled.values() for t in so["spec"]["triggers"]}
    assert found == wanted
    trainer = scaled["trainer"]["spec"]
    formula = trainer["advanced"]["scalingModifiers"]["formula"]
    assert sorted(formula.replace(" ", "").split("+")) == sorted(t["name"] for t in trainer["triggers"])


def test_secrets_made_by_make_secrets_validate_and_sign_a_usable_token(tmp_path):
    import jwt

    result = subprocess.run([sys.executable, BASE / "make_secrets.py", "--out", tmp_path, "--issuer", "https://id",
                             "--audience", "loramesh", "--api-keys", "2"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    objects = list(yaml.safe_load_all((tmp_path / "secrets.yaml").read_text()))
    for obj in objects:
        validate(obj)
    data = {o["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in o["data"].items()} for o in objects}
    jwks = jwt.PyJWKSet.from_json(data["loramesh-gateway-auth"]["jwks.json"])
    token = (tmp_path / "operator-token.txt").read_text().strip()
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, jwks[header["kid"]].key, algorithms=["RS256"], audience="loramesh", issuer="https://id")
    assert claims["sub"] == "operator" and claims["exp"] > claims["iat"]
    keys = data["loramesh-gateway-auth"]["api-keys"].split()
    assert len(set(keys)) == 2 and keys == (tmp_path / "api-keys").read_text().split()
    passwords = data["loramesh-nats-users"]
    assert len(set(passwords.values())) == len(passwords)
    # nats-server parses them from its environment: letters and digits, a letter first.
    assert all(re.fullmatch(r"[A-Za-z][A-Za-z0-9]{31,}", p) for p in passwords.values())
    assert set(data["loramesh-nats-tls"]) == {"tls.crt", "tls.key", "ca.crt"}
    assert all(oct(p.stat().st_mode)[-3:] == "600" for p in tmp_path.iterdir())
    # It refuses to overwrite secrets already made (a silent rotation would lock pods out).
    again = subprocess.run([sys.executable, BASE / "make_secrets.py", "--out", tmp_path], capture_output=True, text=True)
    assert again.returncode != 0 and "--force" in again.stderr
    assert yaml.safe_load_all((tmp_path / "secrets.yaml").read_text()) and \
        (tmp_path / "operator-token.txt").read_text().strip() == token
