"""`ToastModel` under PEFT's generic test battery, on tiny random ViT and LLaMA models.

The checks mirror PEFT's own suite (`tests/testing_common.py`, `tests/test_custom_models.py`; listed in
`peft-integration.md`), plus an independent recomputation of the TOAST output from the saved adapter tensors with plain
tensor operations, and a check that `docs/format.md` describes what `save_pretrained` actually writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import HIDDEN, LAYERS, MODEL_FACTORIES, NUM_LABELS, make_inputs, randomize_adapter
from peft import PeftModel, get_base_model_state_dict, get_peft_model
from safetensors.torch import load_file

from peft_toast import ToastConfig, ToastLayer
from peft_toast.state import current_state

KINDS = ("vit", "llama")
ADAPTER_FILES = {"adapter_model.safetensors", "adapter_config.json", "README.md"}
FORMAT_DOC = Path(__file__).resolve().parents[1] / "docs" / "format.md"


# ------------------------------------------------------------------------------------------------ helpers


def _config(kind: str, **kwargs) -> ToastConfig:
    if kind == "llama":
        kwargs.setdefault("task_type", "CAUSAL_LM")
    return ToastConfig(**kwargs)


def _base(kind: str):
    """A tiny random base model; every call builds the same weights (a fresh instance, as in a fresh process)."""
    torch.manual_seed(0)
    model = MODEL_FACTORIES[kind]()
    # transformers initialises biases to zero; random ones make a value bias added twice (a reference quirk) visible.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(std=0.1)
    return model


def _randomize(model, seed: int = 0) -> None:
    """Random TOAST tensors and a perturbed task head, so that every saved tensor visibly matters."""
    randomize_adapter(model, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)


def _toast(kind: str, *, randomize: bool = True, seed: int = 0, adapter_name: str = "default", **config):
    model = get_peft_model(_base(kind), _config(kind, **config), adapter_name=adapter_name)
    if randomize:
        _randomize(model, seed)
    return model


def _logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _labels(kind: str, inputs: dict) -> torch.Tensor:
    if kind == "vit":
        return torch.arange(len(inputs["pixel_values"])) % NUM_LABELS
    return inputs["input_ids"]


def _adapter_component(name: str, adapter_name: str) -> bool:
    return adapter_name in name.split(".")


def _expected_trainable(model, adapter_name: str = "default") -> set[str]:
    """Names of the parameters that should train: the adapter's TOAST parameters (minus frozen ones) and its head."""
    config = model.peft_config[adapter_name]
    trains = {
        "toast_down": config.train_down,
        "toast_readout": config.train_readout,
        "toast_prompt": config.train_prompt,
    }
    frozen = [part for part, flag in trains.items() if not flag]
    names = set()
    for name, _ in model.named_parameters():
        if not _adapter_component(name, adapter_name):
            continue
        if ".modules_to_save." in name or ("toast_" in name and not any(f".{part}." in name for part in frozen)):
            names.add(name)
    return names


def _saved_name(state_dict_key: str, adapter_name: str) -> str:
    """The key an adapter tensor gets in `adapter_model.safetensors`: no adapter name, no `modules_to_save`."""
    return ".".join(part for part in state_dict_key.split(".") if part not in (adapter_name, "modules_to_save"))


def _own_tensors(model, adapter_name: str) -> dict[str, torch.Tensor]:
    """The tensors of exactly one adapter, keyed as they must be saved (computed from the module tree, not by PEFT)."""
    return {
        _saved_name(key, adapter_name): value
        for key, value in model.state_dict().items()
        if _adapter_component(key, adapter_name) and ("toast_" in key or ".modules_to_save." in key)
    }


def _assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


# ------------------------------------------------------------------------------------------------ creation


def test_adapter_name_is_in_every_adapter_parameter_name(kind):
    model = _toast(kind, randomize=False, adapter_name="other")
    adapter = [name for name, _ in model.named_parameters() if "toast_" in name or "modules_to_save" in name]
    assert adapter and all(_adapter_component(name, "other") for name in adapter)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == _expected_trainable(model, "other")


def test_default_config_starts_exactly_at_the_frozen_model(kind):
    inputs = make_inputs(kind)
    expected = _logits(_base(kind), inputs)
    model = _toast(kind, randomize=False)
    assert torch.equal(_logits(model, inputs), expected), "zero readouts must give the frozen model's function"
    _randomize(model)
    assert not torch.allclose(_logits(model, inputs), expected, atol=1e-3)


def test_trainable_parameter_count_matches_the_formula(kind, capsys):
    model = _toast(kind, randomize=False)
    head = NUM_LABELS * HIDDEN + NUM_LABELS if kind == "vit" else 0  # classifier weight + bias; LLaMA trains no head
    maps = 2 if kind == "vit" else 1  # A_l and C_l per block; a decoder's default freezes A_l (`train_down=None`)
    expected = LAYERS * maps * HIDDEN**2 + HIDDEN + head  # the maps, the prompt, the head
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == expected
    model.print_trainable_parameters()
    assert f"trainable params: {expected:,}" in capsys.readouterr().out


def test_layers_to_transform_subset(kind):
    model = _toast(kind, randomize=False, layers_to_transform=[1, -1])  # blocks 1 and 3 of 4
    layers = {layer.block_index: layer for layer in model.modules() if isinstance(layer, ToastLayer)}
    assert sorted(layers) == [1, 2, 3], "the chain runs from the top down to the lowest selected block"
    assert {i for i, layer in layers.items() if "default" in layer.toast_readout} == {1, 3}
    assert all("default" in layer.toast_down for layer in layers.values())
    saved = _own_tensors(model, "default")
    assert not any(".layers.0." in key for key in saved), "blocks below the selection hold nothing"


# ------------------------------------------------------------------------------------------------ save / load


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_save_and_load_round_trip(kind, tmp_path, safe_serialization):
    inputs = make_inputs(kind)
    model = _toast(kind)
    expected = _logits(model, inputs)
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    weights = "adapter_model.safetensors" if safe_serialization else "adapter_model.bin"
    assert set(os.listdir(tmp_path)) == ADAPTER_FILES - {"adapter_model.safetensors"} | {weights}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(_base(kind), tmp_path)
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    assert torch.equal(_logits(loaded, inputs), expected)
    _assert_same_tensors(_own_tensors(loaded, "default"), _own_tensors(model, "default"))


def test_selected_adapters_are_saved_in_subfolders(kind, tmp_path):
    inputs = make_inputs(kind)
    model = _toast(kind, randomize=False)
    model.add_adapter("other", _config(kind))
    _randomize(model)
    model.save_pretrained(tmp_path, selected_adapters=["default", "other"])
    assert set(os.listdir(tmp_path)) == ADAPTER_FILES | {"other"}
    assert set(os.listdir(tmp_path / "other")) == ADAPTER_FILES - {"README.md"}  # one model card, at the top

    for name, folder in (("default", tmp_path), ("other", tmp_path / "other")):
        _assert_same_tensors(load_file(folder / "adapter_model.safetensors"), _own_tensors(model, name))
        model.set_adapter(name)
        loaded = PeftModel.from_pretrained(_base(kind), folder, adapter_name=name)
        assert torch.equal(_logits(loaded, inputs), _logits(model, inputs))


def test_adapter_names_that_are_substrings_save_only_their_own_tensors(kind, tmp_path):
    names = ["default", "default2", "other_default", "efaul"]
    model = _toast(kind, randomize=False, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, _config(kind))
    _randomize(model)
    model.save_pretrained(tmp_path, selected_adapters=names)
    saved = {}
    for name in names:
        folder = tmp_path if name == "default" else tmp_path / name
        saved[name] = load_file(folder / "adapter_model.safetensors")
        _assert_same_tensors(saved[name], _own_tensors(model, name))
    assert len({tuple(sorted(tensors)) for tensors in saved.values()}) == 1, "keys do not depend on the adapter name"


def test_load_adapter_under_new_names(kind, tmp_path):
    inputs = make_inputs(kind)
    model = _toast(kind)
    expected = _logits(model, inputs)
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(_base(kind), tmp_path, adapter_name="renamed")
    assert torch.equal(_logits(loaded, inputs), expected)
    for name in ("first", "second"):
        result = loaded.load_adapter(tmp_path, adapter_name=name)
        assert result.missing_keys == []
        assert not [key for key in result.unexpected_keys if "toast_" in key]
    for name in ("renamed", "first", "second"):
        loaded.set_adapter(name)
        assert torch.equal(_logits(loaded, inputs), expected), name


def test_low_cpu_mem_usage_loading(kind, tmp_path):
    inputs = make_inputs(kind)
    model = _toast(kind)
    expected = _logits(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_base(kind), tmp_path, low_cpu_mem_usage=True)
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    _assert_same_tensors(_own_tensors(loaded, "default"), _own_tensors(model, "default"))
    # Same tensors, but assigned straight from the memory-mapped file: kernels may round differently on its alignment.
    torch.testing.assert_close(_logits(loaded, inputs), expected, rtol=0, atol=1e-6)
    loaded.load_adapter(tmp_path, adapter_name="again", low_cpu_mem_usage=True)
    loaded.set_adapter("again")
    torch.testing.assert_close(_logits(loaded, inputs), expected, rtol=0, atol=1e-6)


def test_device_map_cpu_base(kind, tmp_path):
    inputs = make_inputs(kind)
    model = _toast(kind)
    expected = _logits(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    _base(kind).save_pretrained(tmp_path / "base")
    base = type(_base(kind)).from_pretrained(tmp_path / "base", device_map={"": "cpu"})
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    torch.testing.assert_close(_logits(loaded, inputs), expected, rtol=0, atol=1e-6)


def _offloaded_device_map(kind: str, base) -> dict:
    """Blocks 1 and 2 offloaded to disk, everything else on the CPU: accelerate keeps their weights on the meta device
    and loads them for each forward (an `AlignDevicesHook` with `offload=True` on every leaf module)."""
    blocks = "vit.layers" if kind == "vit" else "model.layers"
    offloaded = {f"{blocks}.1", f"{blocks}.2"}
    device_map = {}

    def cover(module, prefix: str) -> None:
        if prefix in offloaded:
            device_map[prefix] = "disk"
        elif any(name.startswith(prefix + ".") for name in offloaded) or not prefix:
            for name, child in module.named_children():
                cover(child, f"{prefix}.{name}" if prefix else name)
        else:
            device_map[prefix] = "cpu"

    cover(base, "")
    return device_map


def test_offloaded_base_trains_and_loads_like_a_loaded_one(kind, tmp_path):
    """`device_map` with disk offload: the adapter tensors of offloaded blocks live on the execution device (not on
    meta with the weights), a saved adapter's tensors load onto them, outputs and a training step's gradients equal the
    fully loaded model's, and (decoders) cached generation equals uncached. (`PeftModel.from_pretrained` onto a
    disk-offloaded base re-dispatches the model through PEFT's own offload path, which needs a device map of the
    PeftModel's names; not covered here.)"""
    from peft import set_peft_model_state_dict

    inputs = make_inputs(kind)
    model = _toast(kind)
    model.save_pretrained(tmp_path / "adapter")
    _base(kind).save_pretrained(tmp_path / "base")
    base_class = type(_base(kind))
    device_map = _offloaded_device_map(kind, _base(kind))
    offloaded = base_class.from_pretrained(tmp_path / "base", device_map=device_map, offload_folder=tmp_path / "off")
    assert any(p.is_meta for p in offloaded.parameters())  # really offloaded
    loaded = get_peft_model(offloaded, _config(kind))
    result = set_peft_model_state_dict(loaded, load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert not [key for key in result.missing_keys if "toast_" in key]
    own = _own_tensors(loaded, "default")
    assert own and not any(t.is_meta for t in own.values())
    _assert_same_tensors(own, _own_tensors(model, "default"))
    reference = PeftModel.from_pretrained(
        base_class.from_pretrained(tmp_path / "base"), tmp_path / "adapter", is_trainable=True
    )
    reference.train()
    torch.testing.assert_close(_logits(loaded, inputs), _logits(reference, inputs), rtol=0, atol=1e-6)
    loaded.train()
    labels = _labels(kind, inputs)
    for peft_model in (loaded, reference):
        peft_model(**inputs, labels=labels).loss.backward()
    for (name, parameter), (_, expected) in zip(loaded.named_parameters(), reference.named_parameters()):
        if "toast_" in name:
            assert (parameter.grad is not None) == parameter.requires_grad, name  # frozen down-maps: no gradient
            if parameter.requires_grad:
                torch.testing.assert_close(parameter.grad, expected.grad, rtol=1e-5, atol=1e-7)
    if kind == "llama":
        loaded.eval()
        kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        cached = loaded.generate(input_ids=inputs["input_ids"], **kwargs)
        assert torch.equal(cached, loaded.generate(input_ids=inputs["input_ids"], use_cache=False, **kwargs))


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize(
    "kind, config",
    [
        ("vit", {}),
        ("llama", {}),
        ("llama", {"feedback_rank": 2, "channel_selection": "low_rank"}),
        ("vit", {"lite_rank": 2, "channel_selection": "full", "train_down": False, "train_prompt": False}),
    ],
    ids=["vit-default", "llama-default", "llama-low-rank", "vit-lite-frozen-down-and-prompt"],
)
def test_exactly_the_adapter_parameters_get_gradients_and_change(kind, config):
    inputs = make_inputs(kind)
    model = _toast(kind, **config)
    model.train()
    expected = _expected_trainable(model)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == expected
    if kind == "vit":
        assert any("classifier.modules_to_save" in name for name in expected), "ViT trains its head by default"
    else:
        assert not any("lm_head" in name for name in expected), "a causal LM's head stays frozen"

    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        optimizer.zero_grad()
        model(**inputs, labels=_labels(kind, inputs)).loss.backward()
        if step == 0:
            with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
            assert with_grad == expected
            assert all(p.grad.abs().sum() > 0 for name, p in model.named_parameters() if name in expected)
        optimizer.step()
    changed = {name for name, param in model.named_parameters() if not torch.equal(param, before[name])}
    assert changed == expected


def test_training_from_the_exact_start_moves_every_trainable_parameter(kind):
    """Zero readouts block the gradient of everything below them at step 0 only: a few steps reach every tensor."""
    inputs = make_inputs(kind)
    model = _toast(kind, randomize=False)
    model.train()
    expected = _expected_trainable(model)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(**inputs, labels=_labels(kind, inputs)).loss.backward()
        optimizer.step()
    assert {name for name, param in model.named_parameters() if not torch.equal(param, before[name])} == expected


def test_requires_grad_follows_the_active_adapter_and_inference_mode(kind):
    model = _toast(kind, randomize=False)
    model.add_adapter("other", _config(kind, channel_selection="full"))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == _expected_trainable(model, "default")
    model.set_adapter("other")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == _expected_trainable(model, "other")
    assert any("toast_channel" in name for name in _expected_trainable(model, "other"))
    model.set_adapter("other", inference_mode=True)
    assert not any(p.requires_grad for p in model.parameters())


def test_set_requires_grad_covers_the_selection_and_keeps_a_frozen_prompt_frozen(kind):
    """PEFT's `set_requires_grad` reaches the prompts and channel maps (`model.toast`), and `train_prompt=False` holds."""
    model = _toast(kind, randomize=False, train_prompt=False, channel_selection="full")
    model.add_adapter("other", _config(kind, channel_selection="full"))
    default = {n for n in _expected_trainable(model, "default") if ".modules_to_save." not in n}
    other = {n for n in _expected_trainable(model, "other") if ".modules_to_save." not in n}
    assert any("toast_channel" in n for n in default) and not any("toast_prompt" in n for n in default)
    assert any("toast_prompt" in n for n in other)

    def adapter_trainable():
        return {n for n, p in model.named_parameters() if p.requires_grad and "toast_" in n}

    assert adapter_trainable() == default
    model.set_requires_grad("other")
    assert adapter_trainable() == default | other
    model.set_requires_grad("default", requires_grad=False)
    assert adapter_trainable() == other
    model.set_requires_grad(["default", "other"])
    assert adapter_trainable() == default | other, "the frozen prompt of 'default' must stay frozen"


def test_requires_grad_follows_is_trainable_on_load(kind, tmp_path):
    _toast(kind).save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(_base(kind), tmp_path)  # is_trainable=False by default
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = PeftModel.from_pretrained(_base(kind), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == _expected_trainable(trainable)


# ------------------------------------------------------------------------------------------------ lifecycle


def test_disable_adapter_gives_the_base_model_and_restores(kind):
    inputs = make_inputs(kind)
    base_logits = _logits(_base(kind), inputs)
    model = _toast(kind)
    adapted = _logits(model, inputs)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)
    with model.disable_adapter():
        assert torch.equal(_logits(model, inputs), base_logits)
    assert torch.equal(_logits(model, inputs), adapted)


def test_delete_adapter_leaves_no_entry(kind):
    inputs = make_inputs(kind)
    model = _toast(kind, channel_selection="full")
    expected = _logits(model, inputs)
    model.add_adapter("other", _config(kind, channel_selection="full"))
    model.delete_adapter("other")

    tuner = model.base_model
    assert "other" not in model.peft_config
    assert "other" not in tuner.toast_prompt and "other" not in tuner.toast_channel
    for layer in model.modules():
        if isinstance(layer, ToastLayer):
            assert "other" not in layer.toast_down and "other" not in layer.toast_readout
    assert not [key for key in model.state_dict() if _adapter_component(key, "other")]
    assert model.active_adapters == ["default"]
    assert torch.equal(_logits(model, inputs), expected)
    with pytest.raises(ValueError):
        model.delete_adapter("unknown")


def _hook_counts(model) -> dict[str, tuple[int, int]]:
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}


def test_unload_returns_the_base_model_without_toast(kind):
    inputs = make_inputs(kind)
    reference = _base(kind)
    model = _toast(kind)
    # PEFT's `unload` keeps the trained copy of each module in `modules_to_save` (ViT's head): expect that one changed.
    trained_head = {
        key.removeprefix("base_model.model."): value
        for key, value in _own_tensors(model, "default").items()
        if "toast_" not in key
    }
    assert bool(trained_head) == (kind == "vit")
    reference.load_state_dict(trained_head, strict=False)
    assert _hook_counts(model.get_base_model()) != _hook_counts(reference), "TOAST installs forward hooks"
    unloaded = model.unload()
    assert type(unloaded) is type(reference)
    assert not any(isinstance(m, ToastLayer) for m in unloaded.modules())
    assert not any("toast_" in name or "modules_to_save" in name for name, _ in unloaded.named_parameters())
    assert _hook_counts(unloaded) == _hook_counts(reference), "no leftover forward (pre-)hooks anywhere"
    _assert_same_tensors(unloaded.state_dict(), reference.state_dict())
    assert torch.equal(_logits(unloaded, inputs), _logits(reference, inputs))


def test_merge_raises_and_leaves_the_model_untouched(kind):
    inputs = make_inputs(kind)
    model = _toast(kind)
    expected = _logits(model, inputs)
    for merge in (model.merge_and_unload, model.base_model.merge_adapter):
        with pytest.raises(NotImplementedError, match="cannot be merged"):
            merge()
    assert any(isinstance(m, ToastLayer) for m in model.modules())
    assert torch.equal(_logits(model, inputs), expected)


def test_mixed_adapter_batches_are_rejected(kind):
    inputs = make_inputs(kind)
    model = _toast(kind)
    with pytest.raises(ValueError, match="mixed-adapter batches"):
        model(**inputs, adapter_names=["default", "default"])
    assert current_state() is None


def test_get_base_model_state_dict_returns_exactly_the_base_weights(kind):
    reference = _base(kind)
    model = _toast(kind)
    _assert_same_tensors(get_base_model_state_dict(model), reference.state_dict())


# ------------------------------------------------------------------------------------------------ dtypes and inputs


@pytest.mark.parametrize(
    "kind, dtype, autocast_adapter_dtype",
    [
        ("vit", torch.float16, True),
        ("vit", torch.bfloat16, False),
        ("llama", torch.bfloat16, True),
        ("llama", torch.float16, False),
    ],
    ids=["vit-fp16-autocast", "vit-bf16-no-autocast", "llama-bf16-autocast", "llama-fp16-no-autocast"],
)
def test_half_precision_base(kind, dtype, autocast_adapter_dtype):
    inputs = make_inputs(kind)
    reference = _toast(kind)
    reference_logits = _logits(reference, inputs)
    model = get_peft_model(_base(kind).to(dtype), _config(kind), autocast_adapter_dtype=autocast_adapter_dtype)
    # The same adapter values as the fp32 reference, in whatever dtype the adapter lives in.
    adapter_dtype = torch.float32 if autocast_adapter_dtype else dtype
    own = {key: value for key, value in model.state_dict().items() if "toast_" in key or ".modules_to_save." in key}
    for key, value in own.items():
        # PEFT upcasts adapter weights only; a trained head stays in the base dtype.
        assert value.dtype == (adapter_dtype if "toast_" in key else dtype), key
    model.load_state_dict({key: reference.state_dict()[key] for key in own}, strict=False)

    if kind == "vit":
        inputs = {"pixel_values": inputs["pixel_values"].to(dtype)}
    logits = _logits(model, inputs)
    assert logits.dtype == dtype
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits.float(), reference_logits, rtol=0.05, atol=0.05)


def test_inputs_embeds_equals_input_ids():
    inputs = make_inputs("llama")
    model = _toast("llama")
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with torch.no_grad():
        by_ids = model(**inputs).logits
        by_embeds = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(by_embeds, by_ids, rtol=0, atol=1e-6)


# -------------------------------------------------------------------------------------------- the math, independently


def _feedback_weight(tensors: dict, prefix: str, identity_base: bool) -> torch.Tensor | None:
    """The `(d, d)` matrix of one saved feedback map, from its tensors as `docs/format.md` describes them."""
    if f"{prefix}.u" in tensors:
        weight = tensors[f"{prefix}.u"] @ tensors[f"{prefix}.v"]
        return weight + torch.eye(weight.shape[0]) if identity_base else weight
    if f"{prefix}.weight" not in tensors:
        return None
    weight = tensors[f"{prefix}.weight"]
    if f"{prefix}.delta_u" in tensors:
        weight = weight + tensors[f"{prefix}.delta_u"] @ tensors[f"{prefix}.delta_v"]
    return weight


def _plain_toast_logits(
    kind: str, base, tensors: dict, config: dict, inputs: dict, dropout_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """TOAST recomputed from saved tensors on a plain transformers model: no PEFT, no `peft_toast` code.

    `dropout_mask` (`(B, N, d)`, entries 0 or 1 / (1 - p)) multiplies the selected tokens before they go down, as
    `feedback_dropout` does in training."""
    if kind == "vit":
        values = [block.attention.v_proj for block in base.vit.layers]
        key = "base_model.model.vit.layers.{}.attention.v_proj"
        base.classifier.load_state_dict({n: tensors[f"base_model.model.classifier.{n}"] for n in ("weight", "bias")})
    else:
        values = [block.self_attn.v_proj for block in base.model.layers]
        key = "base_model.model.model.layers.{}.self_attn.v_proj"
    with torch.no_grad():
        # Pass 1. ViT: after the final LayerNorm. LLaMA: the last decoder block's output before the final RMSNorm (in
        # transformers 5.x `hidden_states[-1]` is *after* the norm, so read the block's output directly).
        if kind == "vit":
            x = base.vit(**inputs).last_hidden_state  # (B, N, d)
        else:
            captured = []
            handle = base.model.layers[-1].register_forward_hook(lambda m, a, out: captured.append(out))
            base.model(**inputs)
            handle.remove()
            x = captured[0][0] if isinstance(captured[0], tuple) else captured[0]  # (B, N, d)

        if config["feature_norm"] == "rms":  # each token over its root mean square (the decoder default)
            x = x / x.square().mean(dim=-1, keepdim=True).sqrt().clamp_min(config["cosine_eps"])
        prompt = tensors["base_model.model.toast.toast_prompt"]  # (d,)
        norms = x.norm(dim=-1).clamp_min(config["cosine_eps"]) * prompt.norm().clamp_min(config["cosine_eps"])
        gates = ((x @ prompt) / norms).clamp(0, 1)  # (B, N)
        z = gates[..., None] * x
        channel = _feedback_weight(tensors, "base_model.model.toast.toast_channel", identity_base=True)
        if channel is not None:
            z = z @ channel.T
        if dropout_mask is not None:
            z = z * dropout_mask

        signals = {}
        for index in reversed(range(len(values))):
            down = _feedback_weight(tensors, key.format(index) + ".toast_down", config["down_init"] == "identity")
            if down is None:
                break
            z = z @ down.T  # z_{l-1} = A_l z_l
            readout = _feedback_weight(
                tensors, key.format(index) + ".toast_readout", config["readout_init"] == "identity"
            )
            if readout is not None:
                signals[index] = z @ readout.T  # t_l = C_l z_{l-1}

        # Pass 2: V = W_v (u + t_l) + b_v, i.e. add W_v t_l to the value projection's output.
        handles = [
            values[index].register_forward_hook(lambda m, a, out, t=t: out + t @ m.weight.T)
            for index, t in signals.items()
        ]
        try:
            return base(**inputs).logits
        finally:
            for handle in handles:
                handle.remove()


@pytest.mark.parametrize(
    "kind, config",
    [
        ("vit", {}),
        ("vit", {"lite_rank": 2, "channel_selection": "full", "layers_to_transform": [1, 3]}),
        ("llama", {}),
        ("llama", {"feedback_rank": 3, "channel_selection": "low_rank", "down_init": "reference"}),
    ],
    ids=["vit-default", "vit-lite-subset", "llama-default", "llama-low-rank"],
)
def test_output_recomputed_from_saved_tensors_with_plain_torch(kind, config, tmp_path):
    inputs = make_inputs(kind, batch=3)
    reference = _base(kind)
    model = _toast(kind, **config)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    saved_config = json.loads((tmp_path / "adapter_config.json").read_text())

    expected = _plain_toast_logits(kind, reference, tensors, saved_config, inputs)
    torch.testing.assert_close(_logits(model, inputs), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(expected, _logits(_base(kind), inputs), atol=1e-3), "the adapter must matter"


def test_feedback_dropout_drops_the_selected_tokens_in_training_only(tmp_path):
    """In training, `feedback_dropout` multiplies the selected tokens by one dropout mask before the feedback chain
    (recomputed here from the saved tensors with that mask: the tiny ViT has no dropout of its own, so the mask is the
    only draw of the call); in eval it does nothing."""
    inputs = make_inputs("vit", batch=3)
    model = _toast("vit", feedback_dropout=0.5)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    saved_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved_config["feedback_dropout"] == 0.5

    model.train()
    torch.manual_seed(7)
    with torch.no_grad():
        trained = model(**inputs).logits
    torch.manual_seed(7)
    tokens = model.base_model.model.vit.embeddings(inputs["pixel_values"]).shape[1]
    mask = torch.nn.functional.dropout(torch.ones(3, tokens, HIDDEN), p=0.5)  # the same draw
    assert (mask == 0).any() and (mask == 2).any()
    expected = _plain_toast_logits("vit", _base("vit"), tensors, saved_config, inputs, dropout_mask=mask)
    torch.testing.assert_close(trained, expected, rtol=0, atol=1e-5)
    undropped = _plain_toast_logits("vit", _base("vit"), tensors, saved_config, inputs)
    assert not torch.allclose(trained, undropped, atol=1e-3), "the mask must matter"

    model.eval()
    torch.testing.assert_close(_logits(model, inputs), undropped, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ docs/format.md

# The saves that docs/format.md lists, by the name of their `<!-- listing:NAME -->` marker.
FORMAT_EXAMPLES = {
    "vit-default": ("vit", {}),
    "llama-low-rank": ("llama", {"feedback_rank": 2, "channel_selection": "low_rank", "channel_rank": 3}),
    "vit-lite-subset": ("vit", {"lite_rank": 2, "channel_selection": "full", "layers_to_transform": [2, 3]}),
}


def _saved_example(name: str, tmp_path: Path) -> tuple[object, dict[str, torch.Tensor]]:
    kind, config = FORMAT_EXAMPLES[name]
    model = _toast(kind, randomize=False, **config)
    model.save_pretrained(tmp_path)
    return model, load_file(tmp_path / "adapter_model.safetensors")


def _documented_key_patterns() -> list[tuple[re.Pattern, str]]:
    """`(key regex, shape formula)` for every row of the key table in docs/format.md."""
    table = FORMAT_DOC.read_text().split("<!-- keys:begin -->")[1].split("<!-- keys:end -->")[0]
    placeholders = {
        re.escape("{value}"): r"(?P<value>[\w.]+\.\d+\.[\w.]+)",  # a module path through a block index
        re.escape("{head}"): r"(?P<head>(?:(?!toast_)[\w.])+)",
    }
    patterns = []
    for row in table.splitlines():
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        regex = re.escape(cells[0].strip("`"))
        for placeholder, group in placeholders.items():
            regex = regex.replace(placeholder, group)
        patterns.append((re.compile(regex + "$"), cells[1].strip("`")))
    return patterns


@pytest.mark.parametrize("name", FORMAT_EXAMPLES)
def test_saved_keys_match_docs_format(name, tmp_path):
    patterns = _documented_key_patterns()
    assert len(patterns) >= 10, "docs/format.md lost its key table between <!-- keys:begin --> and <!-- keys:end -->"
    model, tensors = _saved_example(name, tmp_path)
    config = model.peft_config["default"]
    sizes = {"d": HIDDEN, "r": config.feedback_rank, "k": config.lite_rank, "c": config.channel_rank}
    base = model.get_base_model()
    for key, tensor in tensors.items():
        matches = [(pattern.match(key), shape) for pattern, shape in patterns if pattern.match(key)]
        assert len(matches) == 1, f"{key} matches {len(matches)} rows of the documented key table"
        match, shape = matches[0]
        groups = match.groupdict()
        if "head" in groups:
            original = base.get_submodule(groups["head"]).original_module
            assert tensor.shape == getattr(original, key.rsplit(".", 1)[1]).shape, key
            continue
        if "value" in groups:
            assert isinstance(base.get_submodule(groups["value"]), ToastLayer), key
        assert tuple(tensor.shape) == eval(shape, {}, sizes), key  # shape formulas such as "(d, r)"


def _documented_listing(name: str) -> list[str]:
    after = FORMAT_DOC.read_text().split(f"<!-- listing:{name} -->")[1]
    return after.split("```text\n", 1)[1].split("```", 1)[0].splitlines()


@pytest.mark.parametrize("name", FORMAT_EXAMPLES)
def test_docs_format_listings_are_real_saves(name, tmp_path):
    _, tensors = _saved_example(name, tmp_path)
    listing = [
        f"{key}  {tuple(tensors[key].shape)}  {str(tensors[key].dtype).removeprefix('torch.')}"
        for key in sorted(tensors)
    ]
    assert _documented_listing(name) == listing, "update docs/format.md with this listing:\n" + "\n".join(listing)


def test_docs_format_lists_every_config_field(tmp_path):
    documented = FORMAT_DOC.read_text().split("## `adapter_config.json`")[1]
    _saved_example("vit-default", tmp_path)
    fields = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {field.name for field in dataclasses.fields(ToastConfig)} <= set(fields), "every config field is saved"
    missing = sorted(name for name in fields if f"`{name}`" not in documented)
    assert not missing, f"docs/format.md does not describe these adapter_config.json fields: {missing}"
