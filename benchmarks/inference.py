"""Inference overhead of LoRA r=16 on every linear layer of MiniLM: unmerged and merged, deltakit and PEFT.

Six deep copies of one backbone (``BertModel`` of all-MiniLM-L6-v2, eval mode, ``torch.no_grad()``), timed
interleaved in one process, batch 1 and 16, sequence 128:

``base``             the backbone alone (the reference of every ratio)
``deltakit``         ``LoraModel(..., lora_r=16)`` on the 36 linear layers of the encoder (hooks)
``peft``             ``get_peft_model(..., LoraConfig(r=16, target_modules=<the same 36 layers>))``
``deltakit_merged``  the deltakit copy after ``delta.merge()`` (no hooks left: checked)
``peft_merged``      the PEFT copy after ``merge_adapter()``
``base_copy``        one more plain copy of the backbone: the control for what a copy alone does to the timing

A merged deltakit model is a plain model with other weight values (no hooks, no wrapper: checked), yet a copy of
a model can time a little differently from the original at batch 1, where the forward is bound by reading the
weights and where the copy's memory lands matters. ``base_copy / base`` measures that; ``deltakit_merged /
base_copy`` compares a merged copy with an unmerged copy made the same way.

Both LoRAs hold the same random non-zero factors (deltakit's are copied into PEFT's), so the unmerged outputs of
the two libraries must agree (checked, ``allclose``); the merged outputs must agree with the unmerged ones.

Run alone::

    python benchmarks/inference.py            # MiniLM, ~1-2 minutes
    python benchmarks/inference.py --quick    # a tiny random BERT, a few seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from benchmarks import common, suite_utils  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

LORA_R = 16
LORA_ALPHA = 32
#: The six linear layers of every BERT layer (the pooler is left out, as in "the encoder's linear layers").
DELTAKIT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", r"[r]layer\.\d+\.output\.dense"]
PEFT_TARGET_REGEX = r".*layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
VARIANTS = ("base", "deltakit", "peft", "deltakit_merged", "peft_merged", "base_copy")
PAIRS = [("deltakit", "base"), ("peft", "base"), ("deltakit", "peft"), ("deltakit_merged", "base"), ("peft_merged", "base"),
         ("base_copy", "base"), ("deltakit_merged", "base_copy"), ("peft_merged", "base_copy")]
PEFT_REFERENCE = {1: 1.15, 16: 1.25}
"""PEFT's unmerged/base ratios measured earlier on this machine (batch -> ratio), from the issue."""


def build_base(quick: bool) -> nn.Module:
    """MiniLM's ``BertModel`` (real weights), or a tiny random BERT with ``quick``; eval mode."""
    suite_utils.quiet()
    torch.manual_seed(0)
    if quick:
        from transformers import BertConfig, BertModel

        return BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                    vocab_size=1000, max_position_embeddings=64)).eval()
    from transformers import AutoModel

    from deltakit.demo import real_model_path

    return AutoModel.from_pretrained(real_model_path()).eval()


def prepare(base: nn.Module) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """Build the six variants from ``base`` (left untouched) and check they compute what they should.

    Returns:
        ``(models, checks)``: the models by variant name, and the checks' findings.
    """
    import peft

    import deltakit

    torch.manual_seed(1)
    dk_model = copy.deepcopy(base)
    delta = deltakit.LoraModel(dk_model, lora_r=LORA_R, lora_alpha=LORA_ALPHA, modified_modules=DELTAKIT_TARGETS)
    with torch.no_grad():
        for param in delta.parameters():
            param.normal_(0.0, 0.02)
    peft_model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                             target_modules=PEFT_TARGET_REGEX)
    ).eval()
    peft_modules = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for site in delta.sites:
            target = peft_modules[site.name]
            target.lora_A["default"].weight.copy_(site.module.lora_A)
            target.lora_B["default"].weight.copy_(site.module.lora_B)
    peft_params = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)

    # The merged variant: another copy of the backbone with a delta holding the same factors, merged.
    dk_merged_model = copy.deepcopy(base)
    merged = deltakit.LoraModel(dk_merged_model, lora_r=LORA_R, lora_alpha=LORA_ALPHA, modified_modules=DELTAKIT_TARGETS)
    with torch.no_grad():
        for mine, theirs in zip(merged.parameters(), delta.parameters()):
            mine.copy_(theirs)
    merged.merge()
    peft_merged = copy.deepcopy(peft_model)
    peft_merged.merge_adapter()

    models = {"base": base, "deltakit": dk_model, "peft": peft_model,
              "deltakit_merged": dk_merged_model, "peft_merged": peft_merged, "base_copy": copy.deepcopy(base)}
    x = torch.randint(0, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outs = {name: m(input_ids=x).last_hidden_state for name, m in models.items()}
    checks = {
        "delta_params": {"deltakit": delta.num_delta_parameters(), "peft": peft_params},
        "sites": len(delta.sites),
        "max_abs_diff": {
            "deltakit vs peft": float((outs["deltakit"] - outs["peft"]).abs().max()),
            "deltakit_merged vs deltakit": float((outs["deltakit_merged"] - outs["deltakit"]).abs().max()),
            "peft_merged vs peft": float((outs["peft_merged"] - outs["peft"]).abs().max()),
            "deltakit vs base": float((outs["deltakit"] - outs["base"]).abs().max()),
        },
        "merged_hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in dk_merged_model.modules()),
        "base_hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in base.modules()),
    }
    notes = []
    if checks["delta_params"]["deltakit"] != peft_params:
        notes.append(f"parameter counts differ: deltakit {checks['delta_params']['deltakit']}, peft {peft_params}")
    for key in ("deltakit vs peft", "deltakit_merged vs deltakit", "peft_merged vs peft"):
        if not checks["max_abs_diff"][key] < 1e-4:
            notes.append(f"outputs differ ({key}): {checks['max_abs_diff'][key]:.3g}")
    if not checks["max_abs_diff"]["deltakit vs base"] > 0:
        notes.append("the LoRA does not change the output")
    if checks["merged_hooks"] != checks["base_hooks"]:
        notes.append(f"merged deltakit model has {checks['merged_hooks']} hooks, the base {checks['base_hooks']}")
    checks["notes"] = notes
    return models, checks


def run(quick: bool = False, batches: Sequence[int] | None = None, rounds: int | None = None, warmup: int = 2,
        seq_len: int | None = None, log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Time the six variants at each batch size.

    Args:
        quick: Tiny random BERT, short sequences, few rounds.
        batches: Batch sizes (default 1 and 16; 1 and 4 with ``quick``).
        rounds: Timed rounds (default 31 for batch 1 and 11 above; 5 with ``quick``).
        warmup: Untimed rounds first.
        seq_len: Tokens per sequence (default 128; 32 with ``quick``).
        log: Progress callback.

    Returns:
        Per batch size: time statistics (CPU clock) and paired ratios; plus the checks of :func:`prepare`.
    """
    base = build_base(quick)
    models, checks = prepare(base)
    batches = list(batches or ((1, 4) if quick else (1, 16)))
    seq_len = seq_len or (32 if quick else 128)
    out: dict[str, Any] = {
        "model": "tiny random BERT (hidden 64, 2 layers)" if quick else "all-MiniLM-L6-v2 (BertModel)",
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "targets": DELTAKIT_TARGETS},
        "seq_len": seq_len, "checks": checks, "notes": list(checks["notes"]), "batches": {},
    }
    for batch in batches:
        x = torch.randint(0, base.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(batch))
        mask = torch.ones_like(x)

        def step(model: nn.Module) -> Callable[[int], Any]:
            def call(index: int) -> None:
                with torch.no_grad():
                    model(input_ids=x, attention_mask=mask)

            return call

        n = rounds or (5 if quick else (31 if batch == 1 else 11))
        log(f"inference: batch {batch} x {seq_len}, {n} rounds")
        with suite_utils.frozen_gc():
            result = common.run_interleaved({name: step(models[name]) for name in VARIANTS}, rounds=n, warmup=warmup,
                                            progress=log)
        out["batches"][str(batch)] = {
            "rounds": n,
            "time": suite_utils.stats(result, "cpu"),
            "ratios": suite_utils.ratios(result, PAIRS, "cpu"),
            "ratios_wall": suite_utils.ratios(result, PAIRS, "wall"),
            "peft_reference": PEFT_REFERENCE.get(batch),
        }
    return out


def table(section: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Markdown/rich table rows of a :func:`run` result."""
    headers = ["batch x seq", "base", "deltakit / base", "peft / base", "deltakit / peft", "deltakit merged / base",
               "peft merged / base", "base copy / base", "deltakit merged / base copy"]
    rows = []
    for batch, e in section["batches"].items():
        r = e["ratios"]
        rows.append([f"{batch} x {section['seq_len']}", common.format_seconds(e["time"]["base"]["median"])]
                    + [common.format_ratio(r.get(k, {}).get("median")) for k in
                       ("deltakit/base", "peft/base", "deltakit/peft", "deltakit_merged/base", "peft_merged/base",
                        "base_copy/base", "deltakit_merged/base_copy")])
    return headers, rows


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: print the table and the JSON."""
    parser = argparse.ArgumentParser(description="LoRA inference overhead, unmerged and merged, deltakit vs PEFT")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args(argv)
    common.configure_threads(1)
    section = run(args.quick, rounds=args.rounds, log=suite_utils.log_to_stderr(True))
    common.print_rich_table("Inference, eval + no_grad (CPU clock, paired median ratios)", *table(section))
    print(json.dumps(common._sanitize(section)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
