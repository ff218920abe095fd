"""DeltaTrainer under DDP: transformers' Trainer on two CPU processes, delta-only checkpoints, exact resume.

Run::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 examples/distributed/trainer_ddp.py --out runs/trainer

Trainer wraps the model in DDP itself (``use_cpu=True`` + torchrun gives gloo); ``DeltaTrainer`` only changes what
a checkpoint holds. The script trains 4 steps with a checkpoint after step 2, then resumes a fresh model from that
checkpoint and trains to step 4 again: both runs must end with the same delta on every rank.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_common import VOCAB, build, leave, shutdown, write_report  # noqa: E402

from deltakit.integrations.trainer import DeltaTrainer  # noqa: E402


class Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, VOCAB, (n, 12), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def train(out: str, resume: str | None = None) -> tuple[dict[str, torch.Tensor], bool]:
    """Train (or resume) a fresh model; return its trainable tensors and whether Trainer wrapped it in DDP."""
    model, delta = build()
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=4, learning_rate=0.1, optim="sgd", max_steps=4, save_steps=2,
        logging_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True, max_grad_norm=0.0,
    )
    trainer = DeltaTrainer(model=model, delta=delta, args=args, train_dataset=Data())
    trainer.train(resume_from_checkpoint=resume)
    is_ddp = isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, is_ddp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    first, is_ddp = train(os.path.join(args.out, "run"))
    checkpoint = os.path.join(args.out, "run", "checkpoint-2")
    resumed, _ = train(os.path.join(args.out, "run"), resume=checkpoint)
    initial_model, _ = build()
    initial = {n: p for n, p in initial_model.named_parameters() if p.requires_grad}

    # Every rank ends with the same delta (DDP kept them in sync).
    flat = torch.cat([t.flatten() for t in resumed.values()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    if dist.get_rank() == 0:
        files = sorted(os.listdir(checkpoint))
        report = {
            "world": dist.get_world_size(),
            "trainer_used_ddp": is_ddp,
            "checkpoint_files": files,
            "checkpoint_is_delta_only": "delta_model.safetensors" in files
            and not any(f in files for f in ("model.safetensors", "config.json")),
            "resume_exact": all(torch.equal(first[k], resumed[k]) for k in first),
            "ranks_agree": all(torch.equal(gathered[0], g) for g in gathered),
            "every_tensor_trained": all(not torch.equal(initial[k], first[k]) for k in first),
        }
        write_report(args.out, report)
        print(report)
    shutdown()  # Trainer (through accelerate) created the gloo group
    return 0


if __name__ == "__main__":
    leave(main())  # without interpreter teardown (see dist_common.leave)
