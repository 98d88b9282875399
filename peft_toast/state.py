"""Per-call state: the top-down signals belong to one forward call, never to the model.

The signals of a call live in a `ContextVar`: every thread (and every asyncio task) sees only its own, nested calls
restore the outer call's signals when they return, and a call that raises cannot leave its signals behind for the
next one. Gradient checkpointing recomputes blocks later, possibly on the autograd engine's own threads (CUDA), which
do not see the forward thread's context; `checkpoint_with_signals` hands the recomputation the exact signals the
block saw through `torch.utils.checkpoint`'s `context_fn`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class CallState:
    """What one TOAST forward call knows.

    `pass1=True` while pass 1 runs: no signal is added and the feature module hands its output over in `feature`.
    In pass 2, `signals` maps each `ToastLayer` to its `(B, N, d)` top-down signal `t_l`.
    """

    owner: Any = None
    pass1: bool = False
    feature: Optional[torch.Tensor] = None
    signals: Optional[dict] = None
    gates: Optional[torch.Tensor] = None  # (B, N) token-selection gates of this call
    pass1_cache: Any = None
    block_io: Optional[list] = None  # (block index, input, output) of pass 2, when the variational loss needs them
    # Blocks below the lowest steered one see no signal, so pass 2 takes them from pass 1: in pass 1, `record_block` is
    # the block whose output to keep (`shared_output`); in pass 2, blocks `0 .. shared_blocks - 1` return
    # `shared_output` without running (`passes.shared_block_forward`).
    record_block: Optional[int] = None
    shared_blocks: int = 0
    shared_output: Any = None
    call: Any = None  # the running `passes.steered_call` generator, between the model's pre- and post-hook
    token: Optional[Token] = field(default=None, repr=False)


_STATE: ContextVar[Optional[CallState]] = ContextVar("peft_toast_call_state", default=None)


class Pass1Done(Exception):
    """Raised by the feature hook to stop pass 1 once the feature exists (the head and final layers are not needed)."""


def current_state() -> Optional[CallState]:
    return _STATE.get()


def current_signal(layer) -> Optional[torch.Tensor]:
    state = _STATE.get()
    if state is None or state.signals is None:
        return None
    return state.signals.get(layer)


def push_state(state: CallState) -> CallState:
    state.token = _STATE.set(state)
    return state


def pop_state() -> Optional[CallState]:
    """Undo the latest `push_state` of this context and return its state."""
    state = _STATE.get()
    if state is not None and state.token is not None:
        token, state.token = state.token, None
        _STATE.reset(token)
    return state


@contextlib.contextmanager
def use_state(state: Optional[CallState]):
    token = _STATE.set(state)
    try:
        yield state
    finally:
        _STATE.reset(token)


def checkpoint_with_signals(checkpoint_fn: Callable) -> Callable:
    """Wrap a block's gradient-checkpointing function so that recomputation sees the signals of the forward call."""
    if getattr(checkpoint_fn, "_toast_wrapped", False):
        return checkpoint_fn

    @functools.wraps(checkpoint_fn)
    def checkpoint(function, *args, **kwargs):
        state = _STATE.get()
        if state is None or not state.signals:
            return checkpoint_fn(function, *args, **kwargs)
        keywords = {**getattr(checkpoint_fn, "keywords", {}), **kwargs}
        if keywords.get("use_reentrant") is None:
            # Unset (e.g. `prepare_model_for_kbit_training`'s default `gradient_checkpointing_kwargs={}`): torch would
            # pick the reentrant variant, which cannot route the signal's gradient; the non-reentrant one gives the
            # same gradients (transformers' own default).
            kwargs["use_reentrant"] = False
        elif keywords["use_reentrant"]:
            raise ValueError(
                "TOAST does not support reentrant gradient checkpointing: the top-down signal is not an explicit input "
                "of the checkpointed block, so reentrant recomputation cannot route its gradient. Use "
                "`model.activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': False})` "
                "(the transformers default), which gives the same gradients."
            )
        if "context_fn" in keywords:
            raise ValueError(
                "TOAST needs `context_fn` of torch.utils.checkpoint to restore the top-down signals during "
                "recomputation; remove `context_fn` from `activation_checkpointing_kwargs`."
            )
        return checkpoint_fn(
            function, *args, context_fn=lambda: (contextlib.nullcontext(), use_state(state)), **kwargs
        )

    checkpoint._toast_wrapped = True
    return checkpoint
