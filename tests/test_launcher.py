"""The launcher's supervisor: a killed process comes back, a stopped one stays stopped."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from launcher.mesh import Mesh, Ports, port_open
from launcher.supervisor import backoff
from tests.conftest import wait_for
from tinymodels import wd14 as tiny_wd14


def test_backoff_doubles_from_half_a_second_up_to_ten():
    assert [backoff(n) for n in range(1, 8)] == [0.5, 1, 2, 4, 8, 10, 10]


@pytest.fixture(scope="module")
def small_mesh(tmp_path_factory):
    """NATS, the tagger, the events bridge and Envoy, on their own ports and folders."""
    root = tmp_path_factory.mktemp("launcher")
    tiny_wd14.build_wd14(root / "models" / "wd14")
    env = {"LORAMESH_MODEL_ROOTS": str(root / "models"), "LORAMESH_TAGGER_MODEL": str(root / "models" / "wd14"),
           "LORAMESH_MEDIA_ROOTS": str(root), "LORAMESH_SHUTDOWN_GRACE_S": "2", "HF_HUB_OFFLINE": "1"}
    mesh = Mesh(Ports.free(), var_dir=root / "var", env=env, services=("tagger",))
    mesh.start(timeout=120)
    yield mesh
    mesh.stop()


def tag_free(mesh: Mesh) -> httpx.Response:
    return httpx.get(mesh.rest_url + "/tag/free", timeout=5)


def test_killed_tagger_is_restarted_and_nothing_after_stop(small_mesh):
    mesh = small_mesh
    lines: list[str] = []
    mesh.supervise(report=lines.append)
    assert tag_free(mesh).status_code == 200

    old_pid = mesh.procs["tagger"].pid
    os.kill(old_pid, signal.SIGKILL)
    killed_at = time.monotonic()

    def answers() -> bool:
        try:
            return tag_free(mesh).status_code == 200 and mesh.procs["tagger"].pid != old_pid
        except httpx.HTTPError:
            return False

    assert wait_for(answers, 10), lines
    assert time.monotonic() - killed_at < 10
    assert "tagger exited with -9; restarting in 0.5 s (restart 1)" in lines
    assert mesh.procs["tagger"].pid != old_pid
    # The supervisor counts the restart once its own health check passes, which may be a
    # moment after the gateway first reaches the new process.
    assert wait_for(lambda: mesh.supervisor.restarts == {"tagger": 1}, 10), (mesh.supervisor.restarts, lines)

    # A service stopped on purpose stays stopped until it is started again.
    mesh.stop_service("tagger")
    time.sleep(1.5)
    assert mesh.procs["tagger"].poll() is not None
    assert not any(line.startswith("tagger exited with 0") for line in lines), lines
    mesh.start_service("tagger")
    assert tag_free(mesh).status_code == 200

    # Killed again, and the mesh stopped while the restart waits out its backoff: after
    # stop nothing comes back and no process is left.
    os.kill(mesh.procs["tagger"].pid, signal.SIGKILL)
    assert wait_for(lambda: "restarting" in lines[-1] and "(restart 2)" in lines[-1], 5), lines
    procs = dict(mesh.procs)
    mesh.stop()
    count = len(lines)
    time.sleep(2)
    assert len(lines) == count, lines[count:]
    assert mesh.procs == {}
    for name, proc in procs.items():
        assert proc.poll() is not None, name
        with pytest.raises(ProcessLookupError):
            os.kill(proc.pid, 0)
    ports = [mesh.ports.nats, mesh.ports.bridge, mesh.ports.admin, mesh.ports.services["tagger"], *mesh.ports.rest]
    assert not any(port_open(port) for port in ports)
