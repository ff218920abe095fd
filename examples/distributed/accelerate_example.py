"""LoRA with accelerate (``Accelerator(cpu=True)``): training, and ``save_state`` / ``load_state`` that hold only
the delta.

Run on CPU with two processes (``accelerate launch --cpu`` would silently start ONE process; use torchrun)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 examples/distributed/accelerate_example.py --out runs/acc

:func:`~deltakit.integrations.distributed.register_accelerate_hooks` makes ``save_state`` write deltakit's
``delta_config.json`` + ``delta_model.safetensors`` instead of the full model (the optimizer and RNG states stay
accelerate's), and ``load_state`` load them back into the live parameters. This script trains two steps, saves
the state, trains one more step, then loads the state and trains that step again: the result must be the same.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_common import LR, STEPS, batch, build, write_report  # noqa: E402

from deltakit.integrations.distributed import register_accelerate_hooks, save_delta_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for the delta checkpoint (out/delta) and report")
    args = parser.parse_args(argv)

    accelerator = Accelerator(cpu=True)  # without cpu=True each rank would silently train alone
    rank, world = accelerator.process_index, accelerator.num_processes
    model, delta = build()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    register_accelerate_hooks(accelerator, delta)

    def train_step(step: int) -> None:
        optimizer.zero_grad()
        accelerator.backward(model(**batch(step, rank, world)).loss)
        optimizer.step()

    for step in range(STEPS - 1):
        train_step(step)
    state_dir = os.path.join(args.out, "state")
    accelerator.save_state(state_dir)
    train_step(STEPS - 1)
    first = {k: v.clone() for k, v in delta.delta_state_dict().items()}
    accelerator.load_state(state_dir)
    train_step(STEPS - 1)
    again = delta.delta_state_dict()

    save_delta_checkpoint(model, delta, f"{args.out}/delta")
    if accelerator.is_main_process:
        files = sorted(os.listdir(state_dir))
        report = {
            "world": world,
            "state_files": files,
            "state_holds_no_full_model": not any(f.startswith(("model", "pytorch_model")) for f in files),
            "state_holds_the_delta": {"delta_config.json", "delta_model.safetensors"} <= set(files),
            "load_state_then_same_step_is_exact": all(torch.equal(first[k], again[k]) for k in first),
        }
        write_report(args.out, report)
        print(report)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
