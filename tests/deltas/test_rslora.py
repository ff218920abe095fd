"""rsLoRA, the ``use_rslora`` option of LoRA (and DoRA): scale ``alpha / sqrt(r)``, recorded in the checkpoint config.
PEFT interop of the flag is tested in tests/integrations/test_peft_interop.py; the contract runs the ``lora-rslora``
and ``dora-ff-rslora`` variants."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from deltakit import AutoDeltaModel, DeltaConfigError, DoraModel, LoraConfig, LoraModel

from tests.helpers import ARCHS, perturb
from tests.tolerances import assert_same_function


@pytest.mark.parametrize(("r", "alpha"), [(4, 8), (16, 16), (3, 7)])
def test_the_update_is_scaled_by_alpha_over_sqrt_r(r: int, alpha: int) -> None:
    model = ARCHS["bert"].build()
    delta = LoraModel(model, modified_modules=["attn.q"], lora_r=r, lora_alpha=alpha, use_rslora=True)
    perturb(delta, scale=0.3)
    site = delta.sites[0]
    assert site.module.scaling == alpha / math.sqrt(r) and delta.config.scaling == alpha / math.sqrt(r)
    x = torch.randn(2, 5, 32)
    module = site.module
    expected = F.linear(x, site.host.weight, site.host.bias) + alpha / math.sqrt(r) * (x @ module.lora_A.T) @ module.lora_B.T
    with torch.no_grad():
        assert_same_function(site.host(x), expected.detach(), depth=4, reduction=32)


def test_off_by_default_and_plain_lora_keeps_alpha_over_r() -> None:
    delta = LoraModel(ARCHS["gpt2"].build(), lora_r=4, lora_alpha=8)
    assert delta.config.use_rslora is False
    assert all(s.module.scaling == 2.0 for s in delta.sites)


@pytest.mark.parametrize("method", [LoraModel, DoraModel])
def test_the_flag_is_recorded_in_the_checkpoint_and_reloads_at_the_same_scale(method: type, tmp_path) -> None:
    arch = ARCHS["llama"]
    model = arch.build()
    delta = method(model, lora_r=4, lora_alpha=8, use_rslora=True)
    perturb(delta, scale=0.3)
    out = arch.run(model)
    delta.save_finetuned(tmp_path)
    assert json.loads((tmp_path / "delta_config.json").read_text())["config"]["use_rslora"] is True
    fresh = arch.build()
    loaded = AutoDeltaModel.from_finetuned(tmp_path, backbone_model=fresh)
    assert loaded.config.use_rslora is True and all(s.module.scaling == 4.0 for s in loaded.sites)
    assert torch.equal(arch.run(fresh), out)


def test_a_checkpoint_written_before_the_option_loads_as_plain_lora(tmp_path) -> None:
    arch = ARCHS["bert"]
    model = arch.build()
    delta = LoraModel(model, lora_r=4, lora_alpha=8)
    perturb(delta, scale=0.3)
    out = arch.run(model)
    delta.save_finetuned(tmp_path)
    meta = json.loads((tmp_path / "delta_config.json").read_text())
    del meta["config"]["use_rslora"]  # what older deltakit versions wrote
    (tmp_path / "delta_config.json").write_text(json.dumps(meta))
    fresh = arch.build()
    assert AutoDeltaModel.from_finetuned(tmp_path, backbone_model=fresh).config.use_rslora is False
    assert torch.equal(arch.run(fresh), out)


@pytest.mark.parametrize("value", [1, "yes", None])
def test_a_non_boolean_flag_is_a_config_error(value: object) -> None:
    with pytest.raises(DeltaConfigError, match="use_rslora must be True or False"):
        LoraConfig(use_rslora=value)  # type: ignore[arg-type]
