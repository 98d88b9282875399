"""TOAST in a few minutes on a CPU: fine-tune a pretrained ViT on a Fashion-MNIST subset, compare it with a frozen
linear probe, and save the adapter.

By default everything is offline: the DINOv2-S backbone (a ViT-S/14 at 112 px) and Fashion-MNIST come from
`peft_toast.assets` (installed by `scripts/install.sh`). With network access, pass Hub ids instead:

    python examples/demo.py
    python examples/demo.py --model facebook/dinov2-small --dataset zalando-datasets/fashion_mnist --image-size 224

The linear probe trains only the classification head on the frozen backbone's features. TOAST (`ToastConfig()`)
then starts from that head: its readouts start at zero, so the TOAST model starts *exactly* at the linear probe's
predictions, and training the top-down path (task prompt, feedback maps) together with the head can only move on from
there. The backbone stays frozen throughout.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other jobs, spinning threads slow every step a
# lot. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Where torchao is installed (the test extra has it), importing PEFT imports it too; on a CPU build of torch it then
# logs that its CUDA kernels cannot load, and torch that it registers its enums. Harmless, and not the demo's news.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoImageProcessor, AutoModelForImageClassification  # noqa: E402

from peft_toast import ToastConfig  # noqa: E402
from peft_toast.assets import resolve_model  # noqa: E402
from peft_toast.cli import expected_load_report, script_parser  # noqa: E402
from peft_toast.io import atomic_save_pretrained  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument(
        "--model", default=None, help="Image model folder or Hub id (default: the offline DINOv2-S ViT at 112 px)."
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="Hub dataset with `image` and `label` columns and train/test splits (default: offline Fashion-MNIST).",
    )
    parser.add_argument("--image-size", type=int, default=112, help="Image side for the offline model (default 112).")
    parser.add_argument("--train-size", type=int, default=1000, help="Training images (class-balanced subset).")
    parser.add_argument("--test-size", type=int, default=500, help="Held-out test images (class-balanced subset).")
    parser.add_argument("--steps", type=int, default=100, help="TOAST training steps.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate of TOAST (and its head).")
    parser.add_argument("--probe-lr", type=float, default=1e-2, help="AdamW learning rate of the linear probe.")
    parser.add_argument(
        "--output-dir",
        default="outputs/toast-fashion-mnist",
        help="Where the TOAST adapter is saved (outputs/ is git-ignored).",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load_data(args: argparse.Namespace):
    """Class-balanced train and test subsets as `datasets.Dataset`s with `image` and `label` columns, and the class
    names."""
    if args.dataset is None:
        from peft_toast.assets import load_fashion_mnist

        train = load_fashion_mnist("train", limit=args.train_size, seed=args.seed)
        test = load_fashion_mnist("test", limit=args.test_size, seed=args.seed)
    else:
        from datasets import load_dataset

        splits = load_dataset(args.dataset)
        train, test = (
            splits[name].train_test_split(train_size=size, stratify_by_column="label", seed=args.seed)["train"]
            for name, size in (("train", args.train_size), ("test", args.test_size))
        )
    return train, test, train.features["label"].names


def preprocess(dataset, processor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(pixel_values (N, 3, H, W), labels (N,))`, preprocessed once: the images are small enough to keep in memory."""
    images = [image.convert("RGB") for image in dataset["image"]]
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    return pixel_values, torch.tensor(list(dataset["label"]))


def batches(num_examples: int, batch_size: int, shuffle_seed: int | None = None):
    order = torch.arange(num_examples)
    if shuffle_seed is not None:
        order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(shuffle_seed))
    return [order[start : start + batch_size] for start in range(0, num_examples, batch_size)]


@torch.no_grad()
def head_inputs(model, pixel_values: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """What the frozen model feeds its classification head (e.g. the final CLS token), for every image."""
    captured = []
    handle = model.classifier.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        for indices in tqdm(batches(len(pixel_values), batch_size), desc="frozen features", leave=False):
            model(pixel_values=pixel_values[indices])
    finally:
        handle.remove()
    return torch.cat(captured)  # (N, d_head)


def linear_probe(model, train, test, args) -> tuple[torch.nn.Linear, float]:
    """Train a fresh head on the frozen model's features (full-batch AdamW); returns it and its test accuracy."""
    model.eval()
    train_features, test_features = head_inputs(model, train[0]), head_inputs(model, test[0])
    head = torch.nn.Linear(train_features.shape[-1], model.config.num_labels)
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.probe_lr, weight_decay=0.0)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(head(train_features), train[1])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        return head, (head(test_features).argmax(-1) == test[1]).float().mean().item()


def train_toast(model, train, args) -> None:
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(0.0, (args.steps - step) / args.steps)
    )
    epoch_batches = []
    model.train()
    with tqdm(range(args.steps), desc="TOAST training") as progress:
        for step in progress:
            if not epoch_batches:
                epoch_batches = batches(len(train[0]), args.batch_size, shuffle_seed=args.seed + step)
            indices = epoch_batches.pop(0)
            loss = model(pixel_values=train[0][indices], labels=train[1][indices]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.set_postfix(loss=f"{loss.item():.3f}")


@torch.no_grad()
def accuracy(model, pixel_values: torch.Tensor, labels: torch.Tensor, batch_size: int = 64) -> float:
    model.eval()
    correct = 0
    for indices in tqdm(batches(len(labels), batch_size), desc="evaluating TOAST", leave=False):
        correct += (model(pixel_values=pixel_values[indices]).logits.argmax(-1) == labels[indices]).sum().item()
    return correct / len(labels)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    model_path = resolve_model(args.model, default="dinov2-small", image_size=args.image_size)
    model_name = "DINOv2-S (offline)" if args.model is None else args.model
    train_set, test_set, class_names = load_data(args)
    processor = AutoImageProcessor.from_pretrained(model_path)
    train, test = preprocess(train_set, processor), preprocess(test_set, processor)
    with expected_load_report():  # the new head's "newly initialized" rows
        model = AutoModelForImageClassification.from_pretrained(
            model_path,
            num_labels=len(class_names),
            id2label=dict(enumerate(class_names)),
            label2id={name: i for i, name in enumerate(class_names)},
            ignore_mismatched_sizes=True,
        )
    print(f"{model_name}: {len(train[1])} training and {len(test[1])} test images, {len(class_names)} classes")

    probe_head, probe_accuracy = linear_probe(model, train, test, args)
    probe_parameters = sum(p.numel() for p in probe_head.parameters())

    model.classifier.load_state_dict(probe_head.state_dict())  # TOAST starts exactly at the linear probe
    model = get_peft_model(model, ToastConfig())  # the head trains and is saved with the adapter
    toast_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_toast(model, train, args)
    toast_accuracy = accuracy(model, *test)
    atomic_save_pretrained(model, args.output_dir)

    rows = [
        ("frozen linear probe", f"{100 * probe_accuracy:.1f}%", f"{probe_parameters:,}"),
        ("TOAST", f"{100 * toast_accuracy:.1f}%", f"{toast_parameters:,}"),
    ]
    print(f"\n{'method':<22}{'test accuracy':>15}{'trainable params':>20}")
    for name, acc, params in rows:
        print(f"{name:<22}{acc:>15}{params:>20}")
    print(f"\nTOAST adapter saved to {os.path.abspath(args.output_dir)} ({time.perf_counter() - start:.0f} s in all)")
    print(
        "Reload it with: PeftModel.from_pretrained(AutoModelForImageClassification.from_pretrained(<model>, "
        f"num_labels={len(class_names)}), {args.output_dir!r}) after `import peft_toast`."
    )


if __name__ == "__main__":
    main()
