"""Fine-tune an image classifier with TOAST in a plain training loop driven by Accelerate.

The same script runs on one CPU, one GPU, or many processes: distribution, mixed precision and gradient accumulation
come from Accelerate, not from this project.

    python examples/train_accelerate.py --max-steps 60
    accelerate launch --multi_gpu --num_processes 2 examples/train_accelerate.py --cpu --per-device-batch-size 16
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 examples/train_accelerate.py \
        --model google/vit-base-patch16-224-in21k --dataset cifar10 --image-column img

Checkpoints (`--save-steps`) hold the adapter files, the optimizer, the scheduler and every process's random state,
never the frozen base weights; each appears under its final name only once complete, so `--resume-from-checkpoint
latest` after a crash always finds a usable one. At the end the adapter is saved in the same format as
`Trainer`'s (see `train_image_classifier.py`). Offline defaults: DINOv2-small (ViT-S/14 at 112 px) on Fashion-MNIST.
"""

from __future__ import annotations

import argparse
import os
import shutil

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from example_utils import (
    add_image_classification_arguments,
    add_seed_and_resume_arguments,
    checkpoint_step,
    image_classification_splits,
    image_model_path,
    initialise_prompt,
    load_image_classifier,
    resolve_resume,
)
from peft import get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, default_data_collator, get_scheduler

from peft_toast import ToastConfig
from peft_toast.cli import script_parser
from peft_toast.io import atomic_save_pretrained

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# A file every checkpoint of this loop has. (Checkpoints appear under their name only once complete, see
# `save_checkpoint`; the marker keeps `--resume-from-checkpoint latest` off folders that some other writer left.)
ACCELERATE_CHECKPOINT_MARKER = "optimizer.bin"


def parse_args(argv=None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    add_image_classification_arguments(parser)
    parser.add_argument("--output-dir", default="outputs/accelerate-toast")
    parser.add_argument("--max-steps", type=int, default=60, help="Optimizer steps.")
    parser.add_argument(
        "--per-device-batch-size",
        type=int,
        default=32,
        help="Batch per process and micro-step; the global batch is this x processes x --gradient-accumulation-steps.",
    )
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument(
        "--mixed-precision",
        choices=["no", "fp16", "bf16"],
        default="no",
        help="Autocast precision (bf16 also works on CPU); the adapter weights stay fp32.",
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="Train on CPU even if a GPU is present; with several processes (from `accelerate launch --multi_gpu` or `torchrun`) this is DDP over gloo.",
    )
    parser.add_argument("--no-shuffle", action="store_true", help="Visit the training data in order.")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=None,
        help="Blocks that receive a signal (`layers_to_transform`; negative from the top, e.g. -3 -2 -1): pass 2 then "
        "starts at the lowest of them. Default: every block.",
    )
    parser.add_argument("--save-steps", type=int, default=20, help="Write a checkpoint every this many steps.")
    add_seed_and_resume_arguments(parser)
    return parser.parse_args(argv)


def save_checkpoint(accelerator: Accelerator, output_dir: str, step: int) -> None:
    """`save_state` into a temporary folder that the main process renames to `checkpoint-<step>` once every process
    has written its part, so a crash never leaves a half-written folder under a checkpoint name.

    (`peft_toast.io.atomic_directory` gives each writer its own temporary folder; here all processes share one.)"""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    partial = os.path.join(output_dir, f"tmp-checkpoint-{step}")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)  # left by an earlier run that was resumed from before this step
        os.replace(partial, final)
    accelerator.wait_for_everyone()


def register_adapter_checkpointing(accelerator: Accelerator) -> None:
    """Make `save_state`/`load_state` write and read only the adapter (in PEFT's format), not the frozen base model."""

    def save_adapter(models: list, weights: list, output_dir: str) -> None:
        for model in models:
            accelerator.unwrap_model(model).save_pretrained(output_dir, is_main_process=accelerator.is_main_process)
        weights.clear()  # nothing left for Accelerate to save as model.safetensors

    def load_adapter(models: list, input_dir: str) -> None:
        # In place: the optimizer (already prepared) holds these very parameters, so they must not be replaced.
        model = accelerator.unwrap_model(models.pop())
        result = set_peft_model_state_dict(model, load_file(os.path.join(input_dir, ADAPTER_WEIGHTS)))
        if result.unexpected_keys:
            raise ValueError(
                f"The checkpoint {input_dir} holds adapter weights this model does not have "
                f"({result.unexpected_keys[:3]}...); resume with the same --model and adapter settings."
            )

    accelerator.register_save_state_pre_hook(save_adapter)
    accelerator.register_load_state_pre_hook(load_adapter)


@torch.no_grad()
def evaluate(accelerator: Accelerator, model, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    for batch in tqdm(loader, desc="evaluate", leave=False, disable=not accelerator.is_local_main_process):
        predictions = model(pixel_values=batch["pixel_values"]).logits.argmax(-1)
        predictions, labels = accelerator.gather_for_metrics((predictions, batch["labels"]))
        correct += (predictions == labels).sum().item()
        total += labels.numel()
    model.train()
    return correct / total


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.model = image_model_path(args.model)
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # The same shuffled order in every process and every run with this seed: each process takes its share of
        # it, and a resumed run sees the batches the interrupted one would have seen.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    set_seed(args.seed)
    image_processor = AutoImageProcessor.from_pretrained(args.model)
    with accelerator.main_process_first():  # the offline assets are converted once, by the main process
        train, evaluation, label_names = image_classification_splits(
            args.dataset,
            image_processor,
            args.train_size,
            args.eval_size,
            args.seed,
            args.image_column,
            args.label_column,
        )
        model = get_peft_model(
            load_image_classifier(args.model, label_names), ToastConfig(layers_to_transform=args.layers)
        )
    # The prompt's start: the mean direction of these images' tokens (every process calls it: it sums over them).
    initialise_prompt(model, train)
    if accelerator.is_main_process:
        model.print_trainable_parameters()

    train_loader = DataLoader(
        train, batch_size=args.per_device_batch_size, shuffle=not args.no_shuffle, collate_fn=default_data_collator
    )
    eval_loader = DataLoader(evaluation, batch_size=args.per_device_batch_size, collate_fn=default_data_collator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    # Accelerate steps a prepared scheduler once per process at every optimizer step, so its horizon is scaled alike.
    scheduler = get_scheduler(
        "linear", optimizer, num_warmup_steps=0, num_training_steps=args.max_steps * accelerator.num_processes
    )
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )
    register_adapter_checkpointing(accelerator)

    step = 0
    resume = resolve_resume(args.resume_from_checkpoint, args.output_dir, ACCELERATE_CHECKPOINT_MARKER)
    if resume is not None:
        accelerator.load_state(resume)
        step = checkpoint_step(resume)
    # Accelerate ends an accumulation window at the end of each epoch, so an epoch has this many optimizer steps.
    steps_per_epoch = -(-len(train_loader) // args.gradient_accumulation_steps)

    model.train()
    progress = tqdm(total=args.max_steps, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    while step < args.max_steps:
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        train_loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_loader, step_in_epoch * args.gradient_accumulation_steps)
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update()
            progress.set_postfix(loss=f"{loss.item():.4f}")
            if step % args.save_steps == 0:
                save_checkpoint(accelerator, args.output_dir, step)
            if step == args.max_steps:
                break
    progress.close()

    accuracy = evaluate(accelerator, model, eval_loader)
    adapter_dir = os.path.join(args.output_dir, "adapter")
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # on every process: under FSDP or DeepSpeed it gathers the shards
    # `unwrap_model(model).save_pretrained(...)` with the same arguments, written atomically by the main process.
    atomic_save_pretrained(
        accelerator.unwrap_model(model),
        adapter_dir,
        is_main_process=accelerator.is_main_process,
        state_dict=state_dict,
    )
    accelerator.print(f"eval accuracy {accuracy:.4f} on {len(evaluation)} images; adapter saved to {adapter_dir}")
    # Every process reaches the teardown together: a process group destroyed while a peer is still writing can leave
    # the job hanging at exit (seen once on a 2-core machine with gloo; pytorch/pytorch#75097).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"eval_accuracy": accuracy}


if __name__ == "__main__":
    main()
