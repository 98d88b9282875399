"""TOAST on bitsandbytes-quantized bases (QLoRA-style): 4-bit (nf4, fp4, double quantisation) and 8-bit LLaMA.

The signal enters the value projection's input, so it goes through the quantized layer's own forward. Checked against
an fp32 copy of the model whose linear layers hold the dequantised weights: equal up to float rounding for 4-bit
(bitsandbytes dequantises and multiplies in the compute dtype on CPU); for 8-bit, which multiplies in int8, within the
quantisation error of the activations. Gradients reach exactly the adapter, and cached generation equals uncached.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import randomize_adapter
from peft import get_peft_model, prepare_model_for_kbit_training

from peft_toast import ToastConfig

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_thread")

_CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=99)
_INPUTS = {"input_ids": torch.tensor([[5, 9, 3, 17, 42, 8], [7, 7, 21, 4, 60, 2]])}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**_CONFIG)).save_pretrained(folder)
    return folder


def _quantized(folder, kind: str):
    if kind == "8bit":
        quantization = transformers.BitsAndBytesConfig(load_in_8bit=True)
    else:
        quant_type, double = kind.split("-")
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double == "double",
            bnb_4bit_compute_dtype=torch.float32,
        )
    model = transformers.LlamaForCausalLM.from_pretrained(folder, quantization_config=quantization, device_map="cpu")
    return model.eval()


def _dequantised_copy(model) -> torch.nn.Module:
    """An fp32 model equal to `model` with every bitsandbytes linear layer replaced by an `nn.Linear` holding its
    dequantised weight."""
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_CONFIG)).eval()
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state[f"{name}.weight"] = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            weight = module.weight
            state[f"{name}.weight"] = weight.CB.float() * weight.SCB.float().unsqueeze(1) / 127
    for name, tensor in model.state_dict().items():
        if name not in state and name in reference.state_dict() and tensor.dtype.is_floating_point:
            state[name] = tensor.float()
    missing = set(reference.state_dict()) - set(state)
    assert not missing, missing
    reference.load_state_dict(state)
    return reference


KINDS = ["nf4-double", "nf4-single", "fp4-single", "8bit"]


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_equal_the_dequantised_model_with_the_same_adapter(llama_dir, kind):
    quantized = _quantized(llama_dir, kind)
    reference = _dequantised_copy(quantized)
    model = get_peft_model(quantized, ToastConfig(task_type="CAUSAL_LM"))
    randomize_adapter(model, std=1.0)
    expected_model = get_peft_model(reference, ToastConfig(task_type="CAUSAL_LM"))
    adapter = {k: v for k, v in model.state_dict().items() if "toast_" in k}
    missing, unexpected = expected_model.load_state_dict(adapter, strict=False)
    assert not unexpected
    with torch.no_grad():
        got = model(**_INPUTS).logits
        expected = expected_model(**_INPUTS).logits
        with model.disable_adapter():
            unsteered = model(**_INPUTS).logits
        with expected_model.disable_adapter():
            base_error = (unsteered - expected_model(**_INPUTS).logits).abs().max().item()
    if kind == "8bit":  # int8 activations: within twice the error the quantized base model itself has
        tolerance = max(2 * base_error, 1e-3)
    else:  # 4-bit on CPU dequantises and multiplies in fp32: the same numbers
        tolerance = 1e-5
    torch.testing.assert_close(got, expected, rtol=0, atol=tolerance)
    assert (got - unsteered).abs().max() > 10 * tolerance, "the adapter must change the output for the check to mean"


@pytest.mark.parametrize("kind", ["nf4-double", "8bit"])
def test_training_step_reaches_exactly_the_adapter(llama_dir, kind):
    model = prepare_model_for_kbit_training(_quantized(llama_dir, kind), use_gradient_checkpointing=True)
    model = get_peft_model(model, ToastConfig(task_type="CAUSAL_LM"))
    model.train()
    out = model(**_INPUTS, labels=_INPUTS["input_ids"])
    out.loss.backward()
    with_grad = {name for name, param in model.named_parameters() if param.grad is not None}
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert with_grad == trainable and trainable
    assert all("toast_" in name for name in trainable)
    # the readouts start at zero, so their gradient (not the prompt's) is what moves the model first
    assert any(
        "toast_readout" in name and param.grad.abs().sum() > 0
        for name, param in model.named_parameters()
        if name in with_grad
    )


@pytest.mark.parametrize("kind", ["nf4-double", "8bit"])
def test_cached_generation_equals_uncached(llama_dir, kind):
    model = get_peft_model(_quantized(llama_dir, kind), ToastConfig(task_type="CAUSAL_LM"))
    randomize_adapter(model, std=0.1)
    model.eval()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(**_INPUTS, **kwargs)
    uncached = model.generate(**_INPUTS, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_a_fused_quantized_projection_is_refused_and_the_fix_works(tmp_path):
    """A fused query/key/value projection needs the value rows of its weight, which a packed weight does not expose;
    the error names the fix (keep those projections in full precision), which then works."""
    torch.manual_seed(0)
    config = transformers.Phi3Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, num_hidden_layers=2,
        vocab_size=99, pad_token_id=0,
    )  # fmt: skip
    transformers.Phi3ForCausalLM(config).save_pretrained(tmp_path)

    def load(**skip):
        quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, **skip)
        return transformers.Phi3ForCausalLM.from_pretrained(
            tmp_path, quantization_config=quantization, device_map="cpu"
        )

    with pytest.raises(ValueError, match="llm_int8_skip_modules=\\['qkv_proj'\\]"):
        get_peft_model(load(), ToastConfig(task_type="CAUSAL_LM"))
    model = get_peft_model(load(llm_int8_skip_modules=["qkv_proj", "lm_head"]), ToastConfig(task_type="CAUSAL_LM"))
    assert isinstance(model.base_model.model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    randomize_adapter(model, std=0.1)
    with torch.no_grad():
        steered = model(**_INPUTS).logits
        with model.disable_adapter():
            unsteered = model(**_INPUTS).logits
    assert torch.isfinite(steered).all() and not torch.allclose(steered, unsteered)
