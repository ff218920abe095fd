"""Attention masks widened by a prefix, and the causal mask a prefix needs."""

from __future__ import annotations

from typing import Any

import torch

from .probe import unsupported


# ---------------------------------------------------------------------------------------------------- masks
def extend_attention_mask(mask: Any, extra: int, site: str) -> Any:
    """Widen an attention mask by ``extra`` visible key positions in front (the prefix).

    Handles the formats attention modules receive: 4-D ``(batch, heads, queries, keys)`` boolean (True = attend)
    or additive float (0 = attend), and 2-D ``(batch, keys)`` padding masks (1 = attend). ``None`` stays ``None``.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise unsupported(f"Attention module {site!r} received an attention mask of type {type(mask).__name__}")
    if mask.dim() == 4:
        fill = True if mask.dtype == torch.bool else 0
        pad = torch.full((*mask.shape[:-1], extra), fill, dtype=mask.dtype, device=mask.device)
        return torch.cat([pad, mask], dim=-1)
    if mask.dim() == 2:
        pad = torch.ones(mask.shape[0], extra, dtype=mask.dtype, device=mask.device)
        return torch.cat([pad, mask], dim=-1)
    raise unsupported(f"Attention module {site!r} received a {mask.dim()}-D attention mask of shape {tuple(mask.shape)}")


def prefix_causal_mask(query_len: int, past_len: int, extra: int, like: torch.Tensor) -> torch.Tensor:
    """An additive ``(1, 1, q, extra + past + q)`` mask: prefix visible to all, real keys bottom-right causal."""
    keys = torch.arange(past_len + query_len, device=like.device)
    queries = torch.arange(query_len, device=like.device)[:, None] + past_len
    allowed = torch.cat([torch.ones(query_len, extra, dtype=torch.bool, device=like.device), keys[None, :] <= queries], 1)
    dtype = like.dtype if like.dtype.is_floating_point else torch.float32
    zero = torch.zeros((), dtype=dtype, device=like.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min).view(1, 1, query_len, -1)
