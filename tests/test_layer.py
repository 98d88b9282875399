"""The value-projection wrapper (`peft_toast/layer.py`): block l's values gain exactly `W_v t_l`."""

import pytest
import torch
from conftest import HIDDEN, make_gpt2
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_toast import ToastConfig, ToastLayer
from peft_toast.state import CallState, use_state


def _wrap(base: nn.Module, fused_qkv: bool = False) -> ToastLayer:
    value_index = torch.arange(2 * HIDDEN, 3 * HIDDEN) if fused_qkv else None  # [q | k | v], equal thirds
    layer = ToastLayer(base, block_index=0, value_index=value_index)
    layer.update_layer("default", ToastConfig(), with_readout=True)
    return layer


def _call_with_signal(layer: ToastLayer, x: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), use_state(CallState(signals={layer: signal})):
        return layer(x)


def test_linear_values_gain_exactly_w_v_t_with_the_bias_once():
    torch.manual_seed(0)
    # GQA-shaped value projection: d = 12 inputs, 8 outputs, with a bias that must be added once.
    base = nn.Linear(12, 8, bias=True)
    nn.init.normal_(base.bias)
    layer = _wrap(base)
    x, t = torch.randn(2, 5, 12), torch.randn(2, 5, 12)

    out = _call_with_signal(layer, x, t)
    with torch.no_grad():
        expected = x @ base.weight.T + base.bias + t @ base.weight.T  # W_v (u + t) + b_v
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out - base(x), t @ base.weight.T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, nn.functional.linear(x + t, base.weight, base.bias), rtol=1e-5, atol=1e-5)
    assert layer.in_features == 12


def test_gpt2_fused_c_attn_changes_only_the_value_third():
    c_attn = make_gpt2().transformer.h[0].attn.c_attn
    assert isinstance(c_attn, Conv1D)
    nn.init.normal_(c_attn.bias)  # initialised to zero: a random bias shows whether it is added once
    layer = _wrap(c_attn, fused_qkv=True)
    assert layer.in_features == HIDDEN
    x, t = torch.randn(2, 5, HIDDEN), torch.randn(2, 5, HIDDEN)

    out = _call_with_signal(layer, x, t)
    with torch.no_grad():
        base_out = c_attn(x)  # (B, N, 3d) = [q | k | v]
        w_v = c_attn.weight[:, 2 * HIDDEN :]  # Conv1D stores (d, 3d): the value columns
    q, k, v = out.split(HIDDEN, dim=-1)
    base_q, base_k, base_v = base_out.split(HIDDEN, dim=-1)
    assert torch.equal(q, base_q) and torch.equal(k, base_k), "queries and keys must be bit-identical"
    torch.testing.assert_close(v - base_v, t @ w_v, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(v, base_v)


def test_no_signal_or_disabled_adapters_give_the_base_output():
    torch.manual_seed(0)
    base = nn.Linear(HIDDEN, HIDDEN)
    layer = _wrap(base)
    x, t = torch.randn(2, 3, HIDDEN), torch.randn(2, 3, HIDDEN)
    with torch.no_grad():
        expected = base(x)
        assert torch.equal(layer(x), expected), "outside a TOAST call there is no signal"
        layer.enable_adapters(False)
        assert torch.equal(_call_with_signal(layer, x, t), expected)
        layer.enable_adapters(True)
        assert not torch.allclose(_call_with_signal(layer, x, t), expected)


def test_signal_of_another_layer_is_ignored():
    base = nn.Linear(HIDDEN, HIDDEN)
    layer, other = _wrap(base), _wrap(nn.Linear(HIDDEN, HIDDEN))
    x = torch.randn(1, 2, HIDDEN)
    with torch.no_grad(), use_state(CallState(signals={other: torch.randn(1, 2, HIDDEN)})):
        assert torch.equal(layer(x), base(x))


def test_signal_is_cast_to_the_base_dtype():
    base = nn.Linear(HIDDEN, HIDDEN).to(torch.bfloat16)
    layer = _wrap(base)
    x = torch.randn(1, 2, HIDDEN, dtype=torch.bfloat16)
    out = _call_with_signal(layer, x, torch.randn(1, 2, HIDDEN))  # fp32 signal from fp32 feedback maps
    assert out.dtype == torch.bfloat16


def test_update_layer_creates_the_block_maps():
    layer = ToastLayer(nn.Linear(HIDDEN, 16), block_index=3)
    layer.update_layer("relay", ToastConfig(), with_readout=False)
    layer.update_layer("steer", ToastConfig(feedback_rank=2, train_down=False), with_readout=True)
    assert set(layer.toast_down) == {"relay", "steer"}
    assert set(layer.toast_readout) == {"steer"}, "a block below the selection only relays the signal"
    assert layer.toast_down["relay"].dim == HIDDEN, "feedback maps live in the value projection's input space"
    assert layer.frozen_peft_weight_names == {"steer": ("toast_down",)}


def test_merge_raises_not_implemented():
    layer = _wrap(nn.Linear(HIDDEN, HIDDEN))
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        layer.merge()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        layer.unmerge()
