"""Shared pieces of the distributed examples: a tiny model with LoRA, per-rank data, a single-process reference.

Every example trains the same delta from the same initialization: LoRA (r=4) on the query/value projections of a
small random BERT classifier, with the classifier head kept trainable (``freeze_module(exclude=["deltas",
"classifier"])``). At step ``s`` the *global* batch is 8 sequences drawn from seed ``s``; rank ``r`` of ``w`` takes
rows ``r*8/w ... (r+1)*8/w``. With a mean loss and plain SGD, a data-parallel run is then the same computation as
one process on the whole batch, which :func:`reference` runs (the tests compare the two within 1e-6).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from deltakit import LoraModel

GLOBAL_BATCH = 8
STEPS = 3
LR = 0.1
VOCAB = 100


def build(seed: int = 0) -> tuple[nn.Module, LoraModel]:
    """The tiny backbone (dropout off, so every run is deterministic) with LoRA attached and frozen around it."""
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        initializer_range=0.3,  # larger than BERT's 0.02, so the gradients reach every LoRA tensor clearly
    )
    model = BertForSequenceClassification(config)
    delta = LoraModel(model, modified_modules=["query", "value"], lora_r=4, lora_alpha=8)
    with torch.no_grad():  # start from a non-zero B, so every LoRA tensor moves from the first step
        for name, param in delta.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.1)
    delta.freeze_module(exclude=["deltas", "classifier"])
    model.train()
    return model, delta


def batch(step: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """This rank's share of the global batch of ``step``."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(2, VOCAB, (GLOBAL_BATCH, 12), generator=g)
    labels = torch.randint(0, 2, (GLOBAL_BATCH,), generator=g)
    per = GLOBAL_BATCH // world
    rows = slice(rank * per, (rank + 1) * per)
    return {"input_ids": ids[rows], "attention_mask": torch.ones_like(ids[rows]), "labels": labels[rows]}


def reference(steps: int = STEPS) -> dict[str, torch.Tensor]:
    """The delta-only state after ``steps`` SGD steps in one process on the whole batches."""
    model, delta = build()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for step in range(steps):
        optimizer.zero_grad()
        model(**batch(step)).loss.backward()
        optimizer.step()
    state = {k: v.clone() for k, v in delta.delta_state_dict().items()}
    state.update({n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("classifier")})
    return state


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) as set by torchrun (0, 1 when run directly)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shutdown() -> None:
    """Tear the process group down on every rank, once all of them are done.

    Left to interpreter shutdown, gloo's background threads can still be joinable when their owner is destroyed,
    and the process aborts ("terminate called without an active exception") after a successful run.
    """
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def leave(code: int) -> None:
    """End the process with ``code`` once the work is done and the group destroyed, skipping interpreter teardown.

    gloo's (and DeepSpeed's) CPU communication objects can still own a joinable C++ thread when the interpreter
    destroys them, which aborts a rank ("terminate called without an active exception") after a successful run:
    seen in about 1 run in 10 for DeepSpeed and, even after :func:`shutdown`, now and then for Trainer + DDP.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def write_report(out: str, report: dict[str, Any]) -> None:
    """Rank 0 writes what the run checked to ``out/report.json`` (the tests read it)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
