"""Tests of `peft_toast.config`: every invalid value of every field raises a `ValueError` that names the field and says
what is accepted, valid values survive `save_pretrained`/`from_pretrained`, and unknown fields from a newer version are
dropped with PEFT's warning while the adapter keeps working."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from conftest import make_bert, make_gpt2, make_inputs, make_llama, make_vit, randomize_adapter
from peft import PeftConfig, PeftModel, get_peft_model

from peft_toast import ToastConfig

NAN, INF = float("nan"), float("inf")

# Every field ToastConfig adds to PeftConfig, with values it must refuse.
INVALID = {
    "target_modules": [5, [], [""], ["v_proj", 3]],
    "layers_to_transform": ["0", 1.5, [], [0, 0], [True], [0.5]],
    "feedback_rank": [0, -1, 1.5, "4", True],
    "lite_rank": [0, "2", False],
    "train_down": ["yes", 1, 0],
    "train_readout": ["no", 0],
    "train_prompt": [None, "True"],
    "share_lower_blocks": [None, "yes", 1],
    "channel_selection": ["diag", None, "Identity"],
    "channel_rank": [0, -2, 2.0, None],
    "down_init": ["zero", None],
    "readout_init": ["identity", "normal"],
    "prompt_init": ["mean", None, "Random"],
    "feature_norm": ["layernorm", None, True],
    "pretuned_on": [1, ["fashion-mnist"]],
    "variational_loss_weight": [-0.1, NAN, INF, "0.1", True, None],
    "feedback_dropout": [-0.1, 1.0, NAN, "0.1", True, None],
    "cosine_eps": [0, -1e-6, NAN, INF, "1e-6", None],
    "modules_to_save": ["classifier", [""], [1]],
    "base_model_dims": [[], {"hidden_size": True}, {"hidden_size": [1]}, {1: 2}],
}

VALID = [
    {},
    {"feedback_rank": 8},
    {"lite_rank": 2, "train_down": False},
    {"channel_selection": "full"},
    {"channel_selection": "low_rank", "channel_rank": 2},
    {"down_init": "reference", "readout_init": "reference"},
    {"train_readout": False, "train_prompt": False},
    {"variational_loss_weight": 0.1, "cosine_eps": 1e-4, "feedback_dropout": 0.1},
    {"prompt_init": "random", "feature_norm": "rms"},
    {"feature_norm": "none", "train_down": True},
    {"pretuned_on": "fashion-mnist classes 0-4, 500 steps"},
    {"target_modules": r".*\.v_proj"},
    {"target_modules": ["v_proj", "value", "v_proj"]},
    {"layers_to_transform": -1},
    {"layers_to_transform": (2, 0)},
    {"modules_to_save": []},
    {"modules_to_save": ["classifier"], "task_type": "SEQ_CLS"},
    {"base_model_dims": {"model_type": "vit", "hidden_size": 32, "num_blocks": 4}},
]


def test_invalid_values_cover_every_field():
    toast_fields = {f.name for f in dataclasses.fields(ToastConfig)} - {f.name for f in dataclasses.fields(PeftConfig)}
    assert set(INVALID) == toast_fields


@pytest.mark.parametrize(
    "name, value", [(name, value) for name, values in INVALID.items() for value in values], ids=repr
)
def test_invalid_value_raises_naming_the_field(name, value):
    with pytest.raises(ValueError) as error:
        ToastConfig(**{name: value})
    message = str(error.value)
    assert f"`{name}`" in message
    assert "must be" in message or "List each block once" in message  # says what is accepted


def test_frozen_head_with_seq_cls_is_refused_and_frozen_without_it():
    """PEFT's SEQ_CLS model adds the head to `modules_to_save` on its own; `[]` with it would silently train the head."""
    with pytest.raises(ValueError, match=r"`modules_to_save=\[\]`.*SEQ_CLS.*Drop `task_type`"):
        ToastConfig(task_type="SEQ_CLS", modules_to_save=[])
    model = get_peft_model(make_vit(num_labels=3), ToastConfig(modules_to_save=[]))
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all("toast_" in name for name in trainable)  # the head stays frozen
    model = get_peft_model(make_vit(num_labels=3), ToastConfig(task_type="SEQ_CLS"))
    assert any("classifier" in name for name, p in model.named_parameters() if p.requires_grad)


def test_feedback_rank_and_lite_rank_are_exclusive():
    with pytest.raises(ValueError, match=r"`feedback_rank` and `lite_rank` are mutually exclusive.*Set only one"):
        ToastConfig(feedback_rank=4, lite_rank=4)


def test_invalid_peft_field_is_refused_by_peft():
    with pytest.raises(ValueError, match="Invalid task type: 'IMAGE_CLS'. Must be one of"):
        ToastConfig(task_type="IMAGE_CLS")


@pytest.mark.parametrize("values", VALID, ids=lambda values: ",".join(values) or "defaults")
def test_valid_values_round_trip(values, tmp_path):
    config = ToastConfig(**copy.deepcopy(values))
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "TOAST"
    for loader in (ToastConfig, PeftConfig):  # PeftConfig dispatches on peft_type through PEFT's registry
        loaded = loader.from_pretrained(str(tmp_path))
        assert type(loaded) is ToastConfig
        assert loaded.to_dict() == config.to_dict()


def test_values_are_normalised_once():
    config = ToastConfig(target_modules=["v_proj", "value", "v_proj"], layers_to_transform=(2, 0))
    assert config.target_modules == ["v_proj", "value"]
    assert config.layers_to_transform == [0, 2]
    assert ToastConfig(layers_to_transform=-1).layers_to_transform == [-1]
    assert ToastConfig(**{k: v for k, v in config.to_dict().items() if k != "peft_type"}).to_dict() == config.to_dict()


def test_unknown_fields_warn_and_the_adapter_keeps_working(tmp_path):
    base = make_vit()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, ToastConfig())
    randomize_adapter(model)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update({"gate_temperature": 0.5, "future_option": {"nested": [1, 2]}})  # fields of a later version
    path.write_text(json.dumps(data))

    with pytest.warns(UserWarning, match=r"Unexpected keyword arguments \['future_option', 'gate_temperature'\]"):
        config = ToastConfig.from_pretrained(str(tmp_path))
    assert not hasattr(config, "future_option")
    with pytest.warns(UserWarning, match="Unexpected keyword arguments"):
        loaded = PeftModel.from_pretrained(reference, tmp_path)
    inputs = make_inputs("vit")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


# ------------------------------------------------------------------------------------- automatic defaults


@pytest.mark.parametrize(
    "make, fields, expected",
    [
        (make_vit, {}, ("none", True)),
        (make_bert, {}, ("none", True)),
        (make_llama, {}, ("rms", False)),
        (make_gpt2, {}, ("rms", False)),
        (make_llama, {"variational_loss_weight": 0.01}, ("rms", True)),  # pre-tuning trains the down-maps
        (make_llama, {"feature_norm": "none", "train_down": True}, ("none", True)),  # explicit values are kept
        (make_vit, {"feature_norm": "rms", "train_down": False}, ("rms", False)),
    ],
    ids=["vit", "bert", "llama", "gpt2", "llama-pretuning", "llama-explicit", "vit-explicit"],
)
def test_automatic_defaults_are_decided_by_the_model_and_saved(make, fields, expected, tmp_path):
    config = ToastConfig(**fields)
    if not fields:
        assert (config.feature_norm, config.train_down) == ("auto", None)
    model = get_peft_model(make(), config)
    resolved = model.peft_config["default"]
    assert (resolved.feature_norm, resolved.train_down) == expected
    down = [parameter for name, parameter in model.named_parameters() if "toast_down" in name]
    assert down and all(parameter.requires_grad == expected[1] for parameter in down)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["feature_norm"], saved["train_down"]) == expected


def test_files_without_the_automatic_fields_load_as_they_were_trained(tmp_path):
    """An adapter file written before `feature_norm="auto"` / `train_down=None` has neither field; it was trained with
    `"none"` and `True`, and must load with them (not with what "auto" would decide for a decoder)."""
    base = make_llama()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, ToastConfig(task_type="CAUSAL_LM", feature_norm="none", train_down=True))
    randomize_adapter(model)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    del data["feature_norm"], data["train_down"]
    path.write_text(json.dumps(data))

    read = ToastConfig.from_pretrained(str(tmp_path))
    assert (read.feature_norm, read.train_down) == ("none", True)
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path)
    assert (loaded.peft_config["default"].feature_norm, loaded.peft_config["default"].train_down) == ("none", True)
    inputs = make_inputs("llama")
    with torch.no_grad():
        expected = model(**inputs).logits
        assert torch.equal(loaded(**inputs).logits, expected)
        data["feature_norm"] = "rms"  # what the decoder default would have read: a different function
        path.write_text(json.dumps(data))
        assert not torch.allclose(PeftModel.from_pretrained(reference, tmp_path)(**inputs).logits, expected, atol=1e-3)
