"""Worker of `tests/test_deepspeed.py`, started by `torchrun --nproc_per_node 2` (DeepSpeed's CPU accelerator, gloo):
trains a TOAST adapter on a tiny LLaMA under DeepSpeed ZeRO (stage from argv; under ZeRO-3 every parameter is
partitioned, `stage3_param_persistence_threshold=0`), each process on its half of every global batch, beside an
unsharded copy trained on the whole batches; rank 0 saves both adapters (ZeRO-3: gathered first)."""

from __future__ import annotations

import copy
import os
import sys

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_inputs, make_llama  # noqa: E402
from peft import get_peft_model  # noqa: E402

from peft_toast import ToastConfig  # noqa: E402

STEPS, LR = 3, 1e-2


def main() -> None:
    out_dir, stage = sys.argv[1], int(sys.argv[2])
    deepspeed.init_distributed("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    base = make_llama()

    def fresh():
        torch.manual_seed(1)
        return get_peft_model(copy.deepcopy(base), ToastConfig(prompt_init="random"))

    reference, model = fresh(), fresh()
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**6,
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    reference_optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        inputs = make_inputs("llama", batch=4, seq=6, seed=step)
        half = {key: value[rank * 2 : (rank + 1) * 2] for key, value in inputs.items()}
        engine.backward(engine(**half, labels=half["input_ids"]).loss)
        engine.step()
        reference(**inputs, labels=inputs["input_ids"]).loss.backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad()
    partitioned = [p for p in engine.module.parameters() if p.requires_grad and getattr(p, "ds_shape", None)]
    empty = sum(p.data.numel() == 0 for p in partitioned)  # ZeRO-3: this process holds none of these tensors' data
    with deepspeed.zero.GatheredParameters(partitioned):  # a no-op below ZeRO-3
        if rank == 0:
            engine.module.save_pretrained(os.path.join(out_dir, "deepspeed"))
            reference.save_pretrained(os.path.join(out_dir, "reference"))
            with open(os.path.join(out_dir, "partitioned.txt"), "w") as file:
                file.write(str(empty))
    dist.barrier()


if __name__ == "__main__":
    main()
