"""How the benchmarks train and evaluate: the linear probe (a model's head on its frozen head inputs), the seeded
batch order, the warm-up + cosine schedule, the training loop `train` (with its own learning rate for the task head)
and `accuracy`."""

from __future__ import annotations

import math
from typing import Optional

import common  # noqa: F401, I001  (first: it sets the OpenMP wait policy before torch loads)
import torch
from _data import Split
from _models import HEAD_NAMES
from torch import nn
from tqdm.auto import tqdm
from transformers.modeling_outputs import SequenceClassifierOutput

# ---------------------------------------------------------------------------------------------- linear probe


class LinearProbe(nn.Module):
    """A model's head alone, on cached head inputs (`Split.features`).

    Training it is exactly training the head of the frozen model (the backbone is deterministic: no dropout, no
    augmentation), without running the backbone at every step.
    """

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor, labels: Optional[torch.Tensor] = None) -> SequenceClassifierOutput:
        logits = self.head(features)  # (B, num_labels)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


# -------------------------------------------------------------------------------------------------- training


def batch_order(num_examples: int, steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Index batches for `steps` steps: a fresh seeded permutation every epoch, so every method sees the same data."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat(
        [
            torch.randperm(num_examples, generator=generator)
            for _ in range(math.ceil(steps * batch_size / num_examples))
        ]
    )
    return [order[step * batch_size : (step + 1) * batch_size] for step in range(steps)]


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup_fraction: float = 0.1):
    """Linear warm-up over the first `warmup_fraction` of the steps, then cosine decay to zero.

    Kept instead of `transformers.get_cosine_schedule_with_warmup`, which differs at every warm-up step (measured for
    1 to 400 steps; the cosine part is identical): it gives step s the factor s / warmup, so the first step runs at
    lr 0 (a one-step run does not train) and the peak comes a step later; here step s gets (s + 1) / warmup. Every
    result in docs/benchmarks.md and benchmarks/results/ was trained with this schedule, and sweeps are extended by
    new runs merged with earlier ones.
    """
    warmup = max(1, int(steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# The reference's vision recipe (`src/solver/optimizer.py`, `configs/base.yaml`): SGD with momentum 0.9 and weight
# decay 1e-4 for the head, the decoders and the prompt alike (it exempts only the head's bias from the decay).
SGD_SETTINGS = {"momentum": 0.9, "weight_decay": 1e-4}
OPTIMIZERS = {
    "adamw": lambda groups: torch.optim.AdamW(groups, weight_decay=0.0),
    "sgd": lambda groups: torch.optim.SGD(groups, **SGD_SETTINGS),
    # The top of the reference's weight-decay range (1e-4 ... 1e-2, chosen per dataset), same momentum.
    "sgd-wd1e-2": lambda groups: torch.optim.SGD(groups, **{**SGD_SETTINGS, "weight_decay": 1e-2}),
}


def is_head_parameter(name: str) -> bool:
    return any(f"{head}." in f".{name}" for head in HEAD_NAMES)


def train(
    model: nn.Module,
    split: Split,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    head_lr: Optional[float] = None,
    warmup_fraction: float = 0.1,
    optimizer: str = "adamw",
    desc: str = "training",
) -> list[float]:
    """AdamW (no weight decay), warm-up + cosine schedule, gradient clipping at 1.0; returns the training losses.

    `lr` applies to the method's own parameters and `head_lr` (default: `lr`) to the task head's; `warmup_fraction` is
    the share of the steps spent warming up. `optimizer="sgd"` replaces AdamW by the TOAST reference's optimizer
    (`SGD_SETTINGS`: momentum 0.9, weight decay 1e-4 on every trained tensor, the prompt included), same schedule and
    clipping; `optimizer="sgd-wd1e-2"` is the same with weight decay 1e-2, the top of the reference's range.

    A plain loop rather than `transformers.Trainer`, on purpose: every method of a comparison must see the same batches
    in the same order (`batch_order`, seeded per run) with the same schedule (`warmup_cosine`, see there), on splits
    that are tensors in memory (cached head inputs, cached pass-1 features) rather than `datasets`; Trainer would
    reseed the process at construction (`set_seed(args.seed)`), shuffle with its own sampler and bring its own
    schedule. The library's users train with Trainer or Accelerate (`examples/`, tested in `tests/test_trainer.py` and
    `tests/test_accelerate.py`); this loop only has to be identical for every method.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    parameters = [p for _, p in named]
    groups = [
        {"params": [p for name, p in named if not is_head_parameter(name)], "lr": lr},
        {"params": [p for name, p in named if is_head_parameter(name)], "lr": lr if head_lr is None else head_lr},
    ]
    groups = [group for group in groups if group["params"]]
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: expected one of {sorted(OPTIMIZERS)}.")
    step_rule = OPTIMIZERS[optimizer](groups)
    scheduler = warmup_cosine(step_rule, steps, warmup_fraction)
    model.train()
    losses = []
    with tqdm(batch_order(len(split), steps, batch_size, seed), desc=desc, leave=False) as progress:
        for indices in progress:
            loss = model(**split.batch(indices)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            step_rule.step()
            scheduler.step()
            step_rule.zero_grad(set_to_none=True)
            losses.append(loss.item())
            progress.set_postfix(loss=f"{loss.item():.3f}")
    if not all(math.isfinite(loss) for loss in losses):
        raise FloatingPointError(f"{desc}: the training loss became NaN/inf at lr={lr}; lower the learning rate.")
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, batch_size: int = 64) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(split), batch_size):
        batch = split.batch(range(start, min(start + batch_size, len(split))))
        labels = batch.pop("labels")
        correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    return correct / len(split)
