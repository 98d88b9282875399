"""Every place where peft-toast changes or relies on an internal of PEFT, transformers or torch — in one module.

A version bump of an upstream library is checked here and in `tests/test_upstream.py`, which fails with a message
naming the internal whenever one of them moves. Nothing in this module imports the rest of the package.

| what | upstream internal | why |
|---|---|---|
| `add_peft_type` | the member tables of the `PeftType` enum | `register_peft_method` only takes existing members |
| `extend_peft_model_card` | `PeftModel.create_or_update_model_card`, `PeftModel._upload_modified_files` | PEFT has no per-method model-card hook |
| `mirror_cache_calls` | the methods of transformers' `Cache` that `generate` calls (`MIRRORED_CACHE_METHODS`) | the pass-1 KV cache must follow every reordering of the main one |
| `redirect_cache_layer_queries` | `Cache.layers`, and the `layer_idx` of the `Cache` queries in `REDIRECTED_CACHE_QUERIES` | a main cache whose bottom layers pass 1 shares and fills first |
| `wrap_block_checkpointing` | a block's `_gradient_checkpointing_func` (transformers' `GradientCheckpointingLayer`) | recomputation must see the call's signals |
| `ToastModel` overrides | `BaseTuner` private methods listed in `BASE_TUNER_OVERRIDES` | the tuner's lifecycle hooks |
| `ToastModel._enable_peft_forward_hooks` | `PeftModel` calls it on a tuner that has it (`PEFT_MODEL_TUNER_HOOKS`) | refuse `adapter_names=` |
| `keep_4bit_weights_differentiable` | bitsandbytes' `Linear4bit.support_avx512bf16_for_cpu`, `QuantState.packing_format_for_cpu` | a repacked 4-bit weight passes no gradient |
"""  # noqa: E501  (a table)

from __future__ import annotations

import functools
import inspect
import sys
import types
from collections.abc import Callable, Iterable
from typing import Any, Optional

from peft import PeftModel
from peft.utils import PeftType

# Private `BaseTuner` methods that `ToastModel` overrides; each must exist upstream with the parameters ours accept.
BASE_TUNER_OVERRIDES = (
    "_pre_injection_hook",
    "_check_new_adapter_config",
    "_prepare_adapter_config",
    "_check_target_module_exists",
    "_create_and_replace",
    "_post_injection_hook",
    "_mark_only_adapters_as_trainable",
    "_enable_adapter_layers",
    "_cast_adapter_dtype",
    "_check_merge_allowed",
    "_unload_and_optionally_merge",
    "_remap_adapter_state_dict_for_load",
)
# Methods that `PeftModel` calls on its tuner when the tuner has them (duck-typed, not `BaseTuner` methods).
PEFT_MODEL_TUNER_HOOKS = ("_enable_peft_forward_hooks",)
# Methods of transformers' `Cache` that change which sequences or positions a cache holds (beam reordering, batch
# expansion and selection, cropping, reset); the pass-1 cache repeats each call made on the main cache.
MIRRORED_CACHE_METHODS = (
    "reorder_cache",
    "crop",
    "batch_repeat_interleave",
    "batch_select_indices",
    "reset",
    "activate_past_recording",
)
# Queries of transformers' `Cache` about one layer (`layer_idx`, default 0) that size positions and masks.
REDIRECTED_CACHE_QUERIES = ("get_seq_length", "get_mask_sizes")
_WRAPPED = "_toast_wrapped"  # marks a function this module wrapped, so that wrapping again is a no-op


def add_peft_type(name: str) -> PeftType:
    """Return `PeftType[name]`, adding `name` as a new member of the `str`-enum if it is missing (idempotent)."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_, member._value_ = name, name
    if sys.version_info >= (3, 13):
        # Python 3.13 added a supported way to extend an enum after its creation.
        PeftType._add_member_(name, member)
        return PeftType[name]
    member.__objclass__ = PeftType
    # Order matters: the enum metaclass refuses to set an attribute that is already a member name.
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def extend_peft_model_card(applies: Callable[[PeftModel], Any], write: Callable[..., None]) -> None:
    """Make `PeftModel.save_pretrained` and `push_to_hub` call `write(model, folder, adapter_id=None)` after PEFT's own
    card, for the models where `applies(model)` holds (idempotent; PEFT's card is unchanged for every other model).

    `save_pretrained` writes the card in `create_or_update_model_card(output_dir)`. `push_to_hub` then replaces that
    README.md with the repository's own card (or a blank template) and uploads in `_upload_modified_files`, so the card
    is written into it again there, naming the repository."""
    original_card = PeftModel.create_or_update_model_card
    if getattr(original_card, _WRAPPED, False):
        return

    @functools.wraps(original_card)
    def create_or_update_model_card(self, output_dir: str):
        original_card(self, output_dir)
        if applies(self):
            write(self, output_dir)

    original_upload = PeftModel._upload_modified_files

    @functools.wraps(original_upload)
    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        if applies(self):
            original_card(self, working_dir)
            write(self, working_dir, adapter_id=repo_id)
        return original_upload(self, working_dir, repo_id, *args, **kwargs)

    setattr(create_or_update_model_card, _WRAPPED, True)
    PeftModel.create_or_update_model_card = create_or_update_model_card
    PeftModel._upload_modified_files = _upload_modified_files


def mirror_cache_calls(main_cache, follower: Callable[[Any], Optional[Any]]) -> None:
    """Make every `MIRRORED_CACHE_METHODS` call on `main_cache` repeat itself on `follower(main_cache)` (when not None).

    Bound methods on the instance, not closures over it: `copy.deepcopy` rebinds them to the copy (as when a prompt
    cache is copied for reuse), so the copy repeats its calls on its own follower."""
    for name in MIRRORED_CACHE_METHODS:
        method = getattr(type(main_cache), name, None)
        if method is not None:
            setattr(main_cache, name, types.MethodType(_mirrored(method, name, follower), main_cache))


def _mirrored(method, name: str, follower: Callable):
    @functools.wraps(method)
    def mirrored(main_cache, *args, **kwargs):
        result = method(main_cache, *args, **kwargs)
        other = follower(main_cache)
        if other is not None:
            getattr(other, name)(*args, **kwargs)
        return result

    return mirrored


def redirect_cache_layer_queries(cache, redirect: dict[int, int]) -> None:
    """Make `cache`'s `REDIRECTED_CACHE_QUERIES` about layer `i` answer about layer `redirect[i]` (when `i` is a key).

    Bound methods on the instance, as in `mirror_cache_calls`, so that `copy.deepcopy` rebinds them to the copy."""
    for name in REDIRECTED_CACHE_QUERIES:
        method = getattr(type(cache), name)
        setattr(cache, name, types.MethodType(_redirected(method, dict(redirect)), cache))


def _redirected(method, redirect: dict[int, int]):
    signature = inspect.signature(method)

    @functools.wraps(method)
    def redirected(cache, *args, **kwargs):
        bound = signature.bind(cache, *args, **kwargs)
        bound.apply_defaults()
        layer = bound.arguments["layer_idx"]
        bound.arguments["layer_idx"] = redirect.get(layer, layer)
        return method(*bound.args, **bound.kwargs)

    return redirected


def wrap_block_checkpointing(blocks: Iterable, wrapper: Callable[[Callable], Callable]) -> None:
    """Replace the gradient-checkpointing function of every block that checkpoints (transformers'
    `GradientCheckpointingLayer` keeps it in `_gradient_checkpointing_func` once `activation_checkpointing_enable()` ran)
    by `wrapper(function)`; `wrapper` must return a function it already wrapped unchanged."""
    for block in blocks:
        function = getattr(block, "_gradient_checkpointing_func", None)
        if function is not None and getattr(block, "gradient_checkpointing", False):
            block._gradient_checkpointing_func = wrapper(function)


def keep_4bit_weights_differentiable(model) -> None:
    """Keep bitsandbytes' 4-bit layers of `model` on their differentiable fp32 path.

    bitsandbytes 0.50.2, on a CPU with AVX512-BF16, repacks a `Linear4bit` weight at its first inference call
    (eval mode, no gradient) and from then on multiplies bf16 activations with a kernel that has no backward: training
    after any evaluation then passes no gradient through the layer, so TOAST's signals, which enter the value
    projections, would silently stop training. Turning the repacking off keeps the numbers of the dequantised weights
    (as on every other CPU and version); a weight repacked already cannot be used and is refused with the fix.
    """
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError(
                f"The 4-bit weight of `{name}` was repacked by bitsandbytes for CPU inference (an eval-mode call ran "
                f"before the TOAST adapter was added); in that layout it passes no gradient, so the adapter would not "
                f"train. Load the base model again and add the adapter before running it."
            )
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
