"""Exploration: how open TOAST's token gates are at the start, and what opening them does at a small budget.

Runs full-rank TOAST on the quality protocol of `benchmarks/quality.py` (DINOv2-S + Fashion-MNIST 112 px: 1,000 train,
50 steps of 16; SmolLM2 + tweets: 600 train, 30 steps of 8; the head at the linear probe's best rate), with TOAST's
pass 1 computed once per example and reused (`toast_features=`), for two prompt initialisations:

- `default`: the library's random normal prompt;
- `mean`: the prompt set to the mean pass-1 feature of the training set, so that the gates `clamp(cos(x, p), 0, 1)`
  start open (the features share a dominant direction).

For each run it records the mean gate and the fraction of tokens gated to exactly 0 at the start, validation and test
accuracy, and the final training loss. Results append to a JSON list.

    python benchmarks/prompt_init.py --task vision --variants default mean --lrs 1e-3 --output prompt_init.json
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import _data  # these import common first, which must come before torch (see below)
import _results
import _training
import common  # noqa: F401, I001  (first: it sets the OpenMP wait policy before torch loads)
import initialisation
import torch
from peft import get_peft_model

from peft_toast import ToastConfig
from peft_toast.cli import script_parser
from peft_toast.topdown import token_selection

SETTINGS = {
    "vision": {"sizes": {"train": 1000, "val": 200, "test": 500}, "steps": 50, "batch_size": 16, "head_lr": 1e-2},
    "text": {"sizes": {"train": 600, "val": 150, "test": 400}, "steps": 30, "batch_size": 8, "head_lr": 3e-2},
}
GATE_TOKENS = 5000  # training tokens whose gates are summarised


def main(argv=None) -> list[dict]:
    parser = script_parser(__doc__)
    parser.add_argument("--task", choices=sorted(SETTINGS), default="vision")
    parser.add_argument("--variants", nargs="+", choices=["default", "mean"], default=["default", "mean"])
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, help="Training steps (default: the quality protocol's).")
    parser.add_argument("--tiny", action="store_true", help="Tiny random models and synthetic data (seconds).")
    parser.add_argument("--output", type=Path, required=True, help="JSON list of runs (appended to if it exists).")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = {**SETTINGS[args.task], **({"steps": args.steps} if args.steps else {})}
    if args.task == "vision":
        task = _data.vision_task(sizes=settings["sizes"], tiny=args.tiny)
    else:
        task = _data.text_task(sizes=settings["sizes"], tiny=args.tiny)
    reader = get_peft_model(task.new_model(), ToastConfig())
    splits = {name: initialisation.with_pass1_features(reader, split) for name, split in task.splits.items()}
    tokens = torch.cat(splits["train"].features)  # (tokens, d): real tokens only
    mean = tokens.mean(0)
    print(f"pass-1 feature: mean token norm {tokens.norm(dim=-1).mean():.1f}, norm of the mean {mean.norm():.1f}")
    results = json.loads(args.output.read_text()) if args.output.exists() else []
    for variant in args.variants:
        for lr in args.lrs:
            for seed in args.seeds:
                torch.manual_seed(seed)
                model = get_peft_model(task.new_model(), ToastConfig())
                prompt = model.base_model.toast_prompt["default"]
                if variant == "mean":
                    with torch.no_grad():
                        prompt.copy_(mean)
                gates, _ = token_selection(tokens[:GATE_TOKENS].unsqueeze(0), prompt.detach())
                start = time.perf_counter()
                losses = _training.train(
                    model, splits["train"], steps=settings["steps"], batch_size=settings["batch_size"], lr=lr,
                    head_lr=settings["head_lr"], seed=seed,
                )  # fmt: skip
                run = {
                    "task": args.task,
                    "variant": variant,
                    "lr": lr,
                    "seed": seed,
                    "gate_mean": gates.mean().item(),
                    "gate_zero_fraction": (gates == 0).float().mean().item(),
                    "val": _training.accuracy(model, splits["val"]),
                    "test": _training.accuracy(model, splits["test"]),
                    "final_loss": statistics.mean(losses[-5:]),
                    "train_seconds": time.perf_counter() - start,
                }
                print(json.dumps(run), flush=True)
                results.append(run)
                _results.write_json(args.output, results)
    return results


if __name__ == "__main__":
    main()
