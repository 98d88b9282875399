"""Closed-form calibration (`peft_toast.calibration`) against direct least-squares solves on tiny random models, the CLI
end to end, and `load_initialisation`."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import LAYERS, make_inputs, make_llama, make_vit
from peft import PeftModel, get_peft_model
from transformers import (
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    ViTImageProcessorPil,
    ViTModel,
)

from peft_toast import ToastConfig
from peft_toast.calibrate import main
from peft_toast.calibration import (
    BlockStatistics,
    calibrate_feedback,
    collect_block_statistics,
    least_squares_map,
    reconstruction_error,
    reduced_rank_map,
)
from peft_toast.cli import expected_load_report, load_examples, make_batches
from peft_toast.loading import load_initialisation


def _blocks(model):
    return model.vit.layers if hasattr(model, "vit") else model.model.layers


def _direct_tokens(model, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per block, all real tokens' `(h_out, h_in)` as `(n, d)` float64 matrices, collected with hooks on a separate
    copy of the frozen model (independently of the calibration code)."""
    model = copy.deepcopy(model).eval()
    seen: dict[int, list] = {i: [] for i in range(LAYERS)}
    mask = {}

    def hook(index):
        def record(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]  # (B, N, d)
            h_out = output[0] if isinstance(output, tuple) else output  # (B, N, d)
            dim, keep = h_in.shape[-1], mask["current"]
            seen[index].append((h_out.reshape(-1, dim)[keep].double(), h_in.reshape(-1, dim)[keep].double()))

        return record

    handles = [block.register_forward_hook(hook(i), with_kwargs=True) for i, block in enumerate(_blocks(model))]
    with torch.no_grad():
        for batch in batches:
            attention = batch.get("attention_mask")
            mask["current"] = slice(None) if attention is None else attention.reshape(-1).bool()
            model(**batch)
    for handle in handles:
        handle.remove()
    return [(torch.cat([x for x, _ in seen[i]]), torch.cat([y for _, y in seen[i]])) for i in range(LAYERS)]


def _padded_llama_batches():
    batches = [make_inputs("llama", batch=3, seq=7, seed=seed) for seed in range(3)]
    batches[0]["attention_mask"][0, 4:] = 0  # right padding, as a tokenizer pads for a causal LM
    batches[2]["attention_mask"][1, 2:] = 0
    return batches


CASES = {
    "vit": (make_vit, lambda: [make_inputs("vit", batch=4, seed=seed) for seed in range(3)]),
    "llama": (make_llama, _padded_llama_batches),
}


def _case(kind):
    """The tiny base model of `CASES[kind]`, its batches, and their tokens per block (`_direct_tokens`)."""
    factory, make_batches_ = CASES[kind]
    base = factory()
    batches = make_batches_()
    return base, batches, _direct_tokens(base, batches)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_unregularised_calibration_equals_lstsq(kind):
    base, batches, tokens = _case(kind)
    model = get_peft_model(base, ToastConfig())
    result = calibrate_feedback(model, batches, ridge=0.0, progress=False)

    for layer in model.base_model.toast_layers("default"):
        h_out, h_in = tokens[layer.block_index]
        expected = torch.linalg.lstsq(h_out, h_in).solution.T  # A h_out = h_in  <=>  h_out A^T = h_in
        torch.testing.assert_close(layer.toast_down["default"].weight.double(), expected, rtol=1e-4, atol=1e-5)
    assert result.num_tokens == tokens[0][0].shape[0]
    assert result.loss_after < result.loss_before


@pytest.mark.parametrize("kind", sorted(CASES))
def test_ridge_calibration_equals_augmented_lstsq(kind):
    """The ridge pulls towards the identity: min ||X A^T - Y||^2 + lambda ||A - I||^2 is least squares on [X; sqrt(l) I]."""
    base, batches, tokens = _case(kind)
    model = get_peft_model(base, ToastConfig())
    ridge = 0.05
    calibrate_feedback(model, batches, ridge=ridge, progress=False)

    for layer in model.base_model.toast_layers("default"):
        h_out, h_in = tokens[layer.block_index]
        dim = h_out.shape[1]
        strength = ridge * (h_out**2).sum() / dim
        eye = torch.eye(dim, dtype=torch.float64)
        stacked_x = torch.cat([h_out, strength.sqrt() * eye])
        stacked_y = torch.cat([h_in, strength.sqrt() * eye])
        expected = torch.linalg.lstsq(stacked_x, stacked_y).solution.T
        torch.testing.assert_close(layer.toast_down["default"].weight.double(), expected, rtol=1e-4, atol=1e-5)


def test_streaming_equals_one_batch():
    base = make_vit()
    batches = [make_inputs("vit", batch=2, seed=seed) for seed in range(4)]
    one_batch = [{"pixel_values": torch.cat([batch["pixel_values"] for batch in batches])}]
    streamed = get_peft_model(base, ToastConfig())
    calibrate_feedback(streamed, batches, progress=False)
    streamed_weights = [
        layer.toast_down["default"].weight.clone() for layer in streamed.base_model.toast_layers("default")
    ]
    whole = get_peft_model(streamed.unload(), ToastConfig())
    calibrate_feedback(whole, one_batch, progress=False)
    for weight, layer in zip(streamed_weights, whole.base_model.toast_layers("default")):
        # Float32 products summed in another order: equal up to float32 rounding.
        torch.testing.assert_close(weight, layer.toast_down["default"].weight, rtol=1e-4, atol=1e-5)


def test_one_statistics_pass_calibrates_several_adapters():
    base = make_vit()
    batches = [make_inputs("vit", batch=4, seed=seed) for seed in range(2)]
    full = get_peft_model(copy.deepcopy(base), ToastConfig())
    statistics = collect_block_statistics(full, batches, progress=False)
    for fields in ({}, {"feedback_rank": 2}, {"lite_rank": 2}):
        from_statistics = get_peft_model(copy.deepcopy(base), ToastConfig(**fields))
        from_batches = get_peft_model(copy.deepcopy(base), ToastConfig(**fields))
        calibrate_feedback(from_statistics, statistics=statistics, progress=False)
        calibrate_feedback(from_batches, batches, progress=False)
        for a, b in zip(_maps(from_statistics).values(), _maps(from_batches).values()):
            torch.testing.assert_close(a, b)
        assert reconstruction_error(from_statistics, statistics=statistics) == pytest.approx(
            reconstruction_error(from_batches, batches), rel=1e-6
        )
    with pytest.raises(ValueError, match="either `batches`"):
        calibrate_feedback(full, batches, statistics=statistics)
    with pytest.raises(ValueError, match="pass `autocast_dtype` to `collect_block_statistics`"):
        calibrate_feedback(full, statistics=statistics, autocast_dtype=torch.bfloat16)
    top_only = get_peft_model(copy.deepcopy(base), ToastConfig(layers_to_transform=[-1]))
    partial = collect_block_statistics(top_only, batches, progress=False)
    with pytest.raises(ValueError, match="down-maps in blocks"):
        calibrate_feedback(full, statistics=partial)


def test_padding_tokens_are_excluded():
    """A right-padded batch gives the statistics of its sequences without their padding, whatever the padding holds."""
    base = make_llama()
    model = get_peft_model(base, ToastConfig())
    padded = make_inputs("llama", batch=3, seq=7, seed=1)
    lengths = [7, 3, 5]
    for row, length in enumerate(lengths):
        padded["attention_mask"][row, length:] = 0
    garbage = copy.deepcopy(padded)
    garbage["input_ids"][padded["attention_mask"] == 0] = 50  # other token ids in the padding
    unpadded = [
        {
            "input_ids": padded["input_ids"][row : row + 1, :length],
            "attention_mask": torch.ones(1, length, dtype=torch.long),
        }
        for row, length in enumerate(lengths)
    ]
    statistics = [
        collect_block_statistics(model, batches, progress=False) for batches in ([padded], [garbage], unpadded)
    ]
    for index in statistics[0]:
        assert statistics[0][index].num_tokens == sum(lengths)
        for other in statistics[1:]:
            torch.testing.assert_close(statistics[0][index].gram, other[index].gram, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(statistics[0][index].cross, other[index].cross, rtol=1e-5, atol=1e-6)


def test_float32_products_in_chunks_match_float64_sums():
    """`BlockStatistics.add` multiplies float32 tokens in float32 chunks and sums the chunks in float64: the result is
    the float64 statistic up to float32 rounding whatever the chunking, and float64 tokens are summed exactly."""
    generator = torch.Generator().manual_seed(0)
    h_in = torch.randn(1000, 16, generator=generator, dtype=torch.float64) * 30 + 5  # large, off-centre values
    h_out = h_in @ torch.randn(16, 16, generator=generator, dtype=torch.float64) + 1
    exact = {"gram": h_out.T @ h_out, "cross": h_in.T @ h_out, "target_energy": (h_in**2).sum()}
    float64 = BlockStatistics.zeros(16)
    float64.add(h_in, h_out, chunk_size=7)  # float64 inputs: one float64 product, the chunk size does not apply
    for name, value in exact.items():
        torch.testing.assert_close(getattr(float64, name), value, rtol=1e-12, atol=0)
    for chunk_size in (1, 7, 333, 4096):
        chunked = BlockStatistics.zeros(16)
        chunked.add(h_in.float(), h_out.float(), chunk_size=chunk_size)
        assert chunked.num_tokens == 1000 and chunked.gram.dtype == torch.float64
        for name, value in exact.items():
            torch.testing.assert_close(getattr(chunked, name), value, rtol=1e-5, atol=1e-6 * value.abs().max().item())


def test_products_ignore_an_enclosing_autocast():
    """The hooks of an autocast calibration pass run inside `torch.autocast`: the products must still be float32 (in
    bfloat16 the Gram matrix of ill-conditioned hidden states came out indefinite and the solve failed)."""
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(500, 64, generator=generator) * torch.logspace(0, 3, 64)  # channel scales 1..1000
    plain, autocast = BlockStatistics.zeros(64), BlockStatistics.zeros(64)
    plain.add(h, h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast.add(h, h)
    torch.testing.assert_close(autocast.gram, plain.gram, rtol=0, atol=0)
    assert torch.linalg.eigvalsh(autocast.gram).min() > 0


@pytest.mark.parametrize("kind", sorted(CASES))
def test_autocast_pass_gives_nearly_the_float32_statistics(kind):
    """`autocast_dtype=torch.bfloat16` runs the pass in bfloat16: statistics within bfloat16 rounding of the float32
    ones, and the calibrated maps nearly as good on the float32 hidden states."""
    base, batches, _ = _case(kind)
    model = get_peft_model(base, ToastConfig())
    float32 = collect_block_statistics(model, batches, progress=False)
    bfloat16 = collect_block_statistics(model, batches, progress=False, autocast_dtype=torch.bfloat16)
    for index, statistics in float32.items():
        assert bfloat16[index].num_tokens == statistics.num_tokens
        assert bfloat16[index].gram.dtype == torch.float64
        relative = (bfloat16[index].gram - statistics.gram).norm() / statistics.gram.norm()
        assert 0 < relative < 0.05  # bfloat16 rounding happened, and is small
    identity = reconstruction_error(model, statistics=float32)
    calibrate_feedback(model, statistics=float32, progress=False)
    best = reconstruction_error(model, statistics=float32)
    calibrate_feedback(model, batches, progress=False, autocast_dtype=torch.bfloat16)
    from_bfloat16 = reconstruction_error(model, statistics=float32)
    assert best <= from_bfloat16 < best + 0.1 * (identity - best)


def _loss(h_out, h_in, weight):
    return ((h_out @ weight.T - h_in) ** 2).mean().item()


def _block_statistics(h_out, h_in):
    statistics = BlockStatistics.zeros(h_out.shape[1])
    statistics.add(h_in, h_out)
    return statistics


@pytest.mark.parametrize("kind", sorted(CASES))
def test_low_rank_calibration_is_the_best_rank_r_map(kind):
    base, batches, tokens = _case(kind)
    rank, ridge = 3, 1e-3
    model = get_peft_model(base, ToastConfig(feedback_rank=rank))
    calibrate_feedback(model, batches, ridge=ridge, progress=False)

    generator = torch.Generator().manual_seed(0)
    for layer in model.base_model.toast_layers("default"):
        h_out, h_in = tokens[layer.block_index]
        dim = h_out.shape[1]
        eye = torch.eye(dim, dtype=torch.float64)
        calibrated = layer.toast_down["default"].effective_weight().double().detach()

        # Independent reduced-rank regression: symmetric square root instead of a Cholesky factor.
        gram = h_out.T @ h_out
        regularised = gram + ridge * gram.trace() / dim * eye
        values, vectors = torch.linalg.eigh(regularised)
        root, inverse_root = (vectors * values.sqrt()) @ vectors.T, (vectors / values.sqrt()) @ vectors.T
        full_correction = (h_in - h_out).T @ h_out @ torch.linalg.inv(regularised)  # D* (d, d)
        left, singular, right = torch.linalg.svd(full_correction @ root)
        expected = eye + (left[:, :rank] * singular[:rank]) @ right[:rank] @ inverse_root
        torch.testing.assert_close(calibrated, expected, rtol=1e-4, atol=1e-5)

        # It beats the plain truncated SVD of the full-rank correction and random rank-r perturbations of itself.
        loss = _loss(h_out, h_in, calibrated)
        left, singular, right = torch.linalg.svd(full_correction)
        truncated = eye + (left[:, :rank] * singular[:rank]) @ right[:rank]
        assert loss <= _loss(h_out, h_in, truncated) + 1e-12
        u, v = layer.toast_down["default"].u.double().detach(), layer.toast_down["default"].v.double().detach()
        for _ in range(5):
            du = 1e-2 * torch.randn(u.shape, generator=generator, dtype=torch.float64)
            assert loss <= _loss(h_out, h_in, eye + (u + du) @ v) + 1e-12
        # Full rank as the limit: rank d gives the full-rank solution.
        statistics = _block_statistics(h_out, h_in)
        u_full, v_full = reduced_rank_map(statistics, dim, ridge)
        torch.testing.assert_close(eye + u_full @ v_full, least_squares_map(statistics, ridge))


def test_lite_calibration_writes_the_frozen_map_and_zero_deltas():
    base = make_vit()
    batches = [make_inputs("vit", batch=4, seed=seed) for seed in range(2)]
    tokens = _direct_tokens(base, batches)
    model = get_peft_model(base, ToastConfig(lite_rank=2))
    calibrate_feedback(model, batches, progress=False)
    for layer in model.base_model.toast_layers("default"):
        down = layer.toast_down["default"]
        expected = least_squares_map(_block_statistics(*tokens[layer.block_index]))
        assert "weight" in dict(down.named_buffers())
        torch.testing.assert_close(down.weight.double(), expected, rtol=1e-4, atol=1e-5)
        assert torch.count_nonzero(down.delta_u) == 0
        torch.testing.assert_close(down.effective_weight(), down.weight)


def _model_variational_loss(model, batch) -> float:
    """The variational loss as the model computes it in a training forward (`toast_variational_loss`)."""
    model.base_model.peft_config["default"].variational_loss_weight = 1.0
    model.train()
    with torch.no_grad():
        return model(**batch)["toast_variational_loss"].item()


@pytest.mark.parametrize("kind", sorted(CASES))
def test_calibrated_loss_beats_identity_beats_random(kind):
    factory = CASES[kind][0]
    calibration = [make_inputs(kind, batch=8, seq=16, seed=seed) for seed in range(4)]  # enough tokens not to overfit
    held_out = make_inputs(kind, batch=4, seq=7, seed=10)
    losses = {}
    for name, config in {
        "calibrated": ToastConfig(),
        "identity": ToastConfig(),
        "random": ToastConfig(down_init="reference"),
    }.items():
        torch.manual_seed(0)
        model = get_peft_model(factory(), config)
        if name == "calibrated":
            calibrate_feedback(model, calibration, progress=False)
        losses[name] = _model_variational_loss(model, held_out)
        # Our streamed evaluation is the model's own variational loss (no padding here).
        assert reconstruction_error(model, [held_out]) == pytest.approx(losses[name], rel=1e-4)
    assert losses["calibrated"] < losses["identity"] < losses["random"]


# --------------------------------------------------------------------------------------------- CLI and reloading


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "the a cat dog sat ran on under mat log and quickly slowly red blue".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, **{word: i + 2 for i, word in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture
def tiny_llama_folder(tmp_path):
    folder = tmp_path / "tiny-llama"
    make_llama().save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    text = tmp_path / "calibration.txt"
    text.write_text(
        "\n".join(
            ["the cat sat on the mat", "a dog ran", "the red dog sat under a blue log and the cat ran quickly"] * 4
        )
    )
    return folder, text


def test_cli_writes_a_loadable_calibrated_adapter(tiny_llama_folder, tmp_path):
    folder, text = tiny_llama_folder
    output = tmp_path / "calibrated"
    args = [
        "--model",
        str(folder),
        "--data",
        str(text),
        "--num-samples",
        "9",
        "--batch-size",
        "4",
        "--output",
        str(output),
    ]
    result = main([*args, "--feedback-rank", "2"])
    assert json.loads((output / "adapter_config.json").read_text())["feedback_rank"] == 2
    assert result.loss_after < result.loss_before

    loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(folder), output)
    # The same calibration in-process, on the same batches (9 lines: padding in every batch of 4).
    torch.manual_seed(0)
    expected = get_peft_model(LlamaForCausalLM.from_pretrained(folder), ToastConfig(feedback_rank=2))
    lines = text.read_text().splitlines()[:9]
    calibrate_feedback(expected, make_batches(lines, _tiny_tokenizer(), batch_size=4), progress=False)
    for got, want in zip(loaded.base_model.toast_layers("default"), expected.base_model.toast_layers("default")):
        torch.testing.assert_close(
            got.toast_down["default"].effective_weight(), want.toast_down["default"].effective_weight()
        )


def test_cli_autocast_option(tiny_llama_folder, tmp_path):
    folder, text = tiny_llama_folder
    args = ["--model", str(folder), "--data", str(text), "--num-samples", "9", "--batch-size", "4"]
    float32 = main([*args, "--output", str(tmp_path / "float32")])
    bfloat16 = main([*args, "--output", str(tmp_path / "bf16"), "--autocast", "bf16"])
    # The bfloat16 pass measures the loss on bfloat16 hidden states: close to, not equal to, the float32 figures.
    assert bfloat16.loss_after < bfloat16.loss_before
    assert bfloat16.loss_before != float32.loss_before
    assert bfloat16.loss_before == pytest.approx(float32.loss_before, rel=0.05)
    assert (tmp_path / "bf16" / "adapter_model.safetensors").is_file()
    with pytest.raises(SystemExit):
        main([*args, "--output", str(tmp_path / "bad"), "--autocast", "int8"])


def _maps(model) -> dict[tuple[int, str], torch.Tensor]:
    return {
        (layer.block_index, kind): getattr(layer, kind)["default"].effective_weight().detach().clone()
        for layer in model.base_model.toast_layers("default")
        for kind in ("toast_down", "toast_readout")
        if "default" in getattr(layer, kind)
    }


def _assert_same_maps(model, reference) -> None:
    got, expected = _maps(model), _maps(reference)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])


@pytest.fixture
def calibrated_vit_backbone(tmp_path):
    """A calibrated (and then perturbed, so that every tensor is distinctive) adapter on a headless `ViTModel`."""
    backbone = make_vit(with_head=False)
    model = get_peft_model(copy.deepcopy(backbone), ToastConfig(variational_loss_weight=0.1))
    calibrate_feedback(model, [make_inputs("vit", batch=4)], progress=False)
    with torch.no_grad():
        for layer in model.base_model.toast_layers("default"):
            layer.toast_readout["default"].weight.normal_(std=0.1)
        model.base_model.toast_prompt["default"].normal_()
    model.save_pretrained(tmp_path / "adapter")
    return backbone, model, tmp_path / "adapter"


def test_load_initialisation_starts_a_new_head_from_a_backbone_adapter(calibrated_vit_backbone):
    backbone, saved, folder = calibrated_vit_backbone
    new_task = make_vit(num_labels=5)
    new_task.vit.load_state_dict(backbone.state_dict(), strict=False)
    head_before = new_task.classifier.weight.detach().clone()
    model = load_initialisation(new_task, folder)
    assert model.peft_config["default"].variational_loss_weight == 0.0  # transfer: pre-tuning's loss is off

    _assert_same_maps(model, saved)
    torch.testing.assert_close(model.base_model.toast_prompt["default"], saved.base_model.toast_prompt["default"])
    # A fresh 5-class head, trained and saved with the adapter.
    head = model.base_model.model.classifier
    assert head.modules_to_save["default"].weight.shape == (5, 32)
    torch.testing.assert_close(head.modules_to_save["default"].weight, head_before)
    assert head.modules_to_save["default"].weight.requires_grad
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert any("toast_down" in name for name in trainable) and any("toast_readout" in name for name in trainable)


def test_load_initialisation_options(calibrated_vit_backbone):
    backbone, saved, folder = calibrated_vit_backbone
    fresh = load_initialisation(make_vit(), folder, fresh_prompt=True, fresh_readout=True, train_down=False)
    # prompt_init="data": a fresh prompt is zero, to be set from the new task's first batch.
    assert torch.count_nonzero(fresh.base_model.toast_prompt["default"]) == 0
    assert torch.count_nonzero(saved.base_model.toast_prompt["default"]) > 0
    for (index, kind), weight in _maps(fresh).items():
        if kind == "toast_readout":
            assert torch.count_nonzero(weight) == 0  # readout_init="zero": the new task starts at the frozen model
        else:
            torch.testing.assert_close(weight, _maps(saved)[index, kind])
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if "toast_down" in n)

    # TOAST-Lite from full-rank maps: the saved maps become the frozen weights, the deltas start at zero.
    lite = load_initialisation(make_vit(), folder, lite_rank=2)
    for (index, kind), weight in _maps(saved).items():
        layer = next(layer for layer in lite.base_model.toast_layers("default") if layer.block_index == index)
        torch.testing.assert_close(getattr(layer, kind)["default"].weight, weight)
        assert torch.count_nonzero(getattr(layer, kind)["default"].delta_u) == 0

    with pytest.raises(ValueError, match="Calibrate with `feedback_rank=2`"):
        load_initialisation(make_vit(), folder, feedback_rank=2)


def test_load_initialisation_from_a_causal_lm_into_a_classifier(tiny_llama_folder, tmp_path):
    folder, text = tiny_llama_folder
    output = tmp_path / "calibrated"
    main(["--model", str(folder), "--data", str(text), "--num-samples", "6", "--output", str(output)])
    saved = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(folder), output)
    with expected_load_report():  # the new head
        classifier = LlamaForSequenceClassification.from_pretrained(folder, num_labels=2)
    model = load_initialisation(classifier, output)
    _assert_same_maps(model, saved)
    assert model.base_model.model.score.modules_to_save["default"].weight.shape == (2, 32)


def test_calibration_leaves_the_model_as_it_was():
    """Training mode, adapters, readouts and outputs are untouched apart from the down-maps."""
    model = get_peft_model(make_vit(), ToastConfig())
    model.train()
    readouts = {k: v for k, v in _maps(model).items() if k[1] == "toast_readout"}
    calibrate_feedback(model, [make_inputs("vit")], progress=False)
    assert model.training
    assert model.base_model.active_toast_adapter() == "default"
    for key, weight in readouts.items():
        torch.testing.assert_close(_maps(model)[key], weight)


def test_singular_gram_without_ridge_raises_a_clear_error():
    model = get_peft_model(make_vit(), ToastConfig())
    with pytest.raises(ValueError, match="larger `ridge`"):
        calibrate_feedback(model, [make_inputs("vit", batch=1)], ridge=0.0, progress=False)  # 17 tokens, d = 32


def test_vision_cli_end_to_end(tmp_path):
    """`--data fashion-mnist` through an image processor, on a tiny ViT saved to a folder."""
    folder = tmp_path / "tiny-vit"
    make_vit(with_head=False).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(folder)
    output = tmp_path / "calibrated"
    result = main(
        [
            "--model",
            str(folder),
            "--data",
            "fashion-mnist",
            "--num-samples",
            "8",
            "--lite-rank",
            "2",
            "--output",
            str(output),
        ]
    )
    loaded = PeftModel.from_pretrained(ViTModel.from_pretrained(folder), output)
    assert result.num_tokens == 8 * 17
    for layer in loaded.base_model.toast_layers("default"):
        assert not torch.equal(layer.toast_down["default"].weight, torch.eye(32))


def test_offline_text_data_are_tweets_and_whole_news_articles():
    from peft_toast.assets import load_bbc_news

    articles = load_examples("bbc-news", 6, seed=1)
    assert articles == list(load_bbc_news("article", limit=6, seed=1)["train"]["text"])
    assert len(set(articles)) == 6 and all(article.count("\n") >= 2 for article in articles)  # headline, blank, body
    assert load_examples("bbc-news", 3, split="test") != articles[:3]
    tweets = load_examples("tweets", 6)
    assert len(tweets) == 6 and all(isinstance(tweet, str) and "\n" not in tweet for tweet in tweets)


def test_load_initialisation_can_keep_the_saved_head(tmp_path):
    saved = get_peft_model(make_vit(), ToastConfig())
    with torch.no_grad():
        saved.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    saved.save_pretrained(tmp_path / "adapter")
    model = load_initialisation(make_vit(), tmp_path / "adapter", new_head=False)
    torch.testing.assert_close(
        model.base_model.model.classifier.modules_to_save["default"].weight,
        saved.base_model.model.classifier.modules_to_save["default"].weight,
    )


@pytest.mark.slow
def test_cli_calibrates_the_real_dinov2(tmp_path):
    """The offline DINOv2-S: calibration removes almost all of the identity maps' variational loss, and the adapter
    loads onto the backbone class the CLI used."""
    from peft_toast.assets import dinov2_small_vit_path

    output = tmp_path / "calibrated"
    result = main(["--model", "dinov2-small", "--data", "fashion-mnist", "--num-samples", "64", "--batch-size", "32",
                   "--feedback-rank", "8", "--output", str(output)])  # fmt: skip
    assert result.num_tokens == 64 * 65  # 112 px: 8 x 8 patches + CLS
    assert result.loss_after < 0.2 * result.loss_before
    path = dinov2_small_vit_path()
    loaded = PeftModel.from_pretrained(ViTModel.from_pretrained(path), output)
    identity = get_peft_model(ViTModel.from_pretrained(path), ToastConfig())
    processor = ViTImageProcessorPil.from_pretrained(path)
    held_out = list(make_batches(load_examples("fashion-mnist", 16, split="test"), processor, batch_size=16))
    assert reconstruction_error(loaded, held_out) < 0.2 * reconstruction_error(identity, held_out)


def test_low_rank_factors_are_balanced_and_independent_of_the_data_scale():
    """Each rank-1 term of U V has equal factor norms, whatever the number of calibration tokens (repeating the data
    scales G and C but not the map)."""
    generator = torch.Generator().manual_seed(0)
    h_out = torch.randn(200, 16, generator=generator, dtype=torch.float64)
    h_in = h_out @ torch.randn(16, 16, generator=generator, dtype=torch.float64) * 0.3 + h_out
    once, ten_times = _block_statistics(h_out, h_in), _block_statistics(h_out.repeat(10, 1), h_in.repeat(10, 1))
    u, v = reduced_rank_map(once, 3)
    torch.testing.assert_close(u.norm(dim=0), v.norm(dim=1))
    for got, want in zip(reduced_rank_map(ten_times, 3), (u, v)):
        torch.testing.assert_close(got.abs(), want.abs())  # the SVD may flip signs of a pair
