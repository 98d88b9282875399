"""The top-down path in plain torch (`peft_toast/topdown.py`): token selection, feedback maps, the feedback chain."""

import math

import pytest
import torch
from torch import nn

from peft_toast.topdown import REFERENCE_INIT_STD, FeedbackMap, feedback_chain, token_selection

DIM = 6


# ------------------------------------------------------------------------------------------------ token selection


def test_token_selection_matches_hand_computed_cosines():
    prompt = torch.tensor([1.0, 0.0, 0.0])
    features = torch.tensor(
        [
            [
                [3.0, 4.0, 0.0],  # cos = 3 / 5
                [2.0, 0.0, 0.0],  # parallel: cos = 1
                [-1.0, 1.0, 0.0],  # negative cosine: clamped to 0
                [0.0, 0.0, 5.0],  # orthogonal: 0
            ]
        ]
    )  # (1, 4, 3)
    gates, selected = token_selection(features, prompt)
    expected_gates = torch.tensor([[0.6, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(gates, expected_gates, rtol=0, atol=1e-7)
    torch.testing.assert_close(selected, expected_gates[..., None] * features, rtol=0, atol=0)


def test_token_selection_is_a_clamped_cosine():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(3, 7, DIM, generator=generator)
    prompt = torch.randn(DIM, generator=generator)
    gates, selected = token_selection(features, prompt)
    cosine = torch.nn.functional.cosine_similarity(features, prompt.expand_as(features), dim=-1)  # (3, 7)
    torch.testing.assert_close(gates, cosine.clamp(0, 1))
    assert gates.min() >= 0 and gates.max() <= 1
    assert (gates == 0).any() and (gates > 0).any(), "random vectors should give both clamped and open gates"
    torch.testing.assert_close(selected, gates[..., None] * features)


def test_token_selection_does_not_depend_on_prompt_scale():
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(2, 5, DIM, generator=generator)
    prompt = torch.randn(DIM, generator=generator)
    gates, _ = token_selection(features, prompt)
    scaled, _ = token_selection(features, 10.0 * prompt)
    torch.testing.assert_close(gates, scaled)


def test_zero_vectors_get_gate_zero_and_finite_gradients():
    features = torch.zeros(1, 3, DIM)
    features[0, 1] = torch.arange(1.0, DIM + 1)  # one real token between two zero tokens (padding)
    features.requires_grad_(True)
    prompt = torch.ones(DIM, requires_grad=True)
    gates, selected = token_selection(features, prompt)
    assert gates[0, 0] == 0 and gates[0, 2] == 0
    assert gates[0, 1] > 0
    assert torch.isfinite(selected).all()
    (selected.sum() + gates.sum()).backward()
    assert torch.isfinite(features.grad).all() and torch.isfinite(prompt.grad).all()
    assert prompt.grad.abs().sum() > 0, "the prompt must receive a gradient from the open gate"

    # A zero prompt (e.g. a freshly zero-initialised one) closes every gate instead of producing NaN.
    zero_prompt = torch.zeros(DIM, requires_grad=True)
    gates, selected = token_selection(features.detach(), zero_prompt)
    assert (gates == 0).all() and (selected == 0).all()
    selected.sum().backward()
    assert torch.isfinite(zero_prompt.grad).all()


# ------------------------------------------------------------------------------------------------ feedback maps


def _randomize(module: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            tensor.copy_(torch.randn(tensor.shape, generator=generator))


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"rank": 2}, {"lite_rank": 2}],
    ids=["full", "low_rank", "lite"],
)
@pytest.mark.parametrize("init", ["identity", "zero", "reference"])
def test_effective_weight_matches_forward(kwargs, init):
    feedback = FeedbackMap(DIM, init=init, **kwargs)
    _randomize(feedback)
    z = torch.randn(2, 5, DIM)
    torch.testing.assert_close(feedback(z), z @ feedback.effective_weight().T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{}, {"rank": 2}, {"lite_rank": 2}], ids=["full", "low_rank", "lite"])
def test_identity_and_zero_initialisations_are_exact(kwargs):
    identity = FeedbackMap(DIM, init="identity", **kwargs)
    zero = FeedbackMap(DIM, init="zero", **kwargs)
    assert torch.equal(identity.effective_weight(), torch.eye(DIM))
    assert torch.equal(zero.effective_weight(), torch.zeros(DIM, DIM))
    z = torch.randn(3, DIM)
    assert torch.equal(identity(z), z)
    assert torch.equal(zero(z), torch.zeros_like(z))


@pytest.mark.parametrize("kwargs", [{"rank": 2}, {"lite_rank": 2}], ids=["low_rank", "lite"])
def test_exact_starts_keep_gradients_alive(kwargs):
    """A low-rank / lite map that starts exactly at its base has one factor at zero and the other random (like LoRA),
    so the zero factor still receives a gradient."""
    feedback = FeedbackMap(DIM, init="zero", **kwargs)
    zero_factor, random_factor = ("u", "v") if "rank" in kwargs else ("delta_u", "delta_v")
    assert (getattr(feedback, zero_factor) == 0).all()
    assert (getattr(feedback, random_factor) != 0).any()
    # A linear loss: the gradient of a squared one would vanish at u = 0 along with the output.
    (feedback(torch.randn(4, DIM)) * torch.randn(4, DIM)).sum().backward()
    assert getattr(feedback, zero_factor).grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs", [{}, {"rank": 64}], ids=["full", "low_rank"])
def test_reference_initialisation_is_a_small_normal(kwargs):
    feedback = FeedbackMap(64, init="reference", **kwargs)
    tensors = [feedback.weight] if not kwargs else [feedback.u, feedback.v]
    for tensor in tensors:
        assert tensor.std().item() == pytest.approx(REFERENCE_INIT_STD, rel=0.1)
        assert abs(tensor.mean().item()) < 0.1 * REFERENCE_INIT_STD * math.sqrt(64)


def test_lite_keeps_its_full_rank_weight_as_a_frozen_buffer():
    feedback = FeedbackMap(DIM, init="identity", lite_rank=2)
    assert dict(feedback.named_buffers()).keys() == {"weight"}
    assert dict(feedback.named_parameters()).keys() == {"delta_u", "delta_v"}
    assert "weight" in feedback.state_dict(), "the frozen weight (calibrated or pre-tuned) must be saved"
    feedback(torch.randn(2, DIM)).sum().backward()
    assert feedback.weight.grad is None


def test_parametrisations_store_the_documented_tensors():
    assert {n: tuple(p.shape) for n, p in FeedbackMap(DIM, init="zero").named_parameters()} == {"weight": (DIM, DIM)}
    assert {n: tuple(p.shape) for n, p in FeedbackMap(DIM, init="zero", rank=3).named_parameters()} == {
        "u": (DIM, 3),
        "v": (3, DIM),
    }
    assert {n: tuple(p.shape) for n, p in FeedbackMap(DIM, init="zero", lite_rank=3).named_parameters()} == {
        "delta_u": (DIM, 3),
        "delta_v": (3, DIM),
    }


def test_unknown_initialisation_raises():
    with pytest.raises(ValueError, match="initialisation"):
        FeedbackMap(DIM, init="ones")


def test_meta_device_construction_defers_initialisation():
    feedback = FeedbackMap(DIM, init="identity", rank=2, device="meta")
    assert feedback.u.is_meta and feedback.v.is_meta


# ------------------------------------------------------------------------------------------------ feedback chain


def test_feedback_chain_runs_from_the_top_down():
    """`down_maps[i]`, `readouts[i]` belong to the i-th block from the top: t_i = C_i A_i ... A_0 x."""
    torch.manual_seed(3)
    downs = [FeedbackMap(DIM, init="reference") for _ in range(3)]
    readouts = [FeedbackMap(DIM, init="reference"), None, FeedbackMap(DIM, init="reference", rank=2)]
    for index, module in enumerate(downs + [r for r in readouts if r is not None]):
        _randomize(module, seed=index)
    x = torch.randn(2, 4, DIM, dtype=torch.float64)
    with torch.no_grad():
        signals = feedback_chain(x.float(), downs, readouts)

    a = [d.effective_weight().double() for d in downs]
    c = [r.effective_weight().double() if r is not None else None for r in readouts]
    # Column-vector form t = C_i A_i ... A_0 x is the row-vector form x A_0^T ... A_i^T C_i^T.
    expected_top = x @ a[0].T @ c[0].T
    expected_bottom = x @ a[0].T @ a[1].T @ a[2].T @ c[2].T
    assert signals[1] is None, "a block without readout only relays the signal"
    torch.testing.assert_close(signals[0].double(), expected_top, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(signals[2].double(), expected_bottom, rtol=1e-4, atol=1e-4)
    # The order matters: the reversed product is a different matrix for random maps.
    reversed_bottom = x @ a[2].T @ a[1].T @ a[0].T @ c[2].T
    assert not torch.allclose(reversed_bottom, expected_bottom, rtol=1e-2, atol=1e-2)


def test_feedback_chain_moves_signals_to_each_map_dtype():
    downs = [FeedbackMap(DIM, init="identity", dtype=torch.float64), FeedbackMap(DIM, init="identity")]
    readouts = [FeedbackMap(DIM, init="identity", dtype=torch.float64), FeedbackMap(DIM, init="identity")]
    x = torch.randn(1, 2, DIM)
    top, bottom = feedback_chain(x, downs, readouts)
    assert top.dtype == torch.float64 and bottom.dtype == torch.float32
    torch.testing.assert_close(bottom, x)
