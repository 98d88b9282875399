"""What the examples share: command-line arguments and default models, datasets, the instruction format, the
checkpoint to resume from, the final save.

Each example reads top to bottom on its own; only what two of them need lives here.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from typing import Optional

# Where torchao is installed (the test extra has it), importing PEFT imports it too; on a CPU build of torch it then
# logs that its CUDA kernels cannot load, and torch that it registers its enums. Harmless, and not the examples' news.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

import datasets  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForImageClassification,
    PreTrainedModel,
    TrainingArguments,
    default_data_collator,
)

from peft_toast.assets import resolve_model  # noqa: E402
from peft_toast.cli import expected_load_report  # noqa: E402
from peft_toast.io import atomic_save_pretrained  # noqa: E402

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# The first file a resumable checkpoint needs that its writer writes last: a folder without it was cut off mid-write.
TRAINER_CHECKPOINT_MARKER = "trainer_state.json"


# -------------------------------------------------------------------------------------- command line and models


def add_causal_lm_argument(parser: argparse.ArgumentParser) -> None:
    """`--model`: a causal LM, by default the offline SmolLM2-135M-Instruct (see `causal_lm_path`)."""
    parser.add_argument(
        "--model",
        default=None,
        help="Hub id or local folder of a causal LM with its tokenizer (default: offline SmolLM2-135M-Instruct).",
    )


def add_image_classification_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model`, `--dataset`, its columns and the subset sizes, as `image_classification_splits` takes them."""
    parser.add_argument(
        "--model",
        default=None,
        help="Hub id or local folder of an image model (default: offline DINOv2-small as a ViT at 112 px).",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="Hub dataset name or a save_to_disk folder with train and test/validation splits (default: offline Fashion-MNIST).",
    )
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--label-column", default="label", help="A datasets.ClassLabel column.")
    parser.add_argument("--train-size", type=int, default=960, help="Training examples (a random subset).")
    parser.add_argument("--eval-size", type=int, default=500, help="Evaluation examples (a random subset).")


def add_seed_and_resume_arguments(parser: argparse.ArgumentParser) -> None:
    """`--seed` and `--resume-from-checkpoint` (a folder or `latest`, see `resolve_resume`)."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--resume-from-checkpoint",
        default=None,
        help="A checkpoint folder, or 'latest' for the last complete one in --output-dir (a fresh start if there is none).",
    )


PROMPT_SAMPLE_SIZE = 32


def initialise_prompt(model, dataset: datasets.Dataset, size: int = PROMPT_SAMPLE_SIZE) -> None:
    """Set the TOAST prompt from the first `size` training images (`prompt_init="data"` would otherwise use the first
    batch), so that the start does not depend on the batch size, gradient accumulation or the number of processes."""
    batch = default_data_collator([dataset[index] for index in range(min(size, len(dataset)))])
    model.initialise_prompt(pixel_values=batch["pixel_values"])


def image_model_path(model: Optional[str]) -> str:
    """`model` (a folder, a Hub id or an offline short name, see `peft_toast.assets.resolve_model`), or the offline
    DINOv2-small as a ViT at 112 px when it is None."""
    return resolve_model(model, default="dinov2-small", image_size=112)


def causal_lm_path(model: Optional[str]) -> str:
    """`model` (as in `image_model_path`), or the offline SmolLM2-135M-Instruct when it is None."""
    return resolve_model(model, default="smollm2-135m")


# ------------------------------------------------------------------------------------------------------ datasets


def load_dataset_splits(dataset: str) -> datasets.DatasetDict:
    """A `DatasetDict` from a folder written by `save_to_disk`, or from the Hub by name (e.g. `"cifar10"`)."""
    if os.path.isdir(dataset):
        return datasets.load_from_disk(dataset)
    return datasets.load_dataset(dataset)


def evaluation_split(splits: datasets.DatasetDict) -> datasets.Dataset:
    for name in ("test", "validation"):
        if name in splits:
            return splits[name]
    raise ValueError(
        f"The dataset has splits {sorted(splits)}; it needs a 'test' or 'validation' split to evaluate on."
    )


def subset(dataset: datasets.Dataset, size: Optional[int], seed: int) -> datasets.Dataset:
    """A random subset of `size` examples (all of them if `size` is None or larger than the dataset)."""
    if size is None or size >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(size))


def image_classification_splits(
    dataset: Optional[str],
    image_processor,
    train_size: Optional[int],
    eval_size: Optional[int],
    seed: int,
    image_column: str = "image",
    label_column: str = "label",
) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    """Train and evaluation splits that yield `{"pixel_values": (3, H, W), "labels": ()}` items, and the class names.

    `dataset=None` is Fashion-MNIST from the offline assets (class-balanced subsets); otherwise a local
    `save_to_disk` folder or a Hub dataset with an image column and a `ClassLabel` column.
    """
    if dataset is None:
        from peft_toast.assets import load_fashion_mnist

        train = load_fashion_mnist("train", limit=train_size, seed=seed)
        evaluation = load_fashion_mnist("test", limit=eval_size, seed=seed)
    else:
        splits = load_dataset_splits(dataset)
        train = subset(splits["train"], train_size, seed)
        evaluation = subset(evaluation_split(splits), eval_size, seed)
    for column in (image_column, label_column):
        if column not in train.column_names:
            raise ValueError(
                f"The dataset has columns {train.column_names} but no {column!r}; name its image and label columns "
                "with --image-column and --label-column."
            )
    label_names = train.features[label_column].names

    def transform(batch: dict) -> dict:
        images = [image.convert("RGB") for image in batch[image_column]]  # greyscale datasets become 3 channels
        pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]  # (B, 3, H, W)
        return {"pixel_values": pixel_values, "labels": torch.tensor(batch[label_column])}

    return train.with_transform(transform), evaluation.with_transform(transform), label_names


def load_image_classifier(model_name_or_path: str, label_names: list[str]) -> PreTrainedModel:
    """An image classifier with a fresh head for `label_names` (a backbone without a head, e.g. a `ViTModel`, gets one)."""
    with expected_load_report():  # the fresh head's "newly initialized" rows
        return AutoModelForImageClassification.from_pretrained(
            model_name_or_path,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
            ignore_mismatched_sizes=True,  # a Hub checkpoint's head for other classes is replaced
        )


# ------------------------------------------------------------------------------------------- instruction tuning


def instruction_prompt(tokenizer, instruction: str) -> str:
    """The text before the response: the tokenizer's chat template if it has one, else a plain instruction format."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def encode_instruction(tokenizer, prompt: str, response: str, max_length: int) -> dict[str, list[int]]:
    """Token ids of `prompt + response + eos`, with labels -100 on the prompt so that the loss covers the response only.

    A prompt too long for `max_length` loses its beginning: its end holds the question and the response marker.
    """
    # A chat template already contains every special token; a plain prompt gets the tokenizer's (e.g. BOS).
    prompt_ids = tokenizer(prompt, add_special_tokens=not tokenizer.chat_template)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    room = max_length - len(response_ids)
    if room < 1:
        raise ValueError(
            f"max_length={max_length} leaves no room for the prompt; the response alone has "
            f"{len(response_ids)} tokens. Raise --max-length."
        )
    prompt_ids = prompt_ids[-room:]
    return {
        "input_ids": prompt_ids + response_ids,
        "attention_mask": [1] * (len(prompt_ids) + len(response_ids)),
        "labels": [-100] * len(prompt_ids) + response_ids,
    }


# ------------------------------------------------------------------------------------------ Trainer, checkpoints


def training_arguments(args: argparse.Namespace, **fields) -> TrainingArguments:
    """The `TrainingArguments` of a `Trainer` example: its --output-dir, --max-steps, --batch-size, --learning-rate,
    --save-steps, --logging-steps and --seed, plus `fields`."""
    return TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        seed=args.seed,
        label_names=["labels"],  # a PeftModel's forward hides the argument names the Trainer would look for
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning needs a GPU: on a CPU, torch warns it is ignored
        report_to=[],
        **fields,
    )


def checkpoint_step(path: str) -> int:
    """The optimizer step a `checkpoint-<step>` folder was written at."""
    match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(path)))
    if match is None:
        raise ValueError(f"{path} is not a checkpoint folder: its name must be checkpoint-<step>.")
    return int(match.group(1))


def last_checkpoint(output_dir: str, marker: str) -> Optional[str]:
    """The latest complete `checkpoint-<step>` folder in `output_dir`, or None.

    A run killed while writing a checkpoint leaves a folder without `marker` (the file its writer writes last), or
    with an empty one; such a folder is skipped, unlike `transformers.trainer_utils.get_last_checkpoint`, which would
    pick it.
    """
    if not os.path.isdir(output_dir):
        return None
    steps = [
        int(match.group(1))
        for name in os.listdir(output_dir)
        if (match := CHECKPOINT_PATTERN.match(name)) and _nonempty_file(os.path.join(output_dir, name, marker))
    ]
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def _nonempty_file(path: str) -> bool:
    return os.path.isfile(path) and os.path.getsize(path) > 0


def resolve_resume(resume_from_checkpoint: Optional[str], output_dir: str, marker: str) -> Optional[str]:
    """`--resume-from-checkpoint`: a checkpoint folder, or `latest` (the last complete one in `output_dir`; none there
    means a fresh start, so the same command both starts a run and restarts it after a crash)."""
    if resume_from_checkpoint != "latest":
        return resume_from_checkpoint
    checkpoint = last_checkpoint(output_dir, marker)
    print(
        f"Resuming from {checkpoint}." if checkpoint else f"No complete checkpoint in {output_dir}: starting afresh."
    )
    return checkpoint


# ---------------------------------------------------------------------------------------------------- final save


def save_adapter(model, output_dir: str) -> str:
    """Save the trained adapter (with its model card) in `output_dir/adapter` and return that folder. A crash mid-write
    leaves any previous adapter there intact."""
    adapter_dir = os.path.join(output_dir, "adapter")
    atomic_save_pretrained(model, adapter_dir)
    return adapter_dir
