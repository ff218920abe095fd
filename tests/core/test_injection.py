"""Injection at scale: LoRA on every linear layer of meta-device Llama models, with exact parameter counts.

The closed form of ``benchmarks/injection.py`` (``r * (in + out)`` per site) is checked against a hand-computed
literal, against deltakit's and PEFT's counts on a small GQA model, and against deltakit on the real Llama-7B and
Llama-70B shapes (built on the meta device: no memory, no arithmetic). No timings here.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks import injection
from deltakit import LoraModel


def _meta(config: LlamaConfig) -> torch.nn.Module:
    with torch.device("meta"):
        return LlamaForCausalLM(config)


SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=100)


def test_analytic_formula_matches_a_hand_count() -> None:
    # head_dim 16; q 64->64, k and v 64->32 (GQA), o 64->64, gate/up 64->128, down 128->64; r=16.
    per_layer = 16 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 128))
    assert per_layer == 16384
    assert injection.analytic_lora_params(LlamaConfig(**SMALL), r=16) == 2 * per_layer
    assert injection.analytic_lora_params(LlamaConfig(**SMALL), r=4, targets=("q_proj",)) == 2 * 4 * 128


def test_deltakit_and_peft_counts_equal_the_formula_on_a_small_meta_model() -> None:
    peft = pytest.importorskip("peft")
    config = LlamaConfig(**{**SMALL, "num_hidden_layers": 3, "hidden_size": 96, "num_attention_heads": 6,
                            "num_key_value_heads": 3, "intermediate_size": 200})
    expected = injection.analytic_lora_params(config, r=16)
    model = _meta(config)
    delta = LoraModel(model, lora_r=16, lora_alpha=32, modified_modules=list(injection.TARGETS))
    assert delta.num_delta_parameters() == expected
    assert len(delta.sites) == 3 * 7
    assert all(p.is_meta for p in delta.parameters())
    wrapped = peft.get_peft_model(_meta(config), peft.LoraConfig(r=16, target_modules=list(injection.TARGETS)))
    assert sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n) == expected


@pytest.mark.parametrize(
    "shape, expected_params, expected_sites",
    [("llama-7b", 39_976_960, 224), ("llama-70b", 207_093_760, 560)],
)
def test_lora_on_all_linear_layers_of_7b_and_70b_shapes(shape: str, expected_params: int, expected_sites: int) -> None:
    config = injection.llama_config(shape)
    assert injection.analytic_lora_params(config) == expected_params
    model = injection.meta_model(config)
    keys = list(model.state_dict())
    delta = LoraModel(model, lora_r=16, lora_alpha=32, modified_modules=list(injection.TARGETS))
    assert delta.num_delta_parameters() == expected_params
    assert len(delta.sites) == expected_sites
    assert {type(s.host).__name__ for s in delta.sites} == {"Linear"}
    assert not any(s.name.endswith("lm_head") for s in delta.sites)
    delta.detach()
    assert list(model.state_dict()) == keys
    assert not any(m._forward_hooks for m in model.modules())


def test_quick_injection_benchmark_reports_counts_and_times() -> None:
    pytest.importorskip("peft")
    threads = torch.get_num_threads()
    section = injection.run(quick=True, rounds=1, warmup=0)
    torch.set_num_threads(threads)
    entry = section["shapes"]["llama-small"]
    assert section["notes"] == []
    assert entry["params"] == {name: entry["analytic_params"] for name in ("deltakit", "peft", "peft_low_mem")}
    assert all(entry["params_match"].values())
    for name in ("deltakit", "peft", "peft_low_mem"):
        assert entry["time"][name]["n"] == 1 and entry["time"][name]["median"] > 0
    headers, rows = injection.table(section)
    assert len(rows) == 1 and rows[0][0] == "llama-small" and rows[0][-1] == "yes"
