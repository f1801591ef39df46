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


def build_flux_files(out: dict[str, Path], seed: int = 1, config_dir: Path | None = None,
                     config_seed: int = 0) -> dict[str, Path]:
    """The files of a tiny Flux model as people download them: out["transformer"] (BFL
    layout), out["clip_l"], out["t5xxl"] (transformers layout) and out["vae"] (LDM layout, as
    ae.safetensors), all from a tiny FLUX.1-dev pipeline of `seed`. `config_dir` receives a
    tiny FLUX.1-dev diffusers folder of `config_seed` (configs, tokenizers, scheduler, and
    weights for components a load does not name)."""
    from diffusers import FluxPipeline

    written: dict[str, Path] = {}
    if config_dir is not None:
        tiny_diffusion.build_flux(Path(config_dir), config_seed)
        written["config"] = Path(config_dir)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = FluxPipeline.from_pretrained(tiny_diffusion.build_flux(Path(tmp) / "flux", seed))
    states = {
        "transformer": flux_to_original_state_dict(pipe.transformer),
        "clip_l": pipe.text_encoder.state_dict(),
        "t5xxl": t5_encoder_state_dict(pipe.text_encoder_2),
        "vae": vae_to_original_state_dict(pipe.vae),
    }
    for name, path in out.items():
        written[name] = tiny_diffusion.write_safetensors(states[name], Path(path))
    return written


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
    from diffusers import StableDiffusion3Pipeline

    written: dict[str, Path] = {}
    if config_dir is not None:
        tiny_diffusion.build_sd3(Path(config_dir), config_seed)
        written["config"] = Path(config_dir)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = StableDiffusion3Pipeline.from_pretrained(tiny_diffusion.build_sd3(Path(tmp) / "sd3", seed))
    checkpoint = {"model.diffusion_model." + k: v for k, v in sd3_to_original_state_dict(pipe.transformer).items()}
    checkpoint.update({"first_stage_model." + k: v for k, v in vae_to_original_state_dict(pipe.vae).items()})
    states = {
        "checkpoint": checkpoint,
        "clip_l": pipe.text_encoder.state_dict(),
        "clip_g": pipe.text_encoder_2.state_dict(),
        "t5xxl": t5_encoder_state_dict(pipe.text_encoder_3),
    }
    for name, path in out.items():
        written[name] = tiny_diffusion.write_safetensors(states[name], Path(path))
    return written


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
    from diffusers import WanPipeline

    written: dict[str, Path] = {}
    if config_dir is not None:
        tiny_diffusion.build_wan21(Path(config_dir), config_seed)
        written["config"] = Path(config_dir)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = WanPipeline.from_pretrained(tiny_diffusion.build_wan21(Path(tmp) / "wan", seed))
    states = {
        "transformer": wan_to_original_state_dict(pipe.transformer),
        "t5xxl": t5_encoder_state_dict(pipe.text_encoder),
        "vae": wan_vae_to_original_state_dict(pipe.vae),
    }
    for name, path in out.items():
        written[name] = tiny_diffusion.write_safetensors(states[name], Path(path))
    return written


# --------------------------------------------------------------------------- GGUF


# write_gguf (city96's layout, linear weights quantized) is the inference service's own writer,
# so test models and converted ones are the same kind of file.


# --------------------------------------------------------------------------- models root


def build_models_root(root: Path) -> dict[str, Path]:
    """A models root holding one tiny model of each kind:

        checkpoints/tiny-sdxl.safetensors          SDXL (Stability layout)
        checkpoints/SD1x/tiny-sd15.safetensors     SD1.5 (LDM layout)
        checkpoints/sd3.5_large.safetensors        SD3.5: MMDiT + VAE (Stability layout)
        diffusion_models/tiny-flux.safetensors     Flux transformer (BFL layout)
        diffusion_models/flux1-schnell-Q8_0.gguf   the same transformer as GGUF, Q8_0
        diffusion_models/flux1-dev-Q4_K_S.gguf     the same transformer as GGUF, Q4_0
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
        loras/                                     empty
        configs/{sdxl,sd15,flux,sd3,wan21}/             diffusers folders for LORAMESH_*_CONFIG

    Returns the path of each, keyed "root", "sdxl", "sd15", "flux", "vae", "flux_vae",
    "flux_gguf_q8_0", "flux_gguf_q4", "clip_l", "t5xxl", "loras", "sdxl_config", "sd15_config", "flux_config",
    "sd3", "sd3_clip_l",
    "sd3_clip_g", "sd3_t5xxl", "sd3_config", "sd15_controlnet", "sdxl_controlnet", "wan21", "wan21_t5xxl", "wan21_vae", "wan21_config"."""
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
    # The same Flux transformer as GGUF, named as the seed names its downloads (gguf cannot
    # write K-quants, so the "Q4_K_S" file holds Q4_0 weights).
    from safetensors.torch import load_file

    flux_weights = load_file(paths["flux"])
    paths["flux_gguf_q8_0"] = write_gguf(flux_weights, root / "diffusion_models" / "flux1-schnell-Q8_0.gguf", "q8_0")
    paths["flux_gguf_q4"] = write_gguf(flux_weights, root / "diffusion_models" / "flux1-dev-Q4_K_S.gguf", "q4_0")
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
    paths["loras"] = root / "loras"
    paths["loras"].mkdir(parents=True, exist_ok=True)
    return paths
