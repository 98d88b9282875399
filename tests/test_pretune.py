"""SGD pre-tuning (`peft_toast.pretuning`): the objective it optimises, what it trains, and its CLI."""

from __future__ import annotations

import copy

import datasets
import numpy as np
import pytest
import torch
import transformers
from conftest import make_inputs, make_llama, make_vit
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from test_calibrate import tiny_llama_folder  # noqa: F401  (fixture)
from transformers import LlamaForCausalLM

from peft_toast import ToastConfig, load_initialisation
from peft_toast.calibration import reconstruction_error
from peft_toast.cli import labelled_examples
from peft_toast.pretune import main
from peft_toast.pretuning import pretune_top_down


def _tensors(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items() if "toast_" in name}


def test_encoder_loss_is_the_weighted_variational_loss_and_only_down_maps_train():
    model = get_peft_model(make_vit(with_head=False), ToastConfig(variational_loss_weight=0.1))
    batch = make_inputs("vit", batch=4)
    model.train()
    loss = model(**batch).loss
    assert loss.item() == pytest.approx(0.1 * reconstruction_error(model, [batch]), rel=1e-4)

    before = _tensors(model)
    error_before = reconstruction_error(model, [batch])
    result = pretune_top_down(model, [batch], max_steps=5, learning_rate=1e-2, progress=False)
    after = _tensors(model)
    assert result.steps == 5 and result.last_loss < result.first_loss
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {name for name in before if "toast_down" in name}
    assert reconstruction_error(model, [batch]) < error_before


def test_language_model_loss_adds_the_variational_loss_and_the_whole_top_down_module_trains():
    base = make_llama()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, ToastConfig(variational_loss_weight=0.01, task_type="CAUSAL_LM"))
    batch = make_inputs("llama", batch=2, seq=6)
    batch["labels"] = batch["input_ids"].clone()
    model.train()
    with torch.no_grad():
        lm_loss = reference(**batch).loss.item()  # zero readouts: pass 2 is the frozen model
    expected = lm_loss + 0.01 * reconstruction_error(model, [batch])
    assert model(**batch).loss.item() == pytest.approx(expected, rel=1e-5)

    before = _tensors(model)
    pretune_top_down(model, [batch], max_steps=3, learning_rate=1e-2, progress=False)
    after = _tensors(model)
    for kind in ("toast_down", "toast_readout", "toast_prompt"):
        names = [name for name in before if kind in name]
        assert names and all(not torch.equal(before[name], after[name]) for name in names), kind


def test_pretune_needs_a_budget_and_a_loss():
    model = get_peft_model(make_vit(with_head=False), ToastConfig())
    with pytest.raises(ValueError, match="budget"):
        pretune_top_down(model, [make_inputs("vit")], progress=False)
    with pytest.raises(ValueError, match="variational_loss_weight"):
        pretune_top_down(model, [make_inputs("vit")], max_steps=1, progress=False)


def test_time_budget_stops_pretuning():
    model = get_peft_model(make_vit(with_head=False), ToastConfig(variational_loss_weight=0.1))
    result = pretune_top_down(model, [make_inputs("vit")], max_seconds=0.0, progress=False)
    assert result.steps == 1  # the budget is checked after each step


def test_cli_pretunes_from_the_calibration_and_writes_a_loadable_adapter(tiny_llama_folder, tmp_path):  # noqa: F811
    folder, text = tiny_llama_folder
    output = tmp_path / "pretuned"
    args = ["--model", str(folder), "--data", str(text), "--num-samples", "8", "--batch-size", "4"]
    result = main([*args, "--max-steps", "2", "--calibrate-first", "--output", str(output)])
    assert result.steps == 2
    loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(folder), output)
    config = loaded.peft_config["default"]
    assert config.variational_loss_weight == 0.01  # the reference's weight for language models
    readouts = [layer.toast_readout["default"].weight for layer in loaded.base_model.toast_layers("default")]
    assert all(torch.count_nonzero(weight) > 0 for weight in readouts)  # the LM loss trained them


def test_cli_pretunes_on_labelled_source_classes_and_a_transfer_starts_from_it(tmp_path):
    """Source task: classes 0 and 1 of an image dataset (cross-entropy + variational loss); the saved adapter records
    it, every top-down tensor trained, and `load_initialisation` starts a 3-class target task from exactly those
    tensors with a fresh head."""
    model_dir = tmp_path / "vit"
    torch.manual_seed(0)
    make_vit(with_head=False).save_pretrained(model_dir)  # a backbone, as the CLI loads it
    transformers.ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(model_dir)
    data_dir = tmp_path / "images"
    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list("abc"))})
    train = datasets.Dataset.from_dict(
        {"image": list(rng.integers(0, 256, (24, 20, 20), dtype=np.uint8)), "label": [0, 1, 2] * 8},
        features=features,
    )
    datasets.DatasetDict({"train": train}).save_to_disk(data_dir)

    output = tmp_path / "pretuned"
    args = ["--model", str(model_dir), "--data", str(data_dir), "--classes", "0", "1", "--batch-size", "4"]
    result = main([*args, "--max-steps", "3", "--learning-rate", "1e-2", "--output", str(output)])
    assert result.steps == 3

    examples, labels = labelled_examples(str(data_dir), [0, 1], 100)
    assert len(examples) == 16 and sorted(set(labels)) == [0, 1]  # class 2 left out

    config = ToastConfig.from_pretrained(output)
    assert config.variational_loss_weight == 0.1
    assert config.pretuned_on.startswith(f"classes 0 1 of {data_dir}: cross-entropy + 0.1 x L_var")
    assert "Pre-tuned on" in (output / "README.md").read_text()
    saved = load_file(output / "adapter_model.safetensors")
    readouts = [t for k, t in saved.items() if "toast_readout" in k]
    assert readouts and all(torch.count_nonzero(t) > 0 for t in readouts)  # the source task trained them
    assert [t.shape[0] for k, t in saved.items() if k.endswith("classifier.weight")] == [2]  # the source head

    target = make_vit(num_labels=3)
    transfer = load_initialisation(target, output)
    tuner = transfer.base_model
    torch.testing.assert_close(tuner.toast_prompt["default"].detach(), saved["base_model.model.toast.toast_prompt"])
    for layer in tuner.toast_layers("default"):
        key = next(k for k in saved if f"layers.{layer.block_index}." in k and "toast_readout" in k)
        torch.testing.assert_close(layer.toast_readout["default"].weight.detach(), saved[key])
    assert tuner.model.classifier.modules_to_save["default"].weight.shape[0] == 3  # a fresh head for the target
    assert transfer.peft_config["default"].variational_loss_weight == 0.0
    assert transfer.peft_config["default"].pretuned_on == config.pretuned_on


def test_a_decoder_transfer_from_a_pretuned_adapter_freezes_the_pretuned_down_maps(tmp_path):
    """Pre-tuning a decoder trains its down-maps (the variational loss is on); the transfer that starts from it keeps
    them at their pre-tuned values, frozen, as the reference's LLaMA transfer -- unless `train_down=True` is asked."""
    model = get_peft_model(make_llama(), ToastConfig(variational_loss_weight=0.01, task_type="CAUSAL_LM"))
    assert (model.peft_config["default"].feature_norm, model.peft_config["default"].train_down) == ("rms", True)
    batch = make_inputs("llama", batch=2, seq=6)
    batch["labels"] = batch["input_ids"].clone()
    pretune_top_down(model, [batch], max_steps=2, learning_rate=1e-2, progress=False)
    model.save_pretrained(tmp_path)
    pretuned = {name: tensor for name, tensor in load_file(tmp_path / "adapter_model.safetensors").items()}

    transfer = load_initialisation(make_llama(), str(tmp_path))
    config = transfer.peft_config["default"]
    assert (config.feature_norm, config.train_down, config.variational_loss_weight) == ("rms", False, 0.0)
    down = {name: p for name, p in transfer.named_parameters() if "toast_down" in name}
    assert down and not any(parameter.requires_grad for parameter in down.values())
    for name, parameter in down.items():
        saved = pretuned[name.replace(".default.", ".")]
        assert not torch.equal(saved, torch.eye(saved.shape[0]))  # pre-tuning moved it
        assert torch.equal(parameter, saved)
    assert any(p.requires_grad for name, p in transfer.named_parameters() if "toast_readout" in name)

    trained = load_initialisation(make_llama(), str(tmp_path), train_down=True)
    assert all(p.requires_grad for name, p in trained.named_parameters() if "toast_down" in name)
