"""Timing and the configurations whose cost is measured: medians, interleaved timing rounds, the training-step,
forward and generation workloads, `CostSpec` (one model/method/shape) and the model and batch it builds, and peak
memory measured in a fresh process; plus what the timing benchmarks (`cost.py`, `scaling.py`, `top_blocks.py`) share:
their options for the timed rounds, how a run starts (or only rewrites the docs from a results file), the
configuration measured, the peak training memory, and the header and end of the results. This file is also the
peak-memory worker: `python benchmarks/_timing.py peak-memory '<json spec>'` measures one configuration in a fresh
process (see [`measure_peak_memory`])."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import common  # noqa: I001  (first: it sets the OpenMP wait policy before torch loads)
import torch
import transformers
from _models import apply_method, load_causal_lm, load_image_classifier
from _results import write_json
from torch import nn
from tqdm.auto import tqdm

# --------------------------------------------------------------------------------------------------- timing


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def interleaved_timings(
    workloads: dict[str, Callable[[], Any]], *, repeats: int, warmup: int, device: str = "cpu", desc: str = "timing"
) -> dict[str, list[float]]:
    """Seconds per call of each workload, measured in rounds: every round runs every workload once, so that a slow
    phase of a shared machine slows all of them alike rather than one of them. `warmup` rounds are discarded."""
    timings: dict[str, list[float]] = {name: [] for name in workloads}
    for round_index in tqdm(range(warmup + repeats), desc=desc, leave=False):
        for name, workload in workloads.items():
            synchronize(device)
            start = time.perf_counter()
            workload()
            synchronize(device)
            if round_index >= warmup:
                timings[name].append(time.perf_counter() - start)
    return timings


def train_step_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One AdamW step of `model` on a fixed `batch` (forward, backward, update)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)

    def step() -> None:
        model.train()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def forward_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    inputs = {key: value for key, value in batch.items() if key != "labels"}

    @torch.no_grad()
    def forward() -> None:
        model.eval()
        model(**inputs)

    return forward


# --------------------------------------------------------------------------------------- cost configurations


@dataclass
class CostSpec:
    """One model/method/shape whose training step, forward or generation is measured.

    `family` is `"vision"` (image classifier, `size` = image side in px; a multiple of 14, or of 7 with `tiny`) or
    `"text"` (causal LM, `size` = tokens).
    """

    family: str
    method: str
    batch_size: int
    size: int
    kind: str = "train"  # "train", "forward" or "generate"
    model: Optional[str] = None
    tiny: bool = False
    device: str = "cpu"
    dtype: str = "fp32"
    new_tokens: int = 32
    repeats: int = 5
    warmup: int = 2
    threads: int = 2

    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]


def build_cost_model(spec: CostSpec) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model of `spec` with its method applied, on its device, and one fixed random batch (seeded)."""
    torch.manual_seed(0)
    dtype = spec.torch_dtype()
    if spec.family == "vision":
        image_size = spec.size
        model = load_image_classifier(spec.model, 10, image_size=image_size, tiny=spec.tiny, dtype=dtype)
        batch = {
            "pixel_values": torch.randn(spec.batch_size, 3, image_size, image_size, dtype=dtype),
            "labels": torch.randint(0, 10, (spec.batch_size,)),
        }
    elif spec.family == "text":
        model = load_causal_lm(spec.model, tiny=spec.tiny, dtype=dtype)
        length = spec.size
        input_ids = torch.randint(3, model.config.vocab_size, (spec.batch_size, length))
        batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    else:
        raise ValueError(f"Unknown model family {spec.family!r}; use 'vision' or 'text'.")
    model = apply_method(model, spec.method).to(spec.device)
    return model, {key: value.to(spec.device) for key, value in batch.items()}


def generate_fn(model: nn.Module, batch: dict[str, torch.Tensor], new_tokens: int) -> Callable[[], None]:
    """Greedy decoding of exactly `new_tokens` tokens with the KV cache, from the prompt in `batch`."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    @torch.no_grad()
    def generate() -> None:
        model.eval()
        model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad_token_id,
        )

    return generate


def workload_fn(model: nn.Module, batch: dict[str, torch.Tensor], spec: CostSpec) -> Callable[[], None]:
    if spec.kind == "train":
        return train_step_fn(model, batch)
    if spec.kind == "forward":
        return forward_fn(model, batch)
    if spec.kind == "generate":
        return generate_fn(model, batch, spec.new_tokens)
    raise ValueError(f"Unknown workload {spec.kind!r}; use 'train', 'forward' or 'generate'.")


def _rss_kib(field_name: str) -> int:
    """`VmRSS` (current) or `VmHWM` (high-water mark) of this process, in KiB."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field_name}:\s+(\d+) kB", status).group(1))


def _reset_peak_rss() -> None:
    """Reset this process's RSS high-water mark (`VmHWM`, and `ru_maxrss` with it) to its current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_memory_worker(spec: CostSpec) -> dict[str, float]:
    """Build `spec` and run its workload `warmup + repeats` times, returning memory in MiB.

    CPU: the process's peak resident set size while the workload runs (the high-water mark is reset once the model,
    optimizer and batch exist) and that peak minus the resident size just before: what training (activations,
    gradients, optimizer states) or inference adds on top of the loaded model. CUDA: `torch.cuda.max_memory_allocated`.
    """
    torch.set_num_threads(spec.threads)
    transformers.logging.set_verbosity_error()
    model, batch = build_cost_model(spec)
    workload = workload_fn(model, batch, spec)
    steps = spec.warmup + spec.repeats
    if spec.device.startswith("cuda"):
        torch.cuda.synchronize(spec.device)
        before = torch.cuda.memory_allocated(spec.device)
        torch.cuda.reset_peak_memory_stats(spec.device)
        for _ in range(steps):
            workload()
        torch.cuda.synchronize(spec.device)
        peak = torch.cuda.max_memory_allocated(spec.device)
        return {"peak_mib": peak / 2**20, "added_mib": (peak - before) / 2**20, "model_mib": before / 2**20}
    before = _rss_kib("VmRSS")
    _reset_peak_rss()
    for _ in range(steps):
        workload()
    peak = _rss_kib("VmHWM")
    return {"peak_mib": peak / 1024, "added_mib": (peak - before) / 1024, "model_mib": before / 1024}


def measure_peak_memory(spec: CostSpec, timeout: float = 1800) -> dict[str, float]:
    """Run [`peak_memory_worker`] for `spec` in a fresh Python process, so that no other configuration's memory (or
    allocator leftovers) counts, and return its result."""
    command = [sys.executable, str(Path(__file__).resolve()), "peak-memory", json.dumps(spec.__dict__)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=common.REPO)
    if result.returncode != 0:
        raise RuntimeError(f"The peak-memory worker failed for {spec}:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------- timing benchmarks


def add_rounds_arguments(parser: argparse.ArgumentParser, *, repeats_help: str, warmup: int) -> None:
    """`--repeats` (None until `start` sets the default), `--warmup` and `--no-memory`."""
    parser.add_argument("--repeats", type=int, default=None, help=repeats_help)
    parser.add_argument("--warmup", type=int, default=warmup, help=f"Untimed rounds first (default {warmup}).")
    parser.add_argument("--no-memory", action="store_true", help="Skip the peak-memory measurements.")


def start(args: argparse.Namespace, write_docs: Callable[[dict], None]) -> Optional[dict]:
    """With `--from-json`: rewrite the docs from that results file and return its results. Otherwise set the run up
    (`common.setup`; `--repeats` defaults to 5 rounds, 3 with --quick or --tiny; --tiny warms up for one round at
    most) and return None."""
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        write_docs(results)
        return results
    common.setup(args)
    if args.repeats is None:
        args.repeats = 3 if (args.quick or args.tiny) else 5
    if args.tiny:  # tiny models: one warm-up round is enough
        args.warmup = min(args.warmup, 1)
    return None


def cost_spec(args: argparse.Namespace, family: str, method: str, batch_size: int, size: int, **fields) -> CostSpec:
    """The `CostSpec` of `method` on `family` at this shape, with the model, --tiny, rounds and threads of
    `args`, plus `fields`."""
    return CostSpec(
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


def peak_training_memory(spec: CostSpec) -> dict[str, float]:
    """`measure_peak_memory` of training as `spec` says, in a fresh process. Two steps reach the peak: the first
    creates the optimizer states, the second holds them together with the activations."""
    return measure_peak_memory(dataclasses.replace(spec, warmup=0, repeats=2))


def results_header(benchmark: str, argv: Optional[Sequence[str]], device: str = "cpu") -> dict:
    """The first entries of a results file: the benchmark, the command that ran it, when, and on which machine."""
    return {
        "benchmark": benchmark,
        "command": f"python benchmarks/{benchmark}.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": common.machine_info(device),
    }


def measure_families(
    args: argparse.Namespace,
    results: dict,
    measure_family: Callable[[argparse.Namespace, str], dict],
    tables: Sequence[Callable[[dict], str]],
    write_docs: Callable[[dict], None],
) -> dict:
    """`results["families"][family] = measure_family(args, family)` for every family of `args.families`, the results
    written (--output) after each one, then `finish`."""
    started = time.perf_counter()
    for family in args.families:
        results["families"][family] = measure_family(args, family)
        if args.output:
            write_json(args.output, results)
    return finish(args, results, started, tables, write_docs)


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
        write_json(args.output, results)
    for table in tables:
        print(table(results))
    if common.updates_docs(args):
        write_docs(results)
    return results


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "peak-memory":
        sys.exit("usage: python benchmarks/_timing.py peak-memory '<CostSpec as JSON>'")
    print(json.dumps(peak_memory_worker(CostSpec(**json.loads(sys.argv[2])))))
