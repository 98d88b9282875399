"""Greedy decoding time per token of a causal LM: the base model, TOAST with its two KV caches, and TOAST without a cache.

TOAST runs the model twice per step (pass 1 for the top-down signal, pass 2 for the output), so cached decoding costs
about two base steps per token; without a cache every step recomputes the whole sequence, twice. The three
configurations live in one process and run in interleaved rounds (every round runs each once), so a busy phase of a
shared machine slows all of them alike; the first rounds are warm-up and the report gives the median of the rest.
Every run decodes exactly `--new-tokens` tokens (`min_new_tokens`) from the same random `--prompt-tokens`-token prompt;
the time per token is the whole `generate` call divided by the new tokens (the prompt's prefill included). The program
also checks that cached and uncached TOAST decoding give the same tokens.

Default model: SmolLM2-135M-Instruct (offline, `peft_toast.assets`), with a TOAST adapter whose readouts have the
reference initialisation (small random values, so the signal is not zero).

    python benchmarks/generation.py --quick
    python benchmarks/generation.py                                     # 32 new tokens, 7 timed rounds
    python benchmarks/generation.py --device cuda --dtype bf16 --model HuggingFaceTB/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import _models  # these import common first, which must come before torch (see below)
import _results
import _timing
import common  # noqa: I001  (first: it sets the OpenMP wait policy before torch loads)
import torch
import transformers
from peft import get_peft_model

from peft_toast import ToastConfig
from peft_toast.cli import script_parser

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CONFIGURATIONS = ("base", "toast_cached", "toast_uncached")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, device and precision arguments shared with `checkpointing_memory.py`."""
    parser.add_argument(
        "--model", default=None, help="Hub id or folder of a causal LM (default: offline SmolLM2-135M-Instruct)."
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="Build --model from its config with random weights (time and memory do not depend on the weight values; "
        "for a machine that has the config but not the checkpoint).",
    )
    parser.add_argument("--tiny", action="store_true", help="A tiny random Llama instead (seconds; for smoke tests).")
    parser.add_argument("--device", default="cpu", help="'cpu' (default) or a CUDA device such as 'cuda'.")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="Weights' dtype (default fp32).")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2).")


def load_causal_lm(model: str | None, *, tiny: bool, random_weights: bool, dtype: str) -> torch.nn.Module:
    if random_weights and not tiny:
        config = transformers.AutoConfig.from_pretrained(_models.text_model_path(model))
        return transformers.AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    return _models.load_causal_lm(model, tiny=tiny, dtype=DTYPES[dtype])


def parse_args(argv=None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    add_model_arguments(parser)
    parser.add_argument("--prompt-tokens", type=int, default=20, help="Prompt length (default 20).")
    parser.add_argument("--new-tokens", type=int, default=32, help="Tokens to generate (default 32).")
    parser.add_argument("--repeats", type=int, default=7, help="Timed rounds (default 7).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed rounds first (default 2).")
    parser.add_argument(
        "--quick", action="store_true", help="8 new tokens, 5 timed rounds after 1 warm-up round (about a minute)."
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="Results JSON (default: benchmarks/results/generation.json; -quick/-tiny before .json for those runs).",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats, args.warmup = 8, 5, 1
    args.output = args.output or default_output("generation", args)
    return args


def default_output(name: str, args: argparse.Namespace) -> Path:
    """`benchmarks/results/<name>.json`; quick and tiny runs get their own file, so they never replace a full run's."""
    suffix = "-tiny" if args.tiny else "-quick" if args.quick else ""
    return RESULTS / f"{name}{suffix}.json"


def generate_fn(model, input_ids: torch.Tensor, new_tokens: int, use_cache: bool):
    """Greedy decoding of exactly `new_tokens` tokens; returns the generated sequence."""

    @torch.no_grad()
    def generate() -> torch.Tensor:
        return model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=model.config.eos_token_id,
        )

    return generate


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    base = load_causal_lm(args.model, tiny=args.tiny, random_weights=args.random_weights, dtype=args.dtype)
    base = base.to(args.device).eval()
    toast_base = load_causal_lm(args.model, tiny=args.tiny, random_weights=args.random_weights, dtype=args.dtype)
    toast_base.load_state_dict(base.state_dict())  # the same weights under both (random weights included)
    toast = get_peft_model(toast_base, ToastConfig(task_type="CAUSAL_LM", readout_init="reference"))
    toast = toast.to(args.device).eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, base.config.vocab_size, (1, args.prompt_tokens), generator=generator).to(args.device)

    workloads = {
        "base": generate_fn(base, input_ids, args.new_tokens, use_cache=True),
        "toast_cached": generate_fn(toast, input_ids, args.new_tokens, use_cache=True),
        "toast_uncached": generate_fn(toast, input_ids, args.new_tokens, use_cache=False),
    }
    exact = torch.equal(workloads["toast_cached"](), workloads["toast_uncached"]())
    load_before = os.getloadavg()[0]
    timings = _timing.interleaved_timings(
        workloads, repeats=args.repeats, warmup=args.warmup, device=args.device, desc="generation rounds"
    )
    medians = {name: _timing.median(times) for name, times in timings.items()}
    ms_per_token = {name: 1000 * seconds / args.new_tokens for name, seconds in medians.items()}
    results = {
        "command": " ".join(["python", "benchmarks/generation.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": common.machine_info(args.device),
        "load_average": [load_before, os.getloadavg()[0]],
        "model": "tiny random Llama" if args.tiny else args.model or "SmolLM2-135M-Instruct (offline)",
        "random_weights": args.random_weights,
        "dtype": args.dtype,
        "device": args.device,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "cached_equals_uncached": exact,
        "seconds": timings,
        "median_seconds": medians,
        "ms_per_token": ms_per_token,
        "ratios": {
            "toast_cached_vs_base": medians["toast_cached"] / medians["base"],
            "toast_uncached_vs_base": medians["toast_uncached"] / medians["base"],
            "toast_uncached_vs_cached": medians["toast_uncached"] / medians["toast_cached"],
        },
    }
    print(
        _results.markdown_table(
            ["configuration", "ms / token (median)", "tokens / s"],
            [(name, f"{ms_per_token[name]:.1f}", f"{1000 / ms_per_token[name]:.1f}") for name in CONFIGURATIONS],
        )
    )
    for name, ratio in results["ratios"].items():
        print(f"{name}: {ratio:.2f}x")
    print(f"cached TOAST tokens == uncached TOAST tokens: {exact}")
    _results.write_json(args.output, results)
    return results


if __name__ == "__main__":
    main()
