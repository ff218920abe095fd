"""benchmarks/server_load.py in its quick mode: the three ways of serving run and answer every request."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from benchmarks import server_load  # noqa: E402


def test_quick_run_serves_every_request_three_ways() -> None:
    results = server_load.run(quick=True, log=lambda line: None)
    for kind in ("classify", "generate"):
        row = results[kind]
        for key in ("server", "server_batch1", "loop", "server_vs_loop", "server_vs_batch1", "server_vs_loop_cpu",
                    "mean_batch"):
            assert math.isfinite(row[key]) and row[key] > 0, (kind, key, row)
        assert set(row["per_cpu_second"]) == {"server", "server_batch1", "loop"}
        assert row["server_vs_loop"] == pytest.approx(row["server"] / row["loop"])  # one round: paired = plain
        assert 1 <= row["mean_batch"] <= 32
