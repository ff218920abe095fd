"""Training-step time of LoRA and DoRA over a torchao-quantized Llama, against the float one (docs/quantization.md).

One thread, cases interleaved round by round, median per case; each ratio is against the float backbone with the
same method, within the same run. ``tiny``: the test suite's tiny Llama shape (hidden 32, 2 layers, batch 4 x 12);
``small``: hidden 512, 4 layers, batch 4 x 128.

    python benchmarks/quantized_step.py tiny|small [--rounds 9]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deltakit as dk

SIZES = {  # config, (batch, sequence), steps per timed round
    "tiny": ({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 100}, (4, 12), 20),
    "small": ({"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4, "num_attention_heads": 8,
               "num_key_value_heads": 8, "vocab_size": 1000}, (4, 128), 3),
}


def training_step(size: str, quantization: str, method: str) -> Callable[[], None]:
    """One AdamW step of ``method`` (r=8 on q_proj, v_proj) on a Llama of ``size``, quantized as named."""
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup, quantize_

    dims, (batch, seq), _ = SIZES[size]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=256, **dims))
    if quantization == "int8":
        quantize_(model, Int8WeightOnlyConfig())
    elif quantization == "int4":
        quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    delta_class = {"lora": dk.LoraModel, "dora": dk.DoraModel}[method]
    delta = delta_class(model, modified_modules=["q_proj", "v_proj"], lora_r=8)
    delta.freeze_module(exclude=["deltas"])
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(2, dims["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def measure(size: str, rounds: int) -> dict[str, float]:
    """Median seconds per step of each ``<quantization>-<method>`` case."""
    cases = {f"{q}-{m}": training_step(size, q, m) for m in ("lora", "dora") for q in ("float", "int8", "int4")}
    reps = SIZES[size][2]
    for step in cases.values():  # warm-up: first-call allocations and dispatch caches
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, step in cases.items():
            start = time.perf_counter()
            for _ in range(reps):
                step()
            times[name].append((time.perf_counter() - start) / reps)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("size", choices=sorted(SIZES))
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    logging.getLogger("torchao").setLevel(logging.ERROR)  # its CUDA-only kernels failing to load, at import
    torch.set_num_threads(1)
    medians = measure(args.size, args.rounds)
    for name, seconds in medians.items():
        base = medians["float-" + name.split("-")[1]]
        print(f"{args.size} {name:12s} {seconds * 1e3:8.2f} ms/step  {seconds / base:.2f}x float")
    return medians


if __name__ == "__main__":
    main()
