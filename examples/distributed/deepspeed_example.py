"""LoRA with DeepSpeed ZeRO-2 or ZeRO-3 on CPU, and a complete delta-only save (also under ZeRO-3).

Run on CPU with two processes (the first ``import deepspeed`` compiles a small op, about a minute)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 examples/distributed/deepspeed_example.py --stage 3 --out runs/ds3

Under ZeRO-3 every parameter is partitioned and reads as ``torch.Size([0])`` outside a gather, which is how PEFT
users end up with empty adapters. :func:`~deltakit.integrations.distributed.save_delta_checkpoint` gathers only
the delta's parameters (``deepspeed.zero.GatheredParameters``) on every rank and rank 0 writes them, complete.
``stage3_param_persistence_threshold: 0`` makes ZeRO-3 partition even this tiny model's small tensors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_common import GLOBAL_BATCH, LR, STEPS, batch, build, leave, rank_and_world, shutdown, write_report  # noqa: E402

from deltakit import DeltaError  # noqa: E402
from deltakit.integrations.distributed import delta_state_dict, load_delta_checkpoint, save_delta_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, choices=[2, 3], default=3, help="ZeRO stage")
    parser.add_argument("--out", required=True, help="directory for the delta checkpoint (out/delta) and report")
    args = parser.parse_args(argv)

    dist.init_process_group("gloo")  # DeepSpeed uses the existing gloo group on CPU
    rank, world = rank_and_world()
    model, delta = build()
    config = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": args.stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,  # plain SGD, so the run compares exactly with the reference
        "gradient_clipping": 0.0,  # DeepSpeed would otherwise clip the global gradient norm to 1.0
        "steps_per_print": 10_000,
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=trainable, optimizer=torch.optim.SGD(trainable, lr=LR), config=config
    )
    for step in range(STEPS):
        loss = engine(**batch(step, rank, world)).loss
        engine.backward(loss)
        engine.step()

    lora_A = next(p for n, p in delta.named_parameters() if n.endswith("lora_A"))
    partitioned = tuple(lora_A.shape) == (0,) if args.stage == 3 else None
    path = f"{args.out}/delta"
    saved = save_delta_checkpoint(engine, delta, path)

    # Loading into a training engine is refused: ZeRO's fp32 master copies would undo it at the next step.
    try:
        load_delta_checkpoint(engine, delta, saved)
        refused = False
    except DeltaError:
        refused = True
    # Loading into a model sharded for inference (ZeRO-3 without an optimizer) works: the delta is gathered,
    # rank 0's copy is written, and DeepSpeed re-partitions it.
    reload_exact = None
    if args.stage == 3:
        fresh, fresh_delta = build()
        with torch.no_grad():
            for p in fresh_delta.parameters():
                p.zero_()
        inference = {k: v for k, v in config.items() if k != "zero_allow_untested_optimizer"}
        fresh_engine, _, _, _ = deepspeed.initialize(model=fresh, config=inference)
        load_delta_checkpoint(fresh_engine, fresh_delta, saved)
        reloaded = delta_state_dict(fresh_engine, fresh_delta)
        trained = delta_state_dict(engine, delta)
        reload_exact = all(torch.equal(trained[k], reloaded[k]) for k in trained)
    if rank == 0:
        report = {
            "world": world,
            "stage": args.stage,
            "delta_partitioned_in_the_model": partitioned,
            "load_into_training_engine_refused": refused,
            "load_into_zero3_inference_engine_exact": reload_exact,
        }
        write_report(args.out, report)
        print(report)
    shutdown()
    return 0


if __name__ == "__main__":
    leave(main())  # without interpreter teardown (see dist_common.leave)
