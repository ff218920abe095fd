"""Injection at scale: LoRA r=16 on every linear layer of Llama-shaped models built on the meta device.

Three variants, each on a fresh meta-device model every round (built untimed), timed interleaved:

``deltakit``
    ``LoraModel(model, modified_modules=[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj],
    lora_r=16, lora_alpha=32)`` (matching, shape inference, building the sites, attaching them).
``peft``
    ``get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=[...]))``.
``peft_low_mem``
    The same with ``low_cpu_mem_usage=True``.

The LoRA parameter counts of both libraries are checked against the closed form of :func:`analytic_lora_params`.

Run alone::

    python benchmarks/injection.py            # Llama-7B and Llama-70B shapes
    python benchmarks/injection.py --quick    # a small Llama shape, a few seconds
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from benchmarks import common, suite_utils  # noqa: E402

import torch  # noqa: E402

LORA_R = 16
LORA_ALPHA = 32
TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every linear layer of a Llama decoder layer (the LM head is not part of "all linear layers")."""

#: name -> LlamaConfig keyword arguments
SHAPES: dict[str, dict[str, int]] = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=32000),
    "llama-small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=4, vocab_size=1000),
}
FULL_SHAPES = ("llama-7b", "llama-70b")
QUICK_SHAPES = ("llama-small",)
TARGET_SECONDS = {"llama-7b": 0.1, "llama-70b": 0.2}
PEFT_REFERENCE_SECONDS = {"llama-7b": (0.35, 0.17), "llama-70b": (1.77, 0.43)}
"""PEFT figures measured earlier on this machine (plain, low_cpu_mem_usage), from the issue."""


def analytic_lora_params(config: Any, r: int = LORA_R, targets: Sequence[str] = TARGETS) -> int:
    """LoRA parameter count on the given projections of a Llama config: ``r * (in + out)`` per site.

    Args:
        config: A ``LlamaConfig`` (``head_dim`` defaults to ``hidden_size // num_attention_heads``).
        r: LoRA rank.
        targets: Which of the seven projections carry LoRA.

    Returns:
        The exact number of LoRA scalars.
    """
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q_out = config.num_attention_heads * head_dim
    kv_out = config.num_key_value_heads * head_dim
    dims = {
        "q_proj": (h, q_out), "k_proj": (h, kv_out), "v_proj": (h, kv_out), "o_proj": (q_out, h),
        "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
    }
    return layers * sum(r * sum(dims[t]) for t in targets)


def llama_config(shape: str) -> Any:
    """The ``LlamaConfig`` of a named shape (see :data:`SHAPES`)."""
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape])


def meta_model(config: Any) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` on the meta device (no memory, no initialisation cost)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(config)


def _variants(config: Any, counts: dict[str, int]) -> dict[str, suite_utils.Prepare]:
    import peft

    import deltakit

    def prep_deltakit(index: int) -> Callable[[], Any]:
        model = meta_model(config)

        def call() -> None:
            delta = deltakit.LoraModel(model, lora_r=LORA_R, lora_alpha=LORA_ALPHA, modified_modules=list(TARGETS))
            counts["deltakit"] = delta.num_delta_parameters()

        return call

    def prep_peft(low_mem: bool) -> suite_utils.Prepare:
        def prepare(index: int) -> Callable[[], Any]:
            model = meta_model(config)
            cfg = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(TARGETS))

            def call() -> None:
                wrapped = peft.get_peft_model(model, cfg, low_cpu_mem_usage=low_mem)
                counts["peft_low_mem" if low_mem else "peft"] = sum(
                    p.numel() for n, p in wrapped.named_parameters() if "lora_" in n
                )

            return call

        return prepare

    return {"deltakit": prep_deltakit, "peft": prep_peft(False), "peft_low_mem": prep_peft(True)}


def run(quick: bool = False, shapes: Sequence[str] | None = None, rounds: int | None = None,
        warmup: int = 1, log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Measure injection time and check parameter counts for each shape.

    Args:
        quick: Use the small shape and few rounds.
        shapes: Names from :data:`SHAPES` (default 7B and 70B, or the small one with ``quick``).
        rounds: Timed rounds per shape (default 7, or 3 with ``quick``).
        warmup: Untimed rounds first.
        log: Progress callback.

    Returns:
        ``{"shapes": {name: {...}}, "notes": [...]}`` with per-variant time statistics (CPU clock), paired ratios,
        parameter counts and whether they equal the analytic count.
    """
    suite_utils.quiet()
    shapes = list(shapes or (QUICK_SHAPES if quick else FULL_SHAPES))
    rounds = rounds or (3 if quick else 7)
    out: dict[str, Any] = {"lora": {"r": LORA_R, "alpha": LORA_ALPHA, "targets": list(TARGETS)}, "shapes": {}, "notes": []}
    for shape in shapes:
        config = llama_config(shape)
        log(f"injection: {shape}")
        counts: dict[str, int] = {}
        with suite_utils.frozen_gc():
            result = suite_utils.interleave(_variants(config, counts), rounds=rounds, warmup=warmup, progress=log)
        analytic = analytic_lora_params(config)
        sites = config.num_hidden_layers * len(TARGETS)
        entry = {
            "config": SHAPES[shape],
            "sites": sites,
            "analytic_params": analytic,
            "params": counts,
            "params_match": {name: count == analytic for name, count in counts.items()},
            "time": suite_utils.stats(result, "cpu"),
            "time_wall": suite_utils.stats(result, "wall"),
            "ratios": suite_utils.ratios(result, [("deltakit", "peft"), ("deltakit", "peft_low_mem")]),
            "target_s": TARGET_SECONDS.get(shape),
            "peft_reference_s": PEFT_REFERENCE_SECONDS.get(shape),
        }
        for name, ok in entry["params_match"].items():
            if not ok:
                out["notes"].append(f"{shape}: {name} has {counts[name]} LoRA parameters, analytic {analytic}")
        out["shapes"][shape] = entry
    return out


def table(section: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Markdown/rich table rows of a :func:`run` result."""
    headers = ["shape", "sites", "deltakit", "peft", "peft low_cpu_mem", "deltakit/peft", "target", "params = analytic"]
    rows = []
    for shape, e in section["shapes"].items():
        t = e["time"]
        rows.append([
            shape, e["sites"], common.format_seconds(t["deltakit"]["median"]), common.format_seconds(t["peft"]["median"]),
            common.format_seconds(t["peft_low_mem"]["median"]),
            common.format_ratio(e["ratios"].get("deltakit/peft", {}).get("median")),
            f"<= {e['target_s']} s" if e["target_s"] else "-",
            "yes" if e["params_match"] and all(e["params_match"].values()) else "NO",
        ])
    return headers, rows


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: print the table and the JSON."""
    parser = argparse.ArgumentParser(description="LoRA injection time on meta-device Llama shapes")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shapes", help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args(argv)
    common.configure_threads(1)
    section = run(args.quick, args.shapes.split(",") if args.shapes else None, args.rounds,
                  log=suite_utils.log_to_stderr(True))
    common.print_rich_table("LoRA injection (CPU clock, medians)", *table(section))
    print(json.dumps(common._sanitize(section)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
