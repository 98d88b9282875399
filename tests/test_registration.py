"""Tests of `peft_toast.registration`: importing registers TOAST in PEFT's mappings, registering again (re-import, reload,
a second `register()`) changes nothing, `PeftType.TOAST` behaves like PEFT's own members, and an adapter can be loaded
by a user who forgot `import peft_toast`."""

from __future__ import annotations

import copy
import importlib
import json
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import make_inputs, make_llama, randomize_adapter
from peft import PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from safetensors.torch import load_file, save_file

import peft_toast
from peft_toast import ToastConfig, ToastModel, load_toast_adapter, registration

MAPPINGS = (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING)


def _snapshot() -> tuple:
    return (
        PeftType.TOAST,
        list(PeftType.__members__),
        dict(PeftType._value2member_map_),
        PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.TOAST],
        PEFT_TYPE_TO_TUNER_MAPPING[PeftType.TOAST],
        PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.TOAST],
    )


def test_import_registers_config_tuner_and_prefix():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.TOAST] is ToastConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.TOAST] is ToastModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.TOAST] == "toast_"
    assert PEFT_TYPE_TO_CONFIG_MAPPING["TOAST"] is ToastConfig  # the plain string from adapter_config.json
    assert ToastConfig().peft_type is PeftType.TOAST


def test_registering_again_changes_nothing():
    before = _snapshot()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        registration.register()
        registration.register()
        assert registration.add_peft_type("TOAST") is before[0]
        importlib.reload(registration)
        importlib.reload(peft_toast)
    assert _snapshot() == before
    assert registration.TOAST_PEFT_TYPE is PeftType.TOAST
    assert list(PeftType).count(PeftType.TOAST) == 1
    assert len(PeftType) == len(PeftType.__members__)
    # still fully working
    model = get_peft_model(make_llama(), ToastConfig())
    assert type(model.base_model) is ToastModel


def _outcome(function):
    """What an operation does: its result, or the type of the exception it raises."""
    try:
        return "returns", function()
    except Exception as error:  # noqa: BLE001  (the exception type *is* the outcome)
        return "raises", type(error)


@pytest.mark.parametrize(
    "operation",
    [
        lambda name: PeftType[name].value,
        lambda name: PeftType(name).name,
        lambda name: getattr(PeftType, name).name,
        lambda name: PeftType[name] in PeftType,
        lambda name: name in PeftType,  # TypeError before Python 3.12, True from 3.12: the same for every member
        lambda name: name in PeftType.__members__,
        lambda name: list(PeftType).count(PeftType[name]),
        lambda name: PeftType[name] == name and hash(PeftType[name]) == hash(name),
        lambda name: {name: 1}[PeftType[name]],
        lambda name: json.dumps({"peft_type": PeftType[name]}),
        lambda name: pickle.loads(pickle.dumps(PeftType[name])) is PeftType[name],
        lambda name: copy.deepcopy(PeftType[name]) is PeftType[name],
        lambda name: str(PeftType[name]),
        lambda name: repr(PeftType[name]),
        lambda name: f"{PeftType[name]}",
        lambda name: isinstance(PeftType[name], (str, PeftType)),
    ],
)
def test_peft_type_toast_behaves_like_peft_members(operation):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        lora, toast = _outcome(lambda: operation("LORA")), _outcome(lambda: operation("TOAST"))
    if lora[0] == "returns" and isinstance(lora[1], str):
        lora = ("returns", lora[1].replace("LORA", "TOAST"))
    assert toast == lora


def _save_adapter(tmp_path):
    """A randomised LLaMA adapter in `tmp_path/adapter` and its base model in `tmp_path/base`; returns the inputs and
    the adapted model's logits."""
    base = make_llama()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, ToastConfig())
    randomize_adapter(model)
    model.save_pretrained(tmp_path / "adapter")
    inputs = make_inputs("llama")
    with torch.no_grad():
        return inputs, model(**inputs).logits


def test_loading_without_registration_fails_in_peft_and_works_through_the_helper(tmp_path, monkeypatch):
    """In-process stand-in for a process that never imported peft_toast: PEFT's mappings lack TOAST."""
    inputs, expected = _save_adapter(tmp_path)
    for mapping in MAPPINGS:
        monkeypatch.delitem(mapping, PeftType.TOAST)
    fresh = type(make_llama()).from_pretrained(tmp_path / "base")
    with pytest.raises(KeyError, match="'TOAST'"):
        PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    model = load_toast_adapter(fresh, tmp_path / "adapter")  # registers TOAST again, then loads
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)


@pytest.mark.slow
def test_a_user_who_forgot_the_import(tmp_path):
    """A fresh process that never imports peft_toast: PEFT raises a bare KeyError; the loading helper works."""
    inputs, expected = _save_adapter(tmp_path)
    save_file(inputs, tmp_path / "inputs.safetensors")
    script = textwrap.dedent(
        f"""
        import json, sys
        import torch
        from peft import PeftModel
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM

        base, adapter = {str(tmp_path / "base")!r}, {str(tmp_path / "adapter")!r}
        try:
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
            error = None
        except Exception as exc:
            error = {{"type": type(exc).__name__, "message": str(exc)}}
        imported_before = "peft_toast" in sys.modules

        from peft_toast import load_toast_adapter  # the friendly path

        model = load_toast_adapter(AutoModelForCausalLM.from_pretrained(base), adapter)
        with torch.no_grad():
            logits = model(**load_file({str(tmp_path / "inputs.safetensors")!r})).logits
        save_file({{"logits": logits}}, {str(tmp_path / "logits.safetensors")!r})
        print(json.dumps({{"error": error, "imported_before": imported_before}}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"error": {"type": "KeyError", "message": "'TOAST'"}, "imported_before": False}
    assert torch.equal(load_file(tmp_path / "logits.safetensors")["logits"], expected)


@pytest.mark.slow
def test_reloading_every_module_and_reimporting_from_scratch_is_harmless(tmp_path):
    """Reloading the modules that define the classes (as notebook autoreload does) and re-importing the package from
    scratch re-point PEFT at the new classes without adding a second TOAST member or raising "already registered"."""
    script = textwrap.dedent(
        f"""
        import importlib, sys, warnings
        warnings.simplefilter("error", UserWarning)
        import torch, transformers
        from peft import PeftModel, get_peft_model
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
        from peft.utils import PeftType

        def round_trip(step):
            import peft_toast
            config_cls, model_cls = sys.modules["peft_toast.config"].ToastConfig, sys.modules["peft_toast.model"].ToastModel
            assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.TOAST] is config_cls, step
            assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.TOAST] is model_cls, step
            assert list(PeftType).count(PeftType.TOAST) == 1 and len(PeftType) == len(PeftType.__members__), step
            config = transformers.LlamaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=20, vocab_size=50)
            torch.manual_seed(0)
            model = get_peft_model(transformers.LlamaForCausalLM(config), config_cls())
            path = {str(tmp_path)!r} + "/" + step
            model.save_pretrained(path)
            torch.manual_seed(0)
            loaded = PeftModel.from_pretrained(transformers.LlamaForCausalLM(config), path)
            assert type(loaded.base_model) is model_cls and type(loaded.peft_config["default"]) is config_cls, step
            ids = torch.arange(2, 8)[None]
            assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits), step

        import peft_toast
        round_trip("import")
        for name in ("registration", "config", "model"):
            importlib.reload(sys.modules["peft_toast." + name])
        peft_toast.register()
        round_trip("reload")
        for name in [name for name in sys.modules if name == "peft_toast" or name.startswith("peft_toast.")]:
            del sys.modules[name]
        round_trip("reimport")
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
