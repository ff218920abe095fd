"""The method contract of deltakit/site.py and deltakit/registry.py is enforced, not guessed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from deltakit import BitFitModel, DeltaConfig, DeltaError, LoraModel, ParallelAdapterModel, registry
from deltakit.base import DeltaBase
from deltakit.site import Composition, DeltaSite

from tests.helpers import ARCHS, assert_state_equal, hook_counts, perturb, snapshot
from tests.tolerances import assert_same_function


def test_a_site_that_declares_no_composition_fails_when_defined() -> None:
    with pytest.raises(DeltaError, match="must declare how it composes"):
        class Undeclared(DeltaSite):  # noqa: F841
            def forward_hook(self, host: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
                return output


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"composition": Composition.TRANSFORMS_OUTPUT}, "must define forward_hook"),
        ({"composition": Composition.REWRITES_CALL}, "must define forward_pre_hook"),
        ({"composition": Composition.REWRITES_CALL, "forward_pre_hook": lambda *a: a[1:], "forward_hook": lambda *a: a[-1]},
         "acts through forward_pre_hook only"),
        ({"composition": Composition.ADDS_INPUT_FUNCTION, "forward_hook": lambda *a: a[-1], "input_source": nn.Linear(1, 1)},
         "input_source and capture_input together"),
        ({"composition": "adds"}, "must be a deltakit.site.Composition"),
    ],
)
def test_a_site_contradicting_its_declaration_fails_when_defined(body: dict[str, Any], match: str) -> None:
    with pytest.raises(DeltaError, match=match):
        type("Contradictory", (DeltaSite,), body)


def test_a_delta_building_an_undeclared_module_is_refused_before_touching_the_model() -> None:
    class PlainModel(DeltaBase):
        def build_site(self, name: str, host: nn.Module) -> Any:
            return nn.Identity()

    model = ARCHS["bert"].build()
    state, hooks = snapshot(model), hook_counts(model)
    with pytest.raises(DeltaError, match="not a DeltaSite declaring a Composition"):
        PlainModel(model, DeltaConfig(modified_modules=["query"]))
    assert_state_equal(model, state)
    assert hook_counts(model) == hooks


def test_registry_checks_names_agree_and_are_not_taken() -> None:
    @dataclass
    class MismatchConfig(DeltaConfig):
        delta_type: ClassVar[str] = "mismatch_a"

    with pytest.raises(DeltaError, match="config_class 'MismatchConfig' declares 'mismatch_a'"):
        class MismatchModel(DeltaBase):  # noqa: F841
            delta_type: ClassVar[str] = "mismatch_b"
            config_class = MismatchConfig

    @dataclass
    class LoraAgainConfig(DeltaConfig):
        delta_type: ClassVar[str] = "lora"

    with pytest.raises(DeltaError, match="'lora' .* is already registered by deltakit.deltas.lora.LoraModel"):
        class LoraAgainModel(DeltaBase):  # noqa: F841
            delta_type: ClassVar[str] = "lora"
            config_class = LoraAgainConfig
    assert registry.DELTA_REGISTRY["lora"] is LoraModel
    assert "mismatch_b" not in registry.DELTA_REGISTRY and "mismatch_a" not in registry.CONFIG_REGISTRY


def test_registry_views_are_read_only_and_agree() -> None:
    assert set(registry.DELTA_REGISTRY) == set(registry.CONFIG_REGISTRY)
    for delta_type, cls in registry.DELTA_REGISTRY.items():
        assert cls.delta_type == delta_type == registry.CONFIG_REGISTRY[delta_type].delta_type
        assert cls.config_class is registry.CONFIG_REGISTRY[delta_type]
    with pytest.raises(TypeError):
        registry.DELTA_REGISTRY["x"] = BitFitModel  # type: ignore[index]


def test_an_additive_site_may_go_back_under_a_later_merged_delta() -> None:
    """A parallel adapter adds a function of an input (out + f(x)): attached again under a LoRA merged later it
    computes what both attached computed (the old has-merge_deltas guess refused this)."""
    arch = ARCHS["bert"]
    model = arch.build()
    parallel = ParallelAdapterModel(model, bottleneck_dim=4)  # created first: ff.w1 input -> ff.w2 output
    lora = LoraModel(model, modified_modules=["output.dense"], lora_r=2)
    perturb(parallel, seed=1, scale=0.3)
    perturb(lora, seed=2, scale=0.3)
    with torch.no_grad():
        both = arch.run(model)
        parallel.detach()
        lora.merge()
        parallel.attach()
        assert_same_function(arch.run(model), both, model=model)
