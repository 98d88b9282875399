"""Top blocks: what steering only the top `k` of `L` blocks costs (`layers_to_transform` = the top k), now that pass 2
starts at the lowest steered block (`ToastConfig.share_lower_blocks`).

For each k, side by side in one process (rounds: every round runs every configuration once; the first rounds are
warm-up; medians of the rest):

- training step (forward + backward + AdamW) of TOAST top-k, vs LoRA r8 on the query/value projections of every block;
- the same step with the pass-1 feature cache (`toast_features` + `toast_hidden`, precomputed once for the fixed batch,
  as `peft_toast.feature_cache` stores them): pass 1 is skipped and pass 2 runs only the k steered blocks;
- inference forward (eval; text with `use_cache=False`) vs the frozen base model.

- text only: cached greedy generation (`GENERATION` prompt and new tokens; time per new token, prefill included) vs the
  frozen model, and the KV memory the generation leaves (every distinct key/value tensor of the main and the pass-1
  cache, whose bottom layers are shared) vs the frozen model's cache.

Models and shapes as `cost.py`: DINOv2-S image classifier (112 px, batch 32) and SmolLM2-135M causal LM (8 x 128
tokens).

    python benchmarks/top_blocks.py --tiny                    # seconds (CI smoke test)
    python benchmarks/top_blocks.py --families vision --output top_blocks.json
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import _models  # these import common first, which must come before torch (see below)
import _results
import _timing
import common  # noqa: I001  (first: it sets the OpenMP wait policy before torch loads)
import torch
from peft import get_peft_model
from tqdm.auto import tqdm

from peft_toast import ToastConfig
from peft_toast.cli import script_parser
from peft_toast.state import CallState

SHAPES = {"full": {"vision": (32, 112), "text": (8, 128)}, "quick": {"vision": (8, 112), "text": (2, 64)}}
SHAPES["tiny"] = {"vision": (4, 28), "text": (2, 16)}
# Cached generation (text): batch, prompt tokens, new tokens.
GENERATION = {"full": (1, 64, 32), "quick": (1, 32, 8), "tiny": (1, 8, 4)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    common.add_common_arguments(parser)
    parser.add_argument("--families", nargs="+", default=["vision", "text"], choices=["vision", "text"])
    parser.add_argument("--ks", type=int, nargs="+", help="Steered top blocks (default 1 2 4 L/4 L/2 L).")
    _timing.add_rounds_arguments(parser, repeats_help="Timed rounds (default 5; 3 with --quick).", warmup=2)
    parser.add_argument("--from-json", type=Path, help="Regenerate the docs table from this results file only.")
    return parser.parse_args(argv)


def cached_inputs(model, batch: dict, start: int) -> dict:
    """`batch` plus the pass-1 feature and the hidden state entering block `start`, computed once, as the feature
    cache stores them."""
    tuner = model.base_model
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    if tuner.architecture.causal:
        inputs["use_cache"] = False
    state = CallState(owner=tuner, shared_blocks=start)
    model.eval()
    features = tuner.run_pass1(tuner.model, (), inputs, state=state)
    hidden = state.shared_output[0] if isinstance(state.shared_output, tuple) else state.shared_output
    return {**batch, "toast_features": features, "toast_hidden": hidden, "toast_hidden_block": start}


def kv_bytes(model, batch: dict, new_tokens: int) -> int:
    """Bytes of every distinct key/value tensor that a cached greedy generation leaves in the main cache and, for
    TOAST, in its pass-1 cache (layers shared between the two are counted once)."""
    from peft_toast.generation import get_pass1_cache

    with torch.no_grad():
        output = model.eval().generate(
            **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
            return_dict_in_generate=True, pad_token_id=0,
        )  # fmt: skip
    caches = [output.past_key_values, get_pass1_cache(output.past_key_values)]
    layers = {id(layer): layer for cache in caches if cache is not None for layer in cache.layers}
    return sum(t.numel() * t.element_size() for layer in layers.values() for t in (layer.keys, layer.values))


def measure_family(args, family: str) -> dict:
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    batch_size, size = SHAPES[mode][family]
    spec = _timing.cost_spec(args, family, "base", batch_size, size)
    base, batch = _timing.build_cost_model(spec)
    lora, _ = _timing.build_cost_model(_timing.cost_spec(args, family, "lora", batch_size, size))
    num_blocks = len(get_peft_model(copy.deepcopy(base), ToastConfig()).base_model.architecture.blocks)
    ks = sorted(
        {k for k in (args.ks or (1, 2, 4, num_blocks // 4, num_blocks // 2, num_blocks)) if 1 <= k <= num_blocks}
    )
    task_type = "CAUSAL_LM" if family == "text" else None
    train, forward, parameters = {"lora": _timing.train_step_fn(lora, batch)}, {}, {}
    forward["base"] = _timing.forward_fn(base, {**batch, **({"use_cache": False} if family == "text" else {})})
    generate, memory = {}, {}
    if family == "text":
        rows, length, new_tokens = GENERATION[mode]
        prompt = {name: batch[name][:rows, :length] for name in ("input_ids", "attention_mask")}
        generate["base"] = _timing.generate_fn(base, prompt, new_tokens)
        memory["base"] = kv_bytes(base, prompt, new_tokens)
    parameters["lora"] = _models.trainable_parameters(lora)
    for k in tqdm(ks, desc=f"{family}: models", leave=False):
        model = get_peft_model(
            copy.deepcopy(base), ToastConfig(layers_to_transform=list(range(num_blocks - k, num_blocks)), **(
                {"task_type": task_type} if task_type else {}
            )),
        )  # fmt: skip
        plain = {**batch, **({"use_cache": False} if family == "text" else {})}
        train[f"toast-top{k}"] = _timing.train_step_fn(model, plain)
        if k < num_blocks:
            train[f"toast-top{k}-cached"] = _timing.train_step_fn(model, cached_inputs(model, batch, num_blocks - k))
        forward[f"toast-top{k}"] = _timing.forward_fn(model, plain)
        parameters[f"toast-top{k}"] = _models.trainable_parameters(model)
        if generate:
            generate[f"toast-top{k}"] = _timing.generate_fn(model, prompt, new_tokens)
            memory[f"toast-top{k}"] = kv_bytes(model, prompt, new_tokens)
    result = {"num_blocks": num_blocks, "ks": ks, "shape": {"batch_size": batch_size, "size": size}, "kinds": {}}
    if generate:
        result["generation"] = {"batch_size": rows, "prompt_tokens": length, "new_tokens": new_tokens}
        result["kv_bytes"] = memory
    for kind, workloads in (("train", train), ("forward", forward), ("generate", generate)):
        if not workloads:
            continue
        timings = _timing.interleaved_timings(
            workloads, repeats=args.repeats, warmup=args.warmup, desc=f"{family} {kind}"
        )
        result["kinds"][kind] = {
            "seconds": timings,
            "median_seconds": {name: _timing.median(times) for name, times in timings.items()},
        }
    result["trainable_parameters"] = parameters
    train_median, forward_median = (
        result["kinds"]["train"]["median_seconds"],
        result["kinds"]["forward"]["median_seconds"],
    )
    result["ratios"] = {
        f"top{k}": {
            "train_vs_lora": train_median[f"toast-top{k}"] / train_median["lora"],
            "cached_train_vs_lora": (
                train_median[f"toast-top{k}-cached"] / train_median["lora"] if k < num_blocks else None
            ),
            "forward_vs_base": forward_median[f"toast-top{k}"] / forward_median["base"],
        }
        for k in ks
    }
    if generate:
        generate_median = result["kinds"]["generate"]["median_seconds"]
        for k in ks:
            result["ratios"][f"top{k}"]["generate_vs_base"] = (
                generate_median[f"toast-top{k}"] / generate_median["base"]
            )
            result["ratios"][f"top{k}"]["kv_memory_vs_base"] = memory[f"toast-top{k}"] / memory["base"]
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    stored = _timing.start(args, write_docs)
    if stored is not None:
        return stored
    results = {
        **_timing.results_header("top_blocks", argv),
        "settings": {"repeats": args.repeats, "warmup": args.warmup, "tiny": args.tiny, "quick": args.quick},
        "families": {},
    }
    return _timing.measure_families(args, results, measure_family, (table,), write_docs)


def table(results: dict) -> str:
    lines = [
        "| model | steered blocks k / L | train step / LoRA | cached train step / LoRA | forward / frozen model | "
        "generation per token / frozen | KV memory / frozen | trainable parameters |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for family, entry in results["families"].items():
        shape = entry["shape"]
        name = f"{family} (batch {shape['batch_size']}, {'px' if family == 'vision' else 'tokens'} {shape['size']})"
        for k in entry["ks"]:
            ratios = entry["ratios"][f"top{k}"]
            cached = ratios["cached_train_vs_lora"]
            generation = [ratios.get(key) for key in ("generate_vs_base", "kv_memory_vs_base")]
            generation = " | ".join("–" if value is None else f"{value:.2f}x" for value in generation)
            lines.append(
                f"| {name} | {k} / {entry['num_blocks']} | {ratios['train_vs_lora']:.2f}x | "
                f"{'–' if cached is None else f'{cached:.2f}x'} | {ratios['forward_vs_base']:.2f}x | {generation} | "
                f"{entry['trainable_parameters'][f'toast-top{k}'] / 1e3:.1f}k |"
            )
        lines.append(
            f"| {name} | LoRA r8 (q, v), all blocks | 1.00x | | | | | "
            f"{entry['trainable_parameters']['lora'] / 1e3:.1f}k |"
        )
    return "\n".join(lines)


def write_docs(results: dict) -> None:
    _results.update_docs_section("top-blocks", table(results))


if __name__ == "__main__":
    main()
