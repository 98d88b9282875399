"""How fast closed-form calibration runs, and what its speed options cost in reconstruction error.

`calibrate_feedback` is one streaming pass of the frozen model (forward hooks accumulate per-block statistics) plus one
`d x d` solve per block. This benchmark times it on the real offline models with the settings a user can choose:

- **float64 products**: every batch's `h_out^T h_out` and `h_in^T h_out` computed in float64 (`product_dtype=float64`);
- **float32 products** (the default): products in float32, 4,096 tokens at a time, summed in float64;
- **bf16 autocast**: the pass itself under `torch.autocast(dtype=torch.bfloat16)` (`autocast_dtype=`, CLI
  `--autocast bf16`), float32 products.

For each it reports the wall time (the pass and the solves separately; median over `--repeats`, settings interleaved)
and the held-out variational loss `L_var` of the calibrated full-rank maps, measured on the float32 hidden states of
128 test examples with float64 products (the same reference for every setting).

    python benchmarks/calibration_speed.py --no-docs --output benchmarks/results/calibration_speed.json
    python benchmarks/calibration_speed.py --from-json benchmarks/results/calibration_speed.json   # docs tables
    python benchmarks/calibration_speed.py --tiny                                                 # seconds
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import _data  # these import common first, which must come before torch (see below)
import _results
import _timing
import common  # noqa: F401  (first: sets the OpenMP wait policy before torch starts its threads)
import initialisation
import torch
from peft import get_peft_model

from peft_toast import ToastConfig
from peft_toast.calibration import calibrate_feedback, collect_block_statistics, reconstruction_error
from peft_toast.cli import script_parser

SETTINGS = {
    "float64 products": {"product_dtype": torch.float64},
    "float32 products (default)": {},
    "bf16 autocast pass": {"autocast_dtype": torch.bfloat16},
}
SIZES = {
    "full": {"vision": {"train": 16, "val": 2000, "test": 128}, "text": {"train": 16, "val": 512, "test": 128}},
    "quick": {"vision": {"train": 16, "val": 256, "test": 32}, "text": {"train": 16, "val": 64, "test": 32}},
}
DOCS = initialisation.DOCS


def run_task(task: _data.Task, repeats: int) -> dict:
    calibration = initialisation.unlabelled_batches(task.splits["val"])
    held_out_batches = initialisation.unlabelled_batches(task.splits["test"], initialisation.HELD_OUT)
    model = get_peft_model(task.new_model(), ToastConfig())
    reference = collect_block_statistics(model, held_out_batches, progress=False, product_dtype=torch.float64)
    identity = reconstruction_error(model, statistics=reference)
    runs = {name: [] for name in SETTINGS}
    for _ in range(repeats):
        for name, options in SETTINGS.items():  # interleaved: a slow patch of the machine hits every setting alike
            start = time.perf_counter()
            statistics = collect_block_statistics(model, calibration, progress=False, **options)
            pass_seconds = time.perf_counter() - start
            result = calibrate_feedback(model, statistics=statistics, progress=False)
            runs[name].append(
                {
                    "pass_seconds": pass_seconds,
                    "solve_seconds": result.seconds,
                    "seconds": pass_seconds + result.seconds,
                    "held_out_loss": reconstruction_error(model, statistics=reference),
                    "tokens": result.num_tokens,
                }
            )
    summary = {
        name: {
            key: _timing.median([run[key] for run in records])
            for key in ("pass_seconds", "solve_seconds", "seconds", "held_out_loss")
        }
        for name, records in runs.items()
    }
    return {
        "description": task.description,
        "model": task.model_name,
        "calibration_examples": len(task.splits["val"]),
        "calibration_tokens": runs["float32 products (default)"][0]["tokens"],
        "held_out_identity_loss": identity,
        "runs": runs,
        "median": summary,
    }


def report_markdown(results: dict) -> str:
    machine = results["machine"]
    lines = [
        f"{machine.get('cpu', 'CPU')}, {machine['torch_threads']} torch threads, load average {machine['load_average'][0]:.1f} at the "
        f"start; median of {results['repeats']} runs per setting, settings interleaved.",
        "",
    ]
    rows = []
    for task in results["tasks"].values():
        for name, record in task["median"].items():
            rows.append(
                (
                    f"{task['model']}: {task['calibration_examples']:,} examples ({task['calibration_tokens']:,} tokens)",
                    name,
                    f"{record['pass_seconds']:.1f}",
                    f"{record['solve_seconds']:.2f}",
                    f"**{record['seconds']:.1f}**",
                    f"{record['held_out_loss']:.4g} (identity {task['held_out_identity_loss']:.4g})",
                )
            )
    headers = ("calibration set", "setting", "pass (s)", "solves (s)", "total (s)", "held-out L_var")
    return "\n".join(lines) + "\n" + _results.markdown_table(headers, rows)


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    common.add_common_arguments(parser)
    parser.add_argument("--tasks", nargs="+", default=["vision", "text"], choices=["vision", "text"])
    parser.add_argument("--image-size", type=int, default=112, help="Image side in px (default 112).")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per setting (default 3; the median is reported).")
    parser.add_argument("--from-json", type=Path, help="Only regenerate the docs table from this results file.")
    args = parser.parse_args(argv)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        _results.update_docs_section("init-speed", report_markdown(results), path=DOCS)
        return results
    common.setup(args)
    sizes = SIZES["quick" if args.quick or args.tiny else "full"]
    repeats = 1 if args.tiny else args.repeats
    results = {
        "machine": common.machine_info(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "arguments": {key: str(value) for key, value in vars(args).items()},
        "repeats": repeats,
        "tasks": {},
    }
    for name in args.tasks:
        if name == "vision":
            task = _data.vision_task(
                args.vision_model, sizes=sizes["vision"], image_size=args.image_size, tiny=args.tiny
            )
        else:
            task = _data.text_task(args.text_model, sizes=sizes["text"], tiny=args.tiny)
        results["tasks"][name] = run_task(task, repeats)
        if args.output:
            _results.write_json(args.output, results)
    text = report_markdown(results)
    print(text)
    if common.updates_docs(args):
        _results.update_docs_section("init-speed", text, path=DOCS)
    return results


if __name__ == "__main__":
    main()
