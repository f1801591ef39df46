"""Both inference APIs parsed into the typed job spec, and the queue's order, without NATS
or a model: the rules a submission follows before anything is queued."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from services.common.errors import InvalidInput
from services.common.settings import Settings
from services.inference import submissions
from services.inference.job_spec import IMG2IMG, JPEG, PNG, SERVER_API, TXT2IMG, V1_API, ImageSpec, JobSpec, ModelRef
from services.inference.jobs import PENDING, JobRecord, Progress, line_position
from services.inference.model_files import ModelsRoot
from services.inference.model_loading import LoadPlan


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings.load("inference", environ={"LORAMESH_WORKFLOWS_BASE_PATH": str(tmp_path / "output"),
                                               "LORAMESH_MEDIA_ROOTS": str(tmp_path)})


@pytest.fixture
def root(tmp_path) -> ModelsRoot:
    (tmp_path / "models" / "loras").mkdir(parents=True)
    (tmp_path / "models" / "loras" / "add_detail.safetensors").write_bytes(b"{}")
    return ModelsRoot(tmp_path / "models")


def sdxl_plan() -> LoadPlan:
    return LoadPlan(model_name="sdxl.safetensors", model_type="checkpoint", architecture="SDXL", components={},
                    paths={"model": "/models/sdxl.safetensors"}, options={})


def png_base64(colour=(200, 30, 30)) -> str:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def round_trip(spec: JobSpec) -> JobSpec:
    return JobRecord.from_json(JobRecord(job_id="j", spec=spec).to_json()).spec


def test_a_v1_request_becomes_one_image_per_prompt_with_the_catalog_defaults(settings):
    spec = submissions.parse_v1({"model": "flux", "trigger_word": "TOK", "prompts": [
        {"prompt": "[trigger] on a beach", "width": 1000, "height": 512, "seed": 42},
        {"prompt": "plain", "sample_steps": 4, "trigger_word": "OTHER"}]}, settings).spec
    assert (spec.type, spec.api, spec.model, spec.architecture, spec.output_format) == (
        TXT2IMG, V1_API, ModelRef(catalog="flux"), "Flux", JPEG)
    first, second = spec.images
    assert first.prompt == "TOK on a beach" and first.seed == 42
    assert (first.width, first.height) == (992, 512)  # rounded down to Flux's multiple of 16
    assert first.steps == 25 and first.guidance_scale == 4.0  # the catalog's Flux defaults
    assert (second.width, second.steps) == (1024, 4) and 0 <= second.seed < 2**32
    assert spec.params["prompts"][0]["prompt"] == "TOK on a beach"
    assert round_trip(spec) == spec


def test_a_v1_kontext_request_carries_its_reference_image_by_name(settings):
    submission = submissions.parse_v1({"model": "flux_kontext", "prompts": [
        {"prompt": "make it blue", "width": 64, "height": 64, "ctrl_img": png_base64()}]}, settings)
    assert submission.spec.type == IMG2IMG and submission.spec.images[0].control == "ctrl_0"
    assert Image.open(io.BytesIO(submission.images["ctrl_0"])).size == (16, 16)


def test_every_bad_v1_field_is_reported_at_once_under_its_own_name(settings):
    with pytest.raises(InvalidInput) as caught:
        submissions.parse_v1({"model": "sdxl", "prompts": [
            {"prompt": "", "width": 100, "sample_steps": 500, "guidance_scale": "lots"},
            {"prompt": "ok", "sampler": "warp"}], "loras": [{"path": "../../etc/passwd"}]}, settings)
    fields = [name for name, _ in caught.value.violations]
    assert fields == ["loras[0].path", "prompts[0].prompt", "prompts[0].width", "prompts[0].sample_steps",
                      "prompts[0].guidance_scale", "prompts[1].sampler"]
    with pytest.raises(InvalidInput, match="unknown model 'sd9'"):
        submissions.parse_v1({"model": "sd9", "prompts": [{"prompt": "x"}]}, settings)


def test_a_server_batch_gets_consecutive_seeds_the_family_sampler_and_its_loras(settings, root):
    spec = submissions.parse_server(TXT2IMG, {"prompt": "a cat <lora:add_detail:0.8>", "width": 64, "height": 64,
                                              "seed": 7, "batch_count": 3, "cfg_scale": 5}, sdxl_plan(), root,
                                    settings).spec
    assert (spec.api, spec.output_format, spec.model.plan, spec.architecture) == (SERVER_API, PNG, sdxl_plan(), "SDXL")
    assert [image.seed for image in spec.images] == [7, 8, 9]
    assert {(i.prompt, i.sampler, i.scheduler, i.guidance_scale) for i in spec.images} == {
        ("a cat", "euler_a", "discrete", 5.0)}
    assert [(lora.path.endswith("loras/add_detail.safetensors"), lora.scale) for lora in spec.loras] == [(True, 0.8)]
    assert spec.params["prompt"] == "a cat <lora:add_detail:0.8>" and spec.params["batch_count"] == 3
    assert round_trip(spec) == spec


def test_a_server_img2img_with_a_mask_is_an_inpainting_job(settings, root):
    submission = submissions.parse_server(IMG2IMG, {"prompt": "a dog", "width": 64, "height": 64, "strength": 0.5,
                                                    "init_image_base64": png_base64(),
                                                    "mask_image_base64": png_base64((255, 255, 255))},
                                          sdxl_plan(), root, settings)
    image = submission.spec.images[0]
    assert (image.init, image.mask, image.task, image.strength) == ("init", "mask", "inpaint", 0.5)
    assert set(submission.images) == {"init", "mask"}


def test_server_requests_are_refused_without_a_model_or_with_bad_fields(settings, root):
    with pytest.raises(InvalidInput, match="No model loaded"):
        submissions.parse_server(TXT2IMG, {"prompt": "x"}, None, root, settings)
    with pytest.raises(InvalidInput) as caught:
        submissions.parse_server(IMG2IMG, {"prompt": "x <lora:missing:1>", "steps": 0, "clip_skip": 1,
                                           "slg_scale": 2.5}, sdxl_plan(), root, settings)
    assert [name for name, _ in caught.value.violations] == ["prompt", "steps", "slg_scale", "init_image_base64"]
    with pytest.raises(InvalidInput) as caught:  # what only the family rules out: SDXL skips CLIP layer 2 at least
        submissions.parse_server(TXT2IMG, {"prompt": "x", "clip_skip": 1}, sdxl_plan(), root, settings)
    assert [name for name, _ in caught.value.violations] == ["clip_skip"]


def test_every_server_field_is_read_or_refused_and_the_documented_defaults_pass(settings, root):
    from loramesh.v1 import inference_pb2

    for message in ("Txt2ImgRequest", "Img2ImgRequest"):
        fields = {f.name for f in inference_pb2.DESCRIPTOR.message_types_by_name[message].fields}
        assert fields <= submissions.HANDLED | set(submissions.UNSUPPORTED), fields - submissions.HANDLED
    # The document's defaults, sent as its examples send them, are accepted...
    request = {"prompt": "x", "init_image_base64": png_base64(), **submissions.UNSUPPORTED}
    submissions.parse_server(IMG2IMG, request, sdxl_plan(), root, settings)
    # ...and any other value of a field this server cannot honour is refused by name.
    others = {"skip_layers": [1], "slg_end": 0.5, "control_strength": 0.5, "easycache": True,
              "easycache_threshold": 0.3, "auto_resize_ref_image": False}
    with pytest.raises(InvalidInput) as caught:
        submissions.parse_server(TXT2IMG, {"prompt": "x", **others}, sdxl_plan(), root, settings)
    assert sorted(name for name, _ in caught.value.violations) == sorted(others)


def test_v1_fields_no_catalog_model_takes_are_refused_by_name(settings):
    item = {"prompt": "x", "num_frames": 16, "fps": 8, "ctrl_img_1": png_base64(), "ctrl_img_2": "", "ctrl_img_3": None}
    with pytest.raises(InvalidInput) as caught:
        submissions.parse_v1({"model": "sdxl", "prompts": [item]}, settings)
    assert [name for name, _ in caught.value.violations] == ["prompts[0].num_frames", "prompts[0].fps",
                                                               "prompts[0].ctrl_img_1"]


def test_server_cfg_scale_means_what_stable_diffusion_cpp_means(settings, root):
    zimage = LoadPlan(model_name="z.safetensors", model_type="diffusion", architecture="Z-Image", components={},
                      paths={"model": "/models/z.safetensors"}, options={})
    for plan, cfg, expected in ((zimage, 1.0, 0.0), (zimage, 3.0, 2.0), (sdxl_plan(), 7.0, 7.0)):
        spec = submissions.parse_server(TXT2IMG, {"prompt": "x", "cfg_scale": cfg, "width": 64, "height": 64},
                                        plan, root, settings).spec
        assert spec.images[0].guidance_scale == expected


def job(job_id: str, status: str = PENDING, seq: int = 0, created_at: float = 0.0) -> JobRecord:
    spec = JobSpec(type=TXT2IMG, api=SERVER_API, model=ModelRef(catalog="sdxl"), architecture="SDXL",
                   images=[ImageSpec("x", steps=10), ImageSpec("y", steps=10)])
    return JobRecord(job_id=job_id, spec=spec, status=status, seq=seq, created_at=created_at)


def test_a_place_in_line_counts_only_the_messages_still_waiting_before_it():
    # Messages up to 2 were handed to workers; 3 and 5 wait; 4 was cancelled (deleted).
    assert [line_position(seq, delivered=2, first=1, deleted=[4]) for seq in (3, 5, 6)] == [1, 2, 3]
    # Handed out already (running, or back for redelivery after a worker died): first in line.
    assert line_position(2, delivered=2, first=1, deleted=[]) == 1
    # Everything before 7 acked or deleted (the stream starts at 7): an idle queue.
    assert line_position(7, delivered=4, first=7, deleted=[]) == 1


def test_progress_counts_steps_over_every_image_of_the_job():
    record = job("p")
    assert record.current_progress == Progress(total_steps=10, total_images=2, all_steps=20)
    assert Progress.at(record.spec, 1, 5, 10) == Progress(step=5, total_steps=10, current_image=1, total_images=2,
                                                          all_steps=20, current_all_steps=15, percentage=75.0)


def test_prompts_longer_than_any_text_encoder_reads_are_refused(settings, root):
    with pytest.raises(InvalidInput) as caught:
        submissions.parse_v1({"model": "sdxl", "prompts": [
            {"prompt": "x" * (submissions.MAX_PROMPT_CHARS + 1), "neg": "y" * 20_000}]}, settings)
    assert [name for name, _ in caught.value.violations] == ["prompts[0].prompt", "prompts[0].neg"]
    with pytest.raises(InvalidInput, match="at most 10000 characters"):
        submissions.parse_server(TXT2IMG, {"prompt": "x" * 900_000}, sdxl_plan(), root, settings)
