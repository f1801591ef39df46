"""Tiny randomly initialised models in the real architectures and file layouts, for the
tests and the offline demo (no machine here can download weights).

    python -m services.common.tiny_models wd14 --out var/models/wd14-tiny
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

RATING_TAGS = ["general", "sensitive", "questionable", "explicit"]
GENERAL_TAGS = [
    "1girl", "solo", "long_hair", "short_hair", "smile", "looking_at_viewer", "blue_eyes", "blonde_hair",
    "brown_hair", "black_hair", "open_mouth", "outdoors", "indoors", "sky", "cloud", "day", "night", "tree",
    "flower", "water", "simple_background", "white_background", "animal", "cat", "dog", "animal_focus",
    "no_humans", "scenery", "red_theme", "blue_theme", "green_theme", "monochrome", "greyscale",
    "upper_body", "full_body", "portrait", "blurry", "depth_of_field", ">_<", "^_^",
]
CHARACTER_TAGS = ["hatsune_miku", "hakurei_reimu", "kirisame_marisa", "saber_(fate)", "link", "pikachu"]


def build_wd14(out_dir: Path, input_size: int = 448, seed: int = 0) -> Path:
    """A WD14-layout tagger: model.onnx (input `input_1:0` [-1, S, S, 3] float32 BGR 0..255,
    output `predictions_sigmoid` [-1, n_tags]) and selected_tags.csv. The graph is a
    small ViT-like net: a strided patch-embedding convolution, GELU-ish activation, global
    average pooling and a linear head with a sigmoid."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    names = RATING_TAGS + GENERAL_TAGS + CHARACTER_TAGS
    categories = [9] * len(RATING_TAGS) + [0] * len(GENERAL_TAGS) + [4] * len(CHARACTER_TAGS)
    patch, width = 16, 32
    conv_w = rng.normal(0, 1.0 / np.sqrt(3 * patch * patch), size=(width, 3, patch, patch)).astype(np.float32)
    conv_b = rng.normal(0, 0.1, size=(width,)).astype(np.float32)
    head_w = rng.normal(0, 2.5, size=(width, len(names))).astype(np.float32)
    head_b = rng.normal(-0.3, 0.6, size=(len(names),)).astype(np.float32)
    # Character tags start rarer, as in the real taggers.
    head_b[-len(CHARACTER_TAGS):] -= 0.5

    initializers = [
        numpy_helper.from_array(np.array([1.0 / 127.5], np.float32), "scale"),
        numpy_helper.from_array(np.array([1.0], np.float32), "one"),
        numpy_helper.from_array(conv_w, "patch_embed.weight"),
        numpy_helper.from_array(conv_b, "patch_embed.bias"),
        numpy_helper.from_array(head_w, "head.weight"),
        numpy_helper.from_array(head_b, "head.bias"),
    ]
    nodes = [
        helper.make_node("Transpose", ["input_1:0"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Mul", ["nchw", "scale"], ["scaled"]),
        helper.make_node("Sub", ["scaled", "one"], ["centred"]),
        helper.make_node("Conv", ["centred", "patch_embed.weight", "patch_embed.bias"], ["patches"],
                         kernel_shape=[patch, patch], strides=[patch, patch]),
        helper.make_node("Tanh", ["patches"], ["activated"]),
        helper.make_node("GlobalAveragePool", ["activated"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
        helper.make_node("MatMul", ["features", "head.weight"], ["logits_raw"]),
        helper.make_node("Add", ["logits_raw", "head.bias"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    graph = helper.make_graph(
        nodes, "wd14_tiny_vit",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["batch", input_size, input_size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", len(names)])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="loramesh")
    model.ir_version = 8
    onnx.checker.check_model(model)

    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, out_dir / "model.onnx")
    with open(out_dir / "selected_tags.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i, (name, category) in enumerate(zip(names, categories, strict=False)):
            writer.writerow([100000 + i, name, category, 1000 * (len(names) - i)])
    return out_dir


def write_demo_image(path: Path, size: tuple[int, int] = (512, 384), seed: int = 0) -> Path:
    """A smooth colourful picture to try the tagger on."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(small).resize(size, Image.BICUBIC).save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Build tiny models for tests and the offline demo.")
    parser.add_argument("kind", choices=["wd14"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print({"wd14": build_wd14}[args.kind](args.out))


if __name__ == "__main__":
    main()
