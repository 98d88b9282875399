"""Quality: TOAST against LoRA, a linear probe and full fine-tuning, at the same data and the same step budget.

Two tasks: (a) Fashion-MNIST at 112 px on DINOv2-S (a ViT-S/14), (b) binary tweet sentiment on SmolLM2-135M with a
sequence-classification head (`LlamaForSequenceClassification`, prediction from the last real token). Every method
trains the task head, with AdamW (no weight decay), 10% linear warm-up then cosine decay, gradient clipping at 1.0, the
same batches in the same order for a given seed.

No method wins by a better-tuned learning rate: each gets a sweep over the same number of learning rates (its own
range, a factor of about 3 apart) with seed 0; the learning rate with the best validation accuracy is then run with the
remaining seeds, and the table reports the mean ± standard deviation of *test* accuracy over all seeds at that
learning rate. Validation comes from the train split; the test examples are never used for any choice.

The task head is new in every method and needs a larger step than the pretrained parts, so the linear probe runs first
(on the frozen model's cached head inputs, which is exactly training the head of the frozen model) and its best
learning rate becomes the head learning rate of every other method; their sweeps cover their own parameters.

    python benchmarks/quality.py --quick                 # a few minutes: both tasks, 1 learning rate, 2 seeds
    python benchmarks/quality.py --output results.json   # the full run (about 40 min on 2 CPU cores), updates docs/
    python benchmarks/quality.py --from-json results.json  # regenerate the docs tables and plot only
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import _data  # these import common first, which must come before torch (see below)
import _models
import _results
import _training
import common  # noqa: I001  (first: it sets the OpenMP wait policy before torch loads)
import torch
from tqdm.auto import tqdm

from peft_toast.cli import script_parser

# Learning-rate sweeps, one range per method, three values each (for the linear probe: of the head). Adapters of a
# frozen model take larger steps than full fine-tuning; TOAST's full-rank d x d maps move every channel at once.
LEARNING_RATES = {
    # Full-rank TOAST on a decoder reads the last block's output before the final norm (token norms ~1,100 on SmolLM2,
    # vs ~40 after DINOv2's final LayerNorm) and every readout step is multiplied by it: its range is 30x lower there
    # (docs/training.md "Learning rate"). The first full run used the vision range on SmolLM2 as well.
    "toast": {"vision": (1e-4, 3e-4, 1e-3), "text": (1e-5, 3e-5, 1e-4)},
    "toast-r8": (1e-3, 3e-3, 1e-2),
    "lora": (1e-3, 3e-3, 1e-2),
    "linear": (3e-3, 1e-2, 3e-2),
    "full": (1e-5, 3e-5, 1e-4),
}

# Data sizes, step budgets and seeds, sized for a 2-core CPU shared with other jobs.
PROTOCOLS = {
    "full": {
        "seeds": (0, 1, 2),
        "sweep": True,
        "vision": {"sizes": {"train": 1000, "val": 200, "test": 500}, "steps": 50, "batch_size": 16},
        "text": {"sizes": {"train": 600, "val": 150, "test": 400}, "steps": 30, "batch_size": 8},
    },
    "quick": {
        "seeds": (0, 1),
        "sweep": False,
        "vision": {"sizes": {"train": 160, "val": 64, "test": 128}, "steps": 12, "batch_size": 8},
        "text": {"sizes": {"train": 160, "val": 64, "test": 128}, "steps": 12, "batch_size": 8},
    },
}
TINY_SIZES = {"train": 64, "val": 32, "test": 32}


def parse_args(argv=None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    common.add_common_arguments(parser)
    parser.add_argument("--tasks", nargs="+", default=["vision", "text"], choices=["vision", "text"])
    parser.add_argument("--methods", nargs="+", default=list(_models.METHODS), choices=_models.METHODS)
    parser.add_argument(
        "--image-size", type=int, default=112, help="Image side in px, a multiple of 14 (default 112)."
    )
    parser.add_argument("--max-length", type=int, default=48, help="Tokens per tweet at most (default 48).")
    parser.add_argument(
        "--head-lr",
        type=float,
        help="Head learning rate of the other methods when the linear probe (whose best rate it is by default) is "
        "not among --methods; e.g. to rerun one method against an earlier run's probe.",
    )
    common.add_lr_grid_argument(parser)
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        help="Regenerate the docs tables and plot from these results files (their tasks are merged, a later file's "
        "methods replacing an earlier file's); train nothing.",
    )
    return parser.parse_args(argv)


def protocol_for(args: argparse.Namespace) -> dict:
    protocol = json.loads(json.dumps(PROTOCOLS["quick" if args.quick else "full"]))  # a deep copy
    if args.tiny:
        for task in ("vision", "text"):
            protocol[task].update(sizes=dict(TINY_SIZES), steps=8, batch_size=8)
    return protocol


def load_task(name: str, args: argparse.Namespace, sizes: dict[str, int]) -> _data.Task:
    if name == "vision":
        return _data.vision_task(args.vision_model, sizes=sizes, image_size=args.image_size, tiny=args.tiny)
    return _data.text_task(args.text_model, sizes=sizes, max_length=args.max_length, tiny=args.tiny)


def learning_rates(method: str, task: str) -> tuple[float, ...]:
    """The sweep of `method` on `task` (`LEARNING_RATES` holds one range, or one per task)."""
    grid = LEARNING_RATES[method]
    return grid[task] if isinstance(grid, dict) else grid


def train_once(task: _data.Task, method: str, lr: float, seed: int, settings: dict, head_lr: float | None):
    """Train a fresh model with `method`; returns the model, the splits it reads, and a record of the run."""
    torch.manual_seed(seed)  # the head (and the adapter's random parts) start from this seed
    model = task.new_model()
    if method == "linear":
        model, splits = _training.LinearProbe(_models.model_head(model)), task.probe_splits()
    else:
        model, splits = _models.apply_method(model, method), task.splits
    start = time.perf_counter()
    losses = _training.train(
        model,
        splits["train"],
        steps=settings["steps"],
        batch_size=settings["batch_size"],
        lr=lr,
        head_lr=head_lr,
        seed=seed,
        desc=f"{task.name} {method} lr={lr:g} seed={seed}",
    )
    record = {
        "seed": seed,
        "lr": lr,
        "head_lr": lr if head_lr is None else head_lr,
        "first_loss": losses[0],
        "final_loss": sum(losses[-5:]) / len(losses[-5:]),
        "train_seconds": time.perf_counter() - start,
        "trainable_parameters": _models.trainable_parameters(model),
    }
    return model, splits, record


def run_method(
    task: _data.Task, method: str, protocol: dict, head_lr: float | None, progress: tqdm, on_run, lrs=None
) -> dict:
    """The learning-rate sweep (seed 0, scored on validation) and the remaining seeds at the best learning rate.

    Only the chosen models are evaluated on the test split: the sweep's best one, and one per remaining seed.
    """
    settings = protocol[task.name]
    grid = lrs or learning_rates(method, task.name)
    lrs = grid if protocol["sweep"] else grid[len(grid) // 2 : len(grid) // 2 + 1]
    seeds = protocol["seeds"]
    record = {"label": _models.METHOD_LABELS[method], "sweep": [], "runs": []}
    best = None  # (model, splits, run record) of the best learning rate so far
    for lr in lrs:
        model, splits, run = train_once(task, method, lr, seeds[0], settings, head_lr)
        run["val_accuracy"] = _training.accuracy(model, splits["val"])
        record["sweep"].append(run)
        if best is None or run["val_accuracy"] > best[2]["val_accuracy"]:  # the smaller lr wins ties
            best = (model, splits, run)
        del model
        progress.update()
        on_run()
    model, splits, run = best
    del best
    run["test_accuracy"] = _training.accuracy(model, splits["test"])
    record["best_lr"] = run["lr"]
    record["runs"].append(run)
    for seed in seeds[1:]:
        model, splits, run = train_once(task, method, record["best_lr"], seed, settings, head_lr)
        run["test_accuracy"] = _training.accuracy(model, splits["test"])
        record["runs"].append(run)
        progress.update()
        on_run()
    accuracies = [run["test_accuracy"] for run in record["runs"]]
    record["trainable_parameters"] = run["trainable_parameters"]
    record["test_accuracy_mean"] = statistics.mean(accuracies)
    record["test_accuracy_std"] = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    return record


def merge_results(paths: Sequence[Path]) -> dict:
    """The tasks of several results files; a later file's methods replace an earlier file's for the same task."""
    results = {"tasks": {}}
    for path in paths:
        for name, task in json.loads(Path(path).read_text())["tasks"].items():
            if name in results["tasks"]:
                results["tasks"][name]["methods"].update(task["methods"])
            else:
                results["tasks"][name] = task
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.from_json:
        results = merge_results(args.from_json)
        write_docs(results)
        return results
    common.setup(args)
    protocol = protocol_for(args)
    results = {
        "benchmark": "quality",
        "command": "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": common.machine_info(),
        "protocol": {**protocol, "learning_rates": LEARNING_RATES, "lr_grid": args.lr_grid, "tiny": args.tiny},
        "tasks": {},
    }

    def save() -> None:
        if args.output:
            with_end = {**results, "machine": {**results["machine"], "load_average_end": common.os.getloadavg()}}
            _results.write_json(args.output, with_end)

    grids = common.lr_grid_overrides(args.lr_grid)

    def sweep_size(method: str, task: str) -> int:
        return len(grids.get(method) or learning_rates(method, task)) if protocol["sweep"] else 1

    total = sum(sweep_size(m, t) + len(protocol["seeds"]) - 1 for t in args.tasks for m in args.methods)
    start = time.perf_counter()
    with tqdm(total=total, desc="quality runs") as progress:
        for task_name in args.tasks:
            settings = protocol[task_name]
            task = load_task(task_name, args, settings["sizes"])
            test_labels = task.splits["test"].labels
            majority = torch.bincount(test_labels).max().item() / len(test_labels)
            entry = results["tasks"][task_name] = {
                "description": task.description,
                "model": task.model_name,
                **settings,
                "majority_class_test_accuracy": majority,
                "methods": {},
            }
            # The linear probe runs first: its best learning rate becomes every other method's head learning rate.
            head_lr = args.head_lr
            for method in sorted(args.methods, key=lambda name: name != "linear"):
                lrs = grids.get(method)
                entry["methods"][method] = run_method(task, method, protocol, head_lr, progress, save, lrs)
                if method == "linear":
                    head_lr = entry["head_lr"] = entry["methods"]["linear"]["best_lr"]
                save()
    results["seconds"] = time.perf_counter() - start
    save()
    print_summary(results)
    if common.updates_docs(args):
        write_docs(results)
    return results


# ------------------------------------------------------------------------------------------------ reporting


def ordered_methods(task: dict) -> list[dict]:
    """The method records of a task in table order (runs may have been made in another order)."""
    return [task["methods"][name] for name in _models.METHODS if name in task["methods"]]


def summary_table(task: dict) -> str:
    rows = []
    for record in ordered_methods(task):
        sweep = " / ".join(f"{run['val_accuracy']:.3f}" for run in record["sweep"])
        lrs = " / ".join(f"{run['lr']:g}" for run in record["sweep"])
        rows.append(
            (
                record["label"],
                _results.format_count(record["trainable_parameters"]),
                f"**{100 * record['test_accuracy_mean']:.1f} ± {100 * record['test_accuracy_std']:.1f}**",
                f"{record['best_lr']:g}",
                f"{sweep} (lr {lrs})",
                f"{statistics.mean(run['train_seconds'] for run in record['runs']):.0f}",
            )
        )
    headers = (
        "method",
        "trainable params",
        "test accuracy % (mean ± std)",
        "best lr",
        "val accuracy, seed 0",
        "train s / run",
    )
    return _results.markdown_table(headers, rows)


def print_summary(results: dict) -> None:
    for name, task in results["tasks"].items():
        seeds = len(next(iter(task["methods"].values()))["runs"])
        print(
            f"\n{name}: {task['model']} on {task['description']}; {task['steps']} steps x batch "
            f"{task['batch_size']}, {seeds} seed(s); majority class {100 * task['majority_class_test_accuracy']:.1f}%"
        )
        print(summary_table(task))


def write_docs(results: dict) -> None:
    for name, task in results["tasks"].items():
        seeds = len(next(iter(task["methods"].values()))["runs"])
        caption = (
            f"{task['model']}, {task['description']}: {task['sizes']['train']} train / {task['sizes']['val']} val / "
            f"{task['sizes']['test']} test examples, {task['steps']} steps of batch {task['batch_size']}, "
            f"{seeds} seeds. Majority class: {100 * task['majority_class_test_accuracy']:.1f}% of the test set."
        )
        _results.update_docs_section(f"quality-{name}", f"{caption}\n\n{summary_table(task)}")
    plot(results)


def plot(results: dict) -> None:
    tasks = results["tasks"]
    plt, figure, axes = _results.figure_per_task(len(tasks), 5.5, 3.8)
    for axis, task in zip(axes, tasks.values()):
        records = ordered_methods(task)
        means = [100 * record["test_accuracy_mean"] for record in records]
        stds = [100 * record["test_accuracy_std"] for record in records]
        colors = ["tab:red" if record["label"].startswith("TOAST") else "tab:gray" for record in records]
        axis.bar(range(len(records)), means, yerr=stds, color=colors, capsize=4)
        axis.axhline(
            100 * task["majority_class_test_accuracy"],
            color="black",
            linestyle=":",
            linewidth=1,
            label="majority class",
        )
        axis.set_xticks(range(len(records)))
        axis.set_xticklabels(
            [textwrap.fill(record["label"], 14, break_long_words=False) for record in records], fontsize=7
        )
        low = min(m - s for m, s in zip(means, stds))
        axis.set_ylim(max(0, min(low, 100 * task["majority_class_test_accuracy"]) - 5), 100)
        axis.set_ylabel("test accuracy (%)")
        axis.set_title(f"{task['model']}\n{task['description']}", fontsize=8)
        axis.legend(fontsize=7, loc="lower right")
    figure.suptitle(
        "Same data, same steps, best of a 3-value lr sweep each; mean ± std over seeds (2-core CPU, fp32)",
        fontsize=8,
    )
    figure.tight_layout()
    _results.save_figure(figure, "quality.png")
    plt.close(figure)


if __name__ == "__main__":
    main()
