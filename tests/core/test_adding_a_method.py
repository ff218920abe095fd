"""The worked example of docs/adding_a_method.md, as a real method defined in this file only.

``ScaleOutputModel`` scales each modified module's output by a learned vector, ``h <- (1 + s) * h`` with ``s = 0`` at
init (an IA3-like method). It declares ``TRANSFORMS_OUTPUT`` (it reads the output, so it does not commute with a
delta merged later), can merge into a Linear host and opts in to per-sample routing. It is registered for the
duration of these tests only and runs through the contract checks with no edit of deltakit itself.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from deltakit import AutoDeltaModel, DeltaGroup, DeltaStateError, LoraModel
from deltakit import registry
from deltakit.base import DeltaBase
from deltakit.config import DeltaConfig, check_finite_number
from deltakit.errors import UnsupportedModuleError
from deltakit.routing import SiteRouter
from deltakit.site import Composition, DeltaSite, factory_kwargs
from deltakit.structures import linear_dims

from tests.helpers import ARCHS, assert_state_equal, hook_counts, perturb, snapshot
from tests.tolerances import assert_same_function


# ------------------------------------------------------------------ the method (what docs/adding_a_method.md shows)
@dataclass
class ScaleOutputConfig(DeltaConfig):
    """Scale-output settings.

    Args:
        init_scale: Initial value of ``s`` (0 makes a fresh delta the identity).
    """

    delta_type: ClassVar[str] = "scale_output"

    init_scale: float = 0.0

    def validate(self) -> None:
        check_finite_number(self, "init_scale", low=-1.0, high=1.0)


class ScaleOutputRouter(SiteRouter):
    """Per-row scales on one host: row ``j`` gets ``1 + s[slot_j]`` (the last, zero slot: unchanged)."""

    def build(self) -> dict[str, torch.Tensor]:
        scales = [site.scale for site in self.sites]  # type: ignore[attr-defined]
        return {"scale": torch.stack([*scales, torch.zeros_like(scales[0])])}

    def apply(self, stack: dict[str, torch.Tensor], slots: torch.Tensor, args: tuple[Any, ...],
              kwargs: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
        scale = self.gather(stack, "scale", slots)
        return output * (1 + scale.view(scale.shape[0], *([1] * (output.dim() - 2)), scale.shape[1]))


class ScaleOutputSite(DeltaSite):
    """``h <- (1 + s) * h`` on one Linear host."""

    composition = Composition.TRANSFORMS_OUTPUT
    router = ScaleOutputRouter

    def __init__(self, width: int, init: float, **factory: Any) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((width,), init, **factory))

    def forward_hook(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
        return output * (1 + self.scale)

    def merge_deltas(self, host: nn.Module) -> dict[str, torch.Tensor]:
        # (1 + s) * (W x + b) = (W + s W) x + (b + s b), row by row of W (out x in)
        out = {"weight": self.scale.detach()[:, None] * host.weight.detach()}
        if host.bias is not None:
            out["bias"] = self.scale.detach() * host.bias.detach()
        return out


class ScaleOutputModel(DeltaBase, register_type=False):  # registered by the fixture below, for these tests only
    """Scales the output of each modified Linear by a learned vector (an IA3-like example)."""

    delta_type: ClassVar[str] = "scale_output"
    config_class = ScaleOutputConfig
    default_modified_modules: ClassVar[tuple[str, ...]] = ("ff.w2",)

    def build_site(self, name: str, host: nn.Module) -> DeltaSite:
        dims = linear_dims(host)
        if not isinstance(host, nn.Linear) or dims is None:
            raise UnsupportedModuleError(f"ScaleOutput cannot modify {name!r} ({type(host).__name__}): nn.Linear only.")
        return ScaleOutputSite(dims[1], self.config.init_scale, **factory_kwargs(host))  # type: ignore[attr-defined]


# ------------------------------------------------------------------ the checks
LINEAR_ARCHS = ("bert", "t5", "llama")  # GPT-2's projections are Conv1D, which this example refuses


@pytest.fixture(autouse=True)
def registered() -> Iterator[None]:
    registry.register(ScaleOutputModel)
    yield
    registry.unregister("scale_output")


@pytest.fixture(params=LINEAR_ARCHS)
def arch_name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_the_constructor_comes_from_the_config() -> None:
    params = list(inspect.signature(ScaleOutputModel).parameters)
    assert params == ["backbone_model", "modified_modules", "init_scale", "exclude_modules", "unfrozen_modules",
                      "modules_to_save", "name", "interactive_modify"]
    assert "init_scale: Initial value of ``s``" in ScaleOutputModel.__init__.__doc__
    assert registry.DELTA_REGISTRY["scale_output"] is ScaleOutputModel
    assert registry.CONFIG_REGISTRY["scale_output"] is ScaleOutputConfig


def test_fresh_attach_is_identity_detach_exact_attach_again(arch_name: str) -> None:
    arch = ARCHS[arch_name]
    model = arch.build()
    state, hooks = snapshot(model), hook_counts(model)
    with torch.no_grad():
        base = arch.run(model)
        delta = ScaleOutputModel(model, modified_modules=["ff.w2", "attn.o"])
        assert torch.equal(arch.run(model), base)
        perturb(delta, scale=0.2)
        attached = arch.run(model)
        assert not torch.allclose(attached, base)
        delta.detach()
        assert torch.equal(arch.run(model), base)
        assert_state_equal(model, state)
        assert hook_counts(model) == hooks
        delta.attach()
        assert torch.equal(arch.run(model), attached)


def test_save_then_load_into_a_fresh_backbone(arch_name: str, tmp_path) -> None:
    arch = ARCHS[arch_name]
    model = arch.build()
    delta = ScaleOutputModel(model)
    perturb(delta, scale=0.2)
    delta.save_finetuned(tmp_path)
    fresh = arch.build()
    loaded = AutoDeltaModel.from_finetuned(tmp_path, fresh)
    assert isinstance(loaded, ScaleOutputModel) and loaded.config == delta.config
    with torch.no_grad():
        assert torch.equal(arch.run(fresh), arch.run(model))


def test_merge_is_close_and_unmerge_exact(arch_name: str) -> None:
    arch = ARCHS[arch_name]
    model = arch.build()
    state = snapshot(model)
    delta = ScaleOutputModel(model)
    perturb(delta, scale=0.2)
    with torch.no_grad():
        attached = arch.run(model)
        delta.merge()
        assert_same_function(arch.run(model), attached, model=model)
        delta.unmerge()
        assert torch.equal(arch.run(model), attached)
    delta.detach()
    assert_state_equal(model, state)


def test_routing_matches_each_delta_alone() -> None:
    arch = ARCHS["bert"]
    model = arch.build().eval()
    group = DeltaGroup(model)
    for name in ("a", "b"):
        delta = ScaleOutputModel(model, name=name)
        perturb(delta, seed=len(name) + ord(name), scale=0.2)
        group.add(delta.detach())
    with torch.no_grad():
        singles = []
        for name in ("a", "b"):
            group.switch(name)
            singles.append(arch.run(model))
        group.switch(None)
        with group.route(["a", "b"]):
            routed = arch.run(model)
    # row i of the routed batch is row i of the batch run with delta names[i] alone
    for row, single in enumerate(singles):
        assert_same_function(routed[row], single[row], model=model)


def test_not_re_attached_under_a_later_merged_delta() -> None:
    arch = ARCHS["bert"]
    model = arch.build()
    scale = ScaleOutputModel(model, modified_modules=["attention.output.dense"])  # created first: applied first
    lora = LoraModel(model, modified_modules=["attention.output.dense"])
    perturb(lora)
    scale.detach()
    lora.merge()
    with pytest.raises(DeltaStateError, match="created after it is merged"):
        scale.attach()  # (1 + s)(W' x) is not (1 + s)(W x) + B A x: TRANSFORMS_OUTPUT keeps its place
