"""Automatic delta-structure search against single methods and random structures, at several parameter budgets.

On the six-class topic x sentiment task (:mod:`deltakit.demo.topic_sentiment`: held-out nouns, adjectives and
pairings) with all-MiniLM-L6-v2, for each budget it trains, from a fresh backbone and with the classifier head
trainable in every run:

* single methods sized to the budget (LoRA r=1 or 8 on query+value of some layers, BitFit on some modules, an
  adapter), where the method can be sized so;
* random structures: candidates in a random order, each taken while it fits (``--random`` of them per budget);
* the searched structure: :class:`deltakit.search.StructureSearch` over the same candidates (rank-1 LoRA on every
  projection, BitFit on every projection and norm, a bottleneck-8 adapter after every attention and FFN output),
  ``--search-steps`` of joint gate + delta training, greedy knapsack, then the structure retrained from scratch;
* references: full fine-tuning and a linear probe (head only).

Every configuration runs for each of ``--seeds`` seeds (the seed sets the head and delta initialisation, dropout
and the batch order; the task is the same). Outputs: a table (mean and spread per configuration), JSON, markdown,
and a figure of held-out accuracy against trainable delta parameters (log scale), ``docs/structure_search.png``.

Run:  python examples/structure_search.py --threads 1          (the real model; see docs/structure_search.md)
      python examples/structure_search.py --tiny               (a random tiny BERT, seconds: mechanics only)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import deltakit
from deltakit import demo
from deltakit.demo.topic_sentiment import NUM_LABELS, make_topic_task, topic_vocabulary
from deltakit.search import CandidateSet, StructureSearch, random_structure

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PLOT = REPO / "docs" / "structure_search.png"

#: The search space: every projection and norm of every layer, three kinds of delta.
CANDIDATES = (
    CandidateSet("lora", ("attn.q", "attn.k", "attn.v", "attn.o", "ff.w1", "ff.w2"), {"lora_r": 1, "lora_alpha": 2}),
    CandidateSet("bitfit", ("attn.q", "attn.k", "attn.v", "attn.o", "ff.w1", "ff.w2", "attn.norm", "ff.norm")),
    CandidateSet("adapter", ("attn.o", "ff.w2"), {"bottleneck_dim": 8}),
)


class Single(NamedTuple):
    """A single method sized to a budget (a NamedTuple: the tests load this file without ``sys.modules``)."""

    key: str
    label: str
    budget: int  # index into the budget list
    build: Callable[[nn.Module], deltakit.DeltaBase]


def _last_layers(role_suffixes: tuple[str, ...], layers: range) -> list[str]:
    """``[r]`` patterns for some modules of some layers (``encoder.layer.<i>.<suffix>``)."""
    return [f"[r]encoder\\.layer\\.{i}\\.{s}" for i in layers for s in role_suffixes]


def singles(tiny: bool) -> list[Single]:
    """The single-method rows: LoRA and BitFit at every budget they reach, an adapter at the largest."""
    n = 2 if tiny else 6
    last = range(n - 1, n)
    return [
        Single("lora", "LoRA", 0, lambda m: deltakit.LoraModel(
            m, modified_modules=_last_layers(("attention\\.self\\.query", "attention\\.self\\.value"), last),
            lora_r=1, lora_alpha=2)),
        Single("bitfit", "BitFit", 0, lambda m: deltakit.BitFitModel(
            m, modified_modules=_last_layers(("attention\\.output\\.LayerNorm", "output\\.LayerNorm"), last)
            + _last_layers(("attention\\.output\\.LayerNorm", "output\\.LayerNorm"), range(n - 2, n - 1)))),
        Single("lora", "LoRA", 1, lambda m: deltakit.LoraModel(
            m, modified_modules=["attn.q", "attn.v"], lora_r=1, lora_alpha=2)),
        Single("bitfit", "BitFit", 1, lambda m: deltakit.BitFitModel(
            m, modified_modules=["attn.o", "ff.w2", "attn.norm", "ff.norm"])),
        Single("lora", "LoRA", 2, lambda m: deltakit.LoraModel(
            m, modified_modules=["attn.q", "attn.v"], lora_r=8, lora_alpha=16)),
        Single("adapter", "Adapter", 2, lambda m: deltakit.AdapterModel(m, bottleneck_dim=8)),
    ]  # fmt: skip


#: Mode settings: budgets (delta parameters; the LoRA rows' sizes), steps, batch size, train/test sizes.
MODES: dict[str, dict[str, Any]] = {
    "real": {"budgets": [1536, 9216, 73728], "steps": 250, "batch_size": 16, "sizes": (2000, 600)},
    "tiny": {"budgets": [128, 256, 1024], "steps": 4, "batch_size": 8, "sizes": (200, 60)},
}
#: Peak learning rates: every delta structure shares one (single methods, random and searched structures), so
#: the comparison is about where the parameters go, not about tuning.
LR = {"delta": 5e-3, "full": 1e-4, "probe": 1e-2, "gate": 0.1}
#: Share of the search steps run with every gate open (``StructureSearch.fit(open_steps=...)``). Without it, at the
#: smallest budget (every p_i near 1e-2 at the start) the search chose no better than chance: 0.535 held-out at
#: 1,536 parameters on seed 0, against 0.66 with half the steps open (docs/structure_search.md).
OPEN_FRACTION = 0.5


class Setup:
    """The tokenizer, the task and fresh backbones (real MiniLM with a six-label head, or a tiny random BERT)."""

    def __init__(self, tiny: bool) -> None:
        self.tiny = tiny
        sizes = MODES["tiny" if tiny else "real"]["sizes"]
        self.train_set, self.test_set = make_topic_task(0, *sizes)
        if tiny:
            self.tokenizer = demo.build_tiny_tokenizer(topic_vocabulary())
            self.name = "random tiny BERT (2 layers, hidden 32)"
        else:
            self.path = demo.real_model_path()
            self.tokenizer = demo.load_tokenizer(self.path)
            self.name = "sentence-transformers/all-MiniLM-L6-v2"

    def fresh(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)  # the classifier head's initialisation
        if self.tiny:
            from transformers import BertConfig, BertForSequenceClassification

            config = BertConfig(vocab_size=len(self.tokenizer), hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                num_labels=NUM_LABELS, pad_token_id=0)  # fmt: skip
            torch.manual_seed(0)  # the same "pretrained" backbone every time; the head from the seed below
            model = BertForSequenceClassification(config)
            torch.manual_seed(seed)
            model.classifier.reset_parameters()
            return model.eval()
        from transformers import AutoModelForSequenceClassification

        with demo.quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(
                self.path, num_labels=NUM_LABELS, local_files_only=True
            )
        return model.eval()


def batches(data: list[tuple[str, int]], tokenizer: Any, batch_size: int, seed: int) -> Callable[[int], tuple]:
    """``step -> (encoded batch, labels)``: shuffled passes over ``data`` (the order depends only on ``seed``)."""
    rng = random.Random(f"deltakit-structure-search-batches-{seed}")
    order: list[int] = []
    cache: dict[int, tuple] = {}

    def get(step: int) -> tuple:
        while len(order) < (step + 1) * batch_size:
            fresh = list(range(len(data)))
            rng.shuffle(fresh)
            order.extend(fresh)
        if step not in cache:
            idx = order[step * batch_size:(step + 1) * batch_size]
            cache[step] = (demo.encode(tokenizer, [data[i][0] for i in idx]), torch.tensor([data[i][1] for i in idx]))
        return cache[step]

    return get


def train_and_score(model: nn.Module, setup: Setup, *, steps: int, batch_size: int, lr: float, seed: int) -> dict:
    """Train the parameters with ``requires_grad`` (AdamW, warm-up and linear decay), then measure accuracy."""
    get = batches(setup.train_set, setup.tokenizer, batch_size, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    t0 = time.perf_counter()
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)  # dropout
        for step in range(steps):
            batch, labels = get(step)
            loss = nn.functional.cross_entropy(model(**batch).logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    seconds = time.perf_counter() - t0
    return {
        "heldout_accuracy": demo.accuracy(model, setup.tokenizer, setup.test_set),
        "train_accuracy": demo.accuracy(model, setup.tokenizer, setup.train_set[: len(setup.test_set)]),
        "train_seconds": seconds,
    }


def freeze_all_but(model: nn.Module, keep: list[nn.Parameter]) -> None:
    ids = {id(p) for p in keep}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)


def run_delta(setup: Setup, build: Callable[[nn.Module], deltakit.DeltaBase], seed: int, cfg: dict) -> dict:
    model = setup.fresh(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)  # the delta's initialisation
        delta = build(model)
    freeze_all_but(model, [*delta.parameters(), *model.classifier.parameters()])
    row = train_and_score(model, setup, steps=cfg["steps"], batch_size=cfg["batch_size"], lr=LR["delta"], seed=seed)
    return {**row, "parameters": delta.num_delta_parameters()}


def run_reference(setup: Setup, kind: str, seed: int, cfg: dict) -> dict:
    model = setup.fresh(seed)
    freeze_all_but(model, list(model.parameters()) if kind == "full" else list(model.classifier.parameters()))
    row = train_and_score(model, setup, steps=cfg["steps"], batch_size=cfg["batch_size"], lr=LR[kind], seed=seed)
    backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("classifier"))
    return {**row, "parameters": backbone if kind == "full" else 0}


def run_search(setup: Setup, budget: int, seed: int, cfg: dict, search_steps: int) -> dict:
    """Search on a fresh backbone, select, then retrain the structure from scratch on another fresh backbone."""
    model = setup.fresh(seed)
    t0 = time.perf_counter()
    search = StructureSearch(model, CANDIDATES, budget, seed=seed)
    freeze_all_but(model, [*search.delta_parameters(), *model.classifier.parameters()])
    get = batches(setup.train_set, setup.tokenizer, cfg["batch_size"], seed)

    def loss_of(step: int) -> torch.Tensor:
        batch, labels = get(step)
        return nn.functional.cross_entropy(model(**batch).logits, labels)

    search.fit(loss_of, steps=search_steps, lr=LR["delta"], gate_lr=LR["gate"],
               extra_parameters=list(model.classifier.parameters()),
               open_steps=min(search_steps - 1, int(OPEN_FRACTION * search_steps)))  # fmt: skip
    structure = search.select()
    search.detach()
    search_seconds = time.perf_counter() - t0
    row = run_delta(setup, structure.build, seed, cfg)
    return {**row, "search_seconds": search_seconds, "structure": structure.describe(),
            "modules": [c.label for c in structure.chosen]}  # fmt: skip


def summarise(rows: list[dict]) -> list[dict]:
    """Mean, spread (sample standard deviation) and count per configuration."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kind"], r["label"], r["budget"]), []).append(r)
    out = []
    for (kind, label, budget), items in groups.items():
        accs = [r["heldout_accuracy"] for r in items]
        out.append({
            "kind": kind, "label": label, "budget": budget, "runs": len(items),
            "parameters": statistics.mean(r["parameters"] for r in items),
            "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "min": min(accs), "max": max(accs),
            "train_seconds": statistics.mean(r["train_seconds"] + r.get("search_seconds", 0.0) for r in items),
        })  # fmt: skip
    return out


def markdown(summary: list[dict], info: dict) -> str:
    lines = [(f"Held-out accuracy on the topic x sentiment task ({info['model']}, {info['steps']} steps x "
              f"{info['batch_size']}, {info['seeds']} seeds; mean ± sample std, [min, max])."), "",
             "| budget | configuration | delta params | held-out acc | runs | seconds / run |",
             "|---:|---|---:|---|---:|---:|"]  # fmt: skip
    for s in summary:
        budget = "-" if s["budget"] is None else f"{s['budget']:,}"
        lines.append(f"| {budget} | {s['label']} | {s['parameters']:,.0f} | {s['mean']:.3f} ± {s['std']:.3f} "
                     f"[{s['min']:.3f}, {s['max']:.3f}] | {s['runs']} | {s['train_seconds']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], summary: list[dict], info: dict, path: Path) -> None:
    """Held-out accuracy against delta parameters (log x): every run as a point, means as larger markers."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    styles = {"LoRA": ("#4c72b0", "o"), "BitFit": ("#55a868", "s"), "Adapter": ("#8172b2", "D"),
              "random structure": ("#999999", "."), "searched structure": ("#c44e52", "*")}  # fmt: skip
    for label, (color, marker) in styles.items():
        pts = [r for r in rows if r["label"] == label]
        if not pts:
            continue
        ax.scatter([r["parameters"] for r in pts], [r["heldout_accuracy"] for r in pts], color=color,
                   marker=marker, alpha=0.35, s=18 if marker != "*" else 60)  # fmt: skip
        means = [s for s in summary if s["label"] == label]
        ax.errorbar([s["parameters"] for s in means], [s["mean"] for s in means], yerr=[s["std"] for s in means],
                    color=color, marker=marker, ms=9 if marker != "*" else 15, lw=1.2, capsize=3,
                    label=f"{label} (mean ± std)")  # fmt: skip
    for kind, style in (("full", "--"), ("probe", ":")):
        ref = [s for s in summary if s["kind"] == kind]
        if ref:
            ax.axhline(ref[0]["mean"], color="black", ls=style, lw=1,
                       label=f"{ref[0]['label']} ({ref[0]['mean']:.3f})")  # fmt: skip
    ax.axhline(1 / NUM_LABELS, color="#bbbbbb", ls="-.", lw=1, label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("trainable delta parameters (log; the 6-class head is trained in every run)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Structure search vs single methods and random structures\n{info['model']}, {info['steps']} "
                 f"steps x {info['batch_size']}, {info['seeds']} seeds"
                 + (" (tiny random backbone: not meaningful)" if info["tiny"] else ""), fontsize=10)  # fmt: skip
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="random tiny BERT, a few steps (mechanics only)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default 3; tiny 1)")
    parser.add_argument("--random", type=int, default=None, help="random structures per budget (default 5; tiny 2)")
    parser.add_argument("--budgets", type=int, nargs="+", default=None, help="budget indices to run (default all)")
    parser.add_argument("--steps", type=int, default=None, help="training steps of every run")
    parser.add_argument("--search-steps", type=int, default=None, help="search steps (default: half of --steps)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: measured)")
    parser.add_argument("--plot", default=None, help="figure path (default docs/structure_search.png; tiny: none)")
    parser.add_argument("--json", default=None, help="write every run and the summary as JSON here")
    parser.add_argument("--markdown", default=None, help="write the summary table as markdown here")
    parser.add_argument("--quiet", action="store_true", help="no per-run lines")
    parser.add_argument("--reuse", default=None, help="a JSON of an earlier run: take its runs instead of repeating "
                        "them (same configuration, budget and seed), except the kinds given to --rerun")
    parser.add_argument("--rerun", nargs="*", default=[], choices=["full", "probe", "single", "random", "searched"],
                        help="with --reuse: kinds to run again (e.g. searched, after changing the search)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the experiment; 0 on success, 2 when the real model is not installed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    mode = "tiny" if args.tiny else "real"
    cfg = dict(MODES[mode])
    if args.steps is not None:
        cfg["steps"] = args.steps
    seeds = args.seeds if args.seeds is not None else (1 if args.tiny else 3)
    n_random = args.random if args.random is not None else (2 if args.tiny else 5)
    search_steps = args.search_steps if args.search_steps is not None else max(1, cfg["steps"] // 2)
    budgets = list(range(len(cfg["budgets"]))) if args.budgets is None else args.budgets
    if cfg["steps"] < 1 or seeds < 1 or n_random < 0 or search_steps < 1:
        parser.error("--steps, --seeds and --search-steps must be >= 1, --random >= 0")
    if any(not 0 <= b < len(cfg["budgets"]) for b in budgets):
        parser.error(f"--budgets takes indices 0..{len(cfg['budgets']) - 1}")
    console = Console() if sys.stdout.isatty() else Console(width=120)
    try:
        setup = Setup(args.tiny)
    except demo.DemoSetupError as exc:
        console.print(f"[bold red]error:[/bold red] {exc}")
        return 2
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads) if args.threads else demo.pick_num_threads(demo.usable_cores())
    t_start = time.perf_counter()
    rows: list[dict] = []

    earlier: dict[tuple, list[dict]] = {}
    if args.reuse:
        for run in json.loads(Path(args.reuse).read_text())["runs"]:
            if run["kind"] not in args.rerun:
                earlier.setdefault((run["kind"], run["label"], run["budget"], run["seed"]), []).append(run)

    def record(kind: str, label: str, budget: int | None, seed: int, run: Callable[[], dict]) -> None:
        reused = bool(earlier.get((kind, label, budget, seed)))
        row = earlier[kind, label, budget, seed].pop(0) if reused else {
            **run(), "kind": kind, "label": label, "budget": budget, "seed": seed}
        rows.append(row)
        if args.json:  # after every run, so an interrupted experiment still leaves its measurements
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"runs": rows, "complete": False}, indent=2) + "\n")
        if not args.quiet:
            console.print(f"{label:>20} budget {budget if budget is not None else '-':>6} seed {seed}: "
                          f"{row['parameters']:>8,} params, held-out {row['heldout_accuracy']:.3f}, "
                          f"{row['train_seconds'] + row.get('search_seconds', 0):.0f}s"
                          + (" (reused)" if reused else ""))  # fmt: skip

    try:
        for seed in range(seeds):
            for kind, label in (("full", "Full fine-tuning"), ("probe", "Linear probe (head only)")):
                record(kind, label, None, seed, lambda kind=kind, seed=seed: run_reference(setup, kind, seed, cfg))
        for b in budgets:
            budget = cfg["budgets"][b]
            for single in (s for s in singles(args.tiny) if s.budget == b):
                for seed in range(seeds):
                    record("single", single.label, budget, seed,
                           lambda single=single, seed=seed: run_delta(setup, single.build, seed, cfg))
            for r in range(n_random):  # structure r trained with seed r % seeds: every seed sees structures
                def build(model: nn.Module, budget: int = budget, structure_seed: int = 1000 * b + r) -> Any:
                    return random_structure(model, CANDIDATES, budget, seed=structure_seed).build(model)

                record("random", "random structure", budget, r % seeds,
                       lambda build=build, seed=r % seeds: run_delta(setup, build, seed, cfg))
            for seed in range(seeds):
                record("searched", "searched structure", budget, seed,
                       lambda budget=budget, seed=seed: run_search(setup, budget, seed, cfg, search_steps))
    finally:
        torch.set_num_threads(old_threads)

    summary = summarise(rows)
    info = {"model": setup.name, "tiny": args.tiny, "steps": cfg["steps"], "search_steps": search_steps, "open_fraction": OPEN_FRACTION,
            "batch_size": cfg["batch_size"], "seeds": seeds, "random_per_budget": n_random,
            "budgets": [cfg["budgets"][b] for b in budgets], "n_train": len(setup.train_set),
            "n_test": len(setup.test_set), "lr": LR, "torch": torch.__version__,
            "total_seconds": time.perf_counter() - t_start}  # fmt: skip
    table = Table(title=f"structure search on {setup.name}: {cfg['steps']} steps x {cfg['batch_size']}, {seeds} seeds")
    for name in ("budget", "configuration", "delta params", "held-out (mean ± std)", "[min, max]", "runs"):
        table.add_column(name, justify="left" if name == "configuration" else "right")
    for s in summary:
        table.add_row("-" if s["budget"] is None else f"{s['budget']:,}", s["label"], f"{s['parameters']:,.0f}",
                      f"{s['mean']:.3f} ± {s['std']:.3f}", f"[{s['min']:.3f}, {s['max']:.3f}]", str(s["runs"]))
    console.print(table)
    if args.plot is not None or not args.tiny:
        path = Path(args.plot) if args.plot is not None else DEFAULT_PLOT
        plot(rows, summary, info, path)
        console.print(f"plot: {path}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**info, "runs": rows, "summary": summary}, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown(summary, info))
    console.print(f"total wall time: {info['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
