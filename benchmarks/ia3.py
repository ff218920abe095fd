"""(IA)^3: the training step against the frozen backbone (deltakit and PEFT side by side), and mixed batches.

``train``
    Per model (``minilm``, ``llama130m`` of ``benchmarks/train_step.py``; ``--quick``: its tiny BERT and Llama), three
    variants on deep copies of one backbone, AdamW over the trainable parameters: ``frozen`` (no delta; the input
    embedding output requires grad, so backward runs through the whole network), ``ia3`` (deltakit ``IA3Model`` at
    its default positions: keys and values scaled at their output, the feed-forward output projection at its input)
    and ``peft_ia3`` (PEFT ``IA3Config`` on exactly the same modules, the same ones as feed-forward). Before timing,
    both deltas get the same vectors (ones plus noise, as after training): the modified modules must be the same
    set, and the eval-mode loss at step 0 must agree between the two libraries (and differ from the frozen one, so
    that the vectors are in the graph). Figures: the per-round paired ratios ``ia3/frozen``, ``peft_ia3/frozen``
    and ``ia3/peft_ia3``; target ``ia3/frozen`` <= :data:`TARGETS` ``["ia3/frozen"]``.
``mixed``
    The ~130M Llama of ``benchmarks/serving.py`` (``LlamaModel``, hidden 768, 12 layers), eval mode,
    ``torch.inference_mode()``, batch 16 x 64, 8 (IA)^3 deltas at the default positions (36 sites each) in one
    :class:`deltakit.DeltaGroup`. Variants: ``base`` (no delta), ``switched`` (``group.switch(d0)``: one delta
    attached, its plain hooks), ``one_routed`` (``group.route([d0] * 16)``: every row on one delta, through the
    routers) and ``mixed`` (``group.route(names)``, row ``i`` on delta ``i mod 8``). The one-delta bound is
    ``switched``: the cheapest way to serve one delta, and the bound the serving section's LoRA figure uses, so
    ``mixed/switched`` is the headline (target :data:`TARGETS` ``["mixed/switched"]``); ``mixed/one_routed`` is
    what mixing itself costs over the same routed code path with one delta. Checked first: each mixed row equals
    its delta alone (switched) to float rounding, and differs from the base. PEFT's IA3 takes no per-sample
    adapter names, so there is no PEFT column here.

All variants of a part run interleaved in one process, one thread, the order rotated each round; figures are
medians of per-round paired ratios on the CPU clock.

Run alone::

    python benchmarks/ia3.py [--quick] [--models minilm,llama130m] [--rounds N] [--parts train,mixed]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from benchmarks import common, serving, suite_utils, train_step  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

#: The issue's targets (ratios, at most).
TARGETS = {"ia3/frozen": 1.02, "mixed/switched": 1.03}
VARIANTS = ("frozen", "ia3", "peft_ia3")
MIXED_VARIANTS = ("base", "switched", "one_routed", "mixed")
#: Spread of the vectors around one (as after some training); the same values go to both libraries.
NOISE = 0.1
#: Relative agreement required between the two libraries' step-0 losses (float32, two different computations).
LOSS_RTOL = 1e-5

MIXED_FULL = dict(config=serving.FULL["config"], deltas=8, batch=16, seq=64, rounds=11, warmup=1)
MIXED_QUICK = dict(config=serving.QUICK["config"], deltas=8, batch=8, seq=16, rounds=3, warmup=1)


# ------------------------------------------------------------------------------------------------ training step
def _exact(names: Sequence[str]) -> str:
    """A regex matching exactly these module names (PEFT full-matches a string pattern against each name)."""
    return "|".join(re.escape(n) for n in sorted(names))


def _noisy_ones(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    return 1 + torch.randn(shape, generator=generator) * NOISE


def prepare(spec: train_step.ModelSpec, template: nn.Module, seed: int = 0,
            diagnostics: bool = False) -> tuple[dict[str, Any], list[str]]:
    """The three variants on deep copies of ``template``, both deltas holding the same vectors (``diagnostics``:
    also ``folded``, the same vectors folded into the weights by replacing the hosts, see benchmarks/ia3_folded.py).

    Returns:
        ``({name: PreparedVariant}, notes)``; a note for every failed check (different modules modified).
    """
    from peft import IA3Config, get_peft_model

    import deltakit
    from deltakit.deltas.ia3 import IA3InputSite

    notes: list[str] = []
    prepared = {"frozen": train_step.prepare_variant("frozen", copy.deepcopy(template), spec, seed=seed)}
    backbone = copy.deepcopy(template)
    pristine = copy.deepcopy(template) if diagnostics else None
    delta = deltakit.IA3Model(backbone)
    delta.freeze_module(exclude=["deltas"])
    trainable = [p for p in delta.parameters() if p.requires_grad]
    # The sites that scale their host's input (the rest scale the output): PEFT's feedforward_modules.
    feedforward = [s.name for s in delta.sites if isinstance(s.module, IA3InputSite)]
    names = [s.name for s in delta.sites]
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for site in delta.sites:
            site.module.scale.copy_(_noisy_ones(site.module.scale.shape, generator))
    backbone.train()
    prepared["ia3"] = train_step.PreparedVariant(
        "ia3", backbone, torch.optim.AdamW(trainable, lr=1e-4), trainable, keep_alive=[delta])
    if pristine is not None:
        from benchmarks import ia3_folded

        vectors = ia3_folded.fold_into_copy(pristine, delta)
        pristine.train()
        prepared["folded"] = train_step.PreparedVariant(
            "folded", pristine, torch.optim.AdamW(vectors, lr=1e-4), vectors)

    config = IA3Config(target_modules=_exact(names), feedforward_modules=_exact(feedforward))
    model = get_peft_model(copy.deepcopy(template), config)
    modules = dict(model.base_model.model.named_modules())
    peft_sites = {n for n, m in modules.items() if hasattr(m, "ia3_l")}
    if peft_sites != set(names):
        notes.append(f"PEFT modified {len(peft_sites)} modules, deltakit {len(names)}: "
                     f"{sorted(peft_sites ^ set(names))[:4]} differ")
    with torch.no_grad():
        for site in delta.sites:
            target = modules[site.name].ia3_l["default"]
            target.copy_(site.module.scale.detach().reshape(target.shape))
    for param_name, param in model.named_parameters():
        param.requires_grad_("ia3_l" in param_name)
    peft_trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    prepared["peft_ia3"] = train_step.PreparedVariant(
        "peft_ia3", model, torch.optim.AdamW(peft_trainable, lr=1e-4), peft_trainable)
    if sum(p.numel() for p in peft_trainable) != sum(p.numel() for p in trainable):
        notes.append("PEFT and deltakit train different numbers of parameters")
    return prepared, notes


def benchmark_model(spec: train_step.ModelSpec, rounds: int, warmup: int, log: Callable[[str], None],
                    diagnostics: bool = False) -> dict[str, Any]:
    """The training-step part on one model: checks, interleaved timing, paired ratios."""
    template = train_step.build_backbone(spec)
    batches = train_step.make_batches(spec, template.config.vocab_size)
    prepared, notes = prepare(spec, template, diagnostics=diagnostics)
    del template
    losses = train_step.initial_losses(prepared, batches[0])
    gap = abs(losses["ia3"] - losses["peft_ia3"]) / max(abs(losses["peft_ia3"]), 1e-12)
    if not gap <= LOSS_RTOL:
        notes.append(f"{spec.name}: step-0 loss of deltakit ({losses['ia3']:.7g}) and PEFT ({losses['peft_ia3']:.7g}) "
                     f"differ by {gap:.2g} (relative)")
    if losses["ia3"] == losses["frozen"]:
        notes.append(f"{spec.name}: the (IA)^3 vectors do not change the loss: they are not in the graph")
    steps = {name: (lambda index, v=v: v.step(batches[index % len(batches)])) for name, v in prepared.items()}
    timing = common.run_interleaved(steps, rounds=rounds, warmup=warmup, progress=lambda line: log(f"[ia3 {spec.name}] {line}"))
    pairs = [("ia3", "frozen"), ("peft_ia3", "frozen"), ("ia3", "peft_ia3")]
    if "folded" in prepared:
        pairs += [("folded", "frozen"), ("ia3", "folded")]
        if abs(losses["folded"] - losses["ia3"]) > LOSS_RTOL * abs(losses["ia3"]):
            notes.append(f"{spec.name}: the folded diagnostic's step-0 loss {losses['folded']:.7g} is not deltakit's")
    return {
        "model": spec.description, "batch": spec.batch_size, "seq_len": spec.seq_len, "rounds": rounds,
        "warmup": warmup, "sites": len(prepared["ia3"].trainable),
        "trainable_params": sum(p.numel() for p in prepared["ia3"].trainable),
        "median_s": {name: s["median"] for name, s in suite_utils.stats(timing).items()},
        "initial_loss": losses, "loss_rel_diff_deltakit_vs_peft": gap,
        "ratios": suite_utils.ratios(timing, pairs),
        "wall_ratios": suite_utils.ratios(timing, pairs, clock="wall"),
        "notes": notes,
    }


# ------------------------------------------------------------------------------------------------ mixed batch
def build_group(p: dict[str, Any]) -> tuple[Any, list[str]]:
    """A ``DeltaGroup`` on a random Llama with ``p["deltas"]`` (IA)^3 deltas of different vectors, all detached."""
    from transformers import LlamaConfig, LlamaModel

    import deltakit

    torch.manual_seed(0)
    backbone = LlamaModel(LlamaConfig(**p["config"])).eval()
    group = deltakit.DeltaGroup(backbone)
    generator = torch.Generator().manual_seed(3)
    names = [f"d{i}" for i in range(p["deltas"])]
    for name in names:
        delta = deltakit.IA3Model(backbone, name=name)
        with torch.no_grad():
            for param in delta.parameters():
                param.copy_(_noisy_ones(param.shape, generator))
        delta.detach()
        group.add(delta)
    return group, names


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=x).last_hidden_state


def check_mixed(group: Any, names: list[str], x: torch.Tensor, routed: list[str]) -> tuple[float, float]:
    """Largest difference of a mixed row from its delta alone (switched), and smallest difference from the base."""
    backbone = group.backbone_model
    group.switch(None)
    base = _forward(backbone, x)
    with group.route(routed):
        mixed = _forward(backbone, x)
    worst, least_change = 0.0, float("inf")
    for name in names:
        rows = [i for i, n in enumerate(routed) if n == name]
        group.switch(name)
        alone = _forward(backbone, x[rows])
        worst = max(worst, float((mixed[rows] - alone).abs().max()))
        least_change = min(least_change, float((mixed[rows] - base[rows]).abs().max()))
    group.switch(None)
    return worst, least_change


def measure_mixed(p: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """The mixed-batch part: checks, then the four variants interleaved."""
    group, names = build_group(p)
    backbone = group.backbone_model
    x = torch.randint(0, p["config"]["vocab_size"], (p["batch"], p["seq"]), generator=torch.Generator().manual_seed(4))
    routed = [names[i % len(names)] for i in range(p["batch"])]
    one = [names[0]] * p["batch"]
    worst, least_change = check_mixed(group, names, x, routed)
    notes = []
    # Row i of the mixed batch and the same sample alone: the same operations on the same row, but the routed path
    # scales by a gathered copy of the vector in a batched multiply; float32 rounding of a 12-layer model.
    if not worst < 1e-4:
        notes.append(f"mixed: a routed row differs from its delta alone by {worst:.3g}")
    if not least_change > 1e-3:
        notes.append(f"mixed: a routed row equals the base output (difference {least_change:.3g})")

    def routed_call(rows: list[str]) -> Callable[[int], None]:
        def call(index: int) -> None:
            with group.route(rows):
                _forward(backbone, x)
        return call

    def switched(index: int) -> None:
        _forward(backbone, x)

    def base(index: int) -> None:
        # The bare backbone: every hook is gone while no delta is attached (switch(None) in the set-up).
        _forward(backbone, x)

    log(f"ia3 mixed: {len(names)} deltas, batch {p['batch']} x {p['seq']}")
    steps = {"base": base, "switched": switched, "one_routed": routed_call(one), "mixed": routed_call(routed)}

    def prepare_call(name: str) -> Callable[[int], Callable[[], None]]:
        target = names[0] if name == "switched" else None

        def prepare_one(index: int) -> Callable[[], None]:
            group.switch(target)  # untimed: which delta is attached plainly
            return lambda: steps[name](index)
        return prepare_one

    with suite_utils.frozen_gc():
        result = suite_utils.interleave({name: prepare_call(name) for name in MIXED_VARIANTS},
                                        rounds=p["rounds"], warmup=p["warmup"], progress=log)
    group.switch(None)
    pairs = [("mixed", "switched"), ("mixed", "one_routed"), ("one_routed", "switched"), ("switched", "base"),
             ("mixed", "base")]
    return {
        "deltas": len(names), "batch": p["batch"], "seq": p["seq"], "rounds": p["rounds"],
        "sites_per_delta": len(group[names[0]].sites),
        "max_abs_diff_mixed_vs_alone": worst, "min_abs_change_vs_base": least_change,
        "median_s": {name: s["median"] for name, s in suite_utils.stats(result).items()},
        "ratios": suite_utils.ratios(result, pairs),
        "notes": notes,
    }


# ------------------------------------------------------------------------------------------------ the section
def malloc_env() -> dict[str, str]:
    """glibc's allocator settings from the environment (``MALLOC_*``), recorded with the figures: whether freed
    activations go back to the OS decides how much of a step is page faults (docs/methods/ia3.md)."""
    return {k: os.environ[k] for k in sorted(os.environ) if k.startswith("MALLOC_")}


def run(quick: bool = False, models: Sequence[str] | None = None, rounds: int | None = None,
        warmup: int | None = None, parts: Sequence[str] = ("train", "mixed"),
        log: Callable[[str], None] = lambda line: None, diagnostics: bool = False) -> dict[str, Any]:
    """The section: ``train`` per model and ``mixed`` (``--quick``: tiny models, 3 rounds)."""
    names = list(models or (train_step.QUICK_MODELS if quick else train_step.FULL_MODELS))
    section: dict[str, Any] = {"targets": dict(TARGETS), "models": {}, "notes": [],
                               "malloc_env": malloc_env()}
    if "train" in parts:
        for name in names:
            spec = train_step.MODELS[name]
            entry = benchmark_model(spec, rounds if rounds is not None else (3 if quick else spec.rounds),
                                    warmup if warmup is not None else spec.warmup, log, diagnostics)
            section["models"][name] = entry
            section["notes"] += entry["notes"]
    if "mixed" in parts:
        p = dict(MIXED_QUICK if quick else MIXED_FULL)
        if rounds is not None:
            p["rounds"] = rounds
        section["mixed"] = measure_mixed(p, log)
        section["notes"] += section["mixed"]["notes"]
    return section


def _met(value: float, target: float) -> str:
    return ("yes" if value <= target else "NO") + f" ({value:.3f})"


def table(section: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per model (training step) and one for the mixed batch."""
    headers = ["setting", "base s", "deltakit / base", "PEFT / base", "deltakit / PEFT", "target", "met"]
    rows = []
    target = section["targets"]["ia3/frozen"]
    for name, e in section["models"].items():
        r = e["ratios"]
        folded = f"; vectors folded into the weights {r['folded/frozen']['median']:.3f}" if "folded/frozen" in r else ""
        rows.append([f"training step, {name} ({e['sites']} sites), base = frozen{folded}",
                     f"{e['median_s']['frozen']:.4f}", f"{r['ia3/frozen']['median']:.3f}",
                     f"{r['peft_ia3/frozen']['median']:.3f}", f"{r['ia3/peft_ia3']['median']:.3f}",
                     f"<= {target}", _met(r["ia3/frozen"]["median"], target)])
    m = section.get("mixed")
    if m:
        r = m["ratios"]
        rows.append([f"mixed batch ({m['deltas']} deltas, batch {m['batch']} x {m['seq']}), base = switched "
                     f"(one delta; mixed / one routed {r['mixed/one_routed']['median']:.3f}, switched / no delta "
                     f"{r['switched/base']['median']:.3f})",
                     f"{m['median_s']['switched']:.4f}", f"{r['mixed/switched']['median']:.3f}", "n/a", "n/a",
                     f"<= {section['targets']['mixed/switched']}",
                     _met(r["mixed/switched"]["median"], section["targets"]["mixed/switched"])])
    return headers, rows


def summary_rows(section: dict[str, Any]) -> list[list[str]]:
    """Headline rows for the suite's summary: what, deltakit, PEFT, target, met."""
    rows = []
    target = section["targets"]["ia3/frozen"]
    for name, e in section["models"].items():
        r = e["ratios"]
        rows.append([f"(IA)^3 train step / frozen ({name})", f"{r['ia3/frozen']['median']:.3f}",
                     f"{r['peft_ia3/frozen']['median']:.3f}", f"<= {target}",
                     _met(r["ia3/frozen"]["median"], target)])
    m = section.get("mixed")
    if m:
        value, target = m["ratios"]["mixed/switched"]["median"], section["targets"]["mixed/switched"]
        rows.append([f"(IA)^3 mixed batch / one delta switched ({m['deltas']} deltas, batch {m['batch']} x {m['seq']})",
                     f"{value:.3f}", "n/a (no per-sample IA3)", f"<= {target}", _met(value, target)])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: print the table and the JSON."""
    parser = argparse.ArgumentParser(description="(IA)^3 training step and mixed batches, deltakit vs PEFT")
    parser.add_argument("--quick", action="store_true", help="tiny models, 3 rounds")
    parser.add_argument("--models", help=f"comma-separated, from {', '.join(train_step.MODELS)}")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--parts", default="train,mixed", help="comma-separated, from train, mixed")
    parser.add_argument("--diagnostics", action="store_true",
                        help="also time the vectors folded into the weights (benchmarks/ia3_folded.py)")
    args = parser.parse_args(argv)
    common.configure_threads(1)
    models = args.models.split(",") if args.models else None
    section = run(args.quick, models, args.rounds, args.warmup, parts=args.parts.split(","),
                  log=suite_utils.log_to_stderr(True), diagnostics=args.diagnostics)
    common.print_rich_table("(IA)^3 (CPU clock, paired median ratios)", *table(section))
    print(json.dumps(common._sanitize(section)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
