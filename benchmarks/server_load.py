"""The example server (examples/server/server.py) under concurrent load vs serving one request at a time.

Setting: a small random Llama (hidden 512, 4 layers, vocab 8,000; ``--quick``: the example's tiny one) with 64
registered LoRA checkpoints (ranks 8/16/32/64, ``q_proj``/``v_proj``), ``max_active=64``. The same fixed list of
requests (16-token prompts, deltas drawn from a Zipf law, every tenth on the bare backbone) is served three ways, on
127.0.0.1, in one process, after one untimed pass that loads every delta:

* ``server``: the example server (dynamic batching, ``max_batch=32``, ``max_wait_ms=5``) and 32 client threads,
  each sending its share of the requests one after the other over its own HTTP connection (a closed loop);
* ``server, batch 1``: the same server and clients with ``max_batch=1`` (each request runs alone: HTTP and queueing
  as above, no batching);
* ``loop``: a plain Python loop, one request at a time, each in its own ``DeltaGroup.route([name])`` block, no HTTP.

For ``/v1/classify`` (one forward, the head on the last position only; the answer: the 5 most likely next tokens
with their logits and probabilities, the server's default ``top_k``) and ``/v1/generate`` (4 greedy tokens). The
three ways run in interleaved rounds (order rotated; 3 rounds), one torch thread. Reported: requests per second of
each (medians, wall clock), the ratios ``server / loop`` and ``server / server batch 1`` (medians of per-round
ratios), the same on the process CPU clock (requests per CPU second: the in-process clients' work counts against the
server; being descheduled by other jobs of a shared machine does not count), and the server's mean batch.

Run::

    python benchmarks/server_load.py            # about 3 minutes on the 2-core machine
    python benchmarks/server_load.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from benchmarks import common  # noqa: E402 - after the repository is on sys.path

FULL = dict(config=dict(vocab_size=8000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=8),
            deltas=64, ranks=(8, 16, 32, 64), requests=256, clients=32, prompt=16, new_tokens=4, rounds=3)
QUICK = dict(config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2),
             deltas=12, ranks=(2, 4, 8, 16), requests=48, clients=8, prompt=8, new_tokens=2, rounds=1)


def _example() -> Any:
    spec = importlib.util.spec_from_file_location("deltakit_example_server", _REPO_ROOT / "examples/server/server.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]  # (dataclasses look their module up)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _setup(root: Path, spec: dict[str, Any]) -> tuple[Any, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import deltakit

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**spec["config"], max_position_embeddings=128, pad_token_id=0,
                                         bos_token_id=1, eos_token_id=2)).eval()
    group = deltakit.DeltaGroup(model, max_active=spec["deltas"])
    generator = torch.Generator().manual_seed(1)
    for i in range(spec["deltas"]):
        r = spec["ranks"][i % len(spec["ranks"])]
        delta = deltakit.LoraModel(model, lora_r=r, lora_alpha=2 * r, modified_modules=["q_proj", "v_proj"],
                                   name=f"d{i}")
        with torch.no_grad():
            for p in delta.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        delta.save_finetuned(root / f"d{i}")
        delta.detach()
        group.register(f"d{i}", root / f"d{i}")
    return model, group


def _bodies(spec: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    g = torch.Generator().manual_seed(2)
    weights = 1.0 / torch.arange(1, spec["deltas"] + 1, dtype=torch.float64) ** 1.1
    picks = torch.multinomial(weights, spec["requests"], replacement=True, generator=g).tolist()
    vocab = spec["config"]["vocab_size"]
    return [{"delta": None if i % 10 == 9 else f"d{k}",
             "input_ids": torch.randint(3, vocab, (spec["prompt"],), generator=g).tolist()}
            for i, k in enumerate(picks)]


def _serve(app: Any) -> tuple[Any, threading.Thread, int]:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (server.started and server.servers) and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        raise RuntimeError("the example server did not start within 60 s")
    return server, thread, server.servers[0].sockets[0].getsockname()[1]


def _load(port: int, path: str, bodies: list[dict[str, Any]], clients: int) -> tuple[float, float]:
    """Wall and process CPU seconds for ``clients`` threads to send ``bodies`` (each thread its share, one after the
    other)."""
    failures: list[str] = []

    def client(share: list[dict[str, Any]]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        try:
            for body in share:
                conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
                response = conn.getresponse()
                payload = response.read()
                if response.status != 200:
                    failures.append(f"{response.status}: {payload[:200]!r}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(bodies[i::clients],)) for i in range(clients)]
    start, cpu = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return wall, cpu


def _loop(example: Any, model: Any, group: Any, bodies: list[dict[str, Any]], new_tokens: int,
          generate: bool) -> tuple[float, float]:
    """Wall and CPU seconds to answer ``bodies`` one at a time, each in its own route() block, computing what the
    server answers (classify: the same top-k answer from the same last-position logits)."""
    import torch

    start, cpu = time.perf_counter(), time.process_time()
    for body in bodies:
        ids = torch.tensor([body["input_ids"]])
        with torch.inference_mode(), group.route([body["delta"]]):
            if generate:
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            else:
                example.top_k_answers(example.last_logits(model, ids), [body.get("top_k", 5)])
    return time.perf_counter() - start, time.process_time() - cpu


WAYS = (("server", 32), ("server_batch1", 1), ("loop", None))


def _measure(example: Any, model: Any, group: Any, spec: dict[str, Any], kind: str) -> dict[str, Any]:
    """One endpoint served the three ways in interleaved rounds (order rotated); requests per second from the
    medians, ratios as medians of per-round ratios, on the wall clock and on the process CPU clock."""
    generate = kind == "generate"
    bodies = _bodies(spec)
    payload = [dict(b, max_new_tokens=spec["new_tokens"]) for b in bodies] if generate else bodies
    path, clients = f"/v1/{kind}", spec["clients"]
    _loop(example, model, group, bodies, spec["new_tokens"], generate)  # untimed: every delta loaded, caches warm
    servers: dict[str, Any] = {}
    try:
        for label, max_batch in WAYS[:2]:
            app = example.create_app(model, group, max_batch=max_batch, max_wait_ms=5,
                                     max_input_tokens=spec["prompt"], max_new_tokens=spec["new_tokens"])
            servers[label] = (app, *_serve(app))
            _load(servers[label][3], path, payload[:clients], clients)  # untimed: warm the connections
        samples: dict[str, dict[str, list[float]]] = {way: {"wall": [], "cpu": []} for way, _ in WAYS}
        batched = servers["server"][0].state.batcher.stats
        before = dict(batched)
        for index in range(spec["rounds"]):
            for way in common.rotated_order([w for w, _ in WAYS], index):
                if way == "loop":
                    wall, cpu = _loop(example, model, group, bodies, spec["new_tokens"], generate)
                else:
                    wall, cpu = _load(servers[way][3], path, payload, clients)
                samples[way]["wall"].append(wall)
                samples[way]["cpu"].append(cpu)
    finally:
        for _, server, thread, _ in servers.values():
            server.should_exit = True
            thread.join(timeout=60)
    n = len(payload)
    row: dict[str, Any] = {way: n / statistics.median(samples[way]["wall"]) for way, _ in WAYS}
    # Time ratios inverted: throughput of the server over the loop's, per round.
    row["server_vs_loop"] = common.paired_ratio(samples["loop"]["wall"], samples["server"]["wall"])["median"]
    row["server_vs_batch1"] = common.paired_ratio(samples["server_batch1"]["wall"], samples["server"]["wall"])["median"]
    row["per_cpu_second"] = {way: n / statistics.median(samples[way]["cpu"]) for way, _ in WAYS}
    row["server_vs_loop_cpu"] = common.paired_ratio(samples["loop"]["cpu"], samples["server"]["cpu"])["median"]
    row["mean_batch"] = (batched["rows"] - before["rows"]) / max(1, batched["batches"] - before["batches"])
    row["samples"] = samples
    return row


def run(quick: bool, log: Any = print, threads: int = 1) -> dict[str, Any]:
    """Both endpoints served the three ways (see the module docstring); ratios from this one run."""
    common.configure_threads(threads)
    spec = QUICK if quick else FULL
    example = _example()
    results: dict[str, Any] = {"spec": {k: v for k, v in spec.items() if k != "config"}, "config": spec["config"]}
    with tempfile.TemporaryDirectory() as root:
        model, group = _setup(Path(root), spec)
        for kind in ("classify", "generate"):
            row = results[kind] = _measure(example, model, group, spec, kind)
            log(f"server_load {kind}: server {row['server']:.1f} req/s, server batch 1 {row['server_batch1']:.1f} "
                f"req/s, loop {row['loop']:.1f} req/s; server / loop {row['server_vs_loop']:.2f}x (CPU clock "
                f"{row['server_vs_loop_cpu']:.2f}x), server / batch 1 {row['server_vs_batch1']:.2f}x; mean batch "
                f"{row['mean_batch']:.1f} rows")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    results = run(args.quick, threads=args.threads)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
