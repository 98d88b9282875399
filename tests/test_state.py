"""Per-call state (`peft_toast/state.py`): the top-down signals belong to one forward call, never to the model."""

import threading

import pytest
import torch
from conftest import IMAGE, make_inputs, make_llama, make_vit, randomize_adapter
from peft import get_peft_model

from peft_toast import ToastConfig
from peft_toast.state import current_state

NUM_INPUTS = 16


@pytest.fixture(scope="module")
def model():
    """One shared ViT TOAST model with a random adapter (so that a leaked or missing signal changes the output)."""
    model = get_peft_model(make_vit(), ToastConfig())
    randomize_adapter(model)
    return model.eval()


@pytest.fixture(scope="module")
def inputs():
    """Distinct single-image inputs, small so that many calls stay cheap."""
    return [make_inputs("vit", batch=1, seed=seed)["pixel_values"] for seed in range(NUM_INPUTS)]


@pytest.fixture(scope="module")
def expected(model, inputs):
    """Sequential results, one call at a time."""
    with torch.no_grad():
        return [model(pixel_values=x).logits for x in inputs]


def test_threads_get_exactly_their_sequential_results(model, inputs, expected):
    num_threads, calls = 8, 100
    mismatches, errors = [], []

    def work(thread: int) -> None:
        try:
            with torch.no_grad():
                for call in range(calls):
                    index = (thread * 5 + call) % NUM_INPUTS  # threads run different inputs at the same moment
                    if not torch.equal(model(pixel_values=inputs[index]).logits, expected[index]):
                        mismatches.append((thread, call))
        except Exception as error:  # surfaced in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(thread,)) for thread in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert not mismatches, f"{len(mismatches)} of {num_threads * calls} concurrent calls differ from sequential ones"
    assert current_state() is None


def _hook_block(model, hook):
    return model.base_model.model.vit.layers[1].register_forward_hook(hook)


def test_nested_calls_do_not_leak_signals(model, inputs, expected):
    """A hook that calls the whole model again, inside pass 1 and inside pass 2 of an outer call."""
    inner_results, depth = [], []

    def call_model_again(module, args, output):
        if depth:  # the inner call runs this hook too: nest one level only
            return
        depth.append(None)
        try:
            inner_results.append(model(pixel_values=inputs[1]).logits)
        finally:
            depth.pop()

    handle = _hook_block(model, call_model_again)
    try:
        with torch.no_grad():
            outer = model(pixel_values=inputs[0]).logits
    finally:
        handle.remove()
    assert len(inner_results) == 2, "the hook runs once in pass 1 and once in pass 2"
    for inner in inner_results:
        assert torch.equal(inner, expected[1])
    assert torch.equal(outer, expected[0])
    assert current_state() is None


@pytest.mark.parametrize("failing_call", [1, 2], ids=["pass1", "pass2"])
def test_a_call_that_raises_in_a_hook_leaves_no_state(model, inputs, expected, failing_call):
    calls = []

    def fail(module, args, output):
        calls.append(None)
        if len(calls) == failing_call:  # the block runs once in pass 1, then once in pass 2
            raise RuntimeError("boom")

    handle = _hook_block(model, fail)
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
            model(pixel_values=inputs[0])
    finally:
        handle.remove()
    assert current_state() is None
    with torch.no_grad():
        assert torch.equal(model(pixel_values=inputs[2]).logits, expected[2])


def test_bad_input_raising_in_pass1_leaves_no_state(model, inputs, expected):
    wrong_channels = torch.randn(1, 2, IMAGE, IMAGE)  # the model expects 3 channels
    with torch.no_grad(), pytest.raises(ValueError):
        model(pixel_values=wrong_channels)
    assert current_state() is None
    with torch.no_grad():
        assert torch.equal(model(pixel_values=inputs[3]).logits, expected[3])


def test_bad_token_ids_in_a_decoder_leave_no_state():
    model = get_peft_model(make_llama(), ToastConfig(task_type="CAUSAL_LM"))
    randomize_adapter(model)
    good = make_inputs("llama")
    with torch.no_grad():
        expected = model(**good).logits
        with pytest.raises(IndexError):
            model(input_ids=torch.full((1, 4), 10_000))  # beyond the vocabulary: the embedding lookup fails in pass 1
        assert current_state() is None
        assert torch.equal(model(**good).logits, expected)
