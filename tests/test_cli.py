"""The `loramesh` command line, run as a user runs it (its own process) against the real
mesh: tags and captions written beside the images equal the services' answers, `train`
follows a grant to its checkpoint with a progress bar (in a tmux pane), `generate` saves an
image of the asked size, and bad input ends with one clear line and a non-zero exit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image

from services.common.settings import REPO_ROOT
from tests.conftest import write_image
from tests.test_trainer_sessions import payload

GEN_DIR = REPO_ROOT / "gen"


def cli_env(mesh) -> dict[str, str]:
    env = {**os.environ, "LORAMESH_URL": mesh.rest_url, "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(GEN_DIR)])}
    for name in ("LORAMESH_TOKEN", "LORAMESH_API_KEY"):
        env.pop(name, None)
    return env


def loramesh(mesh, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loramesh.cli", *args], env=cli_env(mesh), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def kohya(tags: dict[str, float]) -> str:
    return ", ".join(name for name, _ in sorted(tags.items(), key=lambda item: (-item[1], item[0])))


@pytest.fixture
def rest(mesh):
    with httpx.Client(base_url=mesh.rest_url, timeout=120) as rest:
        yield rest


@pytest.fixture
def dataset(media_dir, request) -> Path:
    folder = media_dir / "cli" / request.node.name.replace("[", "-").replace("]", "")
    shutil.rmtree(folder, ignore_errors=True)
    for seed in range(3):
        write_image(folder / f"picture-{seed}.png", (96, 80), seed=10 + seed)
    return folder


def test_tag_writes_txt_files_equal_to_the_tag_answer(mesh, rest, dataset):
    images = sorted(dataset.glob("*.png"))
    kept = images[0].with_suffix(".txt")
    kept.write_text("hand-written caption\n")
    answer = rest.post("/tag", json={"input": [{"media_path": str(p), "general_threshold": 0.05} for p in images]})
    assert answer.status_code == 200, answer.text
    expected = {Path(path): kohya(result["tags"]) for path, result in answer.json().items()}
    assert all(expected.values())

    run = loramesh(mesh, "tag", str(dataset), "--threshold", "0.05", "--write-txt", "--batch-size", "2")
    assert run.returncode == 0, run.stderr
    assert kept.read_text() == "hand-written caption\n"  # never overwritten without --overwrite
    assert "kept 1 existing" in run.stderr
    for image in images[1:]:
        assert image.with_suffix(".txt").read_text() == expected[image] + "\n"

    run = loramesh(mesh, "--json", "tag", *map(str, images), "--threshold", "0.05", "--write-txt", "--overwrite")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == answer.json()
    for image in images:
        assert image.with_suffix(".txt").read_text() == expected[image] + "\n"


def test_caption_writes_txt_files_equal_to_the_caption_answer(mesh, rest, dataset):
    images = sorted(dataset.glob("*.png"))
    answer = rest.post("/caption/batch", json={"image_paths": [str(p) for p in images], "batch_size": 8,
                                               "options": {"model_type": "florence2", "max_new_tokens": 12}})
    assert answer.status_code == 200, answer.text
    expected = {Path(c["source"]): c["caption"] for c in answer.json()["captions"]}

    run = loramesh(mesh, "caption", str(dataset), "--model", "florence2", "--max-new-tokens", "12", "--write-txt")
    assert run.returncode == 0, run.stderr
    for image in images:
        assert image.with_suffix(".txt").read_text() == expected[image] + "\n"
    assert "wrote 3 .txt file(s)" in run.stderr


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def readme_demo_config(name: str, training_folder: Path, dataset: Path, model: Path) -> str:
    """The demo config of the README's "Client and CLI" section, with this mesh's paths."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## Client and CLI"):]
    config = section[section.index("cat > demo.yaml <<EOF\n") + 22:section.index("\nEOF\n")]
    for placeholder, path in (("$REPO/var/media/output", training_folder), ("$REPO/var/media/pop_tart", dataset),
                              ("$REPO/var/models/sdxl-tiny.safetensors", model)):
        assert placeholder in config
        config = config.replace(placeholder, str(path))
    return config.replace("name: demo", f"name: {name}")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_train_follows_a_grant_to_its_checkpoint_with_a_progress_bar(mesh, rest, media_dir, dataset_dir, models_dir,
                                                                     tmp_path):
    name = f"cli-train-{uuid.uuid4().hex[:6]}"
    training_folder = media_dir / "output" / name
    config_file = tmp_path / "demo.yaml"
    config_file.write_text(readme_demo_config(name, training_folder, dataset_dir, models_dir / "tiny-sdxl.safetensors"))
    env = cli_env(mesh)
    command = (f"cd {REPO_ROOT} && env LORAMESH_URL={mesh.rest_url} PYTHONPATH={env['PYTHONPATH']} "
               f"{sys.executable} -m loramesh.cli train {config_file} --steps 20; echo EXIT=$?; sleep 600")
    tmux("new-session", "-d", "-s", name, "-x", "100", "-y", "30", command)
    try:
        deadline = time.monotonic() + 240
        while "EXIT=" not in (pane := tmux("capture-pane", "-p", "-J", "-t", name)) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
        rest.delete(f"/sessions/{name}")
    assert "EXIT=0" in pane, pane
    bar = next(line for line in pane.splitlines() if line.startswith("training "))
    assert "20/20" in bar and "loss" in bar and "it/s" in bar, pane
    checkpoint = training_folder / name / f"{name}_000000020.safetensors"
    assert f"checkpoint: {checkpoint} (step 20, state waiting)" in pane, pane
    assert checkpoint.exists()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_ctrl_c_while_following_can_abort_with_a_checkpoint(mesh, rest, media_dir, dataset_dir, models_dir, tmp_path):
    name = f"cli-abort-{uuid.uuid4().hex[:6]}"
    training_folder = media_dir / "output" / name
    config_file = tmp_path / "demo.yaml"
    config_file.write_text(readme_demo_config(name, training_folder, dataset_dir, models_dir / "tiny-sdxl.safetensors"))
    env = cli_env(mesh)
    command = (f"cd {REPO_ROOT} && env LORAMESH_URL={mesh.rest_url} PYTHONPATH={env['PYTHONPATH']} "
               f"{sys.executable} -m loramesh.cli train {config_file} --steps 100; echo EXIT=$?; sleep 600")
    tmux("new-session", "-d", "-s", name, "-x", "100", "-y", "30", command)

    def pane_shows(text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while text not in (pane := tmux("capture-pane", "-p", "-J", "-t", name)) and time.monotonic() < deadline:
            time.sleep(0.3)
        return pane

    try:
        assert "loss" in pane_shows("loss", 180)  # training, and the bar is up
        tmux("send-keys", "-t", name, "C-c")
        assert "[abort/detach]" in pane_shows("[abort/detach]", 30)
        tmux("send-keys", "-t", name, "abort", "Enter")
        pane = pane_shows("EXIT=", 180)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
    session = rest.get(f"/sessions/{name}").json()
    rest.delete(f"/sessions/{name}")
    assert "EXIT=0" in pane and "Traceback" not in pane, pane
    assert session["state"] == "aborted" and 0 < session["last_checkpoint_step"] < 100
    assert f"checkpoint: {session['last_checkpoint_path']} (step {session['last_checkpoint_step']}, state aborted)" \
        in pane, pane
    assert Path(session["last_checkpoint_path"]).exists()


def test_generate_saves_an_image_of_the_asked_size(mesh, tmp_path):
    run = loramesh(mesh, "generate", "a pop tart", "--model", "sdxl", "--width", "64", "--height", "96",
                   "--steps", "3", "--seed", "5", "--out", str(tmp_path / "v1"))
    assert run.returncode == 0, run.stderr
    saved = list((tmp_path / "v1").iterdir())
    assert len(saved) == 1 and f"saved {saved[0]}" in run.stdout
    assert Image.open(saved[0]).size == (64, 96)

    # A checkpoint of the generation server's models root, loaded first.
    run = loramesh(mesh, "--json", "generate", "a lovely cat", "--model", "tiny-sdxl.safetensors", "--width", "96",
                   "--height", "64", "--steps", "3", "--out", str(tmp_path / "server"))
    assert run.returncode == 0, run.stderr
    outputs = json.loads(run.stdout)["outputs"]
    assert len(outputs) == 1 and Image.open(outputs[0]).size == (96, 64)


def test_tables_and_json(mesh, rest):
    for command in ("sessions", "jobs", "models", "free"):
        run = loramesh(mesh, command)
        assert run.returncode == 0, (command, run.stderr)
    catalog = json.loads(loramesh(mesh, "--json", "models").stdout)["catalog"]
    assert [m["id"] for m in catalog] == [m["id"] for m in rest.get("/v1/models").json()["models"]]
    jobs = json.loads(loramesh(mesh, "--json", "jobs").stdout)
    assert jobs["total_count"] == rest.get("/queue").json()["total_count"]
    freed = json.loads(loramesh(mesh, "--json", "free").stdout)
    # A replica busy training may answer late; it is then listed as unanswered.
    answered = {r["service"] for r in freed["reports"]} | {u.split("@")[0] for u in freed.get("unanswered", [])}
    assert answered == {"trainer", "captioner", "tagger", "inference"}
    assert "sdxl" in loramesh(mesh, "models").stdout


def bad_config(tmp_path, media_dir, dataset_dir, models_dir) -> str:
    config = payload("cli-bad", media_dir / "output" / "cli-bad", dataset_dir, models_dir / "tiny-sdxl.safetensors")
    config["config"]["config"]["process"][0]["train"]["bogus_key"] = 1
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config["config"]))
    return str(path)


@pytest.mark.parametrize("case", ["missing folder", "unreachable gateway", "unknown config key", "bad lora weight",
                                  "missing config", "image outside the media roots"])
def test_bad_input_prints_one_clear_line(mesh, rest, case, tmp_path, media_dir, dataset_dir, models_dir):
    args, expected = {
        "missing folder": (["tag", str(tmp_path / "nowhere")], f"no such file or folder: {tmp_path / 'nowhere'}"),
        "unreachable gateway": (["--url", "http://127.0.0.1:1", "sessions"],
                                "cannot reach the loramesh gateway at http://127.0.0.1:1"),
        "unknown config key": (["train", bad_config(tmp_path, media_dir, dataset_dir, models_dir), "--steps", "5"],
                               "config.config.process[0].train.bogus_key"),
        "bad lora weight": (["generate", "a cat", "--lora", "x.safetensors:heavy"], "must be a number"),
        "missing config": (["train", str(tmp_path / "none.yaml"), "--steps", "5"], "no such config file"),
        "image outside the media roots": (["tag", str(write_image(tmp_path / "elsewhere.png"))],
                                          "is outside the allowed roots (the services read files only inside"),
    }[case]
    run = loramesh(mesh, *args)
    assert run.returncode == 1, run
    assert "Traceback" not in run.stderr + run.stdout
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], run.stderr
    if case == "unknown config key":
        assert rest.get("/sessions/cli-bad").status_code == 404  # nothing was created
