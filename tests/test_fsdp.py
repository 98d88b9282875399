"""FSDP2 (`torch.distributed.fsdp.fully_shard`) over the frozen base model with the TOAST adapter kept unsharded
(`peft_toast.distributed`): two processes over gloo on the CPU train the same adapter as one unsharded process on the
whole batches, save the same file, and resume from a checkpoint to the same end; a sharded adapter is refused clearly.

Accelerate only enables FSDP on accelerators (on a CPU it runs DDP), so the Accelerate configuration documented in
docs/training.md is not run here; these tests drive FSDP2 with torchrun and plain torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import free_port, make_inputs, make_llama
from peft import get_peft_model
from safetensors.torch import load_file

from peft_toast import ToastConfig
from peft_toast.distributed import fully_shard_frozen_base, replicate_adapter_gradients

WORKER = Path(__file__).parent / "fsdp_worker.py"


@pytest.mark.slow
@pytest.mark.parametrize("layers", [None, [-1]], ids=["every-block", "top-block"])
def test_two_sharded_processes_train_resume_and_save_like_one_unsharded(tmp_path, layers):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        str(WORKER), str(tmp_path), json.dumps(layers),
    ]  # fmt: skip
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "info.json").read_text()) == {"world": 2, "base_parameter_type": "DTensor"}
    adapters = torch.load(tmp_path / "adapters.pt")
    reference = adapters["reference"]
    assert any(tensor.abs().max() > 1e-3 for key, tensor in reference.items() if "toast_readout" in key)  # it trained
    for run in ("sharded", "resumed", "other_process"):
        assert adapters[run].keys() == reference.keys()
        for key, tensor in reference.items():
            torch.testing.assert_close(adapters[run][key], tensor, rtol=0, atol=1e-6, msg=f"{run}: {key}")
    saved, expected = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("sharded", "reference"))
    assert saved.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(saved[key], expected[key], rtol=0, atol=1e-6)


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_sharded_adapter_is_refused_with_the_fix(one_process_group):
    from torch.distributed.fsdp import fully_shard

    model = get_peft_model(make_llama(), ToastConfig())
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)  # the adapter's maps sharded with their blocks
    fully_shard(model.base_model.model)  # the root: the blocks reshard after their forward
    with pytest.raises(ValueError, match="fully_shard_frozen_base"):
        model(**make_inputs("llama"))
    with pytest.raises(ValueError, match="ACCELERATE_IGNORED_MODULES"):
        replicate_adapter_gradients(model)


def test_one_sharded_process_equals_the_unsharded_model(one_process_group):
    torch.manual_seed(0)
    plain = get_peft_model(make_llama(), ToastConfig(prompt_init="random"))
    with torch.no_grad():
        for name, parameter in plain.named_parameters():
            if "toast_readout" in name:
                parameter.normal_(0, 0.1)
    inputs = make_inputs("llama")
    expected = plain(**inputs).logits
    sharded = fully_shard_frozen_base(plain)
    assert replicate_adapter_gradients(sharded) == sum(1 for p in sharded.parameters() if p.requires_grad)
    torch.testing.assert_close(sharded(**inputs).logits, expected, rtol=0, atol=1e-6)


def test_helpers_refuse_what_they_cannot_do():
    with pytest.raises(RuntimeError, match="init_process_group"):
        replicate_adapter_gradients(get_peft_model(make_llama(), ToastConfig()))
    with pytest.raises(TypeError, match="get_peft_model"):
        fully_shard_frozen_base(make_llama())
