"""Training with a plain Accelerate loop (`examples/train_accelerate.py`) on tiny random models and tiny datasets.

The adapter it saves has the Trainer's format, its checkpoints hold only the adapter and the loop's state, gradient
accumulation equals a larger batch, and a resumed run ends at the uninterrupted run's adapter. Slow: a run killed with
SIGKILL and resumed, and two processes (DDP over gloo) against one process on the same global batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import test_trainer
import torch
import train_accelerate
import train_image_classifier
from accelerate.state import AcceleratorState
from conftest import free_port
from safetensors.torch import load_file
from test_trainer import ADAPTER_FILES, EXAMPLES, assert_same_adapter, image_args, run_killed_then_resumed

# The tiny model and dataset folders of test_trainer.py (importing it puts the examples on the import path), and one
# torch thread, as there.
tiny_vit_dir = test_trainer.tiny_vit_dir
tiny_image_dataset_dir = test_trainer.tiny_image_dataset_dir
pytestmark = pytest.mark.usefixtures("one_thread")

ACCELERATE_STATE_FILES = {"optimizer.bin", "scheduler.bin", "random_states_0.pkl"}


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """Each run builds its own `Accelerator`; Accelerate keeps process-wide state that must not leak between runs."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def accelerate_args(model_dir: str, dataset_dir: str, **overrides) -> list[str]:
    """Command-line arguments of `train_accelerate.py`: 6 steps of batch 4, a checkpoint every 2 steps, on the CPU (the
    tests compare runs bit for bit, which GPU kernels do not promise)."""
    options = {"model": model_dir, "dataset": dataset_dir, "max_steps": 6, "per_device_batch_size": 4,
               "save_steps": 2, "eval_size": 8, **overrides}  # fmt: skip
    return ["--cpu", *(f"--{key.replace('_', '-')}={value}" for key, value in options.items())]


def test_adapter_has_the_trainer_format(tmp_path, tiny_vit_dir, tiny_image_dataset_dir):
    train_accelerate.main(accelerate_args(tiny_vit_dir, tiny_image_dataset_dir, output_dir=tmp_path / "accelerate"))
    train_image_classifier.main(image_args(tiny_vit_dir, tiny_image_dataset_dir, output_dir=tmp_path / "trainer"))
    accelerate_dir, trainer_dir = tmp_path / "accelerate" / "adapter", tmp_path / "trainer" / "adapter"

    assert set(os.listdir(accelerate_dir)) == set(os.listdir(trainer_dir)) == ADAPTER_FILES
    ours, theirs = (load_file(folder / "adapter_model.safetensors") for folder in (accelerate_dir, trainer_dir))
    assert {key: tensor.shape for key, tensor in ours.items()} == {key: tensor.shape for key, tensor in theirs.items()}
    assert all(tensor.dtype == torch.float32 for tensor in ours.values())
    configs = [json.loads((folder / "adapter_config.json").read_text()) for folder in (accelerate_dir, trainer_dir)]
    assert configs[0] == configs[1]
    # Both trained (the readouts start at zero), along different paths.
    readout = "base_model.model.vit.layers.0.attention.v_proj.toast_readout.weight"
    assert ours[readout].abs().max() > 0 and not torch.equal(ours[readout], theirs[readout])


def test_checkpoints_hold_only_the_adapter_and_loop_state(tmp_path, tiny_vit_dir, tiny_image_dataset_dir):
    train_accelerate.main(accelerate_args(tiny_vit_dir, tiny_image_dataset_dir, output_dir=tmp_path, max_steps=4))
    # No temporary folder left behind, no base weights (Accelerate's model.safetensors) in a checkpoint.
    assert sorted(os.listdir(tmp_path)) == ["adapter", "checkpoint-2", "checkpoint-4"]
    assert set(os.listdir(tmp_path / "checkpoint-2")) == ADAPTER_FILES | ACCELERATE_STATE_FILES
    assert_same_adapter(tmp_path / "checkpoint-4", tmp_path / "adapter")


def test_resume_ends_at_the_uninterrupted_adapter(tmp_path, tiny_vit_dir, tiny_image_dataset_dir):
    # 16 shuffled examples in micro-batches of 2 accumulated over 3: 3 steps per epoch (8 micro-batches, the last window
    # shorter). Step 2 is mid-epoch in the first epoch, step 4 mid-epoch in the second, reshuffled one.
    options = {"per_device_batch_size": 2, "gradient_accumulation_steps": 3}
    full = train_accelerate.main(
        accelerate_args(tiny_vit_dir, tiny_image_dataset_dir, output_dir=tmp_path / "full", **options)
    )
    for step in (2, 4):
        checkpoint = tmp_path / "full" / f"checkpoint-{step}"
        resumed = train_accelerate.main(
            accelerate_args(
                tiny_vit_dir, tiny_image_dataset_dir, output_dir=tmp_path / f"resumed-{step}",
                resume_from_checkpoint=checkpoint, **options,
            )
        )  # fmt: skip
        assert_same_adapter(tmp_path / "full" / "adapter", tmp_path / f"resumed-{step}" / "adapter", atol=1e-6)
        assert resumed == full


def test_gradient_accumulation_equals_the_larger_batch(tmp_path, tiny_vit_dir, tiny_image_dataset_dir):
    train_accelerate.main(
        accelerate_args(
            tiny_vit_dir, tiny_image_dataset_dir, output_dir=tmp_path / "accumulated", per_device_batch_size=2,
            gradient_accumulation_steps=2, save_steps=100,
        )
    )  # fmt: skip
    train_accelerate.main(
        accelerate_args(tiny_vit_dir, tiny_image_dataset_dir, output_dir=tmp_path / "large", save_steps=100)
    )
    # Same shuffled order (seeded sampler), same mean loss: equal up to float summation order.
    assert_same_adapter(tmp_path / "large" / "adapter", tmp_path / "accumulated" / "adapter", atol=1e-5)


def test_bf16_mixed_precision_keeps_fp32_adapter_weights(tmp_path, tiny_vit_dir, tiny_image_dataset_dir):
    metrics = train_accelerate.main(
        accelerate_args(tiny_vit_dir, tiny_image_dataset_dir, output_dir=tmp_path, mixed_precision="bf16", max_steps=2)
    )
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(tensor.dtype == torch.float32 and torch.isfinite(tensor).all() for tensor in weights.values())
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0


# ---------------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_run_killed_and_resumed_ends_at_the_uninterrupted_adapter(tmp_path, tiny_vit_dir, tiny_image_dataset_dir):
    arguments = accelerate_args(
        tiny_vit_dir, tiny_image_dataset_dir, max_steps=200, save_steps=10, per_device_batch_size=2,
        gradient_accumulation_steps=2,
    )  # fmt: skip
    train_accelerate.main([*arguments, f"--output-dir={tmp_path / 'uninterrupted'}"])
    step = run_killed_then_resumed(
        "train_accelerate.py", arguments, tmp_path / "killed", train_accelerate.ACCELERATE_CHECKPOINT_MARKER
    )
    assert 10 <= step < 200
    assert not any(name.startswith("tmp-") for name in os.listdir(tmp_path / "killed"))
    assert_same_adapter(tmp_path / "uninterrupted" / "adapter", tmp_path / "killed" / "adapter", atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("layers", [None, "-1"], ids=["every-block", "top-block"])
def test_two_processes_match_one_process_on_the_same_global_batches(
    tmp_path, tiny_vit_dir, tiny_image_dataset_dir, layers
):
    """DDP on 2 CPU processes (gloo, localhost) with batches of 2 each against 1 process with batches of 4: the seeded
    sampler gives both the same global batches, so the adapters agree up to the order of float sums. Also with only
    the top block steered, where pass 2 starts at that block (`share_lower_blocks`)."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    extra = {} if layers is None else {"layers": layers}
    arguments = accelerate_args(tiny_vit_dir, tiny_image_dataset_dir, max_steps=8, save_steps=4, **extra)
    # `accelerate launch --cpu --num_processes 2` would start a single process (its CPU launcher expects MPI); the
    # multi-process launcher (torchrun) with the script's --cpu gives DDP over gloo, on any machine.
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
        "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={free_port()}",
    ]  # fmt: skip
    script = [str(EXAMPLES / "train_accelerate.py"), *arguments]
    runs = {
        "ddp": [*launch, *script, "--per-device-batch-size=2"],
        "single": [sys.executable, *script, "--per-device-batch-size=4"],
    }
    for name, command in runs.items():
        result = subprocess.run(
            [*command, f"--output-dir={tmp_path / name}"], env=environment, capture_output=True, text=True, timeout=240
        )
        assert result.returncode == 0, result.stderr[-3000:]
    # Both processes wrote their random state; only the main one wrote the adapter.
    assert set(os.listdir(tmp_path / "ddp" / "checkpoint-4")) == ADAPTER_FILES | ACCELERATE_STATE_FILES | {
        "random_states_1.pkl"
    }
    difference = assert_same_adapter(tmp_path / "single" / "adapter", tmp_path / "ddp" / "adapter", atol=1e-5)
    print(f"DDP (2 x 2) vs single process (1 x 4), 8 steps: max |adapter difference| = {difference:.3g}")
