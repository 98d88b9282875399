"""The gradient of TOAST's readouts at the start of a transfer run: how large, how close to rank 1, which blocks.

The decoder default (`toast-rms-readout` of `transfer.py`: rms feature, frozen down-maps, full-rank readouts) starts
from the linear probe's head and zero readouts; on the image tasks the vision settings with frozen down-maps
(`toast-readout`) do the same. This program builds that start exactly as `transfer.py` does (same task, probe, seed
and batch order) and reports, for the first `--batches` training batches, the loss, the norm of the
whole gradient and, per steered block, the readout gradient's Frobenius norm and its largest singular value. A
gradient close to rank 1 turns Adam's first, sign-like steps into a rank-1 change of spectral norm `lr * d` in every
block at once (docs/benchmarks.md, session 15).

    python benchmarks/readout_gradients.py --task bbc --output benchmarks/results/readout-gradients-bbc.json
    python benchmarks/readout_gradients.py --task clutter --clutter 4   # DINOv2-S, cluttered Fashion-MNIST
    python benchmarks/readout_gradients.py --tiny   # a tiny random model, seconds (the CI smoke test)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _training  # noqa: E402
import transfer  # noqa: E402
from common import machine_info  # noqa: E402

# The method whose start is looked at, by the kind of task; `--method` picks another one with full-rank readouts.
METHODS = {"text": "toast-rms-readout", "image": "toast-readout"}
FULL_RANK_METHODS = ("toast-rms-readout", "toast-readout", "toast")
IMAGE_TASKS = ("fmnist", "clutter")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="bbc", choices=[*transfer.TEXT_TASKS, *IMAGE_TASKS])
    parser.add_argument("--clutter", type=int, default=4, help="Distractors per canvas of `--task clutter`.")
    parser.add_argument(
        "--method", default=None, choices=FULL_RANK_METHODS, help="Default: toast-rms-readout (text), toast-readout."
    )
    parser.add_argument("--batches", type=int, default=3, help="Training batches to look at (default 3).")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tiny", action="store_true", help="A tiny random model: a smoke test, no real numbers.")
    parser.add_argument("--output", type=Path, default=None, help="Write the results here as JSON.")
    return parser.parse_args(argv)


def build_task(args: argparse.Namespace, method: str):
    """The task of `args` as `transfer.py` builds it, its pass 1 cached for `method`."""
    task_args = transfer.parse_args(["--tasks", args.task, "--methods", method] + (["--tiny"] if args.tiny else []))
    if args.task in IMAGE_TASKS:
        task = transfer.image_task(args.task, task_args, args.clutter if args.task == "clutter" else 0)
    else:
        task = transfer.text_task(task_args, args.task)
    transfer.cache_pass1_features(task, [method])
    return task


def readout_gradients(args: argparse.Namespace) -> dict:
    method = args.method or METHODS["image" if args.task in IMAGE_TASKS else "text"]
    task = build_task(args, method)
    probe_lr, head = transfer.best_probe_head(task, args.seed)
    model = transfer.new_model(task, method, args.seed, head)
    split = transfer.cached_view(task, "train", method)
    model.train()
    batches = []
    for indices in _training.batch_order(len(split), args.batches, args.batch_size, args.seed):
        loss = model(**split.batch(indices)).loss
        loss.backward()
        blocks, total = {}, 0.0
        for name, parameter in model.named_parameters():
            if parameter.grad is None:
                continue
            total += parameter.grad.double().pow(2).sum().item()
            if ".toast_readout." in name:
                block = int(re.search(r"\.(?:layers|layer|h)\.(\d+)\.", name).group(1))
                grad = parameter.grad.double()
                frobenius = grad.norm().item()
                blocks[block] = {
                    "frobenius": frobenius,
                    "spectral": torch.linalg.matrix_norm(grad, 2).item(),
                }
        model.zero_grad(set_to_none=True)
        # Blocks keyed by their index as a string, as JSON keeps them.
        ordered = {str(block): blocks[block] for block in sorted(blocks)}
        batches.append({"loss": loss.item(), "gradient_norm": total**0.5, "blocks": ordered})
    return {"task": task.name, "method": method, "probe_lr": probe_lr, "seed": args.seed, "batches": batches}


def summary(result: dict) -> str:
    lines = [
        f"{result['task']}, {result['method']}, the probe's head (lr {result['probe_lr']:g}), seed {result['seed']}"
    ]
    for index, batch in enumerate(result["batches"]):
        blocks = batch["blocks"].values()
        ratios = [block["spectral"] / block["frobenius"] for block in blocks if block["frobenius"] > 0]
        norms = [block["frobenius"] for block in blocks]
        lines.append(
            f"batch {index}: loss {batch['loss']:.4f}, gradient norm {batch['gradient_norm']:.3g}; readouts: Frobenius "
            f"{min(norms):.3g}-{max(norms):.3g}, sigma_1 / Frobenius {min(ratios):.2f}-{max(ratios):.2f}"
        )
    first = result["batches"][0]["blocks"]
    lines.append("batch 0 per block (Frobenius, sigma_1 / Frobenius):")
    lines += [
        f"  block {int(block):2d}: {v['frobenius']:8.3f}  {v['spectral'] / v['frobenius']:.3f}"
        for block, v in first.items()
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"benchmark": "readout_gradients", "command": " ".join(["python", *sys.argv]), **readout_gradients(args)}
    result["machine"] = machine_info()
    print(summary(result))
    if args.output:
        args.output.write_text(json.dumps(result, indent=1))
        print(f"results: {args.output}")
    return result


if __name__ == "__main__":
    main()
