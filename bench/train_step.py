"""Seconds per training step: the same SDXL LoRA config through the trainer service (REST
session, NATS, the engine) and through a minimal reference loop written directly with
diffusers + peft, in one run. Prints both, the ratio (the service's cost) and peak memory.

    python bench/train_step.py    tiny SDXL single file, 64px, on this machine's CPU
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import median  # noqa: E402

# Each side: a warm-up, then the median of ROUNDS timed windows of STEPS steps.
WARMUP, STEPS, ROUNDS = 10, 60, 3


def job_config(name: str, folder: Path, dataset: Path, model: Path, *, resolution: int) -> dict:
    return {"job": "extension", "config": {"name": name, "process": [{
        "type": "diffusion_trainer", "training_folder": str(folder), "device": "cuda", "performance_log_every": 10,
        "network": {"type": "lora", "linear": 32, "linear_alpha": 32},
        "save": {"save_every": 100_000, "dtype": "bf16"},
        "datasets": [{"folder_path": str(dataset), "resolution": [resolution], "cache_latents": True,
                      "caption_dropout_rate": 0.0, "bucket_step_size": 16}],
        "train": {"batch_size": 2, "steps": 100_000, "lr": 1e-4, "optimizer": "adamw", "train_text_encoder": False,
                  "cache_text_encoder_outputs": True, "gradient_checkpointing": False,
                  "dtype": "bf16", "mixed_precision": "bf16", "timestep_type": "linear", "max_grad_norm": 1.0},
        "model": {"name_or_path": str(model), "arch": "sdxl"},
    }]}}


def reference(pipe, dataset: Path, resolution: int, steps: int) -> float:
    """A minimal LoRA loop as diffusers' train_text_to_image_lora_sdxl.py writes it:
    cached latents and prompt embeddings, peft LoRA on the UNet's attention layers, AdamW."""
    import numpy as np
    from diffusers import DDPMScheduler
    from peft import LoraConfig
    from PIL import Image

    device = pipe.device
    unet, vae = pipe.unet, pipe.vae
    for module in (unet, vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
    targets = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and "attentions." in n]
    unet.add_adapter(LoraConfig(r=32, lora_alpha=32, init_lora_weights="gaussian", target_modules=targets))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    images = sorted(p for p in dataset.iterdir() if p.suffix in (".png", ".jpg"))
    latents, embeds = [], []
    with torch.no_grad():
        for path in images:
            image = Image.open(path).convert("RGB").resize((resolution, resolution))
            pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float() / 127.5 - 1
            latent = vae.encode(pixels[None].to(device, vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
            latents.append(latent[0].to(pipe.unet.dtype))
            caption = path.with_suffix(".txt").read_text() if path.with_suffix(".txt").exists() else ""
            prompt, _, pooled, _ = pipe.encode_prompt(caption, device=device, do_classifier_free_guidance=False)
            embeds.append((prompt[0], pooled[0]))
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * 2, device=device)
    rng = random.Random(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        batch = rng.sample(range(len(latents)), 2)
        x = torch.stack([latents[i] for i in batch])
        prompt = torch.stack([embeds[i][0] for i in batch])
        pooled = torch.stack([embeds[i][1] for i in batch])
        noise = torch.randn_like(x)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (2,), device=device)
        with autocast:
            pred = unet(noise_scheduler.add_noise(x, noise, t), t, encoder_hidden_states=prompt,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.to(prompt.dtype)}).sample
            loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(WARMUP):
        step()
    windows = []
    for _ in range(ROUNDS):
        _sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        windows.append((time.perf_counter() - started) / steps)
    return median(windows)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_rss_mib(pid: int | None = None) -> float:
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_reference_process(model: Path, config: Path, dataset: Path, resolution: int) -> dict:
    """The reference in its own process, so its peak memory is its own."""
    out = subprocess.run([sys.executable, __file__, "--reference", str(model), str(config), str(dataset),
                          str(resolution)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def service_seconds_per_step(mesh, body: dict, session_id: str) -> float:
    """Grant WARMUP + ROUNDS * STEPS steps and time each window of STEPS steps from the session's
    own progress events (stamped as each report is written)."""
    from datetime import datetime

    import httpx

    with httpx.Client(base_url=mesh.rest_url, timeout=300) as client:
        assert client.post("/sessions", json=body).status_code == 200
        while client.get(f"/sessions/{session_id}").json()["state"] != "waiting":
            time.sleep(0.2)
        last = WARMUP + ROUNDS * STEPS
        client.post(f"/sessions/{session_id}/steps", json={"steps": last})
        times = {}
        with client.stream("GET", f"/sessions/{session_id}/logs/stream") as stream:
            for line in stream.iter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if event["kind"] == "progress":
                    times[event["step"]] = datetime.fromisoformat(event["time"].replace("Z", "+00:00"))
                if last in times:
                    break
        client.post(f"/sessions/{session_id}/abort")
    marks = [WARMUP + i * STEPS for i in range(ROUNDS + 1)]
    return median([(times[b] - times[a]).total_seconds() / STEPS for a, b in zip(marks, marks[1:], strict=False)])


def tiny_cpu() -> None:
    from bench.common import start_mesh, workdir
    from tinymodels import diffusion as tiny_diffusion

    with workdir() as tmp:
        root = Path(tmp)
        model = tiny_diffusion.build_sdxl_single_file(root / "models" / "sdxl.safetensors",
                                                      config_dir=root / "models" / "sdxl-config")
        dataset = tiny_diffusion.build_dataset(root / "media" / "dataset")
        reference_result = run_reference_process(model, root / "models" / "sdxl-config", dataset, 64)
        mesh = start_mesh(root, {"LORAMESH_SDXL_CONFIG": str(root / "models" / "sdxl-config")})
        try:
            body = {"sessionId": "bench", "config": job_config("bench", root / "media" / "out", dataset, model,
                                                               resolution=64)}
            ours = service_seconds_per_step(mesh, body, "bench")
            trainer_peak = peak_rss_mib(mesh.procs["trainer"].pid)
        finally:
            mesh.stop()
    report("tiny SDXL LoRA, 64px, batch 2, cpu", ours, reference_result["seconds_per_step"],
           f"peak RSS: trainer process {trainer_peak:.0f} MiB (gRPC server, NATS client and model), "
           f"reference process {reference_result['peak_mib']:.0f} MiB")


def report(title: str, ours: float, theirs: float, memory: str) -> None:
    print(title)
    print(f"  trainer    {ours * 1000:8.1f} ms/step")
    print(f"  reference  {theirs * 1000:8.1f} ms/step")
    print(f"  ratio      {ours / theirs:8.3f}  (trainer / reference; target <= 1.05)")
    print(f"  {memory}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reference", nargs=4, metavar=("MODEL", "CONFIG", "DATASET", "RESOLUTION"))
    args = parser.parse_args()
    if args.reference:
        from diffusers import StableDiffusionXLPipeline

        model, config, dataset, resolution = args.reference
        pipe = StableDiffusionXLPipeline.from_single_file(model, config=config, torch_dtype=torch.float32)
        seconds = reference(pipe, Path(dataset), int(resolution), STEPS)
        print(json.dumps({"seconds_per_step": seconds, "peak_mib": peak_rss_mib()}))
    else:
        tiny_cpu()


if __name__ == "__main__":
    main()
