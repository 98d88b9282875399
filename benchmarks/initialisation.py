"""Initialising TOAST's top-down path: closed-form calibration vs SGD pre-tuning vs identity/zero vs random, on the real
offline models, plus the trainable-parameter counts of the parameter-efficient variants.

1. Trainable parameters per variant (full rank, readout only, low rank, TOAST-Lite) for ViT-B/16, ViT-S/14,
   SmolLM2-135M and LLaMA-7B, counted on models built on the meta device from hand-written configs (only the hidden
   size d and the number of blocks L matter) and checked against the closed-form counts.
2. On DINOv2-S (ViT-S/14 at 112 px, Fashion-MNIST) and SmolLM2-135M (binary tweet sentiment), with the calibration
   data taken from the task's train split (unlabelled) and the held-out data from its test split:
   - the wall time of calibration (one streaming pass of the frozen model + the solves);
   - the variational loss `sum_l MSE(A_l h_out, h_in)` on held-out data with identity down-maps, the reference's
     random init, after calibration, and after SGD pre-tuning (`pretune_top_down`, the reference's objective) given
     the calibration's wall time;
   - test accuracy after a fixed short training budget for random init / zero readout / calibrated / pre-tuned, each
     with full-rank, low-rank and TOAST-Lite feedback, over several seeds (mean ± std).

The downstream runs share the protocol of `benchmarks/quality.py` (`_training.train`: AdamW, warm-up + cosine, clipping)
with fixed learning rates (the middle of its TOAST ranges). TOAST's pass 1 does not depend on the adapter, so its
feature is computed once per example and every run reuses it (`toast_features=`): a step costs one forward and one
backward pass.

    python benchmarks/initialisation.py --quick                  # a few minutes: everything runs, nothing is measured
    python benchmarks/initialisation.py --output results.json    # the documented run; updates docs/initialisation.md
    python benchmarks/initialisation.py --tiny                   # tiny random models (seconds; the CI smoke test)
    python benchmarks/initialisation.py --from-json a.json b.json  # regenerate the docs tables only
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import _data  # these import common first, which must come before torch (see below)
import _models
import _results
import _training
import common  # noqa: I001  (first: it sets the OpenMP wait policy before torch loads)
import torch
from peft import get_peft_model
from torch import nn
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTModel

from peft_toast import ToastConfig, atomic_save_pretrained
from peft_toast.calibration import calibrate_feedback, collect_block_statistics, reconstruction_error
from peft_toast.cli import script_parser
from peft_toast.loading import load_initialisation
from peft_toast.pretuning import pretune_top_down

DOCS = common.REPO / "docs" / "initialisation.md"
INITS = ("random", "zero readout", "calibrated", "pre-tuned")
VARIANTS = ("full", "low-rank", "lite")
# Learning rates: the middle of benchmarks/quality.py's TOAST ranges. The head's: the best of its linear-probe sweep on
# the vision task; on SmolLM2 a 1e-2 head step overshot in the --quick run (loss 0.87 -> 5.4), so one step lower.
# Full rank on SmolLM2: 3e-5, the middle of quality.py's decoder range (its pre-norm pass-1 feature is ~30x larger than
# DINOv2's; docs/training.md "Learning rate"). The first full run used 3e-4 there too.
LEARNING_RATES = {"full": {"vision": 3e-4, "text": 3e-5}, "low-rank": 3e-3, "lite": 3e-3}
HEAD_LR = {"vision": 1e-2, "text": 3e-3}
# The reference's variational-loss weights: 0.1 for vision, 0.01 for LLaMA.
VARIATIONAL_LOSS_WEIGHT = {"vision": 0.1, "text": 0.01}

# Sized for an idle 2-core CPU (about 45 minutes in all): every one of the 36 runs per task costs a model load, its
# steps and an evaluation. "val" is the calibration / pre-tuning set (unlabelled): 2,000 images for the ViT, the size
# of the under-a-minute calibration target for a 12-layer ViT-S.
PROTOCOLS = {
    "full": {
        "seeds": (0, 1, 2),
        "vision": {"sizes": {"train": 480, "val": 2000, "test": 384}, "steps": 30, "batch_size": 16},
        "text": {"sizes": {"train": 192, "val": 512, "test": 256}, "steps": 16, "batch_size": 8},
    },
    "quick": {
        "seeds": (0, 1),
        "vision": {"sizes": {"train": 32, "val": 64, "test": 32}, "steps": 2, "batch_size": 8},
        "text": {"sizes": {"train": 32, "val": 64, "test": 32}, "steps": 2, "batch_size": 8},
    },
    "tiny": {
        "seeds": (0, 1),
        "vision": {"sizes": {"train": 32, "val": 64, "test": 32}, "steps": 3, "batch_size": 8},
        "text": {"sizes": {"train": 32, "val": 64, "test": 32}, "steps": 3, "batch_size": 8},
    },
}
HELD_OUT = 128  # test examples whose hidden states measure the reconstruction error
BATCH_SIZE_NO_GRAD = 32  # calibration, pass-1 features, evaluation

# --------------------------------------------------------------------------------------------- parameter counts

# The configurations of the counted models, written by hand; counting builds them on the meta device.
COUNT_MODELS = {
    "ViT-B/16": (
        ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16),
        lambda config: ViTModel(config, add_pooling_layer=False),
    ),
    "ViT-S/14": (
        ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, patch_size=14),
        lambda config: ViTModel(config, add_pooling_layer=False),
    ),
    "SmolLM2-135M": (
        LlamaConfig(
            hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
            intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
        ),
        LlamaForCausalLM,
    ),
    "LLaMA-7B": (
        LlamaConfig(
            hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
            intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False,
        ),
        LlamaForCausalLM,
    ),
}  # fmt: skip


def variant_fields(variant: str, rank: int) -> dict:
    """`ToastConfig` fields of a variant; TOAST-Lite also trains a low-rank channel selection, as the reference's."""
    lite = {"lite_rank": rank, "channel_selection": "low_rank", "channel_rank": rank}
    return {"full": {}, "low-rank": {"feedback_rank": rank}, "lite": lite}[variant]


def count_variants(ranks: tuple[int, ...]) -> dict[str, dict]:
    """Trainable TOAST parameters (prompt included, task head excluded) per variant, counted on meta-device models and
    checked against the formulas, with d the hidden size and L the number of blocks (all blocks steered):

    - full: `2 d^2 L + d` (A_l, C_l, prompt)
    - readout only (`train_down=False`): `d^2 L + d`
    - low rank r (`feedback_rank=r`): `4 r d L + d`
    - TOAST-Lite r (`lite_rank=r`, low-rank channel selection of rank r): `4 r d L + 2 r d + d` trainable, on top of
      `2 d^2 L` frozen calibrated or pre-tuned values.
    """
    formulas = {
        "full": ({}, lambda d, L: 2 * d * d * L + d),
        "readout only": ({"train_down": False}, lambda d, L: d * d * L + d),
    }
    for r in ranks:
        formulas[f"low-rank r={r}"] = (variant_fields("low-rank", r), lambda d, L, r=r: 4 * r * d * L + d)
        formulas[f"lite r={r}"] = (variant_fields("lite", r), lambda d, L, r=r: 4 * r * d * L + 2 * r * d + d)
    table = {}
    for name, (config, make_model) in COUNT_MODELS.items():
        d, L = config.hidden_size, config.num_hidden_layers
        with torch.device("meta"):
            backbone = sum(p.numel() for p in make_model(config).parameters())
        row = {"d": d, "L": L, "backbone": backbone, "variants": {}}
        for variant, (fields, formula) in formulas.items():
            with torch.device("meta"):
                model = get_peft_model(make_model(config), ToastConfig(**fields))
            trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "toast_" in n)
            if trainable != formula(d, L):
                raise AssertionError(f"{name}, {variant}: {trainable} trainable parameters, formula {formula(d, L)}.")
            row["variants"][variant] = {"trainable": trainable, "percent_of_backbone": 100 * trainable / backbone}
        table[name] = row
    return table


# ------------------------------------------------------------------------------------------------- experiments


@dataclass
class FeatureSplit:
    """A `_data.Split` whose batches also carry TOAST's pass-1 feature (`toast_features`), computed once.

    Texts are padded on the right per batch; the feature of a padding position is set to zero, which only changes the
    signals of padding positions (causal attention: no real token reads them)."""

    split: _data.Split
    features: list[torch.Tensor]  # per example, (N_i, d) over its real tokens

    def __len__(self) -> int:
        return len(self.split)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        batch = self.split.batch(indices)
        rows = [self.features[i] for i in torch.as_tensor(indices).tolist()]
        width = max(row.shape[0] for row in rows)
        features = torch.zeros(len(rows), width, rows[0].shape[1])  # (B, N, d)
        for i, row in enumerate(rows):
            features[i, : row.shape[0]] = row
        batch["toast_features"] = features
        return batch


@torch.no_grad()
def with_pass1_features(model: nn.Module, split: _data.Split) -> FeatureSplit:
    tuner = model.base_model
    no_cache = {"use_cache": False} if tuner.architecture.causal else {}
    features = []
    for start in tqdm(range(0, len(split), BATCH_SIZE_NO_GRAD), desc="pass-1 features", leave=False):
        batch = split.batch(range(start, min(start + BATCH_SIZE_NO_GRAD, len(split))))
        batch.pop("labels")
        feature = tuner.run_pass1(tuner.model, (), {**batch, **no_cache})  # (B, N, d)
        lengths = (
            batch["attention_mask"].sum(-1).tolist()
            if "attention_mask" in batch
            else [feature.shape[1]] * len(feature)
        )
        features += [row[:length] for row, length in zip(feature, lengths)]
    return FeatureSplit(split, features)


def unlabelled_batches(split: _data.Split, count: int | None = None, *, lm_labels: bool = False) -> list[dict]:
    """The inputs of `split` (its first `count` examples) in batches, without the task labels; `labels` are the input
    ids (padding -100) when a causal LM is pre-tuned on its LM loss."""
    count = len(split) if count is None else min(count, len(split))
    batches = []
    for start in range(0, count, BATCH_SIZE_NO_GRAD):
        batch = split.batch(range(start, min(start + BATCH_SIZE_NO_GRAD, count)))
        del batch["labels"]
        if lm_labels:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        batches.append(batch)
    return batches


def prepare_initialisations(task: _data.Task, args, workdir: Path) -> tuple[dict, dict]:
    """Calibrate, and pre-tune by SGD given the calibration's wall time, a full-rank and a low-rank adapter; save them.

    Returns `(folders, report)`: `folders[init, variant]` for init in ("calibrated", "pre-tuned") and variant in ("full",
    "low-rank"), and the timings and held-out reconstruction errors.
    """
    causal = task.name == "text"
    calibration = unlabelled_batches(task.splits["val"])
    held_out_batches = unlabelled_batches(task.splits["test"], HELD_OUT)
    weight = VARIATIONAL_LOSS_WEIGHT[task.name]
    folders, report, statistics_ = {}, {}, None
    for variant in ("full", "low-rank"):
        fields = variant_fields(variant, args.rank)
        model = get_peft_model(task.new_model(), ToastConfig(**fields))
        if statistics_ is None:  # the statistics depend only on the frozen model and the data: one pass for all
            held_out = collect_block_statistics(model, held_out_batches, progress=False)
            start, cpu = time.perf_counter(), time.process_time()
            statistics_ = collect_block_statistics(model, calibration, progress=True)
            pass_seconds, pass_cpu = time.perf_counter() - start, time.process_time() - cpu
        errors = {"identity (default)": reconstruction_error(model, statistics=held_out)}
        start = time.perf_counter()
        result = calibrate_feedback(model, statistics=statistics_, ridge=args.ridge, progress=False)
        seconds = pass_seconds + time.perf_counter() - start
        errors["calibrated"] = reconstruction_error(model, statistics=held_out)
        folders["calibrated", variant] = workdir / f"calibrated-{variant}"
        atomic_save_pretrained(model, folders["calibrated", variant])

        random_init = ToastConfig(down_init="reference", readout_init="reference", **fields)
        errors["random (reference init)"] = reconstruction_error(
            get_peft_model(task.new_model(), random_init), statistics=held_out
        )
        # SGD pre-tuning with the reference's objective (LM loss + 0.01 L_var for a causal LM, L_var for the ViT).
        source = _models.load_causal_lm(args.text_model, tiny=args.tiny) if causal else task.new_model()
        pretuned = get_peft_model(source, ToastConfig(variational_loss_weight=weight, **fields))
        pretuning = pretune_top_down(
            pretuned, unlabelled_batches(task.splits["val"], lm_labels=causal), max_seconds=seconds,
            learning_rate=args.pretune_lr,
        )  # fmt: skip
        errors["pre-tuned (SGD, same wall time)"] = reconstruction_error(pretuned, statistics=held_out)
        folders["pre-tuned", variant] = workdir / f"pretuned-{variant}"
        atomic_save_pretrained(pretuned, folders["pre-tuned", variant])
        if causal and variant == "full":
            # The LM loss dominates the reference objective for the maps' gradients; give SGD its best shot too.
            only_variational = get_peft_model(task.new_model(), ToastConfig(variational_loss_weight=1.0))
            pretune_top_down(only_variational, calibration, max_seconds=seconds, learning_rate=args.pretune_lr)
            errors["SGD on the variational loss alone, same wall time"] = reconstruction_error(
                only_variational, statistics=held_out
            )
        report[variant] = {
            "calibration_examples": len(task.splits["val"]),
            "calibration_tokens": result.num_tokens,
            "calibration_seconds": seconds,
            "calibration_pass_cpu_seconds": pass_cpu,
            "calibration_set_loss": {"identity": result.loss_before, "calibrated": result.loss_after},
            "pretuning_steps": pretuning.steps,
            "pretuning_seconds": pretuning.seconds,
            "held_out_reconstruction_error": errors,
        }
    return folders, report


def downstream_model(task: _data.Task, init: str, variant: str, folders: dict, rank: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the head (and random inits) start from this seed
    base = task.new_model()
    fields = variant_fields(variant, rank)
    if init == "random":
        return get_peft_model(base, ToastConfig(down_init="reference", readout_init="reference", **fields))
    if init == "zero readout":
        return get_peft_model(base, ToastConfig(**fields))
    # TOAST-Lite starts from the full-rank folder: its maps become the frozen weights, the deltas start at zero.
    folder = folders[init, "low-rank" if variant == "low-rank" else "full"]
    return load_initialisation(base, folder, **(fields if variant == "lite" else {}))


def learning_rate(variant: str, task: str) -> float:
    """The downstream learning rate of `variant` on `task` (`LEARNING_RATES` holds one value, or one per task)."""
    rate = LEARNING_RATES[variant]
    return rate[task] if isinstance(rate, dict) else rate


def run_task(task: _data.Task, args, settings: dict, seeds: tuple[int, ...]) -> dict:
    print(f"\n== {task.description}: {task.model_name}")
    machine = common.machine_info()  # the load average when this task starts
    with tempfile.TemporaryDirectory() as workdir:
        folders, report = prepare_initialisations(task, args, Path(workdir))
        probe = get_peft_model(task.new_model(), ToastConfig())
        train, test = (with_pass1_features(probe, task.splits[name]) for name in ("train", "test"))
        del probe
        runs = {}
        combinations = [(init, variant, seed) for init in INITS for variant in VARIANTS for seed in seeds]
        for init, variant, seed in tqdm(combinations, desc=f"{task.name} downstream runs"):
            model = downstream_model(task, init, variant, folders, args.rank, seed)
            start = time.perf_counter()
            _training.train(
                model, train, steps=settings["steps"], batch_size=settings["batch_size"], lr=learning_rate(variant, task.name),
                head_lr=HEAD_LR[task.name], seed=seed, desc=f"{init} / {variant} / seed {seed}",
            )  # fmt: skip
            runs.setdefault(f"{init} / {variant}", []).append(
                {
                    "seed": seed,
                    "test_accuracy": _training.accuracy(model, test),
                    "train_seconds": time.perf_counter() - start,
                    "trainable_toast_params": sum(
                        p.numel() for n, p in model.named_parameters() if p.requires_grad and "toast_" in n
                    ),
                }
            )
    labels = task.splits["test"].labels
    downstream = {
        key: {
            "accuracy_mean": statistics.mean(run["test_accuracy"] for run in results),
            "accuracy_std": statistics.stdev(run["test_accuracy"] for run in results) if len(results) > 1 else 0.0,
            "trainable_toast_params": results[0]["trainable_toast_params"],
            "train_seconds_mean": statistics.mean(run["train_seconds"] for run in results),
        }
        for key, results in runs.items()
    }
    return {
        "machine": machine,
        "description": task.description,
        "model": task.model_name,
        "settings": settings,
        "learning_rates": {variant: learning_rate(variant, task.name) for variant in VARIANTS},
        "head_lr": HEAD_LR[task.name],
        "majority_class_accuracy": labels.bincount().max().item() / len(labels),
        "initialisation": report,
        "downstream": downstream,
        "runs": runs,
    }


# ------------------------------------------------------------------------------------------------------ report


def parameter_table(counts: dict) -> str:
    variants = list(next(iter(counts.values()))["variants"])
    rows = []
    for name, row in counts.items():
        cells = [
            f"{_results.format_count(v['trainable'])} ({v['percent_of_backbone']:.2f}%)"
            + (" ✓" if v["percent_of_backbone"] <= 1 else "")
            for v in row["variants"].values()
        ]
        rows.append([f"{name} (d={row['d']}, L={row['L']})", _results.format_count(row["backbone"]), *cells])
    return _results.markdown_table(["model", "backbone", *variants], rows)


def reconstruction_table(task: dict) -> str:
    rows = []
    for variant, report in task["initialisation"].items():
        for init, error in report["held_out_reconstruction_error"].items():
            rows.append([variant, init, f"{error:.4g}"])
    return _results.markdown_table(["feedback", "down-maps", "held-out variational loss"], rows)


def timing_lines(task: dict) -> str:
    full = task["initialisation"]["full"]
    lines = [
        f"- calibration: {full['calibration_examples']} examples ({full['calibration_tokens']:,} tokens), "
        f"{full['calibration_seconds']:.1f} s wall (the pass took {full['calibration_pass_cpu_seconds']:.1f} s of CPU "
        f"time); identity loss on the calibration set {full['calibration_set_loss']['identity']:.4g} -> "
        f"{full['calibration_set_loss']['calibrated']:.4g} calibrated"
    ]
    for variant, report in task["initialisation"].items():
        lines.append(
            f"- SGD pre-tuning ({variant}): {report['pretuning_steps']} steps in {report['pretuning_seconds']:.1f} s"
        )
    return "\n".join(lines)


def accuracy_table(task: dict) -> str:
    rows = []
    for init in INITS:
        cells = []
        for variant in VARIANTS:
            row = task["downstream"][f"{init} / {variant}"]
            cells.append(f"{100 * row['accuracy_mean']:.1f} ± {100 * row['accuracy_std']:.1f}")
        rows.append([init, *cells])
    params = [
        _results.format_count(task["downstream"][f"zero readout / {v}"]["trainable_toast_params"]) for v in VARIANTS
    ]
    rows.append(["trainable TOAST parameters", *params])
    return _results.markdown_table(["initialisation", *(f"{v} (acc. %)" for v in VARIANTS)], rows)


def report_markdown(results: dict) -> dict[str, str]:
    sections = {"init-params": parameter_table(results["parameter_counts"])}
    for name, task in results["tasks"].items():
        settings, machine = task["settings"], task.get("machine", results["machine"])
        caption = (
            f"{task['description']} on {task['model']}: {settings['sizes']['train']} training examples, "
            f"{settings['steps']} steps of batch {settings['batch_size']}, {settings['sizes']['test']} test examples "
            f"(majority class {100 * task['majority_class_accuracy']:.1f}%), seeds {results['seeds']}; "
            f"{machine['cpu_count']} CPU cores ({machine.get('cpu', 'unknown CPU')}), load average "
            f"{machine['load_average'][0]:.1f} at the start, fp32."
        )
        if "learning_rates" in task:  # recorded since the per-task rates (the first full run used 3e-4 for full rank)
            rates = ", ".join(f"{variant} {rate:g}" for variant, rate in task["learning_rates"].items())
            caption += f" Learning rates: {rates}; head {task['head_lr']:g}."
        sections[f"init-{name}"] = "\n\n".join(
            [caption, timing_lines(task), reconstruction_table(task), accuracy_table(task)]
        )
    return sections


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    common.add_common_arguments(parser)
    parser.add_argument("--tasks", nargs="+", default=["vision", "text"], choices=["vision", "text"])
    parser.add_argument(
        "--image-size", type=int, default=112, help="Image side in px, a multiple of 14 (default 112)."
    )
    parser.add_argument("--steps", type=int, help="Training steps of every downstream run (default: the protocol's).")
    parser.add_argument("--train-size", type=int, help="Labelled training examples (default: the protocol's).")
    parser.add_argument("--rank", type=int, default=8, help="Rank of low-rank feedback and TOAST-Lite (default 8).")
    parser.add_argument("--ridge", type=float, default=1e-3, help="Relative ridge of the calibration (default 1e-3).")
    parser.add_argument("--pretune-lr", type=float, default=1e-3, help="AdamW learning rate of SGD pre-tuning.")
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        help="Regenerate the tables of docs/initialisation.md from these results files (their tasks are merged) only.",
    )
    args = parser.parse_args(argv)
    if args.from_json:
        runs = [json.loads(path.read_text()) for path in args.from_json]
        results = {**runs[0], "tasks": {name: task for run in runs for name, task in run["tasks"].items()}}
        for name, text in report_markdown(results).items():
            _results.update_docs_section(name, text, path=DOCS)
        return results
    common.setup(args)
    protocol = PROTOCOLS["tiny" if args.tiny else "quick" if args.quick else "full"]
    start = time.perf_counter()
    results = {
        "machine": common.machine_info(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "arguments": {key: str(value) for key, value in vars(args).items()},
        "seeds": list(protocol["seeds"]),
        "parameter_counts": count_variants(ranks=tuple(sorted({4, args.rank}))),
        "tasks": {},
    }
    for name in args.tasks:
        settings = json.loads(json.dumps(protocol[name]))  # a deep copy
        if args.steps is not None:
            settings["steps"] = args.steps
        if args.train_size is not None:
            settings["sizes"]["train"] = args.train_size
        if name == "vision":
            task = _data.vision_task(
                args.vision_model, sizes=settings["sizes"], image_size=args.image_size, tiny=args.tiny
            )
        else:
            task = _data.text_task(args.text_model, sizes=settings["sizes"], tiny=args.tiny)
        results["tasks"][name] = run_task(task, args, settings, protocol["seeds"])
        results["wall_seconds"] = time.perf_counter() - start
        results["load_average_at_end"] = os.getloadavg()
        if args.output:  # after every task, so that a long run keeps what it has measured
            _results.write_json(args.output, results)
    sections = report_markdown(results)
    for text in sections.values():
        print(f"\n{text}")
    if common.updates_docs(args):
        for name, text in sections.items():
            _results.update_docs_section(name, text, path=DOCS)
    print(f"\ntotal {results['wall_seconds'] / 60:.1f} min")
    return results


if __name__ == "__main__":
    main()
