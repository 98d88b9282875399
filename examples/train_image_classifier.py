"""Fine-tune an image classifier with TOAST and `transformers.Trainer`.

The backbone stays frozen; TOAST's top-down path and the classification head train. Checkpoints hold only the adapter
(and the head) plus the Trainer's state, and `--resume-from-checkpoint latest` continues a run that was killed.

Offline defaults: the DINOv2-small backbone (ViT-S/14 at 112 px, from `peft_toast.assets`) on a Fashion-MNIST subset.

    python examples/train_image_classifier.py --max-steps 60 --train-size 960
    python examples/train_image_classifier.py --model google/vit-base-patch16-224-in21k --dataset cifar10 \
        --image-column img --train-size 5000 --max-steps 500
"""

from __future__ import annotations

import argparse

import numpy as np
from example_utils import (
    TRAINER_CHECKPOINT_MARKER,
    add_image_classification_arguments,
    add_seed_and_resume_arguments,
    image_classification_splits,
    image_model_path,
    initialise_prompt,
    load_image_classifier,
    resolve_resume,
    save_adapter,
    training_arguments,
)
from peft import get_peft_model
from transformers import AutoImageProcessor, Trainer, set_seed

from peft_toast import ToastConfig
from peft_toast.cli import script_parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    add_image_classification_arguments(parser)
    parser.add_argument("--output-dir", default="outputs/image-classifier-toast")
    parser.add_argument("--max-steps", type=int, default=60, help="Optimizer steps.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--save-steps", type=int, default=20, help="Write a checkpoint every this many steps.")
    parser.add_argument("--logging-steps", type=int, default=10)
    add_seed_and_resume_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.model = image_model_path(args.model)
    set_seed(args.seed)
    image_processor = AutoImageProcessor.from_pretrained(args.model)
    train, evaluation, label_names = image_classification_splits(
        args.dataset, image_processor, args.train_size, args.eval_size, args.seed, args.image_column, args.label_column
    )
    # The head is new, so ToastConfig() trains and saves it with the adapter (modules_to_save=["classifier"]).
    model = get_peft_model(load_image_classifier(args.model, label_names), ToastConfig())
    initialise_prompt(model, train)  # the prompt's start: the mean direction of these images' tokens
    model.print_trainable_parameters()

    training_args = training_arguments(
        args,
        per_device_eval_batch_size=args.batch_size,
        remove_unused_columns=False,  # the transform needs the raw image column
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        compute_metrics=lambda prediction: {
            "accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())
        },
    )
    resume = resolve_resume(args.resume_from_checkpoint, args.output_dir, TRAINER_CHECKPOINT_MARKER)
    trainer.train(resume_from_checkpoint=resume)
    metrics = trainer.evaluate()
    adapter_dir = save_adapter(model, args.output_dir)
    print(f"eval accuracy {metrics['eval_accuracy']:.4f} on {len(evaluation)} images; adapter saved to {adapter_dir}")
    return metrics


if __name__ == "__main__":
    main()
