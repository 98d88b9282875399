"""Fine-tune an image classifier with TOAST and `transformers.Trainer`.

The backbone stays frozen; TOAST's top-down path and the classification head train. Checkpoints hold only the adapter
(and the head) plus the Trainer's state, and `--resume_from_checkpoint latest` continues a run that was killed.

Offline defaults: the DINOv2-small backbone (ViT-S/14 at 112 px, from `peft_toast.assets`) on a Fashion-MNIST subset.

    python examples/train_image_classifier.py --max_steps 60 --train_size 960
    python examples/train_image_classifier.py --model google/vit-base-patch16-224-in21k --dataset cifar10 \
        --image_column img --train_size 5000 --max_steps 500
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from example_utils import TRAINER_CHECKPOINT_MARKER, image_classification_splits, load_image_classifier, resolve_resume
from peft import get_peft_model
from transformers import AutoImageProcessor, Trainer, TrainingArguments, set_seed

from peft_toast import ToastConfig
from peft_toast.io import atomic_save_pretrained


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--label_column", default="label", help="A datasets.ClassLabel column.")
    parser.add_argument("--train_size", type=int, default=960, help="Training examples (a random subset).")
    parser.add_argument("--eval_size", type=int, default=500, help="Evaluation examples (a random subset).")
    parser.add_argument("--output_dir", default="outputs/image-classifier-toast")
    parser.add_argument("--max_steps", type=int, default=60, help="Optimizer steps.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--save_steps", type=int, default=20, help="Write a checkpoint every this many steps.")
    parser.add_argument("--logging_steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="A checkpoint folder, or 'latest' for the last complete one in --output_dir (a fresh start if there is none).",
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.model is None:
        from peft_toast.assets import dinov2_small_vit_path

        args.model = dinov2_small_vit_path(image_size=112)
    set_seed(args.seed)
    image_processor = AutoImageProcessor.from_pretrained(args.model)
    train, evaluation, label_names = image_classification_splits(
        args.dataset, image_processor, args.train_size, args.eval_size, args.seed, args.image_column, args.label_column
    )
    # The head is new, so ToastConfig() trains and saves it with the adapter (modules_to_save=["classifier"]).
    model = get_peft_model(load_image_classifier(args.model, label_names), ToastConfig())
    model.print_trainable_parameters()

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        seed=args.seed,
        remove_unused_columns=False,  # the transform needs the raw image column
        label_names=["labels"],  # a PeftModel's forward hides the argument names the Trainer would look for
        dataloader_num_workers=0,
        report_to=[],
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
    adapter_dir = os.path.join(args.output_dir, "adapter")
    atomic_save_pretrained(model, adapter_dir)  # a crash mid-write leaves any previous adapter intact
    print(f"eval accuracy {metrics['eval_accuracy']:.4f} on {len(evaluation)} images; adapter saved to {adapter_dir}")
    return metrics


if __name__ == "__main__":
    main()
