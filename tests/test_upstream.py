"""Tests of `peft_toast.upstream`: every upstream internal that peft-toast patches or relies on is still there, in the
shape we use it. Each failure names the internal, so that a PEFT / transformers / torch upgrade that moves one fails
here first, loudly, instead of silently deep inside a forward call or a save."""

from __future__ import annotations

import ast
import copy
import inspect
import pathlib

import pytest
import torch
import transformers
from conftest import make_llama
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import PeftType
from transformers.cache_utils import DynamicCache

import peft_toast
from peft_toast import ToastConfig, ToastModel, upstream


def _parameters(function) -> list[inspect.Parameter]:
    return list(inspect.signature(function).parameters.values())


@pytest.mark.parametrize("name", upstream.BASE_TUNER_OVERRIDES)
def test_each_overridden_base_tuner_method_exists_upstream_with_our_parameters(name):
    assert hasattr(BaseTuner, name), f"peft's BaseTuner no longer has `{name}`, which ToastModel overrides"
    ours, theirs = _parameters(getattr(ToastModel, name)), _parameters(getattr(BaseTuner, name))
    variadic = {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}
    if any(parameter.kind in variadic for parameter in ours):
        return  # ours takes anything
    names = {parameter.name for parameter in ours}
    missing = [p.name for p in theirs if p.kind not in variadic and p.name not in names]
    assert not missing, f"BaseTuner.{name} now takes {missing}, which ToastModel.{name} does not accept"


def test_the_override_list_is_complete():
    """Every private BaseTuner method that ToastModel defines is in the list (so the test above checks it)."""
    defined = {name for name in vars(ToastModel) if name.startswith("_") and not name.startswith("__")}
    overridden = {name for name in defined if callable(getattr(BaseTuner, name, None))} - {"_abc_impl"}
    assert overridden == set(upstream.BASE_TUNER_OVERRIDES)


@pytest.mark.parametrize("name", upstream.PEFT_MODEL_TUNER_HOOKS)
def test_peft_model_still_calls_the_tuner_hooks_we_define(name):
    assert callable(getattr(ToastModel, name, None))
    assert f"base_model.{name}" in inspect.getsource(PeftModel), f"PeftModel no longer calls `base_model.{name}`"


def test_peft_type_enum_internals_used_by_add_peft_type():
    assert issubclass(PeftType, str), "PeftType is no longer a str enum"
    if hasattr(type(PeftType), "_add_member_") or hasattr(PeftType, "_add_member_"):
        return
    for internal in ("_member_map_", "_value2member_map_", "_member_names_"):
        assert hasattr(PeftType, internal), f"the enum internal PeftType.{internal} is gone"
    assert PeftType("TOAST") is PeftType.TOAST is PeftType["TOAST"]


def test_peft_model_methods_wrapped_for_the_model_card():
    card = PeftModel.create_or_update_model_card
    assert getattr(card, "_toast_wrapped", False), "the model-card patch is not in place"
    assert [p.name for p in _parameters(card.__wrapped__)][:2] == ["self", "output_dir"]
    upload = PeftModel._upload_modified_files.__wrapped__
    assert [p.name for p in _parameters(upload)][:3] == ["self", "working_dir", "repo_id"]
    # push_to_hub must still reach the upload method that the patch wraps.
    push = inspect.getsource(transformers.utils.hub.PushToHubMixin.push_to_hub)
    assert "_upload_modified_files" in push, "push_to_hub no longer calls _upload_modified_files"


def test_every_mirrored_cache_method_exists():
    missing = [name for name in upstream.MIRRORED_CACHE_METHODS if not callable(getattr(DynamicCache, name, None))]
    assert not missing, f"transformers' Cache no longer has {missing}; generate's reordering would not reach pass 1"


def test_redirected_cache_queries_take_a_layer_index_and_read_cache_layers():
    for name in upstream.REDIRECTED_CACHE_QUERIES:
        parameters = inspect.signature(getattr(DynamicCache, name)).parameters
        assert "layer_idx" in parameters, (
            f"Cache.{name} no longer takes `layer_idx`; shared KV layers would be mis-sized"
        )
    assert isinstance(DynamicCache().layers, list), "Cache.layers is no longer a list; the passes cannot share layers"


def test_redirected_queries_answer_about_the_other_layer_and_survive_a_deep_copy():
    cache = DynamicCache()
    for index, length in enumerate((5, 3)):  # layer 0 holds 5 positions, layer 1 holds 3
        cache.update(torch.zeros(1, 1, length, 2), torch.zeros(1, 1, length, 2), index)
    upstream.redirect_cache_layer_queries(cache, {0: 1})
    assert cache.get_seq_length() == cache.get_seq_length(0) == cache.get_seq_length(layer_idx=0) == 3
    assert cache.get_mask_sizes(2, 0) == cache.get_mask_sizes(2, 1) == (5, 0)  # 3 past + 2 new
    copied = copy.deepcopy(cache)
    copied.layers[1].crop(-1)
    assert copied.get_seq_length() == 2 and cache.get_seq_length() == 3


def test_mirrored_calls_reach_the_follower_and_survive_a_deep_copy():
    calls = []

    class Follower:
        def crop(self, length):
            calls.append(("follower", length))

    main = DynamicCache()
    follower = Follower()
    upstream.mirror_cache_calls(main, lambda cache: getattr(cache, "follower", None))
    main.follower = follower
    main.crop(3)
    assert calls == [("follower", 3)]
    copied = copy.deepcopy(main)
    copied.follower = Follower()
    copied.crop(1)  # the copy's bound method repeats the call on the copy's follower, not the original's
    assert calls[-1] == ("follower", 1) and len(calls) == 2


def test_blocks_keep_their_gradient_checkpointing_function():
    model = get_peft_model(make_llama(), ToastConfig())
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    blocks = model.base_model.architecture.blocks
    assert all(getattr(block, "gradient_checkpointing", False) for block in blocks)
    assert all(callable(getattr(block, "_gradient_checkpointing_func", None)) for block in blocks)
    model(input_ids=torch.arange(1, 7)[None])  # the first call wraps them
    assert all(getattr(block._gradient_checkpointing_func, "_toast_wrapped", False) for block in blocks)


def test_wrapping_checkpointing_twice_wraps_once():
    class Block:
        gradient_checkpointing = True

        @staticmethod
        def _gradient_checkpointing_func(function, *args):
            return function(*args)

    block = Block()

    def wrapper(function):
        if getattr(function, "_toast_wrapped", False):
            return function

        def wrapped(*args):
            return function(*args)

        wrapped._toast_wrapped = True
        return wrapped

    upstream.wrap_block_checkpointing([block], wrapper)
    once = block._gradient_checkpointing_func
    upstream.wrap_block_checkpointing([block], wrapper)
    assert block._gradient_checkpointing_func is once and once(lambda x: x + 1, 1) == 2


def _reached_attributes(tree: ast.AST) -> set[str]:
    """Attribute names a module reaches: `x.name`, and `getattr/setattr/hasattr(x, "name")`."""
    names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "setattr", "hasattr"):
            if len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                names.add(node.args[1].value)
    return names


def test_only_upstream_touches_upstream_internals():
    """The patched internals are reached from `upstream.py` only (the rest of the package calls its functions)."""
    internals = {"_member_map_", "_value2member_map_", "_member_names_", "_add_member_", "_upload_modified_files"}
    internals |= {"create_or_update_model_card", "_gradient_checkpointing_func"}
    package = pathlib.Path(peft_toast.__file__).parent
    reached = {
        path.name: _reached_attributes(ast.parse(path.read_text())) & internals for path in package.glob("*.py")
    }
    assert reached.pop("upstream.py") == internals  # the check looks for the right names
    assert not any(reached.values()), f"go through peft_toast.upstream: {reached}"
