"""Settings: every LORAMESH_* variable read in one place, and a bad value stops a service at
start-up with a message naming the variable."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common.settings import REPO_ROOT, Settings, SettingsError


def test_defaults_and_values_from_the_environment():
    defaults = Settings.load("trainer", environ={})
    assert defaults.trainer.max_sessions == 1 and defaults.port == 50051 and defaults.device == "auto"
    assert defaults.models.tagger is None  # the tagger's built-in default model
    given = Settings.load("inference", environ={
        "LORAMESH_TRAINER_MAX_SESSIONS": "3", "LORAMESH_ALLOW_PRIVATE_URLS": "yes", "LORAMESH_INFERENCE_PORT": "6000",
        "LORAMESH_MEDIA_ROOTS": "/a:/b", "LORAMESH_PUBLIC_BASE_URL": "https://gen.example/", "LORAMESH_API_KEYS": "k1, k2",
        "LORAMESH_MODEL_FLUX": "/models/flux", "LORAMESH_SDXL_CONFIG": "/models/sdxl"})
    assert given.trainer.max_sessions == 3 and given.media.allow_private_urls is True and given.port == 6000
    assert given.media_roots == (Path("/a"), Path("/b"))
    assert given.inference.public_base_url == "https://gen.example"
    assert given.gateway.api_keys == ("k1", "k2")
    assert given.models.catalog_model("flux") == "/models/flux" and given.models.single_file_config("sdxl") == "/models/sdxl"


@pytest.mark.parametrize("name, value, allowed", [
    ("LORAMESH_TRAINER_MAX_SESSIONS", "two", "whole number"),
    ("LORAMESH_TRAINER_MAX_SESSIONS", "0", "at least 1"),
    ("LORAMESH_ALLOW_PRIVATE_URLS", "ture", "1/true/yes/on"),
    ("LORAMESH_DOWNLOAD_TIMEOUT_S", "soon", "a number"),
    ("LORAMESH_MEDIA_ROOTS", ":", "one or more folders"),
    ("LORAMESH_DEVICE", "gpu", '"auto", "cpu", "cuda"'),
    ("LORAMESH_TAGGER_PORT", "70000", "between 1 and 65535"),
    ("LORAMESH_PUBLIC_BASE_URL", "localhost:8000", "http://"),
])
def test_a_bad_value_names_the_variable_and_what_it_allows(name, value, allowed):
    with pytest.raises(SettingsError) as caught:
        Settings.load("tagger", environ={name: value})
    assert name in str(caught.value) and allowed in str(caught.value) and value in str(caught.value)


def test_a_service_started_with_a_bad_variable_fails_at_once_naming_it():
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'gen'}",
           "LORAMESH_TRAINER_MAX_SESSIONS": "two", "LORAMESH_NATS_URL": "nats://127.0.0.1:1"}
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "services.trainer"], env=env, capture_output=True, text=True,
                         timeout=60, cwd=REPO_ROOT)
    assert run.returncode != 0
    assert "LORAMESH_TRAINER_MAX_SESSIONS must be a whole number (got 'two')" in run.stderr
    assert time.monotonic() - started < 30  # before it waits for NATS
