"""Past one machine: LoRA deltas exported for the serving engines that run thousands of adapters (vLLM, LoRAX).

Both engines load adapters in PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``, keys
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``), which :func:`deltakit.integrations.peft.
export_to_peft` writes. What they accept is narrower than what PEFT does, and some of what they do not accept is
dropped *silently* at serving time (LoRAX ignores target modules it does not support; an engine without DoRA would
apply DoRA's factors without its magnitude), so :func:`export_for_engine` checks everything the engine needs before
writing anything:

* the method: plain LoRA (with or without rsLoRA's ``alpha / sqrt(r)`` scale, written as ``use_rslora``); DoRA is
  refused (neither engine applies the magnitude vector: merge the DoRA into the backbone and serve that instead);
* the rank: vLLM serves ranks up to its ``--max-lora-rank``, which must be one of :data:`VLLM_MAX_LORA_RANKS`
  (default 16); the export says which value to start vLLM with, and refuses a rank above a given one. LoRAX takes
  any rank (it pads small ones for its kernels);
* the modules: each site must be a Linear (or transformers' Conv1D) whose last name component the engine serves
  LoRA on for the backbone's ``model_type`` (:data:`ENGINE_MODULES`, from the engines' documentation; pass
  ``supported_modules=`` for another model or engine release);
* nothing besides the LoRA factors: no backbone tensors kept trainable (PEFT's ``modules_to_save``: vLLM refuses
  them, LoRAX ignores them), no embedding or convolution LoRA, a ``task_type`` of ``None`` or ``"CAUSAL_LM"``.

The written files are read back and checked against the same rules.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from safetensors import safe_open

from ..errors import DeltaError
from ..structures import find_config
from .peft import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, export_to_peft

__all__ = ["ENGINES", "ENGINE_MODULES", "VLLM_MAX_LORA_RANKS", "EnginePlan", "check_for_engine", "export_for_engine"]

#: Values vLLM accepts for ``--max-lora-rank`` (``LoRAConfig.max_lora_rank``); an adapter's rank must not exceed it.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: vLLM's default ``--max-lora-rank``.
VLLM_DEFAULT_MAX_LORA_RANK = 16

_LLAMA_LIKE = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})

#: Per engine and ``model_type``: the module names (last component) the engine serves LoRA on.
ENGINE_MODULES: dict[str, dict[str, frozenset[str]]] = {
    # vLLM packs q/k/v into qkv_proj and gate/up into gate_up_proj, and takes the HF names of their parts.
    "vllm": {t: _LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")},
    # LoRAX docs, "LoRA" page, supported target modules by architecture.
    "lorax": {
        **{t: _LLAMA_LIKE | {"lm_head"} for t in ("llama", "mistral", "qwen2", "cohere")},
        "gemma": _LLAMA_LIKE,
        "gpt2": frozenset({"c_attn", "c_proj", "c_fc"}),
    },
}

#: The engines :func:`export_for_engine` knows, with their display names.
ENGINES = {"vllm": "vLLM", "lorax": "LoRAX"}


@dataclass(frozen=True)
class EnginePlan:
    """What an engine will be given, and how to start it.

    Attributes:
        engine: ``"vllm"`` or ``"lorax"``.
        rank: The adapter's rank ``r``.
        max_lora_rank: For vLLM, the ``--max-lora-rank`` to start it with (the one given, or the smallest legal
            value that holds ``rank``); ``None`` for LoRAX.
        modules: The module names (last components) the adapter targets.
        use_rslora: Whether the adapter uses rsLoRA's ``lora_alpha / sqrt(r)`` scale.
        path: The adapter directory once written (``None`` from :func:`check_for_engine`).
    """

    engine: str
    rank: int
    max_lora_rank: int | None
    modules: tuple[str, ...]
    use_rslora: bool
    path: str | None = None


def _engine(engine: Any) -> str:
    if not isinstance(engine, str) or engine not in ENGINES:
        raise DeltaError(f"engine must be one of {sorted(ENGINES)}, got {engine!r}.")
    return engine


def _check_method(delta: Any, label: str) -> None:
    from ..base import DeltaBase

    kind = getattr(delta, "delta_type", None) if isinstance(delta, DeltaBase) else None
    if kind == "dora":
        raise DeltaError(
            f"{label} does not apply DoRA's magnitude vector, so {delta._describe()} would serve as a different "
            f"function. Merge it into the backbone (delta.merge(), then save the model) and serve the merged model, "
            f"or train a LoRA for {label}."
        )
    if kind != "lora":
        raise DeltaError(
            f"{label} serves LoRA adapters; got {type(delta).__name__} ({kind!r}). Export a LoraModel (or serve this "
            f"delta with deltakit's DeltaGroup)."
        )


def _check_sites(delta: Any, engine: str, supported_modules: Iterable[str] | None) -> tuple[str, ...]:
    """The target module names, after checking each site is a Linear/Conv1D the engine serves LoRA on."""
    from ..deltas.lora import LoraSite

    label = ENGINES[engine]
    if supported_modules is None:
        config = find_config(delta.backbone_model)
        model_type = getattr(config, "model_type", None)
        table = ENGINE_MODULES[engine]
        if model_type not in table:
            raise DeltaError(
                f"deltakit does not know which modules {label} serves LoRA on for model_type {model_type!r} (it "
                f"knows {sorted(table)}). Pass supported_modules=[...] from {label}'s documentation for this model."
            )
        supported = table[model_type]
    else:
        if isinstance(supported_modules, str):
            raise DeltaError("supported_modules must be a list of module names, not one string.")
        supported = frozenset(supported_modules)
    names: list[str] = []
    for site in delta.sites:
        short = site.name.rpartition(".")[2]
        if type(site.module) is not LoraSite:
            raise DeltaError(
                f"The LoRA on {site.name!r} is on a {type(site.host).__name__}; {label} serves LoRA on linear "
                f"projections only. Leave that module out of the delta (exclude_modules=[{site.name!r}])."
            )
        if short not in supported:
            raise DeltaError(
                f"{label} does not serve LoRA on {short!r} (site {site.name!r}); it would ignore or refuse it. It "
                f"serves {sorted(supported)} here. Leave that module out of the delta, or pass supported_modules= if "
                f"your {label} release serves it."
            )
        names.append(short)
    return tuple(dict.fromkeys(names))


def _check_rank(rank: int, engine: str, max_lora_rank: int | None) -> int | None:
    if engine != "vllm":
        if max_lora_rank is not None:
            raise DeltaError(f"max_lora_rank is vLLM's setting; {ENGINES[engine]} takes any rank. Leave it None.")
        return None
    if max_lora_rank is None:
        fits = [v for v in VLLM_MAX_LORA_RANKS if v >= rank]
        if not fits:
            raise DeltaError(
                f"The LoRA has rank {rank}, more than vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]}). "
                f"Train a smaller rank, or merge the delta into the backbone."
            )
        return max(fits[0], VLLM_DEFAULT_MAX_LORA_RANK)
    if isinstance(max_lora_rank, bool) or max_lora_rank not in VLLM_MAX_LORA_RANKS:
        raise DeltaError(
            f"max_lora_rank={max_lora_rank!r} is not a value vLLM accepts for --max-lora-rank "
            f"({list(VLLM_MAX_LORA_RANKS)})."
        )
    if rank > max_lora_rank:
        smallest = next((v for v in VLLM_MAX_LORA_RANKS if v >= rank), None)
        raise DeltaError(
            f"The LoRA has rank {rank}, more than max_lora_rank={max_lora_rank}: vLLM would refuse to load it. Start "
            f"vLLM with --max-lora-rank {smallest} (and pass max_lora_rank={smallest}), or train rank <= "
            f"{max_lora_rank}."
        )
    return max_lora_rank


def check_for_engine(
    delta: Any,
    engine: str = "vllm",
    *,
    max_lora_rank: int | None = None,
    supported_modules: Iterable[str] | None = None,
    task_type: str | None = "CAUSAL_LM",
) -> EnginePlan:
    """Check that ``delta`` can be served by ``engine`` as a LoRA adapter, without writing anything.

    Args:
        delta: A LoRA delta (any state).
        engine: ``"vllm"`` or ``"lorax"``.
        max_lora_rank: vLLM's ``--max-lora-rank`` the adapter must fit (``None``: report the one to use).
        supported_modules: Module names (last components) the engine serves LoRA on, replacing
            :data:`ENGINE_MODULES` (for a model or release the table does not cover).
        task_type: PEFT ``task_type`` to record: ``"CAUSAL_LM"`` or ``None`` (others add ``modules_to_save``).

    Returns:
        The :class:`EnginePlan`.

    Raises:
        DeltaError: Anything the engine would refuse or silently serve differently (see the module docstring).
    """
    engine = _engine(engine)
    label = ENGINES[engine]
    _check_method(delta, label)
    if task_type not in (None, "CAUSAL_LM"):
        raise DeltaError(
            f"task_type={task_type!r} makes PEFT save a task head as modules_to_save, which {label} does not serve. "
            f"Use task_type='CAUSAL_LM' (or None)."
        )
    if delta.unfrozen_parameter_names:
        raise DeltaError(
            f"{delta._describe()} keeps backbone tensors trainable ({delta.unfrozen_parameter_names[:3]}): they "
            f"would travel as PEFT's modules_to_save, which {label} does not serve. Freeze them "
            f"(delta.freeze_module(exclude=['deltas'])) or merge the delta and serve the merged model."
        )
    if delta.heads:  # export_to_peft writes them as modules_to_save
        raise DeltaError(
            f"{delta._describe()} carries its own copies of {sorted(delta.heads)} (modules_to_save): they would "
            f"travel as PEFT's modules_to_save, which {label} does not serve. Serve it with deltakit (DeltaGroup), or "
            f"merge the delta and serve the merged model."
        )
    modules = _check_sites(delta, engine, supported_modules)
    rank = int(delta.config.lora_r)
    limit = _check_rank(rank, engine, max_lora_rank)
    return EnginePlan(engine, rank, limit, modules, bool(delta.config.use_rslora))


def _verify_written(path: str, plan: EnginePlan, label: str) -> None:
    """Read the written adapter back and check it against what the engine accepts (a guard on the writer)."""
    with open(os.path.join(path, PEFT_CONFIG_NAME), encoding="utf-8") as handle:
        config = json.load(handle)
    problems = []
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']}")
    if config.get("use_dora"):
        problems.append("use_dora=true")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r}")
    if config.get("r") != plan.rank or bool(config.get("use_rslora")) != plan.use_rslora:
        problems.append(f"r={config.get('r')}, use_rslora={config.get('use_rslora')}")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("per-module rank or alpha patterns")
    with safe_open(os.path.join(path, PEFT_WEIGHTS_NAME), framework="pt") as weights:
        extra = [k for k in weights.keys() if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if extra:
        problems.append(f"tensors besides the LoRA factors ({extra[:3]})")
    if problems:
        raise DeltaError(
            f"The adapter written to {path!r} holds what {label} does not serve: {'; '.join(problems)}. This is a "
            f"deltakit bug (the checks before writing should have refused it); please report it."
        )


def export_for_engine(
    delta: Any,
    path: str | os.PathLike[str],
    engine: str = "vllm",
    *,
    max_lora_rank: int | None = None,
    supported_modules: Iterable[str] | None = None,
    task_type: str | None = "CAUSAL_LM",
    base_model_name_or_path: str | os.PathLike[str] | None = None,
    overwrite: bool = True,
) -> EnginePlan:
    """Write ``delta`` as a PEFT-layout LoRA adapter that ``engine`` loads, after :func:`check_for_engine`.

    vLLM: ``vllm serve BASE --enable-lora --max-lora-rank {plan.max_lora_rank} --lora-modules name=PATH`` (or a
    ``LoRARequest(name, id, PATH)``). LoRAX: ``adapter_id=PATH`` with ``adapter_source="local"``.

    Args:
        delta: A LoRA delta (any state; its own parameters are exported).
        path: Target directory (created if needed).
        engine: As in :func:`check_for_engine`.
        max_lora_rank: As in :func:`check_for_engine`.
        supported_modules: As in :func:`check_for_engine`.
        task_type: As in :func:`check_for_engine`.
        base_model_name_or_path: Recorded in the config (default: the backbone config's ``_name_or_path``).
        overwrite: Replace an existing adapter in ``path``.

    Returns:
        The :class:`EnginePlan`, with ``path`` set.

    Raises:
        DeltaError: The engine would refuse the delta or serve it differently; nothing is written.
        CheckpointError: ``path`` is not a usable directory.
    """
    plan = check_for_engine(
        delta, engine, max_lora_rank=max_lora_rank, supported_modules=supported_modules, task_type=task_type
    )
    written = export_to_peft(
        delta, path, task_type=task_type, base_model_name_or_path=base_model_name_or_path, overwrite=overwrite
    )
    _verify_written(written, plan, ENGINES[plan.engine])
    return EnginePlan(plan.engine, plan.rank, plan.max_lora_rank, plan.modules, plan.use_rslora, written)
