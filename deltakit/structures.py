"""Common structure: architecture-independent *role names* for the modules of transformer backbones.

A role name such as ``attn.q`` (the query projection of every attention block) or ``ff.w2`` (the second, output
projection of every feed-forward block) lets one ``modified_modules`` list work across architectures, and is how
each delta method states its default positions. This file is the only place that knows the module names of
concrete transformers architectures.

Roles:

============  ===============================================================================
``attn.q``    query projection (self- and, in encoder-decoders, cross-attention)
``attn.k``    key projection
``attn.v``    value projection
``attn.o``    attention output projection
``ff.w1``     first (up) projection of the feed-forward block
``ff.gate``   gate projection of a gated feed-forward block (Llama's ``gate_proj``)
``ff.w2``     second (down / output) projection of the feed-forward block
``attn.norm`` the layer norm that belongs to the attention sub-block
``ff.norm``   the layer norm that belongs to the feed-forward sub-block
``embed``     the token embedding
============  ===============================================================================

A role maps to one or more patterns in the addressing syntax of :mod:`deltakit.addressing` (a dotted suffix, or a
``[r]`` regex matched against whole dotted suffixes). A pattern of a role may match nothing in a given model (for
example cross-attention in an encoder-only T5), but the role as a whole must match something.

On architectures with a fused query/key/value projection (GPT-2's ``c_attn``), ``attn.q``, ``attn.k`` and
``attn.v`` all resolve to the fused module, which is then modified once, as a whole.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

ROLE_NAMES: tuple[str, ...] = (
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.o",
    "ff.w1",
    "ff.gate",
    "ff.w2",
    "attn.norm",
    "ff.norm",
    "embed",
)

_BERT_LIKE: dict[str, list[str]] = {
    "attn.q": ["attention.self.query"],
    "attn.k": ["attention.self.key"],
    "attn.v": ["attention.self.value"],
    "attn.o": ["attention.output.dense"],
    "ff.w1": ["intermediate.dense"],
    "ff.w2": [r"[r]layer\.\d+\.output\.dense"],
    "attn.norm": ["attention.output.LayerNorm"],
    "ff.norm": [r"[r]layer\.\d+\.output\.LayerNorm"],
    "embed": ["embeddings.word_embeddings"],
}

_GPT2: dict[str, list[str]] = {
    "attn.q": ["attn.c_attn"],
    "attn.k": ["attn.c_attn"],
    "attn.v": ["attn.c_attn"],
    "attn.o": ["attn.c_proj"],
    "ff.w1": ["mlp.c_fc"],
    "ff.w2": ["mlp.c_proj"],
    "attn.norm": [r"[r]h\.\d+\.ln_1"],
    "ff.norm": [r"[r]h\.\d+\.ln_2"],
    "embed": ["wte"],
}

_T5: dict[str, list[str]] = {
    "attn.q": ["SelfAttention.q", "EncDecAttention.q"],
    "attn.k": ["SelfAttention.k", "EncDecAttention.k"],
    "attn.v": ["SelfAttention.v", "EncDecAttention.v"],
    "attn.o": ["SelfAttention.o", "EncDecAttention.o"],
    # T5 v1.0 has one input projection ``wi``; gated T5 v1.1 has ``wi_0`` (gate) and ``wi_1`` (linear).
    "ff.w1": ["DenseReluDense.wi", "DenseReluDense.wi_1"],
    "ff.gate": ["DenseReluDense.wi_0"],
    "ff.w2": ["DenseReluDense.wo"],
    "attn.norm": [r"[r]block\.\d+\.layer\.0\.layer_norm", r"[r]decoder\.block\.\d+\.layer\.1\.layer_norm"],
    "ff.norm": [r"[r]encoder\.block\.\d+\.layer\.1\.layer_norm", r"[r]decoder\.block\.\d+\.layer\.2\.layer_norm"],
    # `shared` holds the tied weight, but the encoder and decoder call their own `embed_tokens` modules.
    "embed": ["encoder.embed_tokens", "decoder.embed_tokens"],
}

_LLAMA_LIKE: dict[str, list[str]] = {
    "attn.q": ["self_attn.q_proj"],
    "attn.k": ["self_attn.k_proj"],
    "attn.v": ["self_attn.v_proj"],
    "attn.o": ["self_attn.o_proj"],
    "ff.w1": ["mlp.up_proj"],
    "ff.gate": ["mlp.gate_proj"],
    "ff.w2": ["mlp.down_proj"],
    "attn.norm": ["input_layernorm"],
    "ff.norm": ["post_attention_layernorm"],
    "embed": ["embed_tokens"],
}

#: ``model_type`` (from the HF config) -> role -> patterns.
STRUCTURES: dict[str, dict[str, list[str]]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "gpt2": _GPT2,
    "t5": _T5,
    "mt5": _T5,
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
}


def is_role_name(pattern: str) -> bool:
    """Whether ``pattern`` is one of the common-structure role names (``attn.q``, ``ff.w2``, ...)."""
    return pattern in ROLE_NAMES


def _configs(model: nn.Module) -> Iterator[object]:
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and isinstance(getattr(config, "model_type", None), str):
            yield config


def detect_model_type(model: nn.Module) -> str | None:
    """The HF ``model_type`` of the first transformers model found in ``model`` (itself or any submodule).

    Returns ``None`` for a plain ``nn.Module`` that holds no transformers model.
    """
    for config in _configs(model):
        return config.model_type  # type: ignore[attr-defined]
    return None


def find_config(model: nn.Module) -> object | None:
    """The HF config of the first transformers model found in ``model``, or ``None``."""
    return next(_configs(model), None)


def role_patterns(model_type: str | None, role: str) -> list[str] | None:
    """The patterns a role name stands for in an architecture, or ``None`` if the architecture is not known."""
    if model_type is None or model_type not in STRUCTURES:
        return None
    return STRUCTURES[model_type].get(role, [])


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's linear layer with a transposed weight)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but keep plain-torch use possible
        return False
    return isinstance(module, Conv1D)


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a transformers ``Conv1D``, else ``None``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.nf)
    return None


def norm_shape(module: nn.Module) -> tuple[int, ...] | None:
    """The normalized shape of a LayerNorm or an RMSNorm-like module (T5LayerNorm, LlamaRMSNorm, ...), else None.

    RMSNorm-like means: a class whose name ends with ``Norm``, with a weight parameter and no child modules.
    """
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return tuple(module.normalized_shape)
    weight = getattr(module, "weight", None)
    if (
        type(module).__name__.endswith("Norm")
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 1
        and not any(True for _ in module.children())
    ):
        return tuple(weight.shape)
    return None
