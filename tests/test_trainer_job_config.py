"""The ai-toolkit job config parser: the documented example, defaults, Struct doubles, camelCase, and violations
that name the exact key path under the request field `config`."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import json_format, struct_pb2

from services.common.errors import InvalidInput
from services.trainer.job_config import (
    DatasetConfig,
    EmaConfig,
    JobConfig,
    SamplePrompt,
    parse_job_config,
)

P = "config.config.process[0]"

# The `config` object of the create-session example in the project docs, exactly as published.
SEED = {
    "job": "extension",
    "config": {
        "name": "sdxl-lora-demo",
        "process": [
            {
                "type": "diffusion_trainer",
                "training_folder": "/work/output",
                "device": "cuda",
                "trigger_word": None,
                "performance_log_every": 10,
                "network": {
                    "type": "lora",
                    "linear": 32,
                    "linear_alpha": 32,
                    "conv": 16,
                    "conv_alpha": 16,
                    "lokr_full_rank": True,
                    "lokr_factor": 16,
                    "network_kwargs": {
                        "ignore_if_contains": []
                    }
                },
                "save": {
                    "dtype": "bf16",
                    "save_every": 100,
                    "max_step_saves_to_keep": 300,
                    "save_format": "diffusers",
                    "push_to_hub": False
                },
                "datasets": [
                    {
                        "folder_path": "/work/pop_tart",
                        "mask_path": None,
                        "mask_min_value": 0.1,
                        "default_caption": "",
                        "caption_ext": "txt",
                        "caption_dropout_rate": 0.1,
                        "shuffle_tokens": True,
                        "token_dropout_rate": 0.01,
                        "is_reg": False,
                        "network_weight": 1,
                        "bucket_step_size": 8,
                        "bucket_no_upscale": True,
                        "random_crop": False,
                        "center_crop": False,
                        "resolution": [1024],
                        "controls": [],
                        "cache_latents_to_disk": False,
                        "flip_x": True
                    }
                ],
                "train": {
                    "batch_size": 2,
                    "bypass_guidance_embedding": False,
                    "steps": 3000,
                    "gradient_accumulation": 1,
                    "train_unet": True,
                    "train_text_encoder": True,
                    "gradient_checkpointing": True,
                    "noise_scheduler": "ddpm",
                    "optimizer": "adamw8bit",
                    "timestep_type": "sigmoid",
                    "content_or_style": "balanced",
                    "optimizer_params": {
                        "weight_decay": 0.01,
                        "betas": [0.9, 0.999]
                    },
                    "unload_text_encoder": False,
                    "lr": 0.0001,
                    "text_encoder_lr": 0.00005,
                    "lr_scheduler": "cosine",
                    "lr_scheduler_kwargs": {
                        "eta_min": 0.00001
                    },
                    "ema_config": {
                        "use_ema": True,
                        "ema_decay": 0.99
                    },
                    "dtype": "bf16",
                    "mixed_precision": "bf16",
                    "diff_output_preservation": False,
                    "diff_output_preservation_multiplier": 1,
                    "diff_output_preservation_class": "person",
                    "max_grad_norm": 1,
                    "noise_offset": 0.1,
                    "min_snr_gamma": 5,
                    "zero_terminal_snr": True,
                    "scale_weight_norms": 1,
                    "cache_text_encoder_outputs": True,
                    "cache_text_encoder_outputs_to_disk": False
                },
                "model": {
                    "name_or_path": "/work/models/hassakuXLIllustrious_v22.safetensors",
                    "quantize": False,
                    "quantize_te": False,
                    "arch": "sdxl",
                    "low_vram": False,
                    "model_kwargs": {}
                },
                "sample": {
                    "sampler": "ddpm",
                    "sample_every": 100,
                    "width": 1024,
                    "height": 1024,
                    "neg": "3d, ugly, blurry, low quality, horror",
                    "seed": 43,
                    "walk_seed": True,
                    "guidance_scale": 6,
                    "sample_steps": 35,
                    "num_frames": 1,
                    "fps": 1,
                    "cfg_rescale": 0,
                    "samples": [
                        {"prompt": "TOK,"}
                    ]
                },
                "meta": {
                    "name": "[name]",
                    "version": "1.0"
                }
            }
        ]
    }
}


def seed_config() -> dict:
    return copy.deepcopy(SEED)


def minimal() -> dict:
    return {
        "job": "extension",
        "config": {
            "name": "tiny",
            "process": [{
                "type": "sd_trainer",
                "training_folder": "/out",
                "datasets": [{"folder_path": "/data"}],
                "model": {"name_or_path": "/models/x.safetensors", "arch": "sd15"},
            }],
        },
    }


def with_changes(base: dict | None = None, **sections: dict) -> dict:
    """A valid config whose process sections (train=..., save=..., ``datasets0``=...) get these keys set."""
    raw = copy.deepcopy(base) if base is not None else seed_config()
    process = raw["config"]["process"][0]
    for section, changes in sections.items():
        target = process["datasets"][0] if section == "datasets0" else process if section == "process" else \
            process.setdefault(section, {})
        target.update(changes)
    return raw


def violations(raw) -> list[tuple[str, str]]:
    with pytest.raises(InvalidInput) as caught:
        parse_job_config(raw)
    return caught.value.violations


def fields_of(raw) -> list[str]:
    return [field for field, _ in violations(raw)]


def only_violation(raw) -> tuple[str, str]:
    found = violations(raw)
    assert len(found) == 1, found
    return found[0]


# --- The documented example -------------------------------------------------------------------------------------


def test_seed_parses_and_its_values_come_through():
    cfg = parse_job_config(seed_config())
    assert isinstance(cfg, JobConfig)
    assert (cfg.job, cfg.name, cfg.meta) == ("extension", "sdxl-lora-demo", {})
    p = cfg.process
    assert (p.type, p.training_folder, p.device, p.trigger_word, p.performance_log_every) == (
        "diffusion_trainer", "/work/output", "cuda", None, 10)
    assert p.meta == {"name": "[name]", "version": "1.0"}

    n = p.network
    assert (n.type, n.linear, n.linear_alpha, n.conv, n.conv_alpha) == ("lora", 32, 32.0, 16, 16.0)
    assert (n.lokr_full_rank, n.lokr_factor, n.ignore_if_contains, n.only_if_contains) == (True, 16, (), ())

    s = p.save
    assert (s.dtype, s.save_every, s.max_step_saves_to_keep, s.save_format, s.push_to_hub) == (
        "bf16", 100, 300, "diffusers", False)

    (d,) = p.datasets
    assert isinstance(d, DatasetConfig)
    assert (d.folder_path, d.mask_path, d.mask_min_value, d.caption_ext) == ("/work/pop_tart", None, 0.1, "txt")
    assert (d.caption_dropout_rate, d.shuffle_tokens, d.token_dropout_rate, d.network_weight) == (0.1, True, 0.01, 1.0)
    assert (d.bucket_step_size, d.bucket_no_upscale, d.resolution, d.controls, d.flip_x) == (8, True, (1024,), (), True)
    assert (d.flip_y, d.num_repeats, d.keep_tokens, d.cache_latents, d.is_reg) == (False, 1, 0, False, False)

    t = p.train
    assert (t.batch_size, t.steps, t.gradient_accumulation, t.train_unet, t.train_text_encoder) == (
        2, 3000, 1, True, True)
    assert type(t.steps) is int
    assert (t.optimizer, t.optimizer_params) == ("adamw8bit", {"weight_decay": 0.01, "betas": (0.9, 0.999)})
    assert (t.lr, t.text_encoder_lr, t.lr_scheduler, t.lr_scheduler_kwargs) == (1e-4, 5e-5, "cosine", {"eta_min": 1e-5})
    assert t.ema_config == EmaConfig(use_ema=True, ema_decay=0.99)
    assert (t.dtype, t.mixed_precision, t.noise_offset, t.min_snr_gamma, t.zero_terminal_snr) == (
        "bf16", "bf16", 0.1, 5.0, True)
    assert (t.max_grad_norm, t.scale_weight_norms, t.diff_output_preservation_class) == (1.0, 1.0, "person")
    assert (t.seed, t.skip_first_sample, t.disable_sampling, t.timestep_type, t.content_or_style) == (
        42, False, False, "sigmoid", "balanced")

    m = p.model
    assert (m.name_or_path, m.arch, m.quantize, m.quantize_te, m.low_vram, m.model_kwargs) == (
        "/work/models/hassakuXLIllustrious_v22.safetensors", "sdxl", False, False, False, {})

    sample = p.sample
    assert (sample.sampler, sample.sample_every, sample.width, sample.height) == ("ddpm", 100, 1024, 1024)
    assert (sample.neg, sample.seed, sample.walk_seed, sample.guidance_scale) == (
        "3d, ugly, blurry, low quality, horror", 43, True, 6.0)
    assert (sample.sample_steps, sample.num_frames, sample.fps, sample.cfg_rescale) == (35, 1, 1, 0.0)
    assert sample.samples == (SamplePrompt("TOK,"),)


def test_parsing_does_not_change_the_input():
    raw = seed_config()
    before = copy.deepcopy(raw)
    parse_job_config(raw)
    assert raw == before


# --- to_dict --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [seed_config(), minimal()], ids=["seed", "minimal"])
def test_to_dict_round_trips_through_json(raw):
    cfg = parse_job_config(raw)
    plain = cfg.to_dict()
    assert parse_job_config(plain) == cfg
    assert parse_job_config(json.loads(json.dumps(plain))) == cfg


def test_to_dict_has_the_ai_toolkit_shape_with_defaults_filled():
    plain = parse_job_config(minimal()).to_dict()
    assert plain["job"] == "extension" and plain["meta"] == {}
    assert plain["config"]["name"] == "tiny"
    (process,) = plain["config"]["process"]
    assert process["network"] == {
        "type": "lora", "linear": 16, "linear_alpha": 16.0, "conv": None, "conv_alpha": None,
        "lokr_full_rank": False, "lokr_factor": -1,
        "network_kwargs": {"ignore_if_contains": [], "only_if_contains": []},
    }
    assert process["save"] == {"dtype": "fp16", "save_every": 250, "max_step_saves_to_keep": 4,
                               "save_format": "diffusers", "push_to_hub": False}
    assert process["datasets"][0]["resolution"] == [512]
    assert process["datasets"][0]["caption_dropout_rate"] == 0.05
    assert process["train"]["ema_config"] == {"use_ema": False, "ema_decay": 0.99}
    assert process["train"]["optimizer_params"] == {} and process["train"]["lr_scheduler_kwargs"] == {}
    assert process["model"] == {"name_or_path": "/models/x.safetensors", "arch": "sd15", "quantize": False,
                                "quantize_te": False, "low_vram": False, "model_kwargs": {}}
    assert process["sample"] is None
    assert (process["device"], process["performance_log_every"], process["meta"]) == ("cuda", 10, {})


def test_defaults_of_a_minimal_config():
    p = parse_job_config(minimal()).process
    t = p.train
    assert (t.batch_size, t.steps, t.gradient_accumulation, t.optimizer, t.lr, t.text_encoder_lr) == (
        1, 1000, 1, "adamw8bit", 1e-4, None)
    assert (t.lr_scheduler, t.noise_scheduler, t.dtype, t.mixed_precision, t.min_snr_gamma) == (
        "constant", "ddpm", "bf16", "bf16", None)
    assert (t.train_unet, t.train_text_encoder, t.gradient_checkpointing, t.max_grad_norm) == (True, False, True, 1.0)
    d = p.datasets[0]
    assert (d.bucket_step_size, d.caption_ext, d.network_weight, d.default_caption) == (64, "txt", 1.0, "")


def test_sample_defaults_and_prompt_entries():
    raw = with_changes(minimal(), process={"sample": {"samples": [
        {"prompt": "a cat"}, {"prompt": "a dog", "seed": 7.0, "width": 768, "neg": "blurry"}]}})
    sample = parse_job_config(raw).process.sample
    assert (sample.sampler, sample.sample_every, sample.width, sample.height, sample.guidance_scale) == (
        "ddpm", 250, 1024, 1024, 7.0)
    assert (sample.sample_steps, sample.seed, sample.neg, sample.num_frames) == (20, 42, "", 1)
    assert sample.samples == (SamplePrompt("a cat"), SamplePrompt("a dog", neg="blurry", seed=7, width=768))
    plain = parse_job_config(raw).to_dict()["config"]["process"][0]["sample"]["samples"]
    assert plain == [{"prompt": "a cat"}, {"prompt": "a dog", "neg": "blurry", "seed": 7, "width": 768}]


def test_ai_toolkit_prompts_become_sample_entries():
    raw = with_changes(minimal(), process={"sample": {"prompts": ["one", "two"]}})
    assert parse_job_config(raw).process.sample.samples == (SamplePrompt("one"), SamplePrompt("two"))


# --- Numbers as a protobuf Struct carries them -----------------------------------------------------------------


def test_whole_floats_count_as_integers():
    cfg = parse_job_config(with_changes(train={"steps": 3000.0, "batch_size": 4.0}, save={"save_every": 100.0}))
    assert (cfg.process.train.steps, cfg.process.train.batch_size, cfg.process.save.save_every) == (3000, 4, 100)
    assert type(cfg.process.train.steps) is int and type(cfg.process.save.save_every) is int


def test_the_seed_through_a_protobuf_struct_parses_to_the_same_config():
    struct = struct_pb2.Struct()
    struct.update(seed_config())
    doubles = json_format.MessageToDict(struct)
    assert isinstance(doubles["config"]["process"][0]["train"]["steps"], float)
    assert parse_job_config(doubles) == parse_job_config(seed_config())


def test_non_whole_float_for_an_integer_is_refused():
    assert only_violation(with_changes(train={"steps": 3000.5})) == (
        f"{P}.train.steps", "must be an integer from 1 to 1000000 (got 3000.5)")


@pytest.mark.parametrize(("section", "key", "expected"), [
    ("train", "batch_size", "must be an integer from 1 to 256 (got true)"),
    ("save", "save_every", "must be an integer >= 1 (got true)"),
    ("train", "lr", "must be a number > 0 and <= 1 (got true)"),
    ("datasets0", "resolution", "must be an integer or a non-empty list of integers, each from 64 to 4096 (got true)"),
])
def test_booleans_are_not_numbers(section, key, expected):
    where = "datasets[0]" if section == "datasets0" else section
    assert only_violation(with_changes(**{section: {key: True}})) == (f"{P}.{where}.{key}", expected)


def test_null_means_the_default():
    cfg = parse_job_config(with_changes(save={"save_every": None, "dtype": None},
                                        network={"conv": None, "conv_alpha": None},
                                        train={"optimizer": None, "optimizer_params": None}))
    assert (cfg.process.save.save_every, cfg.process.save.dtype) == (250, "fp16")
    assert (cfg.process.network.conv, cfg.process.network.conv_alpha) == (None, None)
    assert (cfg.process.train.optimizer, cfg.process.train.optimizer_params) == ("adamw8bit", {})


# --- Spellings ------------------------------------------------------------------------------------------------


def test_camel_case_keys_are_accepted_and_normalised():
    raw = minimal()
    process = raw["config"]["process"][0]
    process["trainingFolder"] = process.pop("training_folder")
    process["performanceLogEvery"] = 5
    process["model"] = {"nameOrPath": "/m.safetensors", "arch": "flux", "lowVram": True}
    process["network"] = {"linearAlpha": 8, "networkKwargs": {"ignoreIfContains": ["te"]}}
    process["save"] = {"saveEvery": 50, "maxStepSavesToKeep": 2}
    process["datasets"] = [{"folderPath": "/d", "captionExt": ".caption", "flipX": True}]
    process["train"] = {"gradientAccumulationSteps": 4, "optimizer": "prodigy",
                        "optimizerParams": {"weightDecay": 0.1, "dCoef": 2, "useBiasCorrection": True},
                        "emaConfig": {"useEma": True, "emaDecay": 0.999}, "lrScheduler": "polynomial",
                        "lrSchedulerKwargs": {"warmupSteps": 10.0, "lrEnd": 0}}
    cfg = parse_job_config(raw)
    p = cfg.process
    assert (p.training_folder, p.performance_log_every) == ("/out", 5)
    assert (p.model.name_or_path, p.model.arch, p.model.low_vram) == ("/m.safetensors", "flux", True)
    assert (p.network.linear_alpha, p.network.ignore_if_contains) == (8.0, ("te",))
    assert (p.save.save_every, p.save.max_step_saves_to_keep) == (50, 2)
    assert (p.datasets[0].folder_path, p.datasets[0].caption_ext, p.datasets[0].flip_x) == ("/d", "caption", True)
    assert p.train.gradient_accumulation == 4
    assert p.train.optimizer_params == {"weight_decay": 0.1, "d_coef": 2.0, "use_bias_correction": True}
    assert p.train.ema_config == EmaConfig(True, 0.999)
    assert p.train.lr_scheduler_kwargs == {"warmup_steps": 10, "lr_end": 0.0}
    assert "saveEvery" not in json.dumps(cfg.to_dict())


def test_both_spellings_of_one_key_are_refused():
    assert fields_of(with_changes(save={"saveEvery": 10})) == [f"{P}.save.saveEvery"]
    assert fields_of(with_changes(train={"gradient_accumulation_steps": 2})) == [
        f"{P}.train.gradient_accumulation_steps"]
    field, description = only_violation(with_changes(datasets0={"flipX": False}))
    assert (field, description) == (
        f"{P}.datasets[0].flipX", "is the same setting as flip_x; send it once, in one spelling")


def test_samples_and_prompts_together_are_refused():
    raw = with_changes(sample={"prompts": ["x"]})
    assert only_violation(raw) == (f"{P}.sample.prompts", "give either samples or prompts, not both")


# --- Violations -------------------------------------------------------------------------------------------------


def test_unknown_keys_are_named_with_the_allowed_ones():
    found = dict(violations(with_changes(
        datasets0={"flip_z": True}, network={"network_kwargs": {"ignore_if_contains": [], "exclude": []}},
        train={"optimizer_params": {"weight_decay": 0.1, "relative_step": True}},
    )))
    assert found[f"{P}.datasets[0].flip_z"].startswith("unknown key; allowed keys: bucket_no_upscale, ")
    assert found[f"{P}.network.network_kwargs.exclude"] == (
        "unknown key; allowed keys: ignore_if_contains, only_if_contains")
    assert found[f"{P}.train.optimizer_params.relative_step"] == (
        "unknown key; allowed keys for adamw8bit: amsgrad, betas, eps, weight_decay")
    assert len(found) == 3


def test_unknown_keys_at_the_top_levels():
    raw = seed_config()
    raw["extra"] = 1
    raw["config"]["jobs"] = []
    assert dict(violations(raw)) == {
        "config.extra": "unknown key; allowed keys: config, job, meta",
        "config.config.jobs": "unknown key; allowed keys: name, process",
    }


def test_optimizer_params_follow_the_chosen_optimizer():
    raw = with_changes(train={"optimizer": "adafactor", "optimizer_params": {
        "relative_step": False, "scale_parameter": False, "warmup_init": False, "eps": [1e-30, 1e-3],
        "clip_threshold": 1.0, "decay_rate": -0.8, "beta1": None, "weight_decay": 0}})
    params = parse_job_config(raw).process.train.optimizer_params
    assert params == {"relative_step": False, "scale_parameter": False, "warmup_init": False, "eps": (1e-30, 1e-3),
                      "clip_threshold": 1.0, "decay_rate": -0.8, "weight_decay": 0.0}
    found = dict(violations(with_changes(train={"optimizer_params": {"betas": [0.9], "eps": 0, "amsgrad": 1}})))
    assert found == {
        f"{P}.train.optimizer_params.betas": "must be a list of 2 numbers, each >= 0 and < 1 (got [0.9])",
        f"{P}.train.optimizer_params.eps": "must be a number > 0 (got 0)",
        f"{P}.train.optimizer_params.amsgrad": "must be true or false (got 1)",
    }


def test_scheduler_kwargs_follow_the_chosen_scheduler():
    assert only_violation(with_changes(train={"lr_scheduler": "constant"})) == (
        f"{P}.train.lr_scheduler_kwargs.eta_min", "unknown key; allowed keys for constant: warmup_steps")
    raw = with_changes(train={"lr_scheduler": "cosine_with_restarts",
                              "lr_scheduler_kwargs": {"num_cycles": 0, "eta_min": 0, "warmup_steps": -1}})
    assert dict(violations(raw)) == {
        f"{P}.train.lr_scheduler_kwargs.num_cycles": "must be an integer >= 1 (got 0)",
        f"{P}.train.lr_scheduler_kwargs.warmup_steps": "must be an integer >= 0 (got -1)",
    }
    linear = parse_job_config(
        with_changes(train={"lr_scheduler": "linear", "lr_scheduler_kwargs": {"end_factor": 0.1}}))
    assert linear.process.train.lr_scheduler_kwargs == {"end_factor": 0.1}


def test_a_bad_choice_lists_the_allowed_ones():
    assert only_violation(with_changes(train={"optimizer": "adam9"})) == (
        f"{P}.train.optimizer", "must be one of adamw, adamw8bit, adafactor, prodigy (got 'adam9')")
    assert fields_of(with_changes(model={"arch": "sd3"}, save={"dtype": "int8"})) == [
        f"{P}.save.dtype", f"{P}.model.arch"]


def test_precisions_are_normalised():
    cfg = parse_job_config(with_changes(save={"dtype": "float16"}, train={"dtype": "float32", "mixed_precision": "no"}))
    assert (cfg.process.save.dtype, cfg.process.train.dtype, cfg.process.train.mixed_precision) == (
        "fp16", "fp32", "fp32")
    assert fields_of(with_changes(save={"dtype": "no"})) == [f"{P}.save.dtype"]


@pytest.mark.parametrize(("section", "changes", "field", "description"), [
    ("network", {"linear": 0}, "network.linear", "must be an integer from 1 to 1024 (got 0)"),
    ("network", {"linear": 2048}, "network.linear", "must be an integer from 1 to 1024 (got 2048)"),
    ("network", {"linear_alpha": 0}, "network.linear_alpha", "must be a number > 0 (got 0)"),
    ("network", {"lokr_factor": 0}, "network.lokr_factor", "must be -1 or an integer >= 1 (got 0)"),
    ("network", {"type": "dora"}, "network.type", "must be one of lora, locon, lokr, full (got 'dora')"),
    ("save", {"max_step_saves_to_keep": 0}, "save.max_step_saves_to_keep", "must be an integer >= 1 (got 0)"),
    ("datasets0", {"resolution": [1024, 32]}, "datasets[0].resolution",
     "must be an integer or a non-empty list of integers, each from 64 to 4096 (got [1024, 32])"),
    ("datasets0", {"caption_dropout_rate": 1.5}, "datasets[0].caption_dropout_rate",
     "must be a number from 0 to 1 (got 1.5)"),
    ("datasets0", {"bucket_step_size": 4}, "datasets[0].bucket_step_size", "must be an integer from 8 to 256 (got 4)"),
    ("datasets0", {"caption_ext": "t x"}, "datasets[0].caption_ext",
     "must be a file extension of letters and digits, such as txt (got 't x')"),
    ("datasets0", {"folder_path": ""}, "datasets[0].folder_path", "must be a non-empty string (got '')"),
    ("train", {"lr": 0}, "train.lr", "must be a number > 0 and <= 1 (got 0)"),
    ("train", {"text_encoder_lr": 2}, "train.text_encoder_lr", "must be a number > 0 and <= 1 (got 2)"),
    ("train", {"ema_config": {"ema_decay": 1}}, "train.ema_config.ema_decay",
     "must be a number >= 0 and < 1 (got 1)"),
    ("train", {"seed": -1}, "train.seed", "must be an integer >= 0 (got -1)"),
    ("train", {"gradient_checkpointing": "yes"}, "train.gradient_checkpointing", "must be true or false (got 'yes')"),
    ("sample", {"width": 1004}, "sample.width", "must be an integer from 64 to 4096 and a multiple of 8 (got 1004)"),
    ("sample", {"guidance_scale": 51}, "sample.guidance_scale", "must be a number from 0 to 50 (got 51)"),
    ("sample", {"samples": [{"prompt": "x", "sample_steps": 500}]}, "sample.samples[0].sample_steps",
     "must be an integer from 1 to 200 (got 500)"),
    ("sample", {"samples": [{"neg": "x"}]}, "sample.samples[0].prompt", "is required: a string"),
    ("process", {"device": "tpu"}, "device", "must be cuda, cuda:N, cpu or mps (got 'tpu')"),
    ("process", {"meta": {"tags": ["a"]}}, "meta.tags", "must be a string, number or boolean (got ['a'])"),
])
def test_bad_values_name_their_path_and_what_is_allowed(section, changes, field, description):
    assert only_violation(with_changes(**{section: changes})) == (f"{P}.{field}", description)


@pytest.mark.parametrize(("section", "changes", "field", "start"), [
    ("save", {"push_to_hub": True}, "save.push_to_hub", "push_to_hub is not available: this deployment has no Hugging"),
    ("sample", {"num_frames": 16}, "sample.num_frames", "must be 1: sd15, sdxl and flux make images, not video"),
    ("datasets0", {"controls": ["/c"]}, "datasets[0].controls", "must be empty: control images are not supported"),
    ("datasets0", {"random_crop": True, "center_crop": True}, "datasets[0].center_crop", "cannot be true together"),
    ("train", {"train_unet": False, "train_text_encoder": False, "cache_text_encoder_outputs": False},
     "train.train_unet", "train_unet and train_text_encoder cannot both be false"),
    ("model", {"is_v2": True}, "model.is_v2", "Stable Diffusion 2 models are not supported"),
    ("model", {"is_flux": True}, "model.is_flux", "says flux but arch is 'sdxl'"),
])
def test_refusals_and_rules_across_keys(section, changes, field, start):
    found_field, description = only_violation(with_changes(**{section: changes}))
    assert found_field == f"{P}.{field}"
    assert description.startswith(start), description


def test_legacy_architecture_flags():
    raw = with_changes(minimal(), model={"arch": None, "is_xl": True, "is_v2": False})
    assert parse_job_config(raw).process.model.arch == "sdxl"
    raw = with_changes(minimal(), model={"arch": None, "is_flux": True})
    assert parse_job_config(raw).process.model.arch == "flux"
    assert "is_xl" not in parse_job_config(raw).to_dict()["config"]["process"][0]["model"]
    assert only_violation(with_changes(minimal(), model={"arch": None})) == (
        f"{P}.model.arch", "is required: one of sd15, sdxl, flux")
    assert fields_of(with_changes(minimal(), model={"arch": None, "is_xl": True, "is_flux": True})) == [
        f"{P}.model.is_flux"]


def test_wrong_container_types_are_one_violation_each():
    raw = with_changes(process={"train": 5, "network": [], "datasets": {"folder_path": "/d"}},
                       sample={"samples": "TOK"})
    raw["config"]["process"][0]["model"]["model_kwargs"] = "x"
    assert dict(violations(raw)) == {
        f"{P}.network": "must be an object (got [])",
        f"{P}.datasets": "must be a non-empty list of dataset objects (got an object)",
        f"{P}.train": "must be an object (got 5)",
        f"{P}.model.model_kwargs": "must be an object (got 'x')",
        f"{P}.sample.samples": "must be a list of sample objects (got 'TOK')",
    }


@pytest.mark.parametrize("raw", [None, 5, "config", [SEED]])
def test_a_config_that_is_not_an_object(raw):
    field, description = only_violation(raw)
    assert field == "config" and description.startswith("must be an ai-toolkit job config object (got ")


def test_empty_datasets_and_process_counts():
    assert only_violation(with_changes(process={"datasets": []})) == (
        f"{P}.datasets", "must be a non-empty list of dataset objects (got 0 entries)")
    two = seed_config()
    two["config"]["process"].append(copy.deepcopy(two["config"]["process"][0]))
    assert only_violation(two) == (
        "config.config.process", "must be a list with exactly one process object (got 2 entries)")
    none = seed_config()
    none["config"]["process"] = []
    assert fields_of(none) == ["config.config.process"]


def test_required_keys():
    raw = {"config": {"process": [{"datasets": [{}], "model": {}}]}}
    assert dict(violations(raw)) == {
        "config.job": "is required: one of extension, train",
        "config.config.name": "is required: 1 to 100 characters of letters, digits, '.', '_' and '-', not starting "
                              "with '.' (it names the output folder and files)",
        f"{P}.type": "is required: one of diffusion_trainer, sd_trainer",
        f"{P}.training_folder": "is required: a non-empty string",
        f"{P}.datasets[0].folder_path": "is required: a non-empty string",
        f"{P}.model.name_or_path": "is required: a non-empty string",
        f"{P}.model.arch": "is required: one of sd15, sdxl, flux",
    }


@pytest.mark.parametrize("name", [".hidden", "a/b", "x" * 101, "", "sp ace", 7])
def test_bad_job_names(name):
    raw = seed_config()
    raw["config"]["name"] = name
    assert fields_of(raw) == ["config.config.name"]


@pytest.mark.parametrize("name", ["a", "v1.2_final-x", "_x", "x" * 100])
def test_good_job_names(name):
    raw = seed_config()
    raw["config"]["name"] = name
    assert parse_job_config(raw).name == name


def test_devices():
    for device in ("cuda", "cuda:1", "cpu", "mps"):
        assert parse_job_config(with_changes(process={"device": device})).process.device == device


def test_several_mistakes_come_back_together():
    raw = with_changes(
        train={"optimizer": "adam9", "steps": 0, "batchSize": 2.5},
        save={"push_to_hub": True, "format": "ckpt"},
        datasets0={"folder_path": None},
        network={"conv": -1},
        process={"job": "x"},
    )
    raw["job"] = "run"
    assert sorted(fields_of(raw)) == sorted([
        "config.job",
        f"{P}.job",
        f"{P}.network.conv",
        f"{P}.save.format",
        f"{P}.save.push_to_hub",
        f"{P}.datasets[0].folder_path",
        f"{P}.train.batchSize",
        f"{P}.train.steps",
        f"{P}.train.optimizer",
    ])
    with pytest.raises(InvalidInput) as caught:
        parse_job_config(raw)
    assert "config.job: must be one of extension, train (got 'run')" in str(caught.value)


def test_importing_pulls_in_neither_torch_nor_grpc():
    code = ("import sys, services.trainer.job_config; "
            "assert not {'torch', 'grpc'} & set(sys.modules), sorted(m for m in sys.modules if 'torch' in m)")
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
