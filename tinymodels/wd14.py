"""A tiny WD14 tagger (`model.onnx` + `selected_tags.csv`) and a demo picture to tag."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

WD14_RATING_TAGS = ["general", "sensitive", "questionable", "explicit"]
WD14_GENERAL_TAGS = [
    "1girl", "solo", "long_hair", "short_hair", "smile", "looking_at_viewer", "blue_eyes", "blonde_hair",
    "brown_hair", "black_hair", "open_mouth", "outdoors", "indoors", "sky", "cloud", "day", "night", "tree",
    "flower", "water", "simple_background", "white_background", "animal", "cat", "dog", "animal_focus",
    "no_humans", "scenery", "red_theme", "blue_theme", "green_theme", "monochrome", "greyscale",
    "upper_body", "full_body", "portrait", "blurry", "depth_of_field", ">_<", "^_^",
]
WD14_CHARACTER_TAGS = ["hatsune_miku", "hakurei_reimu", "kirisame_marisa", "saber_(fate)", "link", "pikachu"]


def build_wd14(out_dir: Path, input_size: int = 448, seed: int = 0) -> Path:
    """A WD14-layout tagger in `out_dir`: model.onnx (input `input_1:0` float32
    [batch, S, S, 3] BGR 0..255, output `predictions_sigmoid` float32 [batch, n_tags]) and
    selected_tags.csv. The graph is a small ViT-like net: a strided patch-embedding
    convolution, tanh, global average pooling and a linear head with a sigmoid. The head is
    calibrated on random smooth pictures so that scores spread over (0, 1): each picture
    passes some tags and not others, and different pictures get different tags."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    names = WD14_RATING_TAGS + WD14_GENERAL_TAGS + WD14_CHARACTER_TAGS
    categories = [9] * len(WD14_RATING_TAGS) + [0] * len(WD14_GENERAL_TAGS) + [4] * len(WD14_CHARACTER_TAGS)
    patch, width = 16, 32
    conv_w = rng.normal(0, 1.0 / np.sqrt(3 * patch * patch), size=(width, 3, patch, patch)).astype(np.float32)
    conv_b = rng.normal(0, 0.1, size=(width,)).astype(np.float32)

    image = helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["batch", input_size, input_size, 3])
    feature_nodes = [
        helper.make_node("Transpose", ["input_1:0"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Mul", ["nchw", "scale"], ["scaled"]),
        helper.make_node("Sub", ["scaled", "one"], ["centred"]),
        helper.make_node("Conv", ["centred", "patch_embed.weight", "patch_embed.bias"], ["patches"],
                         kernel_shape=[patch, patch], strides=[patch, patch]),
        helper.make_node("Tanh", ["patches"], ["activated"]),
        helper.make_node("GlobalAveragePool", ["activated"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
    ]
    feature_weights = [
        numpy_helper.from_array(np.array([2.0 / 255.0], np.float32), "scale"),
        numpy_helper.from_array(np.array([1.0], np.float32), "one"),
        numpy_helper.from_array(conv_w, "patch_embed.weight"),
        numpy_helper.from_array(conv_b, "patch_embed.bias"),
    ]
    features = _run_graph(
        helper.make_graph(feature_nodes, "wd14_tiny_features", [image],
                          [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", width])],
                          feature_weights),
        _smooth_pictures(rng, count=64, size=input_size),
    )

    # Pooled features of different pictures differ little and mostly along one direction,
    # so the head reads the main directions of variation, whitened: each tag gets logits
    # of spread ~1.5 around a slightly negative bias (characters are rarer).
    mean = features.mean(axis=0)
    _, singular, axes = np.linalg.svd(features - mean, full_matrices=False)
    kept = 8
    whiten = axes[:kept].T * (np.sqrt(len(features)) / singular[:kept])
    direction = rng.normal(0, 1.5 / np.sqrt(kept), size=(kept, len(names)))
    bias = rng.normal(-0.6, 0.4, size=len(names))
    bias[-len(WD14_CHARACTER_TAGS):] -= 0.6
    head_w = (whiten @ direction).astype(np.float32)
    head_b = (bias - mean @ head_w).astype(np.float32)

    graph = helper.make_graph(
        feature_nodes + [
            helper.make_node("MatMul", ["features", "head.weight"], ["logits_raw"]),
            helper.make_node("Add", ["logits_raw", "head.bias"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
        ],
        "wd14_tiny_vit",
        [image],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", len(names)])],
        [*feature_weights, numpy_helper.from_array(head_w, "head.weight"),
         numpy_helper.from_array(head_b, "head.bias")],
    )
    model = _onnx_model(graph)
    onnx.checker.check_model(model)

    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, out_dir / "model.onnx")
    with open(out_dir / "selected_tags.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i, (name, category) in enumerate(zip(names, categories, strict=True)):
            writer.writerow([100000 + i, name, category, 1000 * (len(names) - i)])
    return out_dir


def _onnx_model(graph):
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="loramesh")
    model.ir_version = 8  # loadable by older onnxruntime releases too
    return model


def _run_graph(graph, inputs: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(_onnx_model(graph).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs})[0]


def _smooth_pictures(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """(count, size, size, 3) float32 in 0..255: random colour fields of varied smoothness
    and aspect ratio, padded square with white as the tagger pads pictures."""
    from PIL import Image

    pictures = np.full((count, size, size, 3), 255, np.float32)
    for i in range(count):
        cells = int(rng.integers(2, 24))
        width, height = (int(size * rng.uniform(0.4, 1.0)), size)[:: int(rng.choice([1, -1]))]
        small = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
        top, left = (size - height) // 2, (size - width) // 2
        pictures[i, top : top + height, left : left + width] = np.asarray(
            Image.fromarray(small).resize((width, height), Image.BICUBIC)
        )
    return pictures


def write_demo_image(path: Path, size: tuple[int, int] = (512, 384), seed: int = 0) -> Path:
    """A smooth colourful picture to try the tagger on."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(small).resize(size, Image.BICUBIC).save(path)
    return path
