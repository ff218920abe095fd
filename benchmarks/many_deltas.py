"""Many deltas on one backbone: a store of LoRAs, a bounded active set, mixed batches; deltakit vs PEFT.

Setting (the full run): 1,000 LoRA checkpoints on ``q_proj`` / ``v_proj`` of the ~130M Llama (hidden 768, 12
layers; ranks 8/16/32/64 in turn, random factors), written once under a temporary directory. Traffic: a fixed
sequence of requests, each naming a delta drawn uniformly or from a Zipf law (s = 1.1, delta ``k`` with weight
``1 / (k + 1)^s``), grouped in batches of 32 in arrival order. Two phases per batch: *prefill* (one forward of a
16-token prompt per request) and *decode* (``generate()`` of 4 greedy tokens after an 8-token prompt). Each
(system, ``max_active``, traffic) runs in its own process, so peak RSS is its own:

* ``deltakit``: ``DeltaGroup(model, max_active=m)`` with all 1,000 registered (config + header read only); each
  batch is one ``route()`` block (misses loaded on entry, least recently used dropped).
* ``peft``: a ``PeftModel``; before each batch the adapters it needs and lacks are loaded with ``load_adapter``
  after ``delete_adapter`` of the least recently used beyond ``m``; the batch runs with ``adapter_names=``.
* ``resident``: the bound where every delta stays materialised: the batches' deltas loaded before timing (no miss);
  its memory bound is computed (backbone + every delta's bytes), not allocated.

Reported per run: throughput (requests per wall second, loads included), p50/p99 batch latency, the miss count and
mean miss latency (deltakit: the group's own load timer; PEFT: ``load_adapter`` timed), peak RSS against backbone +
``m`` deltas of the mean size. ``--quick`` runs a tiny Llama with 40 deltas in seconds (what the tests run).

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
            deltas=1000, batch=32, batches=3, prefill_len=16, prompt_len=8, new_tokens=4,
            max_active=(16, 64, 256), ranks=RANKS)
QUICK = dict(config=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4),
             deltas=40, batch=8, batches=2, prefill_len=8, prompt_len=4, new_tokens=2, max_active=(4,),
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
    requests = traffic(args.traffic, spec["deltas"], spec["batch"] * spec["batches"])
    batches = [[names[k] for k in requests[i : i + spec["batch"]]] for i in range(0, len(requests), spec["batch"])]
    gen = torch.Generator().manual_seed(3)
    vocab = spec["config"]["vocab_size"]
    prefill = [torch.randint(3, vocab, (spec["batch"], spec["prefill_len"]), generator=gen) for _ in batches]
    prompts = [torch.randint(3, vocab, (spec["batch"], spec["prompt_len"]), generator=gen) for _ in batches]
    model = _llama(spec["config"])
    backbone_rss = common.current_rss_bytes()
    common.reset_peak_rss()
    kw = dict(max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"], do_sample=False, pad_token_id=0)
    sizes = {}
    register_s = 0.0
    cap = args.max_active if args.max_active > 0 else spec["batch"]
    if args.system in ("deltakit", "resident"):
        group = deltakit.DeltaGroup(model, max_active=args.max_active if args.system == "deltakit" else None)
        start = time.perf_counter()
        if args.system == "deltakit":
            for name in names:
                sizes[name] = group.register(name, store / name).nbytes
        else:
            for name in sorted({n for b in batches for n in b}):
                group.load(name, store / name)
                sizes[name] = sum(p.numel() * p.element_size() for p in group[name].parameters())
        register_s = time.perf_counter() - start

        def run(i: int, phase: str) -> Any:
            for a, b in split(batches[i], cap):
                with torch.inference_mode(), group.route(batches[i][a:b]):
                    if phase == "prefill":
                        model(input_ids=prefill[i][a:b]).logits[:, -1]
                    else:
                        x = prompts[i][a:b]
                        model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)

        misses = lambda: group.store_stats  # noqa: E731
    else:
        peft = _Peft(None, store, args.max_active)
        peft.base, peft.bare = model, _llama(spec["config"])

        def run(i: int, phase: str) -> Any:
            for a, b in split(batches[i], cap):
                names_ab = batches[i][a:b]
                peft.prepare(names_ab)
                with torch.inference_mode():
                    if phase == "prefill":
                        peft.model(input_ids=prefill[i][a:b], adapter_names=names_ab).logits[:, -1]
                    else:
                        x = prompts[i][a:b]
                        peft.model.generate(input_ids=x, attention_mask=torch.ones_like(x), adapter_names=names_ab,
                                            **kw)

        for batch in batches:  # export untimed first (PEFT's layout); then the bare twin is dropped
            for name in batch:
                peft._peft_dir(name)
        del peft.bare
        misses = lambda: {"misses": len(peft.miss_seconds), "load_seconds": sum(peft.miss_seconds)}  # noqa: E731
    out: dict[str, Any] = {"register_s": register_s, "backbone_rss": backbone_rss}
    for phase in ("prefill", "decode"):
        before = dict(misses())
        latencies = []
        start = time.perf_counter()
        for i in range(len(batches)):
            t = time.perf_counter()
            run(i, phase)
            latencies.append(time.perf_counter() - t)
        wall = time.perf_counter() - start
        after = misses()
        n_miss = after["misses"] - before.get("misses", 0)
        out[phase] = {
            "throughput": len(requests) / wall, "p50_ms": 1e3 * statistics.median(latencies),
            "p99_ms": 1e3 * sorted(latencies)[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "misses": n_miss,
            "miss_ms": 1e3 * (after["load_seconds"] - before.get("load_seconds", 0.0)) / n_miss if n_miss else None,
        }
    out["peak_rss"] = common.peak_rss_bytes()
    mean_delta = sum(sizes.values()) / max(1, len(sizes)) if sizes else None
    out["mean_delta_bytes"] = mean_delta
    return out


# ------------------------------------------------------------------------------------------------ the parent
def run(quick: bool, log: Callable[[str], None] = print, threads: int = 1) -> dict[str, Any]:
    spec = QUICK if quick else FULL
    root = Path(os.environ.get("DELTAKIT_MANY_DELTAS_STORE", tempfile.gettempdir())) / (
        "deltakit_many_deltas_quick" if quick else "deltakit_many_deltas")
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    write_store(root, spec)
    log(f"many_deltas: {spec['deltas']} checkpoints under {root} ({time.perf_counter() - start:.1f} s)")
    runs: dict[str, Any] = {}
    for traffic_kind in TRAFFIC:
        for m in spec["max_active"]:
            for system in ("deltakit", "peft"):
                key = f"{system}/{traffic_kind}/{m}"
                argv = [sys.executable, __file__, "--child", "--system", system, "--traffic", traffic_kind,
                        "--max-active", str(m), "--store", str(root), "--threads", str(threads)]
                runs[key] = common.run_json_child(argv + (["--quick"] if quick else []), timeout=900)
                log(f"  {key}: prefill {runs[key]['prefill']['throughput']:.1f} req/s, decode "
                    f"{runs[key]['decode']['throughput']:.1f} req/s, misses {runs[key]['prefill']['misses']}+"
                    f"{runs[key]['decode']['misses']}, peak RSS {runs[key]['peak_rss'] / 2**20:.0f} MiB")
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
        peft = runs[f"peft/{traffic_kind}/{m}"]
        bound = value["backbone_rss"] + int(m) * value["mean_delta_bytes"]
        summary[key] = {
            "prefill_vs_peft": value["prefill"]["throughput"] / peft["prefill"]["throughput"],
            "decode_vs_peft": value["decode"]["throughput"] / peft["decode"]["throughput"],
            "peak_rss_over_bound": value["peak_rss"] / bound,
        }
    return {"spec": {k: v for k, v in spec.items() if k != "config"}, "config": spec["config"], "runs": runs,
            "summary": summary, "wall_s": time.perf_counter() - start,
            "all_resident_bytes": runs[f"deltakit/zipf/{spec['max_active'][0]}"]["backbone_rss"]
            + spec["deltas"] * runs[f"deltakit/zipf/{spec['max_active'][0]}"]["mean_delta_bytes"]}


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
    args = parser.parse_args(argv)
    if args.child:
        import warnings

        warnings.filterwarnings("ignore")
        print(json.dumps(child(args)))
        return 0
    results = run(args.quick, threads=args.threads)
    text = json.dumps(results, indent=1, default=str)
    if args.output:
        Path(args.output).write_text(text)
    print(json.dumps(results["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
