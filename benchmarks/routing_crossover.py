"""Gather or segment: where per-sample routing should switch paths, measured against the automatic choice.

``DeltaGroup.route(names, path=...)`` applies each row's LoRA either by *gather* (each row's factors copied out of a
stack of every active delta, ranks padded to the widest, one batched matmul for all rows) or by *segment* (rows
grouped by delta, two GEMMs per delta at its own rank). ``path="auto"`` takes the segmented path when
``segments * SEGMENT_COST <= routed rows * elements of one slot`` (``deltakit.routing.SEGMENT_COST``) on a call that
gathers afresh, and on a later call of a block whose gathered factors are kept when ``(segments - 1) *
KEPT_SEGMENT_COST <= rows * elements of one slot - elements of the present deltas`` (rows sorted by delta, as here;
unsorted rows are charged every segment). This benchmark times both paths and ``auto`` across the number of
distinct deltas in a batch and marks where ``auto`` switches.

Setting: a stack of ``layers`` bias-free ``Linear(hidden, hidden)`` modules, each one routed LoRA site (so the
figure is the routing of a layer, not diluted by attention or an LM head), with ``deltas`` LoRAs in a
``DeltaGroup`` (ranks 8, or 64, or 8/16/32/64 in turn: ``mixed``), every delta materialised. A batch of ``batch``
rows, each of ``tokens`` tokens (1: a decode step; 16: a short prefill), with ``d`` distinct deltas (1, 2, 4, ...,
32), ``batch / d`` rows each, rows sorted by delta (as the example server sends them). Variants, each timed forward
in its own ``route()`` block (opening and closing the block untimed: its cost is the same for both paths):

* ``gather``: ``path="gather"``, the block's first forward (the factors are copied at this call);
* ``segment``: ``path="segment"``, the block's first forward (the rows' segments are found at this call);
* ``auto``: ``path="auto"``, the block's first forward;
* ``gather_later``, ``segment_later``, ``auto_later`` (decode only): the same paths, the timed forward being the
  third of its block, as ``generate()``'s decoding steps from the second on: the gather path then reuses the
  gathered factors (kept from the second call with the same rows), the segmented path its segments.

The first two are what a classification request, a prefill and a first decoding step cost; the last two, the other
decoding steps. Interleaved rounds (order rotated), one torch thread, CPU clock, medians; ``segment / gather`` and
``segment_later / gather_later`` are medians of per-round ratios (below 1: segment is faster). Before timing, every
cell checks that both paths give the same output (to float32 rounding) and records which path ``auto`` takes on a
first and on a later call (by the rules above, checked against the routers' own counts). ``auto_vs_best`` is the
median over rounds of ``auto``'s time over the faster of gather and segment in that round, on first and later
calls, as run and as the rules' choices timed on the forced paths (``*_choice``); ``later_old_rule`` is the same
for the rule before kept factors were counted (the first call's rule on every call), computed from the timed path
that rule would take (on a later call that is exactly the code it ran).

Run::

    python benchmarks/routing_crossover.py                       # ~8 minutes on the busy 2-core machine
    python benchmarks/routing_crossover.py --plot docs/serving_crossover.png
    python benchmarks/routing_crossover.py --quick               # seconds (what the tests run)
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks import common, suite_utils  # noqa: E402

RANKS: dict[str, tuple[int, ...]] = {"r=8": (8,), "r=64": (64,), "mixed 8-64": (8, 16, 32, 64)}
FULL = dict(hidden=(256, 1024, 4096), layers=2, deltas=32, batch=32, distinct=(1, 2, 4, 8, 16, 32),
            ranks=RANKS, steps=(("decode", 1, (256, 1024, 4096)), ("prefill", 16, (1024,))), rounds=11, warmup=2)
#: (numerator, denominator) variants of the reported ratios.
PAIRS = (("segment", "gather"), ("segment_later", "gather_later"))
#: auto_vs_best keys: (auto's variant, the two paths' variants).
AUTO_VS_BEST = {"first": ("auto", "gather", "segment"), "later": ("auto_later", "gather_later", "segment_later")}
QUICK = dict(hidden=(32,), layers=2, deltas=8, batch=8, distinct=(1, 8), ranks={"r=2": (2,), "mixed 2-8": (2, 8)},
             steps=(("decode", 1, (32,)),), rounds=2, warmup=1)


class LinearStack(nn.Module):
    """``layers`` bias-free square Linear modules in a row: the routed sites, and nothing else."""

    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def build(hidden: int, layers: int, deltas: int, ranks: Sequence[int]) -> tuple[nn.Module, Any, list[str]]:
    """The stack and a :class:`deltakit.DeltaGroup` of ``deltas`` random LoRAs (ranks ``ranks`` in turn) on every
    layer, all detached (the group routes them)."""
    import deltakit

    torch.manual_seed(0)
    model = LinearStack(hidden, layers).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.weight.mul_(3.0)  # keeps activations of order 1 through the stack (default init shrinks them)
    group = deltakit.DeltaGroup(model)
    generator = torch.Generator().manual_seed(1)
    names = [f"d{i}" for i in range(deltas)]
    for i, name in enumerate(names):
        r = ranks[i % len(ranks)]
        delta = deltakit.LoraModel(model, lora_r=r, lora_alpha=2 * r, modified_modules=[r"[r]layers\.\d+"],
                                   name=name)
        with torch.no_grad():
            for p in delta.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
        delta.detach()
        group.add(delta)
    return model, group, names


def batch_names(names: Sequence[str], batch: int, distinct: int) -> list[str]:
    """``batch`` rows over the first ``distinct`` deltas, ``batch // distinct`` rows each, sorted by delta."""
    return [names[i * distinct // batch] for i in range(batch)]


def auto_takes_segment(group: Any, rows: list[str], later: bool = False) -> bool:
    """The path ``route(path="auto")`` takes on this batch by the rules of ``deltakit.routing`` (every row is routed,
    the rows are sorted, so the segments are the distinct deltas; a slot holds the widest delta's factors), on a
    block's first call or (``later``) on a later one whose gathered factors are kept."""
    from deltakit import routing

    def elems(name: str) -> int:
        return sum(p.numel() for site in group[name].sites if site.name == "layers.0" for p in site.module.parameters())

    slot = max(elems(name) for name in group.names)
    if later:
        present = sum(elems(name) for name in set(rows))
        return (len(set(rows)) - 1) * routing.KEPT_SEGMENT_COST <= len(rows) * slot - present  # rows sorted
    return len(set(rows)) * routing.SEGMENT_COST <= len(rows) * slot


def observed_auto(group: Any, model: nn.Module, x: torch.Tensor, rows: list[str]) -> tuple[str, str]:
    """The path ``auto`` took on the first and on the third call of one block, from the routers' counts (``mixed``
    if the routed layers disagreed)."""
    taken = []
    with torch.inference_mode(), group.route(rows):
        for _ in range(3):
            before = {k: sum(r.calls[k] for r in group._routers) for k in ("gather", "segment")}
            model(x)
            after = {k: sum(r.calls[k] for r in group._routers) for k in ("gather", "segment")}
            used = [k for k in after if after[k] > before[k]]
            taken.append(used[0] if len(used) == 1 else "mixed")
    return taken[0], taken[2]


def _timed_forward(group: Any, model: nn.Module, x: torch.Tensor, rows: list[str], variant: str) -> dict[str, float]:
    """One forward in its own route() block (the first, or the third for ``*_later``); only it is timed."""
    path = variant.removesuffix("_later")
    later = variant.endswith("_later")
    gc.collect()
    with torch.inference_mode(), group.route(rows, path=path, gather_cache_mb=256 if later else 0):
        if later:
            model(x)
            model(x)  # from this second call with the same rows on, the gather path keeps the gathered factors
        return common.time_call(lambda: model(x))


def measure_cell(group: Any, model: nn.Module, x: torch.Tensor, rows: list[str], variants: Sequence[str],
                 rounds: int, warmup: int) -> dict[str, Any]:
    """Interleaved rounds of the variants on one batch; medians (ms, CPU clock) and the paired ratios of
    :data:`PAIRS`."""
    samples: dict[str, list[float]] = {v: [] for v in variants}
    for index in range(warmup + rounds):
        for variant in common.rotated_order(list(variants), index):
            t = _timed_forward(group, model, x, rows, variant)["cpu"]
            if index >= warmup:
                samples[variant].append(t)
    paths = {v: s for v, s in samples.items() if not v.startswith("auto")}
    out: dict[str, Any] = {"ms": {v: common.summarize(s)["median"] * 1e3 for v, s in paths.items()}, "ratios": {},
                           "auto_ms": {}, "rounds": samples}
    for num, den in PAIRS:
        if num in samples and den in samples:
            summary = common.paired_ratio(samples[num], samples[den])
            summary.pop("ratios", None)
            out["ratios"][f"{num}/{den}"] = summary
    for call, (auto, *_) in AUTO_VS_BEST.items():
        if auto in samples:
            out["auto_ms"][call] = common.summarize(samples[auto])["median"] * 1e3
    return out


def auto_vs_best(samples: dict[str, list[float]], choices: dict[str, str]) -> dict[str, float]:
    """Per call kind, the median over rounds of the time of the path taken over the faster path of that round:
    ``auto`` as run (``first``, ``later``: one call timed in a fresh block, so it also carries what the block's
    earlier calls left warm, e.g. after a segmented first call the third is gather's second use of its factors), the
    rules' choices timed as the forced paths (``first_choice``, ``later_choice``), and the old rule's choice on later
    calls (``later_old_rule``: the first call's path, on a later call). ``choices``: the path each rule takes."""
    out = {}
    taken = {"first": "auto", "later": "auto_later", "first_choice": choices["first"]}
    if "later" in choices:
        taken |= {"later_choice": choices["later"] + "_later", "later_old_rule": choices["first"] + "_later"}
    for call, variant in taken.items():
        _, gather, segment = AUTO_VS_BEST["later" if call.startswith("later") else "first"]
        if variant in samples and gather in samples:
            ratios = [t / min(g, s) for t, g, s in zip(samples[variant], samples[gather], samples[segment])]
            out[call] = common.summarize(ratios)["median"]
    return out


def _same_output(group: Any, model: nn.Module, x: torch.Tensor, rows: list[str]) -> float:
    """Largest difference between the two paths' outputs, relative to the output's largest magnitude."""
    outputs = []
    for path in ("gather", "segment"):
        with torch.inference_mode(), group.route(rows, path=path, gather_cache_mb=0):
            outputs.append(model(x))
    return float((outputs[0] - outputs[1]).abs().max() / outputs[1].abs().max().clamp_min(1e-30))


def crossover(points: Sequence[dict[str, Any]], key: str = "segment/gather") -> float | str:
    """Distinct deltas where the measured ratio first rises through 1 (interpolated in log2 of the count), or
    ``"segment"`` / ``"gather"`` when that path was faster at every count."""
    values = [(p["distinct"], p["ratios"][key]["median"]) for p in points]
    for (d0, r0), (d1, r1) in itertools.pairwise(values):
        if r0 < 1 <= r1:
            t = (1 - r0) / (r1 - r0)
            return 2 ** (math.log2(d0) + t * (math.log2(d1) - math.log2(d0)))
    return "segment" if values[-1][1] < 1 else "gather"


def auto_switch(points: Sequence[dict[str, Any]], key: str = "auto") -> int:
    """Most distinct deltas for which ``auto`` still takes the segmented path (0: it never does); ``key``:
    ``auto_later`` for later calls."""
    return max((p["distinct"] for p in points if p.get(key) == "segment"), default=0)


def _worst(points: Sequence[dict[str, Any]]) -> dict[str, float]:
    """auto's largest ratio to the faster path over the points, per call kind."""
    kinds = dict.fromkeys(k for p in points for k in p["auto_vs_best"])
    return {k: max(p["auto_vs_best"][k] for p in points if k in p["auto_vs_best"]) for k in kinds}


def _describe_auto(ratios: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())


def _measure_point(group: Any, model: nn.Module, x: torch.Tensor, rows: list[str], variants: Sequence[str],
                   spec: dict[str, Any], notes: list[str], where: str) -> dict[str, Any]:
    """One batch: the output check, the paths ``auto`` takes (rule and routers' counts agreeing), the timings."""
    diff = _same_output(group, model, x, rows)
    if not diff <= 1e-5:
        notes.append(f"{where}: gather and segment outputs differ by {diff:.2e} (relative)")
    choices = {"first": "segment" if auto_takes_segment(group, rows) else "gather"}
    later = "auto_later" in variants
    if later:
        choices["later"] = "segment" if auto_takes_segment(group, rows, later=True) else "gather"
    observed = dict(zip(("first", "later"), observed_auto(group, model, x, rows)))
    for call, path in choices.items():
        if observed[call] != path:
            notes.append(f"{where}: auto took {observed[call]} on the {call} call, the rule says {path}")
    cell = measure_cell(group, model, x, rows, variants, spec["rounds"], spec["warmup"])
    samples = cell.pop("rounds")
    cell.update(distinct=len(set(rows)), auto=choices["first"], max_rel_diff=diff,
                auto_vs_best=auto_vs_best(samples, choices))
    if later:
        cell["auto_later"] = choices["later"]
    return cell


def _describe_crossover(value: float | str) -> str:
    return f"{value:.1f}" if isinstance(value, float) else f"none: {value} faster throughout"


def run(quick: bool = False, log: Callable[[str], None] = lambda line: None,
        hidden: Sequence[int] | None = None) -> dict[str, Any]:
    """Every (step, hidden size, ranks) series over the distinct-delta counts; see the module docstring.
    ``hidden``: only these hidden sizes (of the full or quick set)."""
    from deltakit.routing import KEPT_SEGMENT_COST, SEGMENT_COST

    spec = dict(QUICK if quick else FULL)
    if hidden is not None:
        spec["steps"] = tuple((step, tokens, tuple(h for h in sizes if h in hidden))
                              for step, tokens, sizes in spec["steps"])
        spec["hidden"] = tuple(h for h in spec["hidden"] if h in hidden)
    common.configure_threads(1)
    with suite_utils.frozen_gc():  # the gc.collect() before each timed call then skips the long-lived objects
        series, notes = _measure(spec, log)
    return dict(config={k: v for k, v in spec.items() if k not in ("ranks", "steps")} | {
        "ranks": {k: list(v) for k, v in spec["ranks"].items()},
        "steps": [[s, t, list(h)] for s, t, h in spec["steps"]]}, segment_cost=SEGMENT_COST,
        kept_segment_cost=KEPT_SEGMENT_COST, series=series, auto_worst=_worst_of(series), notes=notes)


def _worst_of(series: Sequence[dict[str, Any]]) -> dict[str, float]:
    """auto's largest ratio to the faster path over every series, per call kind (see :func:`auto_vs_best`)."""
    out: dict[str, float] = {}
    for s in series:
        for kind, value in s["auto_worst"].items():
            out[kind] = max(out.get(kind, 0.0), value)
    return out


def _measure(spec: dict[str, Any], log: Callable[[str], None]) -> tuple[list[dict[str, Any]], list[str]]:
    """Every series of ``spec`` (a fresh stack and group per hidden size and ranks); the notes of failed checks."""
    series: list[dict[str, Any]] = []
    notes: list[str] = []
    for step, tokens, hiddens in spec["steps"]:
        for hidden in hiddens:
            for label, ranks in spec["ranks"].items():
                model, group, names = build(hidden, spec["layers"], spec["deltas"], ranks)
                x = torch.randn(spec["batch"], tokens, hidden, generator=torch.Generator().manual_seed(2))
                variants = ("gather", "segment", "auto") + (
                    ("gather_later", "segment_later", "auto_later") if tokens == 1 else ())
                points = []
                for distinct in spec["distinct"]:
                    rows = batch_names(names, spec["batch"], distinct)
                    points.append(_measure_point(group, model, x, rows, variants, spec, notes,
                                                 f"{step} hidden {hidden} {label} d={distinct}"))
                    cell = points[-1]
                    log(f"routing_crossover {step} h={hidden} {label} d={distinct}: gather "
                        f"{cell['ms']['gather']:.3f} ms, segment {cell['ms']['segment']:.3f} ms, segment/gather "
                        f"{cell['ratios']['segment/gather']['median']:.2f}, auto {cell['auto']} "
                        f"(later {cell.get('auto_later', '-')}), auto/best {_describe_auto(cell['auto_vs_best'])}")
                series.append(dict(step=step, tokens=tokens, hidden=hidden, ranks=label, points=points,
                                   measured_crossover=crossover(points), auto_segment_up_to=auto_switch(points),
                                   auto_worst=_worst(points)))
                if tokens == 1:
                    series[-1]["measured_crossover_later"] = crossover(points, "segment_later/gather_later")
                    series[-1]["auto_segment_up_to_later"] = auto_switch(points, "auto_later")
                del model, group
    return series, notes


def _rows_of(section: dict[str, Any]) -> list[tuple[str, dict[str, Any], str, str]]:
    """(label, series, ratio key, crossover key) for each line of the table and the figure."""
    out = []
    for s in section["series"]:
        first = "first forward" if s["step"] == "decode" else "forward"
        out.append((f"{s['step']} ({s['tokens']} tok), {first}", s, "segment/gather", "measured_crossover"))
        if "measured_crossover_later" in s:
            out.append((f"{s['step']} ({s['tokens']} tok), later steps", s, "segment_later/gather_later",
                        "measured_crossover_later"))
    return out


def _auto_key(key: str) -> str:
    """The point's key of the path ``auto`` takes for this ratio key (first or later calls)."""
    return "auto_later" if key.startswith("segment_later") else "auto"


def _auto_cell(s: dict[str, Any], key: str) -> str:
    """auto's worst ratio to the faster path on this row (and, for later calls, the old rule's)."""
    worst = s.get("auto_worst", {})
    if _auto_key(key) == "auto":
        return f"{worst['first']:.2f}; choice {worst['first_choice']:.2f}" if "first" in worst else "-"
    if "later" not in worst:
        return "-"
    return f"{worst['later']:.2f}; choice {worst['later_choice']:.2f}, old rule's {worst['later_old_rule']:.2f}"


def table(section: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per series and step: segment / gather per distinct count (starred where ``auto`` takes the segmented
    path), the measured crossover and the largest count for which ``auto`` takes the segmented path."""
    distinct = section["config"]["distinct"]
    headers = ["hidden, ranks, step", *[f"d={d}" for d in distinct], "measured crossover", "auto: segment up to",
               "auto / faster path, worst (as run; rule's choice)"]
    rows = []
    for label, s, key, cross in _rows_of(section):
        auto = _auto_key(key)
        cells = [f"{p['ratios'][key]['median']:.2f}" + ("*" if p.get(auto) == "segment" else "") for p in s["points"]]
        rows.append([f"{s['hidden']}, {s['ranks']}, {label}", *cells, _describe_crossover(s[cross]),
                     str(auto_switch(s["points"], auto) or "never"), _auto_cell(s, key)])
    return headers, rows


def plot(section: dict[str, Any], path: Path, title_suffix: str = "") -> Path:
    """segment / gather vs distinct deltas: one column per hidden size; top row a batch's first forward (prefill,
    classification, first decoding step), bottom row the later decoding steps. Filled markers where ``auto``
    takes the segmented path, open ones where it gathers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    hiddens = sorted({s["hidden"] for s in section["series"]})
    has_later = any("measured_crossover_later" in s for s in section["series"])
    n_rows = 2 if has_later else 1
    fig, axes = plt.subplots(n_rows, len(hiddens), figsize=(4.4 * len(hiddens), 3.6 * n_rows), squeeze=False,
                             sharey=True)
    colors = {label: f"C{i}" for i, label in enumerate(dict.fromkeys(s["ranks"] for s in section["series"]))}
    ticks = section["config"]["distinct"]
    for label, s, key, _ in _rows_of(section):
        row = 1 if key.startswith("segment_later") else 0
        ax = axes[row][hiddens.index(s["hidden"])]
        xs = [p["distinct"] for p in s["points"]]
        ys = [p["ratios"][key]["median"] for p in s["points"]]
        color = colors[s["ranks"]]
        ax.plot(xs, ys, "-" if s["step"] == "decode" else "--", color=color)
        for x, y, p in zip(xs, ys, s["points"]):
            taken = p.get(_auto_key(key))
            ax.plot([x], [y], "o", color=color, markerfacecolor=color if taken == "segment" else "white")
    for row in range(n_rows):
        for col, hidden in enumerate(hiddens):
            ax = axes[row][col]
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_yscale("log", base=2)
            ax.grid(alpha=0.3, which="both")
            what = "first forward of a batch" if row == 0 else "later decoding steps"
            ax.set_title(f"hidden {hidden}: {what}{title_suffix}", fontsize=10)
            if row == n_rows - 1:
                ax.set_xlabel(f"distinct deltas in a batch of {section['config']['batch']} rows")
        axes[row][0].set_ylabel("time segment / gather")
    handles = [Line2D([], [], color=c, label=f"LoRA {r}") for r, c in colors.items()]
    handles += [Line2D([], [], color="gray", linestyle="-", label="decode (1 token per row)"),
                Line2D([], [], color="gray", linestyle="--", label="prefill (16 tokens per row)"),
                Line2D([], [], color="gray", marker="o", linestyle="", label="auto takes segment"),
                Line2D([], [], color="gray", marker="o", markerfacecolor="white", linestyle="",
                       label="auto takes gather")]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"Per-sample LoRA routing: segment / gather (below 1: segment faster), "
                 f"{section['config']['layers']} routed Linear layers, one thread", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few rounds (the tests run this)")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    parser.add_argument("--plot", type=Path, help="draw the figure here (e.g. docs/serving_crossover.png)")
    parser.add_argument("--render", type=Path, metavar="JSON", help="measure nothing: plot an earlier --output")
    parser.add_argument("--hidden", type=int, nargs="+", help="only these hidden sizes (e.g. 256 1024)")
    args = parser.parse_args(argv)
    if args.render is not None:
        section = json.loads(args.render.read_text(encoding="utf-8"))
    else:
        section = run(args.quick, log=lambda line: print(line, file=sys.stderr, flush=True), hidden=args.hidden)
    if args.output:
        common.write_json(args.output, section)
    headers, rows = table(section)
    print(common.markdown_table(headers, rows))
    for kind, worst in section.get("auto_worst", {}).items():
        print(f"auto / faster path, worst over every cell, {kind} calls: {worst:.2f}")
    for note in section["notes"]:
        print("note:", note)
    if args.plot:
        print("wrote", plot(section, args.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
