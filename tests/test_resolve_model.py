"""`peft_toast.assets.resolve_model`, the one place that turns a model a user names into what `from_pretrained` loads,
and the command line, examples and benchmarks that go through it. The converters are mocked: nothing is built."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from peft_toast import assets, cli

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "benchmarks"))

import _models  # noqa: E402
import example_utils  # noqa: E402


@pytest.fixture
def converters(monkeypatch) -> list[tuple]:
    """The offline models' path functions replaced by stubs that record their calls and build nothing."""
    calls = []

    def dinov2_small_vit_path(image_size: int = 112) -> str:
        calls.append(("dinov2", image_size))
        return f"/cache/dinov2-{image_size}"

    def stub(name: str):
        def path() -> str:
            calls.append((name,))
            return f"/cache/{name}"

        return path

    monkeypatch.setattr(assets, "dinov2_small_vit_path", dinov2_small_vit_path)
    monkeypatch.setattr(assets, "smollm2_path", stub("smollm2"))
    monkeypatch.setattr(assets, "minilm_path", stub("minilm"))
    return calls


def test_short_names_map_to_their_converters(converters):
    assert assets.resolve_model("dinov2-small") == "/cache/dinov2-112"
    assert assets.resolve_model("dinov2-small", image_size=56) == "/cache/dinov2-56"
    assert assets.resolve_model("smollm2-135m", image_size=56) == "/cache/smollm2"  # the size is the vision model's
    assert assets.resolve_model("minilm") == "/cache/minilm"
    assert converters == [("dinov2", 112), ("dinov2", 56), ("smollm2",), ("minilm",)]
    assert set(assets.OFFLINE_MODELS) == {"dinov2-small", "smollm2-135m", "minilm"}


@pytest.mark.parametrize(
    "name", ["facebook/dinov2-small", "HuggingFaceTB/SmolLM2-135M", "gpt2", "dinov2", "minilm-l12"]
)
def test_hub_ids_and_unknown_short_names_pass_through(converters, name):
    assert assets.resolve_model(name) == name
    assert converters == []


def test_an_existing_folder_passes_through_even_with_a_short_name(converters, tmp_path, monkeypatch):
    assert assets.resolve_model(str(tmp_path)) == str(tmp_path)
    (tmp_path / "minilm").mkdir()
    monkeypatch.chdir(tmp_path)
    assert assets.resolve_model("minilm") == "minilm"
    assert converters == []


def test_none_is_the_default(converters):
    assert assets.resolve_model(None, default="smollm2-135m") == "/cache/smollm2"
    assert assets.resolve_model(None, default="dinov2-small", image_size=224) == "/cache/dinov2-224"
    assert assets.resolve_model(None, default="gpt2") == "gpt2"
    with pytest.raises(ValueError, match="Name a model: a folder, a Hub id or one of dinov2-small, smollm2-135m"):
        assets.resolve_model(None)


def test_command_line_examples_and_benchmarks_use_the_resolver(converters):
    assert cli.OFFLINE_MODELS is assets.OFFLINE_MODELS
    assert cli.resolve_model_path("dinov2-small") == "/cache/dinov2-112"
    assert cli.resolve_model_path("gpt2") == "gpt2"
    assert example_utils.image_model_path(None) == "/cache/dinov2-112"
    assert example_utils.causal_lm_path(None) == "/cache/smollm2"
    assert example_utils.causal_lm_path("gpt2") == "gpt2"
    assert _models.vision_model_path(None, 56) == "/cache/dinov2-56"
    assert _models.vision_model_path("minilm", 56) == "/cache/minilm"
    assert _models.text_model_path(None) == "/cache/smollm2"
    assert _models.text_model_path("gpt2") == "gpt2"
