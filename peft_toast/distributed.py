"""Sharding the frozen base model with FSDP2 (`torch.distributed.fsdp.fully_shard`) under a TOAST adapter.

The top-down path runs between the two passes, outside every block's forward, and reads the down-maps and readouts of
all steered blocks at once. FSDP2 only gathers a block's parameters while that block runs, so sharded feedback maps
would meet unsharded activations there. The adapter is therefore kept out of the sharding (`ignored_params`, torch >=
2.7) and replicated on every process, as DDP would hold it, and its gradients are averaged over the processes when
they are accumulated; the frozen base model, almost all of the memory, is sharded.

    model = get_peft_model(base, ToastConfig())
    fully_shard_frozen_base(model)  # after torch.distributed.init_process_group, before the optimizer

Under Accelerate (`fsdp_version: 2`), keep the adapter out of the sharding with
`fsdp_ignored_modules: ACCELERATE_IGNORED_MODULES` and call `replicate_adapter_gradients(model)` after `prepare`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "ACCELERATE_IGNORED_MODULES",
    "adapter_parameters",
    "fully_shard_frozen_base",
    "replicate_adapter_gradients",
]

# Accelerate's `fsdp_ignored_modules` (a regular expression matched in full against module names): the wrapped value
# projections' feedback maps, the prompts and channel selections (`model.toast`), and a trained copy of the head.
ACCELERATE_IGNORED_MODULES = r"(.*\.)?(toast|toast_down|toast_readout|modules_to_save)"
_HOOKED = "_toast_gradient_average"


_SHARDED_ADAPTER = (
    "TOAST's top-down path reads every block's feedback maps outside the blocks, so the adapter must stay unsharded. "
    "Shard with `peft_toast.distributed.fully_shard_frozen_base(model)`, or under Accelerate set "
    "`fsdp_ignored_modules` to `peft_toast.distributed.ACCELERATE_IGNORED_MODULES` and call "
    "`peft_toast.distributed.replicate_adapter_gradients(model)` after `prepare`."
)


def check_unsharded(modules) -> None:
    """Raise if a parameter of these modules is sharded by FSDP2 (a DTensor); only looks once torch.distributed is up."""
    if torch.compiler.is_compiling() or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    from torch.distributed.tensor import DTensor

    for module in modules:
        parameter = next(module.parameters(), None)
        if isinstance(parameter, DTensor):
            raise ValueError(f"The TOAST adapter is sharded by FSDP (its parameters are DTensors). {_SHARDED_ADAPTER}")


def adapter_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The parameters that train (the adapter and the head): the ones FSDP must not shard."""
    return {parameter for parameter in model.parameters() if parameter.requires_grad}


def replicate_adapter_gradients(model: nn.Module, group=None) -> int:
    """Average the gradient of every trainable, unsharded parameter of `model` over the processes of `group` as soon as
    a backward pass has accumulated it (`register_post_accumulate_grad_hook`), as DDP does for its parameters.

    For a model whose base FSDP2 shards and whose adapter it ignores; calling it again adds nothing. With gradient
    accumulation every micro-batch's backward averages the running sum, which is exact: what was already averaged is
    the same on every process. Returns the number of parameters it now covers.
    """
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise RuntimeError(
            "`replicate_adapter_gradients` averages gradients over processes, but torch.distributed is not "
            "initialised. Call it after `torch.distributed.init_process_group(...)` (or `accelerator.prepare`)."
        )
    from torch.distributed.tensor import DTensor

    world = torch.distributed.get_world_size(group)

    def average(parameter: torch.Tensor) -> None:
        torch.distributed.all_reduce(parameter.grad, group=group)
        parameter.grad.div_(world)

    covered = 0
    for parameter in adapter_parameters(model):
        if isinstance(parameter, DTensor):
            raise ValueError(f"A trainable parameter of this model is sharded by FSDP (a DTensor). {_SHARDED_ADAPTER}")
        if not getattr(parameter, _HOOKED, False):
            parameter.register_post_accumulate_grad_hook(average)
            setattr(parameter, _HOOKED, True)
        covered += 1
    return covered


def fully_shard_frozen_base(model: nn.Module, **fully_shard_kwargs) -> nn.Module:
    """Shard the frozen base model of a TOAST `PeftModel` with FSDP2, block by block and then the rest, keeping the
    adapter replicated (`replicate_adapter_gradients`). Returns `model` (sharded in place).

    Call it after `torch.distributed.init_process_group` and before creating the optimizer; `fully_shard_kwargs` go to
    every `fully_shard` call (e.g. `mesh`, `reshard_after_forward`, `mp_policy`).
    """
    from torch.distributed.fsdp import fully_shard

    tuner = getattr(model, "base_model", None)
    architecture = getattr(tuner, "architecture", None)
    if architecture is None:
        raise TypeError(
            f"`fully_shard_frozen_base` takes a PeftModel with a TOAST adapter, got {type(model).__name__}. "
            f"Create it with `get_peft_model(base, ToastConfig())` first."
        )
    # The trainable parameters, and every TOAST tensor, frozen ones too (a decoder's frozen down-maps, TOAST-Lite's
    # frozen maps): the top-down path reads them outside the blocks, where a shard would meet whole activations.
    toast = {parameter for name, parameter in model.named_parameters() if "toast_" in name}
    ignored = adapter_parameters(model) | toast | set(fully_shard_kwargs.pop("ignored_params", ()))
    for block in architecture.blocks:
        fully_shard(block, ignored_params=ignored, **fully_shard_kwargs)
    fully_shard(tuner.model, ignored_params=ignored, **fully_shard_kwargs)
    replicate_adapter_gradients(model)
    return model
