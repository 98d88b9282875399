"""Peak memory (and time) of a TOAST training step on a causal LM with and without gradient checkpointing.

Each configuration runs in a fresh Python process, so that neither sees the other's memory or allocator leftovers. The
process builds the model with a TOAST adapter, its AdamW optimizer and one fixed random batch (next-token loss), runs
`--warmup` steps (they create the optimizer states), then resets the peak and runs `--steps` more:

- CPU: the resident-set high-water mark (Linux `VmHWM`, reset through `/proc/self/clear_refs`), reported in full and as
  the part above the resident size just before the measured steps — what a step adds: activations and gradients (the
  memory that glibc kept from the warm-up steps is first returned with `malloc_trim`, else it would count as "before");
- CUDA: `torch.cuda.max_memory_allocated`, likewise.

Checkpointing is enabled the way `TrainingArguments(activation_checkpointing=True)` does it, non-reentrant:
`model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})`. The first step's
loss and adapter-gradient norm are recorded in both configurations: checkpointing must not change them.

Default model: SmolLM2-135M-Instruct (offline, `peft_toast.assets`; 30 blocks), batch 4 x 256 tokens.

    python benchmarks/checkpointing_memory.py --quick
    python benchmarks/checkpointing_memory.py                            # batch 4 x 256, 5 measured steps
    python benchmarks/checkpointing_memory.py --device cuda --batch-size 16 --seq-len 1024
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _results  # these import common first, which must come before torch (see below)
import _timing
import common  # noqa: I001  (first: it sets the OpenMP wait policy before torch loads)
import torch
import transformers
from generation import add_model_arguments, default_output, load_causal_lm
from peft import get_peft_model
from tqdm.auto import tqdm

from peft_toast import ToastConfig
from peft_toast.cli import script_parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    add_model_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256, help="Tokens per sequence (default 256).")
    parser.add_argument("--steps", type=int, default=5, help="Measured training steps (default 5).")
    parser.add_argument("--warmup", type=int, default=1, help="Unmeasured steps first (default 1).")
    parser.add_argument("--quick", action="store_true", help="Batch 2 x 128, 2 measured steps (a few minutes on CPU).")
    parser.add_argument(
        "--output",
        type=Path,
        help="Results JSON (default: benchmarks/results/checkpointing_memory.json; -quick/-tiny before .json for those "
        "runs).",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure one configuration (JSON) and print it
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.seq_len, args.steps = 2, 128, 2
    args.output = args.output or default_output("checkpointing_memory", args)
    return args


def measure(config: dict) -> dict:
    """One configuration, in this process: memory in MiB, step times in seconds, first-step loss and gradient norm."""
    torch.set_num_threads(config["threads"])
    transformers.logging.set_verbosity_error()
    device = config["device"]
    torch.manual_seed(0)
    base = load_causal_lm(
        config["model"], tiny=config["tiny"], random_weights=config["random_weights"], dtype=config["dtype"]
    )
    model = get_peft_model(base, ToastConfig(task_type="CAUSAL_LM", readout_init="reference")).to(device)
    if config["gradient_checkpointing"]:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    generator = torch.Generator().manual_seed(0)
    shape = (config["batch_size"], config["seq_len"])
    input_ids = torch.randint(3, base.config.vocab_size, shape, generator=generator).to(device)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    first = {}

    def step() -> None:
        loss = model(**batch).loss
        loss.backward()
        if not first:
            gradient_norm = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in parameters]))
            first.update(loss=loss.item(), gradient_norm=gradient_norm.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(config["warmup"]):
        step()
    times = []
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # glibc keeps the warm-up step's freed activations in the process; hand them back so that the resident size
        # before the measured steps is what is alive (model, optimizer states, batch), as `memory_allocated` is on CUDA.
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before = _timing._rss_kib("VmRSS") * 1024
        _timing._reset_peak_rss()
    for _ in range(config["steps"]):
        start = time.perf_counter()
        step()
        _timing.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else _timing._rss_kib("VmHWM") * 1024
    return {
        "peak_mib": peak / 2**20,
        "added_mib": (peak - before) / 2**20,
        "before_mib": before / 2**20,
        "step_seconds": times,
        "median_step_seconds": _timing.median(times),
        **{f"first_step_{name}": value for name, value in first.items()},
    }


def measure_in_subprocess(config: dict) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(config)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=common.REPO)
    if result.returncode != 0:
        raise RuntimeError(f"The measurement of {config} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(measure(json.loads(args.worker))))
        return {}
    shared = {
        key: getattr(args, key)
        for key in (
            "model",
            "tiny",
            "random_weights",
            "device",
            "dtype",
            "threads",
            "batch_size",
            "seq_len",
            "steps",
            "warmup",
        )
    }
    load_before = os.getloadavg()[0]
    measured = {}
    for checkpointing in tqdm((False, True), desc="configurations (one process each)"):
        name = "checkpointing" if checkpointing else "no_checkpointing"
        measured[name] = measure_in_subprocess({**shared, "gradient_checkpointing": checkpointing})
    without, with_ = measured["no_checkpointing"], measured["checkpointing"]
    results = {
        "command": " ".join(
            ["python", "benchmarks/checkpointing_memory.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": common.machine_info(args.device),
        "load_average": [load_before, os.getloadavg()[0]],
        "model": "tiny random Llama" if args.tiny else args.model or "SmolLM2-135M-Instruct (offline)",
        **shared,
        "results": measured,
        "peak_saving_mib": without["peak_mib"] - with_["peak_mib"],
        "added_ratio": with_["added_mib"] / without["added_mib"],
        "time_ratio": with_["median_step_seconds"] / without["median_step_seconds"],
        "loss_difference": abs(with_["first_step_loss"] - without["first_step_loss"]),
        "gradient_norm_relative_difference": abs(
            with_["first_step_gradient_norm"] - without["first_step_gradient_norm"]
        )
        / without["first_step_gradient_norm"],
    }
    print(
        _results.markdown_table(
            ["configuration", "peak MiB", "added by a step, MiB", "step s (median)", "first loss"],
            [
                (
                    name,
                    f"{record['peak_mib']:.0f}",
                    f"{record['added_mib']:.0f}",
                    f"{record['median_step_seconds']:.2f}",
                    f"{record['first_step_loss']:.6f}",
                )
                for name, record in measured.items()
            ],
        )
    )
    print(
        f"checkpointing saves {results['peak_saving_mib']:.0f} MiB of peak memory; a step adds "
        f"{results['added_ratio']:.2f}x the memory and takes {results['time_ratio']:.2f}x the time."
    )
    _results.write_json(args.output, results)
    return results


if __name__ == "__main__":
    main()
