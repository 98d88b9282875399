"""Fused query/key/value projections (`ToastArchitecture.fused_qkv`): the signal lands on the values and nowhere else,
for every layout transformers uses — contiguous with grouped or multi-query heads (Phi-3, GPT-BigCode, ModernBERT,
GPT-2, MPT), interleaved per head (GPT-NeoX, Bloom, Falcon, Persimmon, DeBERTa), grouped (Falcon's new decoder
architecture) and sharded `[q | v | k]` (CodeGen).

Where the values are is checked against the model's own attention code, not against our index: changing the fused
weight's rows at our value positions leaves every attention probability unchanged (they only carry values), while
changing the other rows changes them. With a trained-looking (random, nonzero) adapter, block 0's attention in pass 2
equals the base model's (the keys are untouched) while the outputs move; cached generation equals uncached."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import VOCAB, randomize_adapter
from peft import get_peft_model

from peft_toast import ToastArchitecture, ToastConfig
from peft_toast.architectures import fused_value_index

# Eager attention returns the attention probabilities the checks read (Falcon's can only be chosen at construction).
_TOKENS = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, attn_implementation="eager")
_SMALL = dict(num_hidden_layers=2, pad_token_id=1, **_TOKENS)
_MODERNBERT = dict(cls_token_id=2, sep_token_id=3, **_SMALL)  # its defaults lie beyond the tiny vocabulary

FAMILIES = {
    "gpt_neox": lambda: transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(hidden_size=32, num_attention_heads=4, intermediate_size=37, **_SMALL)
    ),
    "bloom": lambda: transformers.BloomForCausalLM(
        transformers.BloomConfig(hidden_size=32, n_head=4, n_layer=2, **_TOKENS)
    ),
    "falcon-grouped": lambda: transformers.FalconForCausalLM(
        transformers.FalconConfig(
            hidden_size=32, num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2, **_SMALL
        )
    ),  # fmt: skip
    "falcon-multi-query": lambda: transformers.FalconForCausalLM(
        transformers.FalconConfig(hidden_size=32, num_attention_heads=4, multi_query=True, **_SMALL)
    ),
    "falcon-per-head": lambda: transformers.FalconForCausalLM(
        transformers.FalconConfig(hidden_size=32, num_attention_heads=4, multi_query=False, **_SMALL)
    ),
    "gpt_bigcode-multi-query": lambda: transformers.GPTBigCodeForCausalLM(
        transformers.GPTBigCodeConfig(n_embd=32, n_head=4, n_layer=2, multi_query=True, **_TOKENS)
    ),  # fmt: skip
    "gpt_bigcode-per-head": lambda: transformers.GPTBigCodeForCausalLM(
        transformers.GPTBigCodeConfig(n_embd=32, n_head=4, n_layer=2, multi_query=False, **_TOKENS)
    ),  # fmt: skip
    "phi3-grouped-query": lambda: transformers.Phi3ForCausalLM(
        transformers.Phi3Config(
            hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=37, **_SMALL
        )
    ),  # fmt: skip
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_head=4, n_layer=2, **_TOKENS)),
    "persimmon": lambda: transformers.PersimmonForCausalLM(
        transformers.PersimmonConfig(hidden_size=32, num_attention_heads=4, intermediate_size=37, **_SMALL)
    ),
    "mpt": lambda: transformers.MptForCausalLM(transformers.MptConfig(d_model=32, n_heads=4, n_layers=2, **_TOKENS)),
    "codegen-sharded": lambda: transformers.CodeGenForCausalLM(
        transformers.CodeGenConfig(n_embd=32, n_head=4, n_layer=2, rotary_dim=4, **_TOKENS)
    ),
    "deberta": lambda: transformers.DebertaForMaskedLM(
        transformers.DebertaConfig(hidden_size=32, num_attention_heads=4, intermediate_size=37, **_SMALL)
    ),
    "modernbert": lambda: transformers.ModernBertForMaskedLM(
        transformers.ModernBertConfig(
            hidden_size=32, num_attention_heads=4, intermediate_size=37, global_attn_every_n_layers=1, **_MODERNBERT
        )
    ),  # fmt: skip
}


ENCODERS = ("modernbert", "deberta")


def _model(family: str):
    torch.manual_seed(0)
    model = FAMILIES[family]()
    assert model.config._attn_implementation == "eager"
    return model.eval()


def _fused_projection(model, block: int = 0):
    peft = get_peft_model(model, ToastConfig())
    layer = peft.base_model.toast_layers("default")[-1 - block]  # from the top down
    return peft, layer


INPUTS = {"input_ids": torch.tensor([[2, 7, 4, 9, 3, 5], [6, 2, 8, 8, 4, 7]])}


def _attentions(model) -> list[torch.Tensor]:
    with torch.no_grad():
        return model(**INPUTS, output_attentions=True).attentions


@pytest.mark.parametrize("family", FAMILIES)
def test_our_value_positions_are_the_ones_the_attention_code_reads_as_values(family):
    model = _model(family)
    peft, layer = _fused_projection(model)
    index = layer.value_index
    base = layer.get_base_layer()
    linear = isinstance(base, torch.nn.Linear)
    out_features = base.weight.shape[0 if linear else 1]
    others = torch.tensor([i for i in range(out_features) if i not in set(index.tolist())])
    with peft.disable_adapter():
        reference = _attentions(peft)

        def perturbed(rows):
            saved = base.weight.detach().clone()
            with torch.no_grad():
                if linear:
                    base.weight[rows] += 0.5 * torch.randn_like(base.weight[rows])
                else:
                    base.weight[:, rows] += 0.5 * torch.randn_like(base.weight[:, rows])
            try:
                return _attentions(peft)
            finally:
                with torch.no_grad():
                    base.weight.copy_(saved)

        after_values, after_others = perturbed(index), perturbed(others)
    torch.testing.assert_close(after_values[0], reference[0], rtol=0, atol=1e-6)  # values never move attention
    assert not torch.allclose(after_others[0], reference[0], atol=1e-3)  # queries and keys do


@pytest.mark.parametrize("family", FAMILIES)
def test_a_nonzero_adapter_moves_the_outputs_but_not_block_0_attention(family):
    model = _model(family)
    with torch.no_grad():
        base_logits = model(**INPUTS).logits
    base_attention = _attentions(model)[0]
    peft = get_peft_model(model, ToastConfig())
    randomize_adapter(peft)
    with torch.no_grad():
        output = peft(**INPUTS, output_attentions=True)
    torch.testing.assert_close(output.attentions[0], base_attention, rtol=0, atol=1e-6)  # keys of block 0 untouched
    assert (output.logits - base_logits).abs().max() > 1e-5  # the signal reaches the values (0 if it did not)
    with peft.disable_adapter(), torch.no_grad():
        assert torch.equal(peft(**INPUTS).logits, base_logits)


@pytest.mark.parametrize("family", [name for name in FAMILIES if name not in ENCODERS])
def test_cached_generation_equals_uncached(family):
    peft = get_peft_model(_model(family), ToastConfig())
    randomize_adapter(peft)
    ids = INPUTS["input_ids"][:1]
    with torch.no_grad():
        cached = peft.generate(input_ids=ids, max_new_tokens=5, do_sample=False, use_cache=True)
        uncached = peft.generate(input_ids=ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_layouts_whose_sizes_do_not_add_up_are_refused():
    config = transformers.Phi3Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    assert fused_value_index(config, "contiguous", 64).tolist() == list(range(48, 64))  # [q 32 | k 16 | v 16]
    with pytest.raises(ValueError, match=r"has 96 outputs, but the 'contiguous' layout .* needs 64"):
        fused_value_index(config, "contiguous", 96)  # as if equal thirds: the signal would land on keys
    with pytest.raises(ValueError, match=r"needs 96"):
        fused_value_index(config, "per_head", 64)
    with pytest.raises(ValueError, match=r"`fused_qkv` must be False, True"):
        ToastArchitecture(blocks="layers", value="attn.qkv", fused_qkv="thirds")


def test_equal_thirds_declared_on_a_grouped_query_model_use_the_configs_sizes():
    """The defect this replaces: `fused_qkv=True` on Phi-3 split [q | k | v] into equal thirds and silently changed the
    keys. Now the sizes come from the config, and a config that contradicts the weights is refused."""
    from peft_toast import architectures, register_architecture

    saved = dict(architectures.ARCHITECTURES)
    declaration = ToastArchitecture(blocks="layers", value="self_attn.qkv_proj", fused_qkv=True, final_norm="norm",
                                    causal=True)  # fmt: skip
    try:
        register_architecture("phi3", declaration)
        peft = get_peft_model(_model("phi3-grouped-query"), ToastConfig())
        assert peft.base_model.toast_layers("default")[0].value_index.tolist() == list(range(48, 64))
        model = _model("phi3-grouped-query")
        model.config.num_key_value_heads = 4  # contradicts the weights (64 outputs, not 96)
        with pytest.raises(ValueError, match=r"has 64 outputs.*needs 96.*would land on queries or keys"):
            get_peft_model(model, ToastConfig())
    finally:
        architectures.ARCHITECTURES.clear()
        architectures.ARCHITECTURES.update(saved)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_fresh_adapter_starts_at_the_base_model_and_every_readout_gets_a_gradient(family):
    model = _model(family)
    with torch.no_grad():
        base_logits = model(**INPUTS).logits
    peft = get_peft_model(model, ToastConfig())
    logits = peft(**INPUTS).logits
    torch.testing.assert_close(logits, base_logits, rtol=0, atol=1e-6)  # zero readouts: exactly the frozen model
    logits.square().mean().backward()
    readouts = {name: p for name, p in peft.named_parameters() if "toast_readout" in name}
    assert readouts and all(p.grad is not None and p.grad.abs().sum() > 0 for p in readouts.values())
    frozen = [name for name, p in peft.named_parameters() if "toast_" not in name and p.grad is not None]
    assert not frozen, f"gradients reached the frozen model: {frozen[:3]}"
