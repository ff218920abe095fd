"""Role names: architecture-independent *role names* for the modules of transformer backbones.

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

Fused projections. On architectures with a fused query/key/value projection (GPT-2's ``c_attn``, GPT-NeoX's
``query_key_value``, Phi-3's ``qkv_proj``), ``attn.q``, ``attn.k`` and ``attn.v`` all resolve to the fused module,
which is then modified once, as a whole (a LoRA on it adapts q, k and v together; it is not restricted to the
query slice). Likewise Phi-3's fused ``gate_up_proj`` is both ``ff.w1`` and ``ff.gate``.

Architectures whose ``model_type`` is not in :data:`STRUCTURES` (and plain ``nn.Module`` transformers) get their
roles *inferred* from the module structure by :func:`infer_structure`: the repeated layer blocks, the attention
blocks inside them and their projections (by name), the feed-forward projections (by shape), the norms (by place).
What was inferred is logged (logger ``deltakit.structures``, level WARNING) so the user can check it; a role that
cannot be told apart raises a :class:`~deltakit.errors.ModuleMatchError` listing the candidate module names.
"""

from __future__ import annotations

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

# DeBERTa-v2/v3: BERT's layout with ``*_proj`` names in the self-attention.
_DEBERTA_V2: dict[str, list[str]] = {
    **_BERT_LIKE,
    "attn.q": ["attention.self.query_proj"],
    "attn.k": ["attention.self.key_proj"],
    "attn.v": ["attention.self.value_proj"],
}

_DISTILBERT: dict[str, list[str]] = {
    "attn.q": ["attention.q_lin"],
    "attn.k": ["attention.k_lin"],
    "attn.v": ["attention.v_lin"],
    "attn.o": ["attention.out_lin"],
    "ff.w1": ["ffn.lin1"],
    "ff.w2": ["ffn.lin2"],
    "attn.norm": ["sa_layer_norm"],
    "ff.norm": ["output_layer_norm"],
    "embed": ["embeddings.word_embeddings"],
}

# ALBERT shares one layer (per group) across the depth: a delta on it acts at every depth that reuses it.
_ALBERT: dict[str, list[str]] = {
    "attn.q": [r"[r]albert_layers\.\d+\.attention\.query"],
    "attn.k": [r"[r]albert_layers\.\d+\.attention\.key"],
    "attn.v": [r"[r]albert_layers\.\d+\.attention\.value"],
    "attn.o": [r"[r]albert_layers\.\d+\.attention\.dense"],
    "ff.w1": [r"[r]albert_layers\.\d+\.ffn"],
    "ff.w2": [r"[r]albert_layers\.\d+\.ffn_output"],
    "attn.norm": [r"[r]albert_layers\.\d+\.attention\.LayerNorm"],
    "ff.norm": [r"[r]albert_layers\.\d+\.full_layer_layer_norm"],
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

_GPT_NEOX: dict[str, list[str]] = {
    "attn.q": ["attention.query_key_value"],
    "attn.k": ["attention.query_key_value"],
    "attn.v": ["attention.query_key_value"],
    "attn.o": ["attention.dense"],
    "ff.w1": ["mlp.dense_h_to_4h"],
    "ff.w2": ["mlp.dense_4h_to_h"],
    "attn.norm": [r"[r]layers\.\d+\.input_layernorm"],
    "ff.norm": [r"[r]layers\.\d+\.post_attention_layernorm"],
    "embed": ["embed_in"],
}

# OPT, BART (and mBART): ``self_attn`` / ``encoder_attn`` with ``*_proj``, FFN ``fc1``/``fc2`` directly in the layer.
_OPT_BART: dict[str, list[str]] = {
    "attn.q": ["self_attn.q_proj", "encoder_attn.q_proj"],
    "attn.k": ["self_attn.k_proj", "encoder_attn.k_proj"],
    "attn.v": ["self_attn.v_proj", "encoder_attn.v_proj"],
    "attn.o": ["self_attn.out_proj", "encoder_attn.out_proj"],
    "ff.w1": [r"[r]layers\.\d+\.fc1"],
    "ff.w2": [r"[r]layers\.\d+\.fc2"],
    "attn.norm": [r"[r]layers\.\d+\.self_attn_layer_norm", r"[r]layers\.\d+\.encoder_attn_layer_norm"],
    "ff.norm": [r"[r]layers\.\d+\.final_layer_norm"],
    # BART's `shared` holds the tied weight, but the encoder and decoder call their own `embed_tokens`.
    "embed": ["decoder.embed_tokens", "encoder.embed_tokens"],
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

# Phi-3 fuses q, k, v into ``qkv_proj`` and the gate and up projections into ``gate_up_proj``.
_PHI3: dict[str, list[str]] = {
    **_LLAMA_LIKE,
    "attn.q": ["self_attn.qkv_proj"],
    "attn.k": ["self_attn.qkv_proj"],
    "attn.v": ["self_attn.qkv_proj"],
    "ff.w1": ["mlp.gate_up_proj"],
    "ff.gate": ["mlp.gate_up_proj"],
}

# ViT in transformers 5 (``layers.N.attention.q_proj``); the 4.x names (``attention.attention.query``) also match.
# There is no token embedding (the patch projection is a Conv2d), so ViT has no ``embed`` role.
_VIT: dict[str, list[str]] = {
    "attn.q": ["attention.q_proj", "attention.attention.query"],
    "attn.k": ["attention.k_proj", "attention.attention.key"],
    "attn.v": ["attention.v_proj", "attention.attention.value"],
    "attn.o": ["attention.o_proj", "attention.output.dense"],
    "ff.w1": ["mlp.fc1", "intermediate.dense"],
    "ff.w2": ["mlp.fc2", r"[r]layer\.\d+\.output\.dense"],
    "attn.norm": ["layernorm_before"],
    "ff.norm": ["layernorm_after"],
}

# CLIP: the text and the vision tower share one layer layout.
_CLIP: dict[str, list[str]] = {
    "attn.q": ["self_attn.q_proj"],
    "attn.k": ["self_attn.k_proj"],
    "attn.v": ["self_attn.v_proj"],
    "attn.o": ["self_attn.out_proj"],
    "ff.w1": ["mlp.fc1"],
    "ff.w2": ["mlp.fc2"],
    "attn.norm": [r"[r]layers\.\d+\.layer_norm1"],
    "ff.norm": [r"[r]layers\.\d+\.layer_norm2"],
    "embed": ["embeddings.token_embedding"],
}

#: ``model_type`` (from the HF config) -> role -> patterns.
STRUCTURES: dict[str, dict[str, list[str]]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "camembert": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "deberta-v2": _DEBERTA_V2,
    "distilbert": _DISTILBERT,
    "albert": _ALBERT,
    "gpt2": _GPT2,
    "gpt_neox": _GPT_NEOX,
    "opt": _OPT_BART,
    "bart": _OPT_BART,
    "mbart": _OPT_BART,
    "t5": _T5,
    "mt5": _T5,
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "phi3": _PHI3,
    "vit": _VIT,
    "clip": _CLIP,
}


def is_role_name(pattern: str) -> bool:
    """Whether ``pattern`` is one of the common-structure role names (``attn.q``, ``ff.w2``, ...)."""
    return pattern in ROLE_NAMES


def role_patterns(model_type: str | None, role: str) -> list[str] | None:
    """The patterns a role name stands for in an architecture, or ``None`` if the architecture is not known."""
    if model_type is None or model_type not in STRUCTURES:
        return None
    return STRUCTURES[model_type].get(role, [])
