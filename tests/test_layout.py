"""The structure a service image relies on: services depend only on services/common and their
own folder, the inference service does not pull in the training engine, servicers stay thin,
and only the settings module reads the environment."""

from __future__ import annotations

import ast
import subprocess
import sys

from services.common.settings import REPO_ROOT

SERVICES = REPO_ROOT / "services"


def imported_modules(path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return modules


def test_a_service_imports_only_common_and_its_own_folder():
    crossing = []
    for path in SERVICES.rglob("*.py"):
        own = path.relative_to(SERVICES).parts[0]
        for module in imported_modules(path):
            top = module.split(".")
            if top[0] in ("launcher", "tinymodels", "tests", "bench", "gateway") or (
                    top[0] == "services" and len(top) > 1 and top[1] not in ("common", own)):
                crossing.append(f"{path.relative_to(REPO_ROOT)}: {module}")
    assert crossing == []


def test_importing_the_inference_service_loads_neither_peft_nor_the_trainer():
    code = ("import sys, services.inference.wiring; "
            "print(sorted(m for m in sys.modules if m == 'peft' or m.startswith(('peft.', 'services.trainer'))))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                         env={"PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'gen'}", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_the_inference_servicer_speaks_only_protos_common_runtime_and_its_api():
    allowed_prefixes = ("loramesh.v1", "google.", "grpc", "services.common", "__future__", "datetime", "urllib")
    imports = imported_modules(SERVICES / "inference" / "servicer.py")
    service_modules = {m for m in imports if m.startswith("services.inference")}
    assert service_modules == {"services.inference.api"}
    assert all(m.startswith(allowed_prefixes) for m in imports - service_modules)


def test_no_service_module_reads_the_environment_but_settings():
    readers = [str(path.relative_to(REPO_ROOT)) for path in SERVICES.rglob("*.py")
               if path.name != "settings.py" and ("os.environ" in path.read_text() or "getenv" in path.read_text())]
    assert readers == []
