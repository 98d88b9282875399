"""DeepSpeed ZeRO-2 and ZeRO-3 over a TOAST model, on CPU (DeepSpeed's CPU accelerator, gloo): two processes on half
batches train the same adapter as one unsharded process on the whole batches, and save the same file.

DeepSpeed is not installed by `scripts/install.sh` (its CPU communication op is compiled on first use, which CI may
not be able to do), so this test is skipped unless it is: `pip install deepspeed` (0.19.8 was used) to run it. Under
ZeRO-3 every parameter is partitioned between the processes, the adapter's too; DeepSpeed gathers a module's
parameters whenever that module is called, and TOAST calls each feedback map as a module, so the top-down path that
runs outside the blocks still sees whole tensors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file

pytest.importorskip("deepspeed")
WORKER = Path(__file__).parent / "deepspeed_worker.py"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_processes_train_and_save_like_one_process(tmp_path, stage):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        str(WORKER), str(tmp_path), str(stage),
    ]  # fmt: skip
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    if stage == 3:  # the adapter really was partitioned
        assert int((tmp_path / "partitioned.txt").read_text()) > 0
    saved, expected = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("deepspeed", "reference"))
    assert saved.keys() == expected.keys()
    assert any(tensor.abs().max() > 1e-3 for key, tensor in expected.items() if "toast_readout" in key)
    for key in expected:
        torch.testing.assert_close(saved[key], expected[key], rtol=0, atol=1e-6, msg=key)
