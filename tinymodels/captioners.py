"""Tiny randomly initialised captioning models (Florence-2, a JoyCaption-style LLaVA and a
Qwen2-Audio) in the real architectures and the folder layouts of the real Hub checkpoints,
so the captioning service loads them with the same `from_pretrained` calls as real weights.
Their captions are gibberish, but they follow the input (different pictures or clips give
different words), and shapes, processors, prompts and generation are real.
"""

from __future__ import annotations

from pathlib import Path

CAPTION_WORDS = [
    "a", "an", "the", "of", "in", "on", "with", "and", "is", "are", "image", "picture", "photo", "shows",
    "cat", "dog", "girl", "boy", "man", "woman", "tree", "sky", "water", "flower", "house", "car", "red",
    "blue", "green", "white", "black", "small", "large", "standing", "sitting", "outdoors", "indoors",
    "what", "does", "describe", "detail", "shown", "paragraph", "write", "descriptive", "caption", "text",
    "sound", "audio", "speech", "music", "noise", "you", "are", "helpful", "assistant", "this", "that",
]


def _byte_level_bpe(specials: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A GPT-2 style byte-level BPE vocabulary: the special tokens first (so their ids are
    small and fixed), the 256 byte symbols (so any text encodes), then whole caption words
    reachable by left-to-right merges (so decoded captions look like words)."""
    from tokenizers.pre_tokenizers import ByteLevel

    vocab: dict[str, int] = {}
    for token in specials:
        vocab.setdefault(token, len(vocab))
    for symbol in sorted(ByteLevel.alphabet()):
        vocab.setdefault(symbol, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in CAPTION_WORDS:
        for text in (word, "\u0120" + word):
            left = text[0]
            for char in text[1:]:
                if left + char not in vocab:
                    merges.append((left, char))
                    vocab[left + char] = len(vocab)
                left += char
    return vocab, merges


def _seed_everything(seed: int) -> None:
    import torch
    from transformers import set_seed

    set_seed(seed)
    torch.manual_seed(seed)


def _redraw(weight, gain: float) -> None:
    """Draws `weight` again from N(0, gain^2 / fan_in), from the seeded generator: gain 1 keeps
    a signal's scale through the layer, larger gains let it outweigh the rest of the sum."""
    import torch

    with torch.no_grad():
        weight.normal_(0.0, gain / weight[0].numel() ** 0.5)


FLORENCE2_IMAGE_SIZE = 64


def build_florence2(out_dir: Path, seed: int = 0) -> Path:
    """A Florence-2 folder in the layout of `florence-community/Florence-2-base` (the native
    transformers format): a DaViT vision tower whose four stages downsample by 32, so a
    64x64 picture gives 2x2 features and 1 + 4 = 5 image tokens, and a one-layer BART. The
    tokenizer is a byte-level BPE (Roberta/Bart family) with `<image>` and the task tokens."""
    from transformers import (
        BartConfig,
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        Florence2VisionConfig,
        GenerationConfig,
        RobertaTokenizer,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _seed_everything(seed)

    tasks = ["<OCR>", "<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>", "<OD>"]
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "<image>"]
    vocab, merges = _byte_level_bpe(specials)
    locations = [f"<loc_{i}>" for i in range(1000)]
    tokenizer = RobertaTokenizer(
        vocab=vocab, merges=merges, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", add_prefix_space=False,
        extra_special_tokens={"image_token": "<image>"}, model_max_length=1024,
    )
    tokenizer.add_tokens(tasks + locations)

    grid = FLORENCE2_IMAGE_SIZE // 32
    image_processor = CLIPImageProcessor(
        do_resize=True, size={"height": FLORENCE2_IMAGE_SIZE, "width": FLORENCE2_IMAGE_SIZE}, resample=3,
        do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_convert_rgb=True,
        image_seq_length=1 + grid * grid,
    )
    post_processor_config = {
        "ocr": {"PATTERN": r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>"
                           r"<loc_(\d+)><loc_(\d+)>", "AREA_THRESHOLD": 0.0},
        "phrase_grounding": {"banned_grounding_tokens": ["the image"]},
        "pure_text": {}, "description_with_bboxes": {}, "description_with_polygons": {}, "polygons": {},
        "bboxes": {}, "description_with_bboxes_or_polygons": {},
    }
    processor = Florence2Processor(
        image_processor=image_processor, tokenizer=tokenizer, num_additional_image_tokens=1,
        post_processor_config=post_processor_config,
    )

    d_model = 32
    vision = Florence2VisionConfig(
        depths=[1, 1, 1, 1], embed_dim=[8, 16, 16, 32], num_heads=[1, 1, 1, 2], num_groups=[1, 1, 1, 2],
        window_size=2, drop_path_rate=0.0, projection_dim=d_model, max_temporal_embeddings=4,
        max_position_embeddings=8,
    )
    text = BartConfig(
        vocab_size=len(tokenizer), d_model=d_model, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id, forced_eos_token_id=tokenizer.eos_token_id,
        scale_embedding=False,
    )
    config = Florence2Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                             image_token_id=tokenizer.image_token_id)
    model = Florence2ForConditionalGeneration(config).eval()
    # At the default 0.02 init every picture gets the same caption: the vision features are
    # smaller than the fixed sinusoidal frame embedding added to them before the projection, and
    # the decoder's cross-attention hardly moves its residual stream. Larger gains on the last
    # patch embedding and on the cross-attention values make the caption follow the picture.
    _redraw(model.model.vision_tower.convs[-1].conv.weight, 4.0)
    for layer in model.model.language_model.decoder.layers:
        _redraw(layer.encoder_attn.v_proj.weight, 4.0)
        _redraw(layer.encoder_attn.out_proj.weight, 4.0)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=tokenizer.eos_token_id, forced_bos_token_id=tokenizer.bos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id, no_repeat_ngram_size=3, num_beams=3, max_new_tokens=20,
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


LLAVA_IMAGE_SIZE = 32
LLAVA_PATCH_SIZE = 8

LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build_llava(out_dir: Path, seed: int = 0) -> Path:
    """A JoyCaption-style LLaVA folder (the layout of `fancyfeast/llama-joycaption-beta-one-hf-llava`):
    a SigLIP vision tower read at its second-to-last layer with all patches kept ("full"), a
    Llama text model and a Llama-3 style byte-level tokenizer with header/eot tokens and a
    chat template. A 32x32 picture in 8x8 patches gives 16 image tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _seed_everything(seed)

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|finetune_right_pad_id|>", "<image>"]
    vocab, merges = _byte_level_bpe(specials)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", vocab["<|begin_of_text|>"])],
    )
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>", model_max_length=131072, clean_up_tokenization_spaces=False,
    )

    image_processor = SiglipImageProcessor(
        do_resize=True, size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE}, resample=3, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=LLAVA_PATCH_SIZE,
        vision_feature_select_strategy="full", chat_template=LLAMA3_CHAT_TEMPLATE, image_token="<image>",
        num_additional_image_tokens=0,
    )

    vision = SiglipVisionConfig(
        image_size=LLAVA_IMAGE_SIZE, patch_size=LLAVA_PATCH_SIZE, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, vision_use_head=False,
    )
    eos_ids = [vocab["<|end_of_text|>"], vocab["<|eot_id|>"]]
    # About 1/sqrt(hidden_size), not the 0.02 meant for wide models (it also sets the projector
    # and the head): at 0.02 attention barely carries the image tokens into the text positions
    # and the logits are so flat that seeded sampling gives every picture the same words.
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, rope_theta=500000.0, tie_word_embeddings=False,
        initializer_range=0.2, bos_token_id=vocab["<|begin_of_text|>"], eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    grid = LLAVA_IMAGE_SIZE // LLAVA_PATCH_SIZE
    config = LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=vocab["<image>"],
        projector_hidden_act="gelu", vision_feature_select_strategy="full", vision_feature_layer=-2,
        image_seq_length=grid * grid, multimodal_projector_bias=True,
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=vocab["<|begin_of_text|>"], eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id,
        do_sample=True, temperature=0.6, top_p=0.9,
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


AUDIO_MEL_BINS = 16
AUDIO_CHUNK_SECONDS = 4


def build_audio_lm(out_dir: Path, seed: int = 0) -> Path:
    """A Qwen2-Audio folder (the layout of `Qwen/Qwen2-Audio-7B-Instruct`): a Whisper-style audio
    encoder, a Qwen2 text model and the Qwen2AudioProcessor. The feature extractor pads to
    4-second windows of 16 mel bins (400 frames), so the encoder's 200 positions
    (`max_source_positions`) match what it receives; a 2-second clip gives 50 audio tokens."""
    from transformers import (
        GenerationConfig,
        Qwen2AudioConfig,
        Qwen2AudioEncoderConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        Qwen2Config,
        Qwen2Tokenizer,
        WhisperFeatureExtractor,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _seed_everything(seed)

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]
    vocab, merges = _byte_level_bpe(specials)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None,
        eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=32768,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})

    feature_extractor = WhisperFeatureExtractor(
        feature_size=AUDIO_MEL_BINS, sampling_rate=16000, hop_length=160, chunk_length=AUDIO_CHUNK_SECONDS,
        n_fft=400, padding_value=0.0, return_attention_mask=True,
    )
    processor = Qwen2AudioProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)

    frames = AUDIO_CHUNK_SECONDS * 16000 // 160
    audio = Qwen2AudioEncoderConfig(
        num_mel_bins=AUDIO_MEL_BINS, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
        max_source_positions=frames // 2, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )
    # The same unit-gain init as the LLaVA text model, so the clip, not the seed, picks the words.
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=False, initializer_range=0.2,
        bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"],
    )
    config = Qwen2AudioConfig(audio_config=audio.to_dict(), text_config=text.to_dict(),
                              audio_token_index=vocab["<|AUDIO|>"])
    model = Qwen2AudioForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=vocab["<|endoftext|>"], eos_token_id=[vocab["<|im_end|>"], vocab["<|endoftext|>"]],
        pad_token_id=vocab["<|endoftext|>"], do_sample=True, top_k=20, top_p=0.5, temperature=0.7,
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
