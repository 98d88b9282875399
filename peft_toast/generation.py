"""The pass-1 KV cache of causal-LM decoding.

Token and channel selection and the feedback path act on each position separately, so a decoder's signal at position
`i` depends only on tokens `<= i` and incremental decoding is exact if pass 1 and pass 2 each keep their own KV cache.
The main cache (the one `generate` or the user threads through the calls) carries pass 2; the pass-1 cache rides on it
as an attribute, so each generate call, each user-held cache and each beam keeps its own, and every operation
`generate` applies to the main cache (beam reordering, batch expansion and selection, cropping, reset) is applied to
the pass-1 cache too.
"""

from __future__ import annotations

import copy
from typing import Optional

from transformers.cache_utils import Cache, DynamicCache

from .upstream import mirror_cache_calls

PASS1_CACHE_ATTR = "_toast_pass1_cache"
ADAPTER_ATTR = "_toast_adapter_name"  # on the pass-1 cache: the adapter whose signals filled the main cache
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")


def get_pass1_cache(main_cache: Cache) -> Optional[Cache]:
    return getattr(main_cache, PASS1_CACHE_ATTR, None)


def attach_pass1_cache(main_cache: Cache, pass1_cache: Cache) -> None:
    """Tie `pass1_cache` to `main_cache` so that it follows every reordering or cropping of the main cache."""
    if get_pass1_cache(main_cache) is pass1_cache:
        return
    setattr(main_cache, PASS1_CACHE_ATTR, pass1_cache)
    mirror_cache_calls(main_cache, get_pass1_cache)


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
        if use_cache is None:
            use_cache = getattr(model.config, "use_cache", False)
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
