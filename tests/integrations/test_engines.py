"""LoRA deltas exported for vLLM and LoRAX: the PEFT layout they load, checked at export time against what they
serve (rank limits, modules, no DoRA, no modules_to_save), with clear errors and nothing written when refused."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from deltakit import BitFitModel, DeltaError, DoraModel, LoraModel
from deltakit.integrations.engines import (
    VLLM_MAX_LORA_RANKS,
    check_for_engine,
    export_for_engine,
)
from deltakit.integrations.peft import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME
from tests.helpers import perturb, tiny_bert, tiny_gpt2, tiny_llama
from tests.tolerances import assert_same_function

peft = pytest.importorskip("peft")

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("engine", ["vllm", "lorax"])
@pytest.mark.parametrize("rslora", [False, True])
def test_export_writes_the_peft_layout_the_engine_loads(engine: str, rslora: bool, tmp_path: pathlib.Path) -> None:
    model = tiny_llama()
    delta = LoraModel(model, lora_r=8, lora_alpha=16, use_rslora=rslora, modified_modules=[*ATTENTION, "down_proj"])
    perturb(delta, scale=0.3)
    ours = logits(model)
    plan = export_for_engine(delta, tmp_path / "adapter", engine)
    assert plan.path == str(tmp_path / "adapter") and plan.rank == 8 and plan.use_rslora is rslora
    assert plan.modules == (*ATTENTION, "down_proj")
    assert plan.max_lora_rank == (16 if engine == "vllm" else None)  # vLLM's default --max-lora-rank holds r=8
    config = json.loads((tmp_path / "adapter" / PEFT_CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert config["use_rslora"] is rslora and config["use_dora"] is False and config["bias"] == "none"
    assert config["modules_to_save"] is None and config["task_type"] == "CAUSAL_LM"
    with safe_open(str(tmp_path / "adapter" / PEFT_WEIGHTS_NAME), framework="pt") as weights:
        keys = list(weights.keys())
    assert keys and all(k.startswith("base_model.model.model.layers.") for k in keys)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    # The layout is PEFT's: PEFT itself computes the same function from it (rsLoRA scale included).
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    assert_same_function(logits(theirs), ours, model=model)
    assert not torch.allclose(logits(tiny_llama()), ours)


def test_vllm_rank_limits_are_checked_and_name_the_flag_to_set(tmp_path: pathlib.Path) -> None:
    delta = LoraModel(tiny_llama(), lora_r=64, lora_alpha=64, modified_modules=["q_proj"])
    assert check_for_engine(delta, "vllm").max_lora_rank == 64
    assert check_for_engine(delta, "vllm", max_lora_rank=128).max_lora_rank == 128
    with pytest.raises(DeltaError, match=r"rank 64, more than max_lora_rank=32.*--max-lora-rank 64"):
        export_for_engine(delta, tmp_path / "a", "vllm", max_lora_rank=32)
    with pytest.raises(DeltaError, match=r"max_lora_rank=48 is not a value vLLM accepts"):
        export_for_engine(delta, tmp_path / "a", "vllm", max_lora_rank=48)
    with pytest.raises(DeltaError, match="vLLM's setting"):
        export_for_engine(delta, tmp_path / "a", "lorax", max_lora_rank=64)
    assert not (tmp_path / "a").exists()
    wide = LlamaForCausalLM(LlamaConfig(hidden_size=1040, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=8, vocab_size=100))
    big = LoraModel(wide, lora_r=VLLM_MAX_LORA_RANKS[-1] + 1, modified_modules=["q_proj"], name="big")
    with pytest.raises(DeltaError, match="largest --max-lora-rank"):
        check_for_engine(big, "vllm")
    assert check_for_engine(big, "lorax").max_lora_rank is None


@pytest.mark.parametrize("engine", ["vllm", "lorax"])
def test_dora_is_refused_since_the_engines_drop_its_magnitude(engine: str, tmp_path: pathlib.Path) -> None:
    delta = DoraModel(tiny_llama(), lora_r=4, modified_modules=["q_proj", "v_proj"])
    with pytest.raises(DeltaError, match="magnitude vector.*Merge it into the backbone"):
        export_for_engine(delta, tmp_path / "a", engine)
    assert not (tmp_path / "a").exists()


def test_other_methods_and_task_heads_are_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(DeltaError, match="serves LoRA adapters; got BitFitModel"):
        export_for_engine(BitFitModel(tiny_llama()), tmp_path / "a")
    delta = LoraModel(tiny_llama(), lora_r=4, modified_modules=["q_proj"])
    with pytest.raises(DeltaError, match="task_type='SEQ_CLS'.*modules_to_save"):
        export_for_engine(delta, tmp_path / "a", task_type="SEQ_CLS")
    delta.freeze_module(exclude=["deltas", "lm_head"])
    with pytest.raises(DeltaError, match=r"keeps backbone tensors trainable \(\['lm_head.weight'\]\).*modules_to_save"):
        export_for_engine(delta, tmp_path / "a", "lorax")
    with pytest.raises(DeltaError, match="engine must be one of"):
        check_for_engine(delta, "tgi")
    assert not (tmp_path / "a").exists()


def test_modules_the_engine_does_not_serve_are_refused_unless_declared(tmp_path: pathlib.Path) -> None:
    head = LoraModel(tiny_llama(), lora_r=4, modified_modules=["q_proj", "lm_head"])
    with pytest.raises(DeltaError, match=r"vLLM does not serve LoRA on 'lm_head' \(site 'lm_head'\)"):
        export_for_engine(head, tmp_path / "a", "vllm")
    assert check_for_engine(head, "lorax").modules == ("q_proj", "lm_head")  # LoRAX serves lm_head on Llama
    assert check_for_engine(head, "vllm", supported_modules=["q_proj", "lm_head"]).modules == ("q_proj", "lm_head")
    embed = LoraModel(tiny_llama(), lora_r=4, modified_modules=["embed_tokens"], name="embed")
    with pytest.raises(DeltaError, match="on a Embedding; vLLM serves LoRA on linear projections only"):
        check_for_engine(embed, "vllm", supported_modules=["embed_tokens"])
    with pytest.raises(DeltaError, match="model_type 'bert'.*supported_modules="):
        check_for_engine(LoraModel(tiny_bert(), lora_r=4), "vllm")
    gpt2 = LoraModel(tiny_gpt2(), lora_r=4, modified_modules=["c_attn"])  # Conv1D hosts: LoRAX serves GPT-2
    assert check_for_engine(gpt2, "lorax").modules == ("c_attn",)
    with pytest.raises(DeltaError, match="not one string"):
        check_for_engine(gpt2, "lorax", supported_modules="c_attn")
    assert not (tmp_path / "a").exists()
