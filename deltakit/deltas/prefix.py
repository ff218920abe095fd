"""Prefix tuning: Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"
(arXiv:2101.00190).

Every modified attention layer ``l`` attends to ``n`` trainable key/value vectors before the real tokens:
``attn_l(Q, [P_k^l; K], [P_v^l; V])``, one ``(n, head_dim)`` block per key/value head (as many as the model has, so
grouped-query attention is respected). With ``reparameterize=True`` (the paper's training set-up) the prefixes are
``[P_k^l; P_v^l] = W_l tanh(W_mid E + b_mid) + b_l``: an embedding ``E`` (n x embed_dim) and an MLP shared by all
layers (stored once on the backbone root); :meth:`PrefixModel.fold_reparameterization` replaces it by the computed
prefixes for deployment. Hooks a forward pre-hook on each attention module (all of them by default: self-attention
of encoders and decoders, and cross-attention); the transformers-specific injection lives in
:mod:`deltakit.hf_compat`. Unlike every other method, a fresh prefix is *not* the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import hf_compat
from ..addressing import find_modules
from ..base import DeltaBase
from ..config import MAX_MLP_WIDTH, MAX_PROMPT_LENGTH, DeltaConfig, check_bool, check_positive_int
from ..errors import DeltaStateError, ModuleMatchError
from ..site import Composition, DeltaSite, SharedParameters, factory_kwargs


@dataclass
class PrefixConfig(DeltaConfig):
    """Prefix-tuning settings (names as in OpenDelta).

    Args:
        prefix_token_num: Number of prefix positions ``n``.
        reparameterize: Produce the prefixes with the shared MLP (``embedding -> mid_dim -> tanh -> K/V``);
            ``False`` trains the prefixes directly.
        embed_dim: Width of the prefix embedding (reparameterization only).
        mid_dim: Hidden width of the MLP (reparameterization only).
    """

    delta_type: ClassVar[str] = "prefix"

    prefix_token_num: int = 6
    reparameterize: bool = True
    embed_dim: int = 512
    mid_dim: int = 512

    def validate(self) -> None:
        # Nothing in the host bounds these: caps well above any use (papers use 5-200 prefix positions and MLP
        # widths up to the model's hidden size) and far below sizes that try to allocate terabytes.
        check_positive_int(self, "prefix_token_num", high=MAX_PROMPT_LENGTH)
        check_positive_int(self, "embed_dim", high=MAX_MLP_WIDTH)
        check_positive_int(self, "mid_dim", high=MAX_MLP_WIDTH)
        check_bool(self, "reparameterize")


class PrefixShared(SharedParameters):
    """The reparameterization shared by all sites: ``out(tanh(mid(embedding)))``.

    The output layer (``mid_dim`` -> every layer's keys and values) is stored as one row block per site,
    ``out_weight[i]`` / ``out_bias[i]``: the same function as one big Linear, but each layer's backward writes only
    its own block's gradient (slicing one big weight would make every layer produce, and autograd add up, a
    gradient the size of the whole output layer).
    """

    def __init__(self, n: int, embed_dim: int, mid_dim: int, widths: list[int], **factory: Any) -> None:
        super().__init__()
        self.prefix_embedding = nn.Parameter(torch.randn(n, embed_dim, **factory))
        self.mid = nn.Linear(embed_dim, mid_dim, **factory)
        # nn.Linear's default initialisation, per block (fan-in mid_dim for all of them).
        bound = 1.0 / math.sqrt(mid_dim)
        self.out_weight = nn.ParameterList(
            [nn.Parameter(torch.empty(w, mid_dim, **factory).uniform_(-bound, bound)) for w in widths]
        )
        self.out_bias = nn.ParameterList([nn.Parameter(torch.empty(w, **factory).uniform_(-bound, bound)) for w in widths])

    def site_output(self, index: int) -> torch.Tensor:
        """Site ``index``'s block of the output layer applied to the shared hidden prefix: ``(n, width)``."""
        hidden = torch.tanh(self.mid(self.prefix_embedding))
        return F.linear(hidden, self.out_weight[index], self.out_bias[index])


class PrefixSite(DeltaSite):
    """The prefix of one attention module: its own ``prefix_key``/``prefix_value`` ``(kv_heads, n, head_dim)``, or
    its slice of the shared reparameterization; a pre-hook puts them in front of the attention's keys and values."""

    composition = Composition.REWRITES_CALL

    def __init__(
        self,
        site: str,
        signature: hf_compat.AttentionSignature,
        geometry: hf_compat.AttentionGeometry,
        n: int,
        shared: PrefixShared | None,
        index: int,
        **factory: Any,
    ) -> None:
        super().__init__()
        self.site = site
        self.signature = signature
        self.geometry = geometry
        self.n = n
        self.index = index
        shape = (geometry.num_kv_heads, n, geometry.head_dim)
        if shared is None:
            # Small values: the prefix starts as a mild change of the attention pattern.
            self.prefix_key = nn.Parameter(torch.randn(shape, **factory) * 0.02)
            self.prefix_value = nn.Parameter(torch.randn(shape, **factory) * 0.02)
            self._shared: tuple[PrefixShared, ...] = ()
        else:
            self._shared = (shared,)  # referenced, not registered: stored once, on the backbone root

    def prefixes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value prefix of this site, ``(kv_heads, n, head_dim)`` each."""
        if not self._shared:
            return self.prefix_key, self.prefix_value
        if torch.is_grad_enabled():
            return self._compute()
        # Without autograd (generation), the MLP runs once per parameter state instead of at every decoding step:
        # the key changes with any in-place update (version counter), move or dtype change of the MLP.
        state = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self._shared[0].parameters())
        cached = self.__dict__.get("_cached")
        if cached is None or cached[0] != state:
            cached = (state, self._compute())
            self.__dict__["_cached"] = cached
        return cached[1]

    def _compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        flat = self._shared[0].site_output(self.index)
        kv = flat.view(self.n, 2, self.geometry.num_kv_heads, self.geometry.head_dim).permute(1, 2, 0, 3)
        return kv[0], kv[1]

    def fold(self) -> None:
        """Store the current prefixes as own parameters and drop the reference to the shared MLP."""
        with torch.no_grad():
            key, value = (t.detach().clone().contiguous() for t in self.prefixes())
        # trainable only if the reparameterization was (a frozen delta stays frozen)
        trainable = any(p.requires_grad for shared in self._shared for p in shared.parameters())
        self.prefix_key = nn.Parameter(key, requires_grad=trainable)
        self.prefix_value = nn.Parameter(value, requires_grad=trainable)
        self._shared = ()
        self.__dict__.pop("_cached", None)

    def forward_pre_hook(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        key, value = self.prefixes()
        return hf_compat.inject_prefix(self.signature, host, args, kwargs, key, value, self.site)


class PrefixModel(DeltaBase):
    """Prefix tuning (Li & Liang 2021); see the module docstring.

    Not the identity at initialization: attaching a fresh prefix changes the model's outputs (every query attends
    to the prefix keys), as in the paper. Works with ``generate()`` (the prefix goes in at the attention modules,
    not through the model's cache argument), any padding side, with or without ``attention_mask``.

    Example:
        >>> delta = PrefixModel(backbone_model=model, prefix_token_num=6)
        >>> delta.freeze_module(exclude=["deltas"])
        >>> ...  # train
        >>> delta.fold_reparameterization()  # keep only the computed prefixes for deployment

    Default positions: every attention module that consumes a KV cache (self-attention of encoders and decoders,
    cross-attention).
    """

    delta_type: ClassVar[str] = "prefix"
    config_class = PrefixConfig


    def match_sites(self) -> list[tuple[str, nn.Module]]:
        """Default positions: every attention module consuming a KV cache, minus ``exclude_modules``."""
        if self.config.modified_modules is None:
            everything = hf_compat.find_attention_modules(self.backbone_model, skip_types=(DeltaSite,))
            excluded: set[str] = set()
            if self.config.exclude_modules:
                for name, _ in find_modules(self.backbone_model, self.config.exclude_modules, what="exclude_modules"):
                    excluded.add(name)
            matches = [
                (n, m) for n, m in everything if not any(n == e or n.startswith(e + ".") for e in excluded)
            ]
            if not matches:
                raise ModuleMatchError(
                    f"PrefixModel found no attention module consuming a KV cache in {type(self.backbone_model).__name__} "
                    f"(transformers {hf_compat.transformers_version()}). Pass modified_modules=[...] naming them."
                )
        else:
            matches = super().match_sites()
        return matches

    def plan(self, matches: list[tuple[str, nn.Module]]) -> None:
        """Check the hosts are attention modules that can take a prefix together, and read their geometry."""
        for name, module in matches:
            hf_compat.AttentionSignature.probe(name, module)  # raises UnsupportedModuleError for non-attention hosts
        everything = hf_compat.find_attention_modules(self.backbone_model, skip_types=(DeltaSite,))
        hf_compat.check_position_bias_groups(everything, [n for n, _ in matches])
        self._site_plan = {
            name: (hf_compat.attention_geometry(name, module, self.backbone_model), index)
            for index, (name, module) in enumerate(matches)
        }

    def build_shared(self, matches: list[tuple[str, nn.Module]]) -> SharedParameters | None:
        cfg: PrefixConfig = self.config  # type: ignore[assignment]
        if not cfg.reparameterize or not matches:
            return None
        widths = [2 * g.num_kv_heads * g.head_dim for g, _ in self._site_plan.values()]
        return PrefixShared(cfg.prefix_token_num, cfg.embed_dim, cfg.mid_dim, widths, **factory_kwargs(matches[0][1]))

    def build_site(self, name: str, host: nn.Module) -> DeltaSite:
        cfg: PrefixConfig = self.config  # type: ignore[assignment]
        geometry, index = self._site_plan[name]
        signature = hf_compat.AttentionSignature.probe(name, host)
        shared = self.shared if isinstance(self.shared, PrefixShared) else None
        return PrefixSite(name, signature, geometry, cfg.prefix_token_num, shared, index, **factory_kwargs(host))

    def prefix_tensors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The current prefixes, ``{attention module name: (key, value)}``, each ``(kv_heads, n, head_dim)``
        (computed by the MLP when reparameterized; detached copies)."""
        out = {}
        with torch.no_grad():
            for site in self.sites:
                key, value = site.module.prefixes()  # type: ignore[operator]
                out[site.name] = (key.detach().clone(), value.detach().clone())
        return out

    def fold_reparameterization(self) -> PrefixModel:
        """Replace the reparameterization MLP by the prefixes it currently computes (for deployment).

        Outputs stay bit-for-bit the same; the MLP and the prefix embedding are dropped, the config becomes
        ``reparameterize=False`` and :meth:`save_finetuned` then stores only ``n`` key/value vectors per layer.
        A delta that is already unreparameterized is returned unchanged.

        Raises:
            DeltaStateError: the delta is merged (prefixes never are; kept for symmetry with other methods).
        """
        if self.shared is None:
            return self
        if self.state not in ("attached", "detached"):
            raise DeltaStateError(f"Cannot fold {self._describe()} while it is {self.state}.")
        for site in self.sites:
            site.module.fold()  # type: ignore[operator]
        if self.state == "attached":
            delattr(self.backbone_model, self.shared_name)
        self.shared = None
        self.config.reparameterize = False  # type: ignore[attr-defined]
        return self


# ---------------------------------------------------------------------------------------------- P-tuning v2
@dataclass
class PTuningV2Config(PrefixConfig):
    """P-tuning v2 settings: :class:`PrefixConfig` with the reference code's default of no reparameterization.

    Args:
        reparameterize: Produce the prefixes with the shared MLP; ``False`` (P-tuning v2's default, its
            ``prefix_projection``) trains the key/value vectors of every layer directly.
    """

    reparameterize: bool = False


class PTuningV2Model(PrefixModel):
    """P-tuning v2 (Liu et al. 2021, "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across
    Scales and Tasks", arXiv:2110.07602): deep prompt tuning, i.e. prefix tuning of every attention layer.

    The same method as :class:`PrefixModel` (``delta_type`` ``"prefix"``, not registered a second time): only the
    default differs, ``reparameterize=False``, since the paper found the MLP reparameterization helps on some tasks
    only and its code leaves it off (``prefix_projection=False``). Checkpoints are prefix checkpoints and load as
    :class:`PrefixModel` (``AutoDeltaModel.from_finetuned``, ``PrefixModel.from_finetuned`` or this class's).

    Example:
        >>> delta = PTuningV2Model(backbone_model=model, prefix_token_num=20)
        >>> delta.freeze_module(exclude=["deltas", "classifier"])
    """

    config_class = PTuningV2Config

    @classmethod
    def from_finetuned(
        cls, path: Any, backbone_model: nn.Module, *, check_backbone: bool = True, **kwargs: Any
    ) -> DeltaBase:
        """Load a prefix checkpoint (see :meth:`DeltaBase.from_finetuned`); it comes back as a :class:`PrefixModel`."""
        return PrefixModel.from_finetuned(path, backbone_model, check_backbone=check_backbone, **kwargs)
