"""Tiny randomly initialised diffusion pipelines (SDXL, SD1.5, Flux, SD3, single-file SDXL) and a
tiny captioned dataset. The models keep the real architectures, configs, tokenizers and file
layouts, scaled down to a few MB, so tests and the offline demo run exactly the code path that
real weights take (from_pretrained / from_single_file, LoRA injection, VAE latents of the real
scale factor) on a CPU in about a second.

    python -m tinymodels sdxl --out var/models/sdxl-tiny
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import uuid
from pathlib import Path

import numpy as np

CLIP_MAX_LENGTH = 77
T5_EXTRA_IDS = 100

# Words that get whole tokens in the tiny vocabularies; anything else still tokenizes (CLIP
# falls back to single bytes, T5 to single characters or <unk>). Trigger words come first so
# their merges win over pieces of other words.
WORDS = [
    "tok", "ohwx", "sks", "a", "an", "the", "of", "on", "in", "at", "with", "and", "by", "photo", "picture",
    "image", "painting", "drawing", "style", "red", "green", "blue", "yellow", "purple", "orange", "white",
    "black", "pink", "brown", "gray", "grey", "cyan", "teal", "disc", "circle", "square", "shape", "background",
    "small", "large", "big", "bright", "dark", "light", "colorful", "smooth", "gradient", "simple", "centered",
    "left", "right", "top", "bottom", "corner", "middle", "dog", "cat", "person", "man", "woman", "girl", "boy",
    "face", "portrait", "landscape", "sky", "tree", "flower", "house", "car", "water", "mountain", "city",
    "street", "night", "day", "sunset", "beautiful", "cute", "high", "quality", "detailed", "best",
    "masterpiece", "art", "lowres", "blurry", "ugly", "bad", "text", "watermark", "standing", "sitting",
    "wearing", "hat", "shirt", "hair", "eyes", "smile", "is", "this", "very", "close", "up", "view",
]

TINY_VAE = {
    "block_out_channels": (8, 16, 16, 16),  # four levels: vae_scale_factor 8, as in the real VAEs
    "layers_per_block": 1,
    "norm_num_groups": 8,
}


def _make_readable(path: Path) -> None:
    """safetensors creates its files 0600; give them the permissions any other file written
    here gets (0666 less the umask), so services running as another user can read them."""
    umask = 0o022
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            umask = next((int(line.split()[1], 8) for line in status if line.startswith("Umask:")), umask)
    except OSError:
        pass
    os.chmod(path, 0o666 & ~umask)


def _set_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


# --------------------------------------------------------------------------- tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: every byte gets a printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _clip_vocab() -> tuple[dict[str, int], list[str]]:
    """A CLIP BPE vocabulary in the real order (bytes, bytes + "</w>", merges, then the
    start/end tokens last), so that any text tokenizes and the end token has the highest id
    as CLIP's pooling expects. The merges are learnt on WORDS the way BPE is trained, so each
    of those words comes out as one token."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    words = [(*word[:-1], word[-1] + "</w>") for word in WORDS]
    merges = _learn_merges(words, tokens)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def _learn_merges(words: list[tuple[str, ...]], tokens: list[str]) -> list[str]:
    """BPE training: merges the most frequent adjacent pair until every word is one token,
    appending each merged token to `tokens`; returns the merges in order."""
    merges: list[str] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for word in words:
            for pair in zip(word, word[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = max(counts, key=counts.__getitem__)  # first seen wins ties: deterministic
        merges.append(" ".join(best))
        tokens.append("".join(best))
        words = [_merge(word, best) for word in words]


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _write_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    """vocab.json, merges.txt and the configs, as the real SD / SDXL repositories ship them
    (SDXL's second tokenizer pads with "!")."""
    vocab, merges = _clip_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(folder):
        (folder / name).unlink()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": CLIP_MAX_LENGTH,
              "do_lower_case": True, "errors": "replace", "add_prefix_space": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _clip_tokenizer(pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        _write_clip_tokenizer(Path(tmp), pad_token)
        return CLIPTokenizer.from_pretrained(tmp)


def _t5_vocab() -> list[tuple[str, float]]:
    """A Unigram vocabulary in T5's order: <pad>=0, </s>=1, <unk>=2, pieces, then the 100
    sentinel tokens in reverse. Whole words are likelier than their characters."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + word, -6.0 - 0.01 * i) for i, word in enumerate([*WORDS, "TOK"])]
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()[]{}<>-_+=*/\\|@#$%^&~`"
    vocab += [(c, -12.0) for c in chars]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(T5_EXTRA_IDS))]
    return vocab


def _write_t5_tokenizer(folder: Path) -> None:
    """tokenizer.json (built with the `tokenizers` library, the layout of a fast T5 tokenizer)
    and tokenizer_config.json / special_tokens_map.json as FLUX.1's tokenizer_2 ships them."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    tokenizer = Tokenizer(Unigram(_t5_vocab(), unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    sentinels = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in ["<pad>", "</s>", "<unk>", *sentinels]])
    folder.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(folder):
        (folder / name).unlink()
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
               "additional_special_tokens": sentinels}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {**special, "tokenizer_class": "T5Tokenizer", "extra_ids": T5_EXTRA_IDS, "model_max_length": 512,
              "legacy": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _t5_tokenizer():
    from transformers import T5TokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        _write_t5_tokenizer(Path(tmp))
        return T5TokenizerFast.from_pretrained(tmp)


# --------------------------------------------------------------------------- components


def _clip_text_model(hidden: int, layers: int, *, projection_dim: int | None = None, hidden_act: str = "quick_gelu"):
    """A CLIP text encoder over the tiny vocabulary (with a projection head when
    `projection_dim` is given, as SDXL's second encoder has). The token ids of the real
    special tokens are replaced by the tiny vocabulary's, which CLIP's pooling relies on."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab, _ = _clip_vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH, hidden_act=hidden_act,
        projection_dim=projection_dim or hidden, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=1,
    )
    model = CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)
    return model.eval()


def _vae(latent_channels: int, **config):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * len(TINY_VAE["block_out_channels"]),
        up_block_types=("UpDecoderBlock2D",) * len(TINY_VAE["block_out_channels"]),
        **TINY_VAE, **config,
    ).eval()


def _save(pipe, out_dir: Path, tokenizers: dict[str, str | None]) -> Path:
    """save_pretrained in safetensors, then the tokenizer folders rewritten in the layout the
    real repositories have (vocab.json + merges.txt for CLIP, tokenizer.json for T5).
    `tokenizers` maps each tokenizer folder to "t5", or to the CLIP pad token (None: the
    default)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for weights in out_dir.rglob("*.safetensors"):
        _make_readable(weights)
    for name, kind in tokenizers.items():
        if kind == "t5":
            _write_t5_tokenizer(out_dir / name)
        else:
            _write_clip_tokenizer(out_dir / name, pad_token=kind or "<|endoftext|>")
    return out_dir


# --------------------------------------------------------------------------- pipelines


def tiny_sdxl_pipeline(seed: int = 0):
    """The tiny SDXL base pipeline in memory: a UNet with SDXL's block pattern, the text_time
    added conditioning and linear attention projections; CLIP-L-like and bigG-like text
    encoders (the second with 10 layers so the checkpoint key diffusers probes for SDXL base,
    `resblocks.9`, exists, and with a different width so single-file loading can tell them
    apart); a four-level VAE (vae_scale_factor 8) with SDXL's scaling factor."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    te1_hidden, te2_hidden, pooled = 32, 64, 32
    time_embed_dim = 8
    _set_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=1, use_linear_projection=True,
        cross_attention_dim=te1_hidden + te2_hidden, addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim, projection_class_embeddings_input_dim=6 * time_embed_dim + pooled,
        norm_num_groups=8,
    ).eval()
    _set_seed(seed + 1)
    vae = _vae(4, scaling_factor=0.13025, sample_size=64, force_upcast=True)
    _set_seed(seed + 2)
    text_encoder = _clip_text_model(te1_hidden, 2)
    _set_seed(seed + 3)
    text_encoder_2 = _clip_text_model(te2_hidden, 10, projection_dim=pooled, hidden_act="gelu")
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False, steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=_clip_tokenizer(),
        tokenizer_2=_clip_tokenizer(pad_token="!"), unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def build_sdxl(out_dir: Path, seed: int = 0) -> Path:
    """A StableDiffusionXLPipeline folder (safetensors) that loads offline with
    `StableDiffusionXLPipeline.from_pretrained(out_dir)` and makes a 64x64 image (8x8
    latents) by default."""
    return _save(tiny_sdxl_pipeline(seed), out_dir, {"tokenizer": None, "tokenizer_2": "!"})


def build_sd15(out_dir: Path, seed: int = 0) -> Path:
    """A StableDiffusionPipeline folder in SD1.5's layout (no safety checker): UNet with SD1.5's
    cross-attention-first block pattern and convolutional attention projections, one CLIP
    text encoder, a four-level VAE (vae_scale_factor 8) and SD1.5's PNDM scheduler."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    _set_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=32, norm_num_groups=8,
    ).eval()
    _set_seed(seed + 1)
    vae = _vae(4, scaling_factor=0.18215, sample_size=64)
    _set_seed(seed + 2)
    text_encoder = _clip_text_model(32, 2)
    scheduler = PNDMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=_clip_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return _save(pipe, out_dir, {"tokenizer": None})


def build_flux(out_dir: Path, seed: int = 0) -> Path:
    """A FluxPipeline folder in FLUX.1-dev's layout: a one-double-block, one-single-block
    transformer with guidance embedding (64 input channels = 16 latent channels packed 2x2),
    CLIP and T5 (v1.1-style gated-gelu, fast tokenizer) text encoders, a 16-channel VAE
    without quant convs (vae_scale_factor 8, Flux's scaling and shift factors) and FLUX.1-dev's
    dynamically shifted flow-matching scheduler. Generate with a small max_sequence_length
    (e.g. 32) and height/width multiples of 16."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    _set_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    _set_seed(seed + 1)
    vae = _vae(16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
               sample_size=64, force_upcast=True)
    _set_seed(seed + 2)
    text_encoder = _clip_text_model(32, 2)
    _set_seed(seed + 3)
    t5_config = T5Config(
        vocab_size=len(_t5_vocab()), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, is_encoder_decoder=True, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1,
    )
    text_encoder_2 = T5EncoderModel(t5_config).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=_clip_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=_t5_tokenizer(), transformer=transformer,
    )
    _save(pipe, out_dir, {"tokenizer": None, "tokenizer_2": "t5"})
    # transformers 5 names the (only) T5 tokenizer T5Tokenizer; FLUX.1 repositories say
    # T5TokenizerFast, which both 4.x and 5.x resolve.
    index = json.loads((out_dir / "model_index.json").read_text())
    index["tokenizer_2"] = ["transformers", "T5TokenizerFast"]
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out_dir


def build_sd3(out_dir: Path, seed: int = 0) -> Path:
    """A StableDiffusion3Pipeline folder in SD3.5 Large's layout: an MMDiT transformer of three
    joint blocks with RMS q/k norms (2x2 patches over 16 latent channels, positions up to
    1024 px), CLIP-L and CLIP-G text encoders with projections (their pooled outputs
    concatenated), a T5 encoder wider than the two CLIPs together (the CLIP states are padded
    to its width, as 2048 to 4096 in the real model), a 16-channel VAE without quant convs and
    SD3's shifted flow-matching scheduler. Height and width must be multiples of 16; 64x64 is
    the natural size."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    clip_l_hidden, clip_g_hidden, projection, t5_width = 32, 64, 32, 128
    _set_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=t5_width, caption_projection_dim=32,
        pooled_projection_dim=2 * projection, pos_embed_max_size=64, qk_norm="rms_norm",
    ).eval()
    _set_seed(seed + 1)
    vae = _vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
               sample_size=64, force_upcast=True)
    _set_seed(seed + 2)
    text_encoder = _clip_text_model(clip_l_hidden, 2, projection_dim=projection)
    _set_seed(seed + 3)
    text_encoder_2 = _clip_text_model(clip_g_hidden, 2, projection_dim=projection, hidden_act="gelu")
    _set_seed(seed + 4)
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(_t5_vocab()), d_model=t5_width, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, is_encoder_decoder=True,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        scheduler=scheduler, transformer=transformer, vae=vae, text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(), text_encoder_2=text_encoder_2, tokenizer_2=_clip_tokenizer(pad_token="!"),
        text_encoder_3=text_encoder_3, tokenizer_3=_t5_tokenizer(),
    )
    _save(pipe, out_dir, {"tokenizer": None, "tokenizer_2": "!", "tokenizer_3": "t5"})
    # As for Flux's tokenizer_2: the name both transformers 4.x and 5.x resolve.
    index = json.loads((out_dir / "model_index.json").read_text())
    index["tokenizer_3"] = ["transformers", "T5TokenizerFast"]
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out_dir


def build_wan21(out_dir: Path, seed: int = 0) -> Path:
    """A WanPipeline folder in Wan2.1-T2V-1.3B-Diffusers' layout: a two-block 3D transformer
    (1x2x2 patches over 16 latent channels, RMS q/k norms across heads, normed cross-attention),
    a UMT5 encoder with T5's fast tokenizer, a causal video VAE (8x spatial, 4x temporal) and
    Wan's flow-prediction UniPC scheduler (flow_shift 3.0). Frames must number 4k+1, height and
    width multiples of 16; 32x32 with 5 frames is the natural size."""
    _save(tiny_wan_pipeline(seed), out_dir, {"tokenizer": "t5"})
    index = json.loads((out_dir / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "T5TokenizerFast"]
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out_dir


def tiny_wan_pipeline(seed: int = 0, experts: int = 1):
    """The WanPipeline build_wan21 saves; with experts=2, build_wan22's (its transformer the
    high-noise expert, a second one of other weights the low-noise transformer_2)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    text_width = 32
    _set_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=text_width, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
    ).eval()
    _set_seed(seed + 1)
    # Wan's 4 stages of 2 resnets (diffusers' converter of Wan's VAE files assumes them), narrow.
    vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                           temperal_downsample=[False, True, True]).eval()
    _set_seed(seed + 2)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(_t5_vocab()), d_model=text_width, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, is_encoder_decoder=True,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0)
    if experts == 1:
        return WanPipeline(tokenizer=_t5_tokenizer(), text_encoder=text_encoder, transformer=transformer, vae=vae,
                           scheduler=scheduler)
    _set_seed(seed + 3)
    low_noise = WanTransformer3DModel.from_config(transformer.config).eval()
    return WanPipeline(tokenizer=_t5_tokenizer(), text_encoder=text_encoder, transformer=transformer, vae=vae,
                       scheduler=scheduler, transformer_2=low_noise, boundary_ratio=0.875)


def build_wan22(out_dir: Path, seed: int = 0) -> Path:
    """A WanPipeline folder in Wan2.2-T2V-A14B-Diffusers' layout: build_wan21's pipeline of `seed`,
    its transformer the high-noise expert, beside a second transformer of the same config with
    other weights as transformer_2 (the low-noise expert), and boundary_ratio 0.875 as the real
    model_index has."""
    _save(tiny_wan_pipeline(seed, experts=2), out_dir, {"tokenizer": "t5"})
    index = json.loads((out_dir / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "T5TokenizerFast"]
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out_dir


# --------------------------------------------------------------------------- single-file SDXL


def build_sdxl_single_file(out_path: Path, seed: int = 0, config_dir: Path | None = None) -> Path:
    """One .safetensors file holding the tiny SDXL pipeline in the original Stability ("sgm")
    key layout of real single-file SDXL checkpoints (`model.diffusion_model.*`,
    `first_stage_model.*`, `conditioner.embedders.0.transformer.*` for CLIP-L and the open_clip
    layout `conditioner.embedders.1.model.*` for the second encoder), written atomically.
    diffusers detects it as SDXL base. Its diffusers folder, whose configs, tokenizers and
    scheduler single-file loading needs offline, goes to `config_dir` (default: the sibling
    `<stem>-config`); the weights then load exactly equal to that folder's with

        StableDiffusionXLPipeline.from_single_file(out_path, config=str(config_dir))

    A local folder as `config` is read directly, so nothing is fetched from the hub. `config`
    must be a str: the UNet/VAE single-file loaders reject a Path with "Invalid `config`
    argument". The checkpoint path may be either."""

    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":  # diffusers picks the loader by the extension
        out_path = out_path.with_name(out_path.name + ".safetensors")
    config_dir = Path(config_dir) if config_dir is not None else out_path.parent / f"{out_path.stem}-config"
    pipe = tiny_sdxl_pipeline(seed)
    _save(pipe, config_dir, {"tokenizer": None, "tokenizer_2": "!"})
    return write_safetensors(sdxl_to_original_state_dict(pipe), out_path,
                             {"modelspec.architecture": "stable-diffusion-xl-v1-base"})


def write_safetensors(state_dict: dict, out_path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Contiguous private copies (safetensors refuses shared storage), written atomically."""
    from safetensors.torch import save_file

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().clone().contiguous() for key, value in state_dict.items()}
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})})
        _make_readable(tmp)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out_path


def sdxl_to_original_state_dict(pipe) -> dict:
    """The inverse of diffusers' single-file conversion for SDXL base: every tensor of the
    UNet, VAE and both text encoders under its original Stability key, contiguous and cloned
    (safetensors refuses shared storage)."""
    checkpoint: dict = {}
    for key, value in _unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items():
        checkpoint["model.diffusion_model." + key] = value
    for key, value in _vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items():
        checkpoint["first_stage_model." + key] = value
    for key, value in pipe.text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        checkpoint["conditioner.embedders.0.transformer." + key] = value
    for key, value in _open_clip_from_clip(pipe.text_encoder_2.state_dict()).items():
        checkpoint["conditioner.embedders.1.model." + key] = value
    return {key: value.detach().clone().contiguous() for key, value in checkpoint.items()}


def _rename(state_dict: dict, prefixes: dict[str, str], exact: dict[str, str] | None = None) -> dict:
    """Renames every key by its exact entry or its longest matching prefix; a key that
    matches neither is a bug in the tables, not something to drop silently."""
    exact = exact or {}
    ordered = sorted(prefixes, key=len, reverse=True)
    out = {}
    for key, value in state_dict.items():
        if key in exact:
            out[exact[key]] = value
            continue
        prefix = next((p for p in ordered if key.startswith(p)), None)
        if prefix is None:
            raise KeyError(f"no original-layout name for {key}")
        out[prefixes[prefix] + key[len(prefix):]] = value
    return out


_UNET_EXACT = {
    "time_embedding.linear_1.weight": "time_embed.0.weight", "time_embedding.linear_1.bias": "time_embed.0.bias",
    "time_embedding.linear_2.weight": "time_embed.2.weight", "time_embedding.linear_2.bias": "time_embed.2.bias",
    "add_embedding.linear_1.weight": "label_emb.0.0.weight", "add_embedding.linear_1.bias": "label_emb.0.0.bias",
    "add_embedding.linear_2.weight": "label_emb.0.2.weight", "add_embedding.linear_2.bias": "label_emb.0.2.bias",
    "conv_in.weight": "input_blocks.0.0.weight", "conv_in.bias": "input_blocks.0.0.bias",
    "conv_norm_out.weight": "out.0.weight", "conv_norm_out.bias": "out.0.bias",
    "conv_out.weight": "out.2.weight", "conv_out.bias": "out.2.bias",
}
_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                 "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def _unet_to_ldm(state_dict: dict, config) -> dict:
    """diffusers UNet2DConditionModel -> the ldm/sgm UNetModel: `input_blocks.N` count the
    resnets (+ attentions) of every down block plus one downsampler per level,
    `output_blocks.N` the layers_per_block + 1 resnets of every up block, the upsampler sitting
    in the last output block of a level after its attention (if any)."""
    per_block = config.layers_per_block
    prefixes: dict[str, str] = {}
    levels = len(config.block_out_channels)

    def resnet(diffusers_prefix: str, ldm_prefix: str) -> None:
        for new, old in _RESNET_PARTS.items():
            prefixes[f"{diffusers_prefix}.{new}."] = f"{ldm_prefix}.{old}."

    for i in range(levels):
        for j in range(per_block):
            index = 1 + i * (per_block + 1) + j
            resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{index}.0")
            prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{index}.1."
        if i < levels - 1:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (per_block + 1)}.0.op."
        has_attention = "CrossAttn" in config.up_block_types[i]
        for j in range(per_block + 1):
            index = i * (per_block + 1) + j
            resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{index}.0")
            prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{index}.1."
        if i < levels - 1:
            last = i * (per_block + 1) + per_block
            prefixes[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{last}.{2 if has_attention else 1}."
    resnet("mid_block.resnets.0", "middle_block.0")
    prefixes["mid_block.attentions.0."] = "middle_block.1."
    resnet("mid_block.resnets.1", "middle_block.2")
    return _rename(state_dict, prefixes, _UNET_EXACT)


def _vae_to_ldm(state_dict: dict, config) -> dict:
    """diffusers AutoencoderKL -> the ldm AutoencoderKL: decoder levels are numbered from the
    lowest resolution up in diffusers and the other way round in ldm; the mid-block attention
    projections are 1x1 convolutions there."""
    levels = len(config.block_out_channels)
    prefixes = {"quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."}
    for part in ("encoder", "decoder"):
        prefixes.update({
            f"{part}.conv_in.": f"{part}.conv_in.", f"{part}.conv_out.": f"{part}.conv_out.",
            f"{part}.conv_norm_out.": f"{part}.norm_out.",
            f"{part}.mid_block.resnets.0.": f"{part}.mid.block_1.", f"{part}.mid_block.resnets.1.": f"{part}.mid.block_2.",
        })
        for new, old in {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}.items():
            prefixes[f"{part}.mid_block.attentions.0.{new}."] = f"{part}.mid.attn_1.{old}."
    for i in range(levels):
        prefixes[f"encoder.down_blocks.{i}.resnets."] = f"encoder.down.{i}.block."
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = f"encoder.down.{i}.downsample.conv."
        prefixes[f"decoder.up_blocks.{i}.resnets."] = f"decoder.up.{levels - 1 - i}.block."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = f"decoder.up.{levels - 1 - i}.upsample.conv."
    out = {}
    for key, value in _rename(state_dict, prefixes).items():
        key = key.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[key] = value
    return out


def _open_clip_from_clip(state_dict: dict) -> dict:
    """transformers CLIPTextModelWithProjection -> open_clip's text tower: fused q/k/v
    in_proj, `resblocks`, `ln_1/ln_2`, `mlp.c_fc/c_proj`, and the projection stored
    transposed (width x embed dim) as a bare parameter."""
    out: dict = {}
    fused: dict[str, dict[str, object]] = {}
    for key, value in state_dict.items():
        name = key.removeprefix("text_model.")
        if name == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif name == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif name.startswith("final_layer_norm."):
            out["ln_final." + name.rsplit(".", 1)[1]] = value
        elif name == "text_projection.weight":
            out["text_projection"] = value.T
        elif name.startswith("encoder.layers."):
            layer, rest = name.removeprefix("encoder.layers.").split(".", 1)
            block = f"transformer.resblocks.{layer}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                _, proj, kind = rest.split(".")
                fused.setdefault(f"{block}attn.in_proj_{kind}", {})[proj] = value
                continue
            rest = (rest.replace("self_attn.out_proj.", "attn.out_proj.").replace("layer_norm1.", "ln_1.")
                    .replace("layer_norm2.", "ln_2.").replace("mlp.fc1.", "mlp.c_fc.").replace("mlp.fc2.", "mlp.c_proj."))
            out[block + rest] = value
        else:
            raise KeyError(f"no open_clip name for {key}")
    import torch

    for key, parts in fused.items():
        out[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return out


# --------------------------------------------------------------------------- dataset

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (235, 210, 40),
    "purple": (140, 50, 180), "orange": (240, 140, 30), "white": (240, 240, 240), "black": (25, 25, 25),
}
ASPECTS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 3 / 2, 2 / 3, 2.0, 1 / 2)


def build_dataset(out_dir: Path, seed: int = 0, count: int = 8) -> Path:
    """A tiny captioned training set in the usual LoRA-trainer layout: `count` pictures
    (PNG, every third one JPEG) of 48..128 px in varied aspect ratios, each a smooth colour
    gradient with one coloured disc or square somewhere on it, so there is something to
    learn; `<stem>.txt` captions such as "TOK, a red disc on a blue background" beside all
    but the last picture (trainers must cope with a missing caption); `masks/<stem>.png`,
    white on the shape and black elsewhere."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(exist_ok=True)
    for i in range(count):
        aspect = ASPECTS[i % len(ASPECTS)] if i < len(ASPECTS) else float(rng.choice(ASPECTS))
        long_side = int(rng.integers(64, 129))
        width, height = (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)
        width, height = max(48, min(128, width)), max(48, min(128, height))
        fg, bg = rng.choice(len(names), size=2, replace=False)
        shape = "disc" if rng.random() < 0.5 else "square"

        background = _gradient(rng, width, height, np.array(COLOURS[names[bg]], np.float32))
        scale = 4  # drawn supersampled for smooth edges
        size = rng.uniform(0.2, 0.35) * min(width, height) * scale
        cx = rng.uniform(size, width * scale - size)
        cy = rng.uniform(size, height * scale - size)
        big = Image.new("L", (width * scale, height * scale), 0)
        box = (cx - size, cy - size, cx + size, cy + size)
        (ImageDraw.Draw(big).ellipse if shape == "disc" else ImageDraw.Draw(big).rectangle)(box, fill=255)
        alpha = np.asarray(big.resize((width, height), Image.BOX), np.float32)[..., None] / 255.0
        shade = 1.0 + 0.12 * np.linspace(-1, 1, height, dtype=np.float32)[:, None, None]
        foreground = np.array(COLOURS[names[fg]], np.float32) * shade
        pixels = np.clip(background * (1 - alpha) + foreground * alpha, 0, 255).round().astype(np.uint8)

        stem = f"{i:03d}"
        image = Image.fromarray(pixels, "RGB")
        if i % 3 == 2:
            image.save(out_dir / f"{stem}.jpg", quality=95)
        else:
            image.save(out_dir / f"{stem}.png")
        Image.fromarray(np.where(alpha[..., 0] >= 0.5, 255, 0).astype(np.uint8), "L").save(
            out_dir / "masks" / f"{stem}.png")
        if i < count - 1:
            caption = f"TOK, {_a(names[fg])} {names[fg]} {shape} on {_a(names[bg])} {names[bg]} background"
            (out_dir / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
    return out_dir


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _gradient(rng: np.random.Generator, width: int, height: int, colour: np.ndarray) -> np.ndarray:
    """(height, width, 3) float32: `colour` brightened and darkened along a random direction,
    with gentle low-frequency variation on top."""
    from PIL import Image

    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (xs / width - 0.5) * math.cos(angle) + (ys / height - 0.5) * math.sin(angle)
    cells = rng.integers(-18, 19, size=(3, 3, 3)).astype(np.float32) + 128
    wobble = np.asarray(Image.fromarray(cells.astype(np.uint8), "RGB").resize((width, height), Image.BICUBIC),
                        np.float32) - 128
    return colour * (1.0 + 0.5 * ramp[..., None]) + wobble


# --------------------------------------------------------------------------- Z-Image

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Qwen3's chat template, reduced to what prompt encoding uses: user/assistant turns, the
# generation prompt and the empty thinking block that `enable_thinking=False` adds.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def _qwen_vocab(extra_words: tuple[str, ...] = ()) -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE vocabulary in Qwen's (GPT-2's) style: the 256 byte characters, merges
    learnt on WORDS (and `extra_words`) with and without the leading-space marker "Ġ", then the
    special tokens."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet[:]
    learnt = [*WORDS, *extra_words]
    words = [tuple(w) for w in learnt] + [("Ġ", *w) for w in learnt]
    merges = _learn_merges(words, tokens)
    tokens += QWEN_SPECIAL_TOKENS
    return {token: i for i, token in enumerate(tokens)}, merges


def _write_qwen_tokenizer(folder: Path, extra_words: tuple[str, ...] = ()) -> None:
    """vocab.json, merges.txt, tokenizer.json and a tokenizer_config.json with the chat
    template, as Qwen3 repositories ship them."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    vocab, merges = _qwen_vocab(extra_words)
    folder.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(folder):
        (folder / name).unlink()
    tokenizer = Tokenizer(BPE(vocab, [tuple(m.split(" ")) for m in merges], unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 131072, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "bos_token": None, "errors": "replace",
        "add_prefix_space": False, "split_special_tokens": False, "chat_template": QWEN_CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _qwen_tokenizer(extra_words: tuple[str, ...] = ()):
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        _write_qwen_tokenizer(Path(tmp), extra_words)
        return AutoTokenizer.from_pretrained(tmp)


def build_zimage(out_dir: Path, seed: int = 0) -> Path:
    """A ZImagePipeline folder in Z-Image-Turbo's layout: a two-layer single-stream transformer
    (2x2 patches over 16 latent channels, 3-axis RoPE), a Qwen3 text encoder whose
    second-to-last hidden state conditions it, a byte-level BPE tokenizer with Qwen's chat
    template, Flux's 16-channel VAE and a shifted flow-matching scheduler. Height and width
    must be multiples of 16; 64x64 is the natural size."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    text_hidden = 32
    vocab, _ = _qwen_vocab()
    _set_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=text_hidden, axes_dims=[4, 6, 6], axes_lens=[1536, 512, 512],
    ).eval()
    _set_seed(seed + 1)
    vae = _vae(16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
               sample_size=64, force_upcast=True)
    _set_seed(seed + 2)
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(vocab), hidden_size=text_hidden, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
        tie_word_embeddings=False, pad_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"],
        bos_token_id=None,
    )).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=_qwen_tokenizer(),
                          transformer=transformer)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for weights in out_dir.rglob("*.safetensors"):
        _make_readable(weights)
    _write_qwen_tokenizer(out_dir / "tokenizer")
    index = json.loads((out_dir / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "Qwen2Tokenizer"]
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out_dir


# --------------------------------------------------------------------------- Qwen-Image

# The words of QwenImagePipeline's prompt template, whole tokens as in Qwen's own vocabulary, so
# the template's system part is the 34 tokens the pipeline drops, as with the real tokenizer.
QWEN_IMAGE_TEMPLATE_WORDS = ("system", "user", "assistant", "Describe", "detailing", "color", "size", "texture",
                             "quantity", "spatial", "relationships", "objects")
# Qwen/Qwen-Image's scheduler: resolution-dependent (exponential) shift, ending at sigma 0.02.
QWEN_IMAGE_SCHEDULER = {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9,
    "base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02, "time_shift_type": "exponential",
}


def build_qwen_image(out_dir: Path, seed: int = 0) -> Path:
    """A QwenImagePipeline folder in Qwen/Qwen-Image's layout: a two-block MMDiT (2x2 patches over
    16 latent channels, 3-axis RoPE) conditioned on the last hidden state of a Qwen2.5-VL model
    (a Qwen2 language model with its vision tower and multimodal RoPE), a byte-level BPE
    tokenizer with Qwen's special tokens, a Wan-style causal VAE (8x spatial, z_dim 16) and
    Qwen-Image's flow-matching scheduler. Height and width must be multiples of 16; 64x64 is
    the natural size."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text_hidden = 32
    vocab, _ = _qwen_vocab(QWEN_IMAGE_TEMPLATE_WORDS)
    _set_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=text_hidden, axes_dims_rope=(4, 6, 6),
    ).eval()
    with torch.no_grad():
        # At initialisation scale the blocks' gates are near zero and the text barely reaches the
        # image; stronger modulations and text values make the image follow the prompt visibly.
        for name, parameter in transformer.named_parameters():
            if name.endswith(("_mod.1.weight", "attn.add_v_proj.weight")):
                parameter.mul_(20.0)
    _set_seed(seed + 1)
    # Wan's 4 stages of 2 resnets (the layout of qwen_image_vae.safetensors), narrow.
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                 temperal_downsample=[False, True, True]).eval()
    _set_seed(seed + 2)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": text_hidden, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 1024, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
                     "bos_token_id": None, "eos_token_id": vocab["<|im_end|>"],
                     "pad_token_id": vocab["<|endoftext|>"]},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                       "out_hidden_size": text_hidden, "fullatt_block_indexes": [0]},
        tie_word_embeddings=False,
    )).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=_qwen_tokenizer(QWEN_IMAGE_TEMPLATE_WORDS),
                             transformer=transformer)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for weights in out_dir.rglob("*.safetensors"):
        _make_readable(weights)
    _write_qwen_tokenizer(out_dir / "tokenizer", QWEN_IMAGE_TEMPLATE_WORDS)
    index = json.loads((out_dir / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "Qwen2Tokenizer"]
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out_dir
