"""Command-line and data helpers of `python -m peft_toast.calibrate` and `python -m peft_toast.pretune`: models and
data by name, batching, the arguments the two commands share.

`--model` and `--data` also accept the offline models and datasets of `peft_toast.assets` (`--model` goes through its
`resolve_model`); this is the only package module that imports it, and `import peft_toast` never loads this one.

`HyphenArgumentParser` is the parser of every command of the project (these two; examples/ and benchmarks/ through
`script_parser`): long options spelt with hyphens, their underscore spelling accepted too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
from torch import nn

from .assets import OFFLINE_MODELS, resolve_model
from .config import ToastConfig

__all__ = [
    "AUTOCAST_DTYPES",
    "OFFLINE_DATA",
    "OFFLINE_MODELS",
    "HyphenArgumentParser",
    "add_data_arguments",
    "cli_parser",
    "examples_from_args",
    "expected_load_report",
    "image_classifier_from_backbone",
    "labelled_examples",
    "labelled_image_batches",
    "load_examples",
    "load_model_and_processor",
    "make_batches",
    "model_and_processor_from_args",
    "resolve_model_path",
    "script_parser",
    "toast_config_from_args",
]

# Offline datasets of `peft_toast.assets`, accepted by `--data` besides text files and Hub dataset names.
# "bbc-news": whole BBC news articles, general English prose (for a decoder's pre-tuning or calibration).
OFFLINE_DATA = ("fashion-mnist", "tweets", "bbc-news")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class HyphenArgumentParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` with the project's one flag style: long options are declared and shown with hyphens
    (`--train-size`; the value is `args.train_size`, as argparse names it), and each one's underscore spelling
    (`--train_size`, `--train_size=5`, the examples' former style) is accepted as a hidden alias, so that older commands
    keep working. Declaring a long option with an underscore is refused, so the style cannot drift back."""

    def add_argument(self, *name_or_flags: str, **kwargs):
        for flag in name_or_flags:
            if flag.startswith("--") and "_" in flag:
                raise ValueError(
                    f"Spell the option {flag} with hyphens, {flag.replace('_', '-')} (the underscore spelling is "
                    f"accepted anyway)."
                )
        return super().add_argument(*name_or_flags, **kwargs)

    def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace: Optional[argparse.Namespace] = None):
        args = list(sys.argv[1:] if args is None else args)
        end = args.index("--") if "--" in args else len(args)  # after `--` every word is a value
        return super().parse_known_args([*map(self._hyphenated, args[:end]), *args[end:]], namespace)

    def _hyphenated(self, word: str) -> str:
        """`word` with the underscores of its option name made hyphens, when that names one of this parser's long
        options (or, as argparse allows, abbreviates one); any other word unchanged."""
        name, equals, value = word.partition("=")
        if not name.startswith("--") or "_" not in name:
            return word
        spelt = name.replace("_", "-")
        options = [option for option in self._option_string_actions if option.startswith("--")]
        if spelt in options or (self.allow_abbrev and any(option.startswith(spelt) for option in options)):
            return spelt + equals + value
        return word


def script_parser(description: str) -> HyphenArgumentParser:
    """The parser of a script of examples/ or benchmarks/: its `--help` starts with `description` (the script's
    docstring) with its line breaks kept."""
    return HyphenArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def resolve_model_path(model: str) -> str:
    """A folder or Hub id for `model`, which may name an offline model of `peft_toast.assets` (`OFFLINE_MODELS`):
    `peft_toast.assets.resolve_model` (the vision model at its default 112 px)."""
    return resolve_model(model)


def load_model_and_processor(model: str, dtype: torch.dtype = torch.float32):
    """The base model to calibrate and its preprocessor (image processor or tokenizer).

    A checkpoint whose `architectures` names a causal LM loads with `AutoModelForCausalLM` (its saved adapter then
    loads onto the same class); any other with `AutoModel` (the backbone: `load_initialisation` starts any head model
    of that backbone from it). Vision models are recognised by an `image_size` in their config.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
    config = AutoConfig.from_pretrained(path)
    causal = any(name.endswith("ForCausalLM") for name in config.architectures or ())
    model_class = AutoModelForCausalLM if causal else AutoModel
    base_model = model_class.from_pretrained(path, dtype=dtype).eval()
    if hasattr(config, "image_size"):
        processor = AutoImageProcessor.from_pretrained(path)
    else:
        processor = AutoTokenizer.from_pretrained(path)
        if processor.pad_token is None:
            processor.pad_token = processor.eos_token
    return base_model, processor


def load_examples(
    data: str, num_samples: int, *, seed: int = 0, split: str = "train", column: Optional[str] = None
) -> list:
    """`num_samples` raw examples (PIL images or strings) of `data`: an offline dataset (`OFFLINE_DATA`), a text file
    (one example per non-empty line) or a dataset name for `datasets.load_dataset`."""
    if data == "fashion-mnist":
        from .assets import load_fashion_mnist

        return list(load_fashion_mnist(split, limit=num_samples, seed=seed)["image"])
    if data == "tweets":
        from .assets import load_tweet_sentiment

        return list(load_tweet_sentiment(limit=num_samples, seed=seed)[split]["text"])
    if data == "bbc-news":
        from .assets import load_bbc_news

        return list(load_bbc_news("article", limit=num_samples, seed=seed)[split]["text"])
    if os.path.isfile(data):
        with open(data, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()][:num_samples]
    from datasets import load_dataset

    dataset = load_dataset(data, split=split)
    if column is None:
        column = next((name for name in ("text", "image", "img") if name in dataset.column_names), None)
        if column is None:
            raise ValueError(
                f"Dataset {data!r} has no `text` or `image` column (columns: {dataset.column_names}); name the column "
                f"with `--column`."
            )
    return list(dataset.shuffle(seed=seed).select(range(min(num_samples, len(dataset))))[column])


def make_batches(
    examples: Sequence, processor, *, batch_size: int, max_length: int = 128, with_labels: bool = False
) -> torch.utils.data.DataLoader:
    """A `DataLoader` that preprocesses `examples` batch by batch (nothing is stored in advance).

    Images become `pixel_values`; texts `input_ids` and `attention_mask` (padded, truncated to `max_length`), plus
    `labels` (the input ids, -100 on padding) for language-model pre-tuning when `with_labels`.
    """
    from transformers import PreTrainedTokenizerBase

    def collate(chunk: list) -> dict[str, torch.Tensor]:
        if not isinstance(processor, PreTrainedTokenizerBase):
            return {
                "pixel_values": processor(images=[image.convert("RGB") for image in chunk], return_tensors="pt")[
                    "pixel_values"
                ]
            }
        batch = processor(list(chunk), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if with_labels:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch

    return torch.utils.data.DataLoader(list(examples), batch_size=batch_size, collate_fn=collate)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by `python -m peft_toast.calibrate` and `python -m peft_toast.pretune`."""
    parser.add_argument(
        "--model",
        required=True,
        help=f"Model folder or Hub id, or an offline model: {', '.join(OFFLINE_MODELS)}.",
    )
    parser.add_argument(
        "--data",
        required=True,
        help=f"{' or '.join(OFFLINE_DATA)} (offline), a text file (one example per line) or a `datasets` dataset name.",
    )
    parser.add_argument("--num-samples", type=int, default=1000, help="Number of examples (default 1000).")
    parser.add_argument("--split", default="train", help="Dataset split (default train).")
    parser.add_argument("--column", default=None, help="Column of a `datasets` dataset (default: text or image).")
    parser.add_argument("--batch-size", type=int, default=16, help="Batch size (default 16).")
    parser.add_argument("--max-length", type=int, default=128, help="Token limit per text (default 128).")
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of the example subset and of the adapter (default 0)."
    )
    parser.add_argument("--output", required=True, help="Folder for the TOAST adapter (replaced if it exists).")
    parser.add_argument("--feedback-rank", type=int, default=None, help="Low-rank feedback A = I + U V of this rank.")
    parser.add_argument(
        "--lite-rank", type=int, default=None, help="TOAST-Lite: frozen full maps + deltas of this rank."
    )
    parser.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=None,
        help="Blocks that receive a signal (layers_to_transform; negative = from the top). Default: all.",
    )


def cli_parser(command: str, description: str) -> HyphenArgumentParser:
    """The parser of `python -m peft_toast.<command>` (`calibrate` or `pretune`), with the arguments that they share
    (`add_data_arguments`)."""
    parser = HyphenArgumentParser(prog=f"python -m peft_toast.{command}", description=description)
    add_data_arguments(parser)
    return parser


def toast_config_from_args(args: argparse.Namespace, **fields) -> ToastConfig:
    """The `ToastConfig` that the arguments of `add_data_arguments` describe, plus `fields`."""
    return ToastConfig(
        feedback_rank=args.feedback_rank, lite_rank=args.lite_rank, layers_to_transform=args.layers, **fields
    )


def model_and_processor_from_args(args: argparse.Namespace) -> tuple[nn.Module, Any]:
    """`--model` and its processor, with torch seeded by `--seed` first (the adapter's initial values)."""
    torch.manual_seed(args.seed)
    return load_model_and_processor(args.model)


def examples_from_args(args: argparse.Namespace) -> list:
    """The examples that `--data`, `--num-samples`, `--seed`, `--split` and `--column` select (`load_examples`)."""
    return load_examples(args.data, args.num_samples, seed=args.seed, split=args.split, column=args.column)


def labelled_examples(
    data: str, classes: Sequence[int], num_samples: int, *, seed: int = 0, split: str = "train"
) -> tuple[list, list[int]]:
    """Up to `num_samples` images of `data` whose label is in `classes`, and their labels renumbered `0..len-1` in the
    order of `classes` (a source task disjoint from a target task made of the other classes)."""
    if len(set(classes)) != len(classes) or len(classes) < 2:
        raise ValueError(f"`--classes` must name at least two different classes, got {list(classes)}.")
    if data == "fashion-mnist":
        from .assets import load_fashion_mnist

        dataset = load_fashion_mnist(split)
    elif os.path.isdir(data):  # a folder written by `DatasetDict.save_to_disk`
        from datasets import load_from_disk

        dataset = load_from_disk(data)[split]
    else:
        from datasets import load_dataset

        dataset = load_dataset(data, split=split)
    if "label" not in dataset.column_names:
        raise ValueError(f"{data!r} has no `label` column (columns: {dataset.column_names}); `--classes` needs one.")
    column = next((name for name in ("image", "img", "pixel_values") if name in dataset.column_names), None)
    if column is None:
        raise ValueError(f"{data!r} has no `image` column (columns: {dataset.column_names}).")
    renumber = {label: index for index, label in enumerate(classes)}
    dataset = dataset.filter(lambda label: label in renumber, input_columns="label")
    if len(dataset) == 0:
        raise ValueError(f"No example of {data!r} has a label in {list(classes)}.")
    dataset = dataset.shuffle(seed=seed).select(range(min(num_samples, len(dataset))))
    return list(dataset[column]), [renumber[label] for label in dataset["label"]]


def image_classifier_from_backbone(model: str, num_labels: int) -> nn.Module:
    """`model` with a fresh `num_labels`-way classification head (the source task's head, dropped at transfer)."""
    from transformers import AutoModelForImageClassification

    with expected_load_report():  # the new head's "newly initialized" rows
        return AutoModelForImageClassification.from_pretrained(
            resolve_model_path(model), num_labels=num_labels, ignore_mismatched_sizes=True
        ).eval()


@contextlib.contextmanager
def expected_load_report() -> Iterator[None]:
    """transformers' logging at error level inside the block: for a `from_pretrained` whose load report is expected (a
    new head's weights are "newly initialized" or "mismatched"), so that users see no warning for what they asked."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def labelled_image_batches(examples: Sequence, labels: Sequence[int], processor, *, batch_size: int):
    """A `DataLoader` of `pixel_values` and `labels`, preprocessed batch by batch."""

    def collate(chunk: list) -> dict[str, torch.Tensor]:
        images, targets = zip(*chunk)
        pixel_values = processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        return {"pixel_values": pixel_values["pixel_values"], "labels": torch.tensor(targets)}

    return torch.utils.data.DataLoader(list(zip(examples, labels)), batch_size=batch_size, collate_fn=collate)
