"""Checkpoint size: bytes on disk of a saved LoRA, over the raw bytes of its tensors, deltakit vs PEFT.

Scenarios (:data:`SCENARIOS`): LoRA r=16 on query/value and on all linear layers of MiniLM, and LoRA r=8 on
q_proj/v_proj of a Llama-130M layout (the setting of the PEFT figure in the issue).

For each scenario the same backbone gets a deltakit LoRA (``save_finetuned``) and a PEFT LoRA
(``save_pretrained``) on the same modules; every file the library writes is counted. ``overhead`` = total bytes -
raw tensor bytes (``numel * element_size`` of the saved LoRA factors). deltakit's overhead is split into the
safetensors header (8-byte length + JSON: one entry per tensor, named exactly as in ``delta_state_dict()``, e.g.
``<host>.lora.lora_A``, the layout every safetensors tool reads) and ``delta_config.json``. The target per scenario
(``bound_bytes``): the header spends at most :data:`PER_TENSOR_BYTES` per tensor besides its name, and the config
at most :data:`CONFIG_BYTES`.

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

#: Header bytes per tensor besides its name (``"dtype":"F32","shape":[16,384],"data_offsets":[a,b]`` and the
#: JSON framing take ~65).
PER_TENSOR_BYTES = 100
#: Bound on ``delta_config.json`` (indented JSON: hyper-parameters, range-form sites, fingerprint, hash).
CONFIG_BYTES = 1500
#: name -> (backbone, LoRA rank, deltakit modified_modules, PEFT target_modules). "llama130m q,v r=8" is the
#: setting of the issue's PEFT figure (~12.5 KB over the raw tensors).
SCENARIOS: dict[str, tuple[str, int, list[str], Any]] = {
    "minilm q,v r=16": ("bert", 16, ["query", "value"], ["query", "value"]),
    "minilm all linear r=16": (
        "bert", 16,
        ["query", "key", "value", "attention.output.dense", "intermediate.dense", r"[r]layer\.\d+\.output\.dense"],
        r".*layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)",
    ),
    "llama130m q,v r=8": ("llama", 8, ["q_proj", "v_proj"], ["q_proj", "v_proj"]),
}


def directory_bytes(path: str) -> dict[str, int]:
    """Size of every file in ``path`` (not recursive)."""
    return {name: os.path.getsize(os.path.join(path, name)) for name in sorted(os.listdir(path))}


def safetensors_header_bytes(file: str) -> int:
    """Bytes of a safetensors file that are not tensor data: the 8-byte length field plus the JSON header."""
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
    return 8 + length


def bound_bytes(names: list[str]) -> int:
    """The overhead target for tensors named ``names``: 8-byte length field, the ``{"format":"pt"}`` metadata,
    each name plus :data:`PER_TENSOR_BYTES`, and the config."""
    return 8 + 32 + sum(len(name) + PER_TENSOR_BYTES for name in names) + CONFIG_BYTES


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

    _, rank, dk_modules, peft_targets = SCENARIOS[scenario]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = base_factory()
        delta = deltakit.LoraModel(model, lora_r=rank, lora_alpha=2 * rank, modified_modules=dk_modules)
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
        names = list(delta.delta_state_dict())
        out["deltakit"]["bound_bytes"] = bound_bytes(names)
        out["deltakit"]["within_bound"] = out["deltakit"]["overhead_bytes"] <= out["deltakit"]["bound_bytes"]

        model = base_factory()
        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=peft_targets))
        raw = sum(p.numel() * p.element_size() for n, p in wrapped.named_parameters() if "lora_" in n)
        path = os.path.join(tmp, "peft")
        wrapped.save_pretrained(path)
        files = directory_bytes(path)
        total = sum(files.values())
        out["peft"] = {"files": files, "raw_bytes": raw, "total_bytes": total, "overhead_bytes": total - raw}
    return out


def _factories(quick: bool) -> dict[str, tuple[str, Callable[[], nn.Module]]]:
    """Backbone builders: MiniLM and a Llama-130M layout, or tiny versions with the same module names."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    def llama(hidden: int, inter: int, heads: int) -> Callable[[], nn.Module]:
        # The LoRA tensors' names and shapes do not depend on the vocabulary: a small one saves time and memory.
        return lambda: LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=hidden, intermediate_size=inter,
                                                    num_hidden_layers=12, num_attention_heads=heads,
                                                    num_key_value_heads=heads))

    if quick:
        def bert() -> nn.Module:
            return BertModel(BertConfig(hidden_size=64, num_hidden_layers=6, num_attention_heads=2,
                                        intermediate_size=128, vocab_size=1000, max_position_embeddings=64))

        return {"bert": ("tiny random BERT (hidden 64, 6 layers)", bert),
                "llama": ("tiny random Llama (hidden 64, 12 layers)", llama(64, 128, 4))}
    from transformers import AutoModelForSequenceClassification

    from deltakit.demo import real_model_path

    def minilm() -> nn.Module:
        return AutoModelForSequenceClassification.from_pretrained(real_model_path(), num_labels=2)

    return {"bert": ("all-MiniLM-L6-v2 (BertForSequenceClassification)", minilm),
            "llama": ("random Llama-130M layout (hidden 768, 12 layers; vocabulary 320)", llama(768, 2048, 12))}


def run(quick: bool = False, log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Measure every scenario (tiny models with the same module names and counts with ``quick``).

    Returns:
        ``{"models": ..., "bound": <text>, "scenarios": {name: measure(...)}, "notes": [...]}`` (each scenario's
        deltakit entry holds its ``bound_bytes``).
    """
    suite_utils.quiet()
    factories = _factories(quick)
    bound = f"names + {PER_TENSOR_BYTES} B per tensor + {CONFIG_BYTES} B config"
    out: dict[str, Any] = {"models": {k: v[0] for k, v in factories.items()}, "bound": bound, "scenarios": {},
                           "notes": []}
    out["model"] = "; ".join(out["models"].values())
    for scenario, (backbone, *_rest) in SCENARIOS.items():
        log(f"checkpoint size: {scenario}")
        entry = measure(factories[backbone][1], scenario)
        entry["model"] = factories[backbone][0]
        out["scenarios"][scenario] = entry
        if entry["deltakit"]["raw_bytes"] != entry["peft"]["raw_bytes"]:
            out["notes"].append(f"{scenario}: the two LoRAs differ in size ({entry['deltakit']['raw_bytes']} vs "
                                f"{entry['peft']['raw_bytes']} bytes)")
    return out


def table(section: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Markdown/rich table rows of a :func:`run` result."""
    headers = ["LoRA", "tensors", "raw bytes", "deltakit overhead (header + config)", "peft overhead",
               f"deltakit <= raw + bound ({section['bound']})"]
    rows = []
    for scenario, e in section["scenarios"].items():
        d, p = e["deltakit"], e["peft"]
        rows.append([scenario, d["tensors"], d["raw_bytes"],
                     f"{d['overhead_bytes']} B ({d['header_bytes']} + {d['config_bytes']})", f"{p['overhead_bytes']} B",
                     f"{'yes' if d['within_bound'] else 'no'} ({d['bound_bytes']} B)"])
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
