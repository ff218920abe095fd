"""benchmarks/many_deltas.py's pairing: with --repeats the deltakit/PEFT ratios are medians of per-pair ratios
(each system runs in its own process, so a load change between two processes must move single pairs, not the
result)."""

from __future__ import annotations

import pytest

from benchmarks.many_deltas import median_run, paired_ratios


def _result(prefill: float, decode: float) -> dict:
    return {"prefill": {"throughput": prefill}, "decode": {"throughput": decode}}


def test_ratios_are_medians_of_the_pairs_not_ratios_of_medians() -> None:
    pairs = [
        {"deltakit": _result(20.0, 18.0), "peft": _result(5.0, 6.0)},   # 4.0, 3.0
        {"deltakit": _result(10.0, 27.0), "peft": _result(8.0, 7.5)},   # a busy pair: 1.25, 3.6
        {"deltakit": _result(19.0, 19.0), "peft": _result(5.0, 5.0)},   # 3.8, 3.8
    ]
    ratios = paired_ratios(pairs)
    assert ratios["prefill_vs_peft"] == pytest.approx(3.8)
    assert ratios["decode_vs_peft"] == pytest.approx(3.6)
    assert ratios["prefill_vs_peft_rounds"] == pytest.approx([4.0, 1.25, 3.8])


def test_one_pair_gives_its_own_ratio_and_the_median_run_is_the_middle_one() -> None:
    one = paired_ratios([{"deltakit": _result(6.0, 9.0), "peft": _result(2.0, 3.0)}])
    assert one["prefill_vs_peft"] == 3.0 and one["decode_vs_peft"] == 3.0
    runs = [_result(10.0, 10.0), _result(30.0, 30.0), _result(20.0, 20.0)]
    assert median_run(runs) is runs[2]
    assert median_run(runs[:2]) is runs[0]  # an even count takes the lower one
