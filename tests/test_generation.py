"""Exact cached generation (`peft_toast/generation.py`): the pass-1 KV cache rides on the main cache.

TOAST's signal at position `i` depends only on tokens `<= i`, so decoding with two KV caches (pass 1 and pass 2) must
give exactly what a full forward over the whole sequence gives. Every test compares two independent paths (cached vs
uncached, incremental vs full, batched vs one row at a time) on a tiny decoder whose adapter is randomised, and checks
that the adapter really changes the output, so that an equality cannot hold by accident.

Tolerance: logits in float32 agree to `atol=rtol=1e-4` (the logits are of order 10; the differences seen are up to
~6e-5, from the different summation orders of cached and uncached attention). Tokens must be identical.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from conftest import VOCAB, make_gpt2, make_llama, make_mistral, randomize_adapter
from peft import get_peft_model
from transformers.cache_utils import DynamicCache, StaticCache

from peft_toast import ToastConfig
from peft_toast.generation import get_pass1_cache

LOGITS_TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
PAD = 1  # pad_token_id (= eos_token_id) of the tiny decoders
# A larger initialiser spread than transformers' 0.02 gives peaked, varied next-token distributions: greedy tokens
# then depend on the adapter, and differ from step to step.
DECODERS = {
    "llama": partial(make_llama, initializer_range=0.3),
    # A sliding window shorter than the prompts exercises transformers' sliding-window cache layers.
    "mistral": partial(make_mistral, initializer_range=0.3, sliding_window=4),
    "gpt2": partial(make_gpt2, initializer_range=0.3),
}


pytestmark = pytest.mark.usefixtures("one_thread")


# "<family>-top": block 0 not steered, so that the two passes share the bottom blocks' KV cache layers
# (`share_lower_blocks`); every decoding test runs on both kinds of adapter.
TOP_BLOCKS = [1, 2, 3]


def make_toast_lm(kind: str):
    family, _, top = kind.partition("-")
    layers = {"layers_to_transform": TOP_BLOCKS} if top else {}
    model = get_peft_model(DECODERS[family](), ToastConfig(task_type="CAUSAL_LM", **layers))
    # (seed 2 for the top-block adapters: with seeds 0, 1, 3 or 4 every gate of some test prompt is 0, where the adapter
    # does not act and the guard `assert_adapter_matters` fails, or a row ends early at EOS; cached == uncached holds for
    # every seed)
    randomize_adapter(model, seed=2 if top else 0)
    return model.eval()


@pytest.fixture(params=[*sorted(DECODERS), *(f"{name}-top" for name in sorted(DECODERS))])
def toast_lm(request):
    return make_toast_lm(request.param)


@pytest.fixture(params=["llama", "llama-top"])
def llama_lm(request):
    return make_toast_lm(request.param)


# Tests that pass the cache as `past_key_values=` on purpose (users still do): transformers' deprecation of that name
# is expected there.
LEGACY_CACHE_NAME = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


def prompt(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, length), generator=generator)


def greedy(model, input_ids: torch.Tensor, max_new_tokens: int = 8, **kwargs) -> torch.Tensor:
    kwargs.setdefault("attention_mask", torch.ones_like(input_ids))
    return model.generate(input_ids=input_ids, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)


def logits(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs).logits


def base_logits(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with model.disable_adapter():
        return logits(model, input_ids, **kwargs)


def assert_adapter_matters(model, input_ids: torch.Tensor) -> None:
    """The randomised adapter changes the logits clearly (so that equality tests cannot pass by accident)."""
    difference = (logits(model, input_ids) - base_logits(model, input_ids)).abs().max()
    assert difference > 0.5, f"the adapter barely changes the logits ({difference:.2e}); the test would prove nothing"


# ------------------------------------------------------------------------------------------- decoding strategies


def test_greedy_cached_equals_uncached(toast_lm):
    input_ids = prompt()
    output = greedy(toast_lm, input_ids, use_cache=True, return_dict_in_generate=True)
    cached = output.sequences
    assert isinstance(output.cache, DynamicCache) and isinstance(get_pass1_cache(output.cache), DynamicCache)
    assert torch.equal(cached, greedy(toast_lm, input_ids, use_cache=False))
    with toast_lm.disable_adapter():
        base = greedy(toast_lm, input_ids)
    assert not torch.equal(cached, base), "TOAST should change the greedy tokens of this randomised adapter"
    assert_adapter_matters(toast_lm, cached)


def assert_scores_equal_full_sequence_logits(model, input_ids: torch.Tensor, output, tolerance=LOGITS_TOLERANCE):
    """Each step's scores of a `generate(..., output_scores=True)` output equal one full forward's logits."""
    full = logits(model, output.sequences)  # (B, N + new, V)
    start = input_ids.shape[1] - 1
    assert len(output.scores) == output.sequences.shape[1] - input_ids.shape[1]
    for step, scores in enumerate(output.scores):
        torch.testing.assert_close(scores, full[:, start + step], **tolerance)
    assert_adapter_matters(model, output.sequences)


def test_scores_equal_full_sequence_logits(toast_lm):
    input_ids = prompt()
    output = greedy(toast_lm, input_ids, output_scores=True, return_dict_in_generate=True)
    assert_scores_equal_full_sequence_logits(toast_lm, input_ids, output)


def test_seeded_sampling_cached_equals_uncached(toast_lm):
    input_ids = prompt()

    def sample(**kwargs):
        torch.manual_seed(123)
        return toast_lm.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=8,
            do_sample=True,
            top_k=0,
            **kwargs,
        )

    cached = sample(use_cache=True)
    assert torch.equal(cached, sample(use_cache=False))
    with toast_lm.disable_adapter():
        assert not torch.equal(cached, sample(use_cache=True))


def test_beam_search_reorders_the_pass1_cache(toast_lm):
    input_ids = prompt()
    output = greedy(toast_lm, input_ids, num_beams=3, return_dict_in_generate=True)
    uncached = greedy(toast_lm, input_ids, num_beams=3, use_cache=False)
    assert torch.equal(output.sequences, uncached)
    main_cache = output.cache
    pass1_cache = get_pass1_cache(main_cache)
    assert pass1_cache is not None and pass1_cache is not main_cache
    assert pass1_cache.get_seq_length() == main_cache.get_seq_length()
    with toast_lm.disable_adapter():
        assert not torch.equal(output.sequences, greedy(toast_lm, input_ids, num_beams=3))


def test_prompt_lookup_decoding_crops_both_caches(toast_lm):
    # Candidate tokens that the model rejects are cropped from the main cache; the pass-1 cache must follow, or pass 1
    # would go on attending to the rejected tokens. (A repeated prompt makes the lookup propose candidates; with this
    # seed, some of them are rejected for every model.)
    input_ids = prompt(batch=1, seed=1).repeat(1, 2)
    output = greedy(toast_lm, input_ids, prompt_lookup_num_tokens=3, output_scores=True, return_dict_in_generate=True)
    assert_scores_equal_full_sequence_logits(toast_lm, input_ids, output)


def test_max_new_tokens(llama_lm):
    input_ids = prompt()
    long = greedy(llama_lm, input_ids, max_new_tokens=8, min_new_tokens=8)
    short = greedy(llama_lm, input_ids, max_new_tokens=3, min_new_tokens=3)
    assert long.shape == (2, input_ids.shape[1] + 8)
    assert short.shape == (2, input_ids.shape[1] + 3)
    assert torch.equal(short, long[:, : short.shape[1]])


def test_positional_input_ids(llama_lm):
    input_ids = prompt()
    positional = llama_lm.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=6)
    assert torch.equal(positional, greedy(llama_lm, input_ids, max_new_tokens=6))


def test_static_cache(toast_lm):
    input_ids = prompt()
    output = greedy(toast_lm, input_ids, cache_implementation="static", return_dict_in_generate=True)
    assert isinstance(output.cache, StaticCache) and isinstance(get_pass1_cache(output.cache), StaticCache)
    assert torch.equal(output.sequences, greedy(toast_lm, input_ids, use_cache=False))


@LEGACY_CACHE_NAME
def test_user_cache_object_passed_to_generate(llama_lm):
    input_ids = prompt()
    cache = DynamicCache(config=llama_lm.config)
    tokens = greedy(llama_lm, input_ids, past_key_values=cache)
    assert torch.equal(tokens, greedy(llama_lm, input_ids, use_cache=False))
    # The user's cache holds the whole sequence but the last token (never fed back), and so does its pass-1 cache.
    assert cache.get_seq_length() == get_pass1_cache(cache).get_seq_length() == tokens.shape[1] - 1


# --------------------------------------------------------------------------------- padding and positions


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Rows of lengths 7, 4 and 5, left-padded to 7: `(input_ids, attention_mask, rows)`."""
    rows = [prompt(batch=1, length=length, seed=seed)[0] for seed, length in enumerate((7, 4, 5))]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), PAD)
    attention_mask = torch.zeros_like(input_ids)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row) :] = row
        attention_mask[index, width - len(row) :] = 1
    return input_ids, attention_mask, rows


def test_left_padded_batch_generates_what_each_row_generates_alone(toast_lm):
    input_ids, attention_mask, rows = left_padded_batch()
    batched = greedy(toast_lm, input_ids, attention_mask=attention_mask)
    new_tokens = batched[:, input_ids.shape[1] :]
    for index, row in enumerate(rows):
        alone = greedy(toast_lm, row[None])
        assert torch.equal(new_tokens[index], alone[0, len(row) :]), f"row {index} differs"


def test_explicit_position_ids_with_left_padding(toast_lm):
    # With GPT-2's absolute position embeddings, pass 1 ignoring `position_ids` would change every feature.
    input_ids, attention_mask, rows = left_padded_batch()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    padded = logits(toast_lm, input_ids, attention_mask=attention_mask, position_ids=position_ids)
    for index, row in enumerate(rows):
        alone = logits(toast_lm, row[None])[0]
        torch.testing.assert_close(padded[index, -len(row) :], alone, **LOGITS_TOLERANCE)
    assert_adapter_matters(toast_lm, rows[0][None])


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_right_padding_in_training_leaves_real_positions_alone(kind):
    """A training batch padded on the right (mask 0, labels -100) gives each row the loss and gradients it has alone."""
    model = make_toast_lm(kind).train()
    rows = [prompt(batch=1, length=length, seed=seed)[0] for seed, length in enumerate((7, 4))]
    input_ids = torch.full((2, 9), PAD)  # two extra pad tokens beyond the longest row
    attention_mask = torch.zeros_like(input_ids)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = row
        attention_mask[index, : len(row)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    for index, row in enumerate(rows):
        alone = model(input_ids=row[None]).logits[0]
        torch.testing.assert_close(output.logits[index, : len(row)], alone, **LOGITS_TOLERANCE)

    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    padded_grads = torch.autograd.grad(output.loss, list(trainable.values()))
    # The same loss without any padding: token-weighted mean over the two rows' shifted labels.
    losses = [model(input_ids=row[None], labels=row[None]).loss * (len(row) - 1) for row in rows]
    unpadded_loss = sum(losses) / sum(len(row) - 1 for row in rows)
    torch.testing.assert_close(output.loss, unpadded_loss, **LOGITS_TOLERANCE)
    unpadded_grads = torch.autograd.grad(unpadded_loss, list(trainable.values()))
    for name, padded, unpadded in zip(trainable, padded_grads, unpadded_grads):
        torch.testing.assert_close(padded, unpadded, atol=1e-5, rtol=1e-4, msg=name)
    assert any(grad.abs().max() > 0 for grad in padded_grads)


# --------------------------------------------------------------------------- manual incremental decoding


@pytest.mark.parametrize(
    ("kind", "spelling"),
    [
        ("llama", "cache"),
        ("mistral", "cache"),
        ("gpt2", "cache"),
        pytest.param("llama", "past_key_values", marks=LEGACY_CACHE_NAME),
        pytest.param("gpt2", "past_key_values", marks=LEGACY_CACHE_NAME),
        ("llama", None),
    ],
)
def test_incremental_forward_equals_full_forward(kind, spelling):
    """Prefill, then feed one token at a time with the returned cache: the logits equal one full forward.

    `spelling` is the keyword the cache is passed with (`None`: the prefill creates its own cache with `use_cache`).
    """
    model = make_toast_lm(kind)
    sequence = prompt(length=9)
    prefill = 4
    with torch.no_grad():
        first_cache = {} if spelling is None else {spelling: DynamicCache(config=model.config)}
        output = model(input_ids=sequence[:, :prefill], use_cache=True, **first_cache)
        steps = [output.logits]
        for position in range(prefill, sequence.shape[1]):
            cache = {spelling or "cache": output.cache}
            output = model(input_ids=sequence[:, position : position + 1], use_cache=True, **cache)
            steps.append(output.logits)
    incremental = torch.cat(steps, dim=1)  # (B, N, V)
    torch.testing.assert_close(incremental, logits(model, sequence), **LOGITS_TOLERANCE)
    pass1_cache = get_pass1_cache(output.cache)
    assert pass1_cache is not None and pass1_cache is not output.cache
    assert pass1_cache.get_seq_length() == output.cache.get_seq_length() == sequence.shape[1]
    assert_adapter_matters(model, sequence)


def test_deep_copied_prompt_cache_is_independent(llama_lm):
    """transformers' prompt-reuse recipe: fill a cache once, then `copy.deepcopy` it for each continuation."""
    prefix, suffix = prompt(batch=1, length=6), prompt(batch=1, length=3, seed=1)
    input_ids = torch.cat([prefix, suffix], dim=1)
    with torch.no_grad():
        prompt_cache = llama_lm(input_ids=prefix, cache=DynamicCache(config=llama_lm.config)).cache
    reused = copy.deepcopy(prompt_cache)
    assert get_pass1_cache(reused) is not get_pass1_cache(prompt_cache)
    # Layers shared between the two passes stay shared within the copy, and are not shared with the original.
    for original, copied in ((prompt_cache, reused), (get_pass1_cache(prompt_cache), get_pass1_cache(reused))):
        assert not any(a is b for a, b in zip(original.layers, copied.layers))
    shared = [a is b for a, b in zip(reused.layers, get_pass1_cache(reused).layers)]
    assert shared == [a is b for a, b in zip(prompt_cache.layers, get_pass1_cache(prompt_cache).layers)]
    assert sum(shared) == (1 if llama_lm.peft_config["default"].layers_to_transform else 0)

    tokens = greedy(llama_lm, input_ids, cache=reused)
    assert torch.equal(tokens, greedy(llama_lm, input_ids, use_cache=False))
    # The copy grew and the original did not, in both passes.
    assert prompt_cache.get_seq_length() == get_pass1_cache(prompt_cache).get_seq_length() == prefix.shape[1]
    assert reused.get_seq_length() == get_pass1_cache(reused).get_seq_length() == tokens.shape[1] - 1
    # Cropping the copy crops the copy's pass-1 cache, not the original's.
    reused.crop(-2)
    assert get_pass1_cache(reused).get_seq_length() == tokens.shape[1] - 3
    # every layer once, shared or not
    assert {layer.get_seq_length() for layer in (*reused.layers, *get_pass1_cache(reused).layers)} == {
        tokens.shape[1] - 3
    }
    assert get_pass1_cache(prompt_cache).get_seq_length() == prefix.shape[1]


def test_continuing_a_base_model_cache_raises(llama_lm):
    input_ids = prompt()
    with torch.no_grad(), llama_lm.disable_adapter():
        base_cache = llama_lm(input_ids=input_ids, use_cache=True).cache
    with pytest.raises(ValueError, match="no TOAST pass-1 cache"):
        llama_lm(input_ids=prompt(length=1, seed=1), cache=base_cache)


def test_continuing_a_toast_cache_with_adapters_disabled_raises(llama_lm):
    input_ids = prompt()
    with torch.no_grad():
        toast_cache = llama_lm(input_ids=input_ids, use_cache=True).cache
        with llama_lm.disable_adapter(), pytest.raises(ValueError, match="adapters are disabled now"):
            llama_lm(input_ids=prompt(length=1, seed=1), cache=toast_cache)
        # The refusal left the cache intact: TOAST still continues it exactly.
        step = llama_lm(input_ids=prompt(length=1, seed=1), cache=toast_cache).logits[:, -1]
        full = llama_lm(input_ids=torch.cat([input_ids, prompt(length=1, seed=1)], dim=1)).logits[:, -1]
    torch.testing.assert_close(step, full, **LOGITS_TOLERANCE)


def test_continuing_another_adapters_cache_raises():
    model = get_peft_model(DECODERS["llama"](), ToastConfig(task_type="CAUSAL_LM"), adapter_name="first")
    model.add_adapter("second", ToastConfig(task_type="CAUSAL_LM"))
    model.eval()
    with torch.no_grad():
        cache = model(input_ids=prompt(), use_cache=True).cache
        model.set_adapter("second")
        with pytest.raises(
            ValueError, match="filled by the TOAST adapter 'first', not by the active adapter 'second'"
        ):
            model(input_ids=prompt(length=1, seed=1), cache=cache)
        cache.reset()  # an empty cache belongs to nobody
        model(input_ids=prompt(), cache=cache)
    assert get_pass1_cache(cache).get_seq_length() == cache.get_seq_length() == prompt().shape[1]


def test_legacy_tuple_cache_raises(llama_lm):
    keys = torch.zeros(2, 2, 3, 8)  # (B, kv heads, N, head dim)
    legacy = tuple((keys, keys) for _ in range(llama_lm.config.num_hidden_layers))
    with pytest.raises(TypeError, match="Legacy tuple caches are not supported"):
        llama_lm(input_ids=prompt(length=1), past_key_values=legacy)


# ---------------------------------------------------------------------------------------------- precision


def test_bfloat16_generate():
    """A bf16 base model generates; its scores follow the full-sequence bf16 logits (bf16 tolerance)."""
    model = get_peft_model(DECODERS["llama"]().to(torch.bfloat16), ToastConfig(task_type="CAUSAL_LM"))
    randomize_adapter(model)
    model.eval()
    assert model.base_model.toast_prompt["default"].dtype == torch.float32  # PEFT's default upcast of the adapter
    input_ids = prompt()
    output = greedy(model, input_ids, output_scores=True, return_dict_in_generate=True)
    full = logits(model, output.sequences)
    assert full.dtype == torch.bfloat16
    start = input_ids.shape[1] - 1
    for step, scores in enumerate(output.scores):
        torch.testing.assert_close(scores.float(), full[:, start + step].float(), atol=0.15, rtol=0.05)
    assert_adapter_matters(model, output.sequences)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cached_generation_is_exact(toast_lm):
    model = toast_lm.cuda()
    input_ids = prompt().cuda()
    output = greedy(model, input_ids, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(output.sequences, greedy(model, input_ids, use_cache=False))
    # GPU kernels pick other reduction orders for other shapes: differences up to 2e-4 were seen on an H200.
    assert_scores_equal_full_sequence_logits(model, input_ids, output, tolerance={"atol": 1e-3, "rtol": 1e-3})
    beams = greedy(model, input_ids, num_beams=3)
    assert torch.equal(beams, greedy(model, input_ids, num_beams=3, use_cache=False))


# ----------------------------------------------------------------------------------- the real SmolLM2-135M


def load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_toast import assets

    path = assets.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    input_ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    return AutoModelForCausalLM.from_pretrained(path).eval(), input_ids


@pytest.mark.slow
def test_smollm2_cached_generation_is_exact():
    """30 layers of a trained model, with small random readouts (the reference initialisation, std 0.02)."""
    base, input_ids = load_smollm2()
    base_tokens = greedy(base, input_ids, max_new_tokens=12)
    model = get_peft_model(base, ToastConfig(task_type="CAUSAL_LM", readout_init="reference")).eval()
    cached = greedy(model, input_ids, max_new_tokens=12)
    assert torch.equal(cached, greedy(model, input_ids, max_new_tokens=12, use_cache=False))
    assert not torch.equal(cached, base_tokens), "the random readouts should change SmolLM2's greedy tokens"


@pytest.mark.slow
def test_smollm2_default_adapter_generates_what_the_base_model_generates():
    """A fresh default adapter (zero readouts) starts exactly at the base model."""
    base, input_ids = load_smollm2()
    base_tokens = greedy(base, input_ids, max_new_tokens=12)
    model = get_peft_model(base, ToastConfig(task_type="CAUSAL_LM")).eval()
    assert torch.equal(greedy(model, input_ids, max_new_tokens=12), base_tokens)
