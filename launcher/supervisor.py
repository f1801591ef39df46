"""Restarts the mesh's processes when they exit: the inference service exits with 70 after
an unrecoverable CUDA error so that it gets a fresh one, and any service may crash.

One watcher thread per process. A process that exits is started again with the same
command, env and log file after a backoff that doubles on each restart and starts over
once the process has been healthy for a while."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launcher.mesh import Mesh

FIRST_DELAY_S = 0.5
MAX_DELAY_S = 10.0
# A process healthy this long is counted as recovered: its next exit waits FIRST_DELAY_S again.
HEALTHY_RESET_S = 60.0
# How long a restarted process may take to report healthy before it is restarted once more.
HEALTH_TIMEOUT_S = 120.0
POLL_S = 0.2


def backoff(restart: int, first: float = FIRST_DELAY_S, most: float = MAX_DELAY_S) -> float:
    """Seconds to wait before restart number `restart` (1, 2, ...): first, doubling, capped at most."""
    return min(most, first * 2 ** (restart - 1))


class Supervisor:
    def __init__(self, mesh: Mesh, report: Callable[[str], None] = print,
                 healthy_reset_s: float = HEALTHY_RESET_S, health_timeout_s: float = HEALTH_TIMEOUT_S):
        self.mesh = mesh
        self.report = report
        self.healthy_reset_s = healthy_reset_s
        self.health_timeout_s = health_timeout_s
        self.restarts: dict[str, int] = {}
        self._stopping = threading.Event()
        # Held while a process is being spawned, so that stop() never races a restart.
        self._spawning = threading.Lock()
        self._threads = [threading.Thread(target=self._watch, args=(name,), name=f"supervise-{name}", daemon=True)
                         for name in mesh.procs]

    def start(self) -> Supervisor:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Returns once no restart can start any more; the mesh then stops what runs."""
        self._stopping.set()
        with self._spawning:
            pass
        for thread in self._threads:
            thread.join(timeout=5)

    def _watch(self, name: str) -> None:
        restarts = 0
        healthy_at: float | None = time.monotonic()  # the mesh was healthy when supervision began
        while not self._stopping.is_set():
            proc = self.mesh.procs.get(name)
            # A process the user stopped on purpose (Mesh.stop_service) is left alone.
            if proc is None or name in self.mesh.held or proc.poll() is None:
                self._stopping.wait(POLL_S)
                continue
            if healthy_at is not None and time.monotonic() - healthy_at >= self.healthy_reset_s:
                restarts = 0
            restarts += 1
            delay = backoff(restarts)
            self.report(f"{name} exited with {proc.returncode}; restarting in {delay:g} s (restart {restarts})")
            if self._stopping.wait(delay):
                return
            with self._spawning:
                if self._stopping.is_set() or name in self.mesh.held:
                    continue
                self.mesh.respawn(name)
            healthy_at = None
            if self._wait_healthy(name):
                healthy_at = time.monotonic()
                self.restarts[name] = self.restarts.get(name, 0) + 1
                self.report(f"{name} is back (pid {self.mesh.procs[name].pid})")
            elif not self._stopping.is_set() and self.mesh.procs[name].poll() is None:
                # Started but never healthy: kill it, and the next pass restarts it again.
                self.report(f"{name} did not become healthy in {self.health_timeout_s:g} s; killing it")
                self.mesh.procs[name].kill()
                self.mesh.procs[name].wait()

    def _wait_healthy(self, name: str) -> bool:
        deadline = time.monotonic() + self.health_timeout_s
        proc = self.mesh.procs[name]
        while not self._stopping.is_set() and time.monotonic() < deadline and proc.poll() is None:
            if self.mesh.healthy(name):
                return True
            self._stopping.wait(POLL_S)
        return False
