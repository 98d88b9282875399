"""The pass-1 KV cache of causal-LM decoding.

Token and channel selection and the feedback path act on each position separately, so a decoder's signal at position
`i` depends only on tokens `<= i` and incremental decoding is exact if pass 1 and pass 2 each keep their own KV cache.
The main cache (the one `generate` or the user threads through the calls) carries pass 2; the pass-1 cache rides on it
as an attribute, so each generate call, each user-held cache and each beam keeps its own, and every operation
`generate` applies to the main cache (beam reordering, batch expansion and selection, cropping, reset) is applied to
the pass-1 cache too.

When pass 2 takes its bottom blocks from pass 1 (`ToastConfig.share_lower_blocks`), their keys and values are the same in
both passes, so the two caches share those layers (the same layer objects): `L + k` layers are stored instead of `2L`.
Pass 1 fills the shared layers; pass 2 skips those blocks. transformers sizes positions and masks from a cache's layer
0, which pass 1 of the same call has already grown, so the main cache answers those queries from its lowest own layer
of the same kind, and the pass-1 cache repeats the main cache's reorderings on its own layers only.
"""

from __future__ import annotations

import copy
from typing import Optional

from transformers.cache_utils import Cache, DynamicCache

from .architectures import blocks_config
from .upstream import mirror_cache_calls, redirect_cache_layer_queries

PASS1_CACHE_ATTR = "_toast_pass1_cache"
ADAPTER_ATTR = "_toast_adapter_name"  # on the pass-1 cache: the adapter whose signals filled the main cache
# On the pass-1 cache: how many bottom layers it shares with the main cache (set at the first call that fills them).
SHARED_LAYERS_ATTR = "_toast_shared_layers"
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")


def get_pass1_cache(main_cache: Cache) -> Optional[Cache]:
    return getattr(main_cache, PASS1_CACHE_ATTR, None)


def attach_pass1_cache(main_cache: Cache, pass1_cache: Cache) -> None:
    """Tie `pass1_cache` to `main_cache` so that it follows every reordering or cropping of the main cache."""
    if get_pass1_cache(main_cache) is pass1_cache:
        return
    setattr(main_cache, PASS1_CACHE_ATTR, pass1_cache)
    mirror_cache_calls(main_cache, _pass1_own_layers)


def _pass1_own_layers(main_cache: Cache) -> Optional[Cache]:
    """The pass-1 cache as the main cache's reorderings must reach it: without the layers the two share (the main
    cache's own call already reordered them)."""
    pass1_cache = get_pass1_cache(main_cache)
    shared = getattr(pass1_cache, SHARED_LAYERS_ATTR, 0)
    if not shared:
        return pass1_cache
    view = copy.copy(pass1_cache)
    view.layers = pass1_cache.layers[shared:]
    return view


def share_lower_layers(model, kwargs: dict, cache_argument: str, pass1_cache: Cache, shared: int) -> int:
    """After pass 1 of a causal-LM call that uses a KV cache: how many bottom blocks pass 2 takes from pass 1 (`shared`
    requested by this call, 0 when it must run every block), fixed at the call that starts filling the caches.

    At that first call the main cache's bottom `shared` layers become the pass-1 cache's (the same objects) and the
    main cache answers length and mask queries about them from its lowest own layer of the same kind. A main cache the
    model would create itself is created here, so that it can share. Sharing is declined (0) when a shared layer has no
    own layer of its kind above it (e.g. every sliding-window layer below the steered blocks)."""
    stored = getattr(pass1_cache, SHARED_LAYERS_ATTR, None)
    if stored is not None:  # the caches were set up by an earlier call
        if stored and shared != stored:
            raise ValueError(
                f"This KV cache shares its bottom {stored} blocks between TOAST's two passes (`share_lower_blocks`): "
                f"pass 2 did not compute their keys and values, so a call that needs pass 2 to run every block (one "
                f"that asks for `output_attentions` or `output_hidden_states`) cannot continue it. Ask for them from "
                f"the first call on this cache, or create the adapter with `share_lower_blocks=False`."
            )
        return stored
    name = next((n for n in CACHE_ARGUMENT_NAMES if kwargs.get(n) is not None), cache_argument)
    main_cache = kwargs.get(name)
    layers = pass1_cache.layers
    redirect = {}
    for index in range(shared if len(layers) > shared else 0):
        same_kind = (j for j in range(shared, len(layers)) if _same_kind(layers[j], layers[index]))
        redirect[index] = next(same_kind, None)
    if not redirect or None in redirect.values() or (main_cache is not None and main_cache.get_seq_length() > 0):
        shared = 0
    setattr(pass1_cache, SHARED_LAYERS_ATTR, shared)
    if not shared:
        return 0
    if main_cache is None:  # the model would make it inside pass 2, too late to share
        main_cache = kwargs[name] = DynamicCache(config=model.config)
        attach_pass1_cache(main_cache, pass1_cache)
    main_cache.layers[:shared] = layers[:shared]
    redirect_cache_layer_queries(main_cache, redirect)
    return shared


def _same_kind(layer, other) -> bool:
    return type(layer) is type(other) and getattr(layer, "sliding_window", None) == getattr(
        other, "sliding_window", None
    )


def prepare_pass1_cache(model, kwargs: dict, cache_argument: str, adapter_name: str) -> tuple[str, Optional[Cache]]:
    """Return `(argument name, pass-1 cache)` for a causal-LM call of adapter `adapter_name` with keyword arguments
    `kwargs`.

    A fresh pass-1 cache is made when the main cache is new (empty) or when the model will create one itself
    (`use_cache` in eval mode). A main cache that already holds tokens cannot be continued exactly, and raises, when it
    has no pass-1 cache (the base model filled it) or when another adapter filled it.
    """
    name = next((n for n in CACHE_ARGUMENT_NAMES if kwargs.get(n) is not None), cache_argument)
    main_cache = kwargs.get(name)
    if main_cache is None:
        use_cache = kwargs.get("use_cache")
        if use_cache is None:  # what the model will do (a vision-language model's language model reads its own config)
            use_cache = getattr(blocks_config(model.config), "use_cache", False)
        if not use_cache or model.training:
            return name, None
        return name, _tagged(DynamicCache(config=model.config), adapter_name)
    if not isinstance(main_cache, Cache):
        raise TypeError(
            f"TOAST needs a transformers `Cache` object as `{name}`, got {type(main_cache).__name__}. Legacy tuple "
            f"caches are not supported: pass a `DynamicCache` (or let `generate` create one)."
        )
    pass1_cache = get_pass1_cache(main_cache)
    if pass1_cache is None:
        if main_cache.get_seq_length() > 0:
            raise ValueError(
                "This cache already holds tokens but no TOAST pass-1 cache: it was filled by a model without the "
                "TOAST adapter (or with adapters disabled), so continuing it cannot be exact. Start from an empty "
                "cache, or from the cache returned by a TOAST forward call."
            )
        pass1_cache = copy.deepcopy(main_cache)
        attach_pass1_cache(main_cache, pass1_cache)
    elif main_cache.get_seq_length() > 0 and getattr(pass1_cache, ADAPTER_ATTR, adapter_name) != adapter_name:
        raise ValueError(
            f"This cache was filled by the TOAST adapter {getattr(pass1_cache, ADAPTER_ATTR)!r}, not by the active "
            f"adapter {adapter_name!r}: its keys and values carry the other adapter's signals, so continuing it cannot "
            f"be exact. Start from an empty cache, or `set_adapter({getattr(pass1_cache, ADAPTER_ATTR)!r})` first."
        )
    return name, _tagged(pass1_cache, adapter_name)


def refuse_toast_filled_cache(kwargs: dict) -> None:
    """With the adapter disabled: refuse a main cache that TOAST filled (its keys and values are steered, so the base
    model continuing it would mix steered and unsteered positions)."""
    for name in CACHE_ARGUMENT_NAMES:
        main_cache = kwargs.get(name)
        if isinstance(main_cache, Cache) and get_pass1_cache(main_cache) is not None and main_cache.get_seq_length():
            raise ValueError(
                f"This cache was filled by the TOAST adapter "
                f"{getattr(get_pass1_cache(main_cache), ADAPTER_ATTR, '?')!r}, but adapters are disabled now: the base "
                f"model would attend to steered keys and values, which is neither the base model nor TOAST. Start "
                f"from an empty cache under `disable_adapter()`, or continue this one with the adapter enabled."
            )


def _tagged(pass1_cache: Cache, adapter_name: str) -> Cache:
    setattr(pass1_cache, ADAPTER_ATTR, adapter_name)
    return pass1_cache


def attach_to_output(output, pass1_cache: Optional[Cache]) -> None:
    """Tie the pass-1 cache to the main cache the model created and returned (`use_cache=True` without a cache)."""
    if pass1_cache is None or output is None:
        return
    for name in CACHE_ARGUMENT_NAMES:
        main_cache = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
        if isinstance(main_cache, Cache):
            attach_pass1_cache(main_cache, pass1_cache)
            return
