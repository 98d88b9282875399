"""TOAST on vision-language models (LLaVA, Qwen2-VL), built tiny from the configs of `tests/support_matrix.py`.

What is steered: the language model's decoder blocks (their value projections). Pass 1 is the whole model's forward,
vision encoder and projector included, up to the language model's last block (its output before the final norm), so
the image tokens are part of the pass-1 sequence and the prompt gates them like any other token; pass 2 is the whole
model's forward again with `W_v t_l` added to the language model's values. The vision encoder and the projector get no
signal. Every test compares two independent paths on an adapter whose tensors are all random and nonzero, and checks
that the adapter changes the output, so that no equality holds by accident.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers
from conftest import randomize_adapter
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from support_matrix import FAMILIES, VLM, VLM_SPECIAL_TOKENS, continued_inputs, vision_language_inputs

from peft_toast import ToastConfig, ToastLayer
from peft_toast.architectures import ARCHITECTURES, resolve_architecture
from peft_toast.generation import get_pass1_cache

pytestmark = pytest.mark.usefixtures("one_thread")

VLMS = {family.model_type: family for family in FAMILIES if family.kind == VLM}
LANGUAGE_MODEL = "model.language_model"
# Logits of cached decoding vs one full forward, as in tests/test_generation.py (different summation orders).
LOGITS_TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
NEW_TOKENS = 6


@pytest.fixture(params=sorted(VLMS))
def model_type(request):
    return request.param


def build(model_type: str):
    """The tiny random base model; every call builds the same weights. A larger initialiser spread than transformers'
    0.02 (as in tests/test_generation.py) gives peaked, varied next-token distributions, which the adapter changes
    clearly."""
    family = VLMS[model_type]
    model_class = getattr(transformers, family.model)
    config = {**family.config, "text_config": {**family.config["text_config"], "initializer_range": 0.3}}
    torch.manual_seed(0)
    model = model_class(model_class.config_class(**config)).eval()
    assert model.config.model_type == model_type
    return model


def inputs_of(model_type: str, seed: int = 0) -> dict:
    return vision_language_inputs(VLMS[model_type], seed=seed)


def steered(model_type: str, **config):
    """TOAST with every adapter tensor random and nonzero; the prompt is the data direction of the test inputs plus
    noise (a prompt drawn at random can close every gate of a tiny model's tokens)."""
    model = get_peft_model(build(model_type), ToastConfig(task_type="CAUSAL_LM", **config))
    randomize_adapter(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        prompt = model.base_model.initialise_prompt(**inputs_of(model_type))
        prompt.add_(torch.randn(prompt.shape, generator=generator))
    return model.eval()


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def assert_adapter_matters(steered_logits: torch.Tensor, base_logits: torch.Tensor) -> None:
    difference = (steered_logits - base_logits).abs().max()
    assert difference > 1e-2 * base_logits.abs().max(), f"the adapter barely changes the logits ({difference:.2e})"


def greedy(model, inputs: dict, **kwargs):
    return model.generate(
        **inputs,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        suppress_tokens=VLM_SPECIAL_TOKENS,  # a generated image placeholder would ask for an image the call lacks
        **kwargs,
    )


# ------------------------------------------------------------------------------------------------ what is steered


def test_the_language_model_is_steered_and_the_vision_encoder_is_not(model_type, caplog):
    with caplog.at_level(logging.INFO, logger="peft_toast"):
        model = get_peft_model(build(model_type), ToastConfig(task_type="CAUSAL_LM"))
    architecture = model.base_model.architecture
    assert architecture.causal
    assert architecture.block_names == [f"{LANGUAGE_MODEL}.layers.{index}" for index in range(2)]
    assert architecture.value_names == [f"{name}.self_attn.v_proj" for name in architecture.block_names]
    wrapped = [name for name, module in model.base_model.model.named_modules() if isinstance(module, ToastLayer)]
    assert wrapped == architecture.value_names  # nothing in the vision encoder or the projector
    # Said at creation (logged at info level) and in the repr.
    assert any("vision encoder and its projector" in record.getMessage() for record in caplog.records)
    assert "receive no signal" in repr(model.base_model).splitlines()[1]
    assert model.peft_config["default"].base_model_dims == {
        "model_type": model_type,
        "hidden_size": 32,
        "num_blocks": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }


def test_the_prompt_gates_the_image_tokens(model_type):
    """The pass-1 sequence is the language model's, image tokens included, and the gates reach them."""
    inputs = inputs_of(model_type)
    gates = steered(model_type).toast_selection(**inputs)
    assert gates.shape == inputs["input_ids"].shape
    image = inputs["input_ids"] == VLM_SPECIAL_TOKENS[0]
    assert image.sum() >= 8 and gates[image].max() > 0.1


# ------------------------------------------------------------------------------------------------ forward


def test_a_fresh_adapter_reproduces_the_base_model(model_type):
    inputs = inputs_of(model_type)
    expected = logits(build(model_type), inputs)
    model = get_peft_model(build(model_type), ToastConfig(task_type="CAUSAL_LM")).eval()
    assert torch.equal(logits(model, inputs), expected)


def plain_toast_logits(base, tensors: dict, adapter_config: dict, inputs: dict) -> torch.Tensor:
    """TOAST recomputed on the untouched base model from the saved adapter tensors, with plain torch."""
    eps = adapter_config["cosine_eps"]
    blocks = base.model.language_model.layers
    key = f"base_model.model.{LANGUAGE_MODEL}.layers.{{}}.self_attn.v_proj"
    with torch.no_grad():
        # Pass 1: the whole model's forward; the feature is the last block's output before the final norm.
        captured = []
        handle = blocks[-1].register_forward_hook(lambda module, args, out: captured.append(out))
        base(**inputs)
        handle.remove()
        x = captured[0][0] if isinstance(captured[0], tuple) else captured[0]  # (B, N, d)
        assert x.shape[:2] == inputs["input_ids"].shape  # every token of the sequence, image tokens included

        if adapter_config["feature_norm"] == "rms":  # the decoder default: each token over its root mean square
            x = x / x.square().mean(dim=-1, keepdim=True).sqrt().clamp_min(eps)
        prompt = tensors["base_model.model.toast.toast_prompt"]  # (d,)
        gates = ((x @ prompt) / (x.norm(dim=-1).clamp_min(eps) * prompt.norm().clamp_min(eps))).clamp(0, 1)  # (B, N)
        z = gates[..., None] * x
        signals = {}
        for index in reversed(range(len(blocks))):
            z = z @ tensors[key.format(index) + ".toast_down.weight"].T  # z_{l-1} = A_l z_l
            signals[index] = z @ tensors[key.format(index) + ".toast_readout.weight"].T  # t_l = C_l z_{l-1}

        # Pass 2: the whole model's forward again, V = W_v (u + t_l) + b_v in the language model's blocks.
        handles = [
            blocks[index].self_attn.v_proj.register_forward_hook(lambda m, a, out, t=t: out + t @ m.weight.T)
            for index, t in signals.items()
        ]
        try:
            return base(**inputs).logits
        finally:
            for handle in handles:
                handle.remove()


def test_steered_logits_equal_an_independent_recomputation(model_type, tmp_path):
    inputs = inputs_of(model_type)
    model = steered(model_type)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert all("language_model" in key for key in tensors if key != "base_model.model.toast.toast_prompt")
    assert all(tensor.abs().min() > 0 for key, tensor in tensors.items() if "toast_readout" in key)

    expected = plain_toast_logits(build(model_type), tensors, adapter_config, inputs)
    actual = logits(model, inputs)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    assert_adapter_matters(actual, logits(build(model_type), inputs))


def test_disabled_adapter_is_the_base_model(model_type):
    inputs = inputs_of(model_type)
    model = steered(model_type)
    with model.disable_adapter():
        assert torch.equal(logits(model, inputs), logits(build(model_type), inputs))


def test_save_and_reload_is_exact(model_type, tmp_path):
    inputs = inputs_of(model_type)
    model = steered(model_type)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(build(model_type), tmp_path).eval()
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))
    assert torch.equal(greedy(reloaded, inputs), greedy(model, inputs))


def test_gradients_reach_exactly_the_adapter_parameters(model_type):
    inputs = inputs_of(model_type)
    model = steered(model_type).train()
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] >= min(VLM_SPECIAL_TOKENS), -100)
    model(**inputs, labels=labels).loss.backward()
    # Every TOAST tensor but the down-maps, which a decoder's default freezes (`train_down=None`).
    adapter = {name for name, _ in model.named_parameters() if "toast_" in name and ".toast_down." not in name}
    assert adapter == {name for name, param in model.named_parameters() if param.requires_grad}
    with_grad = {name for name, param in model.named_parameters() if param.grad is not None}
    assert with_grad == adapter
    assert all(param.grad.abs().sum() > 0 for name, param in model.named_parameters() if name in adapter)
    assert all(
        f"{LANGUAGE_MODEL}.layers." in name for name in adapter - {"base_model.model.toast.toast_prompt.default"}
    )


# ------------------------------------------------------------------------------------------------ generation


@pytest.mark.parametrize("layers", [None, [-1]], ids=["every-block", "top-block"])
def test_cached_generation_with_the_image_is_exact(model_type, layers):
    """Greedy `generate(input_ids, pixel_values, attention_mask)`: the image is given to the first step (prefill)
    only, where both passes put its tokens into their KV caches; cached decoding gives the tokens of uncached decoding,
    and each step's logits are those of one full forward (image included) over the sequence so far. With the top
    block only, the two caches share the bottom block's layer."""
    inputs = inputs_of(model_type)
    model = steered(model_type, layers_to_transform=layers)
    cached = greedy(model, inputs, use_cache=True, output_logits=True, return_dict_in_generate=True)
    uncached = greedy(model, inputs, use_cache=False)
    assert torch.equal(cached.sequences, uncached)

    pass1 = get_pass1_cache(cached.past_key_values)
    assert pass1 is not None and pass1.get_seq_length() == cached.past_key_values.get_seq_length()
    shared = [a is b for a, b in zip(cached.past_key_values.layers, pass1.layers)]
    assert shared == ([True, False] if layers else [False, False])

    full = logits(model, continued_inputs(VLMS[model_type], inputs, cached.sequences))
    start = inputs["input_ids"].shape[1] - 1
    for step, step_logits in enumerate(cached.logits):
        torch.testing.assert_close(step_logits, full[:, start + step], **LOGITS_TOLERANCE)
    # The image reached the caches: another image gives other logits over the same tokens.
    other_image = {**continued_inputs(VLMS[model_type], inputs, cached.sequences)}
    other_image["pixel_values"] = inputs_of(model_type, seed=1)["pixel_values"]
    assert not torch.allclose(logits(model, other_image)[:, start:], full[:, start:], atol=1e-3)
    with model.disable_adapter():
        base = logits(model, continued_inputs(VLMS[model_type], inputs, cached.sequences))
    assert_adapter_matters(full[:, start:], base[:, start:])


def test_incremental_forward_continues_the_cache_the_model_created(model_type):
    """A plain forward with the image returns a KV cache (the language model's config asks for one; the top-level
    config of a vision-language model has no `use_cache`) with its pass-1 twin; feeding tokens one at a time with it
    gives the logits of one full forward."""
    inputs = inputs_of(model_type)
    model = steered(model_type)
    sequence = torch.cat([inputs["input_ids"], torch.tensor([[5, 6, 7], [8, 9, 10]])], dim=1)
    full = logits(model, continued_inputs(VLMS[model_type], inputs, sequence))
    with torch.no_grad():
        output = model(**inputs)  # no `use_cache`, no cache: the model makes one
        assert get_pass1_cache(output.past_key_values) is not None
        steps = [output.logits]
        for position in range(inputs["input_ids"].shape[1], sequence.shape[1]):
            step = {"input_ids": sequence[:, position : position + 1], "cache": output.past_key_values}
            # Qwen2-VL (transformers 5.24) builds a cached step's 3-D positions from the whole attention mask, one per
            # cached token too, and fails on the shapes; the base model does the same. Without a mask it continues
            # from the cache's length plus its stored image offset (`rope_deltas`), as `generate` does.
            if model_type != "qwen2_vl":
                step["attention_mask"] = torch.ones(sequence.shape[0], position + 1, dtype=torch.long)
            output = model(**step)
            steps.append(output.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **LOGITS_TOLERANCE)


# ------------------------------------------------------------------------------------------------ refusals


def test_an_unregistered_vision_language_model_is_refused_with_the_fix(monkeypatch):
    """LLaVA-NeXT is not in the registry: inspection would steer the vision encoder (its stack comes first at equal
    length), so creation refuses and names the declaration; with it, the language model is steered."""
    config = transformers.LlavaNextConfig(
        vision_config=VLMS["llava"].config["vision_config"],
        text_config=VLMS["llava"].config["text_config"],
        image_token_index=VLM_SPECIAL_TOKENS[0],
        vision_feature_layer=-1,
    )
    base = transformers.LlavaNextForConditionalGeneration(config)
    with pytest.raises(ValueError, match="has a vision and a text part") as error:
        get_peft_model(base, ToastConfig(task_type="CAUSAL_LM"))
    assert "register_architecture('llava_next', peft_toast.architectures.ARCHITECTURES['llava'])" in str(error.value)
    monkeypatch.setitem(ARCHITECTURES, "llava_next", ARCHITECTURES["llava"])
    resolved = resolve_architecture(base)
    assert resolved.causal and resolved.block_names[0] == f"{LANGUAGE_MODEL}.layers.0"


def test_a_dual_encoder_is_refused_with_the_fix():
    config = transformers.CLIPConfig(
        vision_config=VLMS["llava"].config["vision_config"],
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37),
        projection_dim=32,
    )
    with pytest.raises(ValueError, match="steer one tower on its own"):
        get_peft_model(transformers.CLIPModel(config), ToastConfig())


def test_llava_with_a_language_model_of_another_layout_names_the_missing_path():
    config = transformers.LlavaConfig(
        vision_config=VLMS["llava"].config["vision_config"],
        text_config=dict(
            model_type="gpt_neox", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            vocab_size=99,
        ),
        image_token_index=VLM_SPECIAL_TOKENS[0],
    )  # fmt: skip
    with pytest.raises(ValueError, match="`value` path 'self_attn.v_proj' does not exist in model type 'llava'"):
        get_peft_model(transformers.LlavaForConditionalGeneration(config), ToastConfig(task_type="CAUSAL_LM"))
