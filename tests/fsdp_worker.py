"""Worker of `tests/test_fsdp.py`, started by `torchrun --nproc_per_node 2` (gloo, CPU): trains a TOAST adapter on a
tiny LLaMA whose frozen base FSDP2 shards (`peft_toast.distributed.fully_shard_frozen_base`), each process on its half
of every global batch, beside an unsharded copy that one process trains on the whole batches; then resumes the sharded
run from a checkpoint taken after step 2 in a freshly sharded model. Writes what the test compares to `OUT_DIR`."""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_inputs, make_llama  # noqa: E402
from peft import get_peft_model, set_peft_model_state_dict  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

from peft_toast import ToastConfig  # noqa: E402
from peft_toast.distributed import fully_shard_frozen_base  # noqa: E402

STEPS, RESUME_AFTER, LR = 3, 2, 1e-2


def batches(rank: int | None, world: int):
    for step in range(STEPS):
        inputs = make_inputs("llama", batch=4, seq=6, seed=step)
        if rank is not None:
            share = len(inputs["input_ids"]) // world
            inputs = {key: value[rank * share : (rank + 1) * share] for key, value in inputs.items()}
        yield step, {**inputs, "labels": inputs["input_ids"]}


def train(model, optimizer, rank, world, start=0, stop=STEPS, on_step=None):
    for step, batch in batches(rank, world):
        if not start <= step < stop:
            continue
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if on_step is not None:
            on_step(step + 1)


def adapter(model) -> dict[str, torch.Tensor]:
    return {key: tensor.detach().clone() for key, tensor in get_peft_model_state_dict(model).items()}


def main() -> None:
    out_dir, layers = sys.argv[1], json.loads(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    base = make_llama()
    config = ToastConfig(prompt_init="random", layers_to_transform=layers)

    def fresh():
        torch.manual_seed(1)  # the same random prompt in every process and every copy
        return get_peft_model(copy.deepcopy(base), copy.deepcopy(config))

    reference = fresh()  # unsharded, whole batches
    sharded = fully_shard_frozen_base(fresh())
    for model in (reference, sharded):
        model.train()
    optimizers = [
        torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=LR) for m in (reference, sharded)
    ]
    checkpoint = {}

    def keep(step):
        if step == RESUME_AFTER:
            checkpoint.update(adapter=adapter(sharded), optimizer=copy.deepcopy(optimizers[1].state_dict()))

    train(reference, optimizers[0], None, world)
    train(sharded, optimizers[1], rank, world, on_step=keep)

    resumed = fully_shard_frozen_base(fresh())
    resumed.train()
    set_peft_model_state_dict(resumed, checkpoint["adapter"])
    optimizer = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=LR)
    optimizer.load_state_dict(checkpoint["optimizer"])
    train(resumed, optimizer, rank, world, start=RESUME_AFTER)

    results = {
        name: adapter(model) for name, model in (("reference", reference), ("sharded", sharded), ("resumed", resumed))
    }
    gathered = [None] * world
    dist.all_gather_object(gathered, results["sharded"])
    if rank == 0:
        sharded.save_pretrained(os.path.join(out_dir, "sharded"))
        reference.save_pretrained(os.path.join(out_dir, "reference"))
        torch.save({**results, "other_process": gathered[1]}, os.path.join(out_dir, "adapters.pt"))
        base_is_sharded = type(next(sharded.base_model.model.model.layers[0].mlp.parameters())).__name__
        with open(os.path.join(out_dir, "info.json"), "w") as file:
            json.dump({"world": world, "base_parameter_type": base_is_sharded}, file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
