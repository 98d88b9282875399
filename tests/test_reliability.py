"""Reliability and security (issue 7): bad input fails with the exact exception type and a message that names the fix,
nothing the project writes is lost in a crash, damaged or hostile adapters are refused, and nothing untrusted runs.

Each test is one row of the table in docs/reliability.md. Invalid `ToastConfig` values are covered field by field in
test_config.py, and unresolvable architectures and bad `target_modules` in test_architectures.py.
"""

from __future__ import annotations

import ast
import copy
import json
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import peft.peft_model
import pytest
import torch
from conftest import make_bert, make_gpt2, make_inputs, make_llama, make_mistral, make_vit, randomize_adapter
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_toast import ToastConfig, atomic_save_pretrained, check_adapter, load_toast_adapter
from peft_toast.io import atomic_directory, atomic_file
from peft_toast.state import current_state

REPO = Path(__file__).resolve().parents[1]
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


class Saved:
    """A randomised TOAST adapter of a tiny ViT classifier saved in `path`, with an untouched copy of its base model."""

    def __init__(self, root: Path, **factory_kwargs):
        base = make_vit(**factory_kwargs)
        self.base = copy.deepcopy(base)
        self.model = get_peft_model(base, ToastConfig())
        randomize_adapter(self.model)
        self.path = root / "adapter"
        self.model.save_pretrained(self.path)
        self.inputs = make_inputs("vit")
        with torch.no_grad():
            self.logits = self.model(**self.inputs).logits

    def fresh_base(self):
        return copy.deepcopy(self.base)

    def logits_of(self, model) -> torch.Tensor:
        with torch.no_grad():
            return model(**self.inputs).logits

    def edit_config(self, **changes) -> None:
        data = json.loads((self.path / CONFIG).read_text())
        data.update(changes)
        (self.path / CONFIG).write_text(json.dumps({k: v for k, v in data.items() if v is not _DROP}))

    def files(self) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(self.path.iterdir())}


_DROP = object()


@pytest.fixture
def saved(tmp_path) -> Saved:
    return Saved(tmp_path)


@pytest.mark.parametrize(
    "layers, message",
    [
        ([7], r"lists blocks \[7\] but this model has 4 blocks \(valid indices: 0..3, or -4..-1 from the top\)"),
        ([0, -4], r"names the same block twice \(e.g. as i and i - 4\). List each block once."),
    ],
    ids=["out-of-range", "same-block-twice"],
)
def test_layers_to_transform_that_the_model_does_not_have(layers, message):
    with pytest.raises(ValueError, match=message):
        get_peft_model(make_vit(), ToastConfig(layers_to_transform=layers))


# ------------------------------------------------------------------------------------- adapter onto another base


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hidden_size": 48}, r"hidden_size 32 in the adapter vs 48 in the base model"),
        ({"num_hidden_layers": 6}, r"num_blocks 4 in the adapter vs 6 in the base model"),
        ({"num_hidden_layers": 2}, r"num_blocks 4 in the adapter vs 2 in the base model"),
        ({"num_attention_heads": 8}, r"num_attention_heads 4 in the adapter vs 8 in the base model"),
    ],
    ids=["hidden-size", "deeper", "shallower", "heads"],
)
def test_adapter_onto_a_base_of_other_dimensions(saved, changes, message):
    with pytest.raises(ValueError, match=message + r".*Load it onto the model it was made for"):
        load_toast_adapter(make_vit(**changes), saved.path)


def test_adapter_onto_a_base_with_other_num_labels(saved):
    with pytest.raises(ValueError, match=r"trained for 3 labels: create the base model with `num_labels=3`"):
        load_toast_adapter(make_vit(num_labels=5), saved.path)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hidden_size": 48}, r"hidden size 32 in the adapter vs 48 in the base model"),
        ({"num_hidden_layers": 6}, r"4 tensor\(s\) the base model needs are missing from the adapter"),
        ({"num_hidden_layers": 2}, r"4 tensor\(s\) in the adapter have no place on the base model"),
    ],
    ids=["hidden-size", "deeper", "shallower"],
)
def test_adapter_without_recorded_dims_is_checked_by_its_tensor_shapes(saved, changes, message):
    saved.edit_config(base_model_dims=_DROP)  # as written by an earlier version
    with pytest.raises(ValueError, match=message + r".*load it onto the model it was made for"):
        load_toast_adapter(make_vit(**changes), saved.path)


@pytest.mark.parametrize(
    "changes, mismatch",
    [
        ({"num_attention_heads": 8}, "num_attention_heads 4 in the adapter vs 8"),
        ({"num_hidden_layers": 2}, "num_blocks 4"),
    ],
    ids=["heads", "shallower"],
)
def test_plain_peft_loading_onto_another_base_warns(saved, changes, mismatch):
    # Every tensor fits (heads) or the extra ones are dropped (shallower): PEFT alone loads these without a word.
    with pytest.warns(UserWarning, match=rf"made for a different base model \({mismatch}.*load_toast_adapter"):
        PeftModel.from_pretrained(make_vit(**changes), saved.path)


def test_helper_loads_the_right_base_exactly(saved):
    assert torch.equal(saved.logits_of(load_toast_adapter(saved.fresh_base(), saved.path)), saved.logits)


@pytest.mark.parametrize(
    "settings",
    [
        {"feedback_rank": 2},
        {"lite_rank": 2},
        {"channel_selection": "low_rank", "channel_rank": 2},
        {"channel_selection": "full", "layers_to_transform": [2, 3]},
    ],
    ids=lambda settings: ",".join(settings),
)
def test_helper_loads_every_adapter_layout_exactly(tmp_path, settings):
    """The shape check derives what to expect from the tuner itself, so no valid layout is refused."""
    base = make_llama()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, ToastConfig(task_type="CAUSAL_LM", **settings))
    randomize_adapter(model)
    model.save_pretrained(tmp_path)
    inputs = make_inputs("llama")
    with torch.no_grad():
        assert torch.equal(load_toast_adapter(reference, tmp_path)(**inputs).logits, model(**inputs).logits)


def test_helper_loads_a_named_adapter_from_a_subfolder(saved):
    base = saved.fresh_base()
    saved.model.add_adapter("other", ToastConfig())
    randomize_adapter(saved.model, seed=3)
    saved.model.set_adapter("other")
    saved.model.save_pretrained(saved.path, selected_adapters=["other"])
    loaded = load_toast_adapter(base, saved.path, adapter_name="other", subfolder="other")
    assert loaded.active_adapters == ["other"]
    assert torch.equal(saved.logits_of(loaded), saved.logits_of(saved.model))


def test_helper_refuses_a_peft_model(saved):
    with pytest.raises(ValueError, match=r"Pass the base model, not a PeftModel.*load_adapter\(path, adapter_name="):
        load_toast_adapter(saved.model, saved.path)


# ----------------------------------------------------------------------------------------- adapter_config.json


@pytest.mark.parametrize(
    "peft_type, message",
    [
        ("FOO", r"has the unknown `peft_type` 'FOO'. A TOAST adapter's config says \"peft_type\": \"TOAST\""),
        (
            "LORA",
            r"is a LORA adapter, not a TOAST adapter. Load it with `PeftModel.from_pretrained\(base_model, path\)`",
        ),
        ("toast", r"has the unknown `peft_type` 'toast'"),
        (_DROP, r"has no `peft_type`, so it is not a PEFT adapter config.*save the adapter again"),
    ],
    ids=["unknown", "other-method", "lower-case", "missing"],
)
def test_config_with_a_wrong_peft_type(saved, peft_type, message):
    saved.edit_config(peft_type=peft_type)
    with pytest.raises(ValueError, match=message):
        load_toast_adapter(saved.fresh_base(), saved.path)


def test_config_of_another_method_is_not_loaded_as_toast(tmp_path):
    lora = get_peft_model(make_vit(), LoraConfig(target_modules=["v_proj"]))
    lora.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is a LORA adapter, not a TOAST adapter"):
        check_adapter(tmp_path)


@pytest.mark.parametrize(
    "field, value",
    [("feedback_rank", "4"), ("channel_selection", 3), ("layers_to_transform", "0,1"), ("cosine_eps", 0)],
)
def test_config_with_wrong_types_is_refused_before_use_on_both_paths(saved, field, value):
    saved.edit_config(**{field: value})
    with pytest.raises(ValueError, match=f"`{field}` must be"):
        load_toast_adapter(saved.fresh_base(), saved.path)
    with pytest.raises(ValueError, match=f"`{field}` must be"):
        PeftModel.from_pretrained(saved.fresh_base(), saved.path)


def test_config_that_is_not_json(saved):
    (saved.path / CONFIG).write_text('{"peft_type": "TOAST", ')  # cut short
    with pytest.raises(ValueError, match=r"is not valid JSON .*Save the adapter again or download it again"):
        load_toast_adapter(saved.fresh_base(), saved.path)


def test_config_with_unknown_fields_warns_and_loads(saved):
    saved.edit_config(gate_temperature=0.5)
    with pytest.warns(UserWarning, match=r"Unexpected keyword arguments \['gate_temperature'\]"):
        model = load_toast_adapter(saved.fresh_base(), saved.path)
    assert torch.equal(saved.logits_of(model), saved.logits)


# ------------------------------------------------------------------------------------------ damaged weights


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[:4],
        lambda data: data[:60],
        lambda data: data[:-1],
        lambda data: data[:-300],
        lambda data: data + bytes(8),  # safetensors refuses trailing bytes too ("file not fully covered")
    ],
    ids=["in-length", "in-header", "last-byte", "in-data", "padded"],
)
def test_truncated_safetensors_is_refused(saved, damage):
    (saved.path / WEIGHTS).write_bytes(damage((saved.path / WEIGHTS).read_bytes()))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors' is damaged or incomplete.*Save or download"):
        load_toast_adapter(saved.fresh_base(), saved.path)
    with pytest.raises(Exception, match="Error while deserializing header"):  # PEFT's own path refuses it too
        PeftModel.from_pretrained(saved.fresh_base(), saved.path)


def test_safetensors_with_a_garbled_header_is_refused(saved):
    data = bytearray((saved.path / WEIGHTS).read_bytes())
    data[8:20] = b"\xff" * 12
    (saved.path / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"is damaged or incomplete: its header is not readable"):
        load_toast_adapter(saved.fresh_base(), saved.path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(saved, value):
    tensors = load_file(saved.path / WEIGHTS)
    tensors["base_model.model.toast.toast_prompt"][3] = value
    save_file(tensors, saved.path / WEIGHTS)
    with pytest.raises(
        ValueError, match=r"holds NaN or infinite values in 1 tensor\(s\) \(base_model.model.toast.toast_prompt\)"
    ):
        load_toast_adapter(saved.fresh_base(), saved.path)


def test_weights_missing_a_tensor_are_refused(saved):
    # PEFT alone only warns ("Found missing adapter keys") and keeps a random prompt.
    tensors = load_file(saved.path / WEIGHTS)
    del tensors["base_model.model.toast.toast_prompt"]
    save_file(tensors, saved.path / WEIGHTS)
    with pytest.raises(
        ValueError, match=r"1 tensor\(s\) the base model needs are missing from the adapter \(base_model"
    ):
        load_toast_adapter(saved.fresh_base(), saved.path)


# ------------------------------------------------------------------------------------------- missing files


def test_directory_without_an_adapter(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no adapter_config.json: it is not an adapter directory"):
        load_toast_adapter(make_vit(), tmp_path / "empty")


def test_path_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"There is no adapter directory at .*Pass the directory that holds"):
        load_toast_adapter(make_vit(), tmp_path / "nowhere")


def test_config_without_weights(saved):
    (saved.path / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=r"has an adapter config but no weights.*Save or download the adapter"):
        load_toast_adapter(saved.fresh_base(), saved.path)


def test_weights_without_config(saved):
    (saved.path / CONFIG).unlink()
    with pytest.raises(FileNotFoundError, match=r"has no adapter_config.json.*save the adapter again"):
        load_toast_adapter(saved.fresh_base(), saved.path)


def test_a_file_instead_of_a_directory(saved):
    with pytest.raises(ValueError, match=r"is a file; pass the directory that holds adapter_config.json"):
        load_toast_adapter(saved.fresh_base(), saved.path / CONFIG)


# ------------------------------------------------------------------------------------------ pickled adapters


def test_bin_adapter_loads_with_weights_only(saved):
    tensors = load_file(saved.path / WEIGHTS)
    (saved.path / WEIGHTS).unlink()
    torch.save(tensors, saved.path / "adapter_model.bin")
    assert torch.equal(saved.logits_of(load_toast_adapter(saved.fresh_base(), saved.path)), saved.logits)


class _Payload:
    """A pickle that would create `marker` when unpickled (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickle_is_not_executed(saved, tmp_path):
    marker = tmp_path / "pwned"
    tensors = load_file(saved.path / WEIGHTS)
    (saved.path / WEIGHTS).unlink()
    torch.save({**tensors, "base_model.model.toast.toast_prompt": _Payload(marker)}, saved.path / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"refused to unpickle it.*do not load it with `weights_only=False`"):
        load_toast_adapter(saved.fresh_base(), saved.path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):  # PEFT's path: weights_only too
        PeftModel.from_pretrained(saved.fresh_base(), saved.path)
    assert not marker.exists()


def test_truncated_bin_is_refused(saved):
    tensors = load_file(saved.path / WEIGHTS)
    (saved.path / WEIGHTS).unlink()
    torch.save(tensors, saved.path / "adapter_model.bin")
    data = (saved.path / "adapter_model.bin").read_bytes()
    (saved.path / "adapter_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"adapter_model.bin' is damaged or incomplete.*save or download"):
        load_toast_adapter(saved.fresh_base(), saved.path)


# ------------------------------------------------------------------------------------------ dtypes and devices


def test_fp16_adapter_onto_a_bf16_base(saved):
    tensors = {key: tensor.half() for key, tensor in load_file(saved.path / WEIGHTS).items()}
    save_file(tensors, saved.path / WEIGHTS)  # as saved from an fp16 model
    model = load_toast_adapter(saved.fresh_base().to(torch.bfloat16), saved.path)
    state = {name: param for name, param in model.named_parameters() if "toast_" in name}
    # PEFT upcasts the adapter to float32: the fp16 values arrive exactly.
    assert torch.equal(
        state["base_model.model.toast.toast_prompt.default"], tensors["base_model.model.toast.toast_prompt"].float()
    )
    with torch.no_grad():
        logits = model(pixel_values=saved.inputs["pixel_values"].to(torch.bfloat16)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    torch.testing.assert_close(logits.float(), saved.logits, atol=0.05, rtol=0.05)


def test_meta_device_base(saved):
    with torch.device("meta"):
        meta_base = make_vit()
    with pytest.raises(ValueError, match=r"weights are on the meta device.*Load the base model's weights first"):
        load_toast_adapter(meta_base, saved.path)
    # Fully on meta, the model still works for what meta is for: shapes.
    model = get_peft_model(meta_base, ToastConfig())
    assert model(pixel_values=torch.empty(2, 3, 16, 16, device="meta")).logits.shape == (2, 3)


def test_adapter_weights_never_loaded(saved):
    model = get_peft_model(saved.fresh_base(), ToastConfig(), low_cpu_mem_usage=True)
    with pytest.raises(ValueError, match=r"weights are still on the meta device.*low_cpu_mem_usage=True"):
        model(**saved.inputs)
    with pytest.raises(ValueError, match=r"never loaded \(on the meta device"):
        atomic_save_pretrained(model, saved.path)


# ---------------------------------------------------------------------------------------------- bad batches


def _steered(factory, seed: int = 0):
    model = get_peft_model(factory(), ToastConfig())
    randomize_adapter(model, seed=seed)
    return model


@pytest.mark.parametrize("kind", ["llama", "vit"])
def test_empty_batch(kind):
    model = _steered({"llama": make_llama, "vit": make_vit}[kind])
    inputs = {key: value[:0] for key, value in make_inputs(kind).items()}
    with pytest.raises(ValueError, match=r"TOAST got an empty batch .*Skip empty batches before calling the model"):
        model(**inputs)


def test_zero_length_sequences():
    model = _steered(make_llama)
    with pytest.raises(ValueError, match=r"sequences of length 0 .*start from the BOS token"):
        model(input_ids=torch.zeros(2, 0, dtype=torch.long), attention_mask=torch.zeros(2, 0, dtype=torch.long))


@pytest.mark.parametrize("mask_shape", [(2, 5), (2, 7), (3, 6)], ids=["short", "long", "batch"])
def test_attention_mask_of_the_wrong_shape(mask_shape):
    model = _steered(make_llama)
    inputs = make_inputs("llama")  # (2, 6)
    inputs["attention_mask"] = torch.ones(mask_shape, dtype=torch.long)
    with pytest.raises(ValueError, match=r"`attention_mask` has shape .* Pass the mask that the tokenizer returned"):
        model(**inputs)


def test_attention_mask_covering_cached_tokens_is_accepted():
    model = _steered(make_llama)
    inputs = make_inputs("llama")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=1)  # masks grow past the inputs
    assert out.shape == (2, 9)


@pytest.mark.parametrize("factory", [make_llama, make_mistral, make_gpt2, make_bert])
def test_all_padding_rows_leave_the_other_rows_alone(factory):
    model = _steered(factory)
    kind = {make_llama: "llama", make_mistral: "llama", make_gpt2: "gpt2", make_bert: "bert"}[factory]
    inputs = make_inputs(kind, batch=3)
    inputs["attention_mask"][1] = 0  # row 1: nothing but padding
    inputs["attention_mask"][2, :2] = 0  # row 2: partly padded
    with torch.no_grad():
        batched = model(**inputs).logits
        alone = [model(**{key: value[i : i + 1] for key, value in inputs.items()}).logits for i in (0, 2)]
    assert torch.isfinite(batched[[0, 2]]).all()
    torch.testing.assert_close(batched[0], alone[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[2], alone[1][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_inputs_stop_the_call_before_any_gradient(value):
    model = _steered(make_llama)
    model.train()
    inputs = make_inputs("llama")
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach()
    embeds[1, 3, 0] = value
    with pytest.raises(ValueError, match=r"NaN or inf at real \(unpadded\) tokens of batch rows \[1\].*isfinite"):
        model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], labels=inputs["input_ids"])
    assert all(param.grad is None for param in model.parameters())


def test_non_finite_pixels():
    model = _steered(make_vit)
    pixels = make_inputs("vit")["pixel_values"]
    pixels[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf at real \(unpadded\) tokens of batch rows \[0\]"):
        model(pixel_values=pixels)


def test_a_call_that_raises_leaves_nothing_behind():
    model = _steered(make_llama)
    inputs = make_inputs("llama")
    with torch.no_grad():
        before = model(**inputs).logits
        with pytest.raises(ValueError):
            model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"][:, :3])
        assert current_state() is None
        assert torch.equal(model(**inputs).logits, before)


# ----------------------------------------------------------------------------------------------- nothing lost


def test_saving_non_finite_weights_is_refused_and_the_previous_adapter_kept(saved):
    before = saved.files()
    with torch.no_grad():
        next(p for n, p in saved.model.named_parameters() if "toast_readout" in n).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=r"holds NaN or infinite values in 1 tensor\(s\).*lower learning rate"):
        atomic_save_pretrained(saved.model, saved.path)
    assert saved.files() == before


def _crash_writing_weights(*args, **kwargs):
    path = args[1]
    Path(path).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # the first bytes, then the disk fills up
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("where", ["weights", "config", "swap"])
def test_a_crash_mid_write_keeps_the_previous_adapter(saved, monkeypatch, where):
    before = saved.files()
    randomize_adapter(saved.model, seed=1)  # a newer adapter to save over the previous one
    if where == "weights":
        monkeypatch.setattr(peft.peft_model, "safe_save_file", _crash_writing_weights)
    elif where == "config":
        monkeypatch.setattr(
            ToastConfig, "save_pretrained", lambda *a, **k: _crash_writing_weights(None, Path(a[1]) / CONFIG)
        )
    else:
        monkeypatch.setattr("peft_toast.io._exchange", lambda a, b: _crash_writing_weights(None, Path(a) / "x"))
    with pytest.raises(OSError, match="No space left on device"):
        atomic_save_pretrained(saved.model, saved.path)
    assert saved.files() == before
    assert sorted(p.name for p in saved.path.parent.iterdir()) == ["adapter"]  # no temporary directory left
    assert torch.equal(saved.logits_of(load_toast_adapter(saved.fresh_base(), saved.path)), saved.logits)


def test_atomic_save_replaces_the_adapter_and_keeps_other_files(saved):
    (saved.path / "metrics.json").write_text("{}")
    randomize_adapter(saved.model, seed=1)
    atomic_save_pretrained(saved.model, saved.path)
    assert sorted(p.name for p in saved.path.iterdir()) == ["README.md", CONFIG, WEIGHTS, "metrics.json"]
    loaded = load_toast_adapter(saved.fresh_base(), saved.path)
    assert torch.equal(saved.logits_of(loaded), saved.logits_of(saved.model))
    assert not torch.equal(saved.logits_of(loaded), saved.logits)


def test_non_main_processes_write_nothing(saved):
    before = saved.files()
    randomize_adapter(saved.model, seed=1)
    atomic_save_pretrained(saved.model, saved.path, is_main_process=False)
    assert saved.files() == before


def test_atomic_file_keeps_the_previous_file_on_a_crash(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_file(path) as file:
        file.write("new, half")
        raise RuntimeError("crash")
    assert path.read_text() == "old\n" and sorted(tmp_path.iterdir()) == [path]
    with atomic_file(path) as file:
        file.write("new\n")
    assert path.read_text() == "new\n"


def test_atomic_directory_refuses_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file; pass a directory"), atomic_directory(tmp_path / "out"):
        pass


def test_half_written_adapter_from_another_writer_is_detected(saved):
    # What an interrupted plain `save_pretrained` leaves: the config is written, the weights are cut short.
    data = (saved.path / WEIGHTS).read_bytes()
    (saved.path / WEIGHTS).write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match="is damaged or incomplete"):
        load_toast_adapter(saved.fresh_base(), saved.path)


@pytest.mark.slow
def test_sigkill_mid_write_keeps_the_previous_adapter(saved):
    """A real crash: the writing process is killed with SIGKILL while it writes the weights."""
    before = saved.files()
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        import peft.peft_model
        from conftest import make_vit, randomize_adapter
        from peft import get_peft_model
        from peft_toast import ToastConfig, atomic_save_pretrained

        def killed_while_writing(tensors, path, metadata=None):
            with open(path, "wb") as file:
                file.write(b"\\x10\\x00\\x00\\x00")
                file.flush()
                os.kill(os.getpid(), signal.SIGKILL)

        model = get_peft_model(make_vit(), ToastConfig())
        randomize_adapter(model, seed=7)
        peft.peft_model.safe_save_file = killed_while_writing
        atomic_save_pretrained(model, {str(saved.path)!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert saved.files() == before
    leftovers = [p.name for p in saved.path.parent.iterdir() if p.name != "adapter"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".adapter.tmp-")  # safe to delete, never loaded
    assert torch.equal(saved.logits_of(load_toast_adapter(saved.fresh_base(), saved.path)), saved.logits)


# ------------------------------------------------------------------------------------------------------ security


def test_target_modules_string_is_a_pattern_never_code(tmp_path):
    marker = tmp_path / "pwned"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    with pytest.raises(ValueError, match="must match exactly one value projection in every block"):
        get_peft_model(make_vit(), ToastConfig(target_modules=code))
    assert not marker.exists()


def test_auto_mapping_of_the_config_is_never_imported(saved):
    saved.edit_config(auto_mapping={"base_model_class": "run", "parent_library": "a_module_that_would_run_code"})
    assert torch.equal(saved.logits_of(load_toast_adapter(saved.fresh_base(), saved.path)), saved.logits)


def _unsafe_calls(tree: ast.AST) -> list[str]:
    """Calls that execute code or unpickle data: eval/exec, pickle-family loads, torch.load without
    weights_only=True, trust_remote_code=True and allow_pickle=True."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        function = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        weights_only = keywords.get("weights_only")
        if (
            function in ("eval", "exec")
            or function.split(".")[0] in ("pickle", "dill", "cloudpickle", "marshal", "joblib")
            and function.endswith(("load", "loads"))
            or function == "torch.load"
            and not (isinstance(weights_only, ast.Constant) and weights_only.value is True)
        ):
            found.append(f"{function}() at line {node.lineno}")
        for name in ("trust_remote_code", "allow_pickle"):
            if isinstance(keywords.get(name), ast.Constant) and keywords[name].value is True:
                found.append(f"{name}=True at line {node.lineno}")
    return found


def test_project_code_never_unpickles_or_evaluates():
    sources = [
        p for folder in ("peft_toast", "examples", "benchmarks", "scripts") for p in (REPO / folder).rglob("*.py")
    ]
    assert any(p.name == "loading.py" for p in sources)
    unsafe = {str(p.relative_to(REPO)): calls for p in sources if (calls := _unsafe_calls(ast.parse(p.read_text())))}
    assert unsafe == {}
    # the scanner itself catches what it should
    assert len(_unsafe_calls(ast.parse("torch.load(f)\npickle.loads(b)\neval(s)\nf(trust_remote_code=True)"))) == 4
    assert _unsafe_calls(ast.parse("torch.load(f, weights_only=True)\nmodel.eval()")) == []
