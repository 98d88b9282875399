"""Compile: a training step under `torch.compile` vs eager, for TOAST and LoRA, side by side.

For each method, two copies of the same model (same seed, same weights) train on the same fixed batch: one eager, one
`torch.compile(model)` (backend `--backend`, default inductor). A step is forward + backward + AdamW update, as in
`cost.py`; only the model is compiled, not the optimizer.

How it is measured:

- The first two calls of every configuration run first, one configuration after the other, and are reported on their
  own (`first_calls_seconds`): the first compiles every frame, the second recompiles the few whose guards the first
  call changed for good (TOAST's data-initialised prompt is set; transformers fills in `config.problem_type`).
- Then all configurations run in rounds (every round runs each once, so a busy phase of a shared machine slows all of
  them alike); the first `--warmup` rounds are discarded, the table reports the median of the rest.
- dynamo's counters: the frames compiled and recompiled during the first two calls, the graphs they made, and the
  frames compiled during the timed rounds (`compiles_while_timed`; 0 means no step paid for a recompile).
- The loss of the first step, compiled and eager: the compiled model computes what the eager one does.

Models: DINOv2-S as a ViT image classifier (112 px, batch 8; `--quick`: 56 px, batch 4) and, with `--families text`,
SmolLM2-135M as a causal LM (batch 2 x 64 tokens; `--quick`: 2 x 32). With --threads, inductor's compile workers are
limited to that many processes too.

    python benchmarks/compile.py --tiny                 # tiny random ViT (the CI smoke test adds --backend eager)
    # the run of docs/training.md (which it updates), with an empty inductor cache so that the first call compiles:
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/compile.py --threads 1 --repeats 10 \
        --output benchmarks/results/compile.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _results
import _timing
import common  # noqa: I001  (first: it sets the OpenMP wait policy before torch loads)
import torch
import torch._dynamo
from torch._dynamo.callback import CallbackTrigger, callback_handler
from torch._dynamo.utils import counters
from tqdm.auto import tqdm

from peft_toast.cli import script_parser

METHODS = ("toast", "lora")
METHOD_CHOICES = ("toast", "toast-r8", "toast-top4", "lora")
# (batch size, size) per family: size = image side in px (vision) or tokens (text).
SHAPES = {
    "full": {"vision": (8, 112), "text": (2, 64)},
    "quick": {"vision": (4, 56), "text": (2, 32)},
    "tiny": {"vision": (4, 28), "text": (2, 16)},
}
# Calls that may still compile (see the module docstring); reported on their own, before the timed rounds.
FIRST_CALLS = 2
DOCS_PAGE = common.REPO / "docs" / "training.md"


def parse_args(argv=None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    common.add_common_arguments(parser)
    parser.add_argument("--families", nargs="+", default=["vision"], choices=["vision", "text"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHOD_CHOICES)
    parser.add_argument(
        "--backend",
        default="inductor",
        help="torch.compile backend (default inductor; 'aot_eager' traces forward and backward without generating code).",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="Timed rounds (default 5; 3 with --quick or --tiny)."
    )
    parser.add_argument("--warmup", type=int, default=1, help="Untimed rounds after the first calls (default 1).")
    parser.add_argument("--from-json", type=Path, help="Regenerate the docs table from this results file only.")
    return parser.parse_args(argv)


class CompileCounter:
    """Frames that dynamo starts to compile while active: `ids` are their compile ids, `frame/n` (n > 0: a recompile)."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def __enter__(self) -> CompileCounter:
        callback_handler.register_start_callback(self._record)
        return self

    def __exit__(self, *exc) -> None:
        callback_handler.remove_start_callback(self._record)

    def _record(self, args) -> None:
        if args.callback_trigger == CallbackTrigger.DYNAMO:
            self.ids.append(str(args.compile_id))

    @property
    def compiles(self) -> int:
        return len(self.ids)

    @property
    def recompiles(self) -> int:
        return count_recompiles(self.ids)


def count_recompiles(compile_ids: list[str]) -> int:
    """How many of these compile ids (`frame/n`) are recompiles of a frame (`n > 0`)."""
    return sum(not compile_id.endswith("/0") for compile_id in compile_ids)


def train_step_fn(model, batch: dict):
    """`_timing.train_step_fn`, returning the (detached) loss of the step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> torch.Tensor:
        model.train()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def measure_family(args, family: str) -> dict:
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    batch_size, size = SHAPES[mode][family]
    workloads, first_calls, first_loss, dynamo = {}, {}, {}, {}
    counter = CompileCounter()
    with counter:
        for method in tqdm(args.methods, desc=f"{family}: models and first calls", leave=False):
            spec = _timing.cost_spec(args, family, method, batch_size, size)
            for compiled in (False, True):
                model, batch = _timing.build_cost_model(spec)  # seeded: both copies have the same weights
                name = f"{method}-compiled" if compiled else method
                step = train_step_fn(torch.compile(model, backend=args.backend) if compiled else model, batch)
                before = (len(counter.ids), counters["stats"]["unique_graphs"])
                times, losses, per_call = [], [], []
                for _ in range(FIRST_CALLS):
                    start, compiles = time.perf_counter(), len(counter.ids)
                    losses.append(float(step()))
                    times.append(time.perf_counter() - start)
                    per_call.append(len(counter.ids) - compiles)
                first_calls[name], first_loss[name] = times, losses[0]
                if compiled:
                    new = counter.ids[before[0] :]
                    dynamo[name] = {
                        "frames_compiled": len(new),
                        "frames_compiled_per_call": per_call,
                        # Frames compiled before, for this model or another one (the code of PEFT and transformers
                        # that several models share is compiled once per model).
                        "recompiles": count_recompiles(new),
                        "graphs": counters["stats"]["unique_graphs"] - before[1],
                    }
                workloads[name] = step
        timed_from = len(counter.ids)
        timings = _timing.interleaved_timings(
            workloads, repeats=args.repeats, warmup=args.warmup, desc=f"{family} train step"
        )
        compiles_while_timed = len(counter.ids) - timed_from
    median = {name: _timing.median(times) for name, times in timings.items()}
    ratios = {f"{method}_compiled_vs_eager": median[f"{method}-compiled"] / median[method] for method in args.methods}
    if {"toast", "lora"} <= set(args.methods):
        ratios["toast_vs_lora_eager"] = median["toast"] / median["lora"]
        ratios["toast_vs_lora_compiled"] = median["toast-compiled"] / median["lora-compiled"]
    return {
        "shape": {"batch_size": batch_size, "size": size},
        "first_calls_seconds": first_calls,
        "first_loss": first_loss,
        "loss_difference": {
            method: abs(first_loss[f"{method}-compiled"] - first_loss[method]) for method in args.methods
        },
        "dynamo": dynamo,
        "compiles_while_timed": compiles_while_timed,
        "seconds": timings,
        "median_seconds": median,
        "ratios": ratios,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    stored = _timing.start(args, write_docs)
    if stored is not None:
        return stored
    if args.backend == "inductor":
        from torch._inductor import config as inductor_config

        inductor_config.compile_threads = args.threads  # its worker processes: no more CPUs than asked for
    torch._dynamo.reset()
    results = {
        **_timing.results_header("compile", argv),
        "settings": {
            "backend": args.backend,
            "methods": args.methods,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "first_calls": FIRST_CALLS,
            "tiny": args.tiny,
            "quick": args.quick,
        },
        "families": {},
    }
    return _timing.measure_families(args, results, measure_family, (table,), write_docs)


def table(results: dict) -> str:
    lines = [
        "| model | method | eager step | compiled step | compiled / eager | first two compiled calls | "
        "frames compiled (recompiled) | graphs | compiles while timed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for family, entry in results["families"].items():
        shape = entry["shape"]
        name = f"{family} (batch {shape['batch_size']}, {'px' if family == 'vision' else 'tokens'} {shape['size']})"
        for method in results["settings"]["methods"]:
            compiled = f"{method}-compiled"
            median, dynamo = entry["median_seconds"], entry["dynamo"][compiled]
            first = " + ".join(f"{seconds:.1f}" for seconds in entry["first_calls_seconds"][compiled])
            lines.append(
                f"| {name} | {method} | {median[method]:.3f} s | {median[compiled]:.3f} s | "
                f"{entry['ratios'][f'{method}_compiled_vs_eager']:.2f}x | {first} s | "
                f"{dynamo['frames_compiled']} ({dynamo['recompiles']}) | {dynamo['graphs']} | "
                f"{entry['compiles_while_timed']} |"
            )
    return "\n".join(lines)


def write_docs(results: dict) -> None:
    _results.update_docs_section("compile", table(results), path=DOCS_PAGE)


if __name__ == "__main__":
    main()
