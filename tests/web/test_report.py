"""The visual delta report: data (sites, per-layer and per-kind sums, update sizes), the HTML file, the PNG, the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from deltakit import AdapterModel, LoraModel
from deltakit.cli import main
from deltakit.errors import DeltaError
from deltakit.structures import tiny_model
from deltakit.web.report import MEASURE_MERGE, MEASURE_PARAMS, delta_report, report_data, split_site
from tests.helpers import assert_state_equal, hook_counts, perturb, snapshot, tiny_llama


def trained_lora(seed: int = 0):
    model = tiny_llama()
    delta = LoraModel(model, modified_modules=["q_proj", "v_proj", "down_proj"], lora_r=4, lora_alpha=8)
    perturb(delta, seed=seed)
    return model, delta


def test_split_site() -> None:
    assert split_site("model.layers.3.self_attn.q_proj") == ("model.layers.3", "model.layers.*.self_attn.q_proj")
    assert split_site("lm_head") == ("-", "lm_head")


def test_untrained_lora_is_reported_as_zero_updates() -> None:
    model = tiny_llama()
    delta = LoraModel(model, modified_modules=["q_proj"], lora_r=4)
    data = report_data(delta)
    assert data["untrained"] and data["measure"] == MEASURE_MERGE
    assert all(s["update_norm"] == 0.0 for s in data["sites"])


def test_live_lora_update_sizes_are_the_norm_of_s_b_a() -> None:
    _, delta = trained_lora()
    data = report_data(delta)
    assert [s["module"] for s in data["sites"]] == delta.modified_modules
    assert data["delta_parameters"] == delta.num_delta_parameters()
    assert not data["untrained"]
    for site, row in zip(delta.sites, data["sites"]):
        m = site.module
        expected = torch.linalg.matrix_norm((m.lora_B.double() @ m.lora_A.double()) * m.scaling).item()
        assert math.isclose(row["update_norm"], expected, rel_tol=1e-6)
        assert row["relative"] == pytest.approx(expected / site.host.weight.double().norm().item(), rel=1e-6)
    layers = {r["key"]: r for r in data["layers"]}
    assert sum(r["parameters"] for r in layers.values()) == delta.num_delta_parameters()
    assert {r["key"] for r in data["kinds"]} == {"model.layers.*.self_attn.q_proj", "model.layers.*.self_attn.v_proj",
                                                "model.layers.*.mlp.down_proj"}
    for layer in layers.values():
        sites = [s for s in data["sites"] if s["layer"] == layer["key"]]
        assert layer["update_norm"] == pytest.approx(math.sqrt(sum(s["update_norm"] ** 2 for s in sites)))
    names = data["tree"]["names"]
    assert sorted(names[i] for i in data["site_indices"]) == sorted(delta.modified_modules)


def test_non_mergeable_methods_report_parameter_norms() -> None:
    model = tiny_llama()
    delta = AdapterModel(model, modified_modules=["mlp"], bottleneck_dim=4)
    data = report_data(delta)
    assert data["measure"] == MEASURE_PARAMS and "not a change of host weights" in data["measure_text"]
    for site, row in zip(delta.sites, data["sites"]):
        expected = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in site.module.parameters()))
        assert row["update_norm"] == pytest.approx(expected) and row["relative"] is None


def test_checkpoint_with_and_without_a_backbone(tmp_path: Path) -> None:
    _, delta = trained_lora()
    live = report_data(delta)
    delta.save_finetuned(tmp_path / "ckpt")
    fresh = tiny_llama()
    state, hooks = snapshot(fresh), hook_counts(fresh)
    loaded = report_data(tmp_path / "ckpt", model=fresh)
    assert_state_equal(fresh, state)  # loaded, measured, detached again
    assert hook_counts(fresh) == hooks
    assert [s["update_norm"] for s in loaded["sites"]] == [s["update_norm"] for s in live["sites"]]
    bare = report_data(tmp_path / "ckpt")
    assert bare["measure"] == MEASURE_PARAMS and bare["backbone_parameters"] is None
    assert sorted(s["module"] for s in bare["sites"]) == sorted(delta.modified_modules)
    assert [s["layer"] for s in bare["sites"]] == [s["layer"] for s in live["sites"]]  # layer order kept
    assert bare["delta_parameters"] == delta.num_delta_parameters()
    with pytest.raises(DeltaError, match="No checkpoint directory"):
        report_data(tmp_path / "missing")
    with pytest.raises(DeltaError, match="delta object or a checkpoint"):
        report_data(42)


def test_html_is_self_contained_and_png_is_drawn(tmp_path: Path) -> None:
    _, delta = trained_lora()
    html_file, png_file = tmp_path / "r.html", tmp_path / "r.png"
    delta_report(delta, html_path=html_file, png_path=png_file)
    page = html_file.read_text()
    assert "<script" not in page and "src=" not in page and "href=" not in page  # nothing fetched, nothing run
    assert "model.layers.1.mlp.down_proj" in page and 'class="heat"' in page and "||s·B·A||_F" in page
    assert png_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png_file.stat().st_size > 10_000


def test_cli_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    delta = LoraModel(tiny_model("llama", num_layers=2), lora_r=2)  # the model `--model llama` builds
    perturb(delta)
    delta.save_finetuned(tmp_path / "ckpt")
    out = tmp_path / "out.html"
    assert main(["report", str(tmp_path / "ckpt"), "--html", str(out), "--model", "llama"]) == 0
    assert "merge_deltas" in out.read_text() and "loaded onto LlamaModel" in out.read_text()
    assert main(["report", str(tmp_path / "ckpt"), "--json"]) == 0
    assert '"delta_type": "lora"' in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nothing"), "--html", str(out)]) == 1
    assert "No checkpoint directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "ckpt")])
    assert exit_info.value.code == 2


def test_cli_pick_gives_up_after_its_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pick", "llama", "--layers", "1", "--timeout", "0.2"]) == 1
    err = capsys.readouterr().err
    assert "http://127.0.0.1:" in err and "nothing was submitted" in err


def test_a_site_whose_host_refuses_merging_reports_its_parameter_norm() -> None:
    # BitFit on Llama's bias-less q_proj cannot merge (no bias to fold into): the report used to crash on it.
    from deltakit import BitFitModel

    model = tiny_llama()
    delta = BitFitModel(model, modified_modules=["q_proj"])
    perturb(delta)
    data = report_data(delta)
    assert {s["measure"] for s in data["sites"]} == {MEASURE_PARAMS}
    expected = torch.linalg.vector_norm(delta.sites[0].module.bias).item()
    assert math.isclose(data["sites"][0]["update_norm"], expected, rel_tol=1e-6)
