"""What soft prompts need from a transformers model: its input embeddings, where to prepend, masks and labels."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import DeltaError, UnsupportedModuleError
from .attention import CallArgs
from .cache import cache_length
from .probe import CACHE_KWARGS, find_config, forward_parameters, transformers_version


# ---------------------------------------------------------------------------------------------------- soft prompts
def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether the backbone is an encoder-decoder transformers model."""
    config = find_config(model)
    return bool(getattr(config, "is_encoder_decoder", False))


def input_embeddings(model: nn.Module) -> nn.Module:
    """The input token embedding module (``get_input_embeddings()``)."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    if not isinstance(embedding, nn.Module):
        raise UnsupportedModuleError(
            f"Soft prompts need the backbone's input embeddings: {type(model).__name__} has no get_input_embeddings() "
            f"returning a module (transformers {transformers_version()})."
        )
    return embedding


def _innermost_with(model: nn.Module, needed: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    found = [(n, m) for n, m in model.named_modules() if all(p in forward_parameters(m) for p in needed)]
    for name, module in found:
        inside = [n for n, _ in found if n != name and (name == "" or n.startswith(name + "."))]
        if not inside:
            return name, module
    return None


def soft_prompt_targets(model: nn.Module) -> tuple[tuple[str, nn.Module], tuple[str, nn.Module] | None]:
    """Where soft prompts go in: the module that embeds the tokens and takes the attention mask (the base model, or
    the encoder of an encoder-decoder), and for encoder-decoders also the decoder (whose cross-attention mask must
    cover the prompt). For a bare base model (``BertModel``, ``LlamaModel``) the first is the root, named ``""``.
    """
    names = {id(m): n for n, m in model.named_modules()}
    if is_encoder_decoder(model):
        parts = []
        for getter_name in ("get_encoder", "get_decoder"):
            getter = getattr(model, getter_name, None)
            part = getter() if callable(getter) else None
            if not isinstance(part, nn.Module) or id(part) not in names:
                raise UnsupportedModuleError(
                    f"Soft prompts on the encoder-decoder {type(model).__name__} need {getter_name}() to return one of "
                    f"its modules (transformers {transformers_version()})."
                )
            parts.append((names[id(part)], part))
        return parts[0], parts[1]
    target = _innermost_with(model, ("inputs_embeds", "attention_mask", "input_ids"))
    if target is None:
        raise UnsupportedModuleError(
            f"Soft prompts found no module of {type(model).__name__} (itself included) whose forward takes input_ids, "
            f"inputs_embeds and attention_mask, as a transformers base model's does (transformers "
            f"{transformers_version()}). Pass the transformers model itself (e.g. BertModel or LlamaForCausalLM)."
        )
    return target, None


def module_name(model: nn.Module, module: nn.Module, what: str) -> str:
    """The name of ``module`` inside ``model`` (``""`` for the root).

    Raises:
        UnsupportedModuleError: ``module`` is not part of ``model``.
    """
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise UnsupportedModuleError(
        f"The {what} of {type(model).__name__} ({type(module).__name__}) is not one of its modules "
        f"(transformers {transformers_version()})."
    )


#: Child names of the head that ``*ForSequenceClassification`` models apply to every position before pooling one.
SEQUENCE_HEAD_NAMES = ("score", "classifier")


def sequence_classification_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The ``*ForSequenceClassification`` module of a model that is not an encoder-decoder, and its classification
    head (``score``, or ``classifier``), or None.

    Decoder-only classifiers (GPT-2, Llama, Mistral, Qwen2, GPT-NeoX, OPT, ...) apply the head at every position and
    pool the logits at the last non-padding token, an index they compute from the caller's ``input_ids``: with a
    soft prompt in front it must index the real tokens, see :func:`keep_real_positions`. Heads applied to one pooled
    vector (BERT's, RoBERTa's) return no position dimension and are never changed.
    """
    if is_encoder_decoder(model):
        return None
    for module in model.modules():
        if type(module).__name__.endswith("ForSequenceClassification"):
            for name in SEQUENCE_HEAD_NAMES:
                head = module._modules.get(name)
                if isinstance(head, nn.Module):
                    return module, head
            return None
    return None


def input_length(params: list[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The number of positions the caller passes (from ``input_ids``, else ``inputs_embeds``), or None."""
    call = CallArgs(params, args, kwargs)
    ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
    if isinstance(ids, torch.Tensor) and ids.dim() >= 1:
        return int(ids.shape[-1])
    if isinstance(embeds, torch.Tensor) and embeds.dim() == 3:
        return int(embeds.shape[1])
    return None


def keep_real_positions(output: Any, length: int | None) -> Any:
    """The per-position output ``(batch, positions, ...)`` of a classification head, cut to its last ``length``
    positions (the real tokens; soft prompts sit in front) when it has more. Anything else is returned unchanged."""
    if length is None or not isinstance(output, torch.Tensor) or output.dim() != 3 or output.shape[1] <= length:
        return output
    return output[:, -length:]


def _prepend_mask(mask: torch.Tensor, count: int, where: str) -> torch.Tensor:
    if mask.dim() != 2:
        raise DeltaError(
            f"Soft prompts need a 2-D (batch, length) attention mask at {where!r}, got shape {tuple(mask.shape)}; pass "
            f"the usual padding mask (1 = token, 0 = padding)."
        )
    return torch.cat([torch.ones(mask.shape[0], count, dtype=mask.dtype, device=mask.device), mask], dim=1)


def prepend_soft_prompt(
    params: list[str],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    prompt: torch.Tensor,
    embedding: nn.Module,
    where: str,
    limit: int | None = None,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Rewrite a call of the embedding module's consumer: soft prompt embeddings ``(n, hidden)`` in front of the
    token embeddings, attention mask and token type ids extended, position ids shifted. When the call continues a
    KV cache that already holds the prompt, only the mask and positions are adjusted. New tensors are built; the
    caller's are never modified. ``limit``: the model's number of absolute positions (see :func:`position_limit`),
    checked so that an input the prompt pushes past it gets a clear error.
    """
    call = CallArgs(params, args, kwargs)
    count = prompt.shape[0]
    cache_name = call.first_present(CACHE_KWARGS)
    cache = call.get(cache_name) if cache_name else None
    past = cache_length(cache) if cache is not None else 0
    continuing = past > 0
    if limit is not None:
        tokens = next((t.shape[1] for t in (call.get("input_ids"), call.get("inputs_embeds"))
                       if isinstance(t, torch.Tensor) and t.dim() >= 2), 0)
        total = past + tokens + (0 if continuing else count)
        if total > limit:
            raise DeltaError(
                f"Soft prompts: {where!r} would need {total} positions ({count} soft prompt tokens, "
                f"{total - count} of input and cache), but the model has {limit} position embeddings. Shorten the "
                f"input (or max_new_tokens) by {total - limit}, or use fewer soft tokens."
            )
    mask = call.get("attention_mask")
    if mask is not None:
        call.set("attention_mask", _prepend_mask(mask, count, where))
    if continuing:
        for name in ("position_ids", "cache_position"):
            value = call.get(name)
            if value is not None:
                call.set(name, value + count)
        return call.result()
    input_ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
    if embeds is None:
        if input_ids is None:
            raise DeltaError(f"Soft prompts: the call of {where!r} has neither input_ids nor inputs_embeds.")
        embeds = embedding(input_ids)
        call.set("input_ids", None)
    batch = embeds.shape[0]
    soft = prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
    call.set("inputs_embeds", torch.cat([soft, embeds], dim=1))
    token_types = call.get("token_type_ids")
    if token_types is not None:
        zeros = torch.zeros(token_types.shape[0], count, dtype=token_types.dtype, device=token_types.device)
        call.set("token_type_ids", torch.cat([zeros, token_types], dim=1))
    for name in ("position_ids", "cache_position"):
        value = call.get(name)
        if value is not None:
            head = torch.arange(count, dtype=value.dtype, device=value.device)
            head = head.expand(*value.shape[:-1], count) if value.dim() > 1 else head
            call.set(name, torch.cat([head, value + count], dim=-1))
    return call.result()


def position_limit(model: nn.Module) -> int | None:
    """How many absolute positions the model's learned position embedding has (GPT-2 ``wpe``, BERT
    ``position_embeddings``, OPT/BART ``embed_positions`` minus their offset), or None (rotary / relative positions)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rpartition(".")[2] in (
            "position_embeddings", "wpe", "embed_positions"
        ):
            return module.num_embeddings - int(getattr(module, "offset", 0) or 0)
    return None


def extend_encoder_mask(
    params: list[str], args: tuple[Any, ...], kwargs: dict[str, Any], count: int, where: str
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A decoder call attending to an encoder output that starts with ``count`` soft prompt positions: widen its
    ``encoder_attention_mask`` when it still has the prompt-less length."""
    call = CallArgs(params, args, kwargs)
    mask, states = call.get("encoder_attention_mask"), call.get("encoder_hidden_states")
    if mask is not None and isinstance(states, torch.Tensor) and mask.shape[-1] == states.shape[1] - count:
        call.set("encoder_attention_mask", _prepend_mask(mask, count, where))
    return call.result()


def extend_token_labels(
    params: list[str], args: tuple[Any, ...], kwargs: dict[str, Any], count: int, ignore_index: int = -100
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Token-level ``labels`` (one integer per input token) get ``count`` ignored positions in front, matching the
    logits of the soft prompt positions; sequence-level labels (class ids, or float multi-label / regression targets
    of shape ``(batch, num_labels)``) are left alone."""
    call = CallArgs(params, args, kwargs)
    labels, ids, embeds = call.get("labels"), call.get("input_ids"), call.get("inputs_embeds")
    length = ids.shape[1] if isinstance(ids, torch.Tensor) else embeds.shape[1] if isinstance(embeds, torch.Tensor) else None
    cache_name = call.first_present(CACHE_KWARGS)
    if cache_name is not None and cache_length(call.get(cache_name)) > 0:
        return call.result()
    if (
        isinstance(labels, torch.Tensor)
        and labels.dim() == 2
        and not labels.is_floating_point()
        and length is not None
        and labels.shape[1] == length
    ):
        head = torch.full((labels.shape[0], count), ignore_index, dtype=labels.dtype, device=labels.device)
        call.set("labels", torch.cat([head, labels], dim=1))
    return call.result()
