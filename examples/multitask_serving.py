"""Multi-task serving: three task deltas on one frozen MiniLM, served by switching and by one mixed batch.

In the spirit of OpenDelta's multitask-serving example, on CPU and offline:

1. three tasks are generated in code: sentiment (``deltakit.demo``'s compositional task: "the film was not very
   good"), topic (sports / food / technology / travel) and question-vs-statement ("is the hotel clean" against
   "the hotel is clean", with "i wonder why the hotel is clean" a statement);
2. one LoRA delta per task is trained on the real all-MiniLM-L6-v2 and saved. Each delta also holds its task head:
   the backbone's 4-way classifier is a fixed (seeded) random matrix, frozen, and a LoRA on it (rank 8 >= 4 labels)
   learns the task's head, so nothing task-specific lives in the shared backbone;
3. a fresh backbone loads the three checkpoints into a :class:`deltakit.DeltaGroup` under their names and serves a
   shuffled stream of requests two ways: switching the active delta per request (``group.switch(task)``, batch of
   1), and one mixed batch in which every request uses its own delta (``group.route(tasks)``). Each request's
   answers are printed, with the throughput of both ways and a check that they agree.

Run:  python examples/multitask_serving.py           (real MiniLM, 1-3 minutes on two CPU cores)
      python examples/multitask_serving.py --tiny    (a random two-layer BERT and word-level tokenizer, seconds;
                                                       checks the mechanics, does not learn the tasks)
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from deltakit import DeltaGroup, LoraModel
from deltakit import demo

# ---------------------------------------------------------------------------------------------------------- tasks

TOPICS: dict[str, dict[str, tuple[str, ...]]] = {
    "sports": {
        "subjects": ("the team", "the coach", "the striker", "the referee", "our club", "the goalkeeper"),
        "verbs": ("won", "lost", "played", "scored in", "trained for", "celebrated"),
        "objects": ("the match", "the final", "the league", "the penalty shootout", "the derby", "the tournament"),
    },
    "food": {
        "subjects": ("the chef", "my grandmother", "the baker", "the waiter", "our cook", "the restaurant"),
        "verbs": ("cooked", "baked", "served", "tasted", "seasoned", "prepared"),
        "objects": ("the soup", "a chocolate cake", "the pasta", "fresh bread", "the curry", "a vegetable stew"),
    },
    "technology": {
        "subjects": ("the engineer", "the startup", "my laptop", "the developer", "the phone", "the company"),
        "verbs": ("installed", "released", "crashed during", "downloaded", "debugged", "updated"),
        "objects": ("the software", "a new app", "the operating system", "the firmware", "the database", "the browser"),
    },
    "travel": {
        "subjects": ("the tourists", "my sister", "the pilot", "our guide", "the backpacker", "the family"),
        "verbs": ("visited", "booked", "flew to", "explored", "missed", "packed for"),
        "objects": (
            "the island", "a mountain village", "the airport", "the old harbour", "the museum", "a beach resort",
        ),
    },
}  # fmt: skip
FILLERS = ("", "yesterday", "last week", "again", "in the morning", "as usual")

AUX = ("is", "was", "seems")
QUESTION_OPENERS = ("", "why", "how", "when")
EMBEDDERS = ("i wonder why", "nobody knows why", "i know how", "she asked when")

LABELS: dict[str, list[str]] = {
    "sentiment": ["negative", "positive"],
    "topic": list(TOPICS),
    "question": ["statement", "question"],
}
TASKS = tuple(LABELS)
NUM_LABELS = 4


def topic_task(seed: int, n_train: int, n_test: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Topic classification; the test split holds (subject, object) pairings never seen in training."""
    rng = random.Random(f"multitask-topic-{seed}")
    held = {(t, rng.randrange(6), rng.randrange(6)) for t in TOPICS for _ in range(6)}
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    seen: set[str] = set()
    while len(train) < n_train or len(test) < n_test:
        label = rng.randrange(len(TOPICS))
        topic = list(TOPICS)[label]
        words = TOPICS[topic]
        s, o = rng.randrange(6), rng.randrange(6)
        text = " ".join(w for w in (words["subjects"][s], rng.choice(words["verbs"]), words["objects"][o],
                                    rng.choice(FILLERS)) if w)
        split = test if (topic, s, o) in held else train
        if text not in seen and len(split) < (n_test if split is test else n_train):
            seen.add(text)
            split.append((text, label))
    return train, test


def question_task(seed: int, n_train: int, n_test: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Question (1) or statement (0), by word order only (no punctuation). Embedded questions ("i wonder why the
    hotel is clean") are statements. The test split uses subjects never seen in training."""
    rng = random.Random(f"multitask-question-{seed}")
    subjects = list(demo.SUBJECTS) + [s for t in TOPICS.values() for s in t["subjects"]]
    rng.shuffle(subjects)
    test_subjects = set(subjects[: len(subjects) // 4])
    adjectives = demo.POSITIVE + demo.NEGATIVE
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    seen: set[str] = set()
    while len(train) < n_train or len(test) < n_test:
        subject, aux, adjective = rng.choice(subjects), rng.choice(AUX), rng.choice(adjectives)
        kind = rng.randrange(3)
        if kind == 0:  # question: (wh) aux subject adjective
            text, label = " ".join(w for w in (rng.choice(QUESTION_OPENERS), aux, subject, adjective) if w), 1
        elif kind == 1:  # statement: subject aux adjective
            text, label = f"{subject} {aux} {adjective}", 0
        else:  # embedded question: a statement
            text, label = f"{rng.choice(EMBEDDERS)} {subject} {aux} {adjective}", 0
        split = test if subject in test_subjects else train
        if text not in seen and len(split) < (n_test if split is test else n_train):
            seen.add(text)
            split.append((text, label))
    return train, test


def make_tasks(seed: int, n_train: int, n_test: int) -> dict[str, tuple[list[tuple[str, int]], list[tuple[str, int]]]]:
    """The three tasks as ``{task: (train, test)}`` lists of ``(text, label)``."""
    return {
        "sentiment": demo.make_task(seed, n_train, n_test),
        "topic": topic_task(seed, n_train, n_test),
        "question": question_task(seed, n_train, n_test),
    }


def vocabulary(tasks: dict[str, Any]) -> list[str]:
    """Every word of every task (the ``--tiny`` word-level tokenizer's vocabulary)."""
    return sorted({w for train, test in tasks.values() for text, _ in train + test for w in text.split()})


# ---------------------------------------------------------------------------------------------------------- models


def build_backbone(tiny: bool, vocab_size: int) -> nn.Module:
    """MiniLM (or a random tiny BERT) with a fixed 4-way classifier: every task's head lives in its delta."""
    torch.manual_seed(0)
    if tiny:
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, num_labels=NUM_LABELS, pad_token_id=0,
        )
        model = BertForSequenceClassification(config)
    else:
        from transformers import AutoModelForSequenceClassification

        with demo.quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(
                demo.real_model_path(), num_labels=NUM_LABELS, local_files_only=True
            )
    # A fixed random head, the same in every copy of the backbone (its own seeded generator), frozen with the rest:
    # each task's LoRA on it makes the task's head. Random rather than zero, so that gradients reach the attention
    # LoRAs from the first step.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1234)
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=gen) * 0.02)
        model.classifier.bias.zero_()
    return model.eval()


def new_task_delta(model: nn.Module, task: str) -> LoraModel:
    """LoRA on the attention query/value projections and on the (fixed, frozen) classifier."""
    return LoraModel(model, modified_modules=["attn.q", "attn.v", "classifier"], lora_r=8, lora_alpha=16, name=task)


def train_task(
    model: nn.Module, tokenizer: Any, task: str, data: Sequence[tuple[str, int]], *, steps: int, lr: float, seed: int,
    console: Console, verbose: bool,
) -> float:
    """Train the trainable parameters (the task's delta) with AdamW, linear warm-up and decay, batches of 32.

    The loss reads only the task's own logits (the first ``len(LABELS[task])`` of the 4): a 2-way task then starts
    at chance instead of first having to push two unused logits down. Returns the mean loss of the last 10 steps.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    rng = random.Random(f"multitask-batches-{task}-{seed}")
    n_labels = len(LABELS[task])
    losses: list[float] = []
    model.train()
    for step in range(steps):
        if step and step % 25 == 0:
            demo.pick_num_threads(demo.usable_cores())  # the machine's load may have changed
        idx = rng.sample(range(len(data)), min(32, len(data)))
        batch = demo.encode(tokenizer, [data[i][0] for i in idx])
        labels = torch.tensor([data[i][1] for i in idx])
        loss = nn.functional.cross_entropy(model(**batch).logits[:, :n_labels], labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if verbose and (step % 25 == 0 or step == steps - 1):
            console.print(f"    {task} step {step + 1:>3}/{steps}  loss {losses[-1]:.4f}", highlight=False)
    model.eval()
    return sum(losses[-10:]) / max(1, len(losses[-10:]))


@torch.inference_mode()
def task_accuracy(model: nn.Module, tokenizer: Any, task: str, data: Sequence[tuple[str, int]]) -> float:
    """Held-out accuracy, each prediction taken among the task's own labels."""
    correct = 0
    for start in range(0, len(data), 128):
        chunk = data[start : start + 128]
        logits = model(**demo.encode(tokenizer, [t for t, _ in chunk])).logits
        correct += sum(p == y for p, (_, y) in zip(answers(logits, [task] * len(chunk)), chunk))
    return correct / max(1, len(data))


def answers(logits: torch.Tensor, tasks: Sequence[str]) -> list[int]:
    """Each row's predicted label among its own task's labels."""
    return [int(row[: len(LABELS[t])].argmax()) for row, t in zip(logits, tasks)]


# ---------------------------------------------------------------------------------------------------------- main


def run(
    *, tiny: bool = False, steps: int | None = None, n_requests: int = 48, seed: int = 0,
    output_dir: str | None = None, console: Console | None = None,
) -> dict[str, Any]:
    """Train, save, load and serve; return the measurements (see the module docstring)."""
    console = console or Console()
    steps = (8 if tiny else 100) if steps is None else steps
    n_train, n_test = (200, 60) if tiny else (2000, 300)
    tasks = make_tasks(seed, n_train, n_test)
    if tiny:
        tokenizer = demo.build_tiny_tokenizer(vocabulary(tasks))
    else:
        tokenizer = demo.load_tokenizer(demo.real_model_path())
    output_dir = output_dir or tempfile.mkdtemp(prefix="deltakit-multitask-")
    threads = torch.get_num_threads()
    # On a shared machine two threads can be several times slower than one (descheduled workers stall the
    # kernels): measure, and re-measure during training, as the demo does.
    demo.pick_num_threads(demo.usable_cores())

    # 1-2. Train one delta per task on one backbone, save it, detach it.
    model = build_backbone(tiny, len(tokenizer))
    console.print(f"[bold]Training {len(TASKS)} task deltas[/bold] ({steps} steps each) on "
                  f"{'a random tiny BERT' if tiny else 'all-MiniLM-L6-v2'}; checkpoints in {output_dir}")
    accuracies: dict[str, float] = {}
    t0 = time.perf_counter()
    for task in TASKS:
        train, test = tasks[task]
        delta = new_task_delta(model, task)
        delta.freeze_module(exclude=["deltas"])
        loss = train_task(model, tokenizer, task, train, steps=steps, lr=1e-2 if tiny else 4e-3, seed=seed,
                          console=console, verbose=not tiny)
        accuracies[task] = task_accuracy(model, tokenizer, task, test)
        delta.save_finetuned(os.path.join(output_dir, task))
        delta.detach()
        console.print(f"  {task:<10} final loss {loss:.3f}  held-out accuracy {accuracies[task]:.3f}  "
                      f"({delta.num_delta_parameters():,} delta parameters)")
    train_seconds = time.perf_counter() - t0

    # 3. A fresh backbone with the three checkpoints, by name.
    backbone = build_backbone(tiny, len(tokenizer))
    group = DeltaGroup(backbone)
    for task in TASKS:
        group.load(task, os.path.join(output_dir, task))
    console.print(f"\n[bold]Serving[/bold] {group}")

    rng = random.Random(f"multitask-requests-{seed}")
    per_task = max(1, n_requests // len(TASKS))
    stream = [(task, example) for task in TASKS for example in rng.sample(tasks[task][1], per_task)]
    rng.shuffle(stream)
    names = [task for task, _ in stream]
    texts = [text for _, (text, _) in stream]
    gold = [label for _, (_, label) in stream]
    encoded = [demo.encode(tokenizer, [t]) for t in texts]
    batch = demo.encode(tokenizer, texts)

    def serve_switching() -> torch.Tensor:
        rows = []
        for task, enc in zip(names, encoded):
            group.switch(task)
            rows.append(backbone(**enc).logits[0])
        group.switch(None)
        return torch.stack(rows)

    def serve_mixed() -> torch.Tensor:
        with group.route(names):
            return backbone(**batch).logits

    with torch.inference_mode(), demo.torch_threads(1):
        serve_switching(), serve_mixed()  # warm-up
        timings: dict[str, list[float]] = {"switching": [], "mixed": []}
        for _ in range(3):  # interleaved; medians of the CPU clock (the machine may be shared)
            for way, fn in (("switching", serve_switching), ("mixed", serve_mixed)):
                c0 = time.process_time()
                out = fn()
                timings[way].append(time.process_time() - c0)
                if way == "switching":
                    switched = out
                else:
                    mixed = out
    torch.set_num_threads(threads)
    by_switching, by_mixed = answers(switched, names), answers(mixed, names)
    # The two ways compute the same logits up to float rounding (batched vs single matmuls); an argmax could only
    # differ on an exact tie.
    agree = torch.allclose(switched, mixed, atol=1e-4, rtol=1e-4)
    max_diff = float((switched - mixed).abs().max())

    table = Table(title=f"{len(stream)} mixed requests", show_edge=False, pad_edge=False)
    for column in ("#", "task", "request", "by switching", "by mixed batch", "expected"):
        table.add_column(column, no_wrap=column != "request")
    for i, (task, text) in enumerate(zip(names, texts)):
        expected = LABELS[task][gold[i]]
        mark = "" if by_mixed[i] == gold[i] else " (wrong)"
        table.add_row(str(i), task, text, LABELS[task][by_switching[i]], LABELS[task][by_mixed[i]] + mark, expected)
    console.print()
    console.print(table)
    medians = {way: sorted(ts)[len(ts) // 2] for way, ts in timings.items()}
    throughput = {way: len(stream) / max(t, 1e-9) for way, t in medians.items()}
    served_accuracy = sum(p == g for p, g in zip(by_mixed, gold)) / len(gold)
    console.print(
        f"\nthroughput (one thread, CPU-clock medians of 3 interleaved runs; the machine may be busy with other "
        f"work): switching per request {throughput['switching']:.1f} req/s, one mixed batch "
        f"{throughput['mixed']:.1f} req/s ({throughput['mixed'] / throughput['switching']:.1f}x)"
    )
    console.print(f"answers agree between the two ways: {agree} (largest logit difference {max_diff:.1e}; "
                  f"{sum(a != b for a, b in zip(by_switching, by_mixed))} different answers)")
    console.print(f"accuracy on the served stream: {served_accuracy:.3f}")
    return {
        "accuracies": accuracies, "served_accuracy": served_accuracy, "agree": agree, "throughput": throughput,
        "train_seconds": train_seconds, "output_dir": output_dir, "requests": len(stream),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="random tiny BERT: checks the mechanics in seconds")
    parser.add_argument("--steps", type=int, default=None, help="training steps per task (default 100; tiny 8)")
    parser.add_argument("--requests", type=int, default=48, help="number of requests in the served stream")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="where the checkpoints go (default: a new temp dir)")
    args = parser.parse_args(argv)
    result = run(tiny=args.tiny, steps=args.steps, n_requests=args.requests, seed=args.seed, output_dir=args.output_dir)
    return 0 if result["agree"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
