"""Encoding, evaluating and training a sequence classifier (shared by the demo and the examples)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from .threads import pick_num_threads, usable_cores


def encode(tokenizer: Any, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Tokenize a batch, padded to its longest sentence."""
    return dict(tokenizer(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt"))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the previous count after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.inference_mode()
def logits_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of ``model`` on ``batch`` in eval mode (the model's training flag is restored).

    Computed on one thread: kernels may split reductions differently for other thread counts, and the exactness
    checks compare these logits bit-for-bit across a run whose thread count can change.
    """
    was_training = model.training
    model.eval()
    try:
        with torch_threads(1):
            return model(**batch).logits.detach().clone()
    finally:
        model.train(was_training)


@torch.inference_mode()
def accuracy(model: nn.Module, tokenizer: Any, data: Sequence[tuple[str, int]], batch_size: int = 128) -> float:
    """Accuracy of ``model`` on ``(text, label)`` pairs, in eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, len(data), batch_size):
            chunk = data[start : start + batch_size]
            predictions = model(**encode(tokenizer, [t for t, _ in chunk])).logits.argmax(-1)
            correct += int((predictions == torch.tensor([y for _, y in chunk])).sum())
    finally:
        model.train(was_training)
    return correct / max(1, len(data))


def train(
    model: nn.Module,
    tokenizer: Any,
    data: Sequence[tuple[str, int]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    console: Console,
    show_progress: bool = True,
    retune_threads_every: int | None = None,
    max_threads: int | None = None,
    thread_log: list[int] | None = None,
) -> float:
    """Train the trainable parameters of ``model`` with AdamW and a linear warm-up/decay schedule.

    Batches are drawn from shuffled passes over ``data``.

    Args:
        model: The model; only parameters with ``requires_grad`` are optimised.
        tokenizer: Its tokenizer.
        data: ``(text, label)`` pairs.
        steps: Number of optimiser steps.
        batch_size: Sentences per step.
        lr: Peak learning rate.
        seed: Seed of the batch order.
        console: Where the progress bar is drawn.
        show_progress: Draw a rich progress bar.
        retune_threads_every: Re-run :func:`pick_num_threads` every this many steps (the machine's load may change
            during training); ``None`` keeps the current thread count.
        max_threads: Upper bound for the re-tuning (default: :func:`usable_cores`).
        thread_log: If given, the thread count of every step is appended to it.

    Returns:
        The mean loss over the last 10% of the steps.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    order = random.Random(f"deltakit-demo-batches-{seed}")
    pool: list[int] = []
    tail_losses: list[float] = []
    model.train()
    columns = (
        TextColumn("[bold blue]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not show_progress, transient=False) as progress:
        task = progress.add_task("train", total=steps, loss=float("nan"))
        for step in range(steps):
            if retune_threads_every and step > 0 and step % retune_threads_every == 0:
                pick_num_threads(max_threads or usable_cores())
            if thread_log is not None:
                thread_log.append(torch.get_num_threads())
            if len(pool) < batch_size:
                fresh = list(range(len(data)))
                order.shuffle(fresh)
                pool.extend(fresh)
            idx, pool = pool[:batch_size], pool[batch_size:]
            batch = encode(tokenizer, [data[i][0] for i in idx])
            labels = torch.tensor([data[i][1] for i in idx])
            loss = nn.functional.cross_entropy(model(**batch).logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            value = float(loss.detach())
            if step >= steps - max(1, steps // 10):
                tail_losses.append(value)
            progress.update(task, advance=1, loss=value)
    model.eval()
    return sum(tail_losses) / max(1, len(tail_losses))
