"""Cost: TOAST's training step, peak training memory, inference forward and cached generation, as ratios to LoRA, full
fine-tuning and the frozen base model, measured side by side.

Models: DINOv2-S as a ViT image classifier (default 112 px, batch 32) and SmolLM2-135M as a causal LM (batch 8 x 128
tokens, next-token loss; generation: batch 1, a 16-token prompt, 32 greedy new tokens with the KV cache).

How it is measured:

- Time: all configurations of a model live in ONE process and run in rounds (every round runs each configuration once),
  so a busy phase of a shared machine slows all of them alike; the first rounds are warm-up, the table reports the
  median of the rest. A training step is forward + backward + AdamW update on a fixed batch.
- Memory: each configuration runs in a fresh process. On CPU its resident-set high-water mark is reset (Linux
  `/proc/self/clear_refs`) once the model, optimizer and batch exist; the peak while it trains is reported in full and
  as the part that training adds on top of the loaded model (activations, gradients, optimizer states). On CUDA,
  `torch.cuda.max_memory_allocated`.

    python benchmarks/cost.py --quick
    python benchmarks/cost.py --output cost.json                            # CPU, updates docs/
    python benchmarks/cost.py --device cuda --dtype bf16 --output gpu.json  # on a GPU
    python benchmarks/cost.py --profile                                     # where a TOAST step spends its time
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _models  # these import common first, which must come before torch (see below)
import _results
import _timing
import common  # noqa: I001  (first: it sets the OpenMP wait policy before torch loads)
import torch
from tqdm.auto import tqdm

from peft_toast.cli import script_parser

TARGETS = {  # TOAST / reference, at most
    "train_time_vs_lora": 1.5,
    "train_memory_vs_lora": 1.25,
    "forward_vs_base": 2.3,
    "generate_per_token_vs_base": 2.3,
}
TRAIN_METHODS = ("toast", "toast-r8", "lora", "full")
INFERENCE_METHODS = ("base", "toast", "toast-r8", "lora")

# (batch size, size) per family: size = image side in px (vision) or tokens (text).
SHAPES = {
    "full": {"vision": (32, 112), "text": (8, 128)},
    "quick": {"vision": (8, 112), "text": (2, 64)},
    "tiny": {"vision": (4, 28), "text": (2, 16)},
}
GENERATION = {"full": (16, 32), "quick": (8, 8), "tiny": (4, 4)}  # (prompt tokens, new tokens)


def parse_args(argv=None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    common.add_common_arguments(parser)
    parser.add_argument("--families", nargs="+", default=["vision", "text"], choices=["vision", "text"])
    parser.add_argument("--device", default="cpu", help="'cpu' (default) or a CUDA device such as 'cuda'.")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="Model weights' dtype.")
    _timing.add_rounds_arguments(parser, repeats_help="Timed rounds (default 5; 3 with --quick).", warmup=2)
    parser.add_argument(
        "--profile", action="store_true", help="Profile one TOAST training step and forward per model instead."
    )
    parser.add_argument("--from-json", type=Path, help="Regenerate the docs tables from this results file only.")
    return parser.parse_args(argv)


def spec_for(args, family: str, method: str, kind: str) -> _timing.CostSpec:
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    batch_size, size = SHAPES[mode][family]
    prompt, new_tokens = GENERATION[mode]
    if kind == "generate":
        batch_size, size = 1, prompt
    return _timing.cost_spec(
        args, family, method, batch_size, size, kind=kind, device=args.device, dtype=args.dtype, new_tokens=new_tokens
    )


def measure_family(args, family: str) -> dict:
    """Timings (one process, interleaved) and peak memory (one process per configuration) of one model."""
    kinds = ["train", "forward"] + (["generate"] if family == "text" else [])
    methods = sorted(set(TRAIN_METHODS) | set(INFERENCE_METHODS), key=(TRAIN_METHODS + INFERENCE_METHODS).index)
    models, batches = {}, {}
    for method in tqdm(methods, desc=f"{family}: loading models", leave=False):
        models[method], batches[method] = _timing.build_cost_model(spec_for(args, family, method, "train"))
    result = {"kinds": {}}
    for kind in kinds:
        spec = spec_for(args, family, "toast", kind)
        members = TRAIN_METHODS if kind == "train" else INFERENCE_METHODS
        if kind == "generate":
            prompt = batches["base"]["input_ids"][:1, : spec.size]
            batch = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
        workloads = {
            method: _timing.workload_fn(models[method], batch if kind == "generate" else batches[method], spec)
            for method in members
        }
        load_before = common.os.getloadavg()[0]
        timings = _timing.interleaved_timings(
            workloads, repeats=spec.repeats, warmup=spec.warmup, device=args.device, desc=f"{family} {kind}"
        )
        result["kinds"][kind] = {
            "shape": {"batch_size": spec.batch_size, "size": spec.size, "new_tokens": spec.new_tokens},
            "load_average": [load_before, common.os.getloadavg()[0]],
            "seconds": timings,
            "median_seconds": {method: _timing.median(times) for method, times in timings.items()},
        }
        if kind == "generate":
            result["kinds"][kind]["tokens_per_second"] = {
                method: spec.new_tokens / seconds
                for method, seconds in result["kinds"][kind]["median_seconds"].items()
            }
    result["trainable_parameters"] = {method: _models.trainable_parameters(models[method]) for method in TRAIN_METHODS}
    del models, batches
    if not args.no_memory:
        memory = {}
        for method in tqdm(TRAIN_METHODS, desc=f"{family}: peak memory (one process each)", leave=False):
            memory[method] = _timing.peak_training_memory(spec_for(args, family, method, "train"))
        result["train_memory_mib"] = memory
    result["ratios"] = ratios(result)
    return result


def ratios(result: dict) -> dict:
    time_of = {kind: entry["median_seconds"] for kind, entry in result["kinds"].items()}
    out = {
        "train_time_vs_lora": time_of["train"]["toast"] / time_of["train"]["lora"],
        "train_time_vs_full": time_of["train"]["toast"] / time_of["train"]["full"],
        "train_time_r8_vs_lora": time_of["train"]["toast-r8"] / time_of["train"]["lora"],
        "forward_vs_base": time_of["forward"]["toast"] / time_of["forward"]["base"],
        "forward_r8_vs_base": time_of["forward"]["toast-r8"] / time_of["forward"]["base"],
        "forward_lora_vs_base": time_of["forward"]["lora"] / time_of["forward"]["base"],
    }
    if "generate" in time_of:
        out["generate_per_token_vs_base"] = time_of["generate"]["toast"] / time_of["generate"]["base"]
        out["generate_per_token_r8_vs_base"] = time_of["generate"]["toast-r8"] / time_of["generate"]["base"]
    if "train_memory_mib" in result:
        memory = result["train_memory_mib"]
        for reference in ("lora", "full"):
            out[f"train_memory_vs_{reference}"] = memory["toast"]["peak_mib"] / memory[reference]["peak_mib"]
            out[f"train_added_memory_vs_{reference}"] = memory["toast"]["added_mib"] / memory[reference]["added_mib"]
        out["train_memory_r8_vs_lora"] = memory["toast-r8"]["peak_mib"] / memory["lora"]["peak_mib"]
    return out


def profile_family(args, family: str) -> None:
    """Print where one TOAST training step and one TOAST forward spend their time: per phase (pass 1, the top-down
    signals, the rest of the forward, backward, optimizer) and per operator (torch.profiler, self time)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    model, batch = _timing.build_cost_model(spec_for(args, family, "toast", "train"))
    tuner = model.base_model
    for name in ("run_pass1", "top_down_signals"):  # label the two TOAST-specific phases in the trace
        method = getattr(tuner, name)
        setattr(tuner, name, _labelled(method, f"toast.{name}", record_function))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    inputs = {key: value for key, value in batch.items() if key != "labels"}

    def train_step() -> None:
        model.train()
        with record_function("phase.forward"):
            loss = model(**batch).loss
        with record_function("phase.backward"):
            loss.backward()
        with record_function("phase.optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def forward() -> None:
        model.eval()
        with record_function("phase.forward"):
            model(**inputs)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    sort_by = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    for kind, workload in (("train step", train_step), ("forward", forward)):
        workload()  # warm-up
        with profile(activities=activities) as profiler:
            workload()
        events = profiler.key_averages()
        phases = {
            event.key: event.cpu_time_total / 1e3 for event in events if event.key.startswith(("phase.", "toast."))
        }
        print(f"\n{family} TOAST {kind}: time per phase (ms, inclusive; toast.* run inside phase.forward)")
        for key, milliseconds in sorted(phases.items()):
            print(f"  {key:<28}{milliseconds:10.1f}")
        print(events.table(sort_by=sort_by, row_limit=15))


def _labelled(method, label: str, record_function):
    def labelled(*args, **kwargs):
        with record_function(label):
            return method(*args, **kwargs)

    return labelled


def main(argv=None) -> dict:
    args = parse_args(argv)
    stored = _timing.start(args, write_docs)
    if stored is not None:
        return stored
    if args.profile:
        for family in args.families:
            profile_family(args, family)
        return {}
    results = {
        **_timing.results_header("cost", argv, args.device),
        "settings": {
            "device": args.device,
            "dtype": args.dtype,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "tiny": args.tiny,
            "quick": args.quick,
        },
        "targets": TARGETS,
        "families": {},
    }
    start = time.perf_counter()
    for family in tqdm(args.families, desc="cost"):
        results["families"][family] = measure_family(args, family)
        if args.output:
            _results.write_json(args.output, results)
    return _timing.finish(args, results, start, (ratio_table, absolute_table), write_docs)


# ------------------------------------------------------------------------------------------------ reporting

RATIO_ROWS = (
    ("train step time, TOAST / LoRA", "train_time_vs_lora"),
    ("train step time, TOAST-r8 / LoRA", "train_time_r8_vs_lora"),
    ("train step time, TOAST / full fine-tuning", "train_time_vs_full"),
    ("peak training memory (process), TOAST / LoRA", "train_memory_vs_lora"),
    ("peak training memory (process), TOAST-r8 / LoRA", "train_memory_r8_vs_lora"),
    ("peak training memory (process), TOAST / full fine-tuning", "train_memory_vs_full"),
    ("memory added by training, TOAST / LoRA", "train_added_memory_vs_lora"),
    ("memory added by training, TOAST / full fine-tuning", "train_added_memory_vs_full"),
    ("inference forward, TOAST / base", "forward_vs_base"),
    ("inference forward, TOAST-r8 / base", "forward_r8_vs_base"),
    ("inference forward, LoRA (unmerged) / base", "forward_lora_vs_base"),
    ("cached generation, time per token, TOAST / base", "generate_per_token_vs_base"),
    ("cached generation, time per token, TOAST-r8 / base", "generate_per_token_r8_vs_base"),
)


def ratio_table(results: dict) -> str:
    families = results["families"]
    rows = []
    for label, key in RATIO_ROWS:
        if not any(key in family["ratios"] for family in families.values()):
            continue
        target = TARGETS.get(key)
        cells = []
        for family in families.values():
            value = family["ratios"].get(key)
            if value is None:
                cells.append("–")
            else:
                verdict = "" if target is None else (" ✓" if value <= target else " ✗")
                cells.append(f"{value:.2f}×{verdict}")
        rows.append((label, f"≤ {target}×" if target else "", *cells))
    return _results.markdown_table(("ratio", "target", *families), rows)


def absolute_table(results: dict) -> str:
    rows = []
    for name, family in results["families"].items():
        kinds = family["kinds"]
        memory = family.get("train_memory_mib", {})
        for method in dict.fromkeys(TRAIN_METHODS + INFERENCE_METHODS):
            train = kinds["train"]["median_seconds"].get(method)
            forward = kinds["forward"]["median_seconds"].get(method)
            tokens = kinds.get("generate", {}).get("tokens_per_second", {}).get(method)
            peak = memory.get(method)
            rows.append(
                (
                    name,
                    _models.METHOD_LABELS[method],
                    _results.format_count(family["trainable_parameters"][method]) if method in TRAIN_METHODS else "0",
                    f"{train:.3f}" if train is not None else "–",
                    f"{peak['peak_mib']:.0f} / {peak['added_mib']:.0f}" if peak else "–",
                    f"{forward:.3f}" if forward is not None else "–",
                    f"{tokens:.1f}" if tokens is not None else "–",
                )
            )
    headers = (
        "model",
        "method",
        "trainable",
        "train step s",
        "train peak / added MiB",
        "forward s",
        "generation tokens/s",
    )
    return _results.markdown_table(headers, rows)


def shapes_caption(results: dict) -> str:
    parts = []
    for name, family in results["families"].items():
        train = family["kinds"]["train"]["shape"]
        unit = "px" if name == "vision" else "tokens"
        text = f"{name}: batch {train['batch_size']} × {train['size']} {unit}"
        if "generate" in family["kinds"]:
            generate = family["kinds"]["generate"]["shape"]
            text += f"; generation batch 1, {generate['size']}-token prompt, {generate['new_tokens']} new tokens"
        parts.append(text)
    settings = results["settings"]
    where = (
        results["machine"].get("gpu")
        or f"{results['machine']['cpu_count']}-core CPU ({results['machine'].get('cpu', 'unknown')})"
    )
    return (
        f"{where}, {settings['dtype']}, {results['machine']['torch_threads']} threads; {'; '.join(parts)}. "
        f"Median of {settings['repeats']} rounds after {settings['warmup']} warm-up rounds; load average "
        f"{results['machine']['load_average'][0]:.1f} at the start, {results['machine']['load_average_end'][0]:.1f} at "
        f"the end. Run {results['started']}."
    )


def write_docs(results: dict) -> None:
    section = "cost-gpu" if results["settings"]["device"].startswith("cuda") else "cost"
    markdown = f"{shapes_caption(results)}\n\n{ratio_table(results)}\n\nAbsolute values:\n\n{absolute_table(results)}"
    _results.update_docs_section(section, markdown)


if __name__ == "__main__":
    main()
