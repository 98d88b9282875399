"""The set-up that every benchmark in this folder shares: the environment that must be set before torch loads (so
every benchmark and every helper module imports this module first), the shared command-line options, `setup`, whether
a run updates the docs, and what the numbers were measured on. The other jobs live in their own modules: models and
methods in `_models.py`, tasks in `_data.py`, the linear probe and training loop in `_training.py`, timing, cost
configurations and peak memory in `_timing.py`, and results (JSON, markdown tables in `docs/benchmarks.md`, plots) in
`_results.py`.

Run any benchmark with `--help`. Every benchmark runs on the real offline models of `peft_toast.assets` by default
(DINOv2-S as a ViT, SmolLM2-135M), accepts Hub ids instead, and has a `--tiny` switch that swaps in tiny random models
and synthetic data so that the whole program runs in seconds (the CI smoke test uses it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning. On a CPU shared with other jobs, spinning threads make every
# multi-threaded op wait for a descheduled peer: 2-thread steps ran up to 10x slower than 1-thread steps here. Must be
# set before torch loads, so the benchmarks import this module first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import transformers  # noqa: E402

import peft_toast  # noqa: E402  (registers TOAST with PEFT)

REPO = Path(__file__).resolve().parent.parent


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="A small version of the run that takes a few minutes.")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="Tiny random models and synthetic data (seconds; used by the CI smoke test).",
    )
    parser.add_argument("--output", type=Path, help="Where to write the raw results as JSON.")
    parser.add_argument(
        "--vision-model",
        default=None,
        help="Image model: a folder or Hub id (default: the offline DINOv2-S ViT of peft_toast.assets).",
    )
    parser.add_argument(
        "--text-model",
        default=None,
        help="Language model: a folder or Hub id (default: the offline SmolLM2-135M of peft_toast.assets).",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2).")
    parser.add_argument(
        "--no-docs",
        action="store_true",
        help="Do not regenerate the tables and plots in docs/ (full runs do by default; --quick and --tiny never do).",
    )


def add_lr_grid_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lr-grid",
        nargs="+",
        default=[],
        metavar="METHOD:LR,LR",
        help="Replace a method's learning rates, e.g. toast:1e-3 lora:1e-2,3e-2 (to check past the edge of a sweep).",
    )


def lr_grid_overrides(items: list[str]) -> dict[str, tuple[float, ...]]:
    """`--lr-grid` as {method: rates}; an item without a method or a rate is an error that names it."""
    overrides = {}
    for item in items:
        method, _, values = item.partition(":")
        try:
            overrides[method] = tuple(float(value) for value in values.split(","))
        except ValueError:
            raise SystemExit(f"--lr-grid {item!r}: expected METHOD:LR[,LR...], e.g. toast:1e-4,3e-4.") from None
        if not method:
            raise SystemExit(f"--lr-grid {item!r}: expected METHOD:LR[,LR...], e.g. toast:1e-4,3e-4.")
    return overrides


def setup(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # no load report for every freshly initialised head
    transformers.utils.logging.disable_progress_bar()


def updates_docs(args: argparse.Namespace) -> bool:
    return not (args.quick or args.tiny or args.no_docs)


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": __import__("peft").__version__,
        "peft_toast": peft_toast.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }
    with contextlib.suppress(OSError):
        model_names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        info["cpu"] = model_names[0] if model_names else platform.processor()
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
