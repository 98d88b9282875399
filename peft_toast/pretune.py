"""Pre-tuning the top-down path by gradient descent, as the reference implementation initialises it.

The reference trains the whole top-down module (down-maps, readouts, prompt) on generic data before any transfer, with
the task loss plus the variational loss `sum_l MSE(A_l h_l_out, h_l_in)` (weight `variational_loss_weight`: 0.01
for LLaMA on OpenWebText, 0.1 for vision). `ToastModel` folds the weighted variational loss into `output.loss` in
training, so pre-tuning is ordinary training: this module is a small loop (with a step *and* a wall-time budget, so
that it can be compared with `calibrate_feedback` at equal time), and `transformers.Trainer` works just as well.

The objective depends on the model:

- causal LMs: next-token loss on the generic text (batches carry `labels`) + the weighted variational loss, as in the
  reference; down-maps, readouts and prompt all train;
- encoders on a labelled source task (`--classes`): the cross-entropy of pass 2 on a source head plus the weighted
  variational loss (0.1), as AbSViT trains its feedback path (AbSViT also adds pass 1's cross-entropy, which only
  trains the head on the frozen features: the head is dropped at transfer, so we leave it out). Down-maps, readouts
  and prompt all train, so the transfer starts with an open, non-zero top-down signal and a prompt that selects
  something, which is what the reference's ImageNet pre-tuned checkpoints give;
- encoders without labels: the variational loss alone, the objective that defines the feedback path; only the
  down-maps receive gradients (readouts stay zero). This is SGD on exactly the problem that `calibrate_feedback`
  solves in closed form.

The saved adapter records what it was pre-tuned on (`ToastConfig.pretuned_on`, shown in its model card).
`load_initialisation(new_base_model, folder)` starts a transfer from it in one step: prompt, down-maps and readouts
kept, a fresh head for the new task, the variational loss off.

    python -m peft_toast.pretune --model dinov2-small --data fashion-mnist --classes 0 1 2 3 4 --output DIR
    python -m peft_toast.pretune --model smollm2-135m --data corpus.txt --output DIR --max-steps 500
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .architectures import resolve_architecture
from .calibrate import (
    DEFAULT_RIDGE,
    calibrate_feedback,
    cli_parser,
    examples_from_args,
    make_batches,
    model_and_processor_from_args,
    resolve_model_path,
    toast_config_from_args,
)
from .io import atomic_save_pretrained

__all__ = ["PretuneResult", "pretune_top_down"]


@dataclass
class PretuneResult:
    """What `pretune` did: optimizer steps, wall time in seconds and the training loss of the first and last step."""

    steps: int
    seconds: float
    first_loss: float
    last_loss: float


def pretune_top_down(
    peft_model: nn.Module,
    batches: Iterable[dict[str, Any]],
    *,
    max_steps: Optional[int] = None,
    max_seconds: Optional[float] = None,
    learning_rate: float = 1e-3,
    progress: bool = True,
) -> PretuneResult:
    """Train the trainable parameters of `peft_model` (its active TOAST adapter) on `output.loss` with AdamW at a constant
    learning rate, cycling over `batches`, for `max_steps` steps or as many as fit in `max_seconds` seconds (it stops
    when one more step at the mean step time would overrun; at least one step runs), whichever is fewer.

    `output.loss` is the task loss (if the batches carry labels) plus `variational_loss_weight` times the variational
    loss, so the adapter's config must have `variational_loss_weight > 0` unless the batches have labels.
    """
    if max_steps is None and max_seconds is None:
        raise ValueError("Give `pretune_top_down` a budget: `max_steps`, `max_seconds` or both.")
    parameters = [parameter for parameter in peft_model.parameters() if parameter.requires_grad]
    if not parameters:
        raise ValueError("The model has no trainable parameters; pass a PeftModel whose TOAST adapter is trainable.")
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    device = parameters[0].device
    was_training = peft_model.training
    peft_model.train()
    losses = []
    start = time.perf_counter()
    bar = tqdm(total=max_steps, desc="pre-tuning", unit="step", disable=not progress)
    try:
        for batch in itertools.cycle(batches):
            batch = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
            loss = peft_model(**batch).get("loss")
            if loss is None:
                raise ValueError(
                    "The model returned no loss: the batches have no labels and the adapter's "
                    "`variational_loss_weight` is 0. Set `variational_loss_weight` (e.g. 0.1) to pre-tune on the "
                    "variational loss, or add labels."
                )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
            elapsed = time.perf_counter() - start
            # Stop before a step would overrun the time budget (at the mean step time so far).
            if (max_steps is not None and len(losses) >= max_steps) or (
                max_seconds is not None and elapsed * (len(losses) + 1) / len(losses) > max_seconds
            ):
                break
    finally:
        bar.close()
        peft_model.train(was_training)
    return PretuneResult(len(losses), time.perf_counter() - start, losses[0], losses[-1])


def main(argv: Optional[Sequence[str]] = None) -> PretuneResult:
    parser = cli_parser(
        "pretune",
        "Pre-tune the top-down path of a TOAST adapter on a source task and save it as a TOAST adapter folder: LM loss "
        "+ variational loss for causal LMs on text; cross-entropy + variational loss on the labelled classes given by "
        "--classes; the variational loss alone on unlabelled images. Start a transfer from the folder with "
        "peft_toast.load_initialisation.",
    )
    parser.add_argument(
        "--max-steps", type=int, default=None, help="Optimizer steps (default: one pass over the data)."
    )
    parser.add_argument("--max-seconds", type=float, default=None, help="Wall-time budget in seconds.")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW learning rate (default 1e-3).")
    parser.add_argument(
        "--variational-loss-weight",
        type=float,
        default=None,
        help="Weight of the variational loss (default: 0.01 for causal LMs, as the reference; 0.1 for encoders).",
    )
    parser.add_argument(
        "--classes",
        type=int,
        nargs="+",
        default=None,
        help="Pre-tune on a labelled source task made of these classes of an image dataset (with a `label` column; "
        "e.g. 0 1 2 3 4 of fashion-mnist, to transfer to 5-9): cross-entropy of pass 2 + the variational loss.",
    )
    parser.add_argument(
        "--calibrate-first",
        action="store_true",
        help="Start from the closed-form calibration of the down-maps on the same data instead of the identity.",
    )
    args = parser.parse_args(argv)
    from peft import get_peft_model

    base_model, processor = model_and_processor_from_args(args)
    causal = resolve_architecture(base_model).causal
    weight = args.variational_loss_weight
    if weight is None:
        weight = 0.01 if causal else 0.1
    if args.classes is not None:
        examples, labels = labelled_examples(
            args.data, args.classes, args.num_samples, seed=args.seed, split=args.split
        )
        base_model = image_classifier_from_backbone(args.model, len(args.classes))
        batches = labelled_image_batches(examples, labels, processor, batch_size=args.batch_size)
        objective = f"classes {' '.join(map(str, args.classes))} of {args.data}: cross-entropy + {weight:g} x L_var"
    else:
        examples = examples_from_args(args)
        batches = make_batches(
            examples, processor, batch_size=args.batch_size, max_length=args.max_length, with_labels=causal
        )
        objective = f"{args.data}: {'LM loss + ' if causal else ''}{weight:g} x L_var"
    peft_model = get_peft_model(base_model, toast_config_from_args(args, variational_loss_weight=weight))
    if args.calibrate_first:
        calibrate_feedback(peft_model, batches, ridge=DEFAULT_RIDGE)
    max_steps = args.max_steps if args.max_steps is not None or args.max_seconds is not None else len(batches)
    result = pretune_top_down(
        peft_model, batches, max_steps=max_steps, max_seconds=args.max_seconds, learning_rate=args.learning_rate
    )
    peft_model.peft_config[peft_model.active_adapter].pretuned_on = (
        f"{objective}; {len(examples)} examples, {result.steps} AdamW steps of batch {args.batch_size} at lr "
        f"{args.learning_rate:g}"
    )
    atomic_save_pretrained(peft_model, args.output)
    print(
        f"Pre-tuned for {result.steps} steps in {result.seconds:.1f} s: loss {result.first_loss:.4g} -> "
        f"{result.last_loss:.4g}. Adapter saved to {os.path.abspath(args.output)}."
    )
    return result


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
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the new head's "newly initialized" report is expected
    try:
        return AutoModelForImageClassification.from_pretrained(
            resolve_model_path(model), num_labels=num_labels, ignore_mismatched_sizes=True
        ).eval()
    finally:
        logging.set_verbosity(verbosity)


def labelled_image_batches(examples: Sequence, labels: Sequence[int], processor, *, batch_size: int):
    """A `DataLoader` of `pixel_values` and `labels`, preprocessed batch by batch."""

    def collate(chunk: list) -> dict[str, torch.Tensor]:
        images, targets = zip(*chunk)
        pixel_values = processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        return {"pixel_values": pixel_values["pixel_values"], "labels": torch.tensor(targets)}

    return torch.utils.data.DataLoader(list(zip(examples, labels)), batch_size=batch_size, collate_fn=collate)


if __name__ == "__main__":
    main()
