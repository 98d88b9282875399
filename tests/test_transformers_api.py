"""transformers' own adapter API over TOAST: `load_adapter`, `add_adapter`, `set_adapter`, `disable_adapters`,
`save_pretrained` and `pipeline` on a plain transformers model give exactly what the PeftModel path gives.

transformers 5.24 refuses `add_adapter`, `set_adapter`, `enable_adapters` / `disable_adapters`, `active_adapters` and
`get_adapter_state_dict` (so also `save_pretrained` of an adapter) for every PEFT method unless peft >= 0.22, which the
package registry of this project does not hold (0.21.2); `load_adapter` has no such gate. The `hf_adapter_api` fixture
lifts that version gate only where the installed peft is older, so these tests run transformers' real code paths
against the peft that is installed, and unchanged once peft 0.22 is.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_inputs, make_llama, make_vit, randomize_adapter
from packaging.version import Version
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import peft_toast
from peft_toast import ToastConfig

CONFIGS = {
    "full": {"prompt_init": "random"},
    "low-rank-channel": {"feedback_rank": 2, "channel_selection": "low_rank", "channel_rank": 3},
    "top-blocks": {"layers_to_transform": [2, 3], "channel_selection": "full"},
}


@pytest.fixture
def hf_adapter_api(monkeypatch):
    import peft
    import transformers.integrations.peft as hf_peft

    if Version(peft.__version__) < Version(hf_peft.MIN_PEFT_VERSION):
        monkeypatch.setattr(hf_peft, "check_peft_version", lambda **kwargs: None)


def _saved(base, tmp_path, name: str, seed: int, **config):
    """A randomised TOAST adapter made and saved through PEFT; returns (PeftModel in eval, folder)."""
    model = get_peft_model(copy.deepcopy(base), ToastConfig(**config))
    randomize_adapter(model, seed=seed)
    folder = tmp_path / name
    model.save_pretrained(folder)
    return model.eval(), folder


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("kind", ["vit", "llama"])
def test_load_adapter_equals_peft_model(kind, config, tmp_path):
    base = make_vit() if kind == "vit" else make_llama()
    inputs = make_inputs(kind)
    peft_model, folder = _saved(base, tmp_path, "adapter", seed=1, **CONFIGS[config])
    expected = _logits(peft_model, inputs)
    assert (expected - _logits(base, inputs)).abs().max() > 1e-3  # the adapter does change the outputs

    model = copy.deepcopy(base)
    info = model.load_adapter(str(folder))
    assert not info.missing_keys and not info.unexpected_keys
    torch.testing.assert_close(_logits(model, inputs), expected, rtol=0, atol=1e-6)
    assert not isinstance(model, PeftModel) and isinstance(model.toast, peft_toast.ToastSelection)


def test_load_adapter_generation_equals_peft_model(tmp_path):
    base = make_llama()
    peft_model, folder = _saved(base, tmp_path, "adapter", seed=1, channel_selection="low_rank", channel_rank=3)
    model = copy.deepcopy(base)
    model.load_adapter(str(folder))
    prompt = make_inputs("llama", batch=2, seq=5)
    settings = dict(
        max_new_tokens=6, do_sample=False, pad_token_id=1, return_dict_in_generate=True, output_scores=True
    )
    expected = peft_model.generate(**prompt, **settings)
    for use_cache in (True, False):
        got = model.generate(**prompt, **settings, use_cache=use_cache)
        assert torch.equal(got.sequences, expected.sequences)
        torch.testing.assert_close(torch.stack(got.scores), torch.stack(expected.scores), rtol=0, atol=1e-5)
    frozen = base.generate(**prompt, **settings)
    assert not torch.allclose(torch.stack(frozen.scores), torch.stack(expected.scores), atol=1e-3)


def test_pipeline_over_a_loaded_adapter(tmp_path):
    from PIL import Image
    from transformers import ViTImageProcessor, pipeline

    base = make_vit()
    peft_model, folder = _saved(base, tmp_path, "adapter", seed=3, prompt_init="random")
    model = copy.deepcopy(base)
    model.load_adapter(str(folder))
    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    image = Image.fromarray((torch.rand(16, 16, 3) * 255).to(torch.uint8).numpy())
    scores = pipeline("image-classification", model=model, image_processor=processor)(image, top_k=3)
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    expected = _logits(peft_model, {"pixel_values": pixel_values}).softmax(-1)[0]
    got = torch.tensor([next(s["score"] for s in scores if s["label"] == f"LABEL_{i}") for i in range(3)])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_set_adapter_and_disable_adapters_switch_exactly(tmp_path, hf_adapter_api):
    base = make_vit()
    inputs = make_inputs("vit")
    first, first_folder = _saved(base, tmp_path, "a", seed=1, **CONFIGS["full"])
    second, second_folder = _saved(base, tmp_path, "b", seed=2, **CONFIGS["low-rank-channel"])
    model = copy.deepcopy(base)
    model.load_adapter(str(first_folder), adapter_name="a")
    model.load_adapter(str(second_folder), adapter_name="b")
    # transformers made one tuner per adapter: only the newest runs the passes (one steering, not two).
    owners = [hook.__self__ for hook in model._forward_pre_hooks.values() if hasattr(hook, "__self__")]
    assert len(owners) == 1
    model.set_adapter("a")
    torch.testing.assert_close(_logits(model, inputs), _logits(first, inputs), rtol=0, atol=1e-6)
    model.set_adapter("b")
    torch.testing.assert_close(_logits(model, inputs), _logits(second, inputs), rtol=0, atol=1e-6)
    assert model.active_adapters() == ["b"]
    model.disable_adapters()
    assert torch.equal(_logits(model, inputs), _logits(base, inputs))
    model.enable_adapters()
    torch.testing.assert_close(_logits(model, inputs), _logits(second, inputs), rtol=0, atol=1e-6)


def test_transformers_save_pretrained_loads_with_peft(tmp_path, hf_adapter_api):
    base = make_llama()
    inputs = make_inputs("llama")
    peft_model, folder = _saved(base, tmp_path, "adapter", seed=4, **CONFIGS["top-blocks"])
    model = copy.deepcopy(base)
    model.load_adapter(str(folder))
    model.save_pretrained(tmp_path / "resaved")
    assert load_file(tmp_path / "resaved" / "adapter_model.safetensors").keys() == (
        load_file(folder / "adapter_model.safetensors").keys()
    )
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "resaved")
    torch.testing.assert_close(_logits(reloaded, inputs), _logits(peft_model, inputs), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["vit", "llama"])
def test_add_adapter_trains_like_get_peft_model(kind, hf_adapter_api):
    """The same parameters train, and three AdamW steps from the same (deterministic) start end at the same model."""
    base = make_vit() if kind == "vit" else make_llama()
    inputs = make_inputs(kind)
    labels = torch.tensor([0, 2]) if kind == "vit" else inputs["input_ids"]
    config = {"channel_selection": "low_rank", "channel_rank": 3}
    model, peft_model = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(0)  # the low-rank channel selection starts random
    model.add_adapter(ToastConfig(**config))
    torch.manual_seed(0)
    peft_model = get_peft_model(peft_model, ToastConfig(**config))
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    peft_trainable = sorted(
        name.removeprefix("base_model.model.") for name, p in peft_model.named_parameters() if p.requires_grad
    )
    assert trainable == peft_trainable
    assert "toast.toast_prompt.default" in trainable
    for each in (model, peft_model):
        each.train()
        optimizer = torch.optim.AdamW([p for p in each.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            each(**inputs, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        each.eval()
    got, expected = _logits(model, inputs), _logits(peft_model, inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert (got - _logits(base, inputs)).abs().max() > 1e-3


def test_adapter_files_of_version_0_1_still_load(tmp_path):
    """peft-toast 0.1 kept the prompt and channel selection on the tuner (`base_model.toast_prompt`); such files load
    through `PeftModel.from_pretrained` and `load_toast_adapter` as before."""
    base = make_llama()
    inputs = make_inputs("llama")
    peft_model, folder = _saved(base, tmp_path, "adapter", seed=5, channel_selection="low_rank", channel_rank=3)
    tensors = load_file(folder / "adapter_model.safetensors")
    legacy = {key.replace("base_model.model.toast.", "base_model."): value for key, value in tensors.items()}
    assert "base_model.toast_prompt" in legacy and "base_model.toast_channel.u" in legacy
    save_file(legacy, folder / "adapter_model.safetensors")
    expected = _logits(peft_model, inputs)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), folder)
    torch.testing.assert_close(_logits(reloaded, inputs), expected, rtol=0, atol=1e-6)
    checked = peft_toast.load_toast_adapter(copy.deepcopy(base), folder)
    torch.testing.assert_close(_logits(checked, inputs), expected, rtol=0, atol=1e-6)
