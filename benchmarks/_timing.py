"""What the timing benchmarks (`cost.py`, `scaling.py`) share: their options for the timed rounds, how a run starts
(or only rewrites the docs from a results file), the configuration measured, the peak-memory measurement, and the
header and end of the results."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Optional

import common  # noqa: I001  (first: it sets the OpenMP wait policy before torch loads)


def add_rounds_arguments(parser: argparse.ArgumentParser, *, repeats_help: str, warmup: int) -> None:
    """`--repeats` (None until `start` sets the default), `--warmup` and `--no-memory`."""
    parser.add_argument("--repeats", type=int, default=None, help=repeats_help)
    parser.add_argument("--warmup", type=int, default=warmup, help=f"Untimed rounds first (default {warmup}).")
    parser.add_argument("--no-memory", action="store_true", help="Skip the peak-memory measurements.")


def start(args: argparse.Namespace, write_docs: Callable[[dict], None]) -> Optional[dict]:
    """With `--from-json`: rewrite the docs from that results file and return its results. Otherwise set the run up
    (`common.setup`; `--repeats` defaults to 5 rounds, 3 with --quick or --tiny) and return None."""
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        write_docs(results)
        return results
    common.setup(args)
    if args.repeats is None:
        args.repeats = 3 if (args.quick or args.tiny) else 5
    return None


def cost_spec(
    args: argparse.Namespace, family: str, method: str, batch_size: int, size: int, **fields
) -> common.CostSpec:
    """The `common.CostSpec` of `method` on `family` at this shape, with the model, --tiny, rounds and threads of
    `args`, plus `fields`."""
    return common.CostSpec(
        family=family,
        method=method,
        batch_size=batch_size,
        size=size,
        model=args.vision_model if family == "vision" else args.text_model,
        tiny=args.tiny,
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        **fields,
    )


def peak_training_memory(spec: common.CostSpec) -> dict[str, float]:
    """`common.measure_peak_memory` of training as `spec` says, in a fresh process. Two steps reach the peak: the first
    creates the optimizer states, the second holds them together with the activations."""
    return common.measure_peak_memory(dataclasses.replace(spec, warmup=0, repeats=2))


def results_header(benchmark: str, argv: Optional[Sequence[str]], device: str = "cpu") -> dict:
    """The first entries of a results file: the benchmark, the command that ran it, when, and on which machine."""
    return {
        "benchmark": benchmark,
        "command": f"python benchmarks/{benchmark}.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": common.machine_info(device),
    }


def finish(
    args: argparse.Namespace,
    results: dict,
    started: float,
    tables: Sequence[Callable[[dict], str]],
    write_docs: Callable[[dict], None],
) -> dict:
    """Record the run's duration and the load average at its end, write the results (--output), print each of
    `tables(results)` and update the docs when the run is one that does (`common.updates_docs`)."""
    results["seconds"] = time.perf_counter() - started
    results["machine"]["load_average_end"] = common.os.getloadavg()
    if args.output:
        common.write_json(args.output, results)
    for table in tables:
        print(table(results))
    if common.updates_docs(args):
        write_docs(results)
    return results
