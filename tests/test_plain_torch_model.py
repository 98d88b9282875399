"""TOAST on a model outside transformers, through a declaration: a Vision Transformer laid out exactly like timm's
`VisionTransformer` (`blocks` an `nn.Sequential`, a fused `attn.qkv` read as `[q | k | v]`, `norm`, `head`; no config).

timm itself cannot be imported on this project's machines (it imports torchvision, whose compiled operators do not
load with the CPU build of torch 2.13 that CI installs), so the model below re-creates its module tree and forward
with plain torch; a real timm model has the same names, so the same declaration applies to it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomize_adapter
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from peft_toast import ToastArchitecture, ToastConfig, ToastLayer, register_architecture
from peft_toast.architectures import ARCHITECTURES

DIM, HEADS, DEPTH, PATCH, IMAGE, CLASSES = 32, 4, 3, 4, 16, 5


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.num_heads, self.head_dim = HEADS, DIM // HEADS
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x):
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, DIM))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(DIM), Attention(), nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmLayoutViT(nn.Module):
    """timm's `VisionTransformer` module tree: `patch_embed.proj`, `cls_token`, `pos_embed`, `blocks`, `norm`, `head`."""

    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (IMAGE // PATCH) ** 2, DIM) * 0.02)
        self.blocks = nn.Sequential(*[Block() for _ in range(DEPTH)])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


TIMM_VIT = ToastArchitecture(blocks="blocks", value="attn.qkv", fused_qkv="contiguous", final_norm="norm")


@pytest.fixture
def declared(monkeypatch):
    monkeypatch.delitem(ARCHITECTURES, "TimmLayoutViT", raising=False)
    register_architecture("TimmLayoutViT", TIMM_VIT)
    yield
    ARCHITECTURES.pop("TimmLayoutViT", None)


def _model_and_inputs():
    torch.manual_seed(0)
    return TimmLayoutViT().eval(), torch.randn(2, 3, IMAGE, IMAGE)


def _plain_toast(base: nn.Module, tensors: dict, pixels: torch.Tensor, eps: float) -> torch.Tensor:
    """TOAST recomputed with plain torch from the saved tensors: the normed tokens, the gates, the feedback chain, and
    `W_v t_l` added to the value third of every `attn.qkv` output."""
    with torch.no_grad():
        captured = []
        handle = base.norm.register_forward_hook(lambda module, args, out: captured.append(out))
        base(pixels)
        handle.remove()
        x = captured[0]
        prompt = tensors["base_model.model.toast.toast_prompt"]
        gates = ((x @ prompt) / (x.norm(dim=-1).clamp_min(eps) * prompt.norm().clamp_min(eps))).clamp(0, 1)
        z, signals = gates[..., None] * x, {}
        for index in reversed(range(DEPTH)):
            name = f"base_model.model.blocks.{index}.attn.qkv"
            z = z @ tensors[f"{name}.toast_down.weight"].T
            signals[index] = z @ tensors[f"{name}.toast_readout.weight"].T

        def add(module, args, out, t):
            out = out.clone()
            out[..., 2 * DIM :] += t @ module.weight[2 * DIM :].T
            return out

        handles = [
            base.blocks[index].attn.qkv.register_forward_hook(lambda m, a, o, t=t: add(m, a, o, t))
            for index, t in signals.items()
        ]
        try:
            return base(pixels)
        finally:
            for handle in handles:
                handle.remove()


def test_a_timm_layout_vit_is_steered_exactly_through_a_declaration(declared, tmp_path):
    base, pixels = _model_and_inputs()
    reference, fresh = copy.deepcopy(base), copy.deepcopy(base)
    with torch.no_grad():
        frozen = base(pixels)
    model = get_peft_model(base, ToastConfig(modules_to_save=["head"]))
    assert all(isinstance(block.attn.qkv, ToastLayer) for block in model.get_base_model().blocks)
    randomize_adapter(model)
    model.base_model.initialise_prompt(pixels)  # positional input, as timm models take it
    model.eval()
    with torch.no_grad():
        steered = model(pixels)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    expected = _plain_toast(reference, tensors, pixels, model.peft_config["default"].cosine_eps)
    torch.testing.assert_close(steered, expected, rtol=1e-5, atol=1e-6)
    assert (steered - frozen).abs().max() > 1e-3
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(model(pixels), frozen)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixels), steered)


def test_only_the_adapter_and_the_head_train(declared):
    base, pixels = _model_and_inputs()
    model = get_peft_model(base, ToastConfig(modules_to_save=["head"]))
    model.train()
    torch.nn.functional.cross_entropy(model(pixels), torch.tensor([0, 3])).backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("toast" in name or ".head.modules_to_save." in name for name in trainable)
    assert all(p.grad is None for name, p in model.named_parameters() if name not in trainable)
    readouts = [p for name, p in model.named_parameters() if "toast_readout" in name]
    assert readouts and all(p.grad is not None and p.grad.abs().sum() > 0 for p in readouts)


def test_without_a_declaration_the_fused_projection_is_not_guessed():
    base, _ = _model_and_inputs()
    with pytest.raises(ValueError, match="register_architecture"):
        get_peft_model(base, ToastConfig())
