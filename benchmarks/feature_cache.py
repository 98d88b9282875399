"""Benchmark of the pass-1 feature cache: what a TOAST training step costs with and without it, next to LoRA.

On DINOv2-S (offline, `peft_toast.assets`) and Fashion-MNIST at 112 px, in one process and side by side (every timing
round runs one step of every configuration, so a busy phase of a shared machine slows all of them alike):

- the steady-state training step (median over `--repeats` steps after `--warmup` rounds; each step loads its batch
  from a `DataLoader`, so reading and checking the cache is counted) and the peak tensor memory of one step (torch
  profiler memory timeline: weights, gradients, optimizer states, activations and inputs alive at once) of
  - TOAST without the cache (pass 1 recomputed every step),
  - TOAST with the cache (`precompute_features` + `ToastFeatureCollator`),
  - TOAST with rank-8 feedback maps (`feedback_rank=8`), with the cache,
  - LoRA, rank 8, on the query and value projections; the head trains with every method;
- the one-off precompute time and the cache's size on disk;
- the break-even point: epochs after which precompute + cached training is faster than uncached training;
- where the time goes: floating-point operations per step (torch's FLOP counter) and the top operators (torch
  profiler) of the cached TOAST steps and the LoRA step.

    python benchmarks/feature_cache.py --output feature_cache.json            # ~13 min, shared 2-core CPU
    python benchmarks/feature_cache.py --quick                                 # a few minutes
    python benchmarks/feature_cache.py --tiny                                  # seconds, tiny random model

A full run also rewrites the results section of `docs/feature_cache.md`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import datasets  # noqa: E402
import torch  # noqa: E402
from _models import METHOD_LABELS, apply_method, load_image_classifier, vision_model_path  # noqa: E402
from _results import markdown_table, update_docs_section, write_json  # noqa: E402
from _timing import interleaved_timings, median  # noqa: E402
from common import REPO, add_common_arguments, machine_info, setup, updates_docs  # noqa: E402
from torch import nn  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import default_data_collator  # noqa: E402

from peft_toast.cli import script_parser  # noqa: E402
from peft_toast.feature_cache import ToastFeatureCollator, feature_cache_key, precompute_features  # noqa: E402

DOC = REPO / "docs" / "feature_cache.md"
FULL_TRAIN_SIZE = 60_000  # Fashion-MNIST's train split, for the extrapolated precompute time
TARGET_RATIO = 1.1  # TOAST with the cache vs LoRA, per step
TARGET_EPOCHS = 2  # the precompute should pay for itself within this many epochs
# The configurations, in table order: (label, method of `_models.apply_method`, trains on the cached dataset).
CONFIGS = {
    "toast": ("TOAST, no cache", "toast", False),
    "toast-cached": ("TOAST, cache", "toast", True),
    "toast-r8-cached": ("TOAST feedback_rank=8, cache", "toast-r8", True),
    "lora": (METHOD_LABELS["lora"], "lora", False),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    add_common_arguments(parser)
    parser.add_argument(
        "--train-size", type=int, default=None, help="Examples to cache and train on (512; quick 128)."
    )
    parser.add_argument("--batch-size", type=int, default=32, help="Training and precompute batch size (default 32).")
    parser.add_argument("--repeats", type=int, default=None, help="Timed steps per configuration (7; quick 5).")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed warm-up rounds (2; quick 1).")
    parser.add_argument(
        "--image-size", type=int, default=112, help="Image side in px, a multiple of 14 (default 112)."
    )
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "float16", "bfloat16"), help="Storage dtype of the cache."
    )
    args = parser.parse_args(argv)
    if args.train_size is None:
        args.train_size = 64 if args.tiny else 128 if args.quick else 512
    if args.repeats is None:
        args.repeats = 5 if args.quick or args.tiny else 7
    if args.warmup is None:
        args.warmup = 1 if args.quick or args.tiny else 2
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 (the step time is a median).")
    return args


# ------------------------------------------------------------------------------------------------------------ data


def fashion_mnist(args: argparse.Namespace) -> datasets.Dataset:
    """Fashion-MNIST train examples preprocessed into `pixel_values` with `Dataset.map`, as a user would."""
    if args.tiny:
        generator = torch.Generator().manual_seed(0)
        pixel_values = torch.randn(args.train_size, 3, 28, 28, generator=generator)
        return datasets.Dataset.from_dict(
            {"pixel_values": pixel_values.numpy(), "label": [i % 10 for i in range(args.train_size)]}
        )
    from transformers import AutoImageProcessor

    from peft_toast.assets import load_fashion_mnist

    processor = AutoImageProcessor.from_pretrained(vision_model_path(args.vision_model, args.image_size))

    def preprocess(batch: dict) -> dict:
        images = [image.convert("RGB") for image in batch["image"]]
        return {"pixel_values": processor(images=images, return_tensors="np")["pixel_values"]}

    dataset = load_fashion_mnist("train", limit=args.train_size, seed=0)
    # A fixed-shape Arrow type: rows are read as one block each instead of nested lists.
    features = datasets.Features(
        {
            "pixel_values": datasets.Array3D((3, args.image_size, args.image_size), "float32"),
            "label": dataset.features["label"],
        }
    )
    return dataset.map(
        preprocess, batched=True, remove_columns=["image"], features=features, desc="preprocessing images"
    )


def batches(dataset: datasets.Dataset, batch_size: int, collate: Callable) -> Iterator[dict]:
    """Shuffled batches, epoch after epoch (the same order for every configuration)."""
    generator = torch.Generator().manual_seed(0)
    while True:
        yield from torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator, collate_fn=collate
        )


# -------------------------------------------------------------------------------------------------------- training


def train_step_fn(model: nn.Module, loader: Iterator[dict], data_seconds: list[float]) -> Callable[[], None]:
    """One AdamW step on the next batch of `loader`; the time spent loading the batch goes to `data_seconds`."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()

    def step() -> None:
        start = time.perf_counter()
        batch = next(loader)
        data_seconds.append(time.perf_counter() - start)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def peak_memory_mib(step: Callable[[], None]) -> float:
    """Peak of the tensor memory alive during one call of `step` (torch profiler memory timeline, all categories)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        _, sizes = json.loads(Path(path).read_text())  # [times, [bytes per category] per time]
    return max(sum(sample) for sample in sizes) / 2**20


def step_flops(step: Callable[[], None]) -> float:
    """Floating-point operations of one call of `step` (matrix products, convolutions and attention; torch's counter)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def top_operators(step: Callable[[], None], steps: int = 1, top: int = 8) -> list[dict]:
    """The operators that take the most CPU time (self time) over `steps` steps."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = sorted(prof.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    total = sum(event.self_cpu_time_total for event in events)
    return [
        {"operator": e.key, "ms_per_step": e.self_cpu_time_total / 1e3 / steps, "share": e.self_cpu_time_total / total}
        for e in events[:top]
    ]


# ------------------------------------------------------------------------------------------------------------ main


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup(args)
    dataset = fashion_mnist(args)
    torch.manual_seed(0)
    image_size = 28 if args.tiny else args.image_size
    start_model = load_image_classifier(args.vision_model, 10, image_size=image_size, tiny=args.tiny)
    models = {}
    for name, (_, method, _) in tqdm(CONFIGS.items(), desc="models", leave=False):
        models[name] = apply_method(copy.deepcopy(start_model), method)

    start = time.perf_counter()
    feature_cache_key(models["toast-cached"])  # what every precompute and collator pays once: hashing the backbone
    key_seconds = time.perf_counter() - start
    backbone_bytes = sum(t.numel() * t.element_size() for t in models["toast-cached"].base_model.model.parameters())

    with tempfile.TemporaryDirectory() as cache_dir:  # a fresh folder: the precompute computes, it finds no file
        start = time.perf_counter()
        cached = precompute_features(
            models["toast-cached"], dataset, cache_dir=cache_dir, batch_size=args.batch_size, dtype=args.dtype
        )
        precompute_seconds = time.perf_counter() - start
        cache_bytes = os.path.getsize(cached.cache_files[0]["filename"])
        num_tokens, dim = cached[0]["toast_features"].shape
        plain = dataset.with_format("torch")

        data_seconds = {name: [] for name in CONFIGS}
        steps = {}
        for name, (_, _, uses_cache) in CONFIGS.items():
            collate = ToastFeatureCollator(models[name]) if uses_cache else default_data_collator
            loader = batches(cached if uses_cache else plain, args.batch_size, collate)
            steps[name] = train_step_fn(models[name], loader, data_seconds[name])
        timings = interleaved_timings(steps, repeats=args.repeats, warmup=args.warmup, desc="training steps")
        for seconds in data_seconds.values():
            del seconds[: len(seconds) - args.repeats]  # keep the timed rounds only
        memory = {name: peak_memory_mib(step) for name, step in tqdm(steps.items(), desc="peak memory", leave=False)}
        flops = {name: step_flops(step) for name, step in tqdm(steps.items(), desc="FLOPs", leave=False)}
        profiles = {name: top_operators(steps[name]) for name in ("toast-cached", "toast-r8-cached", "lora")}

    step_seconds = {name: median(values) for name, values in timings.items()}
    steps_per_epoch = len(dataset) / args.batch_size
    saved_per_epoch = (step_seconds["toast"] - step_seconds["toast-cached"]) * steps_per_epoch
    break_even = precompute_seconds / saved_per_epoch if saved_per_epoch > 0 else math.inf
    results = {
        "benchmark": "feature_cache",
        "command": "python " + " ".join([os.path.relpath(__file__, REPO), *(argv or sys.argv[1:])]),
        "machine": machine_info(),
        "model": args.vision_model
        or ("tiny random ViT" if args.tiny else f"DINOv2-S (offline) at {args.image_size} px"),
        "data": "synthetic" if args.tiny else f"Fashion-MNIST ({args.image_size} px)",
        "train_size": len(dataset),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "cache": {
            "dtype": args.dtype,
            "tokens": num_tokens,
            "channels": dim,
            "bytes_on_disk": cache_bytes,
            "bytes_per_example": cache_bytes / len(dataset),
            "key_seconds": key_seconds,
            "model_bytes_hashed": backbone_bytes,
            "precompute_seconds": precompute_seconds,
            "precompute_seconds_per_example": precompute_seconds / len(dataset),
            "precompute_seconds_full_train_split": precompute_seconds / len(dataset) * FULL_TRAIN_SIZE,
        },
        "configs": {
            name: {
                "label": CONFIGS[name][0],
                "step_seconds_median": step_seconds[name],
                "step_seconds": timings[name],
                "data_seconds_median": median(data_seconds[name]),
                "peak_memory_mib": memory[name],
                "gflops_per_step": flops[name] / 1e9,
                "flops_vs_lora": flops[name] / flops["lora"],
                "trainable_parameters": sum(p.numel() for p in models[name].parameters() if p.requires_grad),
                "vs_lora": step_seconds[name] / step_seconds["lora"],
            }
            for name in CONFIGS
        },
        "break_even_epochs": break_even,
        "pays_off_within_target": break_even <= TARGET_EPOCHS,
        "cached_vs_lora": step_seconds["toast-cached"] / step_seconds["lora"],
        "meets_target": step_seconds["toast-cached"] / step_seconds["lora"] <= TARGET_RATIO,
        "profiles": profiles,
    }
    print(report(results))
    if args.output:
        write_json(args.output, results)
    if updates_docs(args):
        update_docs_section("feature-cache", report(results), path=DOC)
    return results


def report(results: dict) -> str:
    cache = results["cache"]
    rows = [
        (
            config["label"],
            f"{config['step_seconds_median']:.3f}",
            f"{config['data_seconds_median'] * 1e3:.0f}",
            f"{config['vs_lora']:.2f}x",
            f"{config['peak_memory_mib']:.0f}",
            f"{config['gflops_per_step']:.1f} ({config['flops_vs_lora']:.2f}x)",
            f"{config['trainable_parameters']:,}",
        )
        for config in results["configs"].values()
    ]
    table = markdown_table(
        (
            "configuration",
            "step (s, median)",
            "of which data (ms)",
            "vs LoRA",
            "peak tensor memory (MiB)",
            "GFLOP per step (vs LoRA)",
            "trainable",
        ),
        rows,
    )
    machine = results["machine"]
    lines = [
        f"Measured with `{results['command']}` on {machine.get('cpu', 'CPU')} ({machine['cpu_count']} cores, "
        f"{machine['torch_threads']} torch threads, shared; load average {machine['load_average'][0]:.1f}), fp32, "
        f"{results['model']}, {results['train_size']} {results['data']} training examples, batch {results['batch_size']}, "
        f"median of {results['repeats']} steps after {results['warmup']} warm-up rounds.",
        "",
        table,
        "",
        f"- Precompute: {cache['precompute_seconds']:.1f} s for {results['train_size']} examples "
        f"({cache['precompute_seconds_per_example'] * 1e3:.1f} ms per example, so "
        f"≈ {cache['precompute_seconds_full_train_split'] / 60:.0f} min for all {FULL_TRAIN_SIZE:,}); cache on disk "
        f"{cache['bytes_per_example'] / 1e3:.1f} kB per example ({cache['tokens']} tokens x {cache['channels']} "
        f"channels, {cache['dtype']}, plus the dataset's own columns).",
        f"- Fingerprinting the base model (hashing ≈ {cache['model_bytes_hashed'] / 1e6:.0f} MB of weights, once per "
        f"precompute and per collator): {cache['key_seconds']:.2f} s.",
        f"- Break-even: the precompute pays for itself after {results['break_even_epochs']:.2f} epochs "
        f"(target <= {TARGET_EPOCHS}: {'met' if results['pays_off_within_target'] else 'missed'}).",
        f"- TOAST with the cache costs {results['cached_vs_lora']:.2f}x a LoRA step (target <= {TARGET_RATIO}: "
        f"{'met' if results['meets_target'] else 'missed'}).",
    ]
    for name, operators in results["profiles"].items():
        top = ", ".join(f"{op['operator']} {op['ms_per_step']:.0f} ms ({op['share']:.0%})" for op in operators[:5])
        lines.append(f"- Top operators, {results['configs'][name]['label']}: {top}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
