"""The command line `python -m peft_toast.pretune`: pre-tunes the top-down path of a TOAST adapter by gradient descent
(`peft_toast.pretuning`) on a source task and saves it as a TOAST adapter folder that records what it was pre-tuned
on; `load_initialisation` (`peft_toast.loading`) starts a transfer from it.

    python -m peft_toast.pretune --model dinov2-small --data fashion-mnist --classes 0 1 2 3 4 --output DIR
    python -m peft_toast.pretune --model smollm2-135m --data corpus.txt --output DIR --max-steps 500
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional

from .architectures import resolve_architecture
from .calibration import DEFAULT_RIDGE, calibrate_feedback
from .cli import (
    cli_parser,
    examples_from_args,
    image_classifier_from_backbone,
    labelled_examples,
    labelled_image_batches,
    make_batches,
    model_and_processor_from_args,
    toast_config_from_args,
)
from .io import atomic_save_pretrained
from .pretuning import PretuneResult, pretune_top_down

# Besides `main`, the names that lived here before the split by job: kept for old imports.
__all__ = [
    "PretuneResult",
    "image_classifier_from_backbone",
    "labelled_examples",
    "labelled_image_batches",
    "main",
    "pretune_top_down",
]


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


if __name__ == "__main__":
    main()
