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

import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from .errors import ModuleMatchError
from .site import DeltaSite

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

    RMSNorm-like means: a class whose name ends with ``Norm``, with a 1-d weight parameter and no child modules
    besides deltakit's own per-site modules (a :class:`~deltakit.hooks.DeltaSite` that an attached delta registered
    on the norm does not change what the norm is, so a second delta can still modify it).
    """
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return tuple(module.normalized_shape)
    weight = getattr(module, "weight", None)
    if (
        type(module).__name__.endswith("Norm")
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 1
        and all(isinstance(child, DeltaSite) for child in module.children())
    ):
        return tuple(weight.shape)
    return None


# ---------------------------------------------------------------------------------------------------- inference
logger = logging.getLogger(__name__)

_ATTENTION_NAME = re.compile(r"attn|attention", re.IGNORECASE)
_FUSED_QKV = re.compile(r"qkv|query_key_value|c_attn|in_proj", re.IGNORECASE)
_PROJ_SUFFIX = r"(_?proj|_lin|_linear|_layer)?"
_QKV_NAMES = {
    "attn.q": re.compile(rf"(q|query|wq|w_q|to_q){_PROJ_SUFFIX}", re.IGNORECASE),
    "attn.k": re.compile(rf"(k|key|wk|w_k|to_k){_PROJ_SUFFIX}", re.IGNORECASE),
    "attn.v": re.compile(rf"(v|value|wv|w_v|to_v){_PROJ_SUFFIX}", re.IGNORECASE),
}
_OUT_NAMES = re.compile(r"(o|out|output|wo|w_o|to_out|dense|c_proj|proj)" + _PROJ_SUFFIX, re.IGNORECASE)


class RoleAbsentError(ModuleMatchError):
    """An inferred structure has no module for a role (e.g. ``ff.gate`` in a non-gated FFN): default positions
    skip such roles, an explicit request is an error."""


@dataclass
class InferredStructure:
    """Roles inferred from a model's module structure (see :func:`infer_structure`).

    Attributes:
        model_class: Class name of the model the structure was inferred for.
        layers: Full names of the transformer layer blocks that were found.
        roles: Role -> full module names, for every role that could be inferred (possibly empty: role absent).
        ambiguous: Role -> explanation naming the candidate modules, for roles that could not be told apart.
    """

    model_class: str
    layers: list[str] = field(default_factory=list)
    roles: dict[str, list[str]] = field(default_factory=dict)
    ambiguous: dict[str, str] = field(default_factory=dict)

    def names_for(self, role: str, what: str = "modified_modules") -> list[str]:
        """Full names of the modules playing ``role``.

        Raises:
            ModuleMatchError: the role is ambiguous here (the message lists the candidates), or no layers exist.
            RoleAbsentError: the structure has no module for this role.
        """
        if not self.layers:
            raise ModuleMatchError(
                f"{what} pattern {role!r} is a common-structure role name, but deltakit has no structure map for this "
                f"{self.model_class} and found no transformer layers to infer one from (a ModuleList of identical "
                f"blocks holding an attention module). Pass the concrete module names in modified_modules instead, "
                f"e.g. modified_modules=['q_proj', 'v_proj']; known role names: {', '.join(ROLE_NAMES)}."
            )
        if role in self.ambiguous:
            raise ModuleMatchError(
                f"Cannot infer the role {role!r} in this {self.model_class} (its model_type is not in deltakit's "
                f"structure map): {self.ambiguous[role]} Pass the concrete module names in {what} instead."
            )
        found = self.roles.get(role, [])
        if not found:
            raise RoleAbsentError(
                f"{what} role {role!r} was not found in the structure inferred for this {self.model_class}: "
                f"{self.describe()} Pass concrete module names instead."
            )
        return list(found)

    def describe(self) -> str:
        """One line per role: how many modules and the first one, and which roles are ambiguous."""
        parts = [f"{len(self.layers)} layer blocks ({_preview(self.layers)})"]
        for role in ROLE_NAMES:
            if self.roles.get(role):
                parts.append(f"{role} -> {_preview(self.roles[role])}")
            elif role in self.ambiguous:
                parts.append(f"{role} -> ambiguous")
        return "; ".join(parts) + "."


def _preview(names: list[str]) -> str:
    return f"{names[0]!r}" + (f" and {len(names) - 1} more" if len(names) > 1 else "")


def _named_modules(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules()`` without deltakit's own delta modules (and what they hold)."""
    stack = [("", module)]
    while stack:
        name, current = stack.pop()
        yield name, current
        children = [
            (f"{name}.{child_name}" if name else child_name, child)
            for child_name, child in current.named_children()
            if not isinstance(child, DeltaSite)
        ]
        stack.extend(reversed(children))


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _is_layer_list(container: nn.Module) -> bool:
    children = list(container.children())
    return (
        isinstance(container, (nn.ModuleList, nn.Sequential))
        and bool(children)
        and len({type(c) for c in children}) == 1
        and all(_attention_blocks(c, "") for c in children)
    )


def _attention_blocks(layer: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """Outermost descendants named like attention (``attn``, ``attention``) that hold a linear layer."""
    found: list[tuple[str, nn.Module]] = []
    for rel, module in _named_modules(layer):
        if not rel or not _ATTENTION_NAME.search(_leaf(rel)) or linear_dims(module) is not None:
            continue
        if any(_inside(rel, f) for f, _ in found):
            continue
        if any(linear_dims(m) is not None for m in module.modules()):
            found.append((rel, module))
    return [(f"{prefix}.{rel}" if prefix else rel, m) for rel, m in found]


class _Collector:
    """Accumulates the per-layer classification into one role map, recording ambiguities once per role."""

    def __init__(self) -> None:
        self.roles: dict[str, list[str]] = {role: [] for role in ROLE_NAMES}
        self.ambiguous: dict[str, str] = {}

    def add(self, role: str, names: list[str]) -> None:
        for name in names:
            if name not in self.roles[role]:
                self.roles[role].append(name)

    def ambiguity(self, role: str, where: str, candidates: list[str], why: str) -> None:
        if role not in self.ambiguous:
            listed = ", ".join(repr(c) for c in candidates) if candidates else "none"
            self.ambiguous[role] = f"in {where!r} {why}; candidates: {listed}."


def _classify_attention(block: str, module: nn.Module, out: _Collector) -> int | None:
    """Find q, k, v, o in one attention block; returns the hidden size (the query projection's input)."""
    linears = [
        (f"{block}.{rel}", m) for rel, m in _named_modules(module) if rel and linear_dims(m) is not None
    ]
    names = [n for n, _ in linears]
    fused = [n for n in names if _FUSED_QKV.search(_leaf(n))]
    used: set[str] = set(fused)
    hidden: int | None = None
    for role, pattern in _QKV_NAMES.items():
        named = [n for n in names if n not in fused and pattern.fullmatch(_leaf(n))]
        if len(named) == 1:
            out.add(role, named)
            used.update(named)
        elif not named and len(fused) == 1:
            out.add(role, fused)
        else:
            why = "several modules could be" if named else "no module is named like"
            out.ambiguity(role, block, names, f"{why} the {role[-1]} projection")
    query = [n for n in out.roles["attn.q"] if _inside(n, block)]
    if query:  # the query projection reads the hidden states: its input size is the hidden size
        hidden = linear_dims(dict(linears)[query[0]])[0]  # type: ignore[index]
    rest = [n for n in names if n not in used]
    if len(rest) > 1:
        rest = [n for n in rest if _OUT_NAMES.fullmatch(_leaf(n))] or rest
    if len(rest) == 1:
        out.add("attn.o", rest)
    else:
        why = "several modules could be" if rest else "no module is left to be"
        out.ambiguity("attn.o", block, [n for n in names if n not in used] or names, f"{why} the output projection")
    return hidden


def _classify_layer(layer: str, module: nn.Module, out: _Collector) -> None:
    blocks = _attention_blocks(module, layer)
    hidden = None
    for block, block_module in blocks:
        hidden = _classify_attention(block, block_module, out) or hidden

    outside = [
        (f"{layer}.{rel}", m)
        for rel, m in _named_modules(module)
        if rel and not any(_inside(f"{layer}.{rel}", b) for b, _ in blocks)
    ]
    linears = [(n, linear_dims(m)) for n, m in outside if linear_dims(m) is not None]
    if hidden is None:
        sizes = [d[0] for _, d in linears] + [d[1] for _, d in linears]
        hidden = max(set(sizes), key=sizes.count) if sizes else None

    # Feed-forward projections by shape: up-type maps hidden -> wider, down-type maps back to hidden.
    up = [n for n, (i, o) in linears if i == hidden and o != hidden]  # type: ignore[misc]
    down = [n for n, (i, o) in linears if i != hidden and o == hidden]  # type: ignore[misc]
    if not up and not down and len(linears) == 2:  # intermediate size == hidden: registration order decides
        up, down = [linears[0][0]], [linears[1][0]]
    gates = [n for n in up if "gate" in _leaf(n).lower()]
    if len(up) == 1:
        out.add("ff.w1", up)
        out.add("ff.gate", gates)  # a fused gate_up projection is both
    elif len(up) == 2 and len(gates) == 1:
        out.add("ff.gate", gates)
        out.add("ff.w1", [n for n in up if n not in gates])
    elif up:
        for role in ("ff.w1", "ff.gate"):
            out.ambiguity(role, layer, up, f"{len(up)} projections map the hidden size {hidden} to a wider one")
    if len(down) == 1:
        out.add("ff.w2", down)
    elif down:
        out.ambiguity("ff.w2", layer, down, f"{len(down)} projections map back to the hidden size {hidden}")

    # Norms of the hidden size (per-head q/k norms have another size): inside an attention block -> attn.norm.
    norms = [
        (f"{layer}.{rel}", m)
        for rel, m in _named_modules(module)
        if rel and norm_shape(m) is not None and (hidden is None or math.prod(norm_shape(m)) == hidden)  # type: ignore[arg-type]
    ]
    inner = [n for n, _ in norms if any(_inside(n, b) for b, _ in blocks)]
    outer = [n for n, _ in norms if n not in inner]
    if inner:
        out.add("attn.norm", inner)
        if len(outer) == 1:
            out.add("ff.norm", outer)
        elif outer:
            out.ambiguity("ff.norm", layer, outer, "several norms lie outside the attention blocks")
    elif len(outer) == len(blocks) + 1:  # one norm per attention block, then the FFN's, in registration order
        out.add("attn.norm", outer[:-1])
        out.add("ff.norm", outer[-1:])
    elif outer:
        for role in ("attn.norm", "ff.norm"):
            out.ambiguity(
                role, layer, outer, f"{len(outer)} norms for {len(blocks)} attention block(s) cannot be assigned by place"
            )


def infer_structure(model: nn.Module, skip_types: tuple[type[nn.Module], ...] = ()) -> InferredStructure:
    """Infer the common-structure roles of a transformer from its module structure.

    Layers are the innermost ``ModuleList`` / ``Sequential`` of identical blocks that each hold an attention
    module (a submodule named like ``attn`` / ``attention`` containing linear layers). In each attention block, q, k
    and v are the linear layers named like ``q``/``query``/``q_proj``/``q_lin``/``wq`` (or one fused
    ``qkv``/``query_key_value``/``c_attn`` projection for all three) and the remaining one is ``attn.o``. Outside
    the attention blocks, linear layers mapping the hidden size to a wider one are ``ff.w1`` (the one named
    ``gate``, if two, is ``ff.gate``), those mapping back are ``ff.w2``. A norm inside an attention block is
    ``attn.norm``; otherwise with one norm per attention block plus one, the last is ``ff.norm`` and the others
    ``attn.norm`` (registration order). ``embed`` is the ``nn.Embedding`` of the vocabulary size outside the
    layers (with one tied weight held by several modules, as in T5 and BART, the ones inside the encoder and decoder
    stacks rather than the ``shared`` holder). Whatever cannot be told apart is recorded as ambiguous with its candidates.

    Args:
        model: Any ``nn.Module``.
        skip_types: Modules of these types (and everything inside) are ignored, besides deltakit's own delta
            modules, which are always ignored.

    Returns:
        The inferred structure; nothing in the model is changed.
    """
    skipped = [n for n, m in _named_modules(model) if skip_types and isinstance(m, skip_types)]
    modules = {n: m for n, m in _named_modules(model) if n and not any(_inside(n, s) for s in skipped)}
    lists = [n for n, m in modules.items() if _is_layer_list(m)]
    lists = [n for n in lists if not any(other != n and _inside(other, n) for other in lists)]  # innermost
    result = InferredStructure(type(model).__name__)
    out = _Collector()
    for list_name in lists:
        for child_name, child in modules[list_name].named_children():
            layer = f"{list_name}.{child_name}"
            result.layers.append(layer)
            _classify_layer(layer, child, out)
    if result.layers:
        config = find_config(model)
        vocab = getattr(config, "vocab_size", None) if config is not None else None
        embeddings = [
            (n, m) for n, m in modules.items()
            if isinstance(m, nn.Embedding) and not any(_inside(n, layer) for layer in result.layers)
        ]
        if isinstance(vocab, int):
            candidates = [n for n, m in embeddings if m.num_embeddings == vocab]
        else:
            largest = max((m.num_embeddings for _, m in embeddings), default=0)
            candidates = [n for n, m in embeddings if m.num_embeddings == largest]
        if len(candidates) > 1 and len({id(modules[n].weight) for n in candidates}) == 1:
            # One tied weight (T5, BART): the copies called are those inside a stack (encoder, decoder), not the
            # holder whose parent contains every stack (``shared`` on the root).
            def holds_every_stack(name: str) -> bool:
                parent = name.rpartition(".")[0]
                return not parent or all(_inside(stack, parent) for stack in lists)

            candidates = [n for n in candidates if not holds_every_stack(n)] or candidates
            if len(candidates) > 1:
                out.add("embed", candidates)
                candidates = []
        if len(candidates) == 1:
            out.add("embed", candidates)
        elif candidates:
            out.ambiguity("embed", type(model).__name__, candidates, "several embeddings have the vocabulary size")
    result.roles = {role: names for role, names in out.roles.items() if names and role not in out.ambiguous}
    result.ambiguous = out.ambiguous
    return result


def log_inferred(structure: InferredStructure, model_type: str | None) -> None:
    """Tell the user (logger ``deltakit.structures``, WARNING) which roles were inferred for an unknown model."""
    what = f"model_type {model_type!r}" if model_type else "this model (no transformers config)"
    logger.warning(
        "deltakit has no structure map for %s; roles inferred from the module structure of %s: %s "
        "Check them, or pass concrete module names in modified_modules.",
        what,
        structure.model_class,
        structure.describe(),
    )


# ---------------------------------------------------------------------------------------------------- tiny models
_TINY_TEXT = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=128)
_TINY_VISION = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=8)

#: Architecture name -> (config class, model class, config kwargs with ``{L}`` layers, input kind). The input kind
#: is ``"text"`` (``input_ids``), ``"seq2seq"`` (plus ``decoder_input_ids``), ``"image"`` (``pixel_values``
#: 16x16) or ``"text+image"``.
TINY_ARCHITECTURES: dict[str, tuple[str, str, dict[str, object], str]] = {
    "bert": ("BertConfig", "BertModel", {**_TINY_TEXT, "num_hidden_layers": "L"}, "text"),
    "roberta": ("RobertaConfig", "RobertaModel", {**_TINY_TEXT, "num_hidden_layers": "L", "pad_token_id": 1}, "text"),
    "deberta-v2": ("DebertaV2Config", "DebertaV2Model", {**_TINY_TEXT, "num_hidden_layers": "L"}, "text"),
    "distilbert": (
        "DistilBertConfig", "DistilBertModel",
        {"dim": 32, "n_layers": "L", "n_heads": 2, "hidden_dim": 64, "vocab_size": 128}, "text",
    ),
    "albert": ("AlbertConfig", "AlbertModel", {**_TINY_TEXT, "num_hidden_layers": "L", "embedding_size": 16}, "text"),
    "electra": ("ElectraConfig", "ElectraModel", {**_TINY_TEXT, "num_hidden_layers": "L", "embedding_size": 16}, "text"),
    "gpt2": ("GPT2Config", "GPT2Model", {"n_embd": 32, "n_layer": "L", "n_head": 2, "vocab_size": 128}, "text"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXModel", {**_TINY_TEXT, "num_hidden_layers": "L"}, "text"),
    "opt": (
        "OPTConfig", "OPTModel",
        {"hidden_size": 32, "num_hidden_layers": "L", "num_attention_heads": 2, "ffn_dim": 64, "vocab_size": 128,
         "word_embed_proj_dim": 32}, "text",
    ),
    "llama": ("LlamaConfig", "LlamaModel", {**_TINY_TEXT, "num_hidden_layers": "L", "num_key_value_heads": 1}, "text"),
    "mistral": ("MistralConfig", "MistralModel", {**_TINY_TEXT, "num_hidden_layers": "L", "num_key_value_heads": 1}, "text"),
    "qwen2": ("Qwen2Config", "Qwen2Model", {**_TINY_TEXT, "num_hidden_layers": "L", "num_key_value_heads": 1}, "text"),
    "gemma": (
        "GemmaConfig", "GemmaModel",
        {**_TINY_TEXT, "num_hidden_layers": "L", "num_key_value_heads": 1, "head_dim": 16}, "text",
    ),
    "phi3": ("Phi3Config", "Phi3Model", {**_TINY_TEXT, "num_hidden_layers": "L", "pad_token_id": 0}, "text"),
    "t5": (
        "T5Config", "T5Model",
        {"d_model": 32, "d_ff": 64, "num_layers": "L", "num_heads": 2, "d_kv": 16, "vocab_size": 128,
         "decoder_start_token_id": 0}, "seq2seq",
    ),
    "bart": (
        "BartConfig", "BartModel",
        {"d_model": 32, "encoder_layers": "L", "decoder_layers": "L", "encoder_attention_heads": 2,
         "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "vocab_size": 128}, "seq2seq",
    ),
    "vit": ("ViTConfig", "ViTModel", {**_TINY_VISION, "num_hidden_layers": "L"}, "image"),
    "clip": (
        "CLIPConfig", "CLIPModel",
        {"text_config": {**_TINY_TEXT, "num_hidden_layers": "L"},
         "vision_config": {**_TINY_VISION, "num_hidden_layers": "L"}, "projection_dim": 16}, "text+image",
    ),
}


#: Most layers a tiny random model may have (checked before anything is built).
MAX_TINY_LAYERS = 256


def _fill_layers(value: object, layers: int) -> object:
    if value == "L":
        return layers
    if isinstance(value, dict):
        return {k: _fill_layers(v, layers) for k, v in value.items()}
    return value


def tiny_config(arch: str, num_layers: int = 2) -> object:
    """The transformers config of a tiny random instance of ``arch`` (a key of :data:`TINY_ARCHITECTURES`)."""
    import transformers

    if arch not in TINY_ARCHITECTURES:
        raise ModuleMatchError(
            f"Unknown architecture name {arch!r}; tiny random models exist for: {', '.join(sorted(TINY_ARCHITECTURES))}."
        )
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= MAX_TINY_LAYERS:
        raise ModuleMatchError(
            f"A tiny {arch} model has 1 to {MAX_TINY_LAYERS} layers (deeper than any released model); got "
            f"num_layers={num_layers!r}."
        )
    config_cls, _, kwargs, _ = TINY_ARCHITECTURES[arch]
    return getattr(transformers, config_cls)(**_fill_layers(kwargs, num_layers))  # type: ignore[arg-type]


def tiny_model(arch: str, seed: int = 0, num_layers: int = 2) -> nn.Module:
    """A tiny randomly initialised transformers model of architecture ``arch`` (no download), in eval mode.

    Example:
        >>> model = tiny_model("llama")  # LlamaModel, hidden size 32, 2 layers
    """
    import torch
    import transformers

    config = tiny_config(arch, num_layers)
    torch.manual_seed(seed)
    return getattr(transformers, TINY_ARCHITECTURES[arch][1])(config).eval()
