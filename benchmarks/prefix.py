"""Benchmark prefix tuning: training-step time against the frozen-backbone lower bound, and generation latency
against the base model.

Training step (same backbone weights, same batches, variants interleaved round-robin in one process):

``frozen``
    Every parameter frozen, the input embeddings' output made to require grad so that backward runs through the
    whole network: the lower bound of any delta that reaches layer 0 (as in ``benchmarks/train_step.py``).
``prefix``
    ``PrefixModel(backbone, prefix_token_num=6)`` with the default MLP reparameterization (embed 512, mid 512),
    ``freeze_module(exclude=["deltas"])``; AdamW over the delta's parameters.

A step is forward + backward (+ ``AdamW.step()`` and ``zero_grad`` for ``prefix``).

Generation (greedy, KV cache, batch 1, every call generates exactly ``new_tokens`` tokens):

``base``
    the backbone alone;
``prefix``
    a copy of it with a 6-token prefix attached (MLP kept; without autograd its output is computed once, not at
    every decoding step);
``prefix-folded``
    the same prefix after ``fold_reparameterization()`` (deployment form: plain key/value vectors).

Ratios are medians of per-round ratios (:func:`benchmarks.common.paired_ratio`) on the CPU clock with one torch
thread; the target for generation is ``prefix / base <= 1.10``.

Examples:
    Full run on the ~134M random Llama of ``benchmarks/train_step.py`` (a few minutes on 2 cores)::

        python benchmarks/prefix.py

    Quick smoke run (tiny random Llama, seconds)::

        python benchmarks/prefix.py --quick --output /tmp/prefix.json
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from benchmarks import common  # noqa: E402
from benchmarks import train_step  # noqa: E402

import torch  # noqa: E402

PREFIX_TOKENS = 6
GENERATION_TARGET = 1.10
DEFAULT_OUTPUT = _REPO_ROOT / "benchmarks" / "results" / "prefix.json"

#: (model spec of train_step.py, training rounds, generation rounds, prompt length, new tokens)
SETTINGS = {
    "full": ("llama130m", 7, 9, 64, 32),
    "quick": ("tiny-llama", 3, 3, 8, 6),
}


def _train_variants(spec: Any, batches: list[dict[str, torch.Tensor]]) -> tuple[dict[str, Any], dict[str, Any]]:
    frozen = train_step.build_backbone(spec)
    frozen.requires_grad_(False)
    frozen.get_input_embeddings().register_forward_hook(train_step._output_requires_grad)

    from deltakit import PrefixModel

    prefixed = train_step.build_backbone(spec)
    torch.manual_seed(1)
    delta = PrefixModel(prefixed, prefix_token_num=PREFIX_TOKENS)
    delta.freeze_module(exclude=["deltas"])
    optimizer = torch.optim.AdamW(list(delta.parameters()), lr=1e-4)

    def frozen_step(index: int) -> None:
        frozen(**batches[index % len(batches)]).loss.backward()

    def prefix_step(index: int) -> None:
        prefixed(**batches[index % len(batches)]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    info = {
        "prefix_parameters": delta.num_delta_parameters(),
        "backbone_parameters": sum(p.numel() for n, p in prefixed.named_parameters() if not n.startswith("prefix")),
        "sites": len(delta.sites),
    }
    return {"frozen": frozen_step, "prefix": prefix_step}, info


def _generation_variants(spec: Any, prompt_len: int, new_tokens: int) -> tuple[dict[str, Any], dict[str, Any]]:
    from deltakit import PrefixModel

    base = train_step.build_backbone(spec).eval()
    prefixed = copy.deepcopy(base)
    torch.manual_seed(2)
    PrefixModel(prefixed, prefix_token_num=PREFIX_TOKENS)
    folded = copy.deepcopy(base)
    torch.manual_seed(2)
    PrefixModel(folded, prefix_token_num=PREFIX_TOKENS).fold_reparameterization()
    vocab = base.config.vocab_size
    prompt = torch.randint(3, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(prompt)

    def generate(model: torch.nn.Module) -> Any:
        def run(index: int) -> torch.Tensor:
            with torch.no_grad():
                out = model.generate(
                    input_ids=prompt, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=False, pad_token_id=0,
                )  # fmt: skip
            assert out.shape[1] == prompt_len + new_tokens
            return out

        return run

    steps = {"base": generate(base), "prefix": generate(prefixed), "prefix-folded": generate(folded)}
    same = torch.equal(steps["prefix"](0), steps["prefix-folded"](0))
    differs = not torch.equal(steps["prefix"](0), steps["base"](0))
    return steps, {"folded_generates_same_tokens": same, "prefix_changes_generation": differs}


def _section(result: common.InterleavedResult, reference: str) -> dict[str, Any]:
    out: dict[str, Any] = {"variants": {}, "ratios": {}}
    for name in result.names:
        out["variants"][name] = {clock: common.summarize(result.times[clock][name]) for clock in common.CLOCKS}
    for name in result.names:
        if name != reference:
            out["ratios"][f"{name}/{reference}"] = {
                clock: common.paired_ratio(result.times[clock][name], result.times[clock][reference])
                for clock in common.CLOCKS
            }
    return out


def run(quick: bool, quiet: bool) -> dict[str, Any]:
    """Run both measurements and return the results (JSON-serialisable)."""
    spec_name, train_rounds, gen_rounds, prompt_len, new_tokens = SETTINGS["quick" if quick else "full"]
    spec = train_step.MODELS[spec_name]
    common.configure_threads(1)
    progress = None if quiet else (lambda line: print("  " + line, flush=True))
    batches = train_step.make_batches(spec, train_step.model_config(spec).vocab_size)

    if not quiet:
        print(f"training step on {spec.description}, batch {spec.batch_size} x {spec.seq_len}")
    steps, train_info = _train_variants(spec, batches)
    training = _section(common.run_interleaved(steps, rounds=train_rounds, warmup=1, progress=progress), "frozen")
    training.update(train_info, batch_size=spec.batch_size, seq_len=spec.seq_len)
    del steps

    if not quiet:
        print(f"generation: batch 1, prompt {prompt_len} tokens, {new_tokens} new tokens, greedy with KV cache")
    steps, gen_info = _generation_variants(spec, prompt_len, new_tokens)
    generation = _section(common.run_interleaved(steps, rounds=gen_rounds, warmup=1, progress=progress), "base")
    generation.update(gen_info, prompt_len=prompt_len, new_tokens=new_tokens)
    ratio = generation["ratios"]["prefix/base"]["cpu"]["median"]
    generation["target"] = GENERATION_TARGET
    generation["meets_target"] = bool(ratio <= GENERATION_TARGET)
    return {
        "benchmark": "prefix",
        "quick": quick,
        "model": spec.description,
        "prefix_token_num": PREFIX_TOKENS,
        "torch_threads": 1,
        "environment": common.environment_info(),
        "note": "shared 2-core machine busy with other work while measured; CPU-clock medians of paired ratios",
        "training_step": training,
        "generation": generation,
    }


def markdown(results: dict[str, Any]) -> str:
    """The results as a markdown report."""
    train, gen = results["training_step"], results["generation"]
    rows = []
    for name, section, ref in (("prefix", train, "frozen"), ("prefix", gen, "base"), ("prefix-folded", gen, "base")):
        ratio = section["ratios"][f"{name}/{ref}"]["cpu"]
        what = "training step" if section is train else "generation"
        rows.append([
            what, f"{name} / {ref}", common.format_ratio(ratio["median"]),
            f"{common.format_ratio(ratio['q1'])}-{common.format_ratio(ratio['q3'])}",
            common.format_seconds(section["variants"][name]["cpu"]["median"]),
            common.format_seconds(section["variants"][ref]["cpu"]["median"]), ratio["n"],
        ])  # fmt: skip
    table = common.markdown_table(
        ["measure", "ratio", "median (CPU clock)", "IQR", "variant median", "reference median", "rounds"], rows
    )
    return (
        f"# Prefix tuning benchmark\n\nModel: {results['model']}; {results['prefix_token_num']} prefix tokens; one "
        f"torch thread; training batch {train['batch_size']} x {train['seq_len']}; generation batch 1, prompt "
        f"{gen['prompt_len']}, {gen['new_tokens']} new tokens (greedy, KV cache).\n\n{table}\n"
        f"Generation target prefix / base <= {gen['target']:.2f}: {'met' if gen['meets_target'] else 'NOT met'}. "
        f"Folded prefixes generate the same tokens: {gen['folded_generates_same_tokens']}.\n\n"
        f"Prefix parameters: {train['prefix_parameters']:,} (MLP reparameterization) on {train['sites']} attention "
        f"layers.\n\nThe machine (2 CPU cores) was shared with other work while this ran: ratios come from paired "
        f"rounds on the CPU clock to cancel most of the drift; absolute times are not comparable across runs.\n"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write ``<output>.json`` and ``<output>.md``; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random Llama, few rounds (seconds)")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="JSON path; markdown goes next to it")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        results = run(args.quick, args.quiet)
    finally:
        torch.set_num_threads(threads)
    results["total_seconds"] = time.perf_counter() - t0
    output = Path(args.output)
    common.write_json(output, results)
    common.write_text(output.with_suffix(".md"), markdown(results))
    if not args.quiet:
        print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
