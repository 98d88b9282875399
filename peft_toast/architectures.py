"""Where the blocks, the value projections and the pass-1 feature live, per model family.

Teaching TOAST a new architecture is one declarative entry::

    from peft_toast import ToastArchitecture, register_architecture

    register_architecture("my_model", ToastArchitecture(blocks="encoder.blocks", value="attn.v", final_norm="norm"))

Paths are relative to the model's *backbone* (`model.base_model` in transformers: `vit` inside
`ViTForImageClassification`, `model` inside `LlamaForCausalLM`, the model itself for `ViTModel`). Models whose
`model_type` is not registered are inspected: the repeated block stack, a value projection with a conventional name,
whether attention is causal, and the final norm are found from the module tree; if that fails, the error says how to
declare the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

# Conventional names of value projections and final norms, used when a model type is not in the registry.
VALUE_PROJECTION_NAMES = ("v_proj", "value", "v", "wv", "v_lin", "value_proj")
# Names of projections that are certainly not value projections (queries, keys, attention outputs, MLP layers): a
# `target_modules` naming one is refused rather than silently training something that is not TOAST.
NOT_VALUE_PROJECTION_NAMES = (
    "q_proj", "k_proj", "query", "key", "q", "k", "wq", "wk", "q_lin", "k_lin", "o_proj", "out_proj", "wo", "out_lin",
    "fc1", "fc2", "c_fc", "c_proj", "up_proj", "down_proj", "gate_proj", "gate_up_proj", "w1", "w2", "w3", "lin1",
    "lin2", "dense", "intermediate", "output", "mlp", "attention", "self_attn", "attn",
)  # fmt: skip
FINAL_NORM_NAMES = (
    "layernorm", "norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f", "post_layernorm", "layer_norm",
)  # fmt: skip


@dataclass(frozen=True)
class ToastArchitecture:
    """Declares where TOAST finds what it needs in one model family.

    Args:
        blocks: path of the `nn.ModuleList` (or `nn.Sequential`, as in timm) of transformer blocks, relative to the
            backbone.
        value: path of the value projection inside one block.
        fused_qkv: the value "projection" is a fused query/key/value projection; the signal then enters its value
            slice only. How the output is laid out, with sizes from the model config (`num_attention_heads`,
            `num_key_value_heads` or `multi_query`, `head_dim`):
            `"contiguous"` (or `True`): `[q | k | v]` of sizes `(h, k, k) x head_dim` (GPT-2, Phi-3, ModernBERT,
            multi-query GPT-BigCode); `"per_head"`: `h` groups of `[q_i | k_i | v_i]` (GPT-NeoX, Bloom);
            `"grouped"`: `k` groups of `[q ... q | k_j | v_j]` (Falcon's new decoder architecture);
            `"sharded_qvk"`: 4 model-parallel shards of `[q | v | k]` (CodeGen); `"auto"`: grouped if the config says
            `new_decoder_architecture`, contiguous if `multi_query`, per-head otherwise (Falcon, GPT-BigCode). A layout
            whose sizes do not add up to the projection's output is refused. A model without a transformers config
            (timm's `attn.qkv`, a plain torch module) may declare `"contiguous"`: its three equal parts.
        final_norm: path of the norm after the last block, relative to the backbone, or None.
        causal: decoder (causal attention). The pass-1 feature is then the last block's output *before* the final
            norm, and generation keeps a second KV cache. Encoders use the output *after* the final norm (or the last
            block's output when there is none, as in BERT).
        note: what a user should know about where TOAST sits in this family (e.g. that a vision-language model's
            vision tower runs in both passes but is not steered); logged when an adapter is created and shown in the
            tuner's repr.
    """

    blocks: str
    value: str
    fused_qkv: Union[bool, str] = False
    final_norm: Optional[str] = None
    causal: bool = False
    note: Optional[str] = None

    def __post_init__(self):
        if self.fused_qkv not in (False, True, *FUSED_LAYOUTS):
            raise ValueError(
                f"`fused_qkv` must be False, True (= 'contiguous') or one of {', '.join(map(repr, FUSED_LAYOUTS))}, "
                f"got {self.fused_qkv!r}."
            )


# Layouts of a fused query/key/value projection's output (see `ToastArchitecture.fused_qkv`).
FUSED_LAYOUTS = ("contiguous", "per_head", "grouped", "sharded_qvk", "auto")
# CodeGen trained with its fused projection split over 4 model-parallel shards (`mp_num` in its attention).
SHARDS = 4


_LLAMA_LIKE = ToastArchitecture(blocks="layers", value="self_attn.v_proj", final_norm="norm", causal=True)
# Vision-language models: TOAST steers the language model. Pass 1 is the whole model's forward (vision encoder,
# projector and language model), so the image tokens are part of the pass-1 sequence and the prompt can select them;
# pass 2 adds the feedback to the language model's values. The paths assume a language model laid out like LLaMA
# (`layers`, `self_attn.v_proj`, `norm`: LLaMA, Vicuna, Mistral, Qwen2, Gemma); another one raises at creation, naming
# the path that does not exist.
_VLM_NOTE = (
    "TOAST steers the language model's blocks only: the vision encoder and its projector run in both passes (so the "
    "image tokens are part of the pass-1 sequence and the prompt can select them) but receive no signal."
)
_LLAVA_LIKE = ToastArchitecture(
    blocks="language_model.layers",
    value="self_attn.v_proj",
    final_norm="language_model.norm",
    causal=True,
    note=_VLM_NOTE,
)

ARCHITECTURES: dict[str, ToastArchitecture] = {
    # encoders
    "vit": ToastArchitecture(blocks="layers", value="attention.v_proj", final_norm="layernorm"),
    "dinov2": ToastArchitecture(blocks="encoder.layer", value="attention.v_proj", final_norm="layernorm"),
    "bert": ToastArchitecture(blocks="encoder.layer", value="attention.self.value"),
    "roberta": ToastArchitecture(blocks="encoder.layer", value="attention.self.value"),
    # CLIP's vision tower: `post_layernorm` normalises the pooled token only, so every token's feature is the last
    # block's output (what `last_hidden_state` returns).
    "clip_vision_model": ToastArchitecture(blocks="encoder.layers", value="self_attn.v_proj"),
    # T5's encoder (`T5EncoderModel`, or the encoder of `T5ForConditionalGeneration`): its final norm is the stack's.
    "t5": ToastArchitecture(
        blocks="encoder.block", value="layer.0.SelfAttention.v", final_norm="encoder.final_layer_norm"
    ),
    # Pre-norm BERTs: the final norm belongs to the encoder stack.
    "xlm-roberta-xl": ToastArchitecture(
        blocks="encoder.layer", value="attention.self.value", final_norm="encoder.LayerNorm"
    ),
    "megatron-bert": ToastArchitecture(blocks="encoder.layer", value="attention.self.value", final_norm="encoder.ln"),
    # MobileBERT: the values read the block's full-width input (queries and keys its bottleneck); inspection would take
    # the longer stack of feed-forward layers inside each block for the blocks.
    "mobilebert": ToastArchitecture(blocks="encoder.layer", value="attention.self.value"),
    "deberta": ToastArchitecture(blocks="encoder.layer", value="attention.self.in_proj", fused_qkv="per_head"),
    # decoders
    "gpt2": ToastArchitecture(blocks="h", value="attn.c_attn", fused_qkv=True, final_norm="ln_f", causal=True),
    "gpt_neox": ToastArchitecture(
        blocks="layers",
        value="attention.query_key_value",
        fused_qkv="per_head",
        final_norm="final_layer_norm",
        causal=True,
    ),
    "bloom": ToastArchitecture(
        blocks="h", value="self_attention.query_key_value", fused_qkv="per_head", final_norm="ln_f", causal=True
    ),
    "falcon": ToastArchitecture(
        blocks="h", value="self_attention.query_key_value", fused_qkv="auto", final_norm="ln_f", causal=True
    ),
    "gpt_bigcode": ToastArchitecture(
        blocks="h", value="attn.c_attn", fused_qkv="auto", final_norm="ln_f", causal=True
    ),
    "phi3": ToastArchitecture(
        blocks="layers", value="self_attn.qkv_proj", fused_qkv="contiguous", final_norm="norm", causal=True
    ),
    "modernbert": ToastArchitecture(
        blocks="layers", value="attn.Wqkv", fused_qkv="contiguous", final_norm="final_norm"
    ),
    "persimmon": ToastArchitecture(
        blocks="layers",
        value="self_attn.query_key_value",
        fused_qkv="per_head",
        final_norm="final_layernorm",
        causal=True,
    ),
    "mpt": ToastArchitecture(
        blocks="blocks", value="attn.Wqkv", fused_qkv="contiguous", final_norm="norm_f", causal=True
    ),
    "codegen": ToastArchitecture(
        blocks="h", value="attn.qkv_proj", fused_qkv="sharded_qvk", final_norm="ln_f", causal=True
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    # vision-language models (their language model)
    "llava": _LLAVA_LIKE,
    "qwen2_vl": _LLAVA_LIKE,
}

# Model families TOAST cannot steer, with the reason and what to do instead: `resolve_architecture` refuses them.
REFUSED_ARCHITECTURES: dict[str, str] = {
    "albert": (
        "ALBERT runs one shared block (`num_hidden_groups` of them) for all of its `num_hidden_layers` layers, so a "
        "block's value projection cannot take a different top-down signal at each layer, and the pass-1 feature "
        "would be caught after the first layer. Use a model with one block per layer (BERT, RoBERTa, DeBERTa, "
        "ELECTRA)."
    ),
    "funnel": (
        "Funnel Transformer pools the sequence between its blocks, so the top-layer tokens that TOAST sends down do "
        "not line up with the tokens of the lower blocks. Use a model that keeps one token per input position in "
        "every block (BERT, RoBERTa, DeBERTa, ELECTRA)."
    ),
    "vit_mae": (
        "ViTMAEModel masks and shuffles a random subset of the patches in every forward call, so TOAST's two passes "
        "would see different tokens. Load the checkpoint as a plain ViT, which keeps every patch in order: "
        "`ViTModel.from_pretrained(...)` or `ViTForImageClassification.from_pretrained(...)`."
    ),
    "longformer": (
        "Longformer's attention projects its values from a sequence-first `(tokens, batch, d)` layout and pads the "
        "sequence to a multiple of its attention window inside the model, so the top-layer tokens that TOAST sends "
        "down line up with neither. Use a model with batch-first attention (BERT, RoBERTa, BigBird, ModernBERT)."
    ),
    "led": (
        "LED's encoder is Longformer's: its attention projects values from a sequence-first `(tokens, batch, d)` "
        "layout and pads the sequence to a multiple of its attention window inside the encoder, so the tokens that "
        "TOAST sends down line up with neither. Use another encoder-decoder model (BART, T5, Pegasus, mBART)."
    ),
    "swin": (
        "Swin is hierarchical: its stages change the hidden size and merge tokens, so the top-layer tokens that TOAST "
        "sends down fit neither the size nor the positions of the lower blocks. Use a backbone with one hidden size "
        "and one token per patch in every block (ViT, DeiT, BEiT, DINOv2)."
    ),
}


def fused_value_index(config, layout: Union[bool, str], out_features: int) -> torch.Tensor:
    """The positions of the values in the output of a fused query/key/value projection (`ToastArchitecture.fused_qkv`),
    `(kv_heads * head_dim,)`, from the model config's head counts; raises if the layout's sizes do not add up."""
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads and hidden else None)
    if config is None and layout in (True, "contiguous") and out_features % 3 == 0:
        # A model without a transformers config (timm's `attn.qkv`, or any plain torch module): a contiguous
        # `[q | k | v]` is read as multi-head attention, three equal parts (grouped keys and values need a config).
        return torch.arange(2 * out_features // 3, out_features)
    if not (isinstance(heads, int) and isinstance(head_dim, int) and heads > 0 and head_dim > 0):
        raise ValueError(
            f"A fused query/key/value projection needs `num_attention_heads` and `head_dim` (or `hidden_size`) in the "
            f"model config to find its values; this config has num_attention_heads={heads!r}, head_dim={head_dim!r}. "
            f"Name a separate value projection in `target_modules`, or declare the architecture without `fused_qkv`."
        )
    if getattr(config, "new_decoder_architecture", False):
        kv_heads = getattr(config, "num_kv_heads", None) or heads
    elif getattr(config, "multi_query", False):
        kv_heads = 1
    else:
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if layout == "auto":
        layout = "grouped" if getattr(config, "new_decoder_architecture", False) else (
            "contiguous" if getattr(config, "multi_query", False) else "per_head"
        )  # fmt: skip
    layout = "contiguous" if layout is True else layout
    slots = torch.arange(head_dim)
    if layout == "contiguous":  # [q (heads) | k (kv) | v (kv)]
        expected = (heads + 2 * kv_heads) * head_dim
        index = torch.arange(expected - kv_heads * head_dim, expected)
    elif layout == "per_head":  # heads x [q_i | k_i | v_i]
        expected = 3 * heads * head_dim
        index = (torch.arange(heads)[:, None] * 3 * head_dim + 2 * head_dim + slots).flatten()
    elif layout == "grouped":  # kv x [q ... q | k_j | v_j], heads / kv queries per group
        group = heads // kv_heads + 2
        expected = kv_heads * group * head_dim
        index = (torch.arange(kv_heads)[:, None] * group * head_dim + (group - 1) * head_dim + slots).flatten()
    elif layout == "sharded_qvk":  # SHARDS x [q | v | k], each of heads * head_dim / SHARDS
        expected = 3 * heads * head_dim
        local = heads * head_dim // SHARDS
        index = (torch.arange(SHARDS)[:, None] * 3 * local + local + torch.arange(local)).flatten()
    else:
        raise ValueError(f"Unknown fused layout {layout!r}; use one of {FUSED_LAYOUTS}.")
    if (
        expected != out_features
        or (layout == "grouped" and heads % kv_heads)
        or (layout == "sharded_qvk" and heads * head_dim % SHARDS)
    ):
        raise ValueError(
            f"The fused query/key/value projection has {out_features} outputs, but the {layout!r} layout with "
            f"{heads} query heads, {kv_heads} key/value heads and head_dim {head_dim} needs {expected}: the signal "
            f"would land on queries or keys. Declare the layout this model uses (`ToastArchitecture(fused_qkv=...)`: "
            f"{', '.join(map(repr, FUSED_LAYOUTS))})."
        )
    return index


def blocks_config(config):
    """The config that describes the steered blocks (hidden size, head counts, `use_cache`): a vision-language
    model's text config, whose top-level config declares none of them; any other model's own config."""
    if config is None or hasattr(config, "hidden_size") or not callable(getattr(config, "get_text_config", None)):
        return config
    return config.get_text_config()


def register_architecture(model_type: str, architecture: ToastArchitecture) -> None:
    """Teach TOAST a model family (`config.model_type`), or override a registered one (or a refused one: the
    declaration then takes the responsibility for what `REFUSED_ARCHITECTURES` says)."""
    if not isinstance(architecture, ToastArchitecture):
        raise TypeError(f"`architecture` must be a ToastArchitecture, got {type(architecture).__name__}.")
    ARCHITECTURES[model_type] = architecture
    REFUSED_ARCHITECTURES.pop(model_type, None)


@dataclass
class ResolvedArchitecture:
    """The modules of one concrete model that TOAST uses."""

    architecture: ToastArchitecture
    backbone: nn.Module
    blocks: list[nn.Module]
    block_names: list[str]  # full module names, relative to the model passed to `resolve_architecture`
    value_names: list[str]  # full module names of the value projections, one per block
    final_norm: Optional[nn.Module]
    # The module whose forward call runs the two passes: the model, or the encoder of an encoder-decoder model (which
    # `generate` calls on its own, once, before decoding).
    root: Optional[nn.Module] = None

    @property
    def causal(self) -> bool:
        return self.architecture.causal

    @property
    def feature_module(self) -> nn.Module:
        """The module whose output is the pass-1 feature."""
        if not self.causal and self.final_norm is not None:
            return self.final_norm
        return self.blocks[-1]


def model_dims(model: nn.Module, resolved: ResolvedArchitecture) -> dict:
    """The dimensions an adapter depends on: recorded in `ToastConfig.base_model_dims` when the adapter is created and
    compared with the base model when it is loaded. Sizes the model config does not declare are left out."""
    config = getattr(model, "config", None)
    sizes = blocks_config(config)
    dims = {
        "model_type": getattr(config, "model_type", None) or type(model).__name__,
        "hidden_size": getattr(sizes, "hidden_size", None),
        "num_blocks": len(resolved.blocks),
        "num_attention_heads": getattr(sizes, "num_attention_heads", None),
        "num_key_value_heads": getattr(sizes, "num_key_value_heads", None),
    }
    return {key: value for key, value in dims.items() if isinstance(value, (int, str)) and not isinstance(value, bool)}


def dims_mismatch(recorded: dict, current: dict) -> list[str]:
    """The sizes (present in both) where an adapter's recorded `base_model_dims` differ from a model's, as phrases."""
    return [
        f"{key} {recorded[key]!r} in the adapter vs {current[key]!r} in the base model"
        for key in recorded
        if key in current and recorded[key] != current[key]
    ]


def _how_to_declare(model_type: str) -> str:
    return (
        f"Declare it with `peft_toast.register_architecture({model_type!r}, ToastArchitecture(blocks=..., value=..., "
        f"final_norm=..., causal=...))` (paths relative to `model.base_model`), or pass `target_modules` naming the "
        f"value projection of every block."
    )


def resolve_architecture(model: nn.Module, target_modules=None) -> ResolvedArchitecture:
    """Find the blocks, value projections and feature module of `model` (a transformers model).

    `target_modules`, when given, overrides where the value projections are (PEFT's name/regex matching); it must match
    exactly one module per block.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    if model_type in REFUSED_ARCHITECTURES:
        raise ValueError(f"TOAST cannot steer model type {model_type!r}: {REFUSED_ARCHITECTURES[model_type]}")
    backbone = getattr(model, "base_model", model)
    if not isinstance(backbone, nn.Module):
        backbone = model
    encoder = _encoder_of(model)
    inspected = model_type not in ARCHITECTURES
    if inspected:
        _refuse_unregistered_multimodal(config, model_type)
        if encoder is not None:  # an unregistered encoder-decoder model: the blocks are found in its encoder
            backbone = encoder
    architecture = _inspect(backbone, model_type) if inspected else ARCHITECTURES[model_type]
    if encoder is not None:
        architecture = dataclasses.replace(architecture, causal=False, note=ENCODER_DECODER_NOTE)

    names = {module: name for name, module in model.named_modules()}
    blocks_list = _get(backbone, architecture.blocks, model_type, "blocks")
    if not isinstance(blocks_list, (nn.ModuleList, nn.Sequential)) or len(blocks_list) == 0:
        raise ValueError(
            f"`{architecture.blocks}` of model type {model_type!r} is not a non-empty nn.ModuleList (or nn.Sequential) "
            f"of blocks. " + _how_to_declare(model_type)
        )
    blocks = list(blocks_list)
    layers = getattr(config, "num_hidden_layers", None)
    if inspected and isinstance(layers, int) and layers != len(blocks):
        raise ValueError(
            f"TOAST found {len(blocks)} blocks in `{architecture.blocks}` of model type {model_type!r}, but its "
            f"config has num_hidden_layers={layers}: that stack is not one block per layer (another repeated module, "
            f"or blocks shared between layers, which cannot take a different signal at each layer). "
            + _how_to_declare(model_type)
        )
    block_names = [names[block] for block in blocks]
    if target_modules is None:
        value_names = [names[_get(block, architecture.value, model_type, "value")] for block in blocks]
    else:
        value_names = _match_targets(model, block_names, target_modules)
        _check_targets_are_value_projections(model, value_names, target_modules)
    _check_one_hidden_size(model, model_type, value_names)
    final_norm = _get(backbone, architecture.final_norm, model_type, "final_norm") if architecture.final_norm else None
    if encoder is not None:
        inside = {module for module in encoder.modules()}
        if any(block not in inside for block in blocks) or (final_norm is not None and final_norm not in inside):
            raise ValueError(
                f"The blocks declared for model type {model_type!r} (`{architecture.blocks}`) are not all inside its "
                f"encoder: in an encoder-decoder model TOAST steers the encoder. Declare the encoder's blocks. "
                + _how_to_declare(model_type)
            )
    root = encoder if encoder is not None else model
    return ResolvedArchitecture(architecture, backbone, blocks, block_names, value_names, final_norm, root)


def _check_one_hidden_size(model: nn.Module, model_type: str, value_names: list[str]) -> None:
    """Refuse a model whose value projections read different hidden sizes in different blocks: TOAST sends the
    top-layer tokens down to every block unchanged (a hierarchical backbone changes the hidden size, and merges tokens,
    between its stages)."""
    from .layer import value_input_features

    modules = [model.get_submodule(name) for name in value_names]
    sizes = [value_input_features(getattr(module, "base_layer", module)) for module in modules]
    if len(set(sizes)) > 1:
        raise ValueError(
            f"The value projections of model type {model_type!r} read different hidden sizes in different blocks "
            f"({', '.join(map(str, sizes))}): the model is hierarchical (its stages change the hidden size, as in "
            f"Swin or PVT), and TOAST sends the top-layer tokens down to every block unchanged. Use a backbone with "
            f"one hidden size and one token per position in every block (ViT, DeiT, BEiT, DINOv2)."
        )


def _refuse_unregistered_multimodal(config, model_type: str) -> None:
    """A model with a vision and a text part (a vision-language model, or a dual encoder like CLIP) that the registry
    does not declare is refused: inspection would take the longer of its block stacks, possibly the vision encoder's,
    and steer it as if it were the whole model."""
    if getattr(config, "vision_config", None) is None or getattr(config, "text_config", None) is None:
        return
    raise ValueError(
        f"TOAST does not know model type {model_type!r}, which has a vision and a text part: inspection would steer "
        f"whichever block stack is longer, possibly the vision encoder's, as if it were the whole model. For a "
        f"vision-language model that generates, declare where its language model is; for one laid out like LLaVA "
        f"(the language model at `language_model`, with `layers`, `self_attn.v_proj` and `norm`) that is "
        f"`peft_toast.register_architecture({model_type!r}, peft_toast.architectures.ARCHITECTURES['llava'])`. For a "
        f"dual encoder (CLIP, SigLIP), steer one tower on its own (e.g. `CLIPVisionModel`, `CLIPTextModel`)."
    )


ENCODER_DECODER_NOTE = (
    "In an encoder-decoder model TOAST steers the encoder: every call of the encoder (also the one `generate` makes "
    "before decoding) runs its two passes, and the decoder, which gets no signal, reads the steered encoder states "
    "through its cross-attention."
)


def _encoder_of(model: nn.Module) -> Optional[nn.Module]:
    """The encoder of an encoder-decoder model (T5, BART, Whisper, ...), or None for any other model (also for an
    encoder on its own: `T5EncoderModel`, `model.get_encoder()`)."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return None
    get_decoder, get_encoder = getattr(model, "get_decoder", None), getattr(model, "get_encoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    # transformers' `get_decoder` returns the model itself when it has no decoder.
    if not isinstance(decoder, nn.Module) or decoder is model:
        return None
    encoder = get_encoder() if callable(get_encoder) else None
    if not isinstance(encoder, nn.Module) or encoder is model:
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder model whose encoder TOAST cannot find (`get_encoder()` "
            f"returned {type(encoder).__name__}). Steer its encoder on its own: `get_peft_model(encoder, ToastConfig())`."
        )
    return encoder


def _get(root: nn.Module, path: str, model_type: str, what: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise ValueError(
            f"TOAST's `{what}` path {path!r} does not exist in model type {model_type!r}. "
            + _how_to_declare(model_type)
        ) from None


def _match_targets(model: nn.Module, block_names: list[str], target_modules) -> list[str]:
    from peft.tuners.tuners_utils import check_target_module_exists

    class _Targets:  # the minimal config interface PEFT's matcher reads
        def __init__(self, target_modules):
            self.target_modules = target_modules
            self.exclude_modules = None
            self.layers_to_transform = None
            self.layers_pattern = None

    matched = [
        name
        for name, _ in model.named_modules()
        if name and check_target_module_exists(_Targets(target_modules), name)
    ]
    per_block = []
    for block_name in block_names:
        inside = [name for name in matched if name.startswith(block_name + ".")]
        if len(inside) != 1:
            found = ", ".join(inside) if inside else "nothing"
            raise ValueError(
                f"`target_modules={target_modules!r}` must match exactly one value projection in every block, but in "
                f"block `{block_name}` it matches {found}. Name the value projection (e.g. `['v_proj']`) or leave "
                f"`target_modules=None` for a registered architecture."
            )
        per_block.append(inside[0])
    outside = sorted(set(matched) - set(per_block))
    if outside:
        raise ValueError(
            f"`target_modules={target_modules!r}` also matches modules outside the attention blocks: {outside[:5]}. "
            f"TOAST only steers value projections; make the pattern more specific."
        )
    return per_block


def _check_targets_are_value_projections(model: nn.Module, value_names: list[str], target_modules) -> None:
    """Refuse matched modules that cannot be value projections: a name that is a query, key, output or MLP layer, a
    module without a 2-D weight, or one that does not read the hidden size (TOAST adds a `(B, N, d)` signal to the
    projection's input)."""
    from .layer import value_input_features

    hidden = getattr(blocks_config(getattr(model, "config", None)), "hidden_size", None)
    for name in value_names:
        module = model.get_submodule(name)
        leaf = name.rsplit(".", 1)[-1]
        if leaf in NOT_VALUE_PROJECTION_NAMES:
            raise ValueError(
                f"`target_modules={target_modules!r}` matches `{name}`, which is not a value projection: TOAST steers "
                f"only the values of attention (queries and keys decide what attends to what, the values carry the "
                f"features the top-down signal adds to). Name the value projection instead (e.g. `['v_proj']`, "
                f"`['value']`), or leave `target_modules=None` for a registered architecture."
            )
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
            raise ValueError(
                f"`target_modules={target_modules!r}` matches `{name}` ({type(module).__name__}), which is not a linear "
                f"projection. Name the value projection (an nn.Linear, e.g. `['v_proj']`)."
            )
        if isinstance(hidden, int) and value_input_features(module) != hidden:
            raise ValueError(
                f"`target_modules={target_modules!r}` matches `{name}`, which reads {value_input_features(module)} "
                f"features, but the blocks' hidden size is {hidden}: a value projection reads the block's hidden "
                f"states. Name the value projection (e.g. `['v_proj']`)."
            )


def _inspect(backbone: nn.Module, model_type: str) -> ToastArchitecture:
    """Derive a `ToastArchitecture` from the module tree of an unregistered model."""
    names = {module: name for name, module in backbone.named_modules()}
    stacks = [
        module
        for module in backbone.modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(child) for child in module}) == 1
        and any(isinstance(m, nn.Linear) for m in module[0].modules())
    ]
    if not stacks:
        raise ValueError(
            f"TOAST found no stack of transformer blocks in model type {model_type!r}. " + _how_to_declare(model_type)
        )
    stack = max(stacks, key=len)
    block = stack[0]
    value = None
    for name, module in block.named_modules():
        if name.rsplit(".", 1)[-1] in VALUE_PROJECTION_NAMES and isinstance(module, nn.Linear):
            value = name
            break
    if value is None:
        raise ValueError(
            f"TOAST found no value projection (a Linear named one of {VALUE_PROJECTION_NAMES}) in the blocks of model "
            f"type {model_type!r}; fused query/key/value projections need a declaration. "
            + _how_to_declare(model_type)
        )
    causal = any(getattr(module, "is_causal", False) is True for module in block.modules()) or _is_decoder_family(
        getattr(backbone, "config", None), model_type
    )
    final_norm = None
    for name, module in backbone.named_children():
        if name in FINAL_NORM_NAMES and not isinstance(module, nn.ModuleList):
            final_norm = name
    return ToastArchitecture(blocks=names[stack], value=value, final_norm=final_norm, causal=causal)


def _is_decoder_family(config, model_type: str) -> bool:
    """Whether transformers knows `model_type` as a decoder: its config says `is_decoder`, or the family has a
    causal-LM class and no masked-LM one (BERT-like encoders have both, and are decoders only with
    `is_decoder=True`). For decoders whose attention modules carry no `is_causal` flag (XGLM)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "is_decoder", False):
        return True
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
