"""``StructureSearch``: which delta goes where, under a parameter budget (S3Delta, single-level).

Usage::

    search = StructureSearch(model, candidates=[
        CandidateSet("lora", ["attn.q", "attn.k", "attn.v", "attn.o", "ff.w1", "ff.w2"], {"lora_r": 1}),
        CandidateSet("bitfit", ["attn.q", "attn.v", "ff.w1", "ff.w2", "attn.norm", "ff.norm"]),
    ], budget=10_000, seed=0)
    search.fit(lambda step: loss_of(model, batches[step]), steps=200, extra_parameters=model.classifier.parameters())
    structure = search.select()          # never more than the budget
    search.detach()                      # the backbone is bit for bit what it was
    delta = structure.build(fresh_model) # a CompositeDelta: retrain it from scratch

Every candidate is attached at once, wrapped by its gate (:mod:`deltakit.search.gates`); the gate logits and the
deltas are trained together on the same batches (the single-level variant of S3Delta; the paper's second-order
DARTS step is not implemented). Nothing about the task is built in: ``fit`` takes a function that returns the
loss of a step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..base import DeltaBase
from ..composite import CompositeDelta
from ..errors import DeltaConfigError, DeltaError, DeltaStateError
from .candidates import Candidate, CandidateSet, build_group, check_candidate_sets, expand
from .gates import GateBank, GatedDelta, concrete_sample, solve_shift
from .knapsack import greedy_select, random_select


@dataclass(frozen=True)
class Structure:
    """A discrete delta structure: some candidates, within a budget.

    Attributes:
        candidate_sets: The sets the candidates came from (their methods and settings).
        chosen: The chosen candidates, in candidate order.
        budget: The budget it was selected under.
    """

    candidate_sets: tuple[CandidateSet, ...]
    chosen: tuple[Candidate, ...]
    budget: float

    @property
    def num_parameters(self) -> int:
        """Parameters of the structure (the sum of the chosen candidates' sizes)."""
        return sum(c.size for c in self.chosen)

    def build(self, backbone_model: nn.Module, *, name: str = "structure") -> CompositeDelta:
        """Attach the structure to ``backbone_model`` as a :class:`~deltakit.composite.CompositeDelta` (one member
        per method used, named after it), fresh (untrained) and attached.

        Raises:
            DeltaError: The structure is empty, or a module does not exist in this backbone (nothing attached).
        """
        if not self.chosen:
            raise DeltaError("The structure is empty (no candidate fits the budget); nothing to build.")
        groups: dict[int, list[str]] = {}
        for candidate in self.chosen:
            groups.setdefault(candidate.group, []).append(candidate.module)
        types = [self.candidate_sets[g].delta_class.delta_type for g in groups]
        members = []
        for g, names in groups.items():
            delta_type = self.candidate_sets[g].delta_class.delta_type
            member = delta_type if types.count(delta_type) == 1 else f"{delta_type}_{g}"
            members.append(build_group(backbone_model, self.candidate_sets[g], names, name=f"{name}_{member}"))
        built = sum(m.num_delta_parameters() for m in members)
        if built != self.num_parameters:  # the sizes were measured on another backbone of other shapes
            raise DeltaError(
                f"The structure has {self.num_parameters:,} parameters on the searched backbone but {built:,} on "
                f"{type(backbone_model).__name__}; build it on the same architecture."
            )
        return CompositeDelta(members, name=name).attach()

    def describe(self) -> dict[str, int]:
        """Parameters per method (``{"lora": 4608, "bitfit": 1536}``), for reports."""
        out: dict[str, int] = {}
        for c in self.chosen:
            out[c.method] = out.get(c.method, 0) + c.size
        return out


def list_candidates(backbone_model: nn.Module, candidates: Sequence[CandidateSet]) -> list[Candidate]:
    """Every candidate the sets offer on ``backbone_model``, with its size (nothing is attached)."""
    return expand(backbone_model, check_candidate_sets(candidates))[0]


def random_structure(
    backbone_model: nn.Module, candidates: Sequence[CandidateSet], budget: float, seed: int
) -> Structure:
    """A random structure from the same candidates under the same budget: candidates in a random order, each
    taken while it fits (the baseline a search must beat)."""
    sets = check_candidate_sets(candidates)
    found = expand(backbone_model, sets)[0]
    budget = _check_budget(budget, [c.size for c in found])
    chosen = random_select([c.size for c in found], budget, seed)
    return Structure(tuple(sets), tuple(found[i] for i in chosen), budget)


def _check_budget(budget: Any, sizes: Sequence[int]) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise DeltaConfigError(f"budget must be a number of parameters, got {budget!r}.")
    smallest, total = min(sizes), sum(sizes)
    if budget < smallest:
        raise DeltaConfigError(
            f"budget={budget:,} is below the smallest candidate ({smallest:,} parameters): no structure fits. Raise "
            f"the budget or offer smaller candidates (e.g. BitFit on a norm, LoRA with lora_r=1)."
        )
    if budget >= total:
        raise DeltaConfigError(
            f"budget={budget:,} covers every candidate ({total:,} parameters in all): there is nothing to choose. "
            f"Offer more candidates, lower the budget, or build all candidates directly."
        )
    return float(budget)


class StructureSearch:
    """Search which delta goes where under a parameter budget; attaches every candidate, gated.

    Args:
        backbone_model: The model (its own parameters are not changed; freeze them as usual).
        candidates: :class:`~deltakit.search.CandidateSet` s: a method with settings, at module patterns.
        budget: The most parameters the selected structure may have (the expected size during the search).
        seed: Seeds the candidates' initialisation and the gate samples (the same seed, the same search).
        beta: Temperature of the gate probabilities ``sigmoid((alpha - b) / beta)``.
        tau: Temperature of the binary-concrete gate samples (smaller: closer to 0/1).

    Raises:
        DeltaConfigError: Empty or malformed candidates, an unknown method, a budget below the smallest candidate
            or covering all of them, bad temperatures.
        ModuleMatchError: A pattern matches no module. UnsupportedModuleError: a method that cannot be gated
            (shared trainable parameters, call rewrites, cross-module inputs). Raised before anything is attached.
    """

    def __init__(
        self,
        backbone_model: nn.Module,
        candidates: Sequence[CandidateSet],
        budget: float,
        *,
        seed: int = 0,
        beta: float = 1.0,
        tau: float = 0.5,
    ) -> None:
        if not isinstance(backbone_model, nn.Module):
            raise DeltaError(f"StructureSearch needs an nn.Module, got {type(backbone_model).__name__}.")
        for label, value in (("beta", beta), ("tau", tau)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise DeltaConfigError(f"StructureSearch({label}=...) must be a positive number, got {value!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise DeltaConfigError(f"StructureSearch(seed=...) must be an int, got {seed!r}.")
        sets = check_candidate_sets(candidates)
        with torch.random.fork_rng(devices=[]):  # the deltas' initialisation, without moving the caller's RNG
            torch.manual_seed(seed)
            found, inner = expand(backbone_model, sets)  # everything resolved and built; nothing attached yet
        self.budget = _check_budget(budget, [c.size for c in found])
        self.backbone_model = backbone_model
        self.candidate_sets = tuple(sets)
        self.candidates = tuple(found)
        self.seed, self.beta, self.tau = seed, float(beta), float(tau)
        self.sizes = torch.tensor([c.size for c in found], dtype=torch.float64)
        self.alpha = nn.Parameter(torch.zeros(len(found)))
        self.bank = GateBank(len(found))
        self._generator = torch.Generator().manual_seed(seed)
        self.gated: list[GatedDelta] = []
        first = 0
        try:
            for g, delta in enumerate(inner):
                self.gated.append(GatedDelta(delta, first, self.bank, name=f"search_gate_{g}"))
                first += len(delta.sites)
        except BaseException:
            self.detach()
            raise

    # ---------------------------------------------------------------- the gates
    def shift(self) -> float:
        """The shift ``b`` that makes the expected size equal the budget for the current logits."""
        return solve_shift(self.alpha, self.sizes, self.budget, self.beta)

    def logits(self) -> torch.Tensor:
        """``(alpha - b) / beta``: the gates' logits under the budget (differentiable in ``alpha``)."""
        return (self.alpha - self.shift()) / self.beta

    def probabilities(self) -> torch.Tensor:
        """``p_i`` in float64, one per candidate; ``sum_i p_i n_i`` equals the budget."""
        return torch.sigmoid((self.alpha.detach().double() - self.shift()) / self.beta)

    def expected_parameters(self) -> float:
        """``sum_i p_i n_i`` for the current logits (the budget, up to the bisection's tolerance)."""
        return float((self.probabilities() * self.sizes).sum())

    def sample_gates(self) -> torch.Tensor:
        """Draw binary-concrete gates for the next forward (they carry the gradient to ``alpha``)."""
        values = concrete_sample(self.logits(), self.tau, self._generator)
        self.bank.set(values)
        return values

    def fix_gates(self, values: torch.Tensor | float) -> None:
        """Use fixed gate values (a tensor with one per candidate, or one number for all) in the next forwards."""
        if not isinstance(values, torch.Tensor):
            values = torch.full((len(self.candidates),), float(values))
        self.bank.set(values.detach())

    # ---------------------------------------------------------------- parameters and training
    def delta_parameters(self) -> list[nn.Parameter]:
        """Every candidate's parameters (the gated deltas')."""
        return [p for delta in self.gated for p in delta.parameters()]

    def gate_parameters(self) -> list[nn.Parameter]:
        """The gate logits ``alpha`` (one tensor)."""
        return [self.alpha]

    def fit(
        self,
        loss_fn: Callable[[int], torch.Tensor],
        *,
        steps: int,
        lr: float = 1e-2,
        gate_lr: float = 0.1,
        extra_parameters: Iterable[nn.Parameter] = (),
        open_steps: int = 0,
    ) -> list[float]:
        """Train the deltas and the gates together: each step samples gates, calls ``loss_fn(step)`` (which runs
        the model on that step's batch and returns the loss) and takes one AdamW step for the deltas (and
        ``extra_parameters``, e.g. a classifier head; linear warm-up and decay) and one Adam step for the gates.
        Each candidate set's deltas train at its ``CandidateSet.lr`` when it has one, the rest at ``lr``.

        Dropout and the gate samples are drawn from generators seeded by ``seed``: the same seed and the same
        ``loss_fn`` give the same search.

        With ``open_steps``, the first steps run with every gate at 1 and train the deltas only: at a small budget
        every ``p_i`` starts near ``budget / total``, so sampled gates are nearly closed and neither the deltas
        nor the gates get a useful gradient; opening them first lets the deltas learn what they can do.

        Afterwards the gates stay fixed at their probabilities ``p_i`` (the relaxed model's expected gates);
        :meth:`select` gives the discrete structure.

        Returns:
            The loss of every step.
        """
        if self._detached:
            raise DeltaStateError("This structure search was detached; create a new StructureSearch to search again.")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise DeltaConfigError(f"fit(steps=...) must be a positive int, got {steps!r}.")
        if isinstance(open_steps, bool) or not isinstance(open_steps, int) or not 0 <= open_steps < steps:
            raise DeltaConfigError(f"fit(open_steps=...) must be an int in [0, steps), got {open_steps!r}.")
        groups = self._parameter_groups(lr, list(extra_parameters))
        for group in groups:
            for p in group["params"]:
                p.requires_grad_(True)
        optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
        gate_optimizer = torch.optim.Adam(self.gate_parameters(), lr=gate_lr)
        warmup = max(1, steps // 10)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
        )
        losses = []
        was_training = self.backbone_model.training
        self.backbone_model.train()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed + 1)  # dropout
                for step in range(steps):
                    if step < open_steps:
                        self.fix_gates(1.0)
                    else:
                        self.sample_gates()
                    loss = loss_fn(step)
                    optimizer.zero_grad(set_to_none=True)
                    gate_optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    gate_optimizer.step()
                    schedule.step()
                    losses.append(float(loss.detach()))
        finally:
            self.backbone_model.train(was_training)
            self.fix_gates(self.probabilities().float())
        return losses

    def _parameter_groups(self, lr: float, extra: list[nn.Parameter]) -> list[dict[str, Any]]:
        """One optimizer group per candidate set (its own ``lr`` when it has one), the extra parameters at ``lr``.

        An extra parameter that is also a delta's stays in the delta's group (a tensor may be in one group only).
        """
        groups = [
            {"params": list(delta.parameters()), "lr": lr if cs.lr is None else float(cs.lr)}
            for cs, delta in zip(self.candidate_sets, self.gated)
        ]
        seen = {id(p) for g in groups for p in g["params"]}
        extra = [p for p in dict.fromkeys(extra) if id(p) not in seen]
        return [g for g in [*groups, {"params": extra, "lr": lr}] if g["params"]]

    # ---------------------------------------------------------------- the result
    def select(self) -> Structure:
        """The greedy knapsack over the current probabilities: never more parameters than the budget."""
        probs = self.probabilities().tolist()
        chosen = greedy_select(probs, [c.size for c in self.candidates], self.budget)
        return Structure(self.candidate_sets, tuple(self.candidates[i] for i in chosen), self.budget)

    @property
    def _detached(self) -> bool:
        return not self.gated or all(d.state == "detached" for d in self.gated)

    def detach(self) -> None:
        """Remove every gated candidate: the backbone is bit for bit what it was before the search."""
        for delta in reversed(self.gated):
            if delta.state != "detached":
                delta.detach()

    @property
    def deltas(self) -> list[DeltaBase]:
        """The gated deltas (one per candidate set) attached by the search."""
        return list(self.gated)
