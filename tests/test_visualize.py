"""`peft_toast.visualize`: attention maps, gates and the numbers against independent computations; the figures."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import IMAGE, PATCH, make_inputs, make_llama, make_vit, randomize_adapter
from peft import get_peft_model

from peft_toast import ToastConfig, visualize

GRID = IMAGE // PATCH


def steered(base, task_type=None):
    """`base` with a TOAST adapter whose every tensor is random, so that it visibly changes the attention."""
    model = get_peft_model(base, ToastConfig(task_type=task_type, prompt_init="random"))
    randomize_adapter(model, std=0.5)
    return model.eval()


def reference_last_attention(model, inputs, query):
    """The last block's attention `(B, N)` of token `query[b]`, averaged over heads, from a separate eager model."""
    model = copy.deepcopy(model)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attention = model(**inputs, output_attentions=True).attentions[-1].mean(dim=1)  # (B, N, N)
    return attention[torch.arange(attention.shape[0]), query]


def test_image_maps_against_an_independent_computation():
    base = make_vit()
    frozen_copy = copy.deepcopy(base)
    model = steered(base)
    pixel_values = make_inputs("vit", batch=3)["pixel_values"]

    maps = visualize.image_attention_maps(model, pixel_values)

    for heatmap in (maps.frozen, maps.toast, maps.gates):
        assert heatmap.shape == (3, GRID, GRID)
    torch.testing.assert_close(maps.frozen.sum(dim=(1, 2)), torch.ones(3))
    torch.testing.assert_close(maps.toast.sum(dim=(1, 2)), torch.ones(3))
    # Frozen: the CLS row of the untouched model, over the patches, renormalised.
    cls_row = reference_last_attention(frozen_copy, {"pixel_values": pixel_values}, torch.zeros(3, dtype=torch.long))
    patches = cls_row[:, 1:] / cls_row[:, 1:].sum(dim=1, keepdim=True)
    torch.testing.assert_close(maps.frozen, patches.reshape(3, GRID, GRID))
    # Gates: cosine of the frozen model's final-norm output with the prompt, clipped to [0, 1].
    with torch.no_grad():
        features = frozen_copy.vit(pixel_values).last_hidden_state  # (B, N, d)
        prompt = model.base_model.toast_prompt["default"]
        gates = F.cosine_similarity(features, prompt.expand_as(features), dim=-1).clamp(0, 1)
    torch.testing.assert_close(maps.gates, gates[:, 1:].reshape(3, GRID, GRID))
    assert gates.max() > 0  # the comparison is not 0 == 0
    # TOAST changes the attention, and the model is back to its own attention implementation afterwards.
    assert (maps.toast - maps.frozen).abs().max() > 1e-3
    assert model.get_base_model().config._attn_implementation == base.config._attn_implementation == "sdpa"


def test_image_maps_of_a_top_block_adapter_equal_the_full_recomputation():
    """Steering only the top blocks (pass 2 starts there): the maps ask for every block's attentions, so pass 2 runs every
    block and the maps equal those of the same adapter with `share_lower_blocks=False`."""
    torch.manual_seed(0)
    model = get_peft_model(make_vit(), ToastConfig(prompt_init="random", layers_to_transform=[2, 3]))
    randomize_adapter(model, std=0.5)
    unshared = copy.deepcopy(model)
    unshared.peft_config["default"].share_lower_blocks = False
    pixel_values = make_inputs("vit", batch=3)["pixel_values"]
    maps = visualize.image_attention_maps(model.eval(), pixel_values)
    expected = visualize.image_attention_maps(unshared.eval(), pixel_values)
    for name in ("frozen", "toast", "gates"):
        torch.testing.assert_close(getattr(maps, name), getattr(expected, name), rtol=0, atol=0)
    assert (maps.toast - maps.frozen).abs().max() > 1e-4  # the adapter acts (the tiny ViT's attention is near uniform)


def test_text_comparison_reads_the_last_real_token():
    base = make_llama()
    frozen_copy = copy.deepcopy(base)
    model = steered(base, "CAUSAL_LM")
    inputs = make_inputs("llama", batch=2, seq=6)
    inputs["attention_mask"][1, 4:] = 0  # right padding: row 1 has 4 real tokens

    comparison = visualize.compare_attention(model, inputs)

    assert comparison.query_index.tolist() == [5, 3]
    for values in (comparison.frozen, comparison.toast, comparison.gates):
        assert values.shape == (2, 6)
    torch.testing.assert_close(comparison.frozen.sum(dim=1), torch.ones(2))
    torch.testing.assert_close(
        comparison.frozen, reference_last_attention(frozen_copy, inputs, comparison.query_index)
    )
    assert comparison.frozen[1, 4:].abs().max() == 0  # causal: nothing after the query token
    assert (comparison.toast - comparison.frozen).abs().max() > 1e-3
    # Gates: cosine of the last block's output (before the final norm) with the prompt, clipped to [0, 1].
    captured = []
    frozen_copy.model.layers[-1].register_forward_hook(lambda module, args, output: captured.append(output))
    with torch.no_grad():
        frozen_copy(**inputs)
    features = captured[0][0] if isinstance(captured[0], tuple) else captured[0]  # (B, N, d)
    prompt = model.base_model.toast_prompt["default"]
    gates = F.cosine_similarity(features, prompt.expand_as(features), dim=-1).clamp(0, 1)
    torch.testing.assert_close(comparison.gates, gates)
    assert gates.max() > 0


def test_toast_selection_needs_an_active_adapter():
    model = steered(make_vit())
    with model.disable_adapter(), pytest.raises(ValueError, match="no active TOAST adapter"):
        model.toast_selection(**make_inputs("vit"))


def test_entropy_mask_and_mass():
    uniform = torch.full((1, 4, 4), 1 / 16)
    peaked = torch.zeros(1, 4, 4)
    peaked[0, 1, 2] = 1.0
    torch.testing.assert_close(
        visualize.attention_entropy(torch.cat([uniform, peaked])), torch.tensor([math.log(16), 0.0])
    )

    images = torch.zeros(1, 8, 8)
    images[0, :4, 4:] = 1.0  # a bright top-right quadrant
    images[0, 4:6, :2] = 0.3  # a dim patch (mean 0.3): object at threshold 0.2, background at 0.5
    mask = visualize.object_mask(images, (4, 4), threshold=0.5)
    expected = torch.zeros(1, 4, 4, dtype=torch.bool)
    expected[0, :2, 2:] = True
    assert torch.equal(mask, expected)
    assert visualize.object_mask(images, (4, 4), threshold=0.2)[0, 2, 0]
    torch.testing.assert_close(visualize.attention_mass(uniform, mask), torch.tensor([4 / 16]))
    torch.testing.assert_close(visualize.attention_mass(peaked, mask), torch.tensor([1.0]))


def test_figures_are_written(tmp_path):
    model = steered(make_vit())
    pixel_values = make_inputs("vit", batch=2)["pixel_values"]
    maps = visualize.image_attention_maps(model, pixel_values)
    images = pixel_values.mean(dim=1).sigmoid()  # (B, H, W) in [0, 1]
    visualize.plot_image_attention(
        images, maps, tmp_path / "image.png", masks=visualize.object_mask(images, (GRID, GRID), 0.5), labels=["a", "b"]
    )

    llama = steered(make_llama(), "CAUSAL_LM")
    inputs = make_inputs("llama", batch=1, seq=5)
    visualize.plot_text_attention(list("abcde"), visualize.compare_attention(llama, inputs), tmp_path / "text.png")

    import matplotlib.image

    for name, min_width in (("image.png", 800), ("text.png", 500)):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width = matplotlib.image.imread(tmp_path / name).shape[:2]
        assert width >= min_width and height > 0


@pytest.mark.slow  # the real DINOv2-S and Fashion-MNIST
def test_example_trains_saves_and_visualises_from_the_saved_folder(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import visualize_attention

    results = visualize_attention.main(
        [
            "--train-steps",
            "2",
            "--train-size",
            "32",
            "--batch-size",
            "8",
            "--eval-size",
            "8",
            "--num-figure",
            "2",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert results["adapter"] == str(tmp_path / "adapter")
    assert "## TOAST adapter" in (tmp_path / "adapter" / "README.md").read_text()
    assert json.loads((tmp_path / "attention_vit.json").read_text()) == results
    assert (tmp_path / "attention_vit.png").read_bytes()[:4] == b"\x89PNG"
    assert results["images"] == 8 and results["patches"] == 64
    for name in ("entropy_frozen", "entropy_toast"):
        assert 0 < results[name] <= math.log(64)
    for name in ("mass_on_object_frozen", "mass_on_object_toast", "object_share_of_patches"):
        assert 0 < results[name] < 1
