"""The first command `make run` prints for each service works as pasted into a shell: the
paths are the clone's own (here, the test mesh's media folder) and every one answers."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from launcher.mesh import BIN_DIR, first_commands, write_demo_session
from tests.conftest import write_image

CLI = BIN_DIR / "loramesh"


@pytest.fixture(scope="module")
def printed(mesh, media_dir, tmp_path_factory) -> dict[str, str]:
    demo = media_dir / "first-commands"
    write_image(demo / "cat.png", size=(96, 96), seed=4)
    config = write_demo_session(tmp_path_factory.mktemp("demo") / "demo-session.json", demo, Path("model.safetensors"))
    text = first_commands(mesh.ports.rest, demo, Path("unused"), CLI, config)
    return {line.split()[0]: line.split(None, 1)[1] for line in text.splitlines()}


def shell(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)


def test_there_is_one_for_each_service(printed):
    assert set(printed) == {"tagger", "captioner", "trainer", "inference", "generation", "CLI"}


@pytest.mark.parametrize("service, answer_has", [
    # The tagger answers the tags of each image under its path.
    ("tagger", "first-commands/cat.png"), ("captioner", "caption"), ("inference", "request_id"),
    ("generation", "job_id"),
])
def test_each_curl_command_answers(printed, media_dir, service, answer_has):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    done = shell(printed[service])
    assert done.returncode == 0, done.stderr
    # The generation line loads a model, then queues a job: the last line is the job's answer.
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer_has in answer or str(media_dir / answer_has) in answer, done.stdout


def test_the_cli_command_tags_the_folder(printed, media_dir):
    if not CLI.exists():
        pytest.skip(f"{CLI} is written by `make protos`")
    done = shell(printed["CLI"])
    assert done.returncode == 0, done.stderr
    assert (media_dir / "first-commands" / "cat.txt").read_text().strip()


def test_the_demo_session_config_names_the_clone_paths(tmp_path):
    config = json.loads(write_demo_session(tmp_path / "s.json", tmp_path / "media", tmp_path / "m.safetensors")
                        .read_text())
    process = config["config"]["process"][0]
    assert process["datasets"][0]["folder_path"] == str(tmp_path / "media" / "pop_tart")
    assert process["model"]["name_or_path"] == str(tmp_path / "m.safetensors")
