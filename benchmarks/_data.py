"""The tasks of the benchmarks: a `Split` (one preprocessed split: images, token ids or a frozen model's head inputs)
and a `Task` (a way to make a fresh model and its train/val/test splits), built from Fashion-MNIST on DINOv2-S
(`vision_task`), tweet sentiment on SmolLM2-135M (`text_task`), or synthetic data for the tiny models of `--tiny`; and
`head_inputs`, the split a linear probe trains on (what the frozen model feeds its head)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import common  # noqa: F401, I001  (first: it sets the OpenMP wait policy before torch loads)
import torch
from _models import (
    _tiny_llama_config,
    load_image_classifier,
    load_text_classifier,
    model_head,
    text_model_path,
    vision_model_path,
)
from torch import nn
from tqdm.auto import tqdm


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


def text_task(
    model: Optional[str] = None,
    *,
    sizes: dict[str, int],
    max_length: int = 48,
    tiny: bool = False,
    num_labels: int = 2,
    corpus: str = "tweets",
) -> Task:
    """A text classification task on SmolLM2-135M (or `model`) with a classification head. `corpus="tweets"`: tweet
    sentiment (annotator confidence >= 0.7), binary (negative / positive) with `num_labels=2`, or with the neutral
    tweets as a third class with `num_labels=3`. `corpus="bbc"`: the topic (5 classes) of a BBC news headline."""
    if corpus not in ("tweets", "bbc"):
        raise ValueError(f"Unknown text corpus {corpus!r}: 'tweets' or 'bbc'.")
    if corpus == "tweets" and num_labels not in (2, 3):
        raise ValueError(f"Tweet sentiment has 2 (negative / positive) or 3 classes (with neutral), not {num_labels}.")
    if corpus == "bbc" and num_labels != 5:
        raise ValueError(f"BBC news headlines have 5 topics, not {num_labels}.")
    if tiny:
        return _synthetic_text_task(sizes, num_labels)
    from transformers import AutoTokenizer

    from peft_toast.assets import load_bbc_news, load_tweet_sentiment

    path = text_model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if corpus == "tweets":
        texts = load_tweet_sentiment(binary=num_labels == 2, min_confidence=0.7, seed=0)
        description = f"tweet sentiment ({'binary' if num_labels == 2 else '3 classes'}, confidence >= 0.7)"
    else:
        texts = load_bbc_news("headline", seed=0)
        description = "BBC news headline topic (5 classes)"
    parts = _stratified(texts["train"], sizes["train"] + sizes["val"], seed=0).train_test_split(
        test_size=sizes["val"], stratify_by_column="label", seed=0
    )
    datasets = {"train": parts["train"], "val": parts["test"], "test": _stratified(texts["test"], sizes["test"], 0)}
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
        description=f"{description}, <= {max_length} tokens",
        model_name=model or "SmolLM2-135M-Instruct (offline)",
        num_labels=num_labels,
        new_model=lambda: load_text_classifier(path, num_labels, pad_token_id),
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


def _synthetic_text_task(sizes: dict[str, int], num_labels: int = 2) -> Task:
    """Random token sequences of the tokens from `first = max(4, num_labels)` on; class c > 0 contains token
    `first - c` somewhere (class 1 token 3, class 2 token 2, ...), class 0 none of them. Token 0 pads."""
    generator = torch.Generator().manual_seed(0)
    vocab = _tiny_llama_config().vocab_size
    first = max(4, num_labels)
    splits = {}
    for name, size in sizes.items():
        labels = torch.arange(size) % num_labels
        rows = []
        for label in labels.tolist():
            length = int(torch.randint(4, 12, (1,), generator=generator))
            ids = torch.randint(first, vocab, (length,), generator=generator)
            if label:
                ids[int(torch.randint(0, length, (1,), generator=generator))] = first - label
            rows.append(ids.tolist())
        splits[name] = Split(labels=labels, input_ids=rows, pad_token_id=0)
    return Task(
        name="text",
        description="synthetic token sequences (tiny)",
        model_name="tiny random Llama",
        num_labels=num_labels,
        new_model=lambda: load_text_classifier(None, num_labels, 0, tiny=True),
        splits=splits,
    )


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
