"""examples/structure_search.py --tiny: every kind of run appears, structures fit their budgets, the figure and the
tables are written, and a tiny run never replaces the README's figure."""

from __future__ import annotations

import json

import pytest

from tests.helpers import REPO_ROOT, load_script

EXAMPLE = REPO_ROOT / "examples" / "structure_search.py"


@pytest.fixture(scope="module")
def ss():
    return load_script(EXAMPLE, "structure_search")


@pytest.fixture(scope="module")
def tiny_run(ss, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("structure_search")
    code = ss.main(["--tiny", "--quiet", "--plot", str(tmp / "s.png"), "--json", str(tmp / "s.json"),
                    "--markdown", str(tmp / "s.md")])  # fmt: skip
    return code, tmp, json.loads((tmp / "s.json").read_text())


def test_tiny_run_exits_0_and_writes_figure_and_tables(tiny_run) -> None:
    code, tmp, data = tiny_run
    assert code == 0
    assert (tmp / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| searched structure |" in (tmp / "s.md").read_text()
    assert "summary" in data and data["tiny"] is True


def test_every_kind_runs_at_every_budget(ss, tiny_run) -> None:
    _, _, data = tiny_run
    budgets = ss.MODES["tiny"]["budgets"]
    kinds = {(r["kind"], r["budget"]) for r in data["runs"]}
    assert {("full", None), ("probe", None)} <= kinds
    for budget in budgets:
        assert {("random", budget), ("searched", budget)} <= kinds
    assert sum(r["kind"] == "random" for r in data["runs"]) == 2 * len(budgets)
    for row in data["runs"]:
        assert 0.0 <= row["heldout_accuracy"] <= 1.0
        if row["kind"] in ("random", "searched"):
            assert 0 < row["parameters"] <= row["budget"], row


def test_searched_rows_record_the_structure_and_its_cost(tiny_run) -> None:
    _, _, data = tiny_run
    for row in (r for r in data["runs"] if r["kind"] == "searched"):
        assert sum(row["structure"].values()) == row["parameters"]
        assert row["modules"] and row["search_seconds"] > 0


def test_a_tiny_run_never_replaces_the_readme_figure(ss, tmp_path, monkeypatch) -> None:
    figure = tmp_path / "docs_structure_search.png"
    monkeypatch.setattr(ss, "DEFAULT_PLOT", figure)
    assert ss.main(["--tiny", "--quiet", "--budgets", "0", "--random", "1"]) == 0
    assert not figure.exists()


@pytest.mark.parametrize("argv", [["--budgets", "7"], ["--steps", "0"], ["--seeds", "0"]])
def test_bad_arguments_exit_2(ss, argv) -> None:
    with pytest.raises(SystemExit) as info:
        ss.main(["--tiny", *argv])
    assert info.value.code == 2


def test_reuse_repeats_only_the_kinds_asked_for(ss, tiny_run, tmp_path) -> None:
    _, tmp, first = tiny_run
    out = tmp_path / "again.json"
    assert ss.main(["--tiny", "--quiet", "--plot", str(tmp_path / "a.png"), "--json", str(out),
                    "--reuse", str(tmp / "s.json"), "--rerun", "searched"]) == 0  # fmt: skip
    again = json.loads(out.read_text())["runs"]
    assert len(again) == len(first["runs"])
    for old, new in zip(first["runs"], again):
        if old["kind"] != "searched":
            assert new == old  # taken over, not trained again
        else:
            assert new["search_seconds"] != old["search_seconds"]  # run again
