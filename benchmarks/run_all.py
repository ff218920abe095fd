"""The whole benchmark suite in one command: deltakit and PEFT side by side.

Sections (each also runnable alone, see its module):

``train_step``  training-step time and peak memory (``benchmarks/train_step.py``, LoRA variants: frozen, peft,
                deltakit)
``inference``   unmerged and merged inference overhead (``benchmarks/inference.py``)
``injection``   LoRA injection time on meta-device Llama-7B / 70B shapes (``benchmarks/injection.py``)
``serving``     switching and mixed batches (``benchmarks/serving.py``)
``routing_crossover``  gather vs segment routing across distinct deltas per batch (``benchmarks/routing_crossover.py``)
``checkpoint``  checkpoint bytes on disk (``benchmarks/checkpoint_size.py``)
``dora``        DoRA training step: frozen, LoRA, deltakit DoRA, PEFT DoRA (``benchmarks/dora.py``)
``ia3``         (IA)^3 training step vs frozen and PEFT IA3, mixed batches of 8 deltas (``benchmarks/ia3.py``)

Everything timed runs interleaved in one process, one torch thread, with medians and paired per-round ratios on
the CPU clock. Writes ``suite.json``, ``suite.md`` and ``suite_*.png`` plots to ``--output-dir`` (default
``benchmarks/results``); ``--quick`` (tiny models, a few rounds; well under a minute of CPU time) writes
``suite_quick.*`` instead, and is what the tests run.

Examples::

    python benchmarks/run_all.py                    # everything, ~15-20 minutes on a busy 2-core machine
    python benchmarks/run_all.py --quick            # smoke run
    python -m benchmarks --sections serving,checkpoint
    python benchmarks/run_all.py --render benchmarks/results/suite.json   # redraw report and plots only
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from benchmarks import common, suite_utils  # noqa: E402

SECTIONS: tuple[str, ...] = ("train_step", "inference", "injection", "serving", "routing_crossover", "checkpoint",
                             "many_deltas", "dora", "ia3")
DEFAULT_OUTPUT_DIR = _REPO_ROOT / "benchmarks" / "results"
BUSY_NOTE = (
    "Measured on a shared 2-core machine while other work ran on it: wall times are inflated and noisy; the CPU "
    "clock and the paired per-round ratios are the figures to read."
)

Table = tuple[str, list[str], list[list[Any]]]


# --------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------


def _train_step(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from benchmarks import train_step

    argv = ["--variants", "frozen,peft,deltakit", "--quiet"]
    if quick:
        argv += ["--quick", "--models", "tiny-bert", "--rounds", "3", "--warmup", "1", "--memory-steps", "1"]
    args = train_step.parse_args(argv)
    args.argv = argv
    log("train_step: " + " ".join(argv))
    return train_step.run_benchmark(args)


def _inference(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from benchmarks import inference

    return inference.run(quick, log=log)


def _injection(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from benchmarks import injection

    return injection.run(quick, log=log)


def _serving(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from benchmarks import serving

    return serving.run(quick, log=log)


def _routing_crossover(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from benchmarks import routing_crossover

    return routing_crossover.run(quick, log=log)


def _checkpoint(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from benchmarks import checkpoint_size

    return checkpoint_size.run(quick, log=log)


def _many_deltas(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from benchmarks import many_deltas

    return many_deltas.run(quick, log=log)


def _dora(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from benchmarks import dora

    return dora.run(quick, log=log)


def _ia3(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from benchmarks import ia3

    return ia3.run(quick, log=log)


RUNNERS: dict[str, Callable[[bool, Callable[[str], None]], dict[str, Any]]] = {
    "train_step": _train_step, "inference": _inference, "injection": _injection, "serving": _serving,
    "routing_crossover": _routing_crossover, "checkpoint": _checkpoint, "many_deltas": _many_deltas,
    "dora": _dora, "ia3": _ia3,
}


# --------------------------------------------------------------------------
# Summary and tables
# --------------------------------------------------------------------------


def _get(data: Any, *keys: Any) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.{digits}f}"
    return "-"


def _verdict(value: Any, bound: float, higher_is_better: bool = False) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    return "yes" if (value >= bound if higher_is_better else value <= bound) else "NO"


def summary_rows(results: dict[str, Any]) -> list[list[str]]:
    """One row per headline figure: what, deltakit, PEFT (same run), target, met."""
    s = results["sections"]
    rows: list[list[str]] = []
    ts = s.get("train_step")
    if ts:
        for model, section in ts.get("models", {}).items():
            r = section.get("ratios", {})
            dk, pf = _get(r, "deltakit/frozen", "median"), _get(r, "peft/frozen", "median")
            paired = _get(r, "deltakit/peft", "median")
            rows.append([f"train step / frozen ({model})", _fmt(dk), _fmt(pf), "deltakit/peft <= 1.00",
                         _verdict(paired, 1.0) + f" ({_fmt(paired)})"])
            mem = section.get("memory_ratios", {})
            dkm, pfm = _get(mem, "deltakit/frozen", "train_peak"), _get(mem, "peft/frozen", "train_peak")
            rows.append([f"train-step peak memory / frozen ({model})", _fmt(dkm), _fmt(pfm), "<= peft",
                         _verdict(dkm, pfm or math.nan)])
    inf = s.get("inference")
    if inf:
        for batch, e in inf["batches"].items():
            r = e["ratios"]
            dk, pf = _get(r, "deltakit/base", "median"), _get(r, "peft/base", "median")
            rows.append([f"unmerged inference / base (batch {batch} x {inf['seq_len']})", _fmt(dk), _fmt(pf),
                         "<= peft", _verdict(dk, pf or math.nan)])
            dkm, pfm = _get(r, "deltakit_merged/base", "median"), _get(r, "peft_merged/base", "median")
            rows.append([f"merged inference / base (batch {batch})", _fmt(dkm), _fmt(pfm), "<= 1.01",
                         _verdict(dkm, 1.01)])
            control = _get(r, "base_copy/base", "median")
            if control is not None:
                dkc, pfc = _get(r, "deltakit_merged/base_copy", "median"), _get(r, "peft_merged/base_copy", "median")
                rows.append([f"merged inference / an unmerged copy of the base (batch {batch}; copy/base {_fmt(control)})",
                             _fmt(dkc), _fmt(pfc), "<= 1.01", _verdict(dkc, 1.01)])
    inj = s.get("injection")
    if inj:
        for shape, e in inj["shapes"].items():
            dk, pf = _get(e, "time", "deltakit", "median"), _get(e, "time", "peft", "median")
            low = _get(e, "time", "peft_low_mem", "median")
            target = e.get("target_s")
            rows.append([f"LoRA r=16 injection, s ({shape}, {e['sites']} sites)", _fmt(dk), f"{_fmt(pf)} ({_fmt(low)} low mem)",
                         f"<= {target}" if target else "-", _verdict(dk, target) if target else "-"])
            rows.append([f"LoRA parameters = analytic ({shape})", str(e["params_match"].get("deltakit")),
                         str(e["params_match"].get("peft")), "True", "yes" if all(e["params_match"].values()) else "NO"])
    srv = s.get("serving")
    if srv:
        sw = srv["switch"]
        dk, pf = sw["per_switch_ms"]["deltakit_switch"], sw["per_switch_ms"]["peft_set_adapter"]
        rows.append([f"switch, ms ({sw['sites']} sites, {sw['deltas']} deltas)", _fmt(dk, 4),
                     f"{_fmt(pf, 3)} set_adapter, {_fmt(sw['per_switch_ms']['peft_disable_adapter'], 3)} disable",
                     f"<= {serving_target('switch_ms')}", _verdict(dk, serving_target("switch_ms"))])
        m = srv["mixed"]
        dk, pf = _get(m, "ratios", "deltakit_mixed/deltakit_single", "median"), _get(m, "ratios", "peft_mixed/peft_single", "median")
        rows.append([f"mixed batch / one delta ({m['deltas']} deltas, batch {m['batch']} x {m['seq']})", _fmt(dk), _fmt(pf),
                     f"<= {serving_target('mixed/single')}", _verdict(dk, serving_target("mixed/single"))])
        points = m["vs_deltas"]["points"]
        last = points[-1]
        ratio = _get(last, "throughput_deltakit/peft", "median")
        rows.append([f"mixed-batch throughput, samples/s ({last['deltas']} deltas, batch {m['vs_deltas']['batch']} x "
                     f"{m['vs_deltas']['seq']}, q,v; sweep)",
                     _fmt(last["deltakit_samples_per_s"], 1), _fmt(last["peft_samples_per_s"], 1),
                     f">= {serving_target('mixed_throughput_vs_peft_at_32')}x peft",
                     _verdict(ratio, serving_target("mixed_throughput_vs_peft_at_32"), higher_is_better=True)
                     + f" ({_fmt(ratio, 2)}x)"])
        st = srv.get("settings")
        for pt in (st or {}).get("points", []):
            ratio = _get(pt, "ratios", "peft/deltakit", "median")
            ceiling = _get(pt, "ratios", "peft/base", "median")
            step = f"prefill {pt['tokens_per_sample']} tokens" if pt["step"] == "prefill" else "decode step"
            rows.append([f"mixed-batch throughput, samples/s ({st['deltas']} deltas, batch {st['batch']}, "
                         f"{pt['targets']} {pt['sites']} sites, {step})",
                         _fmt(pt["samples_per_s"]["deltakit"], 1), _fmt(pt["samples_per_s"]["peft"], 1),
                         f">= {serving_target('mixed_throughput_vs_peft_at_32')}x peft (ceiling {_fmt(ceiling, 2)}x)",
                         _verdict(ratio, serving_target("mixed_throughput_vs_peft_at_32"), higher_is_better=True)
                         + f" ({_fmt(ratio, 2)}x)"])
    ck = s.get("checkpoint")
    if ck:
        for scenario, e in ck["scenarios"].items():
            d, p = e["deltakit"], e["peft"]
            rows.append([f"checkpoint bytes over raw tensors (LoRA {scenario}, {d['tensors']} tensors)",
                         str(d["overhead_bytes"]), str(p["overhead_bytes"]), f"<= {d['bound_bytes']}",
                         _verdict(d["overhead_bytes"], d["bound_bytes"])])
    if s.get("dora"):
        from benchmarks import dora

        rows += dora.summary_rows(s["dora"])
    if s.get("ia3"):
        from benchmarks import ia3

        rows += ia3.summary_rows(s["ia3"])
    return rows


def serving_target(key: str) -> float:
    """A target of the serving section (see ``benchmarks/serving.py``)."""
    from benchmarks import serving

    return serving.TARGETS[key]


def section_tables(results: dict[str, Any]) -> list[Table]:
    """Every section's detailed tables."""
    from benchmarks import checkpoint_size, inference, injection, serving, train_step

    s = results["sections"]
    tables: list[Table] = []
    if "train_step" in s:
        tables += [(f"Training step: {title}", headers, rows) for title, headers, rows in train_step.result_tables(s["train_step"])]
    if "inference" in s:
        tables.append((f"Inference, eval + no_grad, {s['inference']['model']} (paired median ratios, CPU clock)",
                       *inference.table(s["inference"])))
    if "injection" in s:
        tables.append(("LoRA r=16 injection on meta-device models (CPU clock, medians)", *injection.table(s["injection"])))
    if "serving" in s:
        tables += serving.tables(s["serving"])
    if "routing_crossover" in s:
        from benchmarks import routing_crossover

        tables.append(("Gather vs segment routing: time segment / gather by distinct deltas per batch (* where auto "
                       "takes segment; CPU clock, paired medians)", *routing_crossover.table(s["routing_crossover"])))
    if "checkpoint" in s:
        tables.append((f"Checkpoint size ({s['checkpoint']['model']})", *checkpoint_size.table(s["checkpoint"])))
    if "many_deltas" in s:
        from benchmarks import many_deltas

        tables.append(("Many deltas: a store, a bounded active set, mixed batches (deltakit vs PEFT)",
                       *many_deltas.table(s["many_deltas"])))
    if "dora" in s:
        from benchmarks import dora

        tables.append(("DoRA training step: frozen, LoRA, deltakit DoRA, PEFT DoRA (CPU clock, paired medians)",
                       *dora.table(s["dora"])))
    if "ia3" in s:
        from benchmarks import ia3

        tables.append(("(IA)^3: training step vs frozen and PEFT, mixed batches (CPU clock, paired medians)",
                       *ia3.table(s["ia3"])))
    return tables


def render_markdown(results: dict[str, Any], plots: Sequence[str]) -> str:
    """The suite's markdown report: summary, notes, every section's tables, the plots."""
    env = results["environment"]
    lines = [
        "# deltakit benchmark suite" + (" (quick mode: tiny models, not representative)" if results["quick"] else ""),
        "",
        f"Generated {results['generated']} by `{results['command']}` in {results['wall_time_s']:.0f} s wall "
        f"({results['cpu_time_s']:.0f} s CPU).",
        "",
        f"CPU: {env.get('cpu_model')} ({env.get('cpu_count')} CPUs), torch {env.get('torch')}, transformers "
        f"{env.get('transformers')}, peft {env.get('peft')}, 1 torch thread, CPU clock, medians of interleaved rounds.",
        "",
        f"> {BUSY_NOTE}",
        "",
        "## Summary",
        "",
        common.markdown_table(["figure", "deltakit", "peft (same run)", "target", "met"], summary_rows(results)),
    ]
    notes = results["notes"]
    if notes or results["errors"]:
        lines += ["## Notes and failed checks", ""]
        lines += [f"- {note}" for note in notes]
        lines += [f"- section `{name}` failed: {err.splitlines()[-1]}" for name, err in results["errors"].items()]
        lines.append("")
    for title, headers, rows in section_tables(results):
        lines += [f"## {title}", "", common.markdown_table(headers, rows)]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------


def draw_plots(results: dict[str, Any], output_dir: Path, prefix: str) -> list[str]:
    """Draw one PNG per section that has something to plot.

    Returns:
        The written paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["sections"]
    written: list[str] = []
    tag = " (quick mode)" if results["quick"] else ""

    def save(fig: Any, name: str) -> None:
        path = output_dir / f"{prefix}_{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))

    if "serving" in s:
        v = s["serving"]["mixed"]["vs_deltas"]
        xs = [p["deltas"] for p in v["points"]]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, [p["deltakit_samples_per_s"] for p in v["points"]], "o-", label="deltakit route()")
        ax.plot(xs, [p["peft_samples_per_s"] for p in v["points"]], "s-", label="PEFT adapter_names=")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("distinct deltas in the batch")
        ax.set_ylabel("samples / CPU second")
        ax.set_ylim(bottom=0)
        ax.set_title(f"Mixed-batch throughput, batch {v['batch']} x {v['seq']}{tag}")
        ax.legend()
        ax.grid(alpha=0.3)
        save(fig, "mixed_throughput")

        sweep = s["serving"]["switch"]["vs_sites"]
        sites = [p["sites"] for p in sweep]
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label, marker in (("deltakit_switch", "deltakit switch()", "o-"),
                                   ("peft_set_adapter", "PEFT set_adapter()", "s-"),
                                   ("peft_disable_adapter", "PEFT disable_adapter() enter+exit", "^-")):
            ax.plot(sites, [p["per_switch_ms"][key] for p in sweep], marker, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("sites per delta (8 deltas loaded)")
        ax.set_ylabel("ms per switch (CPU)")
        ax.set_title(f"Switching the active delta{tag}")
        ax.legend()
        ax.grid(alpha=0.3, which="both")
        save(fig, "switch_vs_sites")

    if "routing_crossover" in s:
        from benchmarks import routing_crossover

        path = output_dir / f"{prefix}_routing_crossover.png"
        written.append(str(routing_crossover.plot(s["routing_crossover"], path, tag)))

    if "inference" in s:
        inf = s["inference"]
        keys = [("deltakit/base", "deltakit"), ("peft/base", "PEFT"), ("deltakit_merged/base", "deltakit merged"),
                ("peft_merged/base", "PEFT merged")]
        batches = list(inf["batches"])
        fig, ax = plt.subplots(figsize=(6, 4))
        width = 0.8 / len(keys)
        for i, (key, label) in enumerate(keys):
            values = [_get(inf["batches"][b], "ratios", key, "median") or 0.0 for b in batches]
            ax.bar([j + i * width for j in range(len(batches))], values, width, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + width * (len(keys) - 1) / 2 for j in range(len(batches))],
                      [f"batch {b} x {inf['seq_len']}" for b in batches])
        ax.set_ylabel("time / base model")
        ax.set_ylim(bottom=0.8)
        ax.set_title(f"LoRA r=16 on all linear layers, inference{tag}")
        ax.legend()
        save(fig, "inference_overhead")

    if "injection" in s:
        inj = s["injection"]
        shapes = list(inj["shapes"])
        keys = [("deltakit", "deltakit"), ("peft", "PEFT"), ("peft_low_mem", "PEFT low_cpu_mem_usage")]
        fig, ax = plt.subplots(figsize=(6, 4))
        width = 0.8 / len(keys)
        for i, (key, label) in enumerate(keys):
            values = [_get(inj["shapes"][sh], "time", key, "median") or 0.0 for sh in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], values, width, label=label)
        ax.set_xticks([j + width for j in range(len(shapes))], shapes)
        ax.set_yscale("log")
        ax.set_ylabel("seconds (CPU)")
        ax.set_title(f"LoRA r=16 on all linear layers, meta device{tag}")
        ax.legend()
        save(fig, "injection")
    return written


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Run every deltakit benchmark against PEFT.")
    parser.add_argument("--quick", action="store_true", help="tiny models, few rounds (the tests run this)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="where JSON, markdown, PNGs go")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--train-step-json", type=Path, metavar="JSON",
                        help="do not run the train_step section: include this earlier train_step.py result instead "
                             "(reported as such)")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="measure nothing: redraw the markdown report and the plots of an earlier run's JSON")
    args = parser.parse_args(argv)
    args.sections = [p.strip() for p in args.sections.split(",") if p.strip()]
    for name in args.sections:
        if name not in SECTIONS:
            parser.error(f"unknown section {name!r}; known: {', '.join(SECTIONS)}")
    return args


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Run the selected sections; a failing section is recorded (with its traceback) and the others still run."""
    log = suite_utils.log_to_stderr(not args.quiet)
    common.configure_threads(1)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    results: dict[str, Any] = {
        "suite": "deltakit-vs-peft",
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["python benchmarks/run_all.py", *argv]),
        "quick": args.quick,
        "machine_note": BUSY_NOTE,
        "environment": common.environment_info(),
        "sections": {},
        "section_time_s": {},
        "notes": [],
        "errors": {},
    }
    for name in args.sections:
        t0 = time.perf_counter()
        try:
            if name == "train_step" and args.train_step_json is not None:
                import json

                section = json.loads(args.train_step_json.read_text(encoding="utf-8"))
                results["notes"].append(
                    f"train_step: not re-run; figures from {args.train_step_json} ({section.get('generated')}, "
                    f"`{section.get('command')}`)"
                )
            else:
                section = RUNNERS[name](args.quick, log)
        except Exception:  # noqa: BLE001 - record and go on; the exit code reports it
            results["errors"][name] = traceback.format_exc()
            log(f"section {name} FAILED:\n{results['errors'][name]}")
            continue
        finally:
            common.configure_threads(1)
            results["section_time_s"][name] = time.perf_counter() - t0
        results["sections"][name] = section
        results["notes"] += [f"{name}: {note}" for note in section.get("notes", [])]
        if name == "train_step":
            for model, sec in section.get("models", {}).items():
                for variant, entry in sec.get("variants", {}).items():
                    results["notes"] += [f"train_step {model}/{variant}: {n}" for n in entry.get("notes", [])]
    results["wall_time_s"] = time.perf_counter() - start_wall
    results["cpu_time_s"] = time.process_time() - start_cpu
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite, write ``<prefix>.json``, ``<prefix>.md`` and plots; exit 1 if a section failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.render is not None:
        import json

        results = json.loads(args.render.read_text(encoding="utf-8"))
        args.quick = bool(results["quick"])
    else:
        results = run(args, argv)
    prefix = "suite_quick" if args.quick else "suite"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    plots = [] if args.no_plots else draw_plots(results, args.output_dir, prefix)
    results["plots"] = [os.path.basename(p) for p in plots]
    common.write_json(args.output_dir / f"{prefix}.json", results)
    common.write_text(args.output_dir / f"{prefix}.md", render_markdown(results, plots))
    common.print_rich_table("deltakit vs PEFT: summary", ["figure", "deltakit", "peft", "target", "met"],
                            summary_rows(results))
    for name, err in results["errors"].items():
        print(f"section {name} failed: {err.strip().splitlines()[-1]}", file=sys.stderr)
    print(f"wrote {args.output_dir / prefix}.json, .md and {len(plots)} plots "
          f"({results['wall_time_s']:.0f} s wall, {results['cpu_time_s']:.0f} s CPU)")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
