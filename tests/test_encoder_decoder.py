"""Encoder-decoder models (T5, BART and the rest of `tests/support_matrix.py`'s encoder-decoder rows): TOAST steers the
encoder. Its hooks sit on the encoder, so every encoder call runs the two passes, also the one `generate` makes before
decoding; the decoder gets no signal and reads the steered encoder states. The support matrix checks each family
against an independent recomputation and cached generation; here: the same model equals TOAST on its encoder alone,
what trains, what is said at creation, and what is refused."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import transformers
from conftest import VOCAB, randomize_adapter
from peft import get_peft_model

from peft_toast import ToastConfig
from peft_toast.feature_cache import precompute_features

T5 = dict(d_model=32, d_ff=37, num_layers=2, num_heads=4, d_kv=8, vocab_size=VOCAB, decoder_start_token_id=0)
BART = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=37, decoder_ffn_dim=37, vocab_size=VOCAB, init_std=0.2)  # fmt: skip


def _base(kind: str):
    torch.manual_seed(0)
    if kind == "t5":
        return transformers.T5ForConditionalGeneration(transformers.T5Config(**T5)).eval()
    return transformers.BartForConditionalGeneration(transformers.BartConfig(**BART)).eval()


def _encoder_alone(kind: str, base):
    """The same encoder as a model of its own, as TOAST supported it before (`T5EncoderModel`, `get_encoder()`)."""
    if kind == "t5":
        encoder = transformers.T5EncoderModel(base.config)
        encoder.load_state_dict(base.state_dict(), strict=False)  # `shared` and `encoder.*`
        return encoder.eval(), "base_model.model."
    return copy.deepcopy(base).get_encoder().eval(), "base_model.model.model.encoder."


INPUTS = {"input_ids": torch.randint(3, VOCAB, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
TARGET = torch.randint(3, VOCAB, (2, 4))


@pytest.mark.parametrize("kind", ["t5", "bart"])
@pytest.mark.parametrize("layers", [None, [-1]], ids=["every-block", "top-block"])
def test_the_model_equals_toast_on_its_encoder_alone(kind, layers):
    base = _base(kind)
    model = get_peft_model(copy.deepcopy(base), ToastConfig(layers_to_transform=layers))
    randomize_adapter(model)
    model.base_model.initialise_prompt(**INPUTS, decoder_input_ids=TARGET)  # decoder arguments are left out of pass 1
    model.eval()
    encoder, prefix = _encoder_alone(kind, base)
    alone = get_peft_model(encoder, ToastConfig(layers_to_transform=layers))
    tensors = {name: tensor for name, tensor in model.state_dict().items() if "toast" in name}
    renamed = {name.replace(prefix, "base_model.model.", 1): tensor for name, tensor in tensors.items()}
    assert not alone.load_state_dict(renamed, strict=False).unexpected_keys
    with torch.no_grad():
        steered_states = alone(**INPUTS).last_hidden_state
        expected = base(encoder_outputs=(steered_states,), attention_mask=INPUTS["attention_mask"], labels=TARGET)
        got = model(**INPUTS, labels=TARGET)
        assert (expected.logits - base(**INPUTS, labels=TARGET).logits).abs().max() > 1e-3
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_only_the_adapter_trains_and_creation_says_what_is_steered(kind, caplog):
    with caplog.at_level(logging.INFO, logger="peft_toast.model"):
        model = get_peft_model(_base(kind), ToastConfig())
    assert "steers the encoder" in caplog.text
    assert "steers the encoder" in repr(model.base_model)
    model.train()
    model(**INPUTS, labels=TARGET).loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert with_grad <= trainable and any("toast_readout" in name for name in with_grad)
    assert all(".encoder." in name or name.startswith("base_model.model.toast.") for name in trainable)


def test_the_encoder_runs_its_two_passes_once_per_generate():
    model = get_peft_model(_base("bart"), ToastConfig())
    randomize_adapter(model)
    model.eval()
    calls = []
    handle = model.get_base_model().get_encoder().register_forward_hook(lambda *args: calls.append(1))
    model.generate(**INPUTS, max_new_tokens=4, do_sample=False)
    handle.remove()
    assert len(calls) == 1  # one steered encoder call (its pass 1 runs `forward` directly, without hooks)


def test_what_an_encoder_decoder_model_cannot_do_is_refused():
    with pytest.raises(ValueError, match="variational_loss_weight.*encoder-decoder.*get_encoder"):
        get_peft_model(_base("t5"), ToastConfig(variational_loss_weight=0.1))
    import datasets

    model = get_peft_model(_base("bart"), ToastConfig())
    rows = datasets.Dataset.from_dict({"input_ids": INPUTS["input_ids"].tolist()})
    with pytest.raises(ValueError, match="feature cache does not support encoder-decoder models"):
        precompute_features(model, rows)
