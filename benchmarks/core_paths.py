"""The core's hot paths, for comparing two revisions of deltakit side by side (one thread, medians).

* ``switch_ms``: one ``DeltaGroup.switch`` between 8 LoRAs on q,v of a Llama-130M built on the meta device;
* ``step_ms``: a LoRA (q,v, r=8) training step (forward + backward) of a 4-layer, 256-wide Llama, batch 4 x 128;
* ``inject_7b_ms``: creating LoRA r=16 on every linear layer of a meta Llama-7B (224 sites).

A refactoring that should change no behaviour must not slow these down. Compare revisions in alternating
processes on one machine (a shared machine drifts)::

    git worktree add /tmp/before REV
    for i in 1 2 3; do
        PYTHONPATH=/tmp/before python benchmarks/core_paths.py; PYTHONPATH=. python benchmarks/core_paths.py
    done

``--quick`` runs tiny versions (the tests use it so the script cannot rot).
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import torch
torch.set_num_threads(1)
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel  # noqa: E402 - after the thread count

import deltakit  # noqa: E402

QUICK = "--quick" in sys.argv

def switch_ms() -> float:
    layers = 2 if QUICK else 12
    cfg = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=layers, num_attention_heads=12,
                      num_key_value_heads=12, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    group = deltakit.DeltaGroup(model)
    names = [f"d{i}" for i in range(8)]
    for n in names:
        group.add(deltakit.LoraModel(model, modified_modules=["q_proj", "v_proj"], lora_r=8, name=n).detach())
    k, samples = (5, []) if QUICK else (100, [])
    for r in range(5 if QUICK else 15):
        t0 = time.perf_counter()
        for i in range(k):
            group.switch(names[i % 8])
        samples.append((time.perf_counter() - t0) / k * 1e3)
    return statistics.median(samples[3:])

def step_ms() -> float:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=1000)
    model = LlamaForCausalLM(cfg)
    delta = deltakit.LoraModel(model, modified_modules=["q_proj", "v_proj"], lora_r=8)
    delta.freeze_module()
    ids = torch.randint(0, 1000, (1, 8) if QUICK else (4, 128))
    samples = []
    for r in range(7 if QUICK else 25):
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples[5:])

def create_ms() -> float:
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2 if QUICK else 32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    samples = []
    for r in range(7):
        t0 = time.perf_counter()
        d = deltakit.LoraModel(
            model, modified_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], lora_r=16
        )
        samples.append((time.perf_counter() - t0) * 1e3)
        d.detach()
    return statistics.median(samples[1:])

if __name__ == "__main__":
    print(json.dumps({"switch_ms": switch_ms(), "step_ms": step_ms(), "inject_7b_ms": create_ms(),
                      "deltakit": deltakit.__file__}))
