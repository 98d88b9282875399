"""Pre-tuning the top-down path by gradient descent, as the reference implementation initialises it.

The reference trains the whole top-down module (down-maps, readouts, prompt) on generic data before any transfer, with
the task loss plus the variational loss `sum_l MSE(A_l h_l_out, h_l_in)` (weight `variational_loss_weight`: 0.01
for LLaMA on OpenWebText, 0.1 for vision). `ToastModel` folds the weighted variational loss into `output.loss` in
training, so pre-tuning is ordinary training: this module is a small loop (with a step *and* a wall-time budget, so
that it can be compared with `calibrate_feedback` at equal time), and `transformers.Trainer` works just as well.

The objective depends on the model:

- causal LMs: next-token loss on the generic text (batches carry `labels`) + the weighted variational loss, as in the
  reference; down-maps, readouts and prompt all train;
- encoders on a labelled source task (`--classes`): the cross-entropy of pass 2 on a source head plus the weighted
  variational loss (0.1), as AbSViT trains its feedback path (AbSViT also adds pass 1's cross-entropy, which only
  trains the head on the frozen features: the head is dropped at transfer, so we leave it out). Down-maps, readouts
  and prompt all train, so the transfer starts with an open, non-zero top-down signal and a prompt that selects
  something, which is what the reference's ImageNet pre-tuned checkpoints give;
- encoders without labels: the variational loss alone, the objective that defines the feedback path; only the
  down-maps receive gradients (readouts stay zero). This is SGD on exactly the problem that `calibrate_feedback`
  solves in closed form.

The command line `python -m peft_toast.pretune` (`peft_toast/pretune.py`) builds these objectives and saves the
adapter, recording what it was pre-tuned on (`ToastConfig.pretuned_on`, shown in its model card).
`load_initialisation(new_base_model, folder)` starts a transfer from it in one step: prompt, down-maps and readouts
kept, a fresh head for the new task, the variational loss off.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["PretuneResult", "pretune_top_down"]


@dataclass
class PretuneResult:
    """What `pretune_top_down` did: optimizer steps, wall time in seconds and the training loss of the first and last step."""

    steps: int
    seconds: float
    first_loss: float
    last_loss: float


def pretune_top_down(
    peft_model: nn.Module,
    batches: Iterable[dict[str, Any]],
    *,
    max_steps: Optional[int] = None,
    max_seconds: Optional[float] = None,
    learning_rate: float = 1e-3,
    progress: bool = True,
) -> PretuneResult:
    """Train the trainable parameters of `peft_model` (its active TOAST adapter) on `output.loss` with AdamW at a constant
    learning rate, cycling over `batches`, for `max_steps` steps or as many as fit in `max_seconds` seconds (it stops
    when one more step at the mean step time would overrun; at least one step runs), whichever is fewer.

    `output.loss` is the task loss (if the batches carry labels) plus `variational_loss_weight` times the variational
    loss, so the adapter's config must have `variational_loss_weight > 0` unless the batches have labels.
    """
    # A small loop rather than `transformers.Trainer` (which trains the same objective just as well, see
    # docs/initialisation.md): the wall-time budget (to compare with `calibrate_feedback` at equal time) is one line
    # here and a callback there, and a library function must not have Trainer's side effects: its constructor reseeds
    # the process's global random generators (`set_seed(args.seed)`), and it needs an output folder and moves the model
    # to its own device.
    if max_steps is None and max_seconds is None:
        raise ValueError("Give `pretune_top_down` a budget: `max_steps`, `max_seconds` or both.")
    parameters = [parameter for parameter in peft_model.parameters() if parameter.requires_grad]
    if not parameters:
        raise ValueError("The model has no trainable parameters; pass a PeftModel whose TOAST adapter is trainable.")
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    device = parameters[0].device
    was_training = peft_model.training
    peft_model.train()
    losses = []
    start = time.perf_counter()
    bar = tqdm(total=max_steps, desc="pre-tuning", unit="step", disable=not progress)
    try:
        for batch in itertools.cycle(batches):
            batch = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
            loss = peft_model(**batch).get("loss")
            if loss is None:
                raise ValueError(
                    "The model returned no loss: the batches have no labels and the adapter's "
                    "`variational_loss_weight` is 0. Set `variational_loss_weight` (e.g. 0.1) to pre-tune on the "
                    "variational loss, or add labels."
                )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
            elapsed = time.perf_counter() - start
            # Stop before a step would overrun the time budget (at the mean step time so far).
            if (max_steps is not None and len(losses) >= max_steps) or (
                max_seconds is not None and elapsed * (len(losses) + 1) / len(losses) > max_seconds
            ):
                break
    finally:
        bar.close()
        peft_model.train(was_training)
    return PretuneResult(len(losses), time.perf_counter() - start, losses[0], losses[-1])
