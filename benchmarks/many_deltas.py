"""Many deltas on one backbone: a store of LoRAs, a bounded active set, mixed batches; deltakit vs PEFT.

Setting (the full run): 1,000 LoRA checkpoints on ``q_proj`` / ``v_proj`` of the ~130M Llama (hidden 768, 12
layers; ranks 8/16/32/64 in turn, random factors), written once under a temporary directory. Traffic: a fixed
sequence of requests, each naming a delta drawn uniformly or from a Zipf law (s = 1.1, delta ``k`` with weight
``1 / (k + 1)^s``), grouped in batches of 32 in arrival order. Two phases, each with its own request stream:
*prefill* (one forward of a 16-token prompt per request) and *decode* (``generate()`` of 4 greedy tokens after an
8-token prompt). Each phase first runs ``warmup`` batches untimed (the same requests for every system: they fill
the active set, so the timed batches measure the steady state, misses included), then times ``batches`` batches.
Each (system, ``max_active``, traffic) runs in its own process, so peak RSS is its own:

* ``deltakit``: ``DeltaGroup(model, max_active=m)`` with all 1,000 registered (config + header read only); each
  batch is one ``route()`` block (misses loaded on entry, least recently used dropped).
* ``peft``: a ``PeftModel``; before each batch the adapters it needs and lacks are loaded with ``load_adapter``
  after ``delete_adapter`` of the least recently used beyond ``m``; the batch runs with ``adapter_names=``.
* ``resident``: the bound where every delta stays materialised: the batches' deltas loaded before timing (no miss);
  its memory bound is computed (backbone + every delta's bytes), not allocated.

Reported per run: throughput (requests per wall second of the timed batches, loads included), p50/p99 batch
latency, the miss count and mean miss latency (deltakit: the group's own load timer; PEFT: ``load_adapter`` timed),
peak RSS against the bound *serving backbone* + ``m`` deltas of the mean size, where the serving backbone is the
peak RSS of the bare model after it served one batch of each phase (weights plus a batch's activations and the
math libraries' buffers: what any system serving this model holds). ``--quick`` runs a tiny Llama with 40 deltas
in seconds (what the tests run); ``--only zipf/64`` runs the matching (traffic/max_active) cells only.

Run::

    python benchmarks/many_deltas.py            # a few minutes on the 2-core machine (bounded request counts)
    python benchmarks/many_deltas.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from benchmarks import common  # noqa: E402

RANKS = (8, 16, 32, 64)
TARGETS = ("q_proj", "v_proj")
FULL = dict(config=dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                        num_attention_heads=12, num_key_value_heads=12),
            deltas=1000, batch=32, warmup=2, batches=6, prefill_len=16, prompt_len=8, new_tokens=4,
            max_active=(16, 64, 256), ranks=RANKS)
QUICK = dict(config=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4),
             deltas=40, batch=8, warmup=1, batches=2, prefill_len=8, prompt_len=4, new_tokens=2, max_active=(4,),
             ranks=(2, 4, 8, 16))
TRAFFIC = ("uniform", "zipf")
ZIPF_S = 1.1


def _llama(config: dict[str, int]) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**config, pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()


def write_store(root: Path, spec: dict[str, Any]) -> list[str]:
    """Write ``spec['deltas']`` deltakit checkpoints (once: an existing complete store is reused)."""
    import torch

    import deltakit

    names = [f"d{i}" for i in range(spec["deltas"])]
    if (root / "done").exists():
        return names
    model = _llama(spec["config"])
    generator = torch.Generator().manual_seed(1)
    for i, name in enumerate(names):
        r = spec["ranks"][i % len(spec["ranks"])]
        delta = deltakit.LoraModel(model, lora_r=r, lora_alpha=2 * r, modified_modules=list(TARGETS), name=name)
        with torch.no_grad():
            for p in delta.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        delta.save_finetuned(root / name)
        delta.detach()
    (root / "done").write_text("ok")
    return names


def traffic(kind: str, n_deltas: int, count: int, seed: int = 0) -> list[int]:
    """``count`` delta indices, uniform or Zipf(s=1.1) over ``n_deltas`` (delta 0 the most popular)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.randint(0, n_deltas, (count,), generator=g).tolist()
    weights = 1.0 / torch.arange(1, n_deltas + 1, dtype=torch.float64) ** ZIPF_S
    return torch.multinomial(weights, count, replacement=True, generator=g).tolist()


def split(names: list[str], cap: int) -> list[tuple[int, int]]:
    """Row ranges of ``names`` (in arrival order) that each name at most ``cap`` distinct deltas: a batch of 32
    with 16 loaded deltas at most runs as several sub-batches, for deltakit and PEFT alike."""
    ranges, start, seen = [], 0, set()
    for i, name in enumerate(names):
        if name not in seen and len(seen) == cap:
            ranges.append((start, i))
            start, seen = i, set()
        seen.add(name)
    ranges.append((start, len(names)))
    return ranges


# ------------------------------------------------------------------------------------------------ one child run
class _Peft:
    """PEFT with a capped set of loaded adapters (LRU), exported from the deltakit checkpoints on first use."""

    def __init__(self, model: Any, store: Path, cap: int) -> None:
        self.model, self.store, self.cap = model, store, cap
        self.order: list[str] = []
        self.miss_seconds: list[float] = []

    def _peft_dir(self, name: str) -> str:
        path = self.store / "peft" / name
        if not path.exists():  # exported once, untimed by the loads (a store in PEFT's own layout)
            import deltakit
            from deltakit.integrations.peft import export_to_peft

            probe = deltakit.AutoDeltaModel.from_finetuned(self.store / name, self.bare, name=name)
            export_to_peft(probe, path)
            probe.detach()
        return str(path)

    def prepare(self, names: list[str]) -> None:
        need = list(dict.fromkeys(names))
        for name in need:
            if name in self.order:
                self.order.remove(name)
                self.order.append(name)
                continue
            path = self._peft_dir(name)
            start = time.perf_counter()
            if self.model is None:
                from peft import PeftModel

                self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name).eval()
            else:
                self.model.load_adapter(path, adapter_name=name)
            self.miss_seconds.append(time.perf_counter() - start)
            self.order.append(name)
            while len(self.order) > self.cap:
                victim = next(n for n in self.order if n not in need)
                self.model.delete_adapter(victim)
                self.order.remove(victim)


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import deltakit

    common.configure_threads(args.threads)
    spec = QUICK if args.quick else FULL
    store = Path(args.store)
    names = [f"d{i}" for i in range(spec["deltas"])]
    per_phase = spec["batch"] * (spec["warmup"] + spec["batches"])
    gen = torch.Generator().manual_seed(3)
    vocab = spec["config"]["vocab_size"]
    batches: dict[str, list[list[str]]] = {}
    inputs: dict[str, list[Any]] = {}
    for seed, (phase, length) in enumerate((("prefill", spec["prefill_len"]), ("decode", spec["prompt_len"]))):
        requests = traffic(args.traffic, spec["deltas"], per_phase, seed=seed)
        batches[phase] = [[names[k] for k in requests[i : i + spec["batch"]]]
                          for i in range(0, per_phase, spec["batch"])]
        inputs[phase] = [torch.randint(3, vocab, (spec["batch"], length), generator=gen) for _ in batches[phase]]
    model = _llama(spec["config"])
    kw = dict(max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"], do_sample=False, pad_token_id=0)
    backbone_rss = common.current_rss_bytes()

    def forward(phase: str, x: Any, **extra: Any) -> None:
        if phase == "prefill":
            # Both systems run the LM head on the last position only (what a server answering one next token does).
            model_(input_ids=x, logits_to_keep=1, **extra).logits[:, -1]
        else:
            model_.generate(input_ids=x, attention_mask=torch.ones_like(x), **extra, **kw)

    model_ = model
    with torch.inference_mode():  # the bare backbone serving one batch of each phase: its working set
        for phase in ("prefill", "decode"):
            forward(phase, inputs[phase][0])
    serving_rss = common.peak_rss_bytes()
    sizes = {}
    register_s = 0.0
    cap = args.max_active if args.max_active > 0 else spec["batch"]
    every = sorted({n for phase in batches.values() for b in phase for n in b})
    if args.system in ("deltakit", "resident"):
        group = deltakit.DeltaGroup(model, max_active=args.max_active if args.system == "deltakit" else None)
        start = time.perf_counter()
        if args.system == "deltakit":
            for name in names:
                sizes[name] = group.register(name, store / name).nbytes
        else:
            for name in every:
                group.load(name, store / name)
                sizes[name] = sum(p.numel() * p.element_size() for p in group[name].parameters())
        register_s = time.perf_counter() - start

        def run(phase: str, i: int) -> Any:
            batch = batches[phase][i]
            for a, b in split(batch, cap):
                with torch.inference_mode(), group.route(batch[a:b]):
                    forward(phase, inputs[phase][i][a:b])

        misses = lambda: group.store_stats  # noqa: E731
    else:
        peft = _Peft(None, store, args.max_active)
        peft.base, peft.bare = model, _llama(spec["config"])

        def run(phase: str, i: int) -> Any:
            nonlocal model_
            batch = batches[phase][i]
            for a, b in split(batch, cap):
                peft.prepare(batch[a:b])
                model_ = peft.model
                with torch.inference_mode():
                    forward(phase, inputs[phase][i][a:b], adapter_names=batch[a:b])

        for name in every:  # export untimed first (PEFT's layout); then the bare twin is dropped
            peft._peft_dir(name)
        del peft.bare
        misses = lambda: {"misses": len(peft.miss_seconds), "load_seconds": sum(peft.miss_seconds)}  # noqa: E731
    common.reset_peak_rss()
    out: dict[str, Any] = {"register_s": register_s, "backbone_rss": backbone_rss, "serving_rss": serving_rss}
    for phase in ("prefill", "decode"):
        for i in range(spec["warmup"]):
            run(phase, i)
        before = dict(misses())
        latencies = []
        start = time.perf_counter()
        for i in range(spec["warmup"], len(batches[phase])):
            t = time.perf_counter()
            run(phase, i)
            latencies.append(time.perf_counter() - t)
        wall = time.perf_counter() - start
        after = misses()
        n_miss = after["misses"] - before.get("misses", 0)
        out[phase] = {
            "throughput": spec["batch"] * spec["batches"] / wall, "p50_ms": 1e3 * statistics.median(latencies),
            "p99_ms": 1e3 * sorted(latencies)[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "misses": n_miss,
            "miss_ms": 1e3 * (after["load_seconds"] - before.get("load_seconds", 0.0)) / n_miss if n_miss else None,
        }
    out["peak_rss"] = max(common.peak_rss_bytes(), serving_rss)
    mean_delta = sum(sizes.values()) / max(1, len(sizes)) if sizes else None
    out["mean_delta_bytes"] = mean_delta
    return out


# ------------------------------------------------------------------------------------------------ the parent
def run(quick: bool, log: Callable[[str], None] = print, threads: int = 1,
        only: list[str] | None = None, repeats: int = 1) -> dict[str, Any]:
    """Every cell (or the ``only`` ones, ``"zipf/64"`` style) in child processes; ratios from this one run.

    Each system needs its own process (its peak RSS is part of the result), so the two systems of a cell cannot
    share one process's interleaved rounds. With ``repeats`` > 1 a cell runs its pair of processes that many times,
    alternating which goes first (deltakit, PEFT, then PEFT, deltakit, ...), and the ratios are the medians of the
    per-pair ratios: a change of machine load between two processes then moves single pairs, not the median.
    ``runs`` keeps each system's median-throughput run."""
    spec = QUICK if quick else FULL
    root = Path(os.environ.get("DELTAKIT_MANY_DELTAS_STORE", tempfile.gettempdir())) / (
        "deltakit_many_deltas_quick" if quick else "deltakit_many_deltas")
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    write_store(root, spec)
    log(f"many_deltas: {spec['deltas']} checkpoints under {root} ({time.perf_counter() - start:.1f} s)")
    runs: dict[str, Any] = {}
    paired: dict[str, list[dict[str, Any]]] = {}
    for traffic_kind in TRAFFIC:
        cells = [m for m in spec["max_active"] if not only or f"{traffic_kind}/{m}" in only]
        if not cells:
            continue
        for m in cells:
            pairs: list[dict[str, Any]] = []
            for repeat in range(repeats):
                pair = {}
                for system in (("deltakit", "peft") if repeat % 2 == 0 else ("peft", "deltakit")):
                    key = f"{system}/{traffic_kind}/{m}"
                    argv = [sys.executable, __file__, "--child", "--system", system, "--traffic", traffic_kind,
                            "--max-active", str(m), "--store", str(root), "--threads", str(threads)]
                    pair[system] = common.run_json_child(argv + (["--quick"] if quick else []), timeout=900)
                    log(f"  {key}: prefill {pair[system]['prefill']['throughput']:.1f} req/s, decode "
                        f"{pair[system]['decode']['throughput']:.1f} req/s, misses {pair[system]['prefill']['misses']}+"
                        f"{pair[system]['decode']['misses']}, peak RSS {pair[system]['peak_rss'] / 2**20:.0f} MiB")
                pairs.append(pair)
            for system in ("deltakit", "peft"):
                runs[f"{system}/{traffic_kind}/{m}"] = median_run([pair[system] for pair in pairs])
            paired[f"deltakit/{traffic_kind}/{m}"] = pairs
        key = f"resident/{traffic_kind}"
        argv = [sys.executable, __file__, "--child", "--system", "resident", "--traffic", traffic_kind,
                "--max-active", "0", "--store", str(root), "--threads", str(threads)]
        runs[key] = common.run_json_child(argv + (["--quick"] if quick else []), timeout=900)
        log(f"  {key}: prefill {runs[key]['prefill']['throughput']:.1f} req/s, decode "
            f"{runs[key]['decode']['throughput']:.1f} req/s")
    summary = {}
    for key, value in runs.items():
        if not key.startswith("deltakit/"):
            continue
        _, traffic_kind, m = key.split("/")
        bound = value["serving_rss"] + int(m) * value["mean_delta_bytes"]
        summary[key] = {
            **paired_ratios(paired[key]),
            "peak_rss_over_bound": value["peak_rss"] / bound,
        }
    return {"spec": {k: v for k, v in spec.items() if k != "config"}, "config": spec["config"], "runs": runs,
            "summary": summary, "wall_s": time.perf_counter() - start,
            "all_resident_bytes": _all_resident(runs, spec)}


def median_run(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose prefill + decode throughput is the median of ``results`` (the lower median of an even count)."""
    ordered = sorted(results, key=lambda r: r["prefill"]["throughput"] + r["decode"]["throughput"])
    return ordered[(len(ordered) - 1) // 2]


def paired_ratios(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """deltakit / PEFT throughput per phase: the median of the per-pair ratios, and each pair's (``rounds``)."""
    out: dict[str, Any] = {}
    for phase in ("prefill", "decode"):
        ratios = [p["deltakit"][phase]["throughput"] / p["peft"][phase]["throughput"] for p in pairs]
        out[f"{phase}_vs_peft"] = statistics.median(ratios)
        out[f"{phase}_vs_peft_rounds"] = ratios
    return out


def _all_resident(runs: dict[str, Any], spec: dict[str, Any]) -> float | None:
    """The bound where every delta stays resident: backbone + every delta's bytes (computed, not allocated)."""
    some = next((v for k, v in runs.items() if k.startswith("deltakit/")), None)
    return None if some is None else some["backbone_rss"] + spec["deltas"] * some["mean_delta_bytes"]


def table(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows for the suite's report: one row per run."""
    headers = ["run", "prefill req/s", "decode req/s", "p50 / p99 ms (prefill)", "misses", "miss ms",
               "peak RSS MiB", "vs PEFT (prefill; decode)"]
    rows = []
    for key, run_ in results["runs"].items():
        ratio = results["summary"].get(key)
        miss_ms = run_["prefill"]["miss_ms"]
        rows.append([
            key, f"{run_['prefill']['throughput']:.1f}", f"{run_['decode']['throughput']:.1f}",
            f"{run_['prefill']['p50_ms']:.0f} / {run_['prefill']['p99_ms']:.0f}",
            run_["prefill"]["misses"] + run_["decode"]["misses"], "-" if miss_ms is None else f"{miss_ms:.1f}",
            f"{run_['peak_rss'] / 2**20:.0f}",
            "-" if ratio is None else f"{ratio['prefill_vs_peft']:.2f}x; {ratio['decode_vs_peft']:.2f}x",
        ])
    return headers, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--system", choices=("deltakit", "peft", "resident"))
    parser.add_argument("--traffic", choices=TRAFFIC)
    parser.add_argument("--max-active", type=int)
    parser.add_argument("--store")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--only", nargs="*", help="cells to run, e.g. zipf/64 uniform/256 (default: all)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="pairs of processes per cell, alternating which system goes first; ratios are the "
                             "medians of the pairs' ratios (default 1)")
    args = parser.parse_args(argv)
    if args.child:
        import warnings

        warnings.filterwarnings("ignore")
        print(json.dumps(child(args)))
        return 0
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    results = run(args.quick, threads=args.threads, only=args.only, repeats=args.repeats)
    text = json.dumps(results, indent=1, default=str)
    if args.output:
        Path(args.output).write_text(text)
    print(json.dumps(results["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
