"""Per-call state: the top-down signals belong to one forward call, never to the model.

The state of the running call is a per-thread attribute (`threading.local`): every thread sees only its own, a call
makes its state current in the model's forward pre-hook and its post-hook (always called, also when the call raises)
puts back the state that was current before, so nested calls restore the outer call's signals when they return and a
call that raises cannot leave its signals behind for the next one. A forward call is synchronous from its pre-hook to
its post-hook, so asyncio tasks, which share a thread, never see each other's state either. Gradient checkpointing
recomputes blocks later, possibly on the autograd engine's own threads (CUDA), which do not see the forward thread's
state; `checkpoint_with_signals` hands the recomputation the exact signals the block saw through
`torch.utils.checkpoint`'s `context_fn`.

Why not a `ContextVar`: `torch.compile` cannot trace `ContextVar.get`, and a graph break in every block's forward made
dynamo compile every block on its own, once per block index, up to its recompile limit. It traces an attribute of a
`threading.local` (its guards read the attribute in the calling thread), so a compiled model reads the state inside its
graphs (`docs/training.md`, "torch.compile").
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable
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
    # While pushed (`push_state`): `(the state that was current before,)`, put back by `pop_state`; None otherwise.
    token: Optional[tuple] = field(default=None, repr=False)


class _Current(threading.local):
    """The running call's state, one per thread (the class attribute is every new thread's start: no call)."""

    state: Optional[CallState] = None


_CURRENT = _Current()


class Pass1Done(Exception):
    """Raised by the feature hook to stop pass 1 once the feature exists (the head and final layers are not needed)."""


def current_state() -> Optional[CallState]:
    return _CURRENT.state


def current_signal(layer) -> Optional[torch.Tensor]:
    state = _CURRENT.state
    if state is None or state.signals is None:
        return None
    return state.signals.get(layer)


def push_state(state: CallState) -> CallState:
    """Make `state` this thread's current state until `pop_state`."""
    state.token = (_CURRENT.state,)
    _CURRENT.state = state
    return state


def pop_state() -> Optional[CallState]:
    """Undo the latest `push_state` of this thread and return its state."""
    state = _CURRENT.state
    if state is not None and state.token is not None:
        (previous,) = state.token
        state.token = None
        _CURRENT.state = previous
    return state


@contextlib.contextmanager
def use_state(state: Optional[CallState]):
    """Make `state` this thread's current state inside the `with` block."""
    previous = _CURRENT.state
    _CURRENT.state = state
    try:
        yield state
    finally:
        _CURRENT.state = previous


def checkpoint_with_signals(checkpoint_fn: Callable) -> Callable:
    """Wrap a block's gradient-checkpointing function so that recomputation sees the signals of the forward call."""
    if getattr(checkpoint_fn, "_toast_wrapped", False):
        return checkpoint_fn

    @functools.wraps(checkpoint_fn)
    def checkpoint(function, *args, **kwargs):
        state = _CURRENT.state
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
