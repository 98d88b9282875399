"""Tests of `peft_toast.architectures`: every supported model family works out of the box (the right value projections
are wrapped, the pass-1 feature is the right tensor, training starts at the base model and only the adapter trains),
unregistered models are resolved by inspection, and what cannot be resolved fails with a message that says how to
declare it."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers
from conftest import (
    LAYERS,
    VOCAB,
    make_bert,
    make_dinov2,
    make_gpt2,
    make_inputs,
    make_llama,
    make_mistral,
    make_vit,
    randomize_adapter,
)
from peft import get_peft_model
from torch import nn

from peft_toast import ToastArchitecture, ToastConfig, ToastModel, architectures, register_architecture
from peft_toast.architectures import ARCHITECTURES, resolve_architecture
from peft_toast.layer import ToastLayer

_SMALL_ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)

# name: (factory, factory kwargs, input kind, value projection of block {i}, feature)
# The feature is named by how the test computes it independently from an untouched copy of the base model:
# "last_hidden_state" (encoders: after the final norm), "last_block" (decoders and BERT: the last block's output).
CASES = {
    "ViTForImageClassification": (make_vit, {}, "vit", "vit.layers.{}.attention.v_proj", "last_hidden_state"),
    "ViTModel": (make_vit, {"with_head": False}, "vit", "layers.{}.attention.v_proj", "last_hidden_state"),
    "Dinov2Model": (make_dinov2, {}, "dinov2", "encoder.layer.{}.attention.v_proj", "last_hidden_state"),
    "BertModel": (make_bert, {"with_head": False}, "bert", "encoder.layer.{}.attention.self.value", "last_block"),
    "BertForSequenceClassification": (
        make_bert,
        {},
        "bert",
        "bert.encoder.layer.{}.attention.self.value",
        "last_block",
    ),
    "GPT2LMHeadModel": (make_gpt2, {}, "gpt2", "transformer.h.{}.attn.c_attn", "last_block"),
    "LlamaForCausalLM": (make_llama, {}, "llama", "model.layers.{}.self_attn.v_proj", "last_block"),
    "MistralForCausalLM": (make_mistral, {}, "mistral", "model.layers.{}.self_attn.v_proj", "last_block"),
}


def _output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(params=list(CASES))
def case(request):
    """(class name, base model, untouched copy of it, inputs, value-name template, feature kind)."""
    factory, kwargs, kind, value_template, feature = CASES[request.param]
    base = factory(**kwargs)
    assert type(base).__name__ == request.param
    return request.param, base, copy.deepcopy(base), make_inputs(kind), value_template, feature


def test_wraps_the_value_projection_of_every_block(case):
    _, base, _, _, value_template, _ = case
    model = get_peft_model(base, ToastConfig())
    wrapped = [name for name, module in model.base_model.model.named_modules() if isinstance(module, ToastLayer)]
    assert wrapped == [value_template.format(i) for i in range(LAYERS)]
    assert [layer.block_index for layer in model.base_model.model.modules() if isinstance(layer, ToastLayer)] == list(
        range(LAYERS)
    )


def test_feature_is_the_documented_tensor(case, monkeypatch):
    name, base, reference, inputs, _, feature_kind = case
    seen = []
    original = ToastModel.top_down_signals

    def spy(self, adapter_name, features):
        seen.append(features.detach().clone())
        return original(self, adapter_name, features)

    monkeypatch.setattr(ToastModel, "top_down_signals", spy)
    model = get_peft_model(base, ToastConfig())
    randomize_adapter(model)
    with torch.no_grad():
        model(**inputs)
    assert len(seen) == 1

    resolved = resolve_architecture(reference)
    with torch.no_grad():
        if feature_kind == "last_hidden_state":  # encoders with a final norm: the backbone's normalised output
            expected = resolved.backbone(**inputs).last_hidden_state
        else:  # the last block's own output, caught on the untouched copy
            captured = []
            handle = resolved.blocks[-1].register_forward_hook(
                lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else output)
            )
            backbone_output = resolved.backbone(**inputs).last_hidden_state
            handle.remove()
            expected = captured[0]
            if resolved.final_norm is not None:  # decoders: before the final norm, which yields the backbone output
                assert not torch.allclose(expected, backbone_output)
                torch.testing.assert_close(resolved.final_norm(expected), backbone_output)
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)


def test_default_config_starts_exactly_at_the_base_model(case):
    _, base, reference, inputs, _, _ = case
    model = get_peft_model(base, ToastConfig())
    with torch.no_grad():
        assert torch.equal(_output(model(**inputs)), _output(reference(**inputs)))


def test_randomized_adapter_changes_the_output_and_disabling_restores_it(case):
    _, base, reference, inputs, _, _ = case
    model = get_peft_model(base, ToastConfig(prompt_init="random"))
    randomize_adapter(model)
    with torch.no_grad():
        steered = _output(model(**inputs))
        expected = _output(reference(**inputs))
        assert (steered - expected).abs().max() > 0.01 * expected.abs().max()
        with model.disable_adapter():
            assert torch.equal(_output(model(**inputs)), expected)


def test_backward_reaches_exactly_the_adapter(case):
    _, base, _, inputs, _, _ = case
    model = get_peft_model(base, ToastConfig())
    randomize_adapter(model)
    _output(model(**inputs)).pow(2).mean().backward()
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    adapter = {name for name in dict(model.named_parameters()) if "toast_" in name or ".modules_to_save." in name}
    # A decoder's default freezes the down-maps (`train_down=None`); they are there, without gradient.
    frozen = {name for name in adapter if ".toast_down." in name} if model.base_model.architecture.causal else set()
    assert trainable == adapter - frozen
    for name, param in model.named_parameters():
        if name in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_gpt2_signal_enters_only_the_value_third_of_c_attn():
    model = get_peft_model(make_gpt2(), ToastConfig())
    randomize_adapter(model)
    layer = model.base_model.model.transformer.h[1].attn.c_attn
    calls = []
    layer.register_forward_hook(lambda module, args, output: calls.append((args[0], output)))
    with torch.no_grad():
        model(**make_inputs("gpt2"))
        hidden, steered = calls[-1]  # pass 2 (pass 1 ran first, without signal)
        plain = layer.base_layer(hidden)
    d = hidden.shape[-1]
    assert steered.shape == plain.shape == (*hidden.shape[:2], 3 * d)
    assert torch.equal(steered[..., : 2 * d], plain[..., : 2 * d])  # queries and keys untouched
    assert (steered[..., 2 * d :] - plain[..., 2 * d :]).abs().max() > 1e-3  # values steered


# ------------------------------------------------------------------------------------------ inspection fallback


@pytest.mark.parametrize(
    "factory, kwargs", [(make_vit, {}), (make_dinov2, {}), (make_bert, {}), (make_llama, {}), (make_mistral, {})]
)
def test_inspection_finds_what_the_registry_declares(factory, kwargs, monkeypatch):
    model = factory(**kwargs)
    declared = resolve_architecture(model)
    monkeypatch.delitem(ARCHITECTURES, model.config.model_type)
    inspected = resolve_architecture(model)
    assert inspected.value_names == declared.value_names
    assert inspected.block_names == declared.block_names
    assert inspected.causal == declared.causal
    assert inspected.feature_module is declared.feature_module


def test_unregistered_transformers_model_works_by_inspection(monkeypatch):
    base = make_llama()
    reference = copy.deepcopy(base)
    monkeypatch.delitem(ARCHITECTURES, "llama")
    model = get_peft_model(base, ToastConfig())
    inputs = make_inputs("llama")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference(**inputs).logits)
        randomize_adapter(model)
        assert (model(**inputs).logits - reference(**inputs).logits).abs().max() > 1e-3


def test_gpt2_cannot_be_inspected_and_the_error_says_how_to_declare_it(monkeypatch):
    # GPT-2's blocks hold transformers' Conv1D (no nn.Linear) and a fused query/key/value projection.
    monkeypatch.delitem(ARCHITECTURES, "gpt2")
    with pytest.raises(ValueError, match=r"register_architecture\('gpt2', ToastArchitecture\(blocks=\.\.\., value="):
        get_peft_model(make_gpt2(), ToastConfig())


class TinyConfig(transformers.PretrainedConfig):
    model_type = "tiny_custom"


class TinyBlock(nn.Module):
    """A pre-norm attention + MLP block whose value projection is called `value_name`."""

    def __init__(self, dim: int, value_name: str):
        super().__init__()
        self.value_name = value_name
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.query, self.key, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        setattr(self, value_name, nn.Linear(dim, dim))
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):  # (B, N, d)
        h = self.norm1(x)
        q, k, v = self.query(h), self.key(h), getattr(self, self.value_name)(h)
        attention = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(x.shape[-1]), dim=-1)  # (B, N, N)
        x = x + self.out(attention @ v)
        return x + self.mlp(self.norm2(x))


class TinyModel(nn.Module):
    """A model that is not from transformers, with a `config.model_type` no registry entry knows."""

    def __init__(self, value_name: str = "v", model_type: str = "tiny_custom", dim: int = 16, depth: int = 3):
        super().__init__()
        self.config = TinyConfig()
        self.config.model_type = model_type
        self.embed = nn.Linear(4, dim)
        self.blocks = nn.ModuleList(TinyBlock(dim, value_name) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, inputs):  # (B, N, 4) -> (B, N, 2)
        x = self.embed(inputs)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _tiny_feature(model: TinyModel, inputs: torch.Tensor) -> torch.Tensor:
    x = model.embed(inputs)
    for block in model.blocks:
        x = block(x)
    return model.norm(x)


def test_custom_model_is_resolved_by_inspection(monkeypatch):
    base = TinyModel().eval()
    reference = copy.deepcopy(base)
    inputs = torch.randn(2, 5, 4)
    seen = []
    original = ToastModel.top_down_signals
    monkeypatch.setattr(
        ToastModel,
        "top_down_signals",
        lambda self, name, features: seen.append(features) or original(self, name, features),
    )
    model = get_peft_model(base, ToastConfig())
    wrapped = [name for name, module in model.base_model.model.named_modules() if isinstance(module, ToastLayer)]
    assert wrapped == ["blocks.0.v", "blocks.1.v", "blocks.2.v"]
    with torch.no_grad():
        assert torch.equal(model(inputs), reference(inputs))
        torch.testing.assert_close(seen[0], _tiny_feature(reference, inputs), rtol=0, atol=0)
        randomize_adapter(model)
        assert (model(inputs) - reference(inputs)).abs().max() > 1e-3


def test_model_that_cannot_be_inspected_says_how_to_declare_it():
    with pytest.raises(ValueError) as error:
        get_peft_model(TinyModel(value_name="mix_v", model_type="tiny_unusual"), ToastConfig())
    message = str(error.value)
    assert "no value projection" in message
    assert "peft_toast.register_architecture('tiny_unusual', ToastArchitecture(blocks=..., value=..." in message


def test_model_without_blocks_says_how_to_declare_it():
    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = TinyConfig()
            self.proj = nn.Linear(4, 4)

        def forward(self, inputs):
            return self.proj(inputs)

    with pytest.raises(
        ValueError, match=r"found no stack of transformer blocks.*register_architecture\('tiny_custom'"
    ):
        get_peft_model(NoBlocks(), ToastConfig())


def test_inspection_refuses_a_stack_that_is_not_one_block_per_layer(monkeypatch):
    """ALBERT (refused by name) runs one shared block for all its layers; without its refusal, inspection finds a stack
    of 1 block where the config says 2 layers and refuses it instead of catching the feature after the first layer."""
    config = transformers.AlbertConfig(embedding_size=32, vocab_size=VOCAB, **_SMALL_ENCODER)
    with pytest.raises(ValueError, match=r"cannot steer model type 'albert': ALBERT runs one shared block"):
        get_peft_model(transformers.AlbertModel(config), ToastConfig())
    monkeypatch.delitem(architectures.REFUSED_ARCHITECTURES, "albert")
    with pytest.raises(ValueError, match=r"found 1 blocks in .* num_hidden_layers=2.*register_architecture\('albert'"):
        get_peft_model(transformers.AlbertModel(config), ToastConfig())


def test_a_declaration_overrides_a_refusal(monkeypatch):
    monkeypatch.setattr(architectures, "ARCHITECTURES", dict(ARCHITECTURES))
    monkeypatch.setattr(architectures, "REFUSED_ARCHITECTURES", dict(architectures.REFUSED_ARCHITECTURES))
    register_architecture("vit_mae", ToastArchitecture(blocks="layers", value="attention.v_proj"))
    assert "vit_mae" not in architectures.REFUSED_ARCHITECTURES


def test_register_architecture_teaches_a_custom_model(monkeypatch):
    monkeypatch.setattr(architectures, "ARCHITECTURES", dict(ARCHITECTURES))  # undo the registration afterwards
    register_architecture("tiny_unusual", ToastArchitecture(blocks="blocks", value="mix_v", final_norm="norm"))
    base = TinyModel(value_name="mix_v", model_type="tiny_unusual").eval()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, ToastConfig())
    wrapped = [name for name, module in model.base_model.model.named_modules() if isinstance(module, ToastLayer)]
    assert wrapped == ["blocks.0.mix_v", "blocks.1.mix_v", "blocks.2.mix_v"]
    inputs = torch.randn(2, 5, 4)
    with torch.no_grad():
        assert torch.equal(model(inputs), reference(inputs))
        randomize_adapter(model)
        assert (model(inputs) - reference(inputs)).abs().max() > 1e-3


def test_register_architecture_rejects_anything_but_a_declaration():
    with pytest.raises(TypeError, match="must be a ToastArchitecture"):
        register_architecture("tiny", {"blocks": "blocks", "value": "v"})


def test_a_wrong_declaration_names_the_missing_path(monkeypatch):
    monkeypatch.setitem(
        ARCHITECTURES, "llama", ToastArchitecture(blocks="layers", value="self_attn.value", causal=True)
    )
    with pytest.raises(ValueError, match=r"`value` path 'self_attn.value' does not exist.*register_architecture\("):
        get_peft_model(make_llama(), ToastConfig())


# ------------------------------------------------------------------------------------------------ target_modules


def test_target_modules_naming_the_value_projection_equals_the_default():
    by_default = get_peft_model(make_llama(), ToastConfig()).base_model.architecture.value_names
    by_name = get_peft_model(make_llama(), ToastConfig(target_modules=["v_proj"])).base_model.architecture
    assert by_name.value_names == by_default


@pytest.mark.parametrize(
    "target_modules, match",
    [
        (["value_projection"], r"in block `model.layers.0` it matches nothing"),
        (r".*layers\.[01]\.self_attn\.v_proj", r"in block `model.layers.2` it matches nothing"),
        (["v_proj", "k_proj"], r"in block `model.layers.0` it matches model.layers.0.self_attn.k_proj, "),
        (["v_proj", "lm_head"], r"also matches modules outside the attention blocks: \['lm_head'\].*more specific"),
        (["q_proj"], r"matches `model.layers.0.self_attn.q_proj`, which is not a value projection.*\['v_proj'\]"),
        (["down_proj"], r"`model.layers.0.mlp.down_proj`, which is not a value projection"),
        (
            r".*layers\.\d+\.input_layernorm",
            r"`model.layers.0.input_layernorm` \(LlamaRMSNorm\), which is not a linear",
        ),
    ],
    ids=["matches-nothing", "only-some-blocks", "two-per-block", "outside-blocks", "query", "mlp", "norm"],
)
def test_bad_target_modules_raise_a_clear_error(target_modules, match):
    with pytest.raises(ValueError, match=match):
        get_peft_model(make_llama(), ToastConfig(target_modules=target_modules))


@pytest.mark.parametrize("target", ["fc1", "fc2"])
def test_mlp_layers_of_opt_are_refused(target):
    config = transformers.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=37,
                                    word_embed_proj_dim=32, vocab_size=VOCAB)  # fmt: skip
    with pytest.raises(ValueError, match=rf"`model.decoder.layers.0.{target}`, which is not a value projection"):
        get_peft_model(transformers.OPTForCausalLM(config), ToastConfig(target_modules=[target]))


def test_a_target_that_does_not_read_the_hidden_size_is_refused_before_any_forward():
    """An unconventionally named projection that reads the MLP width (as `fc2` does) would crash in the first forward;
    it is refused at creation, naming the sizes."""
    model = make_llama()
    for layer in model.model.layers:
        layer.self_attn.wv = torch.nn.Linear(model.config.intermediate_size, model.config.hidden_size)
    with pytest.raises(
        ValueError, match=r"`model.layers.0.self_attn.wv`, which reads 37 features, but the blocks' hidden size is 32"
    ):
        get_peft_model(model, ToastConfig(target_modules=["wv"]))


@pytest.mark.parametrize("with_projection", [False, True])
def test_clip_vision_tower_steers_every_token_after_training(with_projection):
    """CLIP's `post_layernorm` normalises the pooled token only: the pass-1 feature is the last block's output, one
    vector per patch; a zero-readout test cannot see the difference, so the adapter is made nonzero."""
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=16, patch_size=4, projection_dim=8)  # fmt: skip
    cls = transformers.CLIPVisionModelWithProjection if with_projection else transformers.CLIPVisionModel
    base = cls(config).eval()
    pixel_values = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        last_hidden = base(pixel_values=pixel_values).last_hidden_state  # (2, 17, 32)
    model = get_peft_model(base, ToastConfig())
    key = "image_embeds" if with_projection else "pooler_output"
    start = model(pixel_values=pixel_values)[key]  # a fresh adapter is exactly the frozen model ...
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(start, model(pixel_values=pixel_values)[key], rtol=0, atol=1e-6)
    start.square().sum().backward()  # ... and its readouts get a gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "readout" in n)
    randomize_adapter(model)
    features = model.base_model.run_pass1(model.base_model.model, (), {"pixel_values": pixel_values})
    torch.testing.assert_close(features, last_hidden)
    with torch.no_grad():
        steered = model(pixel_values=pixel_values)
        with model.disable_adapter():
            plain = model(pixel_values=pixel_values)
    assert steered[key].shape == plain[key].shape and not torch.allclose(steered[key], plain[key])


def test_a_final_norm_on_the_pooled_token_only_is_refused_with_the_fix(monkeypatch):
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=16, patch_size=4)  # fmt: skip
    wrong = ToastArchitecture(blocks="encoder.layers", value="self_attn.v_proj", final_norm="post_layernorm")
    monkeypatch.setitem(ARCHITECTURES, "clip_vision_model", wrong)
    model = get_peft_model(transformers.CLIPVisionModel(config), ToastConfig())
    with pytest.raises(ValueError, match=r"returned \(2, 32\), not one vector per token.*final_norm=None"):
        model(pixel_values=torch.randn(2, 3, 16, 16))


T5 = dict(d_model=32, d_ff=37, num_layers=2, num_heads=4, d_kv=8, vocab_size=VOCAB, decoder_start_token_id=0)
BART = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=37, decoder_ffn_dim=37, vocab_size=VOCAB)  # fmt: skip


@pytest.mark.parametrize("kind", ["t5-encoder", "bart-encoder"])
def test_an_encoder_of_an_encoder_decoder_model_is_steered(kind):
    if kind == "t5-encoder":
        base = transformers.T5EncoderModel(transformers.T5Config(**T5)).eval()
        feature_module = base.encoder.final_layer_norm  # the encoder's last_hidden_state is after it
    else:
        base = transformers.BartForConditionalGeneration(transformers.BartConfig(**BART)).get_encoder().eval()
        feature_module = base.layers[-1]
    ids = torch.randint(2, VOCAB, (2, 6))
    with torch.no_grad():
        plain = base(input_ids=ids).last_hidden_state
    model = get_peft_model(base, ToastConfig())
    assert model.base_model.architecture.feature_module is feature_module
    start = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(start, plain, rtol=0, atol=1e-6)  # a fresh adapter is the frozen encoder
    start.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "readout" in n)
    randomize_adapter(model)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).last_hidden_state, plain, atol=1e-4)
