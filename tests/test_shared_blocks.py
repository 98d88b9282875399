"""Pass 2 starts where steering starts (`ToastConfig.share_lower_blocks`).

With `layers_to_transform` = the top blocks, the blocks below the lowest steered one get no signal, so pass 2 takes the
hidden state entering the lowest steered block from pass 1 instead of recomputing them. Checked against the full
recomputation (`share_lower_blocks=False`, itself checked against an independent implementation elsewhere): equal bit
for bit in eval on every family, with padding, with gradient checkpointing and for the gradients; and the blocks
below really do not run in pass 2 (each block's first module is counted)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import LAYERS, MODEL_FACTORIES, VOCAB, make_inputs, make_llama, make_vit, randomize_adapter
from peft import get_peft_model
from test_fused import FAMILIES as FUSED_FAMILIES

from peft_toast import ToastConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _make_t5_encoder():
    config = transformers.T5Config(d_model=32, num_layers=LAYERS, num_heads=4, d_ff=37, d_kv=8, vocab_size=VOCAB)
    return transformers.T5EncoderModel(config).eval()  # its blocks return tuples that carry the position bias


FACTORIES = {**MODEL_FACTORIES, **{f"fused-{name}": make for name, make in FUSED_FAMILIES.items()}}
FACTORIES["t5-encoder"] = _make_t5_encoder


def _inputs(kind: str) -> dict:
    if kind in ("vit", "dinov2"):
        return make_inputs(kind)
    inputs = make_inputs("llama")
    if kind in ("gpt2", "llama", "mistral") or kind.startswith("fused-"):
        inputs["attention_mask"] = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # left padding
        inputs["use_cache"] = False
    return inputs


def _blocks(model) -> list[torch.nn.Module]:
    return list(model.base_model.architecture.blocks)


def _peft(kind: str, share: bool, layers=(-1,), seed: int = 0, **config):
    torch.manual_seed(seed)
    base = FACTORIES[kind]()
    model = get_peft_model(base, ToastConfig(layers_to_transform=list(layers), share_lower_blocks=share, **config))
    randomize_adapter(model)
    return model


class BlockRuns:
    """Counts how often each block really computes: the first module of the block that holds weights runs once per
    real forward of the block (a block that pass 2 takes from pass 1 does not reach it)."""

    def __init__(self, blocks):
        self.counts = [0] * len(blocks)
        for index, block in enumerate(blocks):
            first = next(m for m in block.modules() if next(m.parameters(recurse=False), None) is not None)
            first.register_forward_pre_hook(lambda *_, i=index: self.counts.__setitem__(i, self.counts[i] + 1))


def _output(out) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise AssertionError(type(out))


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_equal_to_the_full_recomputation_in_eval_and_skips_the_blocks_below(kind):
    inputs = _inputs(kind)
    shared, full = _peft(kind, True).eval(), _peft(kind, False).eval()
    num_blocks = len(_blocks(shared))
    runs = BlockRuns(_blocks(shared))
    with torch.no_grad():
        got, expected = _output(shared(**inputs)), _output(full(**inputs))
    assert torch.equal(got, expected)
    # pass 1 runs every block; pass 2 only the top (steered) one
    assert runs.counts == [1] * (num_blocks - 1) + [2]
    with full.disable_adapter(), torch.no_grad():
        base = _output(full(**inputs))
    assert not torch.allclose(got, base), "the adapter must change the output for the check to mean anything"


@pytest.mark.parametrize("layers", [(2, 3), (1,), (0, 3)])
def test_gradients_equal_the_full_recomputation(layers):
    grads = {}
    for share in (True, False):
        model = _peft("llama", share, layers)
        model.train()
        inputs = _inputs("llama")
        runs = BlockRuns(_blocks(model))
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        grads[share] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        expected_runs = [1 if share and i < min(layers) else 2 for i in range(LAYERS)]
        assert runs.counts == expected_runs
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name, grad in grads[True].items():
        torch.testing.assert_close(grad, grads[False][name], rtol=1e-5, atol=1e-7, msg=name)
    down = [name for name in grads[True] if f"layers.{min(layers)}." in name and "toast_readout" in name]
    assert down, "the lowest steered block's readout receives a gradient"


def test_steering_block_0_shares_nothing():
    model = _peft("vit", True, layers=(0, 3)).eval()
    runs = BlockRuns(_blocks(model))
    with torch.no_grad():
        model(**_inputs("vit"))
    assert runs.counts == [2] * LAYERS


def test_gradient_checkpointing_with_shared_blocks():
    grads = {}
    for checkpointing in (False, True):
        model = _peft("llama", True, layers=(2, 3))
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        inputs = _inputs("llama")
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in grads[True].items():
        torch.testing.assert_close(grad, grads[False][name], rtol=1e-5, atol=1e-7, msg=name)


def test_dropout_in_training_runs_the_shared_blocks_once():
    torch.manual_seed(0)
    base = make_vit(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = get_peft_model(base, ToastConfig(layers_to_transform=[3]))
    randomize_adapter(model)
    model.train()
    runs = BlockRuns(_blocks(model))
    out = model(**_inputs("vit"), labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert runs.counts == [1, 1, 1, 2]
    assert all(p.grad is not None for n, p in model.named_parameters() if "toast_readout" in n and p.requires_grad)


def test_calls_that_report_every_block_recompute_them():
    shared, full = _peft("bert", True, layers=(3,)).eval(), _peft("bert", False, layers=(3,)).eval()
    inputs = _inputs("bert")
    runs = BlockRuns(_blocks(shared))
    with torch.no_grad():
        got = shared(**inputs, output_hidden_states=True)
        expected = full(**inputs, output_hidden_states=True)
    assert runs.counts == [2] * LAYERS
    for a, b in zip(got.hidden_states, expected.hidden_states):
        assert torch.equal(a, b)


def test_decoder_kv_cache_calls_share_the_bottom_layers_between_the_passes():
    from peft_toast.generation import get_pass1_cache

    model = _peft("llama", True, layers=(2, 3)).eval()
    inputs = make_inputs("llama")
    runs = BlockRuns(_blocks(model))
    with torch.no_grad():
        out = model(**inputs)  # eval: a KV cache is made (here, so that the bottom layers can be shared)
    assert runs.counts == [1, 1, 2, 2]
    main, pass1 = out.past_key_values, get_pass1_cache(out.past_key_values)
    assert [a is b for a, b in zip(main.layers, pass1.layers)] == [True, True, False, False]
    length = inputs["input_ids"].shape[1]
    assert main.get_seq_length() == pass1.get_seq_length() == length  # not 2 x length: pass 2 did not append
    assert all(layer.get_seq_length() == length for layer in (*main.layers, *pass1.layers))
    # The steered layers differ between the passes (block 2's values, block 3's keys too); the shared ones hold pass 1's
    # (= the base model's) keys and values.
    assert not torch.equal(main.layers[2].values, pass1.layers[2].values)
    assert not torch.equal(main.layers[3].keys, pass1.layers[3].keys)
    with torch.no_grad(), model.disable_adapter():
        base = model(**inputs).past_key_values
    torch.testing.assert_close(main.layers[0].keys, base.layers[0].keys, rtol=0, atol=0)
    torch.testing.assert_close(main.layers[1].values, base.layers[1].values, rtol=0, atol=0)
    # Continuing the cache equals one uncached forward of the whole sequence.
    nxt = torch.randint(2, VOCAB, (inputs["input_ids"].shape[0], 1))
    with torch.no_grad():
        step = model(input_ids=nxt, past_key_values=main).logits[:, -1]
        whole = model(input_ids=torch.cat([inputs["input_ids"], nxt], 1), use_cache=False).logits[:, -1]
    torch.testing.assert_close(step, whole, rtol=1e-5, atol=1e-5)
    assert main.get_seq_length() == length + 1


@pytest.mark.parametrize("layers, shared", [((2, 3), [True, True, False, False]), ((3,), [False] * 4)])
def test_mixed_sliding_and_full_layers_share_where_a_layer_of_the_same_kind_is_above(layers, shared):
    """Qwen2 with sliding-window (window 3, shorter than the prompt) and full-attention layers alternating: a shared
    layer's length and mask queries are answered by the lowest steered layer of its kind; when there is none (steering
    block 3 only: no sliding layer above block 2), the passes keep separate caches. Generation is exact either way."""
    from peft_toast.generation import get_pass1_cache

    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=37,
        vocab_size=VOCAB, use_sliding_window=True, max_window_layers=0, sliding_window=3, initializer_range=0.3,
        layer_types=["sliding_attention", "full_attention"] * 2,
    )  # fmt: skip
    model = get_peft_model(
        transformers.Qwen2ForCausalLM(config), ToastConfig(task_type="CAUSAL_LM", layers_to_transform=list(layers))
    )
    randomize_adapter(model, seed=2)
    model.eval()
    input_ids = torch.randint(2, VOCAB, (2, 7))
    kwargs = dict(attention_mask=torch.ones_like(input_ids), max_new_tokens=8, do_sample=False)
    output = model.generate(input_ids=input_ids, return_dict_in_generate=True, **kwargs)
    assert torch.equal(output.sequences, model.generate(input_ids=input_ids, use_cache=False, **kwargs))
    with model.disable_adapter():
        assert not torch.equal(output.sequences, model.generate(input_ids=input_ids, **kwargs))
    main = output.past_key_values
    assert [a is b for a, b in zip(main.layers, get_pass1_cache(main).layers)] == shared


def test_unshared_adapter_keeps_two_full_caches_and_a_mixed_call_is_refused():
    from peft_toast.generation import get_pass1_cache

    inputs = make_inputs("llama")
    full = _peft("llama", False, layers=(2, 3)).eval()
    with torch.no_grad():
        out = full(**inputs)
    main, pass1 = out.past_key_values, get_pass1_cache(out.past_key_values)
    assert not any(a is b for a, b in zip(main.layers, pass1.layers))
    shared = _peft("llama", True, layers=(2, 3)).eval()
    with torch.no_grad():
        cache = shared(**inputs).past_key_values
        nxt = inputs["input_ids"][:, :1]
        with pytest.raises(ValueError, match="shares its bottom 2 blocks.*output_hidden_states"):
            shared(input_ids=nxt, past_key_values=cache, output_hidden_states=True)
        # A cache started by a call that ran every block keeps running every block.
        cache = shared(**inputs, output_attentions=True).past_key_values
        assert not any(a is b for a, b in zip(cache.layers, get_pass1_cache(cache).layers))
        shared(input_ids=nxt, past_key_values=cache)
        assert cache.get_seq_length() == get_pass1_cache(cache).get_seq_length() == inputs["input_ids"].shape[1] + 1


def test_training_decoder_call_without_use_cache_returns_no_cache():
    model = _peft("llama", True, layers=(3,)).train()
    inputs = _inputs("llama")
    inputs.pop("use_cache")
    out = model(**inputs, labels=inputs["input_ids"])
    assert out.past_key_values is None  # a cache with the shared blocks missing would be wrong; none is made


def test_adapters_with_different_lowest_blocks():
    model = get_peft_model(make_vit(), ToastConfig(layers_to_transform=[3]), adapter_name="top")
    model.add_adapter("middle", ToastConfig(layers_to_transform=[1, 2]))
    randomize_adapter(model)
    model.eval()
    inputs = _inputs("vit")
    outputs = {}
    for name, expected_runs in (("top", [1, 1, 1, 2]), ("middle", [1, 2, 2, 2])):
        model.set_adapter(name)
        runs = BlockRuns(_blocks(model))
        with torch.no_grad():
            outputs[name] = model(**inputs).logits
        assert runs.counts == expected_runs
        model.peft_config[name].share_lower_blocks = False  # the same adapter, every block recomputed
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, outputs[name], rtol=0, atol=0)
    assert not torch.allclose(outputs["top"], outputs["middle"])


def test_an_added_adapter_steers_blocks_below_the_first_adapters(tmp_path):
    """`add_adapter` with lower `layers_to_transform` than the first adapter wraps new value projections; the adapter
    must steer them (it once did not: the list of wrapped layers was made only when the first adapter was created)."""
    from peft import PeftModel

    torch.manual_seed(0)
    base = make_vit()
    model = get_peft_model(copy.deepcopy(base), ToastConfig(layers_to_transform=[3]), adapter_name="top")
    model.add_adapter("middle", ToastConfig(layers_to_transform=[1, 2]))
    randomize_adapter(model)
    model.set_adapter("middle")
    model.save_pretrained(tmp_path, selected_adapters=["middle"])
    alone = PeftModel.from_pretrained(base, tmp_path / "middle").eval()
    inputs = _inputs("vit")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**inputs).logits, alone(**inputs).logits, rtol=0, atol=0)
        with alone.disable_adapter():
            unsteered = alone(**inputs).logits
    assert not torch.allclose(alone(**inputs).logits, unsteered)


def test_unload_and_deepcopy_keep_the_blocks_forward_right():
    model = _peft("vit", True, layers=(3,)).eval()
    inputs = _inputs("vit")
    copied = copy.deepcopy(model)
    with torch.no_grad():
        expected = model(**inputs).logits
        torch.testing.assert_close(copied(**inputs).logits, expected, rtol=0, atol=0)
        for block in _blocks(copied)[:3]:  # the copy's shared blocks compute with the copy's own weights
            for param in block.parameters():
                param.mul_(0.5)
        assert not torch.allclose(copied(**inputs).logits, expected)
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)
    blocks = _blocks(model)
    base = model.unload()
    assert all("forward" not in block.__dict__ and "_toast_block_index" not in block.__dict__ for block in blocks)
    with torch.no_grad():
        torch.testing.assert_close(base(**inputs).logits, make_vit_like(base)(**inputs).logits)


def make_vit_like(model):
    """A fresh model with `model`'s weights (no TOAST ever attached)."""
    fresh = make_vit()
    fresh.load_state_dict(model.state_dict())
    return fresh.eval()


def test_share_lower_blocks_is_saved_and_loaded(tmp_path):
    model = _peft("llama", False, layers=(3,))
    model.save_pretrained(tmp_path)
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(make_llama(), tmp_path)
    assert loaded.peft_config["default"].share_lower_blocks is False


# ------------------------------------------------------------------------------- the feature cache stores the hidden


def _cached_setup(kind: str, tmp_path, layers=(2, 3)):
    from test_feature_cache import image_dataset, text_dataset

    from peft_toast.feature_cache import precompute_features

    torch.manual_seed(0)
    if kind == "vit":
        base, dataset = make_vit(), image_dataset()
    else:
        base, dataset = make_llama(), text_dataset(labels="lm")
    model = get_peft_model(base, ToastConfig(layers_to_transform=list(layers)))
    randomize_adapter(model)
    cached = precompute_features(model, dataset, cache_dir=tmp_path, verbose=False)
    return model, cached


@pytest.mark.parametrize("kind", ["vit", "llama"])
def test_cached_step_runs_only_the_steered_blocks_and_equals_the_uncached_step(kind, tmp_path):
    from test_feature_cache import batches, loss_and_grads

    from peft_toast.feature_cache import HIDDEN_BLOCK_COLUMN, HIDDEN_COLUMN

    model, cached = _cached_setup(kind, tmp_path)
    assert HIDDEN_COLUMN in cached.column_names and int(cached[0][HIDDEN_BLOCK_COLUMN]) == 2
    model.train()
    batch = batches(model, cached)[0]
    if kind == "llama":
        batch["use_cache"] = False
    runs = BlockRuns(_blocks(model))
    out_cached, grads_cached = loss_and_grads(model, batch)
    assert runs.counts == [0, 0, 1, 1], "a cached step runs only the steered blocks (pass 2)"
    plain = {k: v for k, v in batch.items() if not k.startswith("toast_")}
    out_plain, grads_plain = loss_and_grads(model, plain)
    torch.testing.assert_close(out_cached.loss, out_plain.loss, rtol=0, atol=0)
    assert grads_cached.keys() == grads_plain.keys()
    for name, grad in grads_cached.items():
        torch.testing.assert_close(grad, grads_plain[name], rtol=1e-6, atol=1e-8, msg=name)


def test_cached_hidden_in_a_new_process_first_runs_every_block_then_starts_at_the_steered_block(tmp_path):
    from test_feature_cache import batches

    model, cached = _cached_setup("vit", tmp_path, layers=(3,))
    batch = batches(model, cached)[0]
    for block in _blocks(model):  # as in a new process: how a block returns its hidden state is not known yet
        block.__dict__.pop("_toast_output_kind", None)
    model.eval()
    runs = BlockRuns(_blocks(model))
    with torch.no_grad():
        first = model(**batch).logits
        assert runs.counts == [1, 1, 1, 1]
        second = model(**batch).logits
        assert runs.counts == [1, 1, 1, 2]
        plain = model(**{k: v for k, v in batch.items() if not k.startswith("toast_")}).logits
    assert torch.equal(first, second) and torch.equal(first, plain)


def test_a_cache_made_for_higher_blocks_warns_and_recomputes(tmp_path):
    from test_feature_cache import batches

    model, cached = _cached_setup("vit", tmp_path, layers=(3,))
    batch = batches(model, cached)[0]
    model.add_adapter("lower", ToastConfig(layers_to_transform=[1, 3]))
    model.set_adapter("lower")
    model.eval()
    runs = BlockRuns(_blocks(model))
    with pytest.warns(UserWarning, match="enters block 3"), torch.no_grad():
        got = model(**batch).logits
    assert runs.counts == [1, 1, 1, 1]  # pass 1 did not run (cached): pass 2 runs every block
    with torch.no_grad():
        expected = model(**{k: v for k, v in batch.items() if not k.startswith("toast_")}).logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "hidden, block, match",
    [
        (torch.zeros(4, 5, 32), 3, "must be the pass-1 hidden state"),
        (None, 0, "block index in 1..3"),
        (None, 4, "block index in 1..3"),
    ],
)
def test_bad_cached_hidden_is_refused(tmp_path, hidden, block, match):
    from test_feature_cache import batches

    model, cached = _cached_setup("vit", tmp_path, layers=(3,))
    batch = batches(model, cached)[0]
    batch["toast_hidden"] = hidden if hidden is not None else batch["toast_hidden"]
    batch["toast_hidden_block"] = block
    with pytest.raises(ValueError, match=match), torch.no_grad():
        model.eval()(**batch)


def test_hidden_without_features_is_refused():
    model = _peft("vit", True, layers=(3,)).eval()
    with pytest.raises(ValueError, match="needs `toast_features`"):
        model(**_inputs("vit"), toast_hidden=torch.zeros(2, 17, 32), toast_hidden_block=3)


def test_store_hidden_true_without_shared_blocks_is_refused(tmp_path):
    from test_feature_cache import image_dataset

    from peft_toast.feature_cache import precompute_features

    model = get_peft_model(make_vit(), ToastConfig())
    with pytest.raises(ValueError, match="steers block 0"):
        precompute_features(model, image_dataset(), cache_dir=tmp_path, store_hidden=True, verbose=False)
    cached = precompute_features(
        get_peft_model(make_vit(), ToastConfig(layers_to_transform=[3])),
        image_dataset(),
        cache_dir=tmp_path,
        store_hidden=False,
        verbose=False,
    )
    assert "toast_hidden" not in cached.column_names


def test_bfloat16_equal_to_the_full_recomputation():
    shared, full = (_peft("llama", share, layers=(2, 3)).to(torch.bfloat16).eval() for share in (True, False))
    inputs = _inputs("llama")
    with torch.no_grad():
        got, expected = shared(**inputs).logits, full(**inputs).logits
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
