"""`peft_toast.optim`: parameter groups with their own learning rates for the head, the feedback maps and the prompt."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_vit
from peft import get_peft_model

from peft_toast import ToastConfig, create_toast_optimizer, toast_parameter_groups


def test_every_trainable_parameter_is_in_exactly_one_group_with_its_rate():
    model = get_peft_model(make_vit(), ToastConfig(channel_selection="low_rank"))
    groups = toast_parameter_groups(model, 1e-4, head_lr=1e-2, prompt_lr=1e-3, weight_decay=0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {group["name"]: {names[id(p)] for p in group["params"]} for group in groups}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(n for group in by_group.values() for n in group) == sorted(trainable)
    assert by_group["prompt"] == {"base_model.model.toast.toast_prompt.default"}
    assert by_group["top_down"] and all("toast_down" in n or "toast_readout" in n or "toast_channel" in n
                                        for n in by_group["top_down"])  # fmt: skip
    assert by_group["head"] == {"base_model.model.classifier.modules_to_save.default.weight"}
    assert by_group["head_no_decay"] == {"base_model.model.classifier.modules_to_save.default.bias"}
    settings = {group["name"]: (group["lr"], group["weight_decay"]) for group in groups}
    assert settings == {
        "top_down": (1e-4, 0.01),
        "prompt": (1e-3, 0.01),
        "head": (1e-2, 0.01),
        "head_no_decay": (1e-2, 0.0),
    }


def test_optimizer_steps_each_group_at_its_rate():
    model = get_peft_model(make_vit(), ToastConfig())
    optimizer = create_toast_optimizer(model, torch.optim.SGD, lr=1e-3, head_lr=1e-1)
    loss = model(**make_inputs("vit"), labels=torch.tensor([0, 1])).loss  # sets the prompt (prompt_init="data")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    for name, parameter in model.named_parameters():
        if name in before:
            rate = 1e-1 if "classifier" in name else 1e-3
            torch.testing.assert_close(parameter.detach(), before[name] - rate * grads[name])


def test_bad_rates_and_frozen_models_are_refused():
    model = get_peft_model(make_vit(), ToastConfig())
    with pytest.raises(ValueError, match="`head_lr` must be None"):
        create_toast_optimizer(model, lr=1e-3, head_lr=0)
    with pytest.raises(ValueError, match="`lr` must be a positive"):
        create_toast_optimizer(model, lr=-1.0)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        create_toast_optimizer(model, lr=1e-3)
