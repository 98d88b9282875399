"""What the benchmarks in this folder share: tasks (a model and its data), methods (what each trains), the training loop,
timing and peak-memory measurement, and writing results (JSON, markdown tables in `docs/benchmarks.md`, plots).

Run any benchmark with `--help`. Every benchmark runs on the real offline models of `peft_toast.assets` by default
(DINOv2-S as a ViT, SmolLM2-135M), accepts Hub ids instead, and has a `--tiny` switch that swaps in tiny random models
and synthetic data so that the whole program runs in seconds (the CI smoke test uses it).

This file is also the peak-memory worker: `python benchmarks/common.py peak-memory '<json spec>'` measures one
configuration in a fresh process (see [`measure_peak_memory`]).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning. On a CPU shared with other jobs, spinning threads make every
# multi-threaded op wait for a descheduled peer: 2-thread steps ran up to 10x slower than 1-thread steps here. Must be
# set before torch loads, so the benchmarks import this module first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402

import peft_toast  # noqa: E402  (registers TOAST with PEFT)
from peft_toast import ToastConfig  # noqa: E402
from peft_toast.assets import resolve_model  # noqa: E402
from peft_toast.io import atomic_file  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
IMAGES = REPO / "docs" / "img"

# The methods compared, in table order. "toast-r8" is TOAST with rank-8 feedback maps (`feedback_rank=8`): the same
# number of trainable parameters as LoRA r=8 on the query and value projections.
METHODS = ("toast", "toast-r8", "lora", "linear", "full")
METHOD_LABELS = {
    "toast": "TOAST (full-rank feedback)",
    "toast-r8": "TOAST, feedback_rank=8",
    "lora": "LoRA r=8 (q, v)",
    "linear": "linear probe",
    "full": "full fine-tuning",
    "base": "frozen base model",
}
TOAST_CONFIGS = {"toast": {}, "toast-r8": {"feedback_rank": 8}}
LORA_RANK = 8

# Heads of the classification models; they train with every method.
HEAD_NAMES = ("classifier", "score")


# ------------------------------------------------------------------------------------------------------ set-up


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="A small version of the run that takes a few minutes.")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="Tiny random models and synthetic data (seconds; used by the CI smoke test).",
    )
    parser.add_argument("--output", type=Path, help="Where to write the raw results as JSON.")
    parser.add_argument(
        "--vision-model",
        default=None,
        help="Image model: a folder or Hub id (default: the offline DINOv2-S ViT of peft_toast.assets).",
    )
    parser.add_argument(
        "--text-model",
        default=None,
        help="Language model: a folder or Hub id (default: the offline SmolLM2-135M of peft_toast.assets).",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2).")
    parser.add_argument(
        "--no-docs",
        action="store_true",
        help="Do not regenerate the tables and plots in docs/ (full runs do by default; --quick and --tiny never do).",
    )


def setup(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # no load report for every freshly initialised head
    transformers.utils.logging.disable_progress_bar()


def updates_docs(args: argparse.Namespace) -> bool:
    return not (args.quick or args.tiny or args.no_docs)


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": __import__("peft").__version__,
        "peft_toast": peft_toast.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }
    with contextlib.suppress(OSError):
        model_names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        info["cpu"] = model_names[0] if model_names else platform.processor()
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---------------------------------------------------------------------------------------------------- models


def _tiny_vit_config(num_labels: int = 10, image_size: int = 28) -> transformers.ViTConfig:
    return transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=image_size,
        patch_size=7,
        num_labels=num_labels,
    )


def _tiny_llama_config(**kwargs) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **kwargs,
    )


def vision_model_path(model: Optional[str], image_size: int) -> str:
    """`model` as `peft_toast.assets.resolve_model` reads it; None is the offline DINOv2-S at `image_size` px."""
    return resolve_model(model, default="dinov2-small", image_size=image_size)


def text_model_path(model: Optional[str]) -> str:
    """`model` as `peft_toast.assets.resolve_model` reads it; None is the offline SmolLM2-135M-Instruct."""
    return resolve_model(model, default="smollm2-135m")


def load_image_classifier(
    model: Optional[str], num_labels: int, *, image_size: int = 112, tiny: bool = False, dtype=torch.float32
) -> nn.Module:
    """A pretrained image backbone with a fresh `num_labels`-way head (initialised from torch's global seed)."""
    if tiny:
        return transformers.ViTForImageClassification(_tiny_vit_config(num_labels, image_size)).to(dtype)
    return transformers.AutoModelForImageClassification.from_pretrained(
        vision_model_path(model, image_size), num_labels=num_labels, ignore_mismatched_sizes=True, dtype=dtype
    )


def load_text_classifier(model: Optional[str], num_labels: int, pad_token_id: int, *, tiny: bool = False) -> nn.Module:
    """A pretrained decoder with a fresh sequence-classification head on its last real token."""
    if tiny:
        return transformers.LlamaForSequenceClassification(_tiny_llama_config(num_labels=num_labels))
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        text_model_path(model), num_labels=num_labels, pad_token_id=pad_token_id, dtype=torch.float32
    )


def load_causal_lm(model: Optional[str], *, tiny: bool = False, dtype=torch.float32) -> nn.Module:
    if tiny:
        return transformers.LlamaForCausalLM(_tiny_llama_config()).to(dtype)
    return transformers.AutoModelForCausalLM.from_pretrained(text_model_path(model), dtype=dtype)


def _lora_targets(model: nn.Module) -> list[str]:
    """The query and value projections, under the names transformers uses for this model."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for query, value in (("q_proj", "v_proj"), ("query", "value")):
        if {query, value} <= names:
            return [query, value]
    raise ValueError(
        "Could not find the query/value projections of this model for LoRA (looked for q_proj/v_proj and "
        "query/value); use a model whose attention uses one of these names."
    )


def apply_method(model: nn.Module, method: str) -> nn.Module:
    """Make `model` train the way `method` does. Every method trains the task head, if the model has one.

    - `toast`, `toast-r8`: `get_peft_model` with the matching `ToastConfig` (the head trains by default);
    - `lora`: PEFT LoRA, rank 8, alpha 16, no dropout, on the query and value projections, plus the head;
    - `linear`: only the head (a linear probe on the frozen backbone);
    - `full`: every parameter.
    """
    heads = [name for name in HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]
    if method in TOAST_CONFIGS:
        task_type = "CAUSAL_LM" if _is_causal_lm(model) else None
        return get_peft_model(model, ToastConfig(task_type=task_type, **TOAST_CONFIGS[method]))
    if method == "lora":
        config = LoraConfig(
            r=LORA_RANK,
            lora_alpha=2 * LORA_RANK,
            lora_dropout=0.0,
            target_modules=_lora_targets(model),
            modules_to_save=heads or None,
            task_type="CAUSAL_LM" if _is_causal_lm(model) else None,
        )
        return get_peft_model(model, config)
    if method == "linear":
        if not heads:
            raise ValueError("A linear probe needs a classification model with a `classifier` or `score` head.")
        model.requires_grad_(False)
        for name in heads:
            getattr(model, name).requires_grad_(True)
        return model
    if method == "full":
        return model.requires_grad_(True)
    if method == "base":
        return model.requires_grad_(False)
    raise ValueError(f"Unknown method {method!r}; choose from {', '.join(METHODS + ('base',))}.")


def _is_causal_lm(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForCausalLM")


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------------ data


@dataclass
class Split:
    """One split of a task, preprocessed once: images as a `(N, 3, H, W)` tensor, texts as token-id lists (padded per
    batch, on the right, so that batches are only as wide as their longest text), or the frozen model's head inputs
    `(N, d)` for a linear probe."""

    labels: torch.Tensor  # (N,)
    pixel_values: Optional[torch.Tensor] = None  # (N, 3, H, W)
    input_ids: Optional[list[list[int]]] = None
    pad_token_id: int = 0
    features: Optional[torch.Tensor] = None  # (N, d)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        indices = torch.as_tensor(indices)
        if self.features is not None:
            return {"features": self.features[indices], "labels": self.labels[indices]}
        if self.pixel_values is not None:
            return {"pixel_values": self.pixel_values[indices], "labels": self.labels[indices]}
        rows = [self.input_ids[i] for i in indices.tolist()]
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T)
        for row, ids in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": self.labels[indices]}


@dataclass
class Task:
    """A classification task: a way to make a fresh model, and its train/val/test splits."""

    name: str
    description: str
    model_name: str
    num_labels: int
    new_model: Callable[[], nn.Module]
    splits: dict[str, Split] = field(default_factory=dict)
    _probe_splits: Optional[dict[str, Split]] = None

    def probe_splits(self) -> dict[str, Split]:
        """The splits as the frozen model's head inputs (computed once)."""
        if self._probe_splits is None:
            model = self.new_model()
            self._probe_splits = {
                name: Split(labels=split.labels, features=head_inputs(model, split))
                for name, split in self.splits.items()
            }
        return self._probe_splits


def _stratified(dataset, size: int, seed: int):
    """A class-stratified random subset of `size` rows of a `datasets.Dataset`."""
    if size >= len(dataset):
        return dataset
    return dataset.train_test_split(train_size=size, stratify_by_column="label", seed=seed)["train"]


def vision_task(
    model: Optional[str] = None, *, sizes: dict[str, int], image_size: int = 112, tiny: bool = False
) -> Task:
    """Fashion-MNIST (10 classes) at `image_size` px on DINOv2-S (or `model`). Val comes from the train split."""
    if tiny:
        return _synthetic_vision_task(sizes)
    from transformers import AutoImageProcessor

    from peft_toast.assets import FASHION_MNIST_CLASSES, load_fashion_mnist

    path = vision_model_path(model, image_size)
    processor = AutoImageProcessor.from_pretrained(path)
    train_val = load_fashion_mnist("train", limit=sizes["train"] + sizes["val"], seed=0)
    parts = train_val.train_test_split(test_size=sizes["val"], stratify_by_column="label", seed=0)
    datasets = {"train": parts["train"], "val": parts["test"], "test": load_fashion_mnist("test", limit=sizes["test"])}
    splits = {}
    for name, dataset in tqdm(datasets.items(), desc="preprocessing images", leave=False):
        pixel_values = processor(images=[image.convert("RGB") for image in dataset["image"]], return_tensors="pt")
        splits[name] = Split(labels=torch.tensor(list(dataset["label"])), pixel_values=pixel_values["pixel_values"])
    num_labels = len(FASHION_MNIST_CLASSES)
    return Task(
        name="vision",
        description=f"Fashion-MNIST, {image_size} px",
        model_name=model or f"DINOv2-S (ViT-S/14, offline) at {image_size} px",
        num_labels=num_labels,
        new_model=lambda: load_image_classifier(path, num_labels, image_size=image_size),
        splits=splits,
    )


def text_task(model: Optional[str] = None, *, sizes: dict[str, int], max_length: int = 48, tiny: bool = False) -> Task:
    """Binary tweet sentiment (annotator confidence >= 0.7) on SmolLM2-135M (or `model`) with a classification head."""
    if tiny:
        return _synthetic_text_task(sizes)
    from transformers import AutoTokenizer

    from peft_toast.assets import load_tweet_sentiment

    path = text_model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    corpus = load_tweet_sentiment(binary=True, min_confidence=0.7, seed=0)
    parts = _stratified(corpus["train"], sizes["train"] + sizes["val"], seed=0).train_test_split(
        test_size=sizes["val"], stratify_by_column="label", seed=0
    )
    datasets = {"train": parts["train"], "val": parts["test"], "test": _stratified(corpus["test"], sizes["test"], 0)}
    splits = {
        name: Split(
            labels=torch.tensor(list(dataset["label"])),
            input_ids=tokenizer(list(dataset["text"]), truncation=True, max_length=max_length)["input_ids"],
            pad_token_id=pad_token_id,
        )
        for name, dataset in datasets.items()
    }
    return Task(
        name="text",
        description=f"tweet sentiment (binary, confidence >= 0.7), <= {max_length} tokens",
        model_name=model or "SmolLM2-135M-Instruct (offline)",
        num_labels=2,
        new_model=lambda: load_text_classifier(path, 2, pad_token_id),
        splits=splits,
    )


def _synthetic_vision_task(sizes: dict[str, int], num_labels: int = 4, image_size: int = 28) -> Task:
    """Noise images with a class-specific pattern added: learnable, so accuracies move away from chance."""
    generator = torch.Generator().manual_seed(0)
    patterns = torch.randn(num_labels, 3, image_size, image_size, generator=generator)
    splits = {}
    for name, size in sizes.items():
        labels = torch.arange(size) % num_labels
        noise = torch.randn(size, 3, image_size, image_size, generator=generator)
        splits[name] = Split(labels=labels, pixel_values=noise + patterns[labels])
    return Task(
        name="vision",
        description="synthetic images (tiny)",
        model_name="tiny random ViT",
        num_labels=num_labels,
        new_model=lambda: load_image_classifier(None, num_labels, image_size=image_size, tiny=True),
        splits=splits,
    )


def _synthetic_text_task(sizes: dict[str, int]) -> Task:
    """Random token sequences; class 1 contains token 3 somewhere, class 0 never does."""
    generator = torch.Generator().manual_seed(0)
    vocab = _tiny_llama_config().vocab_size
    splits = {}
    for name, size in sizes.items():
        labels = torch.arange(size) % 2
        rows = []
        for label in labels.tolist():
            length = int(torch.randint(4, 12, (1,), generator=generator))
            ids = torch.randint(4, vocab, (length,), generator=generator)
            if label:
                ids[int(torch.randint(0, length, (1,), generator=generator))] = 3
            rows.append(ids.tolist())
        splits[name] = Split(labels=labels, input_ids=rows, pad_token_id=0)
    return Task(
        name="text",
        description="synthetic token sequences (tiny)",
        model_name="tiny random Llama",
        num_labels=2,
        new_model=lambda: load_text_classifier(None, 2, 0, tiny=True),
        splits=splits,
    )


# ---------------------------------------------------------------------------------------------- linear probe


def model_head(model: nn.Module) -> nn.Module:
    """The classification head (`classifier` or `score`) of a transformers model."""
    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(f"{type(model).__name__} has no `classifier` or `score` head to probe.")


@torch.no_grad()
def head_inputs(model: nn.Module, split: Split, batch_size: int = 64) -> torch.Tensor:
    """What the frozen `model` feeds its head for each example of `split`, `(N, d)`.

    A decoder's sequence-classification head reads every position and the model keeps the logits of the last token
    that is not padding; with right padding (and no padding token inside a text) that is position `length - 1`.
    """
    captured = []
    handle = model_head(model).register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    model.eval()
    rows = []
    try:
        for start in tqdm(range(0, len(split), batch_size), desc="frozen features", leave=False):
            batch = split.batch(range(start, min(start + batch_size, len(split))))
            model(**{key: value for key, value in batch.items() if key != "labels"})
            features = captured.pop()  # (B, d), or (B, T, d) for a decoder
            if features.dim() == 3:
                last = batch["attention_mask"].sum(-1) - 1  # (B,)
                features = features[torch.arange(len(last)), last]
            rows.append(features)
    finally:
        handle.remove()
    return torch.cat(rows)  # (N, d)


class LinearProbe(nn.Module):
    """A model's head alone, on cached head inputs (`Split.features`).

    Training it is exactly training the head of the frozen model (the backbone is deterministic: no dropout, no
    augmentation), without running the backbone at every step.
    """

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor, labels: Optional[torch.Tensor] = None) -> SequenceClassifierOutput:
        logits = self.head(features)  # (B, num_labels)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


# -------------------------------------------------------------------------------------------------- training


def batch_order(num_examples: int, steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Index batches for `steps` steps: a fresh seeded permutation every epoch, so every method sees the same data."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat(
        [
            torch.randperm(num_examples, generator=generator)
            for _ in range(math.ceil(steps * batch_size / num_examples))
        ]
    )
    return [order[step * batch_size : (step + 1) * batch_size] for step in range(steps)]


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup_fraction: float = 0.1):
    """Linear warm-up over the first `warmup_fraction` of the steps, then cosine decay to zero.

    Kept instead of `transformers.get_cosine_schedule_with_warmup`, which differs at every warm-up step (measured for
    1 to 400 steps; the cosine part is identical): it gives step s the factor s / warmup, so the first step runs at
    lr 0 (a one-step run does not train) and the peak comes a step later; here step s gets (s + 1) / warmup. Every
    result in docs/benchmarks.md and benchmarks/results/ was trained with this schedule, and sweeps are extended by
    new runs merged with earlier ones.
    """
    warmup = max(1, int(steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def is_head_parameter(name: str) -> bool:
    return any(f"{head}." in f".{name}" for head in HEAD_NAMES)


def train(
    model: nn.Module,
    split: Split,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    head_lr: Optional[float] = None,
    desc: str = "training",
) -> list[float]:
    """AdamW (no weight decay), warm-up + cosine schedule, gradient clipping at 1.0; returns the training losses.

    `lr` applies to the method's own parameters and `head_lr` (default: `lr`) to the task head's.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    parameters = [p for _, p in named]
    groups = [
        {"params": [p for name, p in named if not is_head_parameter(name)], "lr": lr},
        {"params": [p for name, p in named if is_head_parameter(name)], "lr": lr if head_lr is None else head_lr},
    ]
    optimizer = torch.optim.AdamW([group for group in groups if group["params"]], weight_decay=0.0)
    scheduler = warmup_cosine(optimizer, steps)
    model.train()
    losses = []
    with tqdm(batch_order(len(split), steps, batch_size, seed), desc=desc, leave=False) as progress:
        for indices in progress:
            loss = model(**split.batch(indices)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            progress.set_postfix(loss=f"{loss.item():.3f}")
    if not all(math.isfinite(loss) for loss in losses):
        raise FloatingPointError(f"{desc}: the training loss became NaN/inf at lr={lr}; lower the learning rate.")
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, batch_size: int = 64) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(split), batch_size):
        batch = split.batch(range(start, min(start + batch_size, len(split))))
        labels = batch.pop("labels")
        correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    return correct / len(split)


# --------------------------------------------------------------------------------------------------- timing


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def interleaved_timings(
    workloads: dict[str, Callable[[], Any]], *, repeats: int, warmup: int, device: str = "cpu", desc: str = "timing"
) -> dict[str, list[float]]:
    """Seconds per call of each workload, measured in rounds: every round runs every workload once, so that a slow
    phase of a shared machine slows all of them alike rather than one of them. `warmup` rounds are discarded."""
    timings: dict[str, list[float]] = {name: [] for name in workloads}
    for round_index in tqdm(range(warmup + repeats), desc=desc, leave=False):
        for name, workload in workloads.items():
            synchronize(device)
            start = time.perf_counter()
            workload()
            synchronize(device)
            if round_index >= warmup:
                timings[name].append(time.perf_counter() - start)
    return timings


def train_step_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One AdamW step of `model` on a fixed `batch` (forward, backward, update)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)

    def step() -> None:
        model.train()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def forward_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    inputs = {key: value for key, value in batch.items() if key != "labels"}

    @torch.no_grad()
    def forward() -> None:
        model.eval()
        model(**inputs)

    return forward


# --------------------------------------------------------------------------------------- cost configurations


@dataclass
class CostSpec:
    """One model/method/shape whose training step, forward or generation is measured.

    `family` is `"vision"` (image classifier, `size` = image side in px; a multiple of 14, or of 7 with `tiny`) or
    `"text"` (causal LM, `size` = tokens).
    """

    family: str
    method: str
    batch_size: int
    size: int
    kind: str = "train"  # "train", "forward" or "generate"
    model: Optional[str] = None
    tiny: bool = False
    device: str = "cpu"
    dtype: str = "fp32"
    new_tokens: int = 32
    repeats: int = 5
    warmup: int = 2
    threads: int = 2

    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]


def build_cost_model(spec: CostSpec) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model of `spec` with its method applied, on its device, and one fixed random batch (seeded)."""
    torch.manual_seed(0)
    dtype = spec.torch_dtype()
    if spec.family == "vision":
        image_size = spec.size
        model = load_image_classifier(spec.model, 10, image_size=image_size, tiny=spec.tiny, dtype=dtype)
        batch = {
            "pixel_values": torch.randn(spec.batch_size, 3, image_size, image_size, dtype=dtype),
            "labels": torch.randint(0, 10, (spec.batch_size,)),
        }
    elif spec.family == "text":
        model = load_causal_lm(spec.model, tiny=spec.tiny, dtype=dtype)
        length = spec.size
        input_ids = torch.randint(3, model.config.vocab_size, (spec.batch_size, length))
        batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    else:
        raise ValueError(f"Unknown model family {spec.family!r}; use 'vision' or 'text'.")
    model = apply_method(model, spec.method).to(spec.device)
    return model, {key: value.to(spec.device) for key, value in batch.items()}


def generate_fn(model: nn.Module, batch: dict[str, torch.Tensor], new_tokens: int) -> Callable[[], None]:
    """Greedy decoding of exactly `new_tokens` tokens with the KV cache, from the prompt in `batch`."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    @torch.no_grad()
    def generate() -> None:
        model.eval()
        model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad_token_id,
        )

    return generate


def workload_fn(model: nn.Module, batch: dict[str, torch.Tensor], spec: CostSpec) -> Callable[[], None]:
    if spec.kind == "train":
        return train_step_fn(model, batch)
    if spec.kind == "forward":
        return forward_fn(model, batch)
    if spec.kind == "generate":
        return generate_fn(model, batch, spec.new_tokens)
    raise ValueError(f"Unknown workload {spec.kind!r}; use 'train', 'forward' or 'generate'.")


def _rss_kib(field_name: str) -> int:
    """`VmRSS` (current) or `VmHWM` (high-water mark) of this process, in KiB."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field_name}:\s+(\d+) kB", status).group(1))


def _reset_peak_rss() -> None:
    """Reset this process's RSS high-water mark (`VmHWM`, and `ru_maxrss` with it) to its current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_memory_worker(spec: CostSpec) -> dict[str, float]:
    """Build `spec` and run its workload `warmup + repeats` times, returning memory in MiB.

    CPU: the process's peak resident set size while the workload runs (the high-water mark is reset once the model,
    optimizer and batch exist) and that peak minus the resident size just before: what training (activations,
    gradients, optimizer states) or inference adds on top of the loaded model. CUDA: `torch.cuda.max_memory_allocated`.
    """
    torch.set_num_threads(spec.threads)
    transformers.logging.set_verbosity_error()
    model, batch = build_cost_model(spec)
    workload = workload_fn(model, batch, spec)
    steps = spec.warmup + spec.repeats
    if spec.device.startswith("cuda"):
        torch.cuda.synchronize(spec.device)
        before = torch.cuda.memory_allocated(spec.device)
        torch.cuda.reset_peak_memory_stats(spec.device)
        for _ in range(steps):
            workload()
        torch.cuda.synchronize(spec.device)
        peak = torch.cuda.max_memory_allocated(spec.device)
        return {"peak_mib": peak / 2**20, "added_mib": (peak - before) / 2**20, "model_mib": before / 2**20}
    before = _rss_kib("VmRSS")
    _reset_peak_rss()
    for _ in range(steps):
        workload()
    peak = _rss_kib("VmHWM")
    return {"peak_mib": peak / 1024, "added_mib": (peak - before) / 1024, "model_mib": before / 1024}


def measure_peak_memory(spec: CostSpec, timeout: float = 1800) -> dict[str, float]:
    """Run [`peak_memory_worker`] for `spec` in a fresh Python process, so that no other configuration's memory (or
    allocator leftovers) counts, and return its result."""
    command = [sys.executable, str(Path(__file__).resolve()), "peak-memory", json.dumps(spec.__dict__)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"The peak-memory worker failed for {spec}:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------- results


def write_json(path: Path, results: dict[str, Any]) -> None:
    with atomic_file(path) as file:
        json.dump(results, file, indent=2)
        file.write("\n")
    print(f"raw results: {path}")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def update_docs_section(name: str, markdown: str, path: Path = DOCS) -> None:
    """Replace the text between `<!-- BEGIN name -->` and `<!-- END name -->` in `docs/benchmarks.md`."""
    text = path.read_text()
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    if begin not in text or end not in text:
        raise ValueError(f"{path} has no `{begin}` ... `{end}` section; add the two markers where the table goes.")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    with atomic_file(path) as file:
        file.write(f"{head}{begin}\n{markdown.strip()}\n{end}{tail}")
    print(f"updated section {name!r} of {path}")


def figure_per_task(count: int, width: float, height: float):
    """`(pyplot, figure, axes)`: a matplotlib figure (Agg backend, no display needed) with one row of `count` axes, each
    `width` x `height` inches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, count, figsize=(width * count, height), squeeze=False)
    return plt, figure, axes[0]


def save_figure(figure, name: str) -> Path:
    path = IMAGES / name
    with atomic_file(path, "wb") as file:
        figure.savefig(file, format="png", dpi=120, bbox_inches="tight")
    print(f"plot: {path}")
    return path


def format_count(count: int) -> str:
    if count >= 1e6:
        return f"{count / 1e6:.2f}M"
    if count >= 1e3:
        return f"{count / 1e3:.1f}k"
    return str(count)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "peak-memory":
        sys.exit("usage: python benchmarks/common.py peak-memory '<CostSpec as JSON>'")
    print(json.dumps(peak_memory_worker(CostSpec(**json.loads(sys.argv[2])))))
