"""Combining LoRA deltas into a new LoRA delta: weighted sums, concatenation, SVD, TIES (Yadav et al. 2023) and DARE
(Yu et al. 2024).

Every source delta ``i`` changes a host's weight by ``dW_i = s_i B_i A_i`` (``s_i`` its scaling). The combination
methods, with the semantics of PEFT's ``add_weighted_adapter`` (same inputs, same results):

- ``"cat"``: ``A = [w_i s_i A_i]``, ``B = [B_i]`` stacked along the rank: exactly ``sum_i w_i dW_i``, rank = the sum.
- ``"svd"``: ``sum_i w_i dW_i`` truncated to ``rank`` by its SVD (``B = U_k S_k``, ``A = V_k^T``): the best rank-k
  approximation of the exact sum.
- ``"linear"``: the factors themselves averaged, ``A = sum_i sign_i sqrt|w_i s_i| A_i``,
  ``B = sum_i sqrt|w_i s_i| B_i`` (same ranks needed). Cheap, but ``B A`` then holds cross terms ``B_i A_j``: an
  approximation, good for deltas trained from one initialisation.
- ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``: ``"linear"``'s weighting with each factor
  first trimmed to its ``density`` largest entries (TIES, magnitude) or randomly dropped and rescaled by
  ``1 / density`` (DARE); the TIES variants then keep, entry by entry, only the values agreeing with the elected
  sign (of the sum of the trimmed values, ``"total"``, or of the count of signs, ``"frequency"``) and average them.
- ``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``, ``"magnitude_prune_svd"``: the same on the full
  ``dW_i`` (weighted by ``w_i``), then truncated by SVD like ``"svd"``.

The result is an ordinary, **detached** :class:`~deltakit.LoraModel` on the same backbone and sites, with
``lora_alpha = lora_r`` (scaling 1): attach it (after detaching the sources, or next to them), save it, put it in a
:class:`~deltakit.DeltaGroup`. Only LoRA factors are combined: backbone tensors a source keeps trainable (a head)
are not part of it. DARE's random drops come from a generator seeded with ``seed``: the same seed gives the same
delta, bit for bit.

Differences from PEFT, on purpose: one delta is combined with the method asked for (PEFT silently switches to
``"linear"``, so ``"svd"`` on one delta cannot compress it there); the deltas must modify the same modules (PEFT
takes the union and skips the missing ones); weights are applied in the factors' own dtype (PEFT rounds them to
float32 first); the result is never rsLoRA, whatever the sources' scaling (PEFT copies ``use_rslora`` into its
result and so scales the combination by ``sqrt(rank)`` once more).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

from .base import UNLOADED
from .config import check_finite_number, check_int
from .deltas.lora import LoraConfig, LoraConvSite, LoraEmbeddingSite, LoraModel, LoraSite
from .errors import DeltaConfigError, DeltaError

__all__ = ["COMBINATION_METHODS", "combine_loras"]

#: On the factors, entry by entry (equal ranks needed).
_FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
#: On the full weight updates, then truncated by SVD.
_SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
#: Every method :func:`combine_loras` knows.
COMBINATION_METHODS = ("cat", *_FACTOR_METHODS, *_SVD_METHODS)

_SIGN_METHODS = ("total", "frequency")


def _kind(method: str) -> str:
    """The merge rule of ``method`` without its ``_svd`` suffix: linear, ties, dare_linear, dare_ties, ..."""
    base = method.removesuffix("_svd")
    return "linear" if base == "svd" else base


# ---------------------------------------------------------------------------------------------- merge rules
def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``weights[i] * stacked[i]``, the weights broadcast over the tensors' own dimensions."""
    return stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))


def _keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """``tensor`` with all but its ``int(density * numel)`` largest-magnitude entries set to zero (TIES' trim)."""
    if density >= 1:
        return tensor
    keep = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    keep[torch.topk(tensor.abs().flatten(), k=int(density * tensor.numel())).indices] = 1
    return tensor * keep.view(tensor.shape)


def _drop_and_rescale(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and divide the kept ones by it (unbiased)."""
    if density >= 1:
        return tensor  # nothing dropped, and no random numbers drawn
    kept = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * kept / density


def _sign_agreement(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Which entries agree with the sign elected over the deltas (TIES); a tie elects ``+``."""
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1, -1)
    return signs == elected


def _merge(
    tensors: list[torch.Tensor], weights: list[float], kind: str, density: float | None, sign_method: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Combine same-shaped tensors with one of the merge rules (``kind``)."""
    if kind in ("ties", "magnitude_prune"):
        tensors = [_keep_largest(t, density) for t in tensors]  # type: ignore[arg-type]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [_drop_and_rescale(t, density, generator) for t in tensors]  # type: ignore[arg-type]
    stacked = torch.stack(tensors)
    weighted = _weighted(stacked, torch.tensor(weights, dtype=stacked.dtype, device=stacked.device))
    if kind in ("ties", "dare_ties"):
        # The sign is elected on the unweighted (trimmed) values; agreeing entries are averaged, not summed.
        agree = _sign_agreement(stacked, sign_method)
        return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    return weighted.sum(dim=0)


def _pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of ``A`` / columns of ``B`` up to ``rank`` (they add nothing to ``B A``)."""
    missing = rank - a.shape[0]
    if missing <= 0:
        return a, b
    return torch.cat([a, a.new_zeros(missing, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], missing)], dim=1)


# ---------------------------------------------------------------------------------------------- checks
def _check_deltas(deltas: Any) -> list[LoraModel]:
    if not isinstance(deltas, (list, tuple)) or not deltas:
        raise DeltaError(
            f"combine_loras needs a non-empty list of LoRA deltas, got {deltas!r:.80}. Example: "
            f"combine_loras([delta_a, delta_b], [0.5, 0.5], method='cat')."
        )
    for i, delta in enumerate(deltas):
        if not isinstance(delta, LoraModel):
            raise DeltaError(
                f"combine_loras combines LoRA deltas only; deltas[{i}] is a {type(delta).__name__}."
            )
        if delta.state == UNLOADED:
            # Its update is in the backbone's weights already: a combination on that backbone would apply it twice.
            raise DeltaError(
                f"combine_loras: deltas[{i}] ({delta._describe()}) was merge_and_unload()ed, so its update is part "
                f"of the backbone's weights now and a combination including it would apply it twice. Load its "
                f"checkpoint onto a fresh backbone and combine there."
            )
        for site in delta.sites:
            module = site.module
            names = sorted(n for n, _ in module.named_parameters())
            if isinstance(module, LoraConvSite):
                raise DeltaError(
                    f"combine_loras does not combine LoRA on convolutions yet: deltas[{i}] has a LoraConvSite at "
                    f"{site.name!r}. Combine deltas whose modified_modules are Linear, Conv1D or Embedding layers."
                )
            if type(module) not in (LoraSite, LoraEmbeddingSite) or names != ["lora_A", "lora_B"]:
                raise DeltaError(
                    f"combine_loras combines plain LoRA (out + s B A x); deltas[{i}] holds a {type(module).__name__} "
                    f"with parameters {names} at {site.name!r}, which is not a sum of low-rank terms it could "
                    f"combine (a DoRA magnitude, for example)."
                )
    first = deltas[0]
    for i, delta in enumerate(deltas[1:], start=1):
        if delta.backbone_model is not first.backbone_model:
            raise DeltaError(
                f"combine_loras needs deltas on one backbone: deltas[{i}] ({delta._describe()}) is on another model "
                f"object than deltas[0]. Load them onto the same backbone first (AutoDeltaModel.from_finetuned(path, "
                f"backbone_model=model))."
            )
        _check_same_sites(first, delta, i)
    return list(deltas)


def _check_same_sites(first: LoraModel, other: LoraModel, index: int) -> None:
    ours = [(s.name, s.host) for s in first.sites]
    theirs = [(s.name, s.host) for s in other.sites]
    if [n for n, _ in ours] == [n for n, _ in theirs] and all(a is b for (_, a), (_, b) in zip(ours, theirs)):
        return
    only_first = [n for n, _ in ours if n not in {m for m, _ in theirs}]
    only_other = [n for n, _ in theirs if n not in {m for m, _ in ours}]
    raise DeltaError(
        f"combine_loras needs deltas modifying the same modules: deltas[0] and deltas[{index}] differ "
        f"(only in deltas[0]: {only_first[:4]}{' ...' if len(only_first) > 4 else ''}; only in deltas[{index}]: "
        f"{only_other[:4]}{' ...' if len(only_other) > 4 else ''}). Combine deltas trained on the same "
        f"modified_modules."
    )


def _is_finite(value: numbers.Real) -> bool:
    """``math.isfinite`` that calls an int too large for a float (``10**400``) not finite instead of raising."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_finite_sources(deltas: list[LoraModel]) -> None:
    """Refuse sources holding NaN or inf factors (a diverged training run): every method would spread them into
    the result, and the SVD methods would fail inside LAPACK."""
    for i, delta in enumerate(deltas):
        for site in delta.sites:
            for pname in ("lora_A", "lora_B"):
                if not torch.isfinite(getattr(site.module, pname)).all():
                    raise DeltaError(
                        f"combine_loras: deltas[{i}] ({delta._describe()}) holds NaN or inf values in {pname} at "
                        f"{site.name!r}, so any combination with it would be non-finite. Leave it out, or combine "
                        f"an earlier checkpoint of it."
                    )


def _check_weights(weights: Any, count: int) -> list[float]:
    if not isinstance(weights, (list, tuple)) or len(weights) != count:
        raise DeltaError(f"combine_loras needs one weight per delta ({count}), got {weights!r:.80}.")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not _is_finite(w):
            raise DeltaError(
                f"combine_loras: weights[{i}] must be a finite number (negative ones subtract a delta), got {w!r}."
            )
    return [float(w) for w in weights]


def _check_options(
    method: Any, rank: Any, density: Any, majority_sign_method: Any, svd_clamp: Any, seed: Any
) -> tuple[float | None, str]:
    """Check the method and that each option is given exactly where the method uses it; returns density and sign
    method (resolved)."""
    if not isinstance(method, str) or method not in COMBINATION_METHODS:
        raise DeltaConfigError(f"combine_loras(method=...) must be one of {list(COMBINATION_METHODS)}, got {method!r}.")
    kind = _kind(method)
    svd = method in _SVD_METHODS

    def unused(option: str, value: Any, users: str) -> None:
        if value is not None:
            raise DeltaConfigError(
                f"combine_loras({option}=...) applies to {users} only; method={method!r} does not use it."
            )

    if svd:
        if rank is not None:
            check_int("combine_loras", "rank", rank)
        if svd_clamp is not None:
            check_finite_number("combine_loras", "svd_clamp", svd_clamp, low=0.0, high=1.0, positive=True)
    else:
        unused("rank", rank, "the SVD methods")
        unused("svd_clamp", svd_clamp, "the SVD methods")
    if kind in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
        if density is None:
            raise DeltaConfigError(
                f"combine_loras(method={method!r}) needs density=<fraction of entries kept, in (0, 1]>, e.g. 0.5."
            )
        density = check_finite_number("combine_loras", "density", density, high=1.0, positive=True)
    else:
        unused("density", density, "the TIES, DARE and magnitude_prune methods")
    if kind in ("ties", "dare_ties"):
        sign_method = "total" if majority_sign_method is None else majority_sign_method
        if sign_method not in _SIGN_METHODS:
            raise DeltaConfigError(
                f"combine_loras(majority_sign_method=...) must be one of {list(_SIGN_METHODS)}, got "
                f"{majority_sign_method!r}."
            )
    else:
        unused("majority_sign_method", majority_sign_method, "the TIES methods")
        sign_method = "total"
    if kind.startswith("dare"):
        if seed is not None and not isinstance(seed, torch.Generator):
            check_int("combine_loras", "seed", seed, low=0, high=2**63 - 1)
    else:
        unused("seed", seed, "the DARE methods")
    return density, sign_method


def _new_rank(deltas: list[LoraModel], method: str, rank: int | None) -> int:
    ranks = [[s.module.lora_A.shape[0] for s in d.sites] for d in deltas]
    if method == "cat":
        return max(sum(per_site) for per_site in zip(*ranks))
    if method in _SVD_METHODS:
        return rank if rank is not None else max(max(r) for r in ranks)
    for slot, per_site in enumerate(zip(*ranks)):
        if len(set(per_site)) > 1:
            raise DeltaError(
                f"combine_loras(method={method!r}) combines the factors entry by entry, so the deltas need the same "
                f"rank at every module; at {deltas[0].sites[slot].name!r} they have ranks {list(per_site)}. Use "
                f"method='cat' (exact) or method='svd' (any rank)."
            )
    return max(max(r) for r in ranks)


# ---------------------------------------------------------------------------------------------- combining
def _site_factors(
    pairs: list[tuple[torch.Tensor, torch.Tensor, float]], weights: list[float], method: str, rank: int,
    density: float | None, sign_method: str, svd_clamp: float | None, generator: torch.Generator | None,
    host_layout_transposed: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The combined ``(A, B)`` of one site from the sources' ``(A_i, B_i, s_i)``, rank padded to ``rank``.

    ``host_layout_transposed``: the host stores its weight as ``(B A)^T`` (a Conv1D, an Embedding).
    """
    kind = _kind(method)
    if method == "cat":
        a = torch.cat([w * s * a_i for (a_i, _, s), w in zip(pairs, weights)])
        b = torch.cat([b_i for _, b_i, _ in pairs], dim=1)
    elif method in _FACTOR_METHODS:
        # sqrt(|w s|) on each factor, the sign on A only: B A then carries w s for each source's own term.
        scaled = [w * s for (_, _, s), w in zip(pairs, weights)]
        wa = [math.sqrt(abs(x)) * (1.0 if x >= 0 else -1.0) for x in scaled]
        wb = [math.sqrt(abs(x)) for x in scaled]
        a = _merge([p[0] for p in pairs], wa, kind, density, sign_method, generator)
        b = _merge([p[1] for p in pairs], wb, kind, density, sign_method, generator)
    else:
        # The dense updates in the layout of the host's weight (out x in for a Linear, in x out for a Conv1D, rows x
        # dim for an Embedding), as PEFT merges them: DARE's random drops then fall on the same entries.
        # torch's SVD (and quantile) have no float16 / bfloat16 kernels, and a half-precision product would round
        # the update before the factorisation: half-precision sources are worked on in float32.
        work = torch.promote_types(pairs[0][0].dtype, torch.float32)
        updates = [s * (b_i.to(work) @ a_i.to(work)) for a_i, b_i, s in pairs]
        if host_layout_transposed:
            updates = [u.T for u in updates]
        full = _merge(updates, weights, kind, density, sign_method, generator)
        if not torch.isfinite(full).all():
            raise OverflowError  # the caller reports it, with the site (LAPACK would fail on it, less clearly)
        b, a = _truncate(full.T if host_layout_transposed else full, rank, svd_clamp)
    return _pad_rank(a, b, rank)


def _truncate(full: torch.Tensor, rank: int, svd_clamp: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_k S_k, V_k^T)``: the best rank-``rank`` factorisation of ``full`` (optionally clamped at a quantile)."""
    u, s, vh = torch.linalg.svd(full, full_matrices=False)
    k = min(rank, s.shape[0])
    b, a = u[:, :k] * s[:k], vh[:k]
    if svd_clamp is not None:
        # As PEFT (after kohya-ss' svd_merge_lora): both factors clamped at a quantile of their joint entries.
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), svd_clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    return b, a


def _generator(seed: int | torch.Generator | None, device: torch.device) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        if seed.device.type != device.type:
            raise DeltaConfigError(
                f"combine_loras(seed=<torch.Generator>) draws DARE's drops on the factors' device ({device}), but the "
                f"generator is on {seed.device}. Pass torch.Generator(device={str(device)!r}) or an int seed."
            )
        return seed
    return torch.Generator(device=device).manual_seed(0 if seed is None else int(seed))


def combine_loras(
    deltas: Sequence[LoraModel],
    weights: Sequence[float],
    *,
    method: str = "cat",
    rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str | None = None,
    svd_clamp: float | None = None,
    seed: int | torch.Generator | None = None,
    name: str | None = None,
) -> LoraModel:
    """Combine LoRA deltas on one backbone into a new, detached LoRA delta (see the module docstring).

    Example:
        >>> both = combine_loras([style, task], [0.7, 1.0], method="svd", rank=16)
        >>> style.detach(); task.detach(); both.attach()
        >>> both.save_finetuned("out/style+task")

    Args:
        deltas: LoRA deltas on the same backbone modifying the same modules (any state: attached, detached,
            merged; they are only read).
        weights: One finite weight per delta (negative subtracts).
        method: One of :data:`COMBINATION_METHODS`; ``"cat"`` (default) is exact.
        rank: Rank of the result for the SVD methods (default: the largest source rank).
        density: Fraction of entries kept, in (0, 1], for the TIES, DARE and magnitude_prune methods (required).
        majority_sign_method: ``"total"`` (default) or ``"frequency"``, for the TIES methods.
        svd_clamp: Clamp the SVD factors at this quantile of their entries (SVD methods; default: no clamping).
        seed: DARE's random drops: an int seed (default 0) or a ``torch.Generator`` on the factors' device.
        name: Child-module name of the new delta (default ``"lora"``, or ``"lora_1"``, ... when taken).

    Returns:
        A detached :class:`~deltakit.LoraModel` with ``lora_r`` = the new rank and ``lora_alpha = lora_r``.

    Raises:
        DeltaError: No deltas, a delta that is not plain LoRA (or a LoRA on a convolution), a delta spent by
            ``merge_and_unload()``, deltas on different backbones or modules, a weight that is not finite, a source
            holding NaN or inf, combined factors that overflow their dtype, unequal ranks for a method that needs
            them; the sources and the model are unchanged.
        DeltaConfigError: Unknown method, or an option out of range or given to a method that does not use it.
    """
    deltas = _check_deltas(deltas)
    weights = _check_weights(weights, len(deltas))
    _check_finite_sources(deltas)
    density, sign_method = _check_options(method, rank, density, majority_sign_method, svd_clamp, seed)
    new_rank = _new_rank(deltas, method, rank)
    first = deltas[0]
    dare = _kind(method).startswith("dare")
    generator = _generator(seed, first.sites[0].module.lora_A.device) if dare else None
    config = LoraConfig(
        lora_r=new_rank, lora_alpha=float(new_rank), lora_dropout=first.config.lora_dropout,
        modified_modules=[s.name for s in first.sites],
    )
    # Building draws the factors' initial values: keep the caller's random stream as it was.
    try:
        with torch.random.fork_rng(devices=[]):
            combined = LoraModel.build_detached(
                first.backbone_model, config, matches=[(s.name, s.host) for s in first.sites], name=name
            )
    except DeltaConfigError as exc:
        hint = " Use method='svd' with a smaller rank=." if method == "cat" else ""
        raise DeltaConfigError(
            f"combine_loras(method={method!r}) gives a LoRA of rank {new_rank}, which the modules cannot take: "
            f"{exc}{hint}"
        ) from exc
    with torch.no_grad():
        for slot, target in enumerate(combined.sites):
            sources = [d.sites[slot].module for d in deltas]
            dtype = sources[0].lora_A.dtype
            for module in sources[1:]:
                dtype = torch.promote_types(dtype, module.lora_A.dtype)
            device = sources[0].lora_A.device
            pairs = [
                (m.lora_A.detach().to(device, dtype), m.lora_B.detach().to(device, dtype), float(m.scaling))
                for m in sources
            ]
            transposed = isinstance(sources[0], LoraEmbeddingSite) or bool(sources[0].transposed)
            try:
                a, b = _site_factors(
                    pairs, weights, method, new_rank, density, sign_method, svd_clamp, generator, transposed
                )
                target.module.lora_A.copy_(a)
                target.module.lora_B.copy_(b)  # in the result's dtype, which may be narrower than the sources'
                finite = bool(torch.isfinite(target.module.lora_A).all() and torch.isfinite(target.module.lora_B).all())
            except OverflowError:
                finite = False
            if not finite:
                # The sources are finite (checked): the weights (or DARE's 1 / density) overflow the factors' dtype.
                stored = target.module.lora_A.dtype
                dare_note = "" if density is None else f", density {density:g}"
                raise DeltaError(
                    f"combine_loras(method={method!r}): the combined factors at {target.name!r} overflow their dtype "
                    f"(computed in {dtype}, stored in {stored}; weights {weights}{dare_note}). Use smaller weights (or "
                    f"a larger density), or cast the deltas to float32 first. Nothing was changed."
                )
    return combined
