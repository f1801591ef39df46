"""Inference, in one run, on a tiny SDXL checkpoint:

1. a txt2img job through REST (submit, poll to done, fetch the PNG) against the same
   call on the diffusers pipeline in-process (target ratio <= 1.10);
2. switching LoRAs on a loaded pipeline against reloading the whole pipeline with the
   LoRA (target >= 10x faster);
3. 20 concurrent submissions: all complete, in the queue's FIFO order;
4. one denoising step of a small Flux transformer loaded from a Q8_0 GGUF file (weights
   dequantized per layer as it runs) against the same transformer unquantized;
5. a tiny Wan 2.1 txt2vid job through REST (submit, poll, the MP4 written) against the same
   WanPipeline call in-process with its frames encoded to MP4 (target ratio <= 1.10).
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "gen")]

import httpx  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    EulerAncestralDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    WanPipeline,
)

from bench.common import median, start_mesh, workdir  # noqa: E402
from services.common.media import encode_mp4  # noqa: E402
from services.common.residency import Residency  # noqa: E402
from services.inference import gguf_files  # noqa: E402
from services.inference.generation import LoraWeight  # noqa: E402
from services.inference.job_spec import ImageSpec  # noqa: E402
from services.inference.pipelines import PipelineHost  # noqa: E402
from tests.conftest import write_random_lora  # noqa: E402
from tinymodels import diffusion as tiny_diffusion  # noqa: E402
from tinymodels import model_files as tiny_model_files  # noqa: E402

ROUNDS = 5
JOB = {"prompt": "a lovely cat", "width": 512, "height": 512, "steps": 20, "cfg_scale": 7.0, "seed": 42,
       "sampler": "euler_a", "scheduler": "discrete"}
CONCURRENT = 20
# The tiny Wan model and a job of the seed's shape, smaller.
WAN_LOAD = {"model_name": "wan2.1_t2v_1.3B_fp16.safetensors", "model_type": "diffusion",
            "vae": "wan_2.1_vae.safetensors", "t5xxl": "umt5_xxl_fp16.safetensors", "options": {"flow_shift": 3.0}}
VIDEO = {"prompt": "a lovely cat walking in a garden", "negative_prompt": "static, blurry", "width": 128,
         "height": 128, "video_frames": 17, "fps": 16, "steps": 8, "cfg_scale": 6.0, "seed": 42,
         "flow_shift": 3.0}
# A client polling status; faster polling only takes CPU from the job it waits for.
POLL_S = 0.05


def load_reference(checkpoint: Path, config: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_single_file(checkpoint, config=str(config))
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_call(pipe: StableDiffusionXLPipeline) -> None:
    image = pipe(JOB["prompt"], width=JOB["width"], height=JOB["height"], num_inference_steps=JOB["steps"],
                 guidance_scale=JOB["cfg_scale"], generator=torch.Generator("cpu").manual_seed(JOB["seed"])).images[0]
    image.save("/dev/null", format="PNG")


def rest_call(client: httpx.Client, body: dict) -> str:
    job_id = client.post("/txt2img", json=body).json()["job_id"]
    while True:
        job = client.get(f"/queue/{job_id}").json()
        if job["status"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(POLL_S)
    assert job["status"] == "completed", job
    assert client.get(f"/output/{job['outputs'][0]}").status_code == 200
    return job_id


def lora_switching(root: Path, config: Path, checkpoint: Path, loras: list[Path]) -> tuple[float, float]:
    """Median seconds to switch LoRAs on a loaded pipeline, and to reload the pipeline with one."""
    host = PipelineHost(torch.device("cpu"), torch.float32, Residency())
    loaded = host.get("bench", "SDXL", lambda: StableDiffusionXLPipeline.from_single_file(checkpoint,
                                                                                          config=str(config)))
    request = ImageSpec(prompt="warm up", width=64, height=64, steps=1, seed=0)
    loaded.set_loras([LoraWeight(loras[0], 1.0)])
    loaded.generate(request, lambda step, total: None)
    switches = []
    for i in range(ROUNDS * 2):
        lora = loras[(i + 1) % len(loras)]
        started = time.perf_counter()
        loaded.set_loras([LoraWeight(lora, 0.5 + (i % 3) * 0.25)])
        switches.append(time.perf_counter() - started)
    reloads = []
    for i in range(ROUNDS):
        started = time.perf_counter()
        pipe = StableDiffusionXLPipeline.from_single_file(checkpoint, config=str(config))
        pipe.load_lora_weights(str(loras[i % len(loras)]))
        reloads.append(time.perf_counter() - started)
        del pipe
    return median(switches), median(reloads)


def gguf_step_time(root: Path) -> tuple[float, float]:
    """Median seconds of one Flux transformer step (512x512 image, 64 text tokens), loaded from a
    Q8_0 GGUF file as /models/load does, and the same weights unquantized."""
    from diffusers import FluxTransformer2DModel

    from services.inference.model_loading import flux_transformer_to_diffusers

    torch.manual_seed(0)
    plain = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4,
                                   attention_head_dim=64, num_attention_heads=8, joint_attention_dim=512,
                                   pooled_projection_dim=256, guidance_embeds=True, axes_dims_rope=(16, 24, 24)).eval()
    config = root / "flux-bench"
    plain.save_config(config / "transformer")
    path = tiny_model_files.write_gguf(tiny_model_files.flux_to_original_state_dict(plain),
                                       root / "flux-bench-Q8_0.gguf", "q8_0")
    quantized = FluxTransformer2DModel.from_single_file(
        flux_transformer_to_diffusers(gguf_files.load_state_dict(path)), config=str(config),
        subfolder="transformer", torch_dtype=torch.float32, **gguf_files.single_file_kwargs(path, torch.float32))
    tokens, text = 32 * 32, 64
    ids = torch.zeros(tokens, 3)
    ids[:, 1], ids[:, 2] = torch.arange(tokens) // 32, torch.arange(tokens) % 32
    inputs = {"hidden_states": torch.randn(1, tokens, 64), "encoder_hidden_states": torch.randn(1, text, 512),
              "pooled_projections": torch.randn(1, 256), "timestep": torch.tensor([0.5]),
              "guidance": torch.tensor([3.5]), "img_ids": ids, "txt_ids": torch.zeros(text, 3)}
    times: dict[str, list[float]] = {"gguf": [], "plain": []}
    with torch.inference_mode():
        for model in (quantized, plain):  # warm-ups
            model(**inputs)
        for _ in range(ROUNDS):  # alternating, so both see the same machine noise
            for name, model in (("gguf", quantized), ("plain", plain)):
                started = time.perf_counter()
                model(**inputs)
                times[name].append(time.perf_counter() - started)
    return median(times["gguf"]), median(times["plain"])


def video_rest_call(client: httpx.Client) -> None:
    job_id = client.post("/txt2vid", json=VIDEO).json()["job_id"]
    while client.get(f"/queue/{job_id}").json()["status"] not in ("completed", "failed", "cancelled"):
        time.sleep(POLL_S)


def video_reference_call(pipe: WanPipeline, out: Path) -> None:
    frames = pipe(VIDEO["prompt"], negative_prompt=VIDEO["negative_prompt"], width=VIDEO["width"],
                  height=VIDEO["height"], num_frames=VIDEO["video_frames"], num_inference_steps=VIDEO["steps"],
                  guidance_scale=VIDEO["cfg_scale"], output_type="np",
                  generator=torch.Generator("cpu").manual_seed(VIDEO["seed"])).frames[0]
    encode_mp4((frames * 255).round().clip(0, 255).astype("uint8"), VIDEO["fps"], out)


def main() -> None:
    with workdir() as tmp:
        root = Path(tmp)
        models = root / "inference-models"
        config = models / "configs" / "sdxl"
        checkpoint = tiny_diffusion.build_sdxl_single_file(models / "checkpoints" / "tiny-sdxl.safetensors",
                                                           config_dir=config)
        loras = [write_random_lora(config, models / "loras" / f"style_{i}.safetensors", seed=i) for i in range(3)]
        wan = tiny_model_files.build_wan21_files({
            "transformer": models / "diffusion_models" / WAN_LOAD["model_name"],
            "t5xxl": models / "t5" / WAN_LOAD["t5xxl"], "vae": models / "vae" / WAN_LOAD["vae"],
        }, seed=1, config_dir=models / "configs" / "wan21", config_seed=0)

        switch_s, reload_s = lora_switching(root, config, checkpoint, loras)
        gguf_s, plain_s = gguf_step_time(root)

        reference = load_reference(checkpoint, config)
        mesh = start_mesh(root, {"LORAMESH_INFERENCE_MODELS_DIR": str(models), "LORAMESH_SDXL_CONFIG": str(config),
                                 "LORAMESH_OUTPUT_DIR": str(root / "outputs"),
                                 "LORAMESH_WAN21_CONFIG": str(wan["config"])})
        try:
            with httpx.Client(base_url=mesh.rest_url, timeout=600) as client:
                loaded = client.post("/models/load", json={"model_name": "tiny-sdxl.safetensors"})
                assert loaded.status_code == 200, loaded.text
                # The plain pipeline makes no live previews; bench/previews.py measures them.
                assert client.put("/preview/settings", json={"enabled": False}).status_code == 200
                reference_call(reference)  # warm-ups
                rest_call(client, JOB)
                # Rounds alternate, so both sides see the same machine noise.
                ours, theirs = [], []
                for _ in range(ROUNDS):
                    started = time.perf_counter()
                    reference_call(reference)
                    theirs.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    rest_call(client, JOB)
                    ours.append(time.perf_counter() - started)

                small = {**JOB, "width": 64, "height": 64, "steps": 4}
                with ThreadPoolExecutor(CONCURRENT) as pool:
                    submitted = list(pool.map(lambda i: client.post("/txt2img", json={**small, "seed": i}).json(),
                                              range(CONCURRENT)))
                ids = {s["job_id"] for s in submitted}
                deadline = time.monotonic() + 600
                while True:
                    items = [j for j in client.get("/queue").json()["items"] if j["job_id"] in ids]
                    if all(j["status"] == "completed" for j in items) or time.monotonic() > deadline:
                        break
                    time.sleep(0.1)

                loaded = client.post("/models/load", json=WAN_LOAD)
                assert loaded.status_code == 200, loaded.text
                wan_pipe = WanPipeline.from_pretrained(tiny_diffusion.build_wan21(root / "wan-reference", seed=1))
                wan_pipe.set_progress_bar_config(disable=True)
                # The service's default sampler: flow-matching Euler with the request's shift.
                wan_pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
                    wan_pipe.scheduler.config, shift=VIDEO["flow_shift"], use_dynamic_shifting=False)
                video_reference_call(wan_pipe, root / "reference.mp4")  # warm-ups
                video_rest_call(client)
                video_ours, video_theirs = [], []
                for _ in range(ROUNDS):
                    started = time.perf_counter()
                    video_reference_call(wan_pipe, root / "reference.mp4")
                    video_theirs.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    video_rest_call(client)
                    video_ours.append(time.perf_counter() - started)
        finally:
            mesh.stop()
    completed = sum(1 for j in items if j["status"] == "completed")
    queue_order = [j["job_id"] for j in items]  # /queue lists jobs in the order workers take them
    finish_order = [j["job_id"] for j in sorted(items, key=lambda j: j.get("completed_at", "~"))]
    start_order = [j["job_id"] for j in sorted(items, key=lambda j: j.get("started_at", "~"))]
    ours_s, theirs_s = median(ours), median(theirs)
    print(f"tiny SDXL txt2img {JOB['width']}x{JOB['height']}, {JOB['steps']} steps, median of {ROUNDS}")
    print(f"  REST job (submit, poll, fetch)   {ours_s * 1000:8.1f} ms")
    print(f"  diffusers pipeline in-process    {theirs_s * 1000:8.1f} ms")
    print(f"  ratio                            {ours_s / theirs_s:8.2f}   (target <= 1.10)")
    print("LoRA switch on a loaded pipeline vs full reload with the LoRA")
    print(f"  switch                           {switch_s * 1000:8.1f} ms")
    print(f"  reload                           {reload_s * 1000:8.1f} ms")
    print(f"  speed-up                         {reload_s / switch_s:8.1f}x  (target >= 10x)")
    print(f"{CONCURRENT} concurrent submissions")
    print(f"  completed                        {completed:8d} / {CONCURRENT}")
    print(f"  ran in FIFO order                {'yes' if start_order == queue_order == finish_order else 'NO'}")
    print("Flux transformer step (512x512, 8x64-dim heads, 2+4 blocks), median of", ROUNDS)
    print(f"  Q8_0 GGUF                        {gguf_s * 1000:8.1f} ms")
    print(f"  unquantized float32              {plain_s * 1000:8.1f} ms")
    print(f"  ratio                            {gguf_s / plain_s:8.2f}")
    video_ours_s, video_theirs_s = median(video_ours), median(video_theirs)
    print(f"tiny Wan 2.1 txt2vid {VIDEO['width']}x{VIDEO['height']}, {VIDEO['video_frames']} frames, "
          f"{VIDEO['steps']} steps, MP4, median of {ROUNDS}")
    print(f"  REST job (submit, poll, MP4)     {video_ours_s * 1000:8.1f} ms")
    print(f"  WanPipeline in-process + MP4     {video_theirs_s * 1000:8.1f} ms")
    print(f"  ratio                            {video_ours_s / video_theirs_s:8.2f}   (target <= 1.10)")


if __name__ == "__main__":
    main()
