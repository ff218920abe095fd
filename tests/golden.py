"""Golden outputs and gradients of seeded deltas of every method on four tiny architectures.

``tests/data/golden.safetensors`` pins what every method computes, so a refactoring that is meant to change nothing
(the method contract, file splits) is checked against the values recorded before it. Regenerate the file only when a
change of results is intended, and say so in the commit::

    HF_HUB_OFFLINE=1 .venv/bin/python -m tests.golden

Values are compared with the rounding bound of ``tests/tolerances.py``: the file was written on one CPU and is read
on others.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from deltakit import (
    AdapterModel,
    BitFitModel,
    CompacterModel,
    LoraModel,
    LowRankAdapterModel,
    ParallelAdapterModel,
    PrefixModel,
    SoftPromptModel,
)

from tests.helpers import ARCHS, perturb

GOLDEN_FILE = Path(__file__).parent / "data" / "golden.safetensors"
GOLDEN_ARCHS = ("bert", "gpt2", "t5", "llama")

#: One seeded delta per method (two for LoRA: with and without embeddings); creation is seeded too, so the random
#: initialisation of the factors is pinned along with the arithmetic.
GOLDEN_METHODS: dict[str, Callable[[nn.Module], object]] = {
    "lora": lambda m: LoraModel(m, lora_r=4, lora_alpha=8),
    "lora-embed-ff": lambda m: LoraModel(m, modified_modules=["embed", "ff.w1", "ff.w2"], lora_r=2),
    "bitfit": lambda m: BitFitModel(m),
    "adapter": lambda m: AdapterModel(m, bottleneck_dim=6),
    "parallel-adapter": lambda m: ParallelAdapterModel(m, bottleneck_dim=6, scaled=2.0),
    "low-rank-adapter": lambda m: LowRankAdapterModel(m, reduction_factor=4, low_rank_rank=2),
    "compacter": lambda m: CompacterModel(m, reduction_factor=4),
    "prefix": lambda m: PrefixModel(m, prefix_token_num=3, embed_dim=8, mid_dim=8),
    "soft-prompt": lambda m: SoftPromptModel(m, soft_token_num=3),
}


def golden_case(method: str, arch_name: str) -> tuple[dict[str, torch.Tensor], nn.Module]:
    """``{"out": logits, "grad/<param>": gradient, ...}`` of one seeded delta, and the model it ran on."""
    arch = ARCHS[arch_name]
    model = arch.build()
    torch.manual_seed(11)
    delta = GOLDEN_METHODS[method](model)
    perturb(delta, seed=7, scale=0.3)
    for param in delta.parameters():
        param.requires_grad_(True)
    out = arch.run(model)
    weights = torch.linspace(-1, 1, out.numel()).view(out.shape)
    (out * weights).sum().backward()
    values = {"out": out.detach().clone()}
    values.update({f"grad/{name}": p.grad.detach().clone() for name, p in delta.named_parameters()})
    return values, model


def compute_all() -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for method in GOLDEN_METHODS:
        for arch_name in GOLDEN_ARCHS:
            values, _ = golden_case(method, arch_name)
            tensors.update({f"{method}/{arch_name}/{key}": value for key, value in values.items()})
    return tensors


if __name__ == "__main__":
    from safetensors.torch import save_file

    GOLDEN_FILE.parent.mkdir(exist_ok=True)
    save_file(compute_all(), str(GOLDEN_FILE))
    print(f"wrote {GOLDEN_FILE}")
