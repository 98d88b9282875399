"""Parameter groups for training a TOAST adapter: the head, the feedback maps and the prompt, each with its own
learning rate, in the manner of PEFT's `create_loraplus_optimizer`.

One learning rate serves every part when the head starts from a linear probe (see docs/training.md). When the head is
new and random it needs a larger step than the feedback maps (whose every entry multiplies a whole feature), and the
prompt turns by roughly the learning rate per Adam step, so it may need a larger one too:

    optimizer = create_toast_optimizer(model, torch.optim.AdamW, lr=1e-4, head_lr=1e-2)
    trainer = Trainer(model=model, args=args, train_dataset=train, optimizers=(optimizer, None))
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["create_toast_optimizer", "toast_parameter_groups"]


def toast_parameter_groups(
    model: nn.Module,
    lr: float,
    *,
    head_lr: Optional[float] = None,
    prompt_lr: Optional[float] = None,
    weight_decay: float = 0.0,
) -> list[dict]:
    """The trainable parameters of `model` (a `PeftModel` with a TOAST adapter) in up to four groups, each a dict for
    a torch optimizer with a `name`:

    - `"top_down"`: feedback maps (down-maps, readouts, their low-rank or TOAST-Lite factors) and channel selection, at
      `lr`, with `weight_decay`;
    - `"prompt"`: the token-selection prompt, at `prompt_lr` (default `lr`), with `weight_decay` (the reference decays
      it too);
    - `"head"` and `"head_no_decay"`: everything else that trains, i.e. the task head (`modules_to_save`), at `head_lr`
      (default `lr`); its biases in the second group, without weight decay.

    Empty groups are left out. Every trainable parameter is in exactly one group.
    """
    groups: dict[str, list] = {"top_down": [], "prompt": [], "head": [], "head_no_decay": []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if "toast_prompt" in name:
            groups["prompt"].append(parameter)
        elif "toast_" in name:
            groups["top_down"].append(parameter)
        elif name.endswith("bias"):
            groups["head_no_decay"].append(parameter)
        else:
            groups["head"].append(parameter)
    head_lr = lr if head_lr is None else head_lr
    settings = {
        "top_down": (lr, weight_decay),
        "prompt": (lr if prompt_lr is None else prompt_lr, weight_decay),
        "head": (head_lr, weight_decay),
        "head_no_decay": (head_lr, 0.0),
    }
    return [
        {"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
        for name, params in groups.items()
        if params
    ]


def create_toast_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    *,
    lr: float,
    head_lr: Optional[float] = None,
    prompt_lr: Optional[float] = None,
    weight_decay: float = 0.0,
    **optimizer_kwargs,
) -> torch.optim.Optimizer:
    """An `optimizer_cls` over `toast_parameter_groups(model, ...)`; pass it to `Trainer(optimizers=(optimizer, None))`
    or to an Accelerate loop. `optimizer_kwargs` (e.g. `betas`, `momentum`) go to the optimizer."""
    if not lr > 0:
        raise ValueError(f"`lr` must be a positive learning rate, got {lr!r}.")
    for label, value in (("head_lr", head_lr), ("prompt_lr", prompt_lr)):
        if value is not None and not value > 0:
            raise ValueError(f"`{label}` must be None (use `lr`) or a positive learning rate, got {value!r}.")
    groups = toast_parameter_groups(model, lr, head_lr=head_lr, prompt_lr=prompt_lr, weight_decay=weight_decay)
    if not groups:
        raise ValueError("The model has no trainable parameters; pass a PeftModel whose TOAST adapter is trainable.")
    return optimizer_cls(groups, lr=lr, **optimizer_kwargs)
