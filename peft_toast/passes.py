"""The TOAST runtime: what one steered forward call does, in order.

`steered_call` is the whole call, top to bottom: pass 1 → token and channel selection → feedback → pass 2 → loss. Pass 2
is the wrapped model's own forward (so `generate`, Trainer and every caller reach TOAST through the ordinary model
call); the two hooks that `ToastModel` registers on the wrapped model only drive `steered_call`: the pre-hook makes the
call's state current and runs the call up to its `yield`, the wrapped forward runs (pass 2; each `ToastLayer` reads its
signal with `state.current_signal`), and the post-hook ends the state and sends pass 2's output back in. The call's
signals live in its `state.CallState`, never on the model.

The remaining functions are the steps `steered_call` names, the checks it makes, and the small hooks on the feature
module and the blocks that stop pass 1 at the feature and record what the variational loss needs.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Generator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from .distributed import check_unsharded
from .generation import (
    CACHE_ARGUMENT_NAMES,
    attach_to_output,
    prepare_pass1_cache,
    refuse_toast_filled_cache,
    share_lower_layers,
)
from .state import CallState, Pass1Done, current_state, use_state
from .topdown import feedback_chain, rms_normalise, token_selection, unit_token_sum

# Keyword arguments that pass 1 does not need (it stops at the feature, before any head or loss).
PASS2_ONLY_ARGUMENTS = ("labels", "output_attentions", "output_hidden_states")
# The main input of transformers models, in the order they are looked for; the first two are token sequences.
_INPUT_NAMES = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features")
_TOKEN_INPUT_NAMES = ("input_ids", "inputs_embeds")
# Keyword argument of a TOAST forward call that hands over a precomputed pass-1 feature, `(B, N, d)`, so that pass 1 is
# skipped (`peft_toast.feature_cache`). It is removed before the wrapped model's forward sees it.
FEATURES_ARGUMENT = "toast_features"
# With it, the pass-1 hidden state `(B, N, d)` entering block `toast_hidden_block` (also precomputed), so that pass 2
# starts there (`ToastConfig.share_lower_blocks`): a cached training step then runs only the blocks from there up.
HIDDEN_ARGUMENT = "toast_hidden"
HIDDEN_BLOCK_ARGUMENT = "toast_hidden_block"


def steered_call(tuner, state: CallState, module: nn.Module, args: tuple, kwargs: dict) -> Generator:
    """One forward call of the wrapped model `module` through the TOAST tuner `tuner`; `state` is the call's state
    (already current, so that the hooks inside the model see it).

    A generator driven by the hooks: the first `next` runs everything before pass 2 and yields the `(args, kwargs)` the
    wrapped forward must run with (or None: unchanged); `send(output)` finishes the call and yields the output to
    return.
    """
    # Popped in place: the wrapped model never sees it, adapters enabled or not.
    given_features = kwargs.pop(FEATURES_ARGUMENT, None)
    given_hidden = kwargs.pop(HIDDEN_ARGUMENT, None), kwargs.pop(HIDDEN_BLOCK_ARGUMENT, None)
    changed = None if given_features is None and given_hidden[0] is None else (args, kwargs)
    adapter_name = tuner.active_toast_adapter()
    if adapter_name is None:  # adapters disabled (or none left): the base model, unsteered
        if tuner.architecture.causal:
            refuse_toast_filled_cache(kwargs)
        yield (yield changed)
        return
    config = tuner.peft_config[adapter_name]
    check_inputs(tuner.toast_prompt[adapter_name], args, kwargs)
    tuner.wrap_gradient_checkpointing()

    # Blocks below the lowest steered one get no signal: pass 2 takes their output from pass 1 instead of recomputing it.
    shared = shared_block_count(tuner, config, adapter_name, module, kwargs)
    if shared:
        changed = (args, kwargs)  # `use_cache` may have been set

    # 1. Pass 1: the frozen model without signals, up to the feature `(B, N, d)` (or the feature handed over).
    if given_features is None:
        if given_hidden[0] is not None:
            raise ValueError(f"`{HIDDEN_ARGUMENT}` needs `{FEATURES_ARGUMENT}` (both come from the feature cache).")
        state.shared_blocks = shared
        features = tuner.run_pass1(module, args, pass1_arguments(tuner, kwargs, adapter_name, state), state=state)
        if state.pass1_cache is not None:  # a decoder call with a KV cache: the caches share the bottom layers
            state.shared_blocks = share_lower_layers(
                tuner.model, kwargs, tuner.cache_argument, state.pass1_cache, state.shared_blocks
            )
            changed = (args, kwargs)  # the main cache may have been created
    else:
        features = state.feature = check_given_features(tuner, module, kwargs, given_features, adapter_name)
        if given_hidden[0] is not None:
            use_given_hidden(tuner, state, features, *given_hidden, shared)
    check_feature(features, kwargs.get("attention_mask"))

    # 2-3. Token and channel selection, then the feedback path: one signal `t_l` per steered block.
    set_prompt_from_data(tuner, adapter_name, features, kwargs.get("attention_mask"))
    state.signals, state.gates = tuner.top_down_signals(adapter_name, features)
    if tuner.training and config.variational_loss_weight > 0:
        state.block_io = []  # filled by the block recorders during pass 2

    # 4. Pass 2: the wrapped model's own forward, every ToastLayer adding `W_v t_l` to its values.
    output = yield changed

    # 5. The output: the pass-1 KV cache tied to the returned cache; the variational loss when pre-tuning.
    attach_to_output(output, state.pass1_cache)
    if state.block_io:
        add_variational_loss(tuner, adapter_name, output, state.block_io)
    yield output


def pass1_arguments(tuner, kwargs: dict, adapter_name: str, state: CallState) -> dict:
    """Pass 1's keyword arguments: no labels or outputs it does not need; for a decoder, its own KV cache (tied to the
    main cache that pass 2 uses) in place of the main one."""
    pass1_kwargs = {key: value for key, value in kwargs.items() if key not in PASS2_ONLY_ARGUMENTS}
    if tuner.architecture.causal:
        cache_name, state.pass1_cache = prepare_pass1_cache(tuner.model, kwargs, tuner.cache_argument, adapter_name)
        for name in CACHE_ARGUMENT_NAMES:
            pass1_kwargs.pop(name, None)
        if state.pass1_cache is not None:
            pass1_kwargs[cache_name] = state.pass1_cache
            pass1_kwargs["use_cache"] = True
    return pass1_kwargs


def run_pass1(tuner, module: nn.Module, args: tuple, kwargs: dict, state: Optional[CallState] = None) -> torch.Tensor:
    """Run the frozen model without signals up to the feature and return it, `(B, N, d)`. With the `state` of a call
    whose pass 2 shares its `state.shared_blocks` bottom blocks with pass 1, the output of the last of them is kept in
    `state.shared_output`."""
    shared = state.shared_blocks if state is not None else 0
    pass1 = CallState(owner=tuner, pass1=True, record_block=shared - 1 if shared else None)
    with torch.no_grad(), use_state(pass1):
        try:
            # `forward`, not `__call__`: this call must not trigger our own hooks again.
            module.forward(*args, **kwargs)
        except Pass1Done:
            pass
    if pass1.feature is None:
        raise RuntimeError(
            "TOAST's pass 1 finished without reaching the feature module "
            f"({type(tuner.architecture.feature_module).__name__}); check the architecture declaration."
        )
    if shared:
        if pass1.shared_output is None:  # the blocks were not reached as declared: recompute them in pass 2
            state.shared_blocks = 0
        state.shared_output = pass1.shared_output
    return pass1.feature


def use_given_hidden(tuner, state: CallState, features: torch.Tensor, hidden, block, shared: int) -> None:
    """Start pass 2 at block `block` from a precomputed pass-1 hidden state `hidden` `(B, N, d)` entering it (from the
    feature cache), when this call may share that many blocks (`shared >= block`) and the output of the block below
    is known to be a plain hidden state (it was seen once in this process); otherwise pass 2 runs every block (exact,
    only slower)."""
    if isinstance(block, torch.Tensor):
        values = block.unique()
        if values.numel() != 1:
            raise ValueError(f"`{HIDDEN_BLOCK_ARGUMENT}` must be one block index for the whole batch, got {values}.")
        block = int(values)
    if (
        not isinstance(hidden, torch.Tensor)
        or tuple(hidden.shape) != tuple(features.shape)
        or not isinstance(block, int)
    ):
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(
            f"`{HIDDEN_ARGUMENT}` must be the pass-1 hidden state of shape {tuple(features.shape)} (like "
            f"`{FEATURES_ARGUMENT}`) entering block `{HIDDEN_BLOCK_ARGUMENT}` (an int), got {shape} and {block!r}. "
            f"Compute both with `peft_toast.feature_cache.precompute_features`."
        )
    num_blocks = len(tuner.architecture.blocks)
    if not 0 < block < num_blocks:
        raise ValueError(f"`{HIDDEN_BLOCK_ARGUMENT}` must be a block index in 1..{num_blocks - 1}, got {block}.")
    if block > shared:
        warnings.warn(
            f"The cached hidden state enters block {block}, but this call must run pass 2 from block {shared} (the "
            f"adapter steers lower blocks than when the cache was made, or the call needs every block): pass 2 runs "
            f"every block, which is exact but does not save the shared blocks. Recompute the cache with "
            f"`precompute_features` for this adapter.",
            stacklevel=4,
        )
        return
    output = output_like(tuner.architecture.blocks[block - 1], hidden)
    if output is not None:
        state.shared_blocks, state.shared_output = block, output


def output_kind(output: Any) -> Any:
    """How a block returns its hidden state: `"tensor"`, `("tuple", length)` when everything after it is None, or None
    (the block returns more state, e.g. T5's position bias, that a hidden state alone cannot stand for)."""
    if isinstance(output, torch.Tensor):
        return "tensor"
    if isinstance(output, tuple) and output and all(item is None for item in output[1:]):
        return ("tuple", len(output))
    return None


def output_like(block: nn.Module, hidden: torch.Tensor) -> Any:
    """The output `block` would return for the hidden state `hidden`, as far as the next block reads it; None when its
    kind is unknown (the block has not run in this process) or cannot be built from a hidden state."""
    kind = getattr(block, "_toast_output_kind", None)
    if kind == "tensor":
        return hidden
    if isinstance(kind, tuple):
        return (hidden,) + (None,) * (kind[1] - 1)
    return None


def lowest_steered_block(tuner, adapter_name: str) -> int:
    """The index of the lowest block whose values receive a signal from `adapter_name`."""
    return min(layer.block_index for layer in tuner.toast_layers(adapter_name) if adapter_name in layer.toast_readout)


def shared_block_count(tuner, config, adapter_name: str, module: nn.Module, kwargs: dict) -> int:
    """How many bottom blocks pass 2 of this call takes from pass 1 rather than recomputing: the blocks below the lowest
    steered one, whose inputs and outputs in pass 2 equal those of pass 1 (exactly, where the two passes are
    deterministic; with dropout, pass 2 reuses pass 1's sample there). 0, and pass 2 runs every block as the reference
    does, when `config.share_lower_blocks` is off, when block 0 is steered, and when the call asks for every block's
    attentions or hidden states (pass 2 reports them, so every block runs). On a decoder call with a KV cache the two
    caches then share those blocks' layers (`generation.share_lower_layers`, which may still decline). A decoder call
    in training mode that leaves `use_cache` unset runs without a cache, as it returns no cache anyone can continue."""
    if not config.share_lower_blocks:
        return 0
    start = lowest_steered_block(tuner, adapter_name)
    if start == 0:
        return 0
    model_config = getattr(module, "config", None)
    for name in ("output_attentions", "output_hidden_states"):
        requested = kwargs.get(name)
        if requested if requested is not None else getattr(model_config, name, False):
            return 0
    if tuner.architecture.causal and kwargs.get("use_cache") is None and module.training:
        if all(kwargs.get(name) is None for name in CACHE_ARGUMENT_NAMES):
            kwargs["use_cache"] = False
    return start


def top_down_signals(tuner, adapter_name: str, features: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Token selection, channel selection and the feedback chain for one call.

    Returns `({ToastLayer: t_l of shape (B, N, d)}, gates of shape (B, N))`.
    """
    prompt = tuner.toast_prompt[adapter_name]
    config = tuner.peft_config[adapter_name]
    features = features.to(device=prompt.device, dtype=prompt.dtype)  # (B, N, d)
    if config.feature_norm == "rms":  # scale-free feedback; the cosine gates do not change
        features = rms_normalise(features, eps=config.cosine_eps)
    gates, selected = token_selection(features, prompt, eps=config.cosine_eps)  # (B, N), (B, N, d)
    if adapter_name in tuner.toast_channel:
        selected = tuner.toast_channel[adapter_name](selected)
    if config.feedback_dropout and tuner.training:
        selected = F.dropout(selected, p=config.feedback_dropout)
    layers = tuner.toast_layers(adapter_name)
    down_maps = [layer.toast_down[adapter_name] for layer in layers]
    readouts = [layer.toast_readout[adapter_name] if adapter_name in layer.toast_readout else None for layer in layers]
    check_unsharded(down_maps)  # a clear error instead of "mixed torch.Tensor and DTensor" inside the chain
    signals = feedback_chain(selected, down_maps, readouts)
    return {layer: signal for layer, signal in zip(layers, signals) if signal is not None}, gates


@torch.no_grad()
def set_prompt_from_data(
    tuner, adapter_name: str, features: torch.Tensor, attention_mask: Optional[torch.Tensor], force: bool = False
) -> bool:
    """`prompt_init="data"`: set a prompt that is still zero to the mean direction of this call's real pass-1 tokens
    (summed over all processes), scaled to norm `sqrt(d)` like the reference's standard-normal prompt. A prompt that is
    not zero (loaded, copied or trained) is kept unless `force`. Returns whether the prompt was set."""
    unset = tuner.unset_prompts
    if adapter_name not in unset and not force:
        return False
    prompt = tuner.toast_prompt[adapter_name]
    if prompt.is_meta or features.is_meta:
        return False
    if prompt.any() and not force:  # loaded or set by hand since it was created
        unset.discard(adapter_name)
        return False
    direction = unit_token_sum(features, attention_mask, eps=tuner.peft_config[adapter_name].cosine_eps)  # (d,)
    direction = direction.to(prompt.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Every process must start from the same prompt: the sum over all their batches, as one process would see.
        torch.distributed.all_reduce(direction)
    norm = direction.norm()
    if not norm > 0:  # no real token with a direction (all zero): try again on the next batch
        return False
    prompt.copy_((direction * (prompt.numel() ** 0.5 / norm)).to(prompt.dtype))
    unset.discard(adapter_name)
    return True


@torch.no_grad()
def set_readouts_from_data(
    tuner, adapter_name: str, features: torch.Tensor, attention_mask: Optional[torch.Tensor]
) -> int:
    """Point each low-rank readout's input factor (`v` of `u v`, or TOAST-Lite's `delta_v`) at the top right singular
    directions of the signal that readout receives for these pass-1 `features` (real tokens only, summed over all
    processes), each row keeping its norm. Returns the number of readouts set."""
    layers = [layer for layer in tuner.toast_layers(adapter_name) if adapter_name in layer.toast_readout]
    readouts = [layer.toast_readout[adapter_name] for layer in layers]
    factors = [readout.v if readout.rank is not None else readout.delta_v for readout in readouts]  # (r, d) each
    grams: dict[int, torch.Tensor] = {}
    mask = None if attention_mask is None else attention_mask.to(features.device).bool()

    def record(index):
        def hook(module, args):
            z = args[0].double()  # (B, N, d)
            z = z[mask] if mask is not None and mask.shape == z.shape[:2] else z.flatten(0, -2)
            grams[index] = z.T @ z  # (d, d)

        return hook

    hooks = [readout.register_forward_pre_hook(record(index)) for index, readout in enumerate(readouts)]
    was_training = tuner.training
    tuner.training = False  # no feedback dropout; the flag alone, so that no submodule's own mode changes
    try:
        top_down_signals(tuner, adapter_name, features)
    finally:
        tuner.training = was_training
        for hook in hooks:
            hook.remove()
    for gram in grams.values():
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(gram)  # every process gets the directions of all processes' tokens
    if not all(gram.diagonal().sum() > 0 for gram in grams.values()):  # checked before any readout changes
        raise ValueError(
            "These inputs send no signal down the feedback path (every selected token is zero), so they give the "
            "readouts no direction. Pass real training examples (with their attention mask)."
        )
    for index, factor in enumerate(factors):
        gram = grams[index]
        rank = factor.shape[0]
        directions = torch.linalg.eigh(gram).eigenvectors.flip(-1)[:, :rank].T  # (r, d), largest eigenvalue first
        norms = factor.norm(dim=1, keepdim=True).double()
        factor.copy_((directions.to(norms.device) * norms).to(factor.dtype))
    return len(factors)


def variational_loss(tuner, adapter_name: str, block_io: list) -> torch.Tensor:
    """`sum_l MSE(A_l h_l_out, h_l_in)` over the blocks that have a down-map; inputs and outputs are detached, so only
    the down-maps receive its gradient."""
    layers = {layer.block_index: layer for layer in tuner.toast_layers(adapter_name)}
    terms = [
        torch.nn.functional.mse_loss(layers[index].toast_down[adapter_name](h_out.to(h_in.dtype)), h_in)
        for index, h_in, h_out in block_io
        if index in layers
    ]
    return torch.stack(terms).sum()


def add_variational_loss(tuner, adapter_name: str, output, block_io: list) -> None:
    """Report the variational loss as `output.toast_variational_loss` and add `weight x` it to `output.loss` (or make
    it the loss when the model computed none: a backbone, or no labels, as in pre-tuning on the variational loss
    alone)."""
    weight = tuner.peft_config[adapter_name].variational_loss_weight
    loss = tuner.variational_loss(adapter_name, block_io)
    output["toast_variational_loss"] = loss.detach()
    if getattr(output, "loss", None) is not None:
        output["loss"] = output.loss + weight * loss.to(output.loss.dtype)
    else:
        output["loss"] = weight * loss


# ------------------------------------------------------------------------------------------------------ checks


def check_given_features(tuner, module: nn.Module, kwargs: dict, features, adapter_name: str) -> torch.Tensor:
    """Check a precomputed pass-1 feature (`toast_features=`) and refuse it where it cannot equal what pass 1 would
    compute; turns the KV cache of a decoder off (a cache returned now would lack its pass-1 twin)."""
    dim = tuner.toast_prompt[adapter_name].shape[0]
    if not isinstance(features, torch.Tensor) or features.ndim != 3 or features.shape[-1] != dim:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(
            f"`{FEATURES_ARGUMENT}` must be the pass-1 feature of shape (batch, tokens, {dim}), got {shape}. "
            f"Compute it with `peft_toast.feature_cache.precompute_features`."
        )
    if tuner.architecture.causal:
        cache = next((kwargs[name] for name in CACHE_ARGUMENT_NAMES if kwargs.get(name) is not None), None)
        if cache is not None or kwargs.get("use_cache"):
            raise ValueError(
                f"`{FEATURES_ARGUMENT}` covers exactly the tokens of one teacher-forced call, but this call decodes "
                f"with a KV cache (`generate` or `use_cache=True`), which must run pass 1 on every new token. Drop "
                f"`{FEATURES_ARGUMENT}` to generate."
            )
        kwargs["use_cache"] = False
    if module.training:
        stochastic = stochastic_modules(tuner.architecture.backbone)
        if stochastic:
            raise ValueError(
                f"`{FEATURES_ARGUMENT}` was given in training mode, but pass 1 is random or batch-dependent in "
                f"training mode here (dropout, stochastic depth or batch norm in {', '.join(stochastic[:3])}), so "
                f"a cached feature is not what pass 1 would compute. Set those probabilities to 0 (e.g. "
                f"`hidden_dropout_prob=0.0`, `attention_probs_dropout_prob=0.0`) or train without the feature cache."
            )
    return features


def check_inputs(prompt: torch.Tensor, args: tuple, kwargs: dict) -> None:
    """Shape checks of one call's inputs (no data is read), so that bad input fails with a message that says what to do
    instead of a reshape error deep inside the model or, worse, an attention mask that is silently broadcast."""
    name = next((n for n in _INPUT_NAMES if isinstance(kwargs.get(n), torch.Tensor)), None)
    inputs = kwargs[name] if name else (args[0] if args and isinstance(args[0], torch.Tensor) else None)
    if inputs is None:
        return
    if prompt.is_meta and not inputs.is_meta:
        raise ValueError(
            "The TOAST adapter's weights are still on the meta device: it was created with `low_cpu_mem_usage=True` "
            "and its weights were never loaded. Load them with `model.load_adapter(path, adapter_name)` or "
            "`PeftModel.from_pretrained`, or create the adapter without `low_cpu_mem_usage=True`."
        )
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise ValueError(
            f"TOAST got an empty batch (`{name or 'inputs'}` of shape {tuple(inputs.shape)}). Skip empty batches before "
            f"calling the model."
        )
    if not (name in _TOKEN_INPUT_NAMES or (name is None and not inputs.is_floating_point())):
        return
    batch, length = inputs.shape[:2]
    if length == 0:
        raise ValueError(
            f"TOAST got sequences of length 0 (`{name or 'input_ids'}` of shape {tuple(inputs.shape)}). Every sequence "
            f"needs at least one token; to generate from nothing, start from the BOS token."
        )
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return
    cache = next((kwargs[n] for n in CACHE_ARGUMENT_NAMES if kwargs.get(n) is not None), None)
    cached = cache is not None and (not isinstance(cache, Cache) or cache.get_seq_length() > 0)
    # Without a cache the mask covers exactly the inputs; with one it also covers the cached tokens.
    if mask.shape[0] != batch or mask.shape[1] < length or (not cached and mask.shape[1] != length):
        raise ValueError(
            f"`attention_mask` has shape {tuple(mask.shape)} but the inputs have batch size {batch} and {length} tokens"
            f"{' (plus cached tokens)' if cached else ''}. Pass the mask that the tokenizer returned with these inputs: "
            f"one row per sequence, one entry per token (cached tokens included)."
        )


def check_feature(features: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> None:
    """Refuse a pass-1 feature `(B, N, d)` that is NaN or infinite at a real (unmasked) token. This is the one check per
    call that reads data, and it reads a tensor that pass 1 computed anyway; stopping here keeps NaN out of the
    signals, the loss, the gradients and finally the saved adapter."""
    if features.is_meta:
        return
    bad = ~torch.isfinite(features).all(dim=-1)  # (B, N)
    mask = attention_mask
    if (
        isinstance(mask, torch.Tensor)
        and mask.dim() == 2
        and mask.shape[0] == bad.shape[0]
        and mask.shape[1] >= bad.shape[1]
    ):
        bad &= mask[:, -bad.shape[1] :].to(device=bad.device, dtype=torch.bool)  # padding may be anything
    if bad.any():
        rows = sorted(set(bad.nonzero()[:, 0].tolist()))
        raise ValueError(
            f"TOAST's pass 1 produced NaN or inf at real (unpadded) tokens of batch rows {rows[:10]}: the inputs contain "
            f"NaN/inf, or the frozen model overflows in {features.dtype}. Check the inputs (`torch.isfinite(x).all()`) "
            f"or run the base model in float32 or bfloat16. The call stopped before any signal, loss or gradient was "
            f"computed."
        )


def stochastic_modules(backbone: nn.Module) -> list[str]:
    """Names of the modules that make a forward of `backbone` random or batch-dependent in its current mode: dropout
    (a module, or a `*drop*` probability attribute, as transformers' attention classes keep it), stochastic depth and
    batch norm in training mode."""
    found = []
    for name, module in backbone.named_modules():
        if not module.training:
            continue
        stochastic = isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0
        stochastic = stochastic or isinstance(module, nn.modules.batchnorm._BatchNorm)
        stochastic = stochastic or any(
            "drop" in key and isinstance(value, float) and value > 0 for key, value in vars(module).items()
        )
        if stochastic:
            found.append(name or type(backbone).__name__)
    return found


# ------------------------------------------------------------------------------------- hooks inside the model


def capture_feature(module: nn.Module, args: tuple, output: Any) -> None:
    """Forward hook on the feature module: in pass 1, hand the feature over and stop the pass."""
    state = current_state()
    if state is not None and state.pass1:
        feature = output[0] if isinstance(output, tuple) else output
        if not isinstance(feature, torch.Tensor) or feature.dim() != 3:
            shape = tuple(feature.shape) if isinstance(feature, torch.Tensor) else type(feature).__name__
            raise ValueError(
                f"TOAST's pass-1 feature module ({type(module).__name__}) returned {shape}, not one vector per token "
                f"(batch, tokens, hidden): it acts on a pooled token only (as CLIP's vision `post_layernorm` does). "
                f"Declare the architecture with `final_norm=None` (the last block's output is then the feature): "
                f"`register_architecture(model_type, ToastArchitecture(blocks=..., value=..., final_norm=None))`."
            )
        state.feature = feature
        raise Pass1Done


def check_given_feature(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on the first block: a precomputed pass-1 feature must have this call's `(B, N, d)`."""
    state = current_state()
    if state is None or state.pass1 or state.feature is None:
        return
    hidden = args[0] if args else kwargs["hidden_states"]  # (B, N, d)
    if tuple(hidden.shape) != tuple(state.feature.shape):
        raise ValueError(
            f"`{FEATURES_ARGUMENT}` has shape {tuple(state.feature.shape)}, but this call's tokens have shape "
            f"{tuple(hidden.shape)} (batch, tokens, hidden size): the cached feature does not belong to these inputs. "
            f"Pass the feature precomputed for exactly this batch, in the same order."
        )


def shared_block_forward(block: nn.Module, *args, **kwargs):
    """The forward of every block, bound to it by `ToastModel` (`install_shared_block_forward`): in pass 2 of a call
    that shares its bottom blocks with pass 1, a shared block returns the output that pass 1 recorded at the last
    shared block without running (the next shared block ignores its input; the first block above receives exactly its
    pass-1 input); otherwise the block's own forward runs, and pass 1 records the output the call asked for."""
    state = current_state()
    index = block._toast_block_index
    if state is not None and not state.pass1 and index < state.shared_blocks:
        return state.shared_output
    previous = block._toast_previous_forward
    output = previous(*args, **kwargs) if previous is not None else type(block).forward(block, *args, **kwargs)
    if "_toast_output_kind" not in block.__dict__:
        block._toast_output_kind = output_kind(output)
    if state is not None and state.pass1 and state.record_block == index:
        state.shared_output = output
    return output


def install_shared_block_forward(block: nn.Module, index: int) -> None:
    """Bind `shared_block_forward` as `block.forward` (a method of the instance, so that `copy.deepcopy` binds the copy
    to the copied block), keeping a forward that was already set on the instance (e.g. by accelerate's hooks)."""
    if getattr(block.__dict__.get("forward"), "__func__", None) is shared_block_forward:
        block._toast_block_index = index
        return
    block._toast_previous_forward = block.__dict__.get("forward")
    block._toast_block_index = index
    block.forward = types.MethodType(shared_block_forward, block)


def remove_shared_block_forward(block: nn.Module) -> None:
    """Undo `install_shared_block_forward`."""
    if getattr(block.__dict__.get("forward"), "__func__", None) is not shared_block_forward:
        return
    previous = block.__dict__.pop("_toast_previous_forward", None)
    del block.forward
    if previous is not None:
        block.forward = previous
    block.__dict__.pop("_toast_block_index", None)
    block.__dict__.pop("_toast_output_kind", None)


def block_recorder(index: int):
    """Forward hook on block `index`: in pass 2 of a call that needs the variational loss, record the block's input
    and output (detached)."""

    def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        state = current_state()
        if state is None or state.block_io is None or state.pass1:
            return
        hidden_in, hidden_out = block_input_output(args, kwargs, output)
        state.block_io.append((index, hidden_in.detach(), hidden_out.detach()))

    return record


def block_input_output(args: tuple, kwargs: dict, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Block `l`'s residual-stream input and output `(h_l_in, h_l_out)`, each `(B, N, d)`, from a forward hook's view
    (the variational loss and `peft_toast.calibration` read the same tensors)."""
    hidden_in = args[0] if args else kwargs["hidden_states"]
    hidden_out = output[0] if isinstance(output, tuple) else output
    return hidden_in, hidden_out
