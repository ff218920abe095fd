"""Helpers shared by the tests: tiny random models built from configs (no network), state snapshots, the repo root.

Imported as ``from tests.helpers import ...`` (conftest.py only holds fixtures).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.utils import logging as hf_logging

os.environ.setdefault("HF_HUB_OFFLINE", "1")
hf_logging.set_verbosity_error()
# One intra-op thread. The tiny test models' operations gain nothing from a second thread, and on a busy 2-core
# machine (CI, or several test runs at once) every OpenMP barrier waits for a descheduled thread: a tiny BERT forward
# took 0.9 ms with one thread and 60-100 ms with two while another process kept the cores busy (the fast set's
# lifecycle state machine: 112 s -> 19 s). Benchmark runs pick their own count; the tests calling them restore this.
torch.set_num_threads(1)

#: The repository root (tests read examples/, benchmarks/, the README from it).
REPO_ROOT = Path(__file__).resolve().parents[1]

VOCAB = 100


def load_script(path: Path, name: str) -> ModuleType:
    """Import the script at ``path`` (an example or a benchmark, not a package module) as module ``name``.

    Registered in ``sys.modules`` as a normal import would be: dataclasses look their module up there.
    """
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, f"cannot import {path}"
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tiny_bert(seed: int = 0, hidden: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * hidden,
        vocab_size=VOCAB, max_position_embeddings=64, num_labels=2,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_roberta(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = RobertaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=72, pad_token_id=1, num_labels=2,
    )
    return RobertaForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_t5(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = T5Config(
        d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=VOCAB, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1,
    )
    return T5ForConditionalGeneration(cfg).eval()


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


@dataclass
class Arch:
    """A tiny architecture: how to build it and how to run it to get a logits tensor."""

    name: str
    build: Callable[..., nn.Module]
    encoder_decoder: bool = False

    def inputs(self, seed: int = 1) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(2, VOCAB, (2, 7), generator=g)
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.encoder_decoder:
            out["decoder_input_ids"] = torch.randint(2, VOCAB, (2, 5), generator=g)
        return out

    def run(self, model: nn.Module, inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return model(**(inputs or self.inputs())).logits


ARCHS = {
    "bert": Arch("bert", tiny_bert),
    "roberta": Arch("roberta", tiny_roberta),
    "gpt2": Arch("gpt2", tiny_gpt2),
    "t5": Arch("t5", tiny_t5, encoder_decoder=True),
    "llama": Arch("llama", tiny_llama),
}



def hook_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Number of forward hooks and pre-hooks on every module (to check that nothing is left behind)."""
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the state dict (to compare exactly later)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def perturb(delta: object, seed: int = 123, scale: float = 0.5) -> None:
    """Give every delta parameter random non-zero values (a fresh delta is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():  # type: ignore[attr-defined]
            p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))
