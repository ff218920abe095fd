"""LoRA with FSDP2 (``torch.distributed.fsdp.fully_shard``): delta and frozen weights sharded together, delta-only
save gathered to rank 0 without gathering the backbone, and a delta-only load back.

Run on CPU with two processes::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 examples/distributed/fsdp2.py --out runs/fsdp2

Each transformer layer is one FSDP group holding its frozen weights *and* its LoRA tensors (FSDP2 allows mixed
``requires_grad`` in a group); the root group holds embeddings, pooler and the trainable head. After training,
:func:`~deltakit.integrations.distributed.save_delta_checkpoint` (called on every rank) gathers only the delta's
shards and the head, and rank 0 writes ``delta_config.json`` + ``delta_model.safetensors``;
:func:`~deltakit.integrations.distributed.load_delta_checkpoint` puts a checkpoint back into the shards in place.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_common import LR, STEPS, batch, build, rank_and_world, shutdown, write_report  # noqa: E402

from deltakit.integrations.distributed import delta_state_dict, load_delta_checkpoint, save_delta_checkpoint  # noqa: E402


@contextlib.contextmanager
def count_gathers(record: list[tuple[int, ...]]):
    """Record the global shape of every DTensor gathered with ``full_tensor()`` (to show what a save gathers)."""
    original = DTensor.full_tensor

    def full_tensor(self, *args, **kwargs):
        record.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    DTensor.full_tensor = full_tensor
    try:
        yield
    finally:
        DTensor.full_tensor = original


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for the delta checkpoint (out/delta) and report")
    args = parser.parse_args(argv)

    dist.init_process_group("gloo")
    rank, world = rank_and_world()
    model, delta = build()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    layer0 = model.bert.encoder.layer[0]
    mixed_group = {p.requires_grad for p in layer0.parameters()} == {True, False}
    sharded = all(isinstance(p, DTensor) for p in model.parameters())

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        optimizer.zero_grad()
        model(**batch(step, rank, world)).loss.backward()
        optimizer.step()

    gathered: list[tuple[int, ...]] = []
    with count_gathers(gathered):
        save_delta_checkpoint(model, delta, f"{args.out}/delta")
    saved = delta_state_dict(model, delta)
    expected_gathers = sorted(tuple(t.shape) for t in saved.values())

    # Load back: scramble the delta shards, then load the checkpoint into them in place.
    with torch.no_grad():
        for p in delta.parameters():
            p.to_local().zero_()
    load_delta_checkpoint(model, delta, f"{args.out}/delta")
    reloaded = delta_state_dict(model, delta)
    if rank == 0:
        report = {
            "world": world,
            "delta_and_frozen_in_one_group": mixed_group,
            "all_parameters_sharded": sharded,
            "save_gathered_only_delta_and_head": sorted(gathered) == expected_gathers,
            "tensors_gathered_by_save": len(gathered),
            "backbone_parameters": sum(1 for p in model.parameters() if not p.requires_grad),
            "reload_exact": all(torch.equal(saved[k], reloaded[k]) for k in saved),
        }
        write_report(args.out, report)
        print(report)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
