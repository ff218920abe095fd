"""Tests of the benchmark harness (``benchmarks/``).

They run the training-step benchmark in ``--quick`` mode (tiny random models)
and check the shape and sanity of its output. They never assert speed ratios:
timings on a shared machine are far too noisy for that.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, load_script

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

SCRIPT = REPO_ROOT / "benchmarks" / "train_step.py"


def _load(name: str, path: Path):
    return load_script(path, name)


@pytest.fixture(scope="module")
def train_step():
    """The ``benchmarks/train_step.py`` module."""
    return _load("deltakit_bench_train_step", SCRIPT)


@pytest.fixture(scope="module")
def common(train_step):
    """The ``benchmarks/common.py`` module (as imported by the script)."""
    return train_step.common


@pytest.fixture(scope="module")
def quick_results(train_step, tmp_path_factory):
    """Run ``train_step.py --quick`` once and return (results, json path, md path)."""
    out_dir = tmp_path_factory.mktemp("bench")
    output = out_dir / "train_step.json"
    threads = torch.get_num_threads()
    try:
        code = train_step.main(["--quick", "--quiet", "--output", str(output)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return json.loads(output.read_text()), output, output.with_suffix(".md")


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


# ----------------------------------------------------------------------------
# The quick run
# ----------------------------------------------------------------------------


@pytest.mark.slow  # a benchmark run (the quick suite): make test and CI run it
def test_quick_run_writes_json_and_markdown(quick_results):
    results, output, markdown = quick_results
    assert output.is_file() and markdown.is_file()
    assert results["benchmark"] == "train_step"
    for key in ("generated", "command", "config", "environment", "models", "wall_time_s"):
        assert key in results
    assert results["config"]["quick"] is True
    assert results["config"]["lora"] == {"r": 8, "alpha": 16, "dropout": 0.0}
    assert results["config"]["adapter"]["bottleneck_dim"] == 24
    assert results["config"]["compacter"]["reduction_factor"] == 16
    assert results["config"]["compacter"]["hypercomplex_division"] == 4
    assert results["config"]["variants"] == ["frozen", "peft", "deltakit", "adapter", "compacter"]
    assert set(results["models"]) == {"tiny-bert", "tiny-llama"}
    text = markdown.read_text()
    assert "tiny-bert" in text and "tiny-llama" in text and "| variant |" in text
    assert "| adapter |" in text and "| compacter |" in text
    assert "| adapter/frozen |" in text and "| compacter/frozen |" in text


DELTAKIT_VARIANTS = ("deltakit", "adapter", "compacter")


def _usable(train_step, variant: str) -> bool:
    return train_step.deltakit_status(variant)[0] is not None


@pytest.mark.slow  # a benchmark run (the quick suite): make test and CI run it
def test_quick_run_variants_have_finite_positive_figures(quick_results, train_step):
    results, _, _ = quick_results
    for model_name, section in results["models"].items():
        assert {"model", "variants", "ratios", "memory_ratios"} <= set(section)
        assert _finite_positive(section["model"]["parameters"])
        variants = section["variants"]
        assert set(variants) == {"frozen", "peft", "deltakit", "adapter", "compacter"}
        assert variants["frozen"]["available"] and variants["peft"]["available"]
        for name in DELTAKIT_VARIANTS:
            assert variants[name]["available"] is _usable(train_step, name), (model_name, name)
        for name, entry in variants.items():
            if not entry["available"]:
                assert entry["reason"]
                continue
            timing = entry["time"]
            assert timing["n"] == section["model"]["rounds"]
            for key in ("median", "q1", "q3", "min", "max", "mean"):
                assert _finite_positive(timing[key]), (model_name, name, key, timing[key])
            assert len(timing["samples"]) == timing["n"]
            memory = entry["memory"]
            assert _finite_positive(memory["peak_rss"]) and _finite_positive(memory["baseline_rss"])
            assert memory["train_peak"] >= 0
            assert memory["tensor_peak"] is None or _finite_positive(memory["tensor_peak"])
            for clock in ("cpu", "wall"):
                assert _finite_positive(entry["time_by_clock"][clock]["median"])
            assert math.isfinite(entry["initial_loss"])


@pytest.mark.slow  # a benchmark run (the quick suite): make test and CI run it
def test_quick_run_ratios_are_finite_positive(quick_results, train_step):
    results, _, _ = quick_results
    expected = {"peft/frozen"}
    if _usable(train_step, "deltakit"):
        expected |= {"deltakit/frozen", "deltakit/peft"}
    for name in ("adapter", "compacter"):
        if _usable(train_step, name):
            expected.add(f"{name}/frozen")
    for section in results["models"].values():
        assert set(section["ratios"]) == expected
        assert section["ratios"] == section["ratios_by_clock"][results["config"]["clock"]]
        for clock_ratios in section["ratios_by_clock"].values():
            assert set(clock_ratios) == expected
            for ratio in clock_ratios.values():
                assert _finite_positive(ratio["median"]) and _finite_positive(ratio["ratio_of_medians"])
                assert len(ratio["ratios"]) == section["model"]["rounds"]
        for name, ratios in section["memory_ratios"].items():
            assert name.endswith("/frozen")
            assert ratios["peak_rss"] is not None and _finite_positive(ratios["peak_rss"])
        available = {name for name, entry in section["variants"].items() if entry["available"]}
        assert set(section["memory_ratios"]) == {f"{name}/frozen" for name in available - {"frozen"}}


@pytest.mark.slow  # a benchmark run (the quick suite): make test and CI run it
def test_quick_run_variants_do_comparable_work(quick_results, train_step):
    """LoRA variants train the same parameters, every delta starts from the backbone's function and all get gradients."""
    results, _, _ = quick_results
    for section in results["models"].values():
        variants = section["variants"]
        assert variants["frozen"]["trainable_params"] == 0
        assert _finite_positive(variants["peft"]["trainable_params"])
        for name, entry in variants.items():
            if entry["available"]:
                assert entry["notes"] == [], (name, entry["notes"])
                assert entry["initial_loss_diff"] < 1e-4
        if variants["deltakit"]["available"]:
            assert variants["deltakit"]["trainable_params"] == variants["peft"]["trainable_params"]
        for name in ("adapter", "compacter"):
            if variants[name]["available"]:
                assert variants[name]["params_with_grad"] > 0


def _adapter_sizes(section):
    """Hidden size and number of adapter sites (attn.o and ff.w2 of every layer) of a quick model."""
    assert "hidden 64, 2 layers" in section["model"]["description"]  # both quick models
    return 64, 2 * 2


@pytest.mark.slow  # a benchmark run (the quick suite): make test and CI run it
def test_quick_run_adapters_sit_at_their_default_positions(quick_results, train_step):
    """Closed-form parameter counts: one adapter / compacter on attn.o and ff.w2 of every layer."""
    results, _, _ = quick_results
    for section in results["models"].values():
        hidden, sites = _adapter_sizes(section)
        variants = section["variants"]
        if variants["adapter"]["available"]:
            bottleneck = train_step.ADAPTER_KWARGS["bottleneck_dim"]
            per_site = hidden * bottleneck + bottleneck + bottleneck * hidden + hidden
            assert variants["adapter"]["trainable_params"] == sites * per_site
            assert variants["adapter"]["params_with_grad"] == sites * 4
        if variants["compacter"]["available"]:
            n = train_step.COMPACTER_KWARGS["hypercomplex_division"]
            bottleneck = hidden // train_step.COMPACTER_KWARGS["reduction_factor"]
            # Rank-1 factorized PHM layers: down (W_left, W_right, bias) + up (W_left, W_right, bias) per site;
            # the n x n x n rule shared by every layer, counted once.
            per_site = (hidden + bottleneck + bottleneck) + (bottleneck + hidden + hidden)
            assert variants["compacter"]["trainable_params"] == sites * per_site + n**3
            assert variants["compacter"]["params_with_grad"] == sites * 6 + 1


def test_prepare_adapter_variants_are_identity_at_init(train_step):
    """Adapter and Compacter reproduce the frozen loss exactly before training and train only delta parameters."""
    for variant in ("adapter", "compacter"):
        if not _usable(train_step, variant):
            pytest.skip(f"deltakit lacks {variant}")
    spec = train_step.MODELS["tiny-llama"]
    batch = train_step.make_batches(spec, 1000, count=1)[0]
    frozen = train_step.prepare_variant("frozen", train_step.build_backbone(spec), spec)
    reference = train_step.sanity_check(frozen, batch)["initial_loss"]
    for variant in ("adapter", "compacter"):
        prepared = train_step.prepare_variant(variant, train_step.build_backbone(spec), spec)
        check = train_step.sanity_check(prepared, batch)
        assert prepared.notes == []
        assert check["initial_loss"] == pytest.approx(reference, abs=1e-6)
        assert check["params_with_grad"] == len(prepared.trainable) > 0
        backbone_trainable = [n for n, p in prepared.model.named_parameters()
                              if p.requires_grad and f".{variant}" not in n and f"{variant}_shared" not in n]
        assert backbone_trainable == []
        assert math.isfinite(float(prepared.step(batch)))


# ----------------------------------------------------------------------------
# The memory child process
# ----------------------------------------------------------------------------


@pytest.mark.slow  # a benchmark run (the quick suite): make test and CI run it
def test_memory_child_reports_json():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--memory-child", "frozen", "tiny-bert", "--memory-steps", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=True,
    )
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["steps"] == 1
    for key in ("baseline_rss", "peak_rss", "model_rss"):
        assert _finite_positive(result[key])
    assert result["train_peak"] >= 0
    assert result["peak_rss"] >= result["train_peak"]
    assert result["tensor_peak"] is None or _finite_positive(result["tensor_peak"])


def test_parse_args_quick_defaults(train_step, tmp_path):
    args = train_step.parse_args(["--quick", "--output", str(tmp_path / "x.json")])
    assert args.models == "tiny-bert,tiny-llama"
    assert args.memory == "inprocess"
    assert args.threads == 1 and args.clock == "cpu"
    assert train_step.parse_args(["--threads", "2"]).clock == "wall"
    assert args.markdown == tmp_path / "x.md"
    full = train_step.parse_args([])
    assert full.models == "minilm,llama130m" and full.memory == "subprocess"
    with pytest.raises(SystemExit):
        train_step.parse_args(["--models", "nope"])


def test_llama130m_config_is_about_130m_parameters(train_step):
    from transformers import LlamaForCausalLM

    spec = train_step.MODELS["llama130m"]
    with torch.device("meta"):
        model = LlamaForCausalLM(train_step.model_config(spec))
    count = sum(p.numel() for p in model.parameters())
    assert 125e6 < count < 140e6
    assert (spec.batch_size, spec.seq_len, spec.target_modules) == (4, 256, ("q_proj", "v_proj"))


# ----------------------------------------------------------------------------
# benchmarks/common.py
# ----------------------------------------------------------------------------


def test_summarize_and_quantiles(common):
    summary = common.summarize([3.0, 1.0, 2.0, 4.0])
    assert summary["n"] == 4
    assert summary["median"] == 2.5
    assert summary["min"] == 1.0 and summary["max"] == 4.0
    assert summary["q1"] == pytest.approx(1.75) and summary["q3"] == pytest.approx(3.25)
    empty = common.summarize([])
    assert empty["n"] == 0 and math.isnan(empty["median"])


def test_paired_ratio_uses_per_round_ratios(common):
    ratio = common.paired_ratio([2.0, 4.0, 6.0], [1.0, 4.0, 3.0])
    assert ratio["ratios"] == [2.0, 1.0, 2.0]
    assert ratio["median"] == 2.0
    assert ratio["ratio_of_medians"] == pytest.approx(4.0 / 3.0)
    with pytest.raises(ValueError):
        common.paired_ratio([1.0], [1.0, 2.0])


def test_rotated_order_and_interleaving(common):
    assert common.rotated_order(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert common.rotated_order(["a", "b", "c"], 4) == ["b", "c", "a"]
    calls: list[tuple[str, int]] = []
    steps = {name: (lambda index, n=name: calls.append((n, index))) for name in ("a", "b", "c")}
    result = common.run_interleaved(steps, rounds=3, warmup=1, collect_garbage=False)
    assert result.orders == [["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert set(result.times) == set(common.CLOCKS) == {"cpu", "wall"}
    for clock in common.CLOCKS:
        assert all(len(result.times[clock][n]) == 3 for n in "abc")
        assert all(len(result.warmup_times[clock][n]) == 1 for n in "abc")
    # Every variant sees the same call index within a round (same input batch).
    assert calls[:3] == [("a", 0), ("b", 0), ("c", 0)]
    assert sorted(calls[3:6]) == [("a", 1), ("b", 1), ("c", 1)]


def test_output_helpers(common, tmp_path):
    path = common.write_json(tmp_path / "sub" / "r.json", {"x": float("nan"), "y": [1.5, float("inf")]})
    assert json.loads(path.read_text()) == {"x": None, "y": [1.5, None]}
    table = common.markdown_table(["a", "b"], [[1, "x|y"]])
    assert table.splitlines() == ["| a | b |", "| --- | --- |", "| 1 | x\\|y |"]
    assert common.format_seconds(0.0123) == "12.3 ms"
    assert common.format_seconds(1.5) == "1.500 s"
    assert common.format_bytes(3 * 2**20) == "3.0 MiB"
    assert common.format_ratio(float("nan")) == "-"


def test_tensor_memory_peak_counts_live_tensors(common):
    def step():
        a = torch.ones(256, 1024)  # 1 MiB
        b = torch.ones(256, 1024)  # 1 MiB, both live at once
        del a, b

    measured = common.tensor_memory_peak(step)
    if measured is None:
        pytest.skip("torch profiler event tree unavailable")
    assert measured["peak"] >= 2 * 2**20
    assert measured["net"] == 0


def test_memory_helpers(common):
    assert common.current_rss_bytes() > 0
    assert common.peak_rss_bytes() >= common.current_rss_bytes() // 2
    assert isinstance(common.reset_peak_rss(), bool)
    common.trim_memory()


@pytest.mark.slow  # a benchmark run (the quick suite): make test and CI run it
def test_core_paths_script_runs_quick() -> None:
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "core_paths.py"), "--quick"],
                         capture_output=True, text=True, timeout=300, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(figures[k] > 0 for k in ("switch_ms", "step_ms", "inject_7b_ms"))
