"""`initialise_readouts`: low-rank readouts that read the top directions of the signal they receive.

The directions are checked against an independent computation: the tokens each readout receives in an ordinary
forward call (captured by a hook on the readout, not by the code under test), decomposed with `torch.linalg.svd`.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_llama, make_vit
from peft import PeftModel, get_peft_model

from peft_toast import ToastConfig
from peft_toast.topdown import FeedbackMap


def readouts(model) -> dict[str, FeedbackMap]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FeedbackMap) and "toast_readout" in name}


def received_tokens(model, inputs: dict) -> dict[str, torch.Tensor]:
    """The real tokens each readout receives in a forward call, `(T, d)`."""
    mask = inputs.get("attention_mask")
    seen = {}

    def capture(name):
        def hook(module, args):
            z = args[0]
            seen[name] = z[mask.bool()] if mask is not None else z.flatten(0, -2)

        return hook

    hooks = [m.register_forward_pre_hook(capture(name)) for name, m in readouts(model).items()]
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    return seen


def assert_top_directions(factor: torch.Tensor, tokens: torch.Tensor, norms: torch.Tensor) -> None:
    rank = factor.shape[0]
    top = torch.linalg.svd(tokens.double(), full_matrices=False).Vh[:rank]  # (r, d)
    factor = factor.detach().double()
    torch.testing.assert_close(factor.norm(dim=1), norms.double())
    cosines = (factor / factor.norm(dim=1, keepdim=True) * top).sum(1).abs()  # row i vs singular vector i (up to sign)
    torch.testing.assert_close(cosines, torch.ones(rank, dtype=torch.double), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kind, config",
    [
        ("llama", {"task_type": "CAUSAL_LM", "feedback_rank": 4}),  # decoder default: rms feature, frozen down-maps
        ("llama", {"task_type": "CAUSAL_LM", "feedback_rank": 4, "train_down": True}),  # each block its own signal
        ("vit", {"feedback_rank": 4}),
        ("vit", {"lite_rank": 4}),
    ],
)
def test_readouts_read_the_top_singular_directions_of_their_signal_and_outputs_do_not_change(kind, config):
    factory = make_llama if kind == "llama" else make_vit
    inputs = make_inputs(kind, batch=4, seq=8)
    if "attention_mask" in inputs:
        inputs["attention_mask"][1, -3:] = 0  # padding is left out
    torch.manual_seed(0)
    model = get_peft_model(factory(), ToastConfig(**config))
    torch.manual_seed(0)
    reference = get_peft_model(factory(), ToastConfig(**config))
    factor_name = "v" if config.get("feedback_rank") else "delta_v"
    norms = {name: getattr(m, factor_name).detach().norm(dim=1).clone() for name, m in readouts(model).items()}

    assert model.initialise_readouts(**inputs) == len(norms) == model.config.num_hidden_layers
    reference.base_model.initialise_prompt(**inputs)  # the same prompt; the readouts random as created
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, rtol=0, atol=0)

    tokens = received_tokens(model, inputs)
    for name, module in readouts(model).items():
        assert_top_directions(getattr(module, factor_name), tokens[name], norms[name])


def test_initialised_readouts_train_and_save_like_any_readout(tmp_path):
    inputs = make_inputs("llama", batch=4, seq=8)
    torch.manual_seed(0)
    model = get_peft_model(make_llama(), ToastConfig(task_type="CAUSAL_LM", feedback_rank=4))
    model.initialise_readouts(**inputs)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[name])}
    assert {name for name in before if ".toast_readout." in name} <= changed
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(make_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


def test_initialise_readouts_refuses_full_rank_trained_and_signal_free_readouts():
    inputs = make_inputs("llama")
    full = get_peft_model(make_llama(), ToastConfig(task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="full rank"):
        full.initialise_readouts(**inputs)

    trained = get_peft_model(make_llama(), ToastConfig(task_type="CAUSAL_LM", feedback_rank=4))
    first = next(iter(readouts(trained).values()))
    with torch.no_grad():
        first.u.add_(0.1)
    with pytest.raises(ValueError, match="not at their start"):
        trained.initialise_readouts(**inputs)

    fresh = get_peft_model(make_llama(), ToastConfig(task_type="CAUSAL_LM", feedback_rank=4))
    before = [m.v.detach().clone() for m in readouts(fresh).values()]
    inputs["attention_mask"].zero_()
    with pytest.raises(ValueError, match="no signal"):
        fresh.initialise_readouts(**inputs)
    assert all(torch.equal(m.v, v) for m, v in zip(readouts(fresh).values(), before))  # nothing half-set

    with pytest.raises(ValueError, match="no TOAST adapter 'other'"):
        fresh.initialise_readouts(**make_inputs("llama"), adapter_name="other")


def test_initialise_readouts_ignores_feedback_dropout_and_leaves_every_module_mode_alone():
    inputs = make_inputs("llama", batch=4, seq=8)
    directions = []
    for dropout in (0.0, 0.5):
        torch.manual_seed(0)
        model = get_peft_model(
            make_llama(), ToastConfig(task_type="CAUSAL_LM", feedback_rank=4, feedback_dropout=dropout)
        )
        model.train()
        embed = model.get_input_embeddings().eval()  # a submodule a user keeps in eval mode
        model.initialise_readouts(**inputs)
        assert model.training and model.base_model.training and not embed.training
        directions.append([m.v.detach().clone() for m in readouts(model).values()])
    for without, with_dropout in zip(*directions):
        torch.testing.assert_close(without, with_dropout)
