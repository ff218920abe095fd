"""Checkpoint size: bytes on disk of a saved LoRA, over the raw bytes of its tensors, deltakit vs PEFT.

For each scenario the same backbone gets a deltakit LoRA (``save_finetuned``) and a PEFT LoRA
(``save_pretrained``) on the same modules; every file the library writes is counted. ``overhead`` = total bytes -
raw tensor bytes (``numel * element_size`` of the saved LoRA factors). deltakit's overhead is split into the
safetensors header (8-byte length + JSON: one entry per tensor, named ``<host>.lora.lora_A``) and
``delta_config.json``. The target is an overhead of at most 4 KB (4096 bytes).

Run alone::

    python benchmarks/checkpoint_size.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from benchmarks import common, suite_utils  # noqa: E402

from torch import nn  # noqa: E402

BOUND_BYTES = 4096
LORA_R = 16
#: name -> (deltakit modified_modules, PEFT target_modules)
SCENARIOS: dict[str, tuple[list[str], Any]] = {
    "q,v": (["query", "value"], ["query", "value"]),
    "all linear": (
        ["query", "key", "value", "attention.output.dense", "intermediate.dense", r"[r]layer\.\d+\.output\.dense"],
        r".*layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)",
    ),
}


def directory_bytes(path: str) -> dict[str, int]:
    """Size of every file in ``path`` (not recursive)."""
    return {name: os.path.getsize(os.path.join(path, name)) for name in sorted(os.listdir(path))}


def safetensors_header_bytes(file: str) -> int:
    """Bytes of a safetensors file that are not tensor data: the 8-byte length field plus the JSON header."""
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
    return 8 + length


def measure(base_factory: Callable[[], nn.Module], scenario: str) -> dict[str, Any]:
    """Save a deltakit and a PEFT LoRA of one scenario and count their bytes.

    Args:
        base_factory: Builds a fresh backbone (called twice).
        scenario: A key of :data:`SCENARIOS`.

    Returns:
        Per library: files and sizes, raw tensor bytes, total, overhead; deltakit also the header / config split.
    """
    import peft

    import deltakit
    from deltakit.checkpoint import WEIGHTS_NAME
    from deltakit.config import CONFIG_NAME

    dk_modules, peft_targets = SCENARIOS[scenario]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = base_factory()
        delta = deltakit.LoraModel(model, lora_r=LORA_R, lora_alpha=2 * LORA_R, modified_modules=dk_modules)
        raw = sum(p.numel() * p.element_size() for p in delta.parameters())
        path = os.path.join(tmp, "deltakit")
        delta.save_finetuned(path)
        files = directory_bytes(path)
        total = sum(files.values())
        out["deltakit"] = {
            "files": files, "sites": len(delta.sites), "tensors": len(delta.delta_state_dict()), "raw_bytes": raw,
            "total_bytes": total, "overhead_bytes": total - raw,
            "header_bytes": safetensors_header_bytes(os.path.join(path, WEIGHTS_NAME)),
            "config_bytes": files[CONFIG_NAME],
        }
        out["deltakit"]["within_bound"] = out["deltakit"]["overhead_bytes"] <= BOUND_BYTES

        model = base_factory()
        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules=peft_targets))
        raw = sum(p.numel() * p.element_size() for n, p in wrapped.named_parameters() if "lora_" in n)
        path = os.path.join(tmp, "peft")
        wrapped.save_pretrained(path)
        files = directory_bytes(path)
        total = sum(files.values())
        out["peft"] = {"files": files, "raw_bytes": raw, "total_bytes": total, "overhead_bytes": total - raw}
    return out


def run(quick: bool = False, log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Measure every scenario on MiniLM (a tiny 6-layer random BERT with ``quick``: same module names and counts).

    Returns:
        ``{"model": ..., "bound_bytes": 4096, "scenarios": {name: measure(...)}, "notes": [...]}``.
    """
    suite_utils.quiet()
    if quick:
        from transformers import BertConfig, BertModel

        def factory() -> nn.Module:
            return BertModel(BertConfig(hidden_size=64, num_hidden_layers=6, num_attention_heads=2,
                                        intermediate_size=128, vocab_size=1000, max_position_embeddings=64))

        model_name = "tiny random BERT (hidden 64, 6 layers)"
    else:
        from transformers import AutoModelForSequenceClassification

        from deltakit.demo import real_model_path

        def factory() -> nn.Module:
            return AutoModelForSequenceClassification.from_pretrained(real_model_path(), num_labels=2)

        model_name = "all-MiniLM-L6-v2 (BertForSequenceClassification)"
    out: dict[str, Any] = {"model": model_name, "bound_bytes": BOUND_BYTES, "lora_r": LORA_R, "scenarios": {}, "notes": []}
    for scenario in SCENARIOS:
        log(f"checkpoint size: {scenario}")
        entry = measure(factory, scenario)
        out["scenarios"][scenario] = entry
        if entry["deltakit"]["raw_bytes"] != entry["peft"]["raw_bytes"]:
            out["notes"].append(f"{scenario}: the two LoRAs differ in size ({entry['deltakit']['raw_bytes']} vs "
                                f"{entry['peft']['raw_bytes']} bytes)")
    return out


def table(section: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Markdown/rich table rows of a :func:`run` result."""
    headers = ["LoRA r=16 on", "tensors", "raw bytes", "deltakit overhead (header + config)", "peft overhead",
               f"deltakit <= raw + {section['bound_bytes']} B"]
    rows = []
    for scenario, e in section["scenarios"].items():
        d, p = e["deltakit"], e["peft"]
        rows.append([scenario, d["tensors"], d["raw_bytes"],
                     f"{d['overhead_bytes']} B ({d['header_bytes']} + {d['config_bytes']})", f"{p['overhead_bytes']} B",
                     "yes" if d["within_bound"] else "no"])
    return headers, rows


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: print the table and the JSON."""
    parser = argparse.ArgumentParser(description="delta checkpoint bytes on disk, deltakit vs PEFT")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    section = run(args.quick, log=suite_utils.log_to_stderr(True))
    common.print_rich_table("Checkpoint size", *table(section))
    print(json.dumps(section))
    return 0


if __name__ == "__main__":
    sys.exit(main())
