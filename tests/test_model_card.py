"""The model card of a TOAST adapter: written by `save_pretrained` and `push_to_hub`, complete, idempotent, runnable,
and without effect on other PEFT methods."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest
import torch
import transformers
from conftest import NUM_LABELS, make_inputs, make_vit, randomize_adapter
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import EntryNotFoundError
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_toast import ToastConfig, load_toast_adapter
from peft_toast.model_card import (
    ADAPTER_PLACEHOLDER,
    SECTION_END,
    SECTION_START,
    adapter_parameter_counts,
    patch_peft_model,
)

TOAST_FIELDS = [
    field.name
    for field in dataclasses.fields(ToastConfig)
    if field.name not in {f.name for f in dataclasses.fields(PeftConfig)}
]


@pytest.fixture
def base_dir(tmp_path):
    """A tiny ViT saved to a folder, so that the card's loading code can load the base model back."""
    path = tmp_path / "tiny-vit"
    make_vit().save_pretrained(path)
    return path


def load_base(base_dir):
    return transformers.ViTForImageClassification.from_pretrained(base_dir).eval()


def toast_model(base_dir, config=None, seed=0):
    model = get_peft_model(load_base(base_dir), config or ToastConfig())
    randomize_adapter(model, seed=seed)
    return model.eval()


def read_card(folder) -> str:
    return (folder / "README.md").read_text()


def loading_code(card: str) -> str:
    """The first ```python block of the TOAST section."""
    section = card[card.index(SECTION_START) : card.index(SECTION_END)]
    return re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)


def logits(model, seed=0):
    with torch.no_grad():
        return model(**make_inputs("vit", seed=seed)).logits


def test_save_pretrained_writes_a_toast_card(base_dir, tmp_path):
    model = toast_model(base_dir, ToastConfig(layers_to_transform=[2, 3], feedback_rank=2))
    model.save_pretrained(tmp_path / "adapter")
    card = read_card(tmp_path / "adapter")
    metadata = ModelCard(card).data

    assert metadata.library_name == "peft"
    assert {"toast", "peft-toast"} <= set(metadata.tags)
    assert card.count(SECTION_START) == 1 and card.count(SECTION_END) == 1
    assert "## TOAST adapter" in card
    assert f"**Base model:** `{base_dir}` (`ViTForImageClassification`); a local folder" in card
    assert "import peft_toast" in loading_code(card)
    config = model.peft_config["default"]
    for name in TOAST_FIELDS:  # every TOAST setting, with its value
        assert f"| `{name}` | `{getattr(config, name)!r}` |" in card
    trainable, _ = model.get_nb_trainable_parameters()
    stored = sum(t.numel() for t in load_file(tmp_path / "adapter" / "adapter_model.safetensors").values())
    head = sum(p.numel() for p in model.get_base_model().classifier.modules_to_save["default"].parameters())
    assert f"**Parameters:** {trainable:,} trainable, {stored:,} stored, of which {head:,} in the task head" in card


def test_the_cards_loading_code_loads_the_adapter(base_dir, tmp_path):
    model = toast_model(base_dir)
    model.save_pretrained(tmp_path / "adapter")
    code = loading_code(read_card(tmp_path / "adapter"))
    assert f'from_pretrained("{base_dir}", num_labels={NUM_LABELS})' in code
    namespace = {}
    exec(code.replace(ADAPTER_PLACEHOLDER, str(tmp_path / "adapter")), namespace)
    loaded = namespace["model"].eval()
    assert isinstance(loaded.peft_config["default"], ToastConfig)
    torch.testing.assert_close(logits(loaded), logits(model))


def test_card_of_several_adapters_loads_each_from_its_subfolder(base_dir, tmp_path):
    model = toast_model(base_dir, seed=0)
    model.add_adapter("other", ToastConfig(feedback_rank=2))
    randomize_adapter(model, seed=1)  # both adapters differ from their initialisation
    expected = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        expected[name] = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    card = read_card(tmp_path / "adapter")
    assert "### Adapter `default` (at the top level)" in card
    assert "### Adapter `other` (in the subfolder `other`)" in card
    namespace = {}
    exec(loading_code(card).replace(ADAPTER_PLACEHOLDER, str(tmp_path / "adapter")), namespace)
    loaded = namespace["model"].eval()
    for name in ("default", "other"):
        loaded.set_adapter(name)
        torch.testing.assert_close(logits(loaded), expected[name])


def test_saving_again_replaces_the_section_and_keeps_other_text(base_dir, tmp_path):
    folder = tmp_path / "adapter"
    model = toast_model(base_dir)
    model.save_pretrained(folder)
    first = read_card(folder)
    model.save_pretrained(folder)
    assert read_card(folder) == first  # idempotent

    (folder / "README.md").write_text(
        first.replace("# Model Card for Model ID", "# Model Card for Model ID\n\nMy notes.")
    )
    model.peft_config["default"].cosine_eps = 1e-5  # a changed setting must show up, once
    model.save_pretrained(folder)
    card = read_card(folder)
    assert "My notes." in card
    assert card.count(SECTION_START) == 1
    assert "| `cosine_eps` | `1e-05` |" in card and "| `cosine_eps` | `1e-06` |" not in card


@pytest.mark.parametrize(
    "config",
    [
        ToastConfig(),
        ToastConfig(lite_rank=2, channel_selection="full"),
        ToastConfig(feedback_rank=2, train_down=False, channel_selection="low_rank"),
        ToastConfig(train_prompt=False, train_readout=False, layers_to_transform=[-1]),
    ],
    ids=["full", "lite", "low-rank-frozen-down", "frozen-prompt-and-readout"],
)
def test_parameter_counts_match_training_and_the_saved_file(base_dir, tmp_path, config):
    model = get_peft_model(load_base(base_dir), config)
    counts = adapter_parameter_counts(model, "default")
    assert counts["trainable"] == model.get_nb_trainable_parameters()[0]
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert counts["stored"] == sum(t.numel() for t in saved.values())
    # Loaded for inference nothing trains, but the card still reports how the adapter trains.
    loaded = PeftModel.from_pretrained(load_base(base_dir), tmp_path / "adapter")
    assert loaded.get_nb_trainable_parameters()[0] == 0
    assert adapter_parameter_counts(loaded, "default") == counts


def test_other_peft_methods_get_pefts_own_card(base_dir, tmp_path):
    lora = get_peft_model(load_base(base_dir), LoraConfig(target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "patched")
    PeftModel.create_or_update_model_card.__wrapped__(lora, str(tmp_path / "original"))  # PEFT's own method
    assert read_card(tmp_path / "patched") == read_card(tmp_path / "original")
    assert "toast" not in read_card(tmp_path / "patched").lower()


def test_patching_is_idempotent():
    wrapped = PeftModel.create_or_update_model_card
    upload = PeftModel._upload_modified_files
    patch_peft_model()
    patch_peft_model()
    assert PeftModel.create_or_update_model_card is wrapped and PeftModel._upload_modified_files is upload
    assert not hasattr(wrapped.__wrapped__, "__wrapped__")  # wrapped exactly once


class FakeHubApi:
    """Stands in for `huggingface_hub.HfApi` at the network boundary: records what `push_to_hub` would upload."""

    def __init__(self):
        self.uploaded: dict[str, bytes] = {}

    def create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, operations, **kwargs):
        for operation in operations:  # read now: push_to_hub deletes its temporary folder afterwards
            with open(operation.path_or_fileobj, "rb") as f:
                self.uploaded[operation.path_in_repo] = f.read()
        return f"https://huggingface.co/{repo_id}/commit/0"


@pytest.fixture
def fake_hub(monkeypatch):
    api = FakeHubApi()
    monkeypatch.setattr(transformers.utils.hub, "hf_api", lambda: api)
    return api


def existing_hub_card(text):
    """`ModelCard.load` for a Hub repository that has `text` as its card, or none (`text=None`); local files load as
    usual."""
    load_local = ModelCard.load

    def load(repo_id, **kwargs):
        if os.path.exists(repo_id):
            return load_local(repo_id, **kwargs)
        if text is None:
            raise EntryNotFoundError(f"{repo_id} has no README.md")
        return ModelCard(text)

    return load


@pytest.mark.parametrize("hub_card", [None, "---\nlicense: mit\n---\n# My adapter\n\nHand-written notes.\n"])
def test_push_to_hub_uploads_the_adapter_and_the_toast_card(base_dir, tmp_path, fake_hub, monkeypatch, hub_card):
    monkeypatch.setattr(transformers.utils.hub.ModelCard, "load", existing_hub_card(hub_card))
    model = toast_model(base_dir)
    model.push_to_hub("user/toast-vit")

    assert set(fake_hub.uploaded) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    card = fake_hub.uploaded["README.md"].decode()
    metadata = ModelCard(card).data
    assert metadata.library_name == "peft" and "toast" in metadata.tags
    assert card.count(SECTION_START) == 1
    assert 'PeftModel.from_pretrained(base, "user/toast-vit")' in loading_code(card)
    if hub_card is not None:  # what the repository's card already said is kept
        assert "Hand-written notes." in card and metadata.license == "mit"

    # The uploaded files load back: from a folder, and by Hub id through the same path (the download is the boundary).
    folder = tmp_path / "downloaded"
    folder.mkdir()
    for name, content in fake_hub.uploaded.items():
        (folder / name).write_bytes(content)
    expected = logits(model)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(load_base(base_dir), folder)), expected)
    downloads = []

    def snapshot_download(repo_id, **kwargs):
        downloads.append(repo_id)
        return str(folder)

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    torch.testing.assert_close(logits(load_toast_adapter(load_base(base_dir), "user/toast-vit")), expected)
    assert downloads == ["user/toast-vit"]


def test_a_card_without_a_title_gets_the_section_on_top(base_dir, tmp_path):
    from peft_toast.model_card import update_model_card

    folder = tmp_path / "adapter"
    folder.mkdir()
    ModelCard.from_template(
        ModelCardData(license="mit"), template_str="---\n{{ card_data }}\n---\nPlain text.\n"
    ).save(folder / "README.md")
    update_model_card(toast_model(base_dir), str(folder))
    card = read_card(folder)
    assert ModelCard(card).data.license == "mit"
    body = card.split("---", 2)[2].lstrip()
    assert body.startswith(SECTION_START) and "Plain text." in body


def test_trainer_model_card_keeps_the_toast_section(base_dir, tmp_path):
    """`Trainer.push_to_hub` writes its training card over README.md, then lets PEFT update it: TOAST's section too."""
    model = toast_model(base_dir)
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(tmp_path / "out", report_to=[]))
    trainer.save_model()
    trainer.create_model_card(model_name="toast-vit")
    card = read_card(tmp_path / "out")
    assert "toast-vit" in card and "Training procedure" in card  # the Trainer's card
    assert card.count(SECTION_START) == 1 and "import peft_toast" in loading_code(card)
