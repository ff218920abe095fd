"""The benchmark suite (``benchmarks/run_all.py``) in ``--quick`` mode, so that it cannot rot.

The quick run uses tiny random models; these tests check that every section runs, writes its JSON, markdown and
plots, and that the correctness checks built into the sections hold (equal parameter counts, equal outputs of
deltakit and PEFT, no hooks after merging, the checkpoint bound). They never assert a timing.
"""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

from benchmarks import run_all  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Run the whole suite once in quick mode; returns (results, output dir, exit code)."""
    out = tmp_path_factory.mktemp("suite")
    threads = torch.get_num_threads()
    try:
        code = run_all.main(["--quick", "--quiet", "--output-dir", str(out)])
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "suite_quick.json").read_text()), out, code


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.mark.slow  # a benchmark run (the quick suite): make test and CI run it
def test_every_section_runs_and_writes_json_markdown_and_plots(quick) -> None:
    results, out, code = quick
    assert code == 0, results["errors"]
    assert results["errors"] == {}
    assert set(results["sections"]) == set(run_all.SECTIONS)
    assert results["quick"] is True and results["notes"] == []
    markdown = (out / "suite_quick.md").read_text()
    assert "## Summary" in markdown and "quick mode" in markdown and "shared 2-core machine" in markdown
    assert sorted(results["plots"]) == sorted(
        f"suite_quick_{name}.png"
        for name in ("mixed_throughput", "switch_vs_sites", "routing_crossover", "inference_overhead", "injection")
    )
    for name in results["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in markdown
    assert all(row[3] != "" for row in run_all.summary_rows(results))


@pytest.mark.slow  # a benchmark run (the quick suite): make test and CI run it
def test_train_step_section_compares_deltakit_and_peft(quick) -> None:
    section = quick[0]["sections"]["train_step"]
    assert set(section["models"]) == {"tiny-bert"}
    models = section["models"]["tiny-bert"]
    assert set(models["ratios"]) == {"deltakit/frozen", "peft/frozen", "deltakit/peft"}
    assert models["variants"]["deltakit"]["trainable_params"] == models["variants"]["peft"]["trainable_params"]
    assert set(models["memory_ratios"]) == {"deltakit/frozen", "peft/frozen"}


@pytest.mark.slow  # a benchmark run (the quick suite): make test and CI run it
def test_inference_section_checks_equal_outputs_and_hookless_merge(quick) -> None:
    section = quick[0]["sections"]["inference"]
    checks = section["checks"]
    assert checks["notes"] == []
    assert checks["delta_params"]["deltakit"] == checks["delta_params"]["peft"] > 0
    assert checks["merged_hooks"] == 0
    assert checks["max_abs_diff"]["deltakit vs peft"] < 1e-4
    assert checks["max_abs_diff"]["deltakit vs base"] > 0
    for batch in ("1", "4"):
        ratios = section["batches"][batch]["ratios"]
        assert set(ratios) == {"deltakit/base", "peft/base", "deltakit/peft", "deltakit_merged/base", "peft_merged/base",
                               "base_copy/base", "deltakit_merged/base_copy", "peft_merged/base_copy"}
        assert all(_positive(r["median"]) for r in ratios.values())


@pytest.mark.slow  # a benchmark run (the quick suite): make test and CI run it
def test_injection_section_counts_equal_the_closed_form(quick) -> None:
    shapes = quick[0]["sections"]["injection"]["shapes"]
    assert set(shapes) == {"llama-small"}
    entry = shapes["llama-small"]
    assert entry["params_match"] == {"deltakit": True, "peft": True, "peft_low_mem": True}
    assert _positive(entry["ratios"]["deltakit/peft"]["median"])


@pytest.mark.slow  # a benchmark run (the quick suite): make test and CI run it
def test_serving_section_measures_switching_and_mixed_batches(quick) -> None:
    section = quick[0]["sections"]["serving"]
    switch = section["switch"]
    assert switch["deltas"] == 8 and switch["sites"] == 4  # q,v on a 2-layer Llama
    assert all(_positive(v) for v in switch["per_switch_ms"].values())
    assert [p["sites"] for p in switch["vs_sites"]] == [4, 28]
    mixed = section["mixed"]
    assert mixed["max_abs_diff_deltakit_vs_peft"] < 1e-3
    assert set(mixed["ratios"]) == {"deltakit_mixed/deltakit_single", "peft_mixed/peft_single", "deltakit_mixed/peft_mixed"}
    points = mixed["vs_deltas"]["points"]
    assert [p["deltas"] for p in points] == [1, 8]
    assert all(_positive(p["deltakit_samples_per_s"]) and _positive(p["peft_samples_per_s"]) for p in points)


@pytest.mark.slow  # a benchmark run (the quick suite): make test and CI run it
def test_serving_settings_cover_all_linear_layers_and_a_decode_step(quick) -> None:
    settings = quick[0]["sections"]["serving"]["settings"]
    assert settings["deltas"] == settings["batch"] == 8 and settings["prompt"] == 16
    points = settings["points"]
    # q,v (2 layers x 2) and all seven projections (2 layers x 7); each as a prefill and a KV-cache decode step
    assert [(p["targets"], p["sites"], p["step"]) for p in points] == [
        ("q,v", 4, "prefill"), ("q,v", 4, "decode"), ("all linear", 14, "prefill"), ("all linear", 14, "decode")]
    assert [p["tokens_per_sample"] for p in points] == [16, 1, 16, 1]
    for p in points:
        assert p["max_abs_diff_deltakit_vs_peft"] < 1e-4  # same factors, same outputs
        assert p["max_abs_diff_deltakit_vs_base"] > 1e-2  # and the deltas do change them
        assert set(p["samples_per_s"]) == {"base", "deltakit", "peft"}
        assert all(_positive(v) for v in p["samples_per_s"].values())
        assert set(p["ratios"]) == {"peft/deltakit", "deltakit/base", "peft/base"}
        assert all(_positive(r["median"]) for r in p["ratios"].values())
    rows = [row for row in run_all.summary_rows(quick[0]) if "sites," in row[0] and "mixed-batch" in row[0]]
    assert len(rows) == 4 and all("ceiling" in row[3] for row in rows)


@pytest.mark.slow  # a benchmark run (the quick suite): make test and CI run it
def test_routing_crossover_section_times_both_paths_and_marks_the_automatic_choice(quick) -> None:
    from deltakit.routing import SEGMENT_COST

    section = quick[0]["sections"]["routing_crossover"]
    assert section["notes"] == [] and section["segment_cost"] == SEGMENT_COST
    assert [(s["step"], s["ranks"]) for s in section["series"]] == [("decode", "r=2"), ("decode", "mixed 2-8")]
    for series in section["series"]:
        assert [p["distinct"] for p in series["points"]] == [1, 8]
        for p in series["points"]:
            assert p["max_rel_diff"] <= 1e-5  # both paths compute the same outputs
            assert set(p["ms"]) == {"gather", "segment", "gather_later", "segment_later"}
            assert all(map(_positive, p["ms"].values()))
            assert set(p["ratios"]) == {"segment/gather", "segment_later/gather_later"}
            assert p["auto"] in ("segment", "gather")
        assert series["auto_segment_up_to"] in (0, 1, 8)
        for key in ("measured_crossover", "measured_crossover_later"):
            assert series[key] in ("segment", "gather") or 1 <= series[key] <= 8


def test_the_crossover_benchmark_predicts_the_path_route_takes() -> None:
    """routing_crossover.auto_takes_segment restates deltakit.routing's rule; the router's own counters must agree
    (else the figure would mark the wrong path)."""
    from benchmarks import routing_crossover as rc

    seen = set()
    for ranks, distinct in (((2,), 1), ((2,), 8), ((64,), 1), ((64,), 8), ((4, 64), 2)):
        model, group, names = rc.build(64, 2, 8, ranks)
        rows = rc.batch_names(names, 8, distinct)
        x = torch.randn(8, 1, 64)
        with torch.inference_mode(), group.route(rows):
            model(x)
        calls = {k: sum(r.calls[k] for r in group._routers) for k in ("gather", "segment")}
        expected = "segment" if rc.auto_takes_segment(group, rows) else "gather"
        assert calls[expected] == 2 and sum(calls.values()) == 2, (ranks, distinct, calls)
        seen.add(expected)
    assert seen == {"segment", "gather"}


@pytest.mark.slow  # a benchmark run (the quick suite): make test and CI run it
def test_checkpoint_section_meets_the_bound_for_query_value(quick) -> None:
    section = quick[0]["sections"]["checkpoint"]
    assert set(section["scenarios"]) == {"minilm q,v r=16", "minilm all linear r=16", "llama130m q,v r=8"}
    qv = section["scenarios"]["minilm q,v r=16"]
    assert qv["deltakit"]["raw_bytes"] == qv["peft"]["raw_bytes"]
    assert qv["deltakit"]["within_bound"] and qv["deltakit"]["overhead_bytes"] <= qv["deltakit"]["bound_bytes"]
    assert qv["deltakit"]["overhead_bytes"] < qv["peft"]["overhead_bytes"]
    for entry in section["scenarios"].values():
        d = entry["deltakit"]
        assert d["overhead_bytes"] == d["header_bytes"] + d["config_bytes"]


@pytest.mark.slow  # a benchmark run (the quick suite): make test and CI run it
def test_ia3_section_compares_equal_deltas_and_routes_mixed_batches(quick) -> None:
    results = quick[0]
    section = results["sections"]["ia3"]
    assert section["notes"] == [] and set(section["models"]) == {"tiny-bert", "tiny-llama"}
    for entry in section["models"].values():
        losses = entry["initial_loss"]
        # Same vectors on the same modules in both libraries: the same step-0 loss, not the frozen one.
        assert entry["loss_rel_diff_deltakit_vs_peft"] <= 1e-5 and losses["ia3"] != losses["frozen"]
        assert set(entry["ratios"]) == {"ia3/frozen", "peft_ia3/frozen", "ia3/peft_ia3"}
        assert all(_positive(r["median"]) for r in entry["ratios"].values())
    mixed = section["mixed"]
    assert mixed["deltas"] == 8 and mixed["sites_per_delta"] == 6  # k, v, down of a 2-layer Llama
    assert mixed["max_abs_diff_mixed_vs_alone"] <= 1e-4 < mixed["min_abs_change_vs_base"]
    assert set(mixed["ratios"]) == {"mixed/switched", "mixed/one_routed", "one_routed/switched", "switched/base",
                                    "mixed/base"}
    rows = [row for row in run_all.summary_rows(results) if row[0].startswith("(IA)^3")]
    assert len(rows) == 3 and [row[3] for row in rows] == ["<= 1.02", "<= 1.02", "<= 1.03"]


def test_unknown_sections_are_rejected() -> None:
    with pytest.raises(SystemExit):
        run_all.parse_args(["--sections", "inference,nope"])
    assert run_all.parse_args(["--sections", "serving, checkpoint"]).sections == ["serving", "checkpoint"]


@pytest.mark.slow  # a benchmark run (the quick suite): make test and CI run it
def test_render_redraws_report_and_plots_from_json(quick, tmp_path) -> None:
    results, out, _ = quick
    assert run_all.main(["--render", str(out / "suite_quick.json"), "--output-dir", str(tmp_path)]) == 0
    assert (tmp_path / "suite_quick.md").read_text().count("## ") == (out / "suite_quick.md").read_text().count("## ")
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(results["plots"])


@pytest.mark.slow  # a benchmark run (the quick suite): make test and CI run it
def test_an_earlier_train_step_result_can_stand_in(quick, tmp_path) -> None:
    earlier = tmp_path / "train_step.json"
    earlier.write_text(json.dumps(quick[0]["sections"]["train_step"]))
    code = run_all.main(["--quick", "--quiet", "--no-plots", "--sections", "train_step,checkpoint",
                         "--train-step-json", str(earlier), "--output-dir", str(tmp_path)])
    results = json.loads((tmp_path / "suite_quick.json").read_text())
    assert code == 0 and set(results["sections"]) == {"train_step", "checkpoint"}
    assert results["sections"]["train_step"] == quick[0]["sections"]["train_step"]
    assert any("not re-run" in note for note in results["notes"])


def test_dora_benchmark_checks_its_step_zero_loss_without_autograd() -> None:
    # It converted a loss that required grad to a float (a UserWarning in every suite run) and measured it with
    # dropout on; the shared helper evaluates in eval mode under no_grad and restores training mode.
    import warnings

    from benchmarks import dora, train_step

    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="Converting a tensor with requires_grad=True")
            entry = dora.benchmark_model(train_step.MODELS["tiny-bert"], rounds=1, warmup=0, log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    assert all(math.isfinite(loss) for loss in entry["initial_loss"].values())
