"""LoRA with torch DDP, saved delta-only.

Run on CPU with two processes (one thread each, see docs/ecosystem.md)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 examples/distributed/ddp.py --out runs/ddp

DDP needs nothing special: the frozen backbone parameters have ``requires_grad=False`` and never enter DDP's
gradient buckets, so only the delta (and the trainable head) is all-reduced. This script checks that with a
communication hook that records every bucket's parameters, then saves the delta from rank 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_common import LR, STEPS, batch, build, rank_and_world, shutdown, write_report  # noqa: E402

from deltakit.integrations.distributed import save_delta_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for the delta checkpoint (out/delta) and report")
    args = parser.parse_args(argv)

    dist.init_process_group("gloo")
    rank, world = rank_and_world()
    model, delta = build()
    ddp = DDP(model)

    in_buckets: set[int] = set()

    def recording_allreduce(state, bucket):  # the default all-reduce, noting which parameters it carries
        in_buckets.update(id(p) for p in bucket.parameters())
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, recording_allreduce)
    optimizer = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        optimizer.zero_grad()
        ddp(**batch(step, rank, world)).loss.backward()
        optimizer.step()

    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    delta_ids = {id(p) for p in delta.parameters()}
    head_ids = {id(p) for p in model.classifier.parameters()}
    save_delta_checkpoint(ddp, delta, f"{args.out}/delta")
    if rank == 0:
        report = {
            "world": world,
            "buckets_hold_exactly_the_trainable_parameters": in_buckets == trainable,
            "buckets_hold_only_delta_and_head": in_buckets <= delta_ids | head_ids,
            "parameters_in_buckets": len(in_buckets),
            "frozen_parameters": sum(1 for p in model.parameters() if not p.requires_grad),
        }
        write_report(args.out, report)
        print(report)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
