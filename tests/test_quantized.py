"""TOAST on quantized bases: bitsandbytes (QLoRA-style) 4-bit (nf4, fp4, double quantisation) and 8-bit LLaMA, and
torchao weight-only int8 and int4 (`IntxWeightOnlyConfig`, the int4 layout that runs on CPU).

The signal enters the value projection's input, so it goes through the quantized layer's own forward (a fused
query/key/value projection adds `W_v t` with the dequantised weight). Checked against an fp32 copy of the model whose
linear layers hold the dequantised weights: equal up to float rounding for bitsandbytes 4-bit (it dequantises and
multiplies in the compute dtype on CPU) and torchao weight-only; for bitsandbytes 8-bit, which multiplies in int8,
within the quantisation error of the activations. Gradients reach exactly the adapter, and cached generation equals
uncached. Each library's tests skip where it is not installed.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import randomize_adapter
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

from peft_toast import ToastConfig
from peft_toast.layer import is_torchao_tensor

try:
    import bitsandbytes as bnb
except ImportError:
    bnb = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed")
pytestmark = pytest.mark.usefixtures("one_thread")

# Every input width a multiple of 64: bitsandbytes 0.50.2 dequantises 4-bit weights on CPU in blocks of 64 along the
# input and fails on a narrower or ragged one ("shape '[64, 1]' is invalid for input of size 96").
_CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=99)
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
    dequantised weight, and every torchao-quantized weight by its dequantised tensor."""
    config = copy.deepcopy(model.config)
    del config.quantization_config
    reference = type(model)(config).eval()
    state = {}
    for name, module in model.named_modules():
        if is_torchao_tensor(getattr(module, "weight", None)):
            state[f"{name}.weight"] = module.weight.dequantize().float()
        elif bnb is None:
            continue
        elif isinstance(module, bnb.nn.Linear4bit):
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


@needs_bnb
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
    else:  # 4-bit on CPU dequantises and multiplies in fp32 (see `_quantized`): the same numbers
        tolerance = 1e-5
    torch.testing.assert_close(got, expected, rtol=0, atol=tolerance)
    assert (got - unsteered).abs().max() > 10 * tolerance, "the adapter must change the output for the check to mean"


@needs_bnb
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


@needs_bnb
@pytest.mark.parametrize("kind", ["nf4-double", "8bit"])
def test_cached_generation_equals_uncached(llama_dir, kind):
    model = get_peft_model(_quantized(llama_dir, kind), ToastConfig(task_type="CAUSAL_LM"))
    randomize_adapter(model, std=0.1)
    model.eval()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(**_INPUTS, **kwargs)
    uncached = model.generate(**_INPUTS, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


@needs_bnb
def test_a_fused_quantized_projection_is_refused_and_the_fix_works(tmp_path):
    """A fused query/key/value projection needs the value rows of its weight, which a packed weight does not expose;
    the error names the fix (keep those projections in full precision), which then works."""
    torch.manual_seed(0)
    config = transformers.Phi3Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, num_hidden_layers=2,
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


# --------------------------------------------------------------------------------------------------------- torchao


@pytest.fixture(scope="module")
def torchao():
    return pytest.importorskip("torchao")


def _torchao_config(kind: str):
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        PerGroup,
    )

    if kind == "int8":
        return Int8WeightOnlyConfig()
    if kind == "int4":  # `Int4WeightOnlyConfig` does not run on CPU; this is torchao's int4 weight-only that does
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
    assert kind == "int8-dynamic"
    return Int8DynamicActivationInt8WeightConfig()


def _torchao_quantized(folder, kind: str, cls=transformers.LlamaForCausalLM):
    quantization = transformers.TorchAoConfig(_torchao_config(kind))
    model = cls.from_pretrained(folder, quantization_config=quantization, device_map="cpu", dtype=torch.float32)
    return model.eval()


def _with_adapter_of(reference, model, **config):
    """`reference` (an unquantized model) wrapped with TOAST holding exactly `model`'s adapter tensors."""
    peft_reference = get_peft_model(reference, ToastConfig(task_type="CAUSAL_LM", **config))
    adapter = {k: v for k, v in model.state_dict().items() if "toast_" in k}
    missing, unexpected = peft_reference.load_state_dict(adapter, strict=False)
    assert not unexpected and not [k for k in missing if "toast_" in k]
    return peft_reference


# The same dequantised weights on both sides: a weight-only int8 product scales `x @ q^T` by the row scales, which
# differs from `x @ (q * s)^T` only in float rounding.
_TORCHAO_ATOL = 1e-5


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_torchao_outputs_and_gradients_equal_the_dequantised_model(torchao, llama_dir, kind):
    quantized = _torchao_quantized(llama_dir, kind)
    value = quantized.model.layers[0].self_attn.v_proj.weight
    assert is_torchao_tensor(value) and value.qdata.dtype == torch.int8  # int4 values, unpacked to int8 on CPU
    reference = _dequantised_copy(quantized)
    model = get_peft_model(quantized, ToastConfig(task_type="CAUSAL_LM"))
    randomize_adapter(model, std=1.0)
    expected_model = _with_adapter_of(reference, model)
    with torch.no_grad():
        with model.disable_adapter(), expected_model.disable_adapter():
            unsteered = model(**_INPUTS).logits
            torch.testing.assert_close(unsteered, expected_model(**_INPUTS).logits, rtol=0, atol=_TORCHAO_ATOL)
    model.train()
    expected_model.train()
    batch = {**_INPUTS, "labels": _INPUTS["input_ids"]}
    got, expected = model(**batch), expected_model(**batch)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=_TORCHAO_ATOL)
    assert (got.logits - unsteered).abs().max() > 100 * _TORCHAO_ATOL, "the adapter must change the output"
    got.loss.backward()
    expected.loss.backward()
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all("toast_" in name for name in trainable)
    assert {name for name, param in model.named_parameters() if param.grad is not None} == trainable
    references = dict(expected_model.named_parameters())
    for name in trainable:
        gradient, expected_gradient = dict(model.named_parameters())[name].grad, references[name].grad
        assert gradient.abs().sum() > 0, name
        torch.testing.assert_close(gradient, expected_gradient, rtol=1e-4, atol=1e-5, msg=name)


def test_torchao_trains_saves_reloads_and_generates(torchao, llama_dir, tmp_path):
    """A few steps on an int8 weight-only base reduce the loss and leave the base untouched; the saved adapter loads
    onto a fresh quantized base with identical outputs; cached greedy generation equals uncached."""
    model = get_peft_model(_torchao_quantized(llama_dir, "int8"), ToastConfig(task_type="CAUSAL_LM"))
    base_before = {k: v.dequantize().clone() for k, v in model.state_dict().items() if is_torchao_tensor(v)}
    assert base_before
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = {**_INPUTS, "labels": _INPUTS["input_ids"]}
    model.train()
    losses = []
    for _ in range(5):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    state = model.state_dict()
    assert all(torch.equal(state[k].dequantize(), v) for k, v in base_before.items())

    model.eval()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_torchao_quantized(llama_dir, "int8"), tmp_path).eval()
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(**_INPUTS).logits, model(**_INPUTS).logits)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = loaded.generate(**_INPUTS, **kwargs)
    assert torch.equal(cached, loaded.generate(**_INPUTS, use_cache=False, **kwargs))
    assert torch.equal(cached, model.generate(**_INPUTS, **kwargs))


def test_torchao_fused_projection_uses_its_dequantised_value_rows(torchao, tmp_path):
    """Phi-3's fused query/key/value projection quantized int8: `W_v t` uses the value rows of the dequantised weight
    (TOAST never multiplies with the int8 data itself)."""
    torch.manual_seed(0)
    config = transformers.Phi3Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, num_hidden_layers=2,
        vocab_size=99, pad_token_id=0,
    )  # fmt: skip
    transformers.Phi3ForCausalLM(config).save_pretrained(tmp_path)
    quantized = _torchao_quantized(tmp_path, "int8", cls=transformers.Phi3ForCausalLM)
    assert is_torchao_tensor(quantized.model.layers[0].self_attn.qkv_proj.weight)
    reference = _dequantised_copy(quantized)
    model = get_peft_model(quantized, ToastConfig(task_type="CAUSAL_LM"))
    randomize_adapter(model, std=1.0)
    expected_model = _with_adapter_of(reference, model)
    with torch.no_grad():
        got, expected = model(**_INPUTS).logits, expected_model(**_INPUTS).logits
        with model.disable_adapter():
            unsteered = model(**_INPUTS).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=_TORCHAO_ATOL)
    assert (got - unsteered).abs().max() > 100 * _TORCHAO_ATOL


def test_torchao_dynamic_activation_quantization_is_refused_for_training(torchao, llama_dir):
    """Int8 dynamic activation quantization passes no gradient to a layer's input, so the adapter could not train: the
    error names the weight-only configs. For inference only it is accepted, and within the base model's own
    quantisation error of the dequantised model with the same adapter."""
    with pytest.raises(ValueError, match="quantizes its input too.*Int8WeightOnlyConfig"):
        get_peft_model(_torchao_quantized(llama_dir, "int8-dynamic"), ToastConfig(task_type="CAUSAL_LM"))
    quantized = _torchao_quantized(llama_dir, "int8-dynamic")
    reference = _dequantised_copy(quantized)
    model = get_peft_model(quantized, ToastConfig(task_type="CAUSAL_LM", inference_mode=True))
    randomize_adapter(model, std=1.0)
    expected_model = _with_adapter_of(reference, model, inference_mode=True)
    with torch.no_grad():
        got, expected = model(**_INPUTS).logits, expected_model(**_INPUTS).logits
        with model.disable_adapter(), expected_model.disable_adapter():
            base_error = (model(**_INPUTS).logits - expected_model(**_INPUTS).logits).abs().max().item()
    assert base_error > 0  # the activations are quantized
    torch.testing.assert_close(got, expected, rtol=0, atol=max(2 * base_error, 1e-3))


def test_a_torchao_weight_whose_product_fails_is_refused(torchao, llama_dir, monkeypatch):
    """A torchao weight that does not run on its device (as torchao's int4 layouts outside CUDA) fails when the adapter
    is created, naming the configs that run on CPU, not at the first forward."""
    model = _torchao_quantized(llama_dir, "int8")

    def unsupported(*args, **kwargs):
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(torch.nn.functional, "linear", unsupported)
    with pytest.raises(ValueError, match="does not run on cpu.*no kernel.*IntxWeightOnlyConfig"):
        get_peft_model(model, ToastConfig(task_type="CAUSAL_LM"))


@needs_bnb
def test_a_4bit_base_keeps_passing_gradients_after_an_evaluation(llama_dir):
    """bitsandbytes 0.50.2 repacks 4-bit weights for bf16 CPU inference at the first eval call (on CPUs with
    AVX512-BF16), after which they pass no gradient. The adapter keeps them on the differentiable path: training after
    an evaluation gets the gradients of training without one; a base repacked before the adapter was added is refused."""
    ids = torch.tensor([[5, 9, 3, 17, 42, 8]])
    grads = []
    for evaluate_first in (False, True):
        model = get_peft_model(_quantized(llama_dir, "nf4-single"), ToastConfig(task_type="CAUSAL_LM"))
        randomize_adapter(model)
        if evaluate_first:
            with torch.no_grad():
                model.eval()(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    assert grads[0] and all(grad is not None for grad in grads[1].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=0)

    base = _quantized(llama_dir, "nf4-single")
    if not any(getattr(module, "support_avx512bf16_for_cpu", False) for module in base.modules()):
        pytest.skip("this CPU or bitsandbytes version does not repack 4-bit weights for inference")
    with torch.no_grad():
        base(input_ids=ids)  # eval mode: repacked
    with pytest.raises(ValueError, match="repacked by bitsandbytes for CPU inference"):
        get_peft_model(base, ToastConfig(task_type="CAUSAL_LM"))
