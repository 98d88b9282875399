"""Scaling: how TOAST's training step time and peak memory grow with image size, batch size and sequence length,
next to LoRA's.

Three sweeps, each changing one thing: the image side of DINOv2-S (56 / 112 / 168 px = 16 / 64 / 144 patches, batch
16), the batch size at 112 px (8 / 16 / 32), and the sequence length of SmolLM2-135M as a causal LM (64 / 128 / 256
tokens, batch 4). For every point, TOAST and LoRA are timed side by side in one process (interleaved rounds, median
after warm-up) and each one's peak training memory is measured in a fresh process (see `benchmarks/cost.py`).

    python benchmarks/scaling.py --quick
    python benchmarks/scaling.py --output scaling.json    # updates docs/benchmarks.md and docs/img/scaling.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _models  # these import common first, which must come before torch (see below)
import _results
import _timing
import common  # noqa: I001  (first: it sets the OpenMP wait policy before torch loads)
from tqdm.auto import tqdm

from peft_toast.cli import script_parser

METHODS = ("toast", "lora")

# name -> (family, the value that changes, fixed batch size or None if the batch size is what changes, fixed size)
SWEEPS = {
    "full": {
        "image size (px)": ("vision", (56, 112, 168), 16, None),
        "batch size (112 px)": ("vision", (8, 16, 32), None, 112),
        "sequence length (tokens)": ("text", (64, 128, 256), 4, None),
    },
    "quick": {
        "image size (px)": ("vision", (56, 112), 4, None),
        "batch size (112 px)": ("vision", (4, 8), None, 112),
        "sequence length (tokens)": ("text", (32, 64), 2, None),
    },
    "tiny": {
        "image size (px)": ("vision", (14, 28), 2, None),
        "batch size (28 px)": ("vision", (2, 4), None, 28),
        "sequence length (tokens)": ("text", (8, 16), 2, None),
    },
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    common.add_common_arguments(parser)
    _timing.add_rounds_arguments(parser, repeats_help="Timed rounds per point (default 5; 3 with --quick).", warmup=1)
    parser.add_argument(
        "--from-json", type=Path, help="Regenerate the docs table and plot from this results file only."
    )
    return parser.parse_args(argv)


def measure_point(args, family: str, batch_size: int, size: int) -> dict:
    """TOAST and LoRA at one shape: interleaved step timings in this process, peak memory in fresh processes."""
    specs = {method: _timing.cost_spec(args, family, method, batch_size, size) for method in METHODS}
    workloads = {}
    for method, spec in specs.items():
        model, batch = _timing.build_cost_model(spec)
        workloads[method] = _timing.train_step_fn(model, batch)
    timings = _timing.interleaved_timings(
        workloads, repeats=args.repeats, warmup=args.warmup, desc=f"{family} batch {batch_size} size {size}"
    )
    del workloads
    point = {"batch_size": batch_size, "size": size, "load_average": common.os.getloadavg()[0]}
    for method, spec in specs.items():
        point[method] = {"seconds": timings[method], "median_seconds": _timing.median(timings[method])}
        if not args.no_memory:
            point[method].update(_timing.peak_training_memory(spec))
    return point


def main(argv=None) -> dict:
    args = parse_args(argv)
    stored = _timing.start(args, write_docs)
    if stored is not None:
        return stored
    sweeps = SWEEPS["tiny" if args.tiny else "quick" if args.quick else "full"]
    results = {
        **_timing.results_header("scaling", argv),
        "settings": {"repeats": args.repeats, "warmup": args.warmup, "tiny": args.tiny, "quick": args.quick},
        "sweeps": {},
    }
    start = time.perf_counter()
    total = sum(len(values) for _, values, _, _ in sweeps.values())
    with tqdm(total=total, desc="scaling points") as progress:
        for name, (family, values, batch_size, size) in sweeps.items():
            points = results["sweeps"][name] = {"family": family, "points": []}
            for value in values:
                shape = (batch_size, value) if batch_size is not None else (value, size)
                points["points"].append({"value": value, **measure_point(args, family, *shape)})
                progress.update()
                if args.output:
                    _results.write_json(args.output, results)
    return _timing.finish(args, results, start, (table,), write_docs)


def table(results: dict) -> str:
    rows = []
    for name, sweep in results["sweeps"].items():
        for point in sweep["points"]:
            toast, lora = point["toast"], point["lora"]
            memory = ("–", "–", "–")
            if "peak_mib" in toast:
                memory = (
                    f"{toast['added_mib']:.0f} / {lora['added_mib']:.0f}",
                    f"{toast['peak_mib']:.0f} / {lora['peak_mib']:.0f}",
                    f"{toast['peak_mib'] / lora['peak_mib']:.2f}×",
                )
            rows.append(
                (
                    name,
                    point["value"],
                    f"{toast['median_seconds']:.3f} / {lora['median_seconds']:.3f}",
                    f"{toast['median_seconds'] / lora['median_seconds']:.2f}×",
                    *memory,
                )
            )
    headers = (
        "sweep",
        "value",
        "step s, TOAST / LoRA",
        "time ratio",
        "added MiB, TOAST / LoRA",
        "peak MiB, TOAST / LoRA",
        "peak ratio",
    )
    return _results.markdown_table(headers, rows)


def write_docs(results: dict) -> None:
    caption = (
        f"{results['machine']['cpu_count']}-core CPU, fp32, {results['machine']['torch_threads']} threads; "
        f"median of {results['settings']['repeats']} interleaved steps after {results['settings']['warmup']} "
        f"warm-up; load average {results['machine']['load_average'][0]:.1f} at the start, "
        f"{results['machine']['load_average_end'][0]:.1f} at the end. Run {results['started']}."
    )
    _results.update_docs_section("scaling", f"{caption}\n\n{table(results)}\n\n![scaling](img/scaling.png)")
    plot(results)


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = results["sweeps"]
    figure, axes = plt.subplots(2, len(sweeps), figsize=(4.2 * len(sweeps), 6.4), squeeze=False)
    for column, (name, sweep) in enumerate(sweeps.items()):
        values = [point["value"] for point in sweep["points"]]
        for method, color in (("toast", "tab:red"), ("lora", "tab:gray")):
            label = _models.METHOD_LABELS[method]
            seconds = [point[method]["median_seconds"] for point in sweep["points"]]
            added = [point[method]["added_mib"] for point in sweep["points"]]
            axes[0][column].plot(values, seconds, "o-", color=color, label=label)
            axes[1][column].plot(values, added, "o-", color=color, label=label)
        model = "DINOv2-S" if sweep["family"] == "vision" else "SmolLM2-135M"
        axes[0][column].set_title(f"{model}: {name}", fontsize=9)
        axes[0][column].set_ylabel("train step (s)")
        axes[1][column].set_ylabel("memory added by training (MiB)")
        axes[1][column].set_xlabel(name)
        for axis in axes[:, column]:
            axis.set_xticks(values)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
    figure.suptitle("TOAST vs LoRA: training step time and memory (2-core CPU, fp32)", fontsize=9)
    figure.tight_layout()
    _results.save_figure(figure, "scaling.png")
    plt.close(figure)


if __name__ == "__main__":
    main()
