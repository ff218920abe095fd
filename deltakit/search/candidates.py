"""Search candidates: positions (deltakit's own addressing) times delta methods, each with its size.

A :class:`CandidateSet` says "method M with settings S at every module matching these patterns" (suffixes,
``[r]`` regexes or role names such as ``attn.q``, resolved like ``modified_modules``); it expands into one
:class:`Candidate` per matched module. Sizes come from building the method's sites detached: exactly the
parameters the selected structure will have, nothing estimated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..addressing import find_modules
from ..base import DeltaBase
from ..errors import DeltaConfigError
from ..registry import DELTA_REGISTRY
from ..site import DeltaSite
from .gates import check_gateable


@dataclass(frozen=True)
class CandidateSet:
    """A delta method with fixed settings, offered at every module matching ``modules``.

    Args:
        method: A registered delta type (``"lora"``, ``"bitfit"``, ...) or a delta class.
        modules: Module name patterns, in the ``modified_modules`` syntax (role names work).
        settings: The method's hyper-parameters (``{"lora_r": 1}``); ``modified_modules`` is set per candidate.
        lr: Peak learning rate of this set's deltas during :meth:`~deltakit.search.StructureSearch.fit` (default:
            ``fit``'s ``lr``). Methods differ by orders of magnitude: VeRA trains scaling vectors on frozen random
            projections and wants rates near 1e-1 where LoRA wants 1e-3 to 1e-2.
    """

    method: str | type[DeltaBase]
    modules: Sequence[str]
    settings: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None

    @property
    def delta_class(self) -> type[DeltaBase]:
        """The method's delta class (checked)."""
        if isinstance(self.method, type) and issubclass(self.method, DeltaBase):
            return self.method
        if isinstance(self.method, str) and self.method in DELTA_REGISTRY:
            return DELTA_REGISTRY[self.method]
        raise DeltaConfigError(
            f"Unknown candidate method {self.method!r}: give a registered delta type (one of "
            f"{sorted(DELTA_REGISTRY)}) or a DeltaBase subclass."
        )

    @property
    def key(self) -> str:
        """A short label: the delta type and its settings (``lora(lora_r=1)``)."""
        inner = ", ".join(f"{k}={v!r}" for k, v in sorted(self.settings.items()))
        return f"{self.delta_class.delta_type}({inner})"


@dataclass(frozen=True)
class Candidate:
    """One position x method: the switch the search turns on or off.

    Attributes:
        group: Index of its :class:`CandidateSet` in the search's list.
        method: The delta type.
        settings: The method's settings (shared by its group).
        module: The full name of the host module.
        size: Its number of parameters.
    """

    group: int
    method: str
    settings: tuple[tuple[str, Any], ...]
    module: str
    size: int

    @property
    def label(self) -> str:
        """``<method>@<module>``, for tables."""
        return f"{self.method}@{self.module}"


def check_candidate_sets(candidate_sets: Any) -> list[CandidateSet]:
    """The candidate sets as a list, refusing an empty or malformed one."""
    if isinstance(candidate_sets, CandidateSet):
        candidate_sets = [candidate_sets]
    if not isinstance(candidate_sets, (list, tuple)) or not candidate_sets:
        raise DeltaConfigError(
            f"candidates must be a non-empty list of CandidateSet(method, modules, settings), got "
            f"{candidate_sets!r:.120}. Example: [CandidateSet('lora', ['attn.q', 'attn.v'], {{'lora_r': 1}})]."
        )
    for k, item in enumerate(candidate_sets):
        if not isinstance(item, CandidateSet):
            raise DeltaConfigError(f"candidates[{k}] is a {type(item).__name__}, not a CandidateSet.")
        if not isinstance(item.settings, dict) or "modified_modules" in item.settings:
            raise DeltaConfigError(
                f"candidates[{k}].settings must be a dict of the method's hyper-parameters without "
                f"modified_modules (the positions come from modules=), got {item.settings!r:.120}."
            )
        item.delta_class  # noqa: B018 - raises for an unknown method
        lr = item.lr
        number = isinstance(lr, (int, float)) and not isinstance(lr, bool)
        if lr is not None and not (number and math.isfinite(lr) and lr > 0):
            raise DeltaConfigError(
                f"candidates[{k}].lr must be a positive number (this set's peak learning rate) or None (fit's lr), "
                f"got {lr!r}."
            )
    return list(candidate_sets)


def build_group(
    backbone: nn.Module, candidate_set: CandidateSet, names: Sequence[str] | None = None, name: str | None = None
) -> DeltaBase:
    """Build (detached, nothing attached) the delta of ``candidate_set`` on the modules it matches, or on exactly
    ``names`` (full module names), with child-module name ``name`` (default: the method's).

    Raises:
        ModuleMatchError: A pattern matches nothing (naming it and the closest module names).
        DeltaConfigError / UnsupportedModuleError: Bad settings, or a matched module the method cannot modify.
    """
    cls = candidate_set.delta_class
    patterns = list(candidate_set.modules) if names is None else list(names)
    matches = find_modules(backbone, patterns, what=f"candidate modules of {candidate_set.key}",
                           skip_types=(DeltaSite,))  # fmt: skip
    config = cls.config_class(**candidate_set.settings, modified_modules=[n for n, _ in matches])
    return cls.build_detached(backbone, config, matches, name=name)


def expand(backbone: nn.Module, candidate_sets: list[CandidateSet]) -> tuple[list[Candidate], list[DeltaBase]]:
    """Resolve every set into candidates and their detached deltas (one per set), touching nothing.

    Raises:
        DeltaConfigError: The same method and settings offered twice on one module.
    """
    candidates: list[Candidate] = []
    deltas: list[DeltaBase] = []
    seen: dict[tuple[str, str], int] = {}
    for group, candidate_set in enumerate(candidate_sets):
        delta = build_group(backbone, candidate_set)
        check_gateable(delta)
        for site in delta.sites:
            clash = seen.setdefault((candidate_set.key, site.name), group)
            if clash != group:
                raise DeltaConfigError(
                    f"{candidate_set.key} is offered twice at {site.name!r} (candidate sets {clash} and {group}); "
                    f"each position x method must be one candidate."
                )
            size = sum(p.numel() for p in site.module.parameters())
            candidates.append(Candidate(group, delta.delta_type, tuple(sorted(candidate_set.settings.items())),
                                        site.name, size))  # fmt: skip
        deltas.append(delta)
    return candidates, deltas
