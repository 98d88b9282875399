"""Memory at scale: what TOAST and LoRA need to train LLaMA-3-8B and ViT-L, counted on models that are never allocated.

Each model is built on the meta device from its configuration (no weights are loaded or allocated), with each method
applied, and one training forward runs on meta tensors. Counted per method:

- trainable parameters, and the bytes of their gradients and AdamW states (two per parameter, in the parameter's
  dtype, as `torch.optim.AdamW` keeps them);
- activations saved for the backward pass: every tensor that autograd saves during the forward
  (`torch.autograd.graph.saved_tensors_hooks`), each storage once, parameters excluded. Meta tensors only run the
  eager attention of transformers (the fused kernels need real data), which also saves each layer's attention
  probabilities `(B, heads, N, N)`; fused attention (SDPA, FlashAttention) recomputes those instead, so the table
  reports the saved tensors without them, and the JSON keeps both.

LLaMA-3-8B: bf16, 1 x 2048 tokens, causal-LM loss. ViT-L/16: bf16, 32 images of 224 px (197 tokens), 1,000 classes.
TOAST variants: full rank (every block), `feedback_rank=8`, `lite_rank=8`, and full rank on the top L/4 blocks only.
LoRA: r = 8 on the query and value projections of every block, as in the other benchmarks.

With `--measure`, also the measured peak memory of two fp32 training steps (AdamW; batch 1 x 256 tokens; each method
in a fresh process, `_timing.peak_training_memory`) on a random-initialised LLaMA of Llama-3.2-1B's shape (1.24 B
parameters, 16 blocks; saved once to `--random-model-dir`), for LoRA, TOAST full rank, rank 8, Lite and full rank on
the top 4 blocks.

    python benchmarks/memory_at_scale.py --tiny      # seconds: tiny configurations (CI smoke test)
    python benchmarks/memory_at_scale.py --measure --output benchmarks/results/memory_at_scale.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _models  # these import common first, which must come before torch
import _results
import _timing
import common  # noqa: I001  (first: it sets the OpenMP wait policy before torch loads)
import torch
import transformers
from peft import get_peft_model

from peft_toast import ToastConfig
from peft_toast.cli import script_parser

GiB = 2**30
METHODS = ("lora", "toast", "toast-r8", "toast-lite", "toast-top")
# The tiny LLaMA of `--tiny` (both the counted and the measured model).
TINY_LLAMA = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=99,
)
LABELS = {
    "lora": "LoRA r8 (q, v)",
    "toast": "TOAST full rank",
    "toast-r8": "TOAST feedback_rank=8",
    "toast-lite": "TOAST-Lite lite_rank=8",
    "toast-top": "TOAST full rank, top L/4 blocks",
}


def model_specs(tiny: bool) -> dict:
    """name -> (config, model class, the batch as shapes, LoRA target modules)."""
    if tiny:
        llama = transformers.LlamaConfig(**TINY_LLAMA)
        vit = transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, image_size=28,
            patch_size=7, num_labels=10,
        )  # fmt: skip
        text, images = (1, 16), (2, 28)
    else:
        llama = transformers.LlamaConfig(  # Meta-Llama-3-8B
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
        )  # fmt: skip
        vit = transformers.ViTConfig(  # ViT-L/16 at 224 px
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, image_size=224,
            patch_size=16, num_labels=1000,
        )  # fmt: skip
        text, images = (1, 2048), (32, 224)
    return {
        "LLaMA-3-8B" if not tiny else "tiny LLaMA": (
            llama,
            transformers.LlamaForCausalLM,
            ("text", *text),
            "CAUSAL_LM",
        ),
        "ViT-L/16" if not tiny else "tiny ViT": (
            vit,
            transformers.ViTForImageClassification,
            ("image", *images),
            None,
        ),
    }


def build(config, model_class, method: str, task_type):
    """The model with `method` applied, on the meta device, in bf16, in training mode."""
    with torch.device("meta"):
        model = model_class._from_config(config, dtype=torch.bfloat16, attn_implementation="eager")
        depth = config.num_hidden_layers
        if method == "lora":
            model = _models.apply_method(model, "lora")  # as in every other benchmark
        else:
            options = {
                "toast": {},
                "toast-r8": {"feedback_rank": 8},
                "toast-lite": {"lite_rank": 8},
                "toast-top": {"layers_to_transform": list(range(depth - depth // 4, depth))},
            }[method]
            model = get_peft_model(model, ToastConfig(task_type=task_type, **options))
    return model.train()


def inputs(spec: tuple) -> dict:
    kind, batch, size = spec
    if kind == "text":
        ids = torch.zeros(batch, size, dtype=torch.long, device="meta")
        return {
            "input_ids": ids,
            "labels": ids,
            "attention_mask": torch.ones_like(ids),
            "position_ids": torch.arange(size, device="meta").expand(batch, size),
            "use_cache": False,
        }
    return {
        "pixel_values": torch.zeros(batch, 3, size, size, dtype=torch.bfloat16, device="meta"),
        "labels": torch.zeros(batch, dtype=torch.long, device="meta"),
    }


def saved_activations(model, batch: dict, num_tokens: int) -> dict[str, int]:
    """Bytes of the tensors autograd saves in one training forward (each storage once, parameters excluded), with and
    without the attention probabilities of the eager attention (the storages saved as `(..., N, N)` tensors, whether
    `(B, heads, N, N)` or the `(B * heads, N, N)` views that matmul saves)."""
    parameters = {parameter.untyped_storage()._cdata for parameter in model.parameters()}
    saved, attention = {}, set()

    def pack(tensor):
        key = tensor.untyped_storage()._cdata
        if key not in parameters:
            saved[key] = max(saved.get(key, 0), tensor.untyped_storage().nbytes())
            if tensor.dim() >= 3 and tensor.shape[-1] == tensor.shape[-2] == num_tokens:
                attention.add(key)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch)
    total = sum(saved.values())
    return {"all": total, "without_attention_probabilities": total - sum(saved[key] for key in attention)}


def measure(config, model_class, spec, task_type, method: str) -> dict:
    start = time.perf_counter()
    model = build(config, model_class, method, task_type)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    trainable_bytes = sum(parameter.numel() * parameter.element_size() for parameter in trainable)
    frozen_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    kind, _, size = spec
    tokens = size if kind == "text" else (size // config.patch_size) ** 2 + 1
    activations = saved_activations(model, inputs(spec), tokens)
    return {
        "trainable_parameters": sum(parameter.numel() for parameter in trainable),
        "trainable_dtypes": sorted({str(parameter.dtype) for parameter in trainable}),
        "frozen_weight_bytes": frozen_bytes,
        "gradient_bytes": trainable_bytes,
        "adamw_state_bytes": 2 * trainable_bytes,
        "activation_bytes": activations["without_attention_probabilities"],
        "activation_bytes_with_attention_probabilities": activations["all"],
        "seconds": time.perf_counter() - start,
    }


def table(results: dict) -> str:
    lines = [
        "| model (batch) | method | trainable parameters | gradients + AdamW states | saved activations | "
        "total beyond the frozen weights |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in results["models"].items():
        kind, batch, size = entry["batch"]
        shape = f"{batch} x {size} tokens" if kind == "text" else f"{batch} x {size} px"
        weights = entry["methods"]["lora"]["frozen_weight_bytes"] / GiB
        for method, row in entry["methods"].items():
            states = (row["gradient_bytes"] + row["adamw_state_bytes"]) / GiB
            activations = row["activation_bytes"] / GiB
            lines.append(
                f"| {name} ({shape}; frozen weights {weights:.1f} GiB) | {LABELS[method]} | "
                f"{row['trainable_parameters'] / 1e6:.2f} M | {states:.2f} GiB | {activations:.2f} GiB | "
                f"{states + activations:.2f} GiB |"
            )
    return "\n".join(lines)


# Measured methods (names of `_models.apply_method`) and the random model of Llama-3.2-1B's shape.
MEASURED = ("lora", "toast", "toast-r8", "toast-lite", "toast-top4")
MEASURED_LABELS = {**LABELS, "toast-top4": "TOAST full rank, top 4 of 16 blocks"}


def llama_1b_config(tiny: bool) -> transformers.LlamaConfig:
    if tiny:
        return transformers.LlamaConfig(**TINY_LLAMA)
    return transformers.LlamaConfig(  # meta-llama/Llama-3.2-1B
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True,
    )  # fmt: skip


def random_model_folder(folder: Path, tiny: bool) -> Path:
    """A random-initialised LLaMA of Llama-3.2-1B's shape saved in `folder` (once; bf16 on disk)."""
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(llama_1b_config(tiny)).to(torch.bfloat16)
        model.save_pretrained(folder)
    return folder


def measure_peak(args: argparse.Namespace) -> dict:
    folder = random_model_folder(args.random_model_dir / ("tiny" if args.tiny else "llama-1b"), args.tiny)
    tokens = 16 if args.tiny else 256
    measured = {"model": "random LLaMA, Llama-3.2-1B shape" if not args.tiny else "tiny random LLaMA"}
    measured["batch"], measured["dtype"], measured["methods"] = [1, tokens], "fp32", {}
    for method in ["lora", *(method for method in args.measure_methods if method != "lora")]:
        spec = _timing.CostSpec("text", method, 1, tokens, model=str(folder), threads=args.threads)  # from the folder
        row = _timing.peak_training_memory(spec)
        measured["methods"][method] = row
        print(f"peak {method}: {row}")
    lora = measured["methods"]["lora"]
    for row in measured["methods"].values():
        row["peak_vs_lora"] = row["peak_mib"] / lora["peak_mib"]
        row["added_vs_lora"] = row["added_mib"] / lora["added_mib"]
    return measured


def measured_table(measured: dict) -> str:
    lines = [
        f"| {measured['model']}, fp32, batch {measured['batch'][0]} x {measured['batch'][1]} tokens | peak RSS | "
        "added by training | peak / LoRA |",
        "|---|---|---|---|",
    ]
    for method, row in measured["methods"].items():
        lines.append(
            f"| {MEASURED_LABELS[method]} | {row['peak_mib'] / 1024:.2f} GiB | {row['added_mib'] / 1024:.2f} GiB | "
            f"{row['peak_vs_lora']:.2f}x |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    common.add_common_arguments(parser)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--measure", action="store_true", help="Also measure peak memory on a random ~1B LLaMA.")
    parser.add_argument("--measure-methods", nargs="+", default=list(MEASURED), choices=MEASURED)
    parser.add_argument(
        "--random-model-dir",
        type=Path,
        default=Path.home() / ".cache" / "peft_toast" / "random-models",
        help="Where the random ~1B LLaMA is saved once (2.5 GB, bf16).",
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.setup(args)
    results = {
        "benchmark": "memory_at_scale",
        "command": " ".join(["python", "benchmarks/memory_at_scale.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": common.machine_info("meta"),
        "models": {},
    }
    for name, (config, model_class, spec, task_type) in model_specs(args.tiny).items():
        entry = results["models"][name] = {"batch": list(spec), "methods": {}}
        for method in args.methods:
            entry["methods"][method] = measure(config, model_class, spec, task_type, method)
            print(f"{name} {method}: {entry['methods'][method]}")
    print(table(results))
    if args.measure:
        results["measured"] = measure_peak(args)
        print(measured_table(results["measured"]))
    if args.output:
        _results.write_json(args.output, results)
    if not args.tiny and not args.no_docs:
        _results.update_docs_section("memory-at-scale", table(results))
        if args.measure:
            _results.update_docs_section("memory-measured", measured_table(results["measured"]))
    return results


if __name__ == "__main__":
    main()
