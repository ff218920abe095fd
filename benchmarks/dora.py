"""DoRA training step: frozen backbone, plain LoRA, deltakit DoRA and PEFT DoRA, side by side.

DoRA's known cost is the norm ``||W + s B A||`` of every modified weight at every step. PEFT forms the whole
``out x in`` matrix ``W + s B A`` (building ``B A`` by running the LoRA layers on an identity matrix) and takes its
norm; deltakit computes ``||W||^2 + 2 s <W, B A> + s^2 ||B A||^2`` per row from one thin GEMM ``W A^T`` and a
``r x r`` Gram matrix, with ``||W||^2`` kept while the frozen ``W`` is unchanged (see ``deltakit/deltas/dora.py``).

All four variants use rank 8, alpha 16 on the query and value projections (as ``benchmarks/train_step.py``), AdamW,
and run interleaved in one process, one thread; figures are medians of per-round paired ratios on the CPU clock.
The target: deltakit DoRA's overhead over the frozen step (``dora/frozen - 1``) at most :data:`TARGET` times PEFT
DoRA's.

Run alone::

    python benchmarks/dora.py [--quick] [--models minilm,llama130m] [--rounds N]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from benchmarks import common, suite_utils, train_step  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

#: deltakit DoRA's overhead over frozen, as a share of PEFT DoRA's (at most).
TARGET = 0.8
VARIANTS = ("frozen", "lora", "dora", "peft_dora")


def prepare(name: str, backbone: nn.Module, spec: train_step.ModelSpec, seed: int = 0) -> train_step.PreparedVariant:
    """Wrap ``backbone`` (modified in place) as one of :data:`VARIANTS`."""
    import deltakit

    if name == "frozen":
        return train_step.prepare_variant("frozen", backbone, spec, seed=seed)
    torch.manual_seed(seed + 1)
    keep_alive: list[Any] = []
    options = {"lora_r": train_step.LORA_R, "lora_alpha": train_step.LORA_ALPHA}
    if name == "peft_dora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=train_step.LORA_R, lora_alpha=train_step.LORA_ALPHA, use_dora=True, bias="none",
                            target_modules=list(spec.target_modules))
        model = get_peft_model(backbone, config)
        for param_name, param in model.named_parameters():
            param.requires_grad_("lora_" in param_name)
        trainable = [p for p in model.parameters() if p.requires_grad]
    else:
        method = deltakit.DoraModel if name == "dora" else deltakit.LoraModel
        delta = method(backbone, modified_modules=list(spec.target_modules), **options)
        delta.freeze_module(exclude=["deltas"])
        keep_alive.append(delta)
        model, trainable = backbone, [p for p in delta.parameters() if p.requires_grad]
    model.train()
    return train_step.PreparedVariant(name=name, model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-4),
                                      trainable=trainable, keep_alive=keep_alive)


def benchmark_model(spec: train_step.ModelSpec, rounds: int, warmup: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Time the variants on one model, interleaved; medians and paired ratios."""
    template = train_step.build_backbone(spec)
    batches = train_step.make_batches(spec, template.config.vocab_size)
    prepared = {name: prepare(name, copy.deepcopy(template), spec) for name in VARIANTS}
    del template
    losses = train_step.initial_losses(prepared, batches[0])  # all start as the backbone
    steps = {name: (lambda index, v=v: v.step(batches[index % len(batches)])) for name, v in prepared.items()}
    timing = common.run_interleaved(steps, rounds=rounds, warmup=warmup, progress=lambda line: log(f"[{spec.name}] {line}"))
    cpu = timing.times["cpu"]
    ratios = {f"{name}/frozen": common.paired_ratio(cpu[name], cpu["frozen"]) for name in VARIANTS[1:]}
    ratios["dora/peft_dora"] = common.paired_ratio(cpu["dora"], cpu["peft_dora"])
    overhead = {name: ratios[f"{name}/frozen"]["median"] - 1 for name in VARIANTS[1:]}
    share = overhead["dora"] / overhead["peft_dora"] if overhead["peft_dora"] > 0 else float("nan")
    return {
        "model": spec.description, "batch": spec.batch_size, "seq_len": spec.seq_len,
        "targets": list(spec.target_modules), "rounds": rounds, "warmup": warmup,
        "median_s": {name: common.summarize(cpu[name])["median"] for name in VARIANTS},
        "initial_loss": losses,
        "ratios": {k: {key: v[key] for key in ("median", "q1", "q3", "ratio_of_medians")} for k, v in ratios.items()},
        "overhead": overhead,
        "dora_overhead_share_of_peft": share,
    }


def run(quick: bool = False, models: Sequence[str] | None = None, rounds: int | None = None,
        warmup: int | None = None, log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """The section: one entry per model (``--quick``: the tiny BERT and Llama of ``train_step``)."""
    names = list(models or (train_step.QUICK_MODELS if quick else train_step.FULL_MODELS))
    section: dict[str, Any] = {"target": TARGET, "rank": train_step.LORA_R, "models": {}}
    for name in names:
        spec = train_step.MODELS[name]
        section["models"][name] = benchmark_model(
            spec, rounds if rounds is not None else (3 if quick else spec.rounds),
            warmup if warmup is not None else spec.warmup, log,
        )
    return section


def table(section: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per model: step time of each variant, ratios to frozen, and the overhead share against PEFT DoRA."""
    headers = ["model", "frozen s", "LoRA / frozen", "DoRA / frozen", "PEFT DoRA / frozen", "DoRA / PEFT DoRA",
               f"DoRA overhead / PEFT's (<= {section['target']})"]
    rows = []
    for name, e in section["models"].items():
        r = e["ratios"]
        share = e["dora_overhead_share_of_peft"]
        rows.append([name, f"{e['median_s']['frozen']:.4f}", *(f"{r[k]['median']:.3f}" for k in (
            "lora/frozen", "dora/frozen", "peft_dora/frozen", "dora/peft_dora")),
            f"{share:.2f} ({'yes' if share <= section['target'] else 'NO'})"])
    return headers, rows


def summary_rows(section: dict[str, Any]) -> list[list[str]]:
    """Headline rows for the suite's summary: what, deltakit, PEFT, target, met."""
    rows = []
    for name, e in section["models"].items():
        share = e["dora_overhead_share_of_peft"]
        rows.append([f"DoRA train step / frozen ({name})", f"{e['ratios']['dora/frozen']['median']:.3f}",
                     f"{e['ratios']['peft_dora/frozen']['median']:.3f}",
                     f"overhead <= {section['target']} x peft's", ("yes" if share <= section["target"] else "NO")
                     + f" ({share:.2f})"])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: print the table and the JSON."""
    parser = argparse.ArgumentParser(description="DoRA training step, deltakit vs PEFT (and frozen, LoRA)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", help=f"comma-separated, from {', '.join(train_step.MODELS)}")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--warmup", type=int)
    args = parser.parse_args(argv)
    common.configure_threads(1)
    models = args.models.split(",") if args.models else None
    section = run(args.quick, models, args.rounds, args.warmup, log=suite_utils.log_to_stderr(True))
    common.print_rich_table("DoRA training step (CPU clock, paired median ratios)", *table(section))
    print(json.dumps(common._sanitize(section)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
