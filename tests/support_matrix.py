"""The support matrix: the transformers model families that `tests/test_support_matrix.py` sweeps, one tiny random
configuration each, and what the sweep expects of them (tested, or refused with an error that names the fix).

`scripts/gen_docs.py` reads this table to write the matrix of `docs/architectures.md`, so the page lists exactly what
the sweep runs. Nothing here builds a model at import time (the generator reads names and strings only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

TEXT = "text encoder"
VISION = "vision encoder"
DECODER = "decoder"
# A vision-language model: TOAST steers its language model (a decoder); its inputs are `vision_language_inputs`.
VLM = "vision-language model"
# An encoder-decoder model: TOAST steers its encoder; its inputs are `seq2seq_inputs`.
SEQ2SEQ = "encoder-decoder model"

VOCAB = 99
IMAGE = 16
PATCH = 4
# The special tokens of the tiny vision-language models, at the top of the vocabulary: the image placeholder, and
# Qwen2-VL's video placeholder and vision start / end markers. Text is drawn below them, and generation suppresses them
# (a generated placeholder would ask for an image that the call does not have).
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 98, 97, 96, 95
VLM_SPECIAL_TOKENS = [IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END]


@dataclass(frozen=True)
class Family:
    """One model family of the sweep.

    Args:
        model_type: `config.model_type` of the tiny model.
        kind: `TEXT`, `VISION`, `DECODER` (a decoder is causal: its feature is the last block's output before the
            final norm, and its cached generation is checked), `VLM` (its language model is steered as a decoder;
            its inputs come from `vision_language_inputs`) or `SEQ2SEQ` (its encoder is steered; its inputs come from
            `seq2seq_inputs`, and its cached generation is checked).
        model: the transformers class that is built (from its own config class).
        config: the tiny configuration's arguments.
        fused: `(layout, key/value heads)` of a fused query/key/value projection, the layout one of `"contiguous"`,
            `"per_head"` or `"grouped"`: the independent recomputation finds the value rows from it. None for a
            separate value projection.
        refused: for a family TOAST cannot steer, phrases of the error `get_peft_model` must raise (what is wrong, and
            what to do instead); None for a tested family.
    """

    model_type: str
    kind: str
    model: str
    config: dict = field(default_factory=dict)
    fused: Optional[tuple[str, int]] = None
    refused: Optional[tuple[str, ...]] = None


_BERT_LIKE = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    num_labels=2,
)
_VIT_LIKE = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    image_size=IMAGE,
    patch_size=PATCH,
    num_labels=3,
)
_TOKENS = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=1)
_LLAMA_LIKE = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=37,
    max_position_embeddings=64,
    **_TOKENS,
)


def _text(model_type: str, model: str, fused=None, refused=None, **overrides) -> Family:
    return Family(model_type, TEXT, model, {**_BERT_LIKE, **overrides}, fused, refused)


def _vision(model_type: str, model: str, refused=None, **overrides) -> Family:
    return Family(model_type, VISION, model, {**_VIT_LIKE, **overrides}, refused=refused)


def _decoder(model_type: str, model: str, base: Optional[dict] = None, fused=None, **overrides) -> Family:
    return Family(model_type, DECODER, model, {**(_LLAMA_LIKE if base is None else base), **overrides}, fused)


_SEQ2SEQ_LIKE = dict(
    d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=37, decoder_ffn_dim=37, vocab_size=VOCAB, max_position_embeddings=64,
    init_std=0.2,  # at the default 0.02 a tiny random decoder barely reads its encoder: the steering would not show
)  # fmt: skip
# Whisper: 8 mel bins x 16 frames, 8 positions after its stride-2 convolution.
_WHISPER = dict(
    _SEQ2SEQ_LIKE, num_mel_bins=8, max_source_positions=8, max_target_positions=32, pad_token_id=1,
    decoder_start_token_id=0, bos_token_id=0, eos_token_id=2,
)  # fmt: skip


def _seq2seq(model_type: str, model: str, refused=None, **overrides) -> Family:
    return Family(model_type, SEQ2SEQ, model, {**_SEQ2SEQ_LIKE, **overrides}, refused=refused)


def seq2seq_inputs(family: Family, batch: int = 2, seq: int = 6, target: int = 4, seed: int = 0) -> dict:
    """The inputs of a tiny encoder-decoder model: random source tokens (Whisper: random log-mel features) and
    `target` random decoder tokens."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    if family.model_type == "whisper":
        source = {"input_features": torch.randn(batch, 8, 16, generator=generator)}
    else:
        input_ids = torch.randint(3, VOCAB, (batch, seq), generator=generator)
        source = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    return {**source, "decoder_input_ids": torch.randint(3, VOCAB, (batch, target), generator=generator)}


_VISION_TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
# Qwen2-VL: patches of PATCH x PATCH pixels x 2 frames, merged 2 x 2 into one token of the language model; its
# multimodal rotary embedding splits each head's 4 frequencies into 1 temporal, 1 height and 2 width ones.
_QWEN2_VL_TEXT = dict(
    _LLAMA_LIKE, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
)
_QWEN2_VL_VISION = dict(
    depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=PATCH, temporal_patch_size=2,
    spatial_merge_size=2,
)  # fmt: skip


def vision_language_inputs(family: Family, batch: int = 2, text: int = 5, seed: int = 0) -> dict:
    """The inputs of a tiny vision-language model: one random IMAGE x IMAGE image per row, its placeholder tokens after
    the first text token, `text` random text tokens in all."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    words = torch.randint(2, min(VLM_SPECIAL_TOKENS), (batch, text), generator=generator)
    patches = (IMAGE // PATCH) ** 2
    if family.model_type == "llava":  # CLIP's patch tokens (the CLS token dropped), one placeholder each
        image = torch.full((batch, patches), IMAGE_TOKEN)
        pixels = {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=generator)}
    elif family.model_type == "qwen2_vl":  # flattened patches, merged 2 x 2: patches / 4 placeholders per image
        image = torch.cat(
            [torch.full((batch, 1), VISION_START), torch.full((batch, patches // 4), IMAGE_TOKEN),
             torch.full((batch, 1), VISION_END)], dim=1,
        )  # fmt: skip
        side = IMAGE // PATCH
        pixels = {
            "pixel_values": torch.randn(batch * patches, 3 * 2 * PATCH * PATCH, generator=generator),
            "image_grid_thw": torch.tensor([[1, side, side]] * batch),
        }
    else:
        raise ValueError(f"No inputs for the vision-language model {family.model_type!r}.")
    input_ids = torch.cat([words[:, :1], image, words[:, 1:]], dim=1)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **pixels}
    if family.model_type == "qwen2_vl":
        inputs["mm_token_type_ids"] = (input_ids == IMAGE_TOKEN).int()
    return inputs


def continued_inputs(family: Family, inputs: dict, sequences) -> dict:
    """The inputs of one full forward over `sequences` (the prompt of `inputs` and what was generated after it): the
    same image, no attention mask; Qwen2-VL's token types extended over the generated (text) tokens."""
    import torch

    full = {key: value for key, value in inputs.items() if key != "attention_mask"}
    full["input_ids"] = sequences
    if "mm_token_type_ids" in inputs:
        types = inputs["mm_token_type_ids"]
        new = sequences.shape[1] - types.shape[1]
        full["mm_token_type_ids"] = torch.cat([types, types.new_zeros(types.shape[0], new)], dim=1)
    return full


FAMILIES: list[Family] = [
    # text encoders
    _text("bert", "BertForSequenceClassification"),
    _text("roberta", "RobertaForSequenceClassification", pad_token_id=1),
    _text("xlm-roberta", "XLMRobertaForSequenceClassification", pad_token_id=1),
    _text("xlm-roberta-xl", "XLMRobertaXLForSequenceClassification", pad_token_id=1),
    _text("camembert", "CamembertForSequenceClassification", pad_token_id=1),
    _text("data2vec-text", "Data2VecTextForSequenceClassification", pad_token_id=1),
    _text("electra", "ElectraForSequenceClassification", embedding_size=32),
    _text("ernie", "ErnieForSequenceClassification"),
    _text("megatron-bert", "MegatronBertForSequenceClassification"),
    _text("roformer", "RoFormerForSequenceClassification", embedding_size=32),
    _text("mpnet", "MPNetForSequenceClassification", pad_token_id=1),
    _text("deberta", "DebertaForSequenceClassification", fused=("per_head", 4)),
    _text("deberta-v2", "DebertaV2ForSequenceClassification"),
    _text("rembert", "RemBertForSequenceClassification", input_embedding_size=32, output_embedding_size=32),
    _text("nystromformer", "NystromformerForSequenceClassification"),
    _text(
        "mobilebert",
        "MobileBertForSequenceClassification",
        embedding_size=32,
        true_hidden_size=32,
        intra_bottleneck_size=32,
    ),
    _text("convbert", "ConvBertForSequenceClassification", embedding_size=32),
    _text("layoutlm", "LayoutLMForSequenceClassification"),
    Family(
        "distilbert",
        TEXT,
        "DistilBertForSequenceClassification",
        dict(dim=32, n_layers=2, n_heads=4, hidden_dim=37, vocab_size=VOCAB, max_position_embeddings=64, num_labels=2),
    ),
    Family(
        "modernbert",
        TEXT,
        "ModernBertForSequenceClassification",
        {**_BERT_LIKE, **_TOKENS, "cls_token_id": 2, "sep_token_id": 3, "global_attn_every_n_layers": 1},
        fused=("contiguous", 4),
    ),
    Family(
        "t5",
        TEXT,
        "T5EncoderModel",
        dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, vocab_size=VOCAB, pad_token_id=0),
    ),
    _text(
        "albert",
        "AlbertForSequenceClassification",
        embedding_size=32,
        refused=("ALBERT runs one shared block", "Use a model with one block per layer"),
    ),
    Family(
        "funnel",
        TEXT,
        "FunnelForSequenceClassification",
        dict(d_model=32, n_head=4, d_head=8, d_inner=37, block_sizes=[1, 1], vocab_size=VOCAB, num_labels=2),
        refused=("pools the sequence between its blocks", "Use a model that keeps one token per input position"),
    ),
    _text(
        "longformer",
        "LongformerForSequenceClassification",
        attention_window=4,
        refused=("sequence-first", "Use a model with batch-first attention"),
    ),
    # vision encoders
    _vision("vit", "ViTForImageClassification"),
    _vision("deit", "DeiTForImageClassification"),
    _vision("beit", "BeitForImageClassification"),
    _vision("data2vec-vision", "Data2VecVisionForImageClassification"),
    _vision("dinov2", "Dinov2ForImageClassification"),
    _vision("dinov2_with_registers", "Dinov2WithRegistersForImageClassification", num_register_tokens=2),
    _vision("vit_msn", "ViTMSNForImageClassification"),
    _vision("ijepa", "IJepaForImageClassification"),
    _vision("yolos", "YolosModel", image_size=[IMAGE, IMAGE], num_detection_tokens=3),
    _vision("clip_vision_model", "CLIPVisionModel"),
    _vision("siglip_vision_model", "SiglipVisionModel"),
    _vision(
        "vit_mae",
        "ViTMAEModel",
        refused=("masks and shuffles a random subset of the patches", "Load the checkpoint as a plain ViT"),
    ),
    Family(
        "swin",
        VISION,
        "SwinForImageClassification",
        dict(
            image_size=IMAGE, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=2, num_labels=3
        ),
        refused=("Swin is hierarchical", "Use a backbone with one hidden size"),
    ),
    Family(
        "swinv2",
        VISION,
        "Swinv2ForImageClassification",
        dict(
            image_size=IMAGE, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=2, num_labels=3
        ),
        refused=(
            "read different hidden sizes in different blocks (16, 32): the model is hierarchical",
            "Use a backbone with one hidden size and one token per position in every block",
        ),
    ),
    # decoders
    _decoder("llama", "LlamaForCausalLM"),
    _decoder("mistral", "MistralForCausalLM", sliding_window=4),
    _decoder("mixtral", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    _decoder("qwen2", "Qwen2ForCausalLM"),
    _decoder(
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
    ),
    _decoder("qwen3", "Qwen3ForCausalLM", head_dim=8),
    _decoder(
        "qwen3_moe", "Qwen3MoeForCausalLM", head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16
    ),
    _decoder("gemma", "GemmaForCausalLM", head_dim=8),
    _decoder("gemma2", "Gemma2ForCausalLM", head_dim=8, sliding_window=4),
    _decoder("gemma3_text", "Gemma3ForCausalLM", head_dim=8, sliding_window=4),
    _decoder("phi", "PhiForCausalLM"),
    _decoder("phi3", "Phi3ForCausalLM", fused=("contiguous", 2)),
    _decoder("starcoder2", "Starcoder2ForCausalLM"),
    _decoder("stablelm", "StableLmForCausalLM"),
    _decoder("olmo", "OlmoForCausalLM"),
    _decoder("olmo2", "Olmo2ForCausalLM"),
    _decoder("olmoe", "OlmoeForCausalLM", num_experts=4, num_experts_per_tok=2, intermediate_size=32),
    _decoder("cohere", "CohereForCausalLM"),
    _decoder("granite", "GraniteForCausalLM"),
    _decoder("granitemoe", "GraniteMoeForCausalLM", num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    _decoder("glm", "GlmForCausalLM", head_dim=8),
    _decoder("helium", "HeliumForCausalLM", head_dim=8),
    _decoder("smollm3", "SmolLM3ForCausalLM"),
    _decoder("nemotron", "NemotronForCausalLM", head_dim=8),
    _decoder("persimmon", "PersimmonForCausalLM", fused=("per_head", 4)),
    _decoder("biogpt", "BioGptForCausalLM", base=dict(_BERT_LIKE, **_TOKENS)),
    _decoder(
        "opt",
        "OPTForCausalLM",
        base=_TOKENS,
        hidden_size=32,
        ffn_dim=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    ),
    _decoder(
        "xglm",
        "XGLMForCausalLM",
        base=_TOKENS,
        d_model=32,
        ffn_dim=37,
        num_layers=2,
        attention_heads=4,
        max_position_embeddings=64,
    ),
    _decoder("gpt2", "GPT2LMHeadModel", base=_TOKENS, n_embd=32, n_layer=2, n_head=4, fused=("contiguous", 4)),
    _decoder(
        "gpt_bigcode", "GPTBigCodeForCausalLM", base=_TOKENS, n_embd=32, n_layer=2, n_head=4, fused=("contiguous", 1)
    ),
    _decoder(
        "gpt_neo",
        "GPTNeoForCausalLM",
        base=_TOKENS,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],
        window_size=4,
        max_position_embeddings=64,
    ),
    _decoder("gptj", "GPTJForCausalLM", base=_TOKENS, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64),
    _decoder(
        "codegen",
        "CodeGenForCausalLM",
        base=_TOKENS,
        n_embd=32,
        n_layer=2,
        n_head=4,
        rotary_dim=4,
        n_positions=64,
        n_ctx=64,
        fused=("sharded_qvk", 4),
    ),
    _decoder(
        "gpt_neox",
        "GPTNeoXForCausalLM",
        base=_TOKENS,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        fused=("per_head", 4),
    ),
    _decoder("bloom", "BloomForCausalLM", base=_TOKENS, hidden_size=32, n_layer=2, n_head=4, fused=("per_head", 4)),
    _decoder(
        "falcon",
        "FalconForCausalLM",
        base=_TOKENS,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        new_decoder_architecture=True,
        num_kv_heads=2,
        fused=("grouped", 2),
    ),
    _decoder(
        "mpt",
        "MptForCausalLM",
        base=_TOKENS,
        d_model=32,
        n_layers=2,
        n_heads=4,
        max_seq_len=64,
        fused=("contiguous", 4),
    ),
    # encoder-decoder models: the encoder is steered (the decoder reads the steered encoder states)
    Family(
        "t5",
        SEQ2SEQ,
        "T5ForConditionalGeneration",
        dict(
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            vocab_size=VOCAB,
            pad_token_id=0,
            decoder_start_token_id=0,
        ),
    ),  # fmt: skip
    _seq2seq("bart", "BartForConditionalGeneration"),
    _seq2seq("mbart", "MBartForConditionalGeneration"),
    _seq2seq("pegasus", "PegasusForConditionalGeneration"),
    _seq2seq("marian", "MarianMTModel", decoder_vocab_size=VOCAB, pad_token_id=1, decoder_start_token_id=1),
    _seq2seq("m2m_100", "M2M100ForConditionalGeneration"),
    _seq2seq("plbart", "PLBartForConditionalGeneration"),
    _seq2seq("blenderbot", "BlenderbotForConditionalGeneration"),
    Family("whisper", SEQ2SEQ, "WhisperForConditionalGeneration", _WHISPER),
    Family(
        "led",
        SEQ2SEQ,
        "LEDForConditionalGeneration",
        {
            **{k: v for k, v in _SEQ2SEQ_LIKE.items() if k != "max_position_embeddings"},
            "max_encoder_position_embeddings": 64,
            "max_decoder_position_embeddings": 64,
            "attention_window": 4,
        },
        refused=("Longformer's", "sequence-first", "Use another encoder-decoder model"),
    ),  # fmt: skip
    # vision-language models: the language model is steered; pass 1 runs the vision tower too
    Family(
        "llava",
        VLM,
        "LlavaForConditionalGeneration",
        dict(
            vision_config=dict(_VISION_TOWER, model_type="clip_vision_model", image_size=IMAGE, patch_size=PATCH),
            text_config=dict(_LLAMA_LIKE, model_type="llama"),
            image_token_index=IMAGE_TOKEN,
            vision_feature_layer=-1,
        ),
    ),
    Family(
        "qwen2_vl",
        VLM,
        "Qwen2VLForConditionalGeneration",
        dict(
            vision_config=_QWEN2_VL_VISION,
            text_config=_QWEN2_VL_TEXT,
            image_token_id=IMAGE_TOKEN,
            video_token_id=VIDEO_TOKEN,
            vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
        ),
    ),
]
