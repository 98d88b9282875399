"""The support matrix (`tests/support_matrix.py`, listed in docs/architectures.md): every family of the sweep is either
steered correctly or refused with an error that names the fix. Nothing crashes and nothing is silently wrong.

For each tested family, a tiny random model with a random, nonzero adapter (readouts included) is checked four ways:

- (a) its output equals TOAST recomputed from the saved tensors on an untouched copy of the model with plain torch
  (`plain_toast_output`: the pass-1 feature caught with a forward hook, the gates and the feedback chain as matrix
  products, hooks that add `W_v t_l` to the value projections' outputs, on the value rows only for a fused
  query/key/value projection), and differs clearly from the base model's;
- (b) with the adapter disabled it equals the base model exactly;
- (c) saved and reloaded onto a fresh copy of the base model it gives exactly the same output;
- (d) for decoders and vision-language models, greedy generation with the KV caches gives the same tokens as without
  a cache.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import transformers
from conftest import randomize_adapter
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from support_matrix import (
    DECODER,
    FAMILIES,
    IMAGE,
    SEQ2SEQ,
    VISION,
    VLM,
    VLM_SPECIAL_TOKENS,
    VOCAB,
    Family,
    continued_inputs,
    seq2seq_inputs,
    vision_language_inputs,
)

from peft_toast import ToastConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TESTED = [family for family in FAMILIES if family.refused is None]
REFUSED = [family for family in FAMILIES if family.refused is not None]
CAUSAL = (DECODER, VLM)  # a vision-language model's language model is a decoder


def build(family: Family) -> torch.nn.Module:
    model_class = getattr(transformers, family.model)
    torch.manual_seed(0)
    model = model_class(model_class.config_class(**family.config)).eval()
    assert model.config.model_type == family.model_type
    return model


def family_id(family: Family) -> str:
    return f"{family.model_type}-seq2seq" if family.kind == SEQ2SEQ else family.model_type


def make_inputs(family: Family, batch: int = 2, seq: int = 6) -> dict:
    if family.kind == VLM:
        return vision_language_inputs(family, batch=batch, text=seq)
    if family.kind == SEQ2SEQ:
        return seq2seq_inputs(family, batch=batch, seq=seq)
    generator = torch.Generator().manual_seed(0)
    if family.kind == VISION:
        return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=generator)}
    input_ids = torch.randint(2, VOCAB, (batch, seq), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def output(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def value_rows(family: Family, config, out_features: int) -> torch.Tensor:
    """The rows of a fused query/key/value projection that produce values, from the family's layout and head counts."""
    layout, kv_heads = family.fused
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    slots = torch.arange(head_dim)
    if layout == "contiguous":  # [q (heads) | k (kv) | v (kv)]
        rows = torch.arange((heads + kv_heads) * head_dim, (heads + 2 * kv_heads) * head_dim)
    elif layout == "per_head":  # heads x [q_i | k_i | v_i]
        rows = (torch.arange(heads)[:, None] * 3 * head_dim + 2 * head_dim + slots).flatten()
    elif layout == "grouped":  # kv x [q ... q | k_j | v_j]
        group = (heads // kv_heads + 2) * head_dim
        rows = (torch.arange(kv_heads)[:, None] * group + group - head_dim + slots).flatten()
    else:  # "sharded_qvk": 4 shards x [q | v | k] (CodeGen's `mp_num`)
        shard = heads * head_dim // 4
        rows = (torch.arange(4)[:, None] * 3 * shard + shard + torch.arange(shard)).flatten()
    assert rows.max() < out_features
    return rows


def plain_toast_output(
    family: Family, base, block_names: list, value_names: list, tensors: dict, adapter_config: dict, inputs: dict
) -> torch.Tensor:
    """TOAST recomputed on the untouched model `base` from the saved adapter tensors, with plain torch."""
    eps = adapter_config["cosine_eps"]
    with torch.no_grad():
        if family.kind in CAUSAL:  # the last block's output, before the final norm (image tokens included)
            captured = []
            last = base.get_submodule(block_names[-1])
            handle = last.register_forward_hook(lambda module, args, out: captured.append(_hidden(out)))
            base(**inputs)
            handle.remove()
            x = captured[0]
        elif family.kind == SEQ2SEQ:  # the encoder's output tokens, on the source inputs only
            source = {key: value for key, value in inputs.items() if not key.startswith("decoder_")}
            x = base.get_encoder()(**source).last_hidden_state
        else:  # the encoder's output tokens (after its final norm, if it has one)
            x = base.base_model(**inputs).last_hidden_state
        prompt = tensors["base_model.model.toast.toast_prompt"]  # (d,)
        if adapter_config["feature_norm"] == "rms":  # each token over its root mean square; the gates do not change
            x = x / x.square().mean(dim=-1, keepdim=True).sqrt().clamp_min(eps)
        gates = ((x @ prompt) / (x.norm(dim=-1).clamp_min(eps) * prompt.norm().clamp_min(eps))).clamp(0, 1)  # (B, N)
        z = gates[..., None] * x  # (B, N, d)
        signals = {}
        for name in reversed(value_names):  # from the top block down
            z = z @ tensors[f"base_model.model.{name}.toast_down.weight"].T  # z_{l-1} = A_l z_l
            signals[name] = z @ tensors[f"base_model.model.{name}.toast_readout.weight"].T  # t_l = C_l z_{l-1}

        def add_value_delta(module, args, out, t):
            weight = module.weight if isinstance(module, torch.nn.Linear) else module.weight.T  # (out, d)
            if family.fused is None:
                return out + t @ weight.T
            rows = value_rows(family, base.config, out.shape[-1])
            out = out.clone()
            out[..., rows] += t @ weight[rows].T
            return out

        handles = [
            base.get_submodule(name).register_forward_hook(lambda m, a, o, t=t: add_value_delta(m, a, o, t))
            for name, t in signals.items()
        ]
        try:
            return output(base, inputs)
        finally:
            for handle in handles:
                handle.remove()


def steered_model(family: Family, base, inputs: dict):
    """TOAST on `base` with every adapter tensor random and nonzero. The prompt is the data direction of `inputs` plus
    noise: a prompt drawn at random can close every gate of a tiny model's tokens, and the adapter would not act."""
    model = get_peft_model(base, ToastConfig(task_type="CAUSAL_LM" if family.kind in CAUSAL else None))
    randomize_adapter(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        prompt = model.base_model.initialise_prompt(**inputs)
        prompt.add_(torch.randn(prompt.shape, generator=generator))
    return model.eval()


@pytest.mark.parametrize("family", TESTED, ids=family_id)
def test_family_is_steered_exactly(family, tmp_path):
    base = build(family)
    reference, fresh = copy.deepcopy(base), copy.deepcopy(base)
    inputs = make_inputs(family)
    expected_base = output(reference, inputs)

    model = steered_model(family, base, inputs)
    architecture = model.base_model.architecture
    assert architecture.causal == (family.kind in CAUSAL)
    # The automatic defaults: a decoder feeds back its pre-norm feature scale-free and freezes its down-maps.
    config = model.peft_config["default"]
    assert (config.feature_norm, config.train_down) == (("rms", False) if family.kind in CAUSAL else ("none", True))
    assert len(architecture.blocks) == 2
    steered = output(model, inputs)

    # (a) an independent recomputation from the saved tensors
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert all(
        tensors[f"base_model.model.{name}.toast_readout.weight"].abs().min() > 0 for name in architecture.value_names
    )
    expected = plain_toast_output(
        family, reference, architecture.block_names, architecture.value_names, tensors, adapter_config, inputs
    )
    scale = expected.abs().max()
    torch.testing.assert_close(steered, expected, rtol=1e-4, atol=1e-5 * max(1.0, scale))
    assert (steered - expected_base).abs().max() > 1e-3 * scale, "the adapter must change the output"

    # (b) disabled: the base model
    with model.disable_adapter():
        assert torch.equal(output(model, inputs), expected_base)

    # (c) saved and reloaded: the same output
    reloaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert torch.equal(output(reloaded, inputs), steered)


@pytest.mark.parametrize("family", [f for f in TESTED if f.kind in CAUSAL], ids=family_id)
def test_decoder_generates_the_same_tokens_with_and_without_a_cache(family):
    """Greedy decoding with the two KV caches gives the tokens of decoding without a cache, and each step's logits are
    those of one full forward over the sequence (for a vision-language model: the image is given to the first step
    only, as `generate` does, and to the full forward)."""
    inputs = make_inputs(family, seq=5)
    model = steered_model(family, build(family), inputs)
    new = 6
    settings = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    if family.kind == VLM:
        settings["suppress_tokens"] = VLM_SPECIAL_TOKENS
    cached = model.generate(**inputs, use_cache=True, output_logits=True, return_dict_in_generate=True, **settings)
    uncached = model.generate(**inputs, use_cache=False, **settings)
    assert cached.sequences.shape[1] == inputs["input_ids"].shape[1] + new
    assert torch.equal(cached.sequences, uncached)
    full = output(model, continued_inputs(family, inputs, cached.sequences))  # (B, N + new, V)
    start = inputs["input_ids"].shape[1] - 1
    for step, logits in enumerate(cached.logits):
        torch.testing.assert_close(logits, full[:, start + step], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", [f for f in TESTED if f.kind == SEQ2SEQ], ids=family_id)
def test_encoder_decoder_generates_the_same_tokens_with_and_without_a_cache(family):
    """The encoder runs (and is steered) once, before decoding; greedy decoding with the decoder's KV cache gives the
    tokens of decoding without it, and each step's logits are those of one full forward over the generated tokens."""
    inputs = make_inputs(family)
    source = {key: value for key, value in inputs.items() if not key.startswith("decoder_")}
    model = steered_model(family, build(family), inputs)
    new = 5
    settings = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    cached = model.generate(**source, use_cache=True, output_logits=True, return_dict_in_generate=True, **settings)
    uncached = model.generate(**source, use_cache=False, return_dict_in_generate=True, **settings)
    assert torch.equal(cached.sequences, uncached.sequences)
    full = output(model, {**source, "decoder_input_ids": cached.sequences})  # (B, T, V)
    start = cached.sequences.shape[1] - 1 - len(cached.logits)
    for step, logits in enumerate(cached.logits):
        torch.testing.assert_close(logits, full[:, start + step], rtol=1e-4, atol=1e-4)
    frozen = build(family).generate(**source, output_logits=True, return_dict_in_generate=True, **settings)
    assert not torch.allclose(torch.stack(frozen.logits), torch.stack(cached.logits), atol=1e-4)


@pytest.mark.parametrize("family", REFUSED, ids=family_id)
def test_family_is_refused_with_the_fix(family):
    base = build(family)
    with pytest.raises(ValueError) as error:
        get_peft_model(base, ToastConfig(task_type="CAUSAL_LM" if family.kind in CAUSAL else None))
    for phrase in family.refused:
        assert re.search(re.escape(phrase), str(error.value)), str(error.value)
