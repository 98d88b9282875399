"""The models of the benchmarks and the methods that train them: the tiny random configurations of `--tiny`, the
paths of the offline default models, loading an image classifier, a text classifier or a causal LM, and `apply_method`,
which makes a model train the way a method does (with the methods, their labels and configurations, the LoRA rank and
the names of the task heads), counting trainable parameters and finding the task head (`model_head`)."""

from __future__ import annotations

from typing import Optional

import common  # noqa: F401, I001  (first: it sets the OpenMP wait policy before torch loads)
import torch
import transformers
from peft import EvaConfig, LoraConfig, get_peft_model
from torch import nn

from peft_toast import ToastConfig
from peft_toast.assets import resolve_model

# The methods compared, in table order. "toast-r8" is TOAST with rank-8 feedback maps (`feedback_rank=8`): the same
# number of trainable parameters as LoRA r=8 on the query and value projections.
METHODS = ("toast", "toast-r8", "lora", "linear", "full")
METHOD_LABELS = {
    "toast": "TOAST (full-rank feedback)",
    "toast-r8": "TOAST, feedback_rank=8",
    "lora": "LoRA r=8 (q, v)",
    "linear": "linear probe",
    "full": "full fine-tuning",
    "base": "frozen base model",
}
TOAST_CONFIGS = {
    "toast": {},
    "toast-r8": {"feedback_rank": 8},
    "toast-lite": {"lite_rank": 8},
    "toast-top4": {"layers_to_transform": [-4, -3, -2, -1]},  # full rank on the top 4 blocks
}
LORA_RANK = 8
# LoRA's variants: (rank, target modules). "lora-all-r32" adapts every linear projection of the attention and the MLP
# (PEFT's "all-linear", which leaves the task head to `modules_to_save`) at rank 32: on SmolLM2-135M that is 9.77M
# parameters, the budget of full-rank TOAST with frozen down-maps (9.95M), so the two compare at equal size.
LORA_VARIANTS = {"lora": (LORA_RANK, None), "lora-all-r32": (32, "all-linear"), "lora-eva": (LORA_RANK, None)}

# Heads of the classification models; they train with every method.
HEAD_NAMES = ("classifier", "score")


def _tiny_vit_config(num_labels: int = 10, image_size: int = 28) -> transformers.ViTConfig:
    return transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=image_size,
        patch_size=7,
        num_labels=num_labels,
    )


def _tiny_llama_config(**kwargs) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **kwargs,
    )


def vision_model_path(model: Optional[str], image_size: int) -> str:
    """`model` as `peft_toast.assets.resolve_model` reads it; None is the offline DINOv2-S at `image_size` px."""
    return resolve_model(model, default="dinov2-small", image_size=image_size)


def text_model_path(model: Optional[str]) -> str:
    """`model` as `peft_toast.assets.resolve_model` reads it; None is the offline SmolLM2-135M-Instruct."""
    return resolve_model(model, default="smollm2-135m")


def load_image_classifier(
    model: Optional[str], num_labels: int, *, image_size: int = 112, tiny: bool = False, dtype=torch.float32
) -> nn.Module:
    """A pretrained image backbone with a fresh `num_labels`-way head (initialised from torch's global seed)."""
    if tiny:
        return transformers.ViTForImageClassification(_tiny_vit_config(num_labels, image_size)).to(dtype)
    return transformers.AutoModelForImageClassification.from_pretrained(
        vision_model_path(model, image_size), num_labels=num_labels, ignore_mismatched_sizes=True, dtype=dtype
    )


def load_text_classifier(model: Optional[str], num_labels: int, pad_token_id: int, *, tiny: bool = False) -> nn.Module:
    """A pretrained decoder with a fresh sequence-classification head on its last real token."""
    if tiny:
        return transformers.LlamaForSequenceClassification(_tiny_llama_config(num_labels=num_labels))
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        text_model_path(model), num_labels=num_labels, pad_token_id=pad_token_id, dtype=torch.float32
    )


def load_causal_lm(model: Optional[str], *, tiny: bool = False, dtype=torch.float32) -> nn.Module:
    if tiny:
        return transformers.LlamaForCausalLM(_tiny_llama_config()).to(dtype)
    return transformers.AutoModelForCausalLM.from_pretrained(text_model_path(model), dtype=dtype)


def _lora_targets(model: nn.Module) -> list[str]:
    """The query and value projections, under the names transformers uses for this model."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for query, value in (("q_proj", "v_proj"), ("query", "value")):
        if {query, value} <= names:
            return [query, value]
    raise ValueError(
        "Could not find the query/value projections of this model for LoRA (looked for q_proj/v_proj and "
        "query/value); use a model whose attention uses one of these names."
    )


def apply_method(model: nn.Module, method: str) -> nn.Module:
    """Make `model` train the way `method` does. Every method trains the task head, if the model has one.

    - `toast`, `toast-r8`: `get_peft_model` with the matching `ToastConfig` (the head trains by default);
    - `lora`: PEFT LoRA, rank 8, alpha 16, no dropout, on the query and value projections, plus the head;
    - `lora-all-r32`: the same at rank 32, alpha 64, on every linear projection of the blocks, plus the head;
    - `lora-eva`: `lora` set up for PEFT's data-driven EVA initialisation (`A` from the top right singular vectors of
      each layer's inputs, every layer keeping rank 8: `rho=1`); call `peft.initialize_lora_eva_weights` next;
    - `linear`: only the head (a linear probe on the frozen backbone);
    - `full`: every parameter.
    """
    heads = [name for name in HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]
    if method in TOAST_CONFIGS:
        task_type = "CAUSAL_LM" if _is_causal_lm(model) else None
        return get_peft_model(model, ToastConfig(task_type=task_type, **TOAST_CONFIGS[method]))
    if method in LORA_VARIANTS:
        rank, targets = LORA_VARIANTS[method]
        config = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            lora_dropout=0.0,
            target_modules=targets or _lora_targets(model),
            modules_to_save=heads or None,
            task_type="CAUSAL_LM" if _is_causal_lm(model) else None,
            **(
                {"init_lora_weights": "eva", "eva_config": EvaConfig(rho=1.0, use_label_mask=False)}
                if method == "lora-eva"
                else {}
            ),
        )
        # EVA's own advice: adapter weights on the meta device until `initialize_lora_eva_weights` sets them.
        return get_peft_model(model, config, low_cpu_mem_usage=method == "lora-eva")
    if method == "linear":
        if not heads:
            raise ValueError("A linear probe needs a classification model with a `classifier` or `score` head.")
        model.requires_grad_(False)
        for name in heads:
            getattr(model, name).requires_grad_(True)
        return model
    if method == "full":
        return model.requires_grad_(True)
    if method == "base":
        return model.requires_grad_(False)
    choices = dict.fromkeys((*METHODS, *LORA_VARIANTS, "base"))
    raise ValueError(f"Unknown method {method!r}; choose from {', '.join(choices)}.")


def _is_causal_lm(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForCausalLM")


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_head(model: nn.Module) -> nn.Module:
    """The classification head (`classifier` or `score`) of a transformers model."""
    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(f"{type(model).__name__} has no `classifier` or `score` head to probe.")
