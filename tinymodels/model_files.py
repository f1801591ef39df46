"""Tiny single-file models in the layouts people download, laid out in a models root the way
the generation server expects (checkpoints/, diffusion_models/, vae/, clip/, t5/, loras/):

- an SDXL checkpoint in Stability's layout (tiny_diffusion.build_sdxl_single_file);
- an SD1.5 checkpoint in the original LDM layout (`model.diffusion_model.*`,
  `first_stage_model.*`, `cond_stage_model.transformer.*`);
- a VAE in the LDM layout without prefix, as released VAEs are (vae-ft-mse, sdxl_vae, ae);
- a Flux transformer in Black Forest Labs' layout (`double_blocks.*`, `single_blocks.*`,
  fused qkv), with CLIP-L and T5 encoders in the transformers layout (clip_l.safetensors,
  t5xxl.safetensors);
- an SD3.5 checkpoint in Stability's layout (MMDiT `joint_blocks.*` and the VAE), with its
  CLIP-L, CLIP-G and T5 encoders as separate files;
- ControlNets for the SD1.5 UNet (lllyasviel's `control_model.*` layout) and the SDXL UNet
  (diffusers' layout);

plus the diffusers folders single-file loading takes its configs, tokenizers and scheduler
from offline (LORAMESH_SDXL_CONFIG / LORAMESH_SD15_CONFIG / LORAMESH_FLUX_CONFIG /
LORAMESH_SD3_CONFIG).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from services.inference.gguf_files import write_gguf
from tinymodels import diffusion as tiny_diffusion

# --------------------------------------------------------------------------- SD1.5


def sd15_to_original_state_dict(pipe) -> dict:
    """The inverse of diffusers' single-file conversion for SD1.5: UNet, VAE and CLIP text
    encoder under their original LDM keys."""
    checkpoint: dict = {}
    for key, value in tiny_diffusion._unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items():
        checkpoint["model.diffusion_model." + key] = value
    for key, value in tiny_diffusion._vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items():
        checkpoint["first_stage_model." + key] = value
    for key, value in pipe.text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        checkpoint["cond_stage_model.transformer." + key] = value
    return checkpoint


def build_sd15_single_file(out_path: Path, seed: int = 0, config_dir: Path | None = None) -> Path:
    """One .safetensors SD1.5 checkpoint of the tiny SD1.5 pipeline; its diffusers folder goes to
    `config_dir` (default `<stem>-config` beside it), and

        StableDiffusionPipeline.from_single_file(out_path, config=str(config_dir))

    loads exactly that folder's weights."""
    from diffusers import StableDiffusionPipeline

    out_path = Path(out_path)
    config_dir = Path(config_dir) if config_dir is not None else out_path.parent / f"{out_path.stem}-config"
    tiny_diffusion.build_sd15(config_dir, seed)
    pipe = StableDiffusionPipeline.from_pretrained(config_dir, safety_checker=None, requires_safety_checker=False)
    return tiny_diffusion.write_safetensors(sd15_to_original_state_dict(pipe), out_path)


# --------------------------------------------------------------------------- VAE


def vae_to_original_state_dict(vae) -> dict:
    """A diffusers AutoencoderKL under the LDM keys, without prefix (encoder.down.0.block.0...)."""
    return tiny_diffusion._vae_to_ldm(vae.state_dict(), vae.config)


def build_vae_file(out_path: Path, seed: int = 7) -> Path:
    """A standalone SD/SDXL VAE (4 latent channels) with its own random weights, so a test can
    tell whether a pipeline's VAE came from this file or from its checkpoint."""
    vae = tiny_diffusion.tiny_sdxl_pipeline(seed).vae
    return tiny_diffusion.write_safetensors(vae_to_original_state_dict(vae), Path(out_path))


# --------------------------------------------------------------------------- ControlNet


def controlnet_to_original_state_dict(controlnet, unet_config) -> dict:
    """A diffusers ControlNetModel in lllyasviel's layout (`control_model.*`, as
    control_v11p_sd15_canny ships): the UNet encoder's LDM names plus `input_hint_block`,
    `zero_convs` and `middle_block_out`."""
    own = {"controlnet_cond_embedding.conv_in.": "input_hint_block.0.",
           "controlnet_cond_embedding.conv_out.": "input_hint_block.14.",
           "controlnet_mid_block.": "middle_block_out.0."}
    own.update({f"controlnet_cond_embedding.blocks.{j}.": f"input_hint_block.{2 * (j + 1)}." for j in range(6)})
    own.update({f"controlnet_down_blocks.{i}.": f"zero_convs.{i}.0." for i in range(len(controlnet.controlnet_down_blocks))})
    state = controlnet.state_dict()
    encoder = {k: v for k, v in state.items() if not k.startswith("controlnet_")}
    checkpoint = dict(tiny_diffusion._unet_to_ldm(encoder, unet_config))
    checkpoint.update(tiny_diffusion._rename({k: v for k, v in state.items() if k.startswith("controlnet_")}, own))
    return {"control_model." + key: value for key, value in checkpoint.items()}


def build_controlnet_file(pipeline_dir: Path, out_path: Path, seed: int = 3, layout: str = "ldm") -> Path:
    """A ControlNet for the UNet of a tiny pipeline folder, as one .safetensors file: in
    lllyasviel's layout (`layout="ldm"`, SD1.5 ControlNets) or diffusers' (`"diffusers"`, as
    SDXL ControlNets ship). Its encoder starts as a copy of the UNet's, as training starts one;
    the zero-initialised projections (hint output, zero convs, mid block) get random weights so
    the control image visibly steers the image."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(pipeline_dir) / "unet")
    controlnet = ControlNetModel.from_unet(unet)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # The hint encoder keeps the signal of the control image (He-scaled weights, no biases;
        # its output about as strong as the latents it is added to).
        for name, parameter in controlnet.controlnet_cond_embedding.named_parameters():
            fan_in = parameter[0].numel() if parameter.dim() > 1 else 1
            scale = (2.0 / fan_in) ** 0.5 if name.endswith("weight") else 0.0
            scale *= 10.0 if name.startswith("conv_out.") else 1.0
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
        for module in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
            for parameter in module.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    state = controlnet_to_original_state_dict(controlnet, unet.config) if layout == "ldm" else controlnet.state_dict()
    return tiny_diffusion.write_safetensors(state, Path(out_path))


# --------------------------------------------------------------------------- Flux


def _swap_halves(weight):
    import torch

    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _movers(sd: dict, out: dict):
    """take(new, old) moves a layer's weight and bias from diffusers' name `old` in `sd` to the
    original name `new` in `out`; fuse(new, olds) concatenates several layers (q, k, v) into one."""
    import torch

    def take(new: str, old: str) -> None:
        for kind in ("weight", "bias"):
            if f"{old}.{kind}" in sd:
                out[f"{new}.{kind}"] = sd.pop(f"{old}.{kind}")

    def fuse(new: str, olds: list[str]) -> None:
        for kind in ("weight", "bias"):
            out[f"{new}.{kind}"] = torch.cat([sd.pop(f"{old}.{kind}") for old in olds], dim=0)

    return take, fuse


def flux_to_original_state_dict(transformer) -> dict:
    """diffusers FluxTransformer2DModel -> Black Forest Labs' flux1-dev.safetensors layout:
    q/k/v fused into `qkv`, single blocks' q/k/v/mlp fused into `linear1`, and the final
    norm's (scale, shift) stored as (shift, scale)."""

    sd = dict(transformer.state_dict())
    out: dict = {}

    take, fuse = _movers(sd, out)

    for new, old in {"time_in": "time_text_embed.timestep_embedder", "vector_in": "time_text_embed.text_embedder",
                     "guidance_in": "time_text_embed.guidance_embedder"}.items():
        take(f"{new}.in_layer", f"{old}.linear_1")
        take(f"{new}.out_layer", f"{old}.linear_2")
    take("txt_in", "context_embedder")
    take("img_in", "x_embedder")
    for i in range(transformer.config.num_layers):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        take(f"{b}.img_mod.lin", f"{d}.norm1.linear")
        take(f"{b}.txt_mod.lin", f"{d}.norm1_context.linear")
        fuse(f"{b}.img_attn.qkv", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"])
        fuse(f"{b}.txt_attn.qkv", [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"])
        for new, old in {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
                         "txt_attn.norm.query_norm": "attn.norm_added_q",
                         "txt_attn.norm.key_norm": "attn.norm_added_k"}.items():
            out[f"{b}.{new}.scale"] = sd.pop(f"{d}.{old}.weight")
        take(f"{b}.img_mlp.0", f"{d}.ff.net.0.proj")
        take(f"{b}.img_mlp.2", f"{d}.ff.net.2")
        take(f"{b}.txt_mlp.0", f"{d}.ff_context.net.0.proj")
        take(f"{b}.txt_mlp.2", f"{d}.ff_context.net.2")
        take(f"{b}.img_attn.proj", f"{d}.attn.to_out.0")
        take(f"{b}.txt_attn.proj", f"{d}.attn.to_add_out")
    for i in range(transformer.config.num_single_layers):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        take(f"{b}.modulation.lin", f"{d}.norm.linear")
        fuse(f"{b}.linear1", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"])
        out[f"{b}.norm.query_norm.scale"] = sd.pop(f"{d}.attn.norm_q.weight")
        out[f"{b}.norm.key_norm.scale"] = sd.pop(f"{d}.attn.norm_k.weight")
        take(f"{b}.linear2", f"{d}.proj_out")
    take("final_layer.linear", "proj_out")
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(sd.pop(f"norm_out.linear.{kind}"))
    if sd:
        raise KeyError(f"no original-layout name for {sorted(sd)}")
    return out


def t5_encoder_state_dict(text_encoder_2) -> dict:
    """T5EncoderModel weights as t5xxl_fp16.safetensors holds them: the tied token embedding
    once, as `shared.weight`."""
    return {k: v for k, v in text_encoder_2.state_dict().items() if k != "encoder.embed_tokens.weight"}


def _tiny_pipeline(build, seed: int, config_dir: Path | None, config_seed: int) -> tuple[object, dict[str, Path]]:
    """The tiny pipeline `build` makes of `seed` (built in a temporary folder and loaded), and the
    files written so far: "config", a folder `build` made of `config_seed` in `config_dir`."""
    from diffusers import DiffusionPipeline

    written: dict[str, Path] = {}
    if config_dir is not None:
        written["config"] = Path(build(Path(config_dir), config_seed))
    with tempfile.TemporaryDirectory() as tmp:
        pipe = DiffusionPipeline.from_pretrained(build(Path(tmp) / "pipeline", seed))
    return pipe, written


def _write_states(states: dict, out: dict[str, Path], written: dict[str, Path]) -> dict[str, Path]:
    """Each asked file of `out` written from its state dict in `states`; `written` with them."""
    for name, path in out.items():
        written[name] = tiny_diffusion.write_safetensors(states[name], Path(path))
    return written


def build_flux_files(out: dict[str, Path], seed: int = 1, config_dir: Path | None = None,
                     config_seed: int = 0) -> dict[str, Path]:
    """The files of a tiny Flux model as people download them: out["transformer"] (BFL
    layout), out["clip_l"], out["t5xxl"] (transformers layout) and out["vae"] (LDM layout, as
    ae.safetensors), all from a tiny FLUX.1-dev pipeline of `seed`. `config_dir` receives a
    tiny FLUX.1-dev diffusers folder of `config_seed` (configs, tokenizers, scheduler, and
    weights for components a load does not name)."""
    pipe, written = _tiny_pipeline(tiny_diffusion.build_flux, seed, config_dir, config_seed)
    states = {
        "transformer": flux_to_original_state_dict(pipe.transformer),
        "clip_l": pipe.text_encoder.state_dict(),
        "t5xxl": t5_encoder_state_dict(pipe.text_encoder_2),
        "vae": vae_to_original_state_dict(pipe.vae),
    }
    return _write_states(states, out, written)


# --------------------------------------------------------------------------- SD3


def sd3_to_original_state_dict(transformer) -> dict:
    """The inverse of diffusers' single-file conversion for SD3: an SD3Transformer2DModel
    under Stability's MMDiT keys (`joint_blocks.N.x_block` / `context_block`, q/k/v fused
    into `qkv`, `x_embedder`, `t_embedder`, `y_embedder`), without the
    `model.diffusion_model.` prefix. The last block's context side only modulates, and stores
    its (scale, shift) as (shift, scale), as the final layer does."""

    sd = dict(transformer.state_dict())
    out: dict = {"pos_embed": sd.pop("pos_embed.pos_embed")}

    take, fuse = _movers(sd, out)

    take("x_embedder.proj", "pos_embed.proj")
    take("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    take("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    take("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
    take("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    take("context_embedder", "context_embedder")
    last = transformer.config.num_layers - 1
    for i in range(transformer.config.num_layers):
        d, x, c = f"transformer_blocks.{i}", f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
        fuse(f"{x}.attn.qkv", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"])
        fuse(f"{c}.attn.qkv", [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"])
        for new, old in {f"{x}.attn.ln_q": "attn.norm_q", f"{x}.attn.ln_k": "attn.norm_k",
                         f"{c}.attn.ln_q": "attn.norm_added_q", f"{c}.attn.ln_k": "attn.norm_added_k"}.items():
            take(new, f"{d}.{old}")
        take(f"{x}.attn.proj", f"{d}.attn.to_out.0")
        take(f"{x}.adaLN_modulation.1", f"{d}.norm1.linear")
        take(f"{x}.mlp.fc1", f"{d}.ff.net.0.proj")
        take(f"{x}.mlp.fc2", f"{d}.ff.net.2")
        if i == last:
            for kind in ("weight", "bias"):
                out[f"{c}.adaLN_modulation.1.{kind}"] = _swap_halves(sd.pop(f"{d}.norm1_context.linear.{kind}"))
        else:
            take(f"{c}.attn.proj", f"{d}.attn.to_add_out")
            take(f"{c}.adaLN_modulation.1", f"{d}.norm1_context.linear")
            take(f"{c}.mlp.fc1", f"{d}.ff_context.net.0.proj")
            take(f"{c}.mlp.fc2", f"{d}.ff_context.net.2")
    take("final_layer.linear", "proj_out")
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(sd.pop(f"norm_out.linear.{kind}"))
    if sd:
        raise KeyError(f"no original-layout name for {sorted(sd)}")
    return out


def build_sd3_files(out: dict[str, Path], seed: int = 1, config_dir: Path | None = None,
                    config_seed: int = 0) -> dict[str, Path]:
    """The files of a tiny SD3.5 model as Stability ships them: out["checkpoint"] holds the
    MMDiT (`model.diffusion_model.*`) and the VAE (`first_stage_model.*`, LDM layout), as
    sd3.5_large.safetensors does; out["clip_l"], out["clip_g"] and out["t5xxl"] are the text
    encoders in the transformers layout (text_encoders/clip_l.safetensors, ...). All come from
    a tiny SD3 pipeline of `seed`; `config_dir` receives one of `config_seed` (configs,
    tokenizers, scheduler, weights for components a load does not name)."""
    pipe, written = _tiny_pipeline(tiny_diffusion.build_sd3, seed, config_dir, config_seed)
    checkpoint = {"model.diffusion_model." + k: v for k, v in sd3_to_original_state_dict(pipe.transformer).items()}
    checkpoint.update({"first_stage_model." + k: v for k, v in vae_to_original_state_dict(pipe.vae).items()})
    states = {
        "checkpoint": checkpoint,
        "clip_l": pipe.text_encoder.state_dict(),
        "clip_g": pipe.text_encoder_2.state_dict(),
        "t5xxl": t5_encoder_state_dict(pipe.text_encoder_3),
    }
    return _write_states(states, out, written)


# --------------------------------------------------------------------------- Wan 2.1

# diffusers' WanTransformer3DModel names -> Wan's original ones, applied in order: the inverse
# of diffusers' single-file conversion (its norm2/norm3 swap included).
_WAN_ORIGINAL_NAMES = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1", "self_attn"), ("attn2", "cross_attn"),
    (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"), (".norm2.", ".norm3."),
    ("proj_out", "head.head"),
)


def wan_to_original_state_dict(transformer) -> dict:
    """A WanTransformer3DModel under the keys of Wan's released files (and ComfyUI's
    repackaged wan2.1_t2v_*.safetensors): `blocks.N.self_attn.q`, `cross_attn`, `ffn.0`,
    `modulation`, `patch_embedding`, `text_embedding.0`, `time_projection.1`, `head.head`,
    `head.modulation`. Checked by converting back with diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    state = transformer.state_dict()
    out: dict = {}
    for key, value in state.items():
        new = key
        for diffusers_name, original in _WAN_ORIGINAL_NAMES:
            new = new.replace(diffusers_name, original)
        if new == "scale_shift_table":
            new = "head.modulation"
        new = new.replace(".scale_shift_table", ".modulation")
        out[new] = value
    back = convert_wan_transformer_to_diffusers(dict(out))
    if set(back) != set(state):
        raise KeyError(f"Wan layout does not convert back: {sorted(set(back) ^ set(state))[:5]}")
    return out


_WAN_RESIDUAL_PARTS = {"norm1.gamma": "residual.0.gamma", "conv1.": "residual.2.", "norm2.gamma": "residual.3.gamma",
                       "conv2.": "residual.6.", "conv_shortcut.": "shortcut."}


def _wan_residual(rest: str) -> str:
    for diffusers_part, original in _WAN_RESIDUAL_PARTS.items():
        if rest.startswith(diffusers_part):
            return original + rest[len(diffusers_part):]
    return rest


def wan_vae_to_original_state_dict(vae) -> dict:
    """An AutoencoderKLWan under the keys of Wan's wan_2.1_vae.safetensors (`encoder.conv1`,
    `encoder.downsamples.N.residual.M`, `middle.0/1/2`, `head.0/2`, `conv1`/`conv2` for the
    quant convs, `decoder.upsamples.N` with the up blocks' resnets and upsamplers in one flat
    list of 4 per block): the inverse of diffusers' converter, which assumes Wan's 4 stages of
    3 decoder resnets. Checked by converting back."""
    import re

    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    state = vae.state_dict()
    out: dict = {}
    for key, value in state.items():
        new = {"quant_conv.weight": "conv1.weight", "quant_conv.bias": "conv1.bias",
               "post_quant_conv.weight": "conv2.weight", "post_quant_conv.bias": "conv2.bias"}.get(key)
        if new is None:
            side, rest = key.split(".", 1)
            if rest.startswith("conv_in."):
                new = f"{side}.conv1.{rest[len('conv_in.'):]}"
            elif rest == "norm_out.gamma":
                new = f"{side}.head.0.gamma"
            elif rest.startswith("conv_out."):
                new = f"{side}.head.2.{rest[len('conv_out.'):]}"
            elif match := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
                new = f"{side}.middle.{2 * int(match[1])}.{_wan_residual(match[2])}"
            elif rest.startswith("mid_block.attentions.0."):
                new = f"{side}.middle.1.{rest[len('mid_block.attentions.0.'):]}"
            elif match := re.match(r"down_blocks\.(\d+)\.(.*)", rest):
                new = f"{side}.downsamples.{match[1]}.{_wan_residual(match[2])}"
            elif match := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
                new = f"{side}.upsamples.{4 * int(match[1]) + int(match[2])}.{_wan_residual(match[3])}"
            elif match := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", rest):
                new = f"{side}.upsamples.{4 * int(match[1]) + 3}.{match[2]}"
            else:
                raise KeyError(f"no Wan VAE name for {key}")
        out[new] = value
    back = convert_wan_vae_to_diffusers(dict(out))
    if set(back) != set(state):
        raise KeyError(f"Wan VAE layout does not convert back: {sorted(set(back) ^ set(state))[:5]}")
    return out


def build_wan21_files(out: dict[str, Path], seed: int = 1, config_dir: Path | None = None,
                      config_seed: int = 0) -> dict[str, Path]:
    """The files of a tiny Wan 2.1 text-to-video model as people download them:
    out["transformer"] and out["vae"] in Wan's original layouts, out["t5xxl"] (UMT5 encoder,
    transformers layout),
    all from a tiny Wan pipeline of `seed`; `config_dir` receives one of `config_seed` (configs,
    tokenizer, scheduler)."""
    pipe, written = _tiny_pipeline(tiny_diffusion.build_wan21, seed, config_dir, config_seed)
    states = {
        "transformer": wan_to_original_state_dict(pipe.transformer),
        "t5xxl": t5_encoder_state_dict(pipe.text_encoder),
        "vae": wan_vae_to_original_state_dict(pipe.vae),
    }
    return _write_states(states, out, written)


def build_wan22_files(out: dict[str, Path], seed: int = 1, config_dir: Path | None = None,
                      config_seed: int = 0) -> dict[str, Path]:
    """The two experts of a tiny Wan 2.2 A14B as ComfyUI repackages them, in Wan's layout:
    out["high_noise"] (the pipeline's transformer) and out["low_noise"] (its transformer_2), from
    a tiny Wan 2.2 pipeline of `seed` (whose UMT5 encoder and VAE are build_wan21_files' of the
    same seed); `config_dir` receives a whole one of `config_seed`."""
    written: dict[str, Path] = {}
    if config_dir is not None:
        tiny_diffusion.build_wan22(Path(config_dir), config_seed)
        written["config"] = Path(config_dir)
    pipe = tiny_diffusion.tiny_wan_pipeline(seed, experts=2)
    experts = {"high_noise": pipe.transformer, "low_noise": pipe.transformer_2}
    for name, path in out.items():
        written[name] = tiny_diffusion.write_safetensors(wan_to_original_state_dict(experts[name]), Path(path))
    return written


def write_wan_lora(pipeline_dir: Path, out_path: Path, seed: int = 0, rank: int = 4) -> Path:
    """A LoRA for the Wan transformer of a pipeline folder as ai-toolkit saves Wan 2.1/2.2 ones
    (one file per expert for Wan 2.2): peft lora_A/lora_B pairs on the attention projections and
    the feed-forward layers under Wan's original names with a `diffusion_model.` prefix
    (`diffusion_model.blocks.0.self_attn.q.lora_A.weight`), random and non-zero so it visibly
    changes a video."""
    import torch
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = WanTransformer3DModel.load_config(Path(pipeline_dir) / "transformer")
    model = WanTransformer3DModel.from_config(config)
    torch.manual_seed(seed)
    lora = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                      target_modules=["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"])
    layers = get_peft_model_state_dict(inject_adapter_in_model(lora, model))
    state = {}
    for key, value in layers.items():
        for diffusers_name, original in _WAN_ORIGINAL_NAMES:
            key = key.replace(diffusers_name, original)
        state["diffusion_model." + key] = value.detach().contiguous()
    return tiny_diffusion.write_safetensors(state, Path(out_path))


# --------------------------------------------------------------------------- GGUF


# write_gguf (city96's layout, linear weights quantized) is the inference service's own writer,
# so test models and converted ones are the same kind of file. The gguf package cannot write
# K-quants, so K-quant files are encoded here.


def quantize_q4_k(values):
    """float32 rows (width a multiple of 256) -> GGML Q4_K blocks (uint8, 144 bytes per 256
    weights), as llama.cpp lays them out: per super-block an f16 scale `d` and min scale
    `dmin`, 6-bit scales and mins of its eight 32-weight sub-blocks packed into 12 bytes, and
    4-bit quants (sub-blocks 2j and 2j+1 in the low and high nibbles of the same 32 bytes).
    A weight is d*scale*q - dmin*min. Plain min/max fitting, no search: a test fixture."""
    import numpy as np

    x = np.asarray(values, dtype=np.float32).reshape(-1, 8, 32)  # super-blocks of 8 sub-blocks
    low = np.minimum(x.min(axis=-1), 0.0)
    sub_scale = (np.maximum(x.max(axis=-1), 0.0) - low) / 15
    sub_min = -low
    d = (sub_scale.max(axis=-1) / 63).astype(np.float16)
    dmin = (sub_min.max(axis=-1) / 63).astype(np.float16)

    def six_bits(part, whole):
        whole = whole.astype(np.float32)[:, None]
        return np.clip(np.round(np.divide(part, whole, out=np.zeros_like(part), where=whole > 0)), 0, 63)

    sc, mn = six_bits(sub_scale, d).astype(np.uint8), six_bits(sub_min, dmin).astype(np.uint8)
    step = (d.astype(np.float32)[:, None] * sc)[..., None]
    offset = (dmin.astype(np.float32)[:, None] * mn)[..., None]
    q = np.clip(np.round(np.divide(x + offset, step, out=np.zeros_like(x), where=step > 0)), 0, 15).astype(np.uint8)
    scales = np.concatenate([
        (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6),
        (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6),
        (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4),
    ], axis=-1)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), scales, qs],
                            axis=-1)
    rows = np.asarray(values).shape
    return blocks.reshape(*rows[:-1], rows[-1] // 256 * 144)


def write_q4_k_s_gguf(state_dict: dict, out_path: Path, arch: str = "flux") -> Path:
    """A Q4_K_S-style GGUF of torch tensors (city96's layout): linear weights whose rows split
    into 256-weight super-blocks in Q4_K, the narrower ones in Q5_0 (llama.cpp's fallback for
    Q4_K), biases and norms in F32."""
    import gguf
    import numpy as np
    from gguf import quants

    from services.inference.gguf_files import default_type

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out_path, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, tensor in state_dict.items():
        data = tensor.float().numpy()
        kind = default_type(name, data.shape, gguf.GGMLQuantizationType.Q4_K)
        if kind == gguf.GGMLQuantizationType.Q4_K:
            writer.add_tensor(name, quantize_q4_k(data), raw_dtype=kind)
            continue
        kind = default_type(name, data.shape, gguf.GGMLQuantizationType.Q5_0)
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, np.ascontiguousarray(data))
        else:
            writer.add_tensor(name, quants.quantize(data, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


# --------------------------------------------------------------------------- GGUF components
# Text encoders as llama.cpp's convert_hf_to_gguf.py writes them (llama.cpp's tensor names, the
# `<arch>.*` header keys transformers rebuilds a config from) and a VAE as stable-diffusion.cpp's
# converter writes one (the source file's names).


def _llama_cpp_metadata(arch: str, config, name: str) -> dict:
    """The header keys llama.cpp writes for a transformers `config` (those transformers'
    load_gguf_checkpoint reads back: GGUF_CONFIG_MAPPING)."""
    if arch in ("t5", "t5encoder"):
        keys = {"context_length": getattr(config, "n_positions", None) or 512, "embedding_length": config.d_model,
                "feed_forward_length": config.d_ff, "block_count": config.num_layers,
                "attention.head_count": config.num_heads, "attention.key_length": config.d_kv,
                "attention.value_length": config.d_kv, "attention.layer_norm_epsilon": float(config.layer_norm_epsilon),
                "attention.relative_buckets_count": config.relative_attention_num_buckets,
                "decoder_start_token_id": config.decoder_start_token_id or 0}
    else:
        rope = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        keys = {"context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
                "feed_forward_length": config.intermediate_size, "block_count": config.num_hidden_layers,
                "attention.head_count": config.num_attention_heads,
                "attention.head_count_kv": config.num_key_value_heads, "attention.key_length": head_dim,
                "attention.value_length": head_dim, "rope.freq_base": float(rope),
                "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps)}
        sections = ((getattr(config, "rope_parameters", None) or {}).get("mrope_section")
                    or (getattr(config, "rope_scaling", None) or {}).get("mrope_section"))
        if sections:  # Qwen2-VL's multimodal rotary sections, padded to llama.cpp's four
            keys["rope.dimension_sections"] = [*sections, *[0] * (4 - len(sections))]
    keys["vocab_size"] = config.vocab_size
    return {"general.name": name, **{f"{arch}.{key}": value for key, value in keys.items()}}


def write_llama_cpp_gguf(state_dict: dict, config, out_path: Path, arch: str, name: str,
                         qtype: str = "q8_0") -> Path:
    """A transformers text model's weights as a llama.cpp GGUF of `arch` ("qwen3", "qwen2vl",
    "t5encoder", ...): tensors named by gguf's TensorNameMap (token_embd, blk.N.attn_q,
    enc.blk.N.attn_rel_b, ...), 2-D weights in `qtype`, the rest F32, and the header keys of
    `config`. `state_dict` holds the text model only (a VL model's language model, without its
    vision tower), under transformers' names; a VL model's `model.language_model.` is llama.cpp's
    `model.`."""
    import gguf

    from services.inference.gguf_files import default_type, ggml_type, write_tensors

    arch_id = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch)
    layers = getattr(config, "num_hidden_layers", None) or config.num_layers
    name_map = gguf.get_tensor_name_map(arch_id, layers)
    renamed: dict = {}
    for key, tensor in state_dict.items():
        stem, suffix = key.rsplit(".", 1)
        new = name_map.get_name(stem.replace("model.language_model.", "model."))
        if new is None:
            raise KeyError(f"no llama.cpp {arch} name for {key}")
        renamed[f"{new}.{suffix}"] = tensor
    kind = ggml_type(qtype)
    plan = [(key, tuple(t.shape), default_type(key, tuple(t.shape), kind)) for key, t in renamed.items()]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_tensors(out_path, arch, plan, lambda key: renamed[key].float().numpy(),
                  metadata=_llama_cpp_metadata(arch, config, name))
    return out_path


def write_vae_gguf(state_dict: dict, out_path: Path, qtype: str = "q8_0") -> Path:
    """A VAE in the original layout as a GGUF, as stable-diffusion.cpp's converter makes
    ae_q8_0.gguf: its own tensor names, weights whose rows split into whole blocks in `qtype`,
    other convolution weights F16, biases and norms F32 (a tiny VAE's rows are all narrower than
    a block, so it holds F16 and F32 only)."""
    import gguf

    from services.inference.gguf_files import ggml_type, stored_type, write_tensors

    kind = ggml_type(qtype)

    def typed(shape):
        if len(shape) < 2:
            return gguf.GGMLQuantizationType.F32
        chosen = stored_type(kind, shape)
        return gguf.GGMLQuantizationType.F16 if chosen == gguf.GGMLQuantizationType.F32 else chosen

    plan = [(key, tuple(t.shape), typed(tuple(t.shape))) for key, t in state_dict.items()]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_tensors(out_path, "vae", plan, lambda key: state_dict[key].float().numpy())
    return out_path


def z_image_to_original_state_dict(transformer) -> dict:
    """A diffusers ZImageTransformer2DModel under the released Z-Image layout (fused qkv,
    `attention.out`, `q_norm`/`k_norm`, `final_layer`, `x_embedder`)."""
    import torch

    state = transformer.state_dict()
    renames = {"all_final_layer.2-1.": "final_layer.", "all_x_embedder.2-1.": "x_embedder.",
               ".attention.to_out.0.": ".attention.out.", ".attention.norm_k.": ".attention.k_norm.",
               ".attention.norm_q.": ".attention.q_norm."}
    out = {}
    for key, value in state.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            parts = [state[key.replace("to_q", name)] for name in ("to_q", "to_k", "to_v")]
            key, value = key.replace("to_q", "qkv"), torch.cat(parts, dim=0)
        for old, new in renames.items():
            key = key.replace(old, new)
        out[key] = value
    return out


def build_z_image_files(out: dict[str, Path], seed: int = 1, config_dir: Path | None = None,
                        config_seed: int = 0) -> dict[str, Path]:
    """The files of a tiny Z-Image Turbo as the seed's example loads them, all from a tiny
    Z-Image pipeline of `seed`: out["transformer"] (z_image_turbo-Q8_0.gguf: the released layout,
    Q8_0), out["llm"] (qwen_3_4b.Q8_0.gguf: the Qwen3 text encoder as a llama.cpp "qwen3" GGUF)
    and out["vae"] (ae_q8_0.gguf: the Flux VAE, LDM layout, Q8_0 where it fits), plus their
    safetensors releases out["llm_safetensors"] (transformers layout) and out["vae_safetensors"]
    (ae.safetensors). `config_dir` receives a Z-Image folder of `config_seed`."""
    pipe, written = _tiny_pipeline(tiny_diffusion.build_zimage, seed, config_dir, config_seed)
    vae = vae_to_original_state_dict(pipe.vae)
    writers = {
        "transformer": lambda path: write_gguf(z_image_to_original_state_dict(pipe.transformer), path, "q8_0",
                                               arch="lumina2"),
        "llm": lambda path: write_llama_cpp_gguf(pipe.text_encoder.state_dict(), pipe.text_encoder.config, path,
                                                 "qwen3", "Qwen3-4B"),
        "vae": lambda path: write_vae_gguf(vae, path),
        "llm_safetensors": lambda path: tiny_diffusion.write_safetensors(pipe.text_encoder.state_dict(), path),
        "vae_safetensors": lambda path: tiny_diffusion.write_safetensors(vae, path),
    }
    for name, path in out.items():
        written[name] = writers[name](Path(path))
    return written


def build_qwen25vl_encoder_files(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """A tiny Qwen2.5-VL (Qwen-Image's text encoder) three ways: out_dir/"text_encoder" (its
    transformers folder, vision tower included, as a diffusers folder's subfolder holds it),
    "qwen_2.5_vl_7b.safetensors" (the same weights in one file) and
    "Qwen2.5-VL-7B-Instruct-Q8_0.gguf" (its language model as llama.cpp's "qwen2vl" GGUF: no vision
    tower, which llama.cpp ships as a separate mmproj file). Keyed "config", "safetensors", "gguf"."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": 320, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
                     "bos_token_id": None, "eos_token_id": 1, "pad_token_id": 0},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                       "out_hidden_size": 32, "fullatt_block_indexes": [0]},
        tie_word_embeddings=False)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.save_pretrained(out_dir / "text_encoder")
    state = model.state_dict()
    written = {"config": out_dir / "text_encoder"}
    written["safetensors"] = tiny_diffusion.write_safetensors(state, out_dir / "qwen_2.5_vl_7b.safetensors")
    language = {k: v for k, v in state.items() if not k.startswith("model.visual.")}
    written["gguf"] = write_llama_cpp_gguf(language, config.text_config, out_dir / "Qwen2.5-VL-7B-Instruct-Q8_0.gguf",
                                           "qwen2vl", "Qwen2.5-VL-7B-Instruct")
    return written


def umt5_encoder_gguf(safetensors_path: Path, config_dir: Path, out_path: Path) -> Path:
    """A UMT5 encoder file (transformers layout) as city96's umt5-xxl-encoder-Q8_0.gguf holds it:
    llama.cpp "t5encoder", named umt5 so transformers reads it as UMT5. `config_dir` is the
    encoder's transformers config folder."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(config_dir)
    return write_llama_cpp_gguf(load_file(str(safetensors_path)), config, out_path, "t5encoder",
                                "umt5-xxl-encoder")


# --------------------------------------------------------------------------- Qwen-Image


def qwen_vl_to_original_state_dict(text_encoder) -> dict:
    """A transformers Qwen2_5_VLForConditionalGeneration under the keys of Qwen2.5-VL-7B-Instruct's
    release and Comfy-Org's text_encoders/qwen_2.5_vl_7b.safetensors: the language model under
    `model.` (`model.layers.N...`, `model.embed_tokens`), the vision tower under `visual.`, and no
    `lm_head` (a text encoder never reads the logits)."""
    out: dict = {}
    for key, value in text_encoder.state_dict().items():
        if key.startswith("model.language_model."):
            out["model." + key.removeprefix("model.language_model.")] = value
        elif key.startswith("model.visual."):
            out[key.removeprefix("model.")] = value
        elif not key.startswith("lm_head."):
            raise KeyError(f"no Qwen2.5-VL release name for {key}")
    return out


def build_qwen_image_files(out: dict[str, Path], seed: int = 1, config_dir: Path | None = None,
                           config_seed: int = 0) -> dict[str, Path]:
    """The files of a tiny Qwen-Image as people download them: out["transformer"] (the
    QwenImageTransformer2DModel under its own names, as Comfy-Org's qwen_image_*.safetensors),
    out["gguf"] (the same transformer as city96's qwen-image-Q8_0.gguf: Q8_0, arch "qwen_image"),
    out["vae"] (Wan's VAE layout, as qwen_image_vae.safetensors), out["llm"] (Qwen2.5-VL in its
    release layout) and out["llm_gguf"] (its language model as llama.cpp's "qwen2vl" GGUF, as
    Qwen2.5-VL-7B-Instruct-Q8_0.gguf), all from a tiny Qwen-Image pipeline of `seed`;
    `config_dir` receives one of `config_seed` (configs, tokenizer, scheduler)."""
    pipe, written = _tiny_pipeline(tiny_diffusion.build_qwen_image, seed, config_dir, config_seed)
    transformer = {k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}
    states = {
        "transformer": transformer,
        "vae": wan_vae_to_original_state_dict(pipe.vae),
        "llm": qwen_vl_to_original_state_dict(pipe.text_encoder),
    }
    for name, path in out.items():
        if name == "gguf":
            written[name] = write_gguf(transformer, Path(path), "q8_0", arch="qwen_image")
        elif name == "llm_gguf":
            language = {k: v for k, v in pipe.text_encoder.state_dict().items() if k.startswith("model.language_model.")}
            written[name] = write_llama_cpp_gguf(language, pipe.text_encoder.config.text_config, Path(path), "qwen2vl",
                                                 "Qwen2.5-VL-7B-Instruct")
        else:
            written[name] = tiny_diffusion.write_safetensors(states[name], Path(path))
    return written


# --------------------------------------------------------------------------- models root


# --------------------------------------------------------------------------- ESRGAN upscalers


def rrdb_to_release_state_dict(model) -> dict:
    """spandrel's RRDBNet (the original ESRGAN keys, `model.N.*`) under the keys Real-ESRGAN's
    BasicSR RRDBNet writes (`conv_first`, `body.N.rdbM.convK`, `conv_body`, `conv_upN`, `conv_hr`,
    `conv_last`), as RealESRGAN_x4plus.pth holds them under `params_ema`."""
    import re

    state = model.state_dict()
    blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"model\.1\.sub\.(\d+)\.RDB", k)))
    ups = sorted({int(k.split(".")[1]) for k in state if re.match(r"model\.(\d+)\.weight", k)} - {0})
    # model.0 conv_first, model.1 trunk, then one conv per upsampling stage, conv_hr, conv_last.
    *up_layers, hr, last = ups[1:] if ups and ups[0] == 1 else ups
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        kind = parts[-1]
        if key.startswith("model.0."):
            out[f"conv_first.{kind}"] = value
        elif key.startswith("model.1.sub."):
            index = int(parts[3])
            if index == blocks:
                out[f"conv_body.{kind}"] = value
            else:  # model.1.sub.I.RDBr.convc.0.kind
                out[f"body.{index}.rdb{parts[4][3:]}.{parts[5]}.{kind}"] = value
        else:
            layer = int(parts[1])
            name = (f"conv_up{up_layers.index(layer) + 1}" if layer in up_layers
                    else "conv_hr" if layer == hr else "conv_last")
            out[f"{name}.{kind}"] = value
    return out


def build_taesd_decoder_file(out_path: Path, latent_channels: int, seed: int = 0) -> Path:
    """A TAESD decoder of the published architecture (diffusers' AutoencoderTiny defaults, about
    1.2 M parameters: small enough to be real size) with random weights, saved as madebyollin
    releases taesd_decoder.safetensors: the decoder's nn.Sequential numbering, whose entry 0 is
    the weightless clamp diffusers applies in forward."""
    import diffusers
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    decoder = diffusers.AutoencoderTiny(latent_channels=latent_channels).decoder
    state = {}
    for key, value in decoder.state_dict().items():
        _, index, rest = key.split(".", 2)  # layers.<n>.<rest>
        state[f"{int(index) + 1}.{rest}"] = value.contiguous()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_path))
    return out_path


def build_esrgan_file(out_path: Path, scale: int = 4, num_filters: int = 8, num_blocks: int = 1, seed: int = 0) -> Path:
    """A tiny RRDBNet ESRGAN (spandrel's own class) saved as Real-ESRGAN releases it: a .pth
    of {"params_ema": state dict in BasicSR's keys}."""
    import torch

    from services.inference.upscaling import import_spandrel

    import_spandrel()
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    model = ESRGAN(in_nc=3, out_nc=3, num_filters=num_filters, num_blocks=num_blocks, scale=scale)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": rrdb_to_release_state_dict(model)}, out_path)
    return out_path


def build_compact_file(out_path: Path, scale: int = 2, num_feat: int = 8, num_conv: int = 2, seed: int = 0) -> Path:
    """A tiny Real-ESRGAN compact model (SRVGGNetCompact, spandrel's class) saved as
    realesr-general-x4v3.pth is: a .pth of {"params": `body.N.*` state dict}."""
    import torch

    from services.inference.upscaling import import_spandrel

    import_spandrel()
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(seed)
    model = Compact(num_in_ch=3, num_out_ch=3, num_feat=num_feat, num_conv=num_conv, upscale=scale)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params": model.state_dict()}, out_path)
    return out_path


# --------------------------------------------------------------------------- DiT ControlNets


def build_z_image_controlnet_file(config_dir: Path, out_path: Path, seed: int = 5) -> Path:
    """A Z-Image ControlNet for the transformer of a tiny Z-Image folder, as one .safetensors
    file in the released Z-Image-Turbo-Fun-Controlnet-Union-2.1 layout (control blocks at every
    transformer layer, a control noise refiner, 33 control input channels). Its zero-initialised
    projections get random weights so the control image visibly steers the image."""
    import torch
    from diffusers import ZImageControlNetModel, ZImageTransformer2DModel

    config = ZImageTransformer2DModel.load_config(Path(config_dir) / "transformer")
    controlnet = ZImageControlNetModel(
        control_layers_places=list(range(config["n_layers"])),
        control_refiner_layers_places=list(range(config["n_refiner_layers"])), control_in_dim=33,
        add_control_noise_refiner="control_noise_refiner", all_patch_size=tuple(config["all_patch_size"]),
        all_f_patch_size=tuple(config["all_f_patch_size"]), dim=config["dim"],
        n_refiner_layers=config["n_refiner_layers"], n_heads=config["n_heads"], n_kv_heads=config["n_kv_heads"],
        norm_eps=config["norm_eps"], qk_norm=config["qk_norm"])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            if "before_proj" in name or "after_proj" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return tiny_diffusion.write_safetensors(controlnet.state_dict(), Path(out_path))


def build_flux_controlnet_file(config_dir: Path, out_path: Path, seed: int = 5, num_mode: int = 10) -> Path:
    """A Flux ControlNet-Union for the transformer of a tiny Flux folder, as one .safetensors file
    in diffusers' layout without a config (as InstantX's FLUX.1-dev-Controlnet-Union ships): one
    double and one single block, a control-mode embedding of `num_mode` modes. Its blocks start
    as copies of the transformer's; the zero-initialised projections get random weights so the
    control image visibly steers the image."""
    import torch
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(Path(config_dir) / "transformer")
    config = dict(transformer.config, num_layers=1, num_single_layers=1, num_mode=num_mode)
    controlnet = FluxControlNetModel.from_config(config)
    for name in ("pos_embed", "time_text_embed", "context_embedder", "x_embedder", "transformer_blocks",
                 "single_transformer_blocks"):
        getattr(controlnet, name).load_state_dict(getattr(transformer, name).state_dict(), strict=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (controlnet.controlnet_x_embedder, *controlnet.controlnet_blocks,
                       *controlnet.controlnet_single_blocks, controlnet.controlnet_mode_embedder):
            for parameter in module.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return tiny_diffusion.write_safetensors(controlnet.state_dict(), Path(out_path))


def _randomised(modules, seed: int, scale: float = 0.5) -> None:
    """Random weights for a ControlNet's zero-initialised projections, so the control image
    visibly steers the image."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for parameter in module.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def build_sd3_controlnet_file(config_dir: Path, out_path: Path, seed: int = 5) -> Path:
    """An SD3.5 ControlNet for the transformer of a tiny SD3 folder, as one .safetensors file in
    diffusers' layout without a config (as stabilityai/stable-diffusion-3.5-large-controlnet-canny's
    diffusion_pytorch_model.safetensors): two single blocks, no caption embedder, no positional
    embedding of its own (the pipeline lends it the transformer's)."""
    from diffusers import SD3ControlNetModel, SD3Transformer2DModel

    config = SD3Transformer2DModel.load_config(Path(config_dir) / "transformer")
    keep = ("sample_size", "patch_size", "in_channels", "attention_head_dim", "num_attention_heads",
            "caption_projection_dim", "pooled_projection_dim", "out_channels", "pos_embed_max_size")
    controlnet = SD3ControlNetModel(**{k: config[k] for k in keep}, num_layers=2, joint_attention_dim=None,
                                    use_pos_embed=False, pos_embed_type=None, force_zeros_for_pooled_projection=False)
    _randomised((controlnet.pos_embed_input, *controlnet.controlnet_blocks), seed)
    return tiny_diffusion.write_safetensors(controlnet.state_dict(), Path(out_path))


def build_qwen_image_controlnet_file(config_dir: Path, out_path: Path, seed: int = 5) -> Path:
    """A Qwen-Image ControlNet for the transformer of a tiny Qwen-Image folder, as one
    .safetensors file in diffusers' layout without a config (as InstantX's
    Qwen-Image-ControlNet-Union ships): one block, its embedders copied from the transformer."""
    from diffusers import QwenImageControlNetModel, QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel.from_pretrained(Path(config_dir) / "transformer")
    own = transformer.config
    controlnet = QwenImageControlNetModel.from_transformer(
        transformer, num_layers=1, attention_head_dim=own.attention_head_dim, num_attention_heads=own.num_attention_heads)
    _randomised((controlnet.controlnet_x_embedder, *controlnet.controlnet_blocks), seed)
    return tiny_diffusion.write_safetensors(controlnet.state_dict(), Path(out_path))


def build_models_root(root: Path) -> dict[str, Path]:
    """A models root holding one tiny model of each kind:

        checkpoints/tiny-sdxl.safetensors          SDXL (Stability layout)
        checkpoints/SD1x/tiny-sd15.safetensors     SD1.5 (LDM layout)
        checkpoints/sd3.5_large.safetensors        SD3.5: MMDiT + VAE (Stability layout)
        diffusion_models/tiny-flux.safetensors     Flux transformer (BFL layout)
        diffusion_models/flux1-schnell-Q8_0.gguf   the same transformer as GGUF, Q8_0
        diffusion_models/flux1-dev-Q4_K_S.gguf     the same transformer as GGUF, Q4_K (Q5_0 where rows are narrower)
        vae/tiny-sd-vae.safetensors                SD/SDXL VAE, its own weights
        vae/tiny-flux-ae.safetensors               Flux VAE
        clip/tiny-clip_l.safetensors               CLIP-L (transformers layout)
        t5/tiny-t5xxl.safetensors                  T5 encoder (transformers layout)
        clip/clip_l.safetensors, clip/clip_g.safetensors, t5/t5xxl_fp16.safetensors
                                                   SD3.5's text encoders, named as the seed names them
        diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors   Wan 2.1 T2V transformer (Wan's layout)
        t5/umt5_xxl_fp16.safetensors, vae/wan_2.1_vae.safetensors   its UMT5 encoder and video VAE
        controlnet/control_v11p_sd15_canny.safetensors   SD1.5 ControlNet (lllyasviel's layout)
        controlnet/diffusers_xl_canny_full.safetensors   SDXL ControlNet (diffusers layout)
        controlnet/Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors   Z-Image ControlNet (released layout)
        controlnet/FLUX.1-dev-Controlnet-Union.safetensors   Flux ControlNet-Union (diffusers layout, no config)
        controlnet/SD3.5-Large-Controlnet-Canny.safetensors   SD3.5 ControlNet (diffusers layout, no config)
        controlnet/Qwen-Image-ControlNet-Union.safetensors   Qwen-Image ControlNet (diffusers layout, no config)
        loras/                                     empty
        configs/{sdxl,sd15,flux,sd3,wan21}/             diffusers folders for LORAMESH_*_CONFIG
        diffusion_models/z_image_turbo-Q8_0.gguf, llm/qwen_3_4b.Q8_0.gguf, vae/ae_q8_0.gguf
                                                   Z-Image Turbo as the seed loads it: transformer,
                                                   Qwen3 encoder (llama.cpp GGUF), Flux VAE (GGUF)
        llm/qwen_3_4b.safetensors, vae/ae.safetensors   the same encoder and VAE as safetensors
        configs/zimage/                            its diffusers folder (LORAMESH_ZIMAGE_CONFIG)
        t5/umt5-xxl-encoder-Q8_0.gguf              Wan's UMT5 encoder as city96's GGUF ("t5encoder")
        diffusion_models/wan2.1-t2v-14b-Q8_0.gguf  the Wan 2.1 transformer as city96's GGUF (Wan's layout), Q8_0
        diffusion_models/wan2.2_t2v_{low,high}_noise_14B_fp16.safetensors   Wan 2.2 A14B's two experts
                                                   (Wan's layout), with Wan 2.1's UMT5 encoder and VAE
        configs/wan22/                             its diffusers folder (LORAMESH_WAN22_CONFIG)
        diffusion_models/qwen_image_tiny.safetensors, diffusion_models/qwen-image-Q8_0.gguf
                                                   Qwen-Image transformer (Comfy-Org's layout; city96's GGUF)
        vae/qwen_image_vae.safetensors, llm/qwen_2.5_vl_7b.safetensors   its VAE (Wan layout) and
                                                   Qwen2.5-VL encoder (release layout)
        llm/Qwen2.5-VL-7B-Instruct-Q8_0.gguf       that encoder's language model (llama.cpp "qwen2vl")
        configs/qwen_image/                        its diffusers folder (LORAMESH_QWEN_IMAGE_CONFIG)
        esrgan/RealESRGAN_x4plus.pth               ESRGAN 4x (RRDBNet, Real-ESRGAN's release layout)
        esrgan/realesr-compact-x2.pth              Real-ESRGAN compact 2x (SRVGGNetCompact)
        taesd/taesdxl_decoder.safetensors          TAESDXL decoder (4-channel latents: SD1.5, SDXL)
        taesd/taef1_decoder.safetensors            TAEF1 decoder (16-channel latents: Flux, Z-Image)

    Returns the path of each, keyed "root", "sdxl", "sd15", "flux", "vae", "flux_vae",
    "flux_gguf_q8_0", "flux_gguf_q4", "clip_l", "t5xxl", "loras", "sdxl_config", "sd15_config", "flux_config",
    "sd3", "sd3_clip_l",
    "sd3_clip_g", "sd3_t5xxl", "sd3_config", "sd15_controlnet", "sdxl_controlnet", "wan21", "wan21_t5xxl", "wan21_vae", "wan21_config", "zimage_gguf",
    "zimage_llm_gguf", "zimage_vae_gguf", "zimage_llm", "zimage_vae", "zimage_config", "wan21_t5xxl_gguf",
    "wan21_gguf_q8_0", "wan22_low", "wan22_high", "wan22_config", "qwen_image", "qwen_image_gguf",
    "qwen_image_vae", "qwen_image_llm", "qwen_image_llm_gguf", "qwen_image_config", "esrgan_x4", "esrgan_x2",
    "zimage_controlnet", "flux_controlnet", "sd3_controlnet", "qwen_image_controlnet", "taesdxl", "taef1"."""
    root = Path(root)
    configs = root / "configs"
    paths: dict[str, Path] = {"root": root}
    paths["sdxl"] = tiny_diffusion.build_sdxl_single_file(
        root / "checkpoints" / "tiny-sdxl.safetensors", seed=0, config_dir=configs / "sdxl")
    paths["sdxl_config"] = configs / "sdxl"
    paths["sd15"] = build_sd15_single_file(root / "checkpoints" / "SD1x" / "tiny-sd15.safetensors", seed=0,
                                           config_dir=configs / "sd15")
    paths["sd15_config"] = configs / "sd15"
    paths["vae"] = build_vae_file(root / "vae" / "tiny-sd-vae.safetensors", seed=7)
    flux = build_flux_files({
        "transformer": root / "diffusion_models" / "tiny-flux.safetensors",
        "clip_l": root / "clip" / "tiny-clip_l.safetensors",
        "t5xxl": root / "t5" / "tiny-t5xxl.safetensors",
        "vae": root / "vae" / "tiny-flux-ae.safetensors",
    }, seed=1, config_dir=configs / "flux", config_seed=0)
    paths.update(flux=flux["transformer"], clip_l=flux["clip_l"], t5xxl=flux["t5xxl"], flux_vae=flux["vae"],
                 flux_config=flux["config"])
    # The same Flux transformer as GGUF, named as the seed names its downloads.
    from safetensors.torch import load_file

    flux_weights = load_file(paths["flux"])
    paths["flux_gguf_q8_0"] = write_gguf(flux_weights, root / "diffusion_models" / "flux1-schnell-Q8_0.gguf", "q8_0")
    paths["flux_gguf_q4"] = write_q4_k_s_gguf(flux_weights, root / "diffusion_models" / "flux1-dev-Q4_K_S.gguf")
    sd3 = build_sd3_files({
        "checkpoint": root / "checkpoints" / "sd3.5_large.safetensors",
        "clip_l": root / "clip" / "clip_l.safetensors",
        "clip_g": root / "clip" / "clip_g.safetensors",
        "t5xxl": root / "t5" / "t5xxl_fp16.safetensors",
    }, seed=1, config_dir=configs / "sd3", config_seed=0)
    paths.update(sd3=sd3["checkpoint"], sd3_clip_l=sd3["clip_l"], sd3_clip_g=sd3["clip_g"], sd3_t5xxl=sd3["t5xxl"],
                 sd3_config=sd3["config"])
    wan = build_wan21_files({
        "transformer": root / "diffusion_models" / "wan2.1_t2v_1.3B_fp16.safetensors",
        "t5xxl": root / "t5" / "umt5_xxl_fp16.safetensors",
        "vae": root / "vae" / "wan_2.1_vae.safetensors",
    }, seed=1, config_dir=configs / "wan21", config_seed=0)
    paths.update(wan21=wan["transformer"], wan21_t5xxl=wan["t5xxl"], wan21_vae=wan["vae"], wan21_config=wan["config"])
    paths["sd15_controlnet"] = build_controlnet_file(paths["sd15_config"],
                                                     root / "controlnet" / "control_v11p_sd15_canny.safetensors")
    paths["sdxl_controlnet"] = build_controlnet_file(paths["sdxl_config"],
                                                     root / "controlnet" / "diffusers_xl_canny_full.safetensors",
                                                     layout="diffusers")
    z_image = build_z_image_files({
        "transformer": root / "diffusion_models" / "z_image_turbo-Q8_0.gguf",
        "llm": root / "llm" / "qwen_3_4b.Q8_0.gguf", "vae": root / "vae" / "ae_q8_0.gguf",
        "llm_safetensors": root / "llm" / "qwen_3_4b.safetensors", "vae_safetensors": root / "vae" / "ae.safetensors",
    }, seed=1, config_dir=configs / "zimage", config_seed=0)
    paths.update(zimage_gguf=z_image["transformer"], zimage_llm_gguf=z_image["llm"], zimage_vae_gguf=z_image["vae"],
                 zimage_llm=z_image["llm_safetensors"], zimage_vae=z_image["vae_safetensors"],
                 zimage_config=z_image["config"])
    paths["wan21_t5xxl_gguf"] = umt5_encoder_gguf(paths["wan21_t5xxl"], paths["wan21_config"] / "text_encoder",
                                                  root / "t5" / "umt5-xxl-encoder-Q8_0.gguf")
    paths["wan21_gguf_q8_0"] = write_gguf(load_file(paths["wan21"]), root / "diffusion_models" /
                                          "wan2.1-t2v-14b-Q8_0.gguf", "q8_0", arch="wan")
    wan22 = build_wan22_files({
        "low_noise": root / "diffusion_models" / "wan2.2_t2v_low_noise_14B_fp16.safetensors",
        "high_noise": root / "diffusion_models" / "wan2.2_t2v_high_noise_14B_fp16.safetensors",
    }, seed=1, config_dir=configs / "wan22", config_seed=0)
    paths.update(wan22_low=wan22["low_noise"], wan22_high=wan22["high_noise"], wan22_config=wan22["config"])
    qwen_image = build_qwen_image_files({
        "transformer": root / "diffusion_models" / "qwen_image_tiny.safetensors",
        "gguf": root / "diffusion_models" / "qwen-image-Q8_0.gguf",
        "vae": root / "vae" / "qwen_image_vae.safetensors", "llm": root / "llm" / "qwen_2.5_vl_7b.safetensors",
        "llm_gguf": root / "llm" / "Qwen2.5-VL-7B-Instruct-Q8_0.gguf",
    }, seed=1, config_dir=configs / "qwen_image", config_seed=0)
    paths.update(qwen_image=qwen_image["transformer"], qwen_image_gguf=qwen_image["gguf"],
                 qwen_image_vae=qwen_image["vae"], qwen_image_llm=qwen_image["llm"],
                 qwen_image_llm_gguf=qwen_image["llm_gguf"], qwen_image_config=qwen_image["config"])
    paths["esrgan_x4"] = build_esrgan_file(root / "esrgan" / "RealESRGAN_x4plus.pth", scale=4)
    paths["esrgan_x2"] = build_compact_file(root / "esrgan" / "realesr-compact-x2.pth", scale=2)
    paths["zimage_controlnet"] = build_z_image_controlnet_file(
        paths["zimage_config"], root / "controlnet" / "Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors")
    paths["flux_controlnet"] = build_flux_controlnet_file(
        paths["flux_config"], root / "controlnet" / "FLUX.1-dev-Controlnet-Union.safetensors")
    paths["sd3_controlnet"] = build_sd3_controlnet_file(
        paths["sd3_config"], root / "controlnet" / "SD3.5-Large-Controlnet-Canny.safetensors")
    paths["qwen_image_controlnet"] = build_qwen_image_controlnet_file(
        paths["qwen_image_config"], root / "controlnet" / "Qwen-Image-ControlNet-Union.safetensors")
    paths["taesdxl"] = build_taesd_decoder_file(root / "taesd" / "taesdxl_decoder.safetensors", 4, seed=1)
    paths["taef1"] = build_taesd_decoder_file(root / "taesd" / "taef1_decoder.safetensors", 16, seed=2)
    paths["loras"] = root / "loras"
    paths["loras"].mkdir(parents=True, exist_ok=True)
    return paths
