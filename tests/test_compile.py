"""`torch.compile` of a TOAST model: compiled training steps equal eager ones, and compiling stops after warm-up.

Backend `aot_eager` (dynamo + AOTAutograd, no code generation) where gradients are compared: it traces and partitions
forward and backward as inductor does, in seconds on CPU; plain `eager` (dynamo only) where only dynamo's frames and
guards matter. The compile counter counts every frame dynamo compiles; a frame compiled again (its
compile id `frame/n` with `n > 0`) is a recompile. `fail_on_recompile_limit_hit` turns dynamo's silent fallback to
eager at its recompile limit (8 per frame) into an error, so a test cannot pass by no longer compiling.
"""

from __future__ import annotations

import copy
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch._dynamo
from conftest import make_inputs, make_llama, make_vit, randomize_adapter
from peft import get_peft_model

from peft_toast import ToastConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from compile import CompileCounter  # noqa: E402  (the counter benchmarks/compile.py reports with)

pytestmark = pytest.mark.usefixtures("one_thread")

BACKEND = "aot_eager"
# Calls that still compile: the first compiles every frame; the second recompiles the few frames whose guards the first
# call changed for good (the data-initialised prompt is set, transformers fills in `config.problem_type`).
WARMUP = 2


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test compiles from scratch, with dynamo's recompile limit as an error, and leaves no compiled code behind."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


def _model(kind: str, layers, num_blocks=None):
    if kind == "vit":
        base = make_vit(**({"num_hidden_layers": num_blocks} if num_blocks else {}))
        config = ToastConfig(layers_to_transform=layers)
    else:
        base = make_llama()
        config = ToastConfig(task_type="CAUSAL_LM", layers_to_transform=layers)
    model = get_peft_model(base, config)
    randomize_adapter(model)
    return model.train()


def _batch(kind: str, seed: int) -> dict:
    inputs = make_inputs(kind, seed=seed)
    inputs["labels"] = inputs["input_ids"] if kind == "llama" else torch.tensor([0, 2])
    return inputs


def _step(model, optimizer, batch):
    """One SGD step; returns the logits and the gradients of every trainable tensor (adapter and head)."""
    output = model(**batch)
    output.loss.backward()
    gradients = {
        name.removeprefix("_orig_mod."): param.grad.clone()  # the compiled wrapper's name for the model
        for name, param in model.named_parameters()
        if param.requires_grad
    }
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return output.logits.detach(), gradients


def _trainable(model):
    return [param for param in model.parameters() if param.requires_grad]


@pytest.mark.parametrize(
    "kind, layers",
    [
        ("vit", None),
        ("vit", [-1]),
        pytest.param("llama", None, marks=pytest.mark.slow),  # 10-20 s on 2 loaded CPU cores
        pytest.param("llama", [-1], marks=pytest.mark.slow),
    ],
    ids=["vit", "vit-top-block", "llama", "llama-top-block"],
)
def test_compiled_training_equals_eager_and_stops_compiling(kind, layers):
    eager = _model(kind, layers)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=BACKEND)
    optimizers = [torch.optim.SGD(_trainable(m), lr=0.1) for m in (eager, compiled_model)]
    counts = []
    with CompileCounter() as counter:
        for step in range(WARMUP + 2):
            batch = _batch(kind, seed=step)  # new data every step: the same shapes must not recompile
            before = (counter.compiles, counter.recompiles)
            logits, gradients = _step(compiled, optimizers[1], batch)
            counts.append((counter.compiles - before[0], counter.recompiles - before[1]))
            expected_logits, expected_gradients = _step(eager, optimizers[0], batch)
            torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=0)
            assert gradients.keys() == expected_gradients.keys() and gradients
            for name, gradient in gradients.items():
                torch.testing.assert_close(gradient, expected_gradients[name], atol=1e-5, rtol=0, msg=name)
    first_compiles, first_recompiles = counts[0]
    assert first_compiles > 0
    # Every block reads the call's state inside the graph: no frame is compiled twice within a call (a graph break in
    # the blocks compiled each block's frame once per block index).
    assert first_recompiles == 0, counts
    assert counts[1][0] <= 3, counts
    assert counts[WARMUP:] == [(0, 0)] * 2, counts


@pytest.mark.slow  # about 20 s on 2 loaded CPU cores
def test_more_blocks_than_the_recompile_limit_compile_as_few_frames():
    """12 blocks, more than dynamo's recompile limit of 8: the same frames as 4 blocks, none compiled per block."""
    compiles = {}
    for num_blocks in (4, 12):
        torch._dynamo.reset()
        model = _model("vit", None, num_blocks=num_blocks)
        compiled = torch.compile(model, backend="eager")
        with CompileCounter() as counter:
            compiled(**_batch("vit", seed=0)).loss.backward()
        assert counter.recompiles == 0
        compiles[num_blocks] = counter.compiles
    assert compiles[12] == compiles[4]


def test_compiled_model_in_another_thread_and_in_eval_equals_eager():
    """Guards read the call's state in the calling thread: a compiled model called from a fresh thread steers with its
    own signals. Eval mode (no grad) compiles its own graphs and equals eager too."""
    eager = _model("vit", None)
    compiled = torch.compile(copy.deepcopy(eager), backend="eager")
    batch = _batch("vit", seed=0)
    for _ in range(WARMUP):
        compiled(**batch).loss.backward()
    expected = eager(**batch).logits.detach()
    results = {}

    def work():
        results["logits"] = compiled(**batch).logits.detach()

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    torch.testing.assert_close(results["logits"], expected, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(**batch).logits, eager.eval()(**batch).logits, atol=1e-5, rtol=0)
