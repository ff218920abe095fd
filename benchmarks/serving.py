"""Multi-task serving: switching between named deltas, and mixed batches (per-sample routing), deltakit vs PEFT.

Uses :class:`deltakit.DeltaGroup` (``switch``, ``route``; see ``docs/serving.md``) and PEFT's multi-adapter API
(``add_adapter``, ``set_adapter``, ``disable_adapter``, ``forward(..., adapter_names=...)``).

Parts:

``switch``
    A Llama of ~130M parameters (hidden 768, 12 layers, no LM head; built on the meta device, since switching
    does no arithmetic) with 8 LoRAs (r=8) on ``q_proj`` and ``v_proj`` (24 sites). deltakit: one ``group.switch(next)`` (detach one delta, attach another); PEFT:
    ``set_adapter(next)``, and entering + leaving ``disable_adapter()``. Each timed sample runs K switches,
    cycling through the 8 names; the per-switch time is the sample / K.
``switch_vs_sites``
    The same switch on a Llama-7B-shaped model on the meta device (switching does no arithmetic) with LoRA on
    ``q_proj`` / ``q,v`` / ``q,k,v,o`` / all seven projections: 32 to 224 sites.
``mixed``
    8 LoRAs, batch 16, sequence 64, eval mode, ``torch.inference_mode()``. ``*_single``: one delta on the whole
    batch (the lower bound); ``*_mixed``: sample ``i`` uses delta ``i mod 8`` (deltakit ``group.route(names)``,
    PEFT ``adapter_names=names``). Both libraries hold the same factors, so their mixed outputs must agree.
``mixed_vs_deltas``
    Batch 32, sequence 64, 32 LoRAs loaded; the batch uses 1, 4, 8, 16 or 32 distinct deltas. Throughput
    (samples per CPU second) of both libraries, and the time each adds to the bare backbone (timed in the same
    rounds; median of the per-round differences).
``settings``
    The issue's headline figure (32 deltas, batch 32, every sample its own delta) in the settings where per-sample
    routing cost matters: LoRA on ``q,v`` (24 sites, the issue's setting) and on all seven linear layers (q, k, v,
    o, gate, up, down: 84 sites), each for a prefill step (the 64-token prompt) and a decode step (one new token
    per sample on a KV cache of the 64-token prompt, i.e. what ``generate()`` does per token; a timed sample is 8
    such steps, deltakit's inside one ``route()`` block as around ``generate()``, and figures are per step; the
    cache is prefilled by each variant itself, untimed, and cropped back to the prompt before every timed sample).
    Variants
    per setting: the bare backbone, deltakit ``group.route(names)``, PEFT ``adapter_names=names``, interleaved;
    throughput ratio deltakit/PEFT and each library's time over the bare backbone's, all paired per round.
    PEFT/bare is the ceiling of the deltakit/PEFT throughput ratio (reached if routing cost nothing).

Run alone::

    python benchmarks/serving.py            # ~6-7 minutes on a busy 2-core machine (~6 min CPU)
    python benchmarks/serving.py --quick    # tiny models, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from benchmarks import common, suite_utils  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

LORA_R = 8
LORA_ALPHA = 16
SWITCH_TARGETS = ("q_proj", "v_proj")
SITE_SWEEP: tuple[tuple[str, ...], ...] = (
    ("q_proj",),
    ("q_proj", "v_proj"),
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)
PEFT_REFERENCE = {"set_adapter_ms": 3.1, "disable_adapter_ms": 15.7, "mixed/single": 1.07}
ALL_LINEAR = SITE_SWEEP[-1]
SETTINGS_TARGETS: tuple[tuple[str, tuple[str, ...]], ...] = (("q,v", SWITCH_TARGETS), ("all linear", ALL_LINEAR))
TARGETS = {"switch_ms": 0.3, "mixed/single": 1.03, "mixed_throughput_vs_peft_at_32": 1.5}

FULL = dict(config=dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                        num_attention_heads=12, num_key_value_heads=12),
            sweep_config=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=32, vocab_size=32000),
            site_sweep=SITE_SWEEP,
            deltas=8, batch=16, seq=64, sweep_batch=32, sweep_deltas=(1, 4, 8, 16, 32), switch_rounds=21,
            mixed_rounds=7, sweep_rounds=3, k=20, settings_rounds=5, decode_steps=8)
QUICK = dict(config=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4),
             sweep_config=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                               num_key_value_heads=4, vocab_size=1000),
             site_sweep=(SITE_SWEEP[0], SITE_SWEEP[-1]),
             deltas=8, batch=8, seq=16, sweep_batch=8, sweep_deltas=(1, 8), switch_rounds=3, mixed_rounds=3,
             sweep_rounds=2, k=4, settings_rounds=3, decode_steps=2)


def _llama(config: dict[str, int], meta: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            return LlamaModel(LlamaConfig(**config)).eval()
    return LlamaModel(LlamaConfig(**config)).eval()


def build_pair(config: dict[str, int], n: int, targets: Sequence[str], meta: bool = False) -> tuple[Any, Any, Any]:
    """A deltakit group and a PEFT model, each on its own copy of one backbone, with ``n`` LoRAs of equal factors.

    Returns:
        ``(group, peft_model, names)``: the group's deltas are named ``d0..``, PEFT's adapters the same; all deltas
        of the group are detached.
    """
    import peft

    import deltakit

    names = [f"d{i}" for i in range(n)]
    backbone = _llama(config, meta)
    group = deltakit.DeltaGroup(backbone)
    generator = torch.Generator().manual_seed(1)
    for name in names:
        delta = deltakit.LoraModel(backbone, lora_r=LORA_R, lora_alpha=LORA_ALPHA, modified_modules=list(targets),
                                   name=name)
        if not meta:
            with torch.no_grad():
                for param in delta.parameters():
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        delta.detach()
        group.add(delta)
    peft_backbone = _llama(config, meta)
    cfg = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(targets))
    model = peft.get_peft_model(peft_backbone, cfg, adapter_name=names[0], low_cpu_mem_usage=meta)
    for name in names[1:]:
        model.add_adapter(name, cfg, low_cpu_mem_usage=meta)
    if not meta:
        modules = dict(model.base_model.model.named_modules())
        with torch.no_grad():
            for name in names:
                for site in group[name].sites:
                    modules[site.name].lora_A[name].weight.copy_(site.module.lora_A)
                    modules[site.name].lora_B[name].weight.copy_(site.module.lora_B)
    model.eval()
    return group, model, names


def _switch_steps(group: Any, model: Any, names: list[str], k: int) -> dict[str, Callable[[int], Any]]:
    state = {"dk": 0, "peft": 0}

    def dk(index: int) -> None:
        for _ in range(k):
            state["dk"] = (state["dk"] + 1) % len(names)
            group.switch(names[state["dk"]])

    def peft_set(index: int) -> None:
        for _ in range(k):
            state["peft"] = (state["peft"] + 1) % len(names)
            model.set_adapter(names[state["peft"]])

    def peft_disable(index: int) -> None:
        for _ in range(k):
            with model.disable_adapter():
                pass

    return {"deltakit_switch": dk, "peft_set_adapter": peft_set, "peft_disable_adapter": peft_disable}


def _per_switch_ms(result: common.InterleavedResult, k: int) -> dict[str, float]:
    return {name: common.summarize(v)["median"] * 1e3 / k for name, v in result.times["cpu"].items()}


def measure_switch(p: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Switch times on the ~130M shape (8 deltas on q,v) and versus the number of sites (7B shape), on meta."""
    group, model, names = build_pair(p["config"], p["deltas"], SWITCH_TARGETS, meta=True)
    group.switch(names[0])
    log("serving: switching, 8 deltas on q,v")
    with suite_utils.frozen_gc():
        result = common.run_interleaved(_switch_steps(group, model, names, p["k"]), rounds=p["switch_rounds"],
                                        warmup=1)
    sites = len(group[names[0]].sites)
    out: dict[str, Any] = {"sites": sites, "deltas": len(names), "switches_per_sample": p["k"],
                           "per_switch_ms": _per_switch_ms(result, p["k"]),
                           "ratios": suite_utils.ratios(result, [("deltakit_switch", "peft_set_adapter"),
                                                                  ("deltakit_switch", "peft_disable_adapter")])}
    sweep = []
    for targets in p["site_sweep"]:
        group, model, names = build_pair(p["sweep_config"], p["deltas"], targets, meta=True)
        group.switch(names[0])
        log(f"serving: switch vs sites, {targets}")
        with suite_utils.frozen_gc():
            result = common.run_interleaved(_switch_steps(group, model, names, p["k"]),
                                            rounds=max(3, p["switch_rounds"] // 3), warmup=1)
        sweep.append({"targets": list(targets), "sites": len(group[names[0]].sites),
                      "per_switch_ms": _per_switch_ms(result, p["k"])})
        del group, model
    out["vs_sites"] = sweep
    return out


def _forward(model: nn.Module, x: torch.Tensor, **kwargs: Any) -> None:
    with torch.inference_mode():
        model(input_ids=x, **kwargs)


def measure_mixed(p: dict[str, Any], log: Callable[[str], None], notes: list[str]) -> dict[str, Any]:
    """Mixed batch vs one delta on the whole batch, at 8 deltas; then throughput versus distinct deltas."""
    n_max = max(p["deltas"], max(p["sweep_deltas"]))
    group, model, names = build_pair(p["config"], n_max, SWITCH_TARGETS)
    dk_backbone = group.backbone_model
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, p["config"]["vocab_size"], (p["batch"], p["seq"]), generator=gen)
    mixed_names = [names[i % p["deltas"]] for i in range(p["batch"])]

    # Sanity: the two libraries compute the same mixed batch.
    group.switch(None)
    with torch.inference_mode():
        with group.route(mixed_names):
            dk_out = dk_backbone(input_ids=x).last_hidden_state
        peft_out = model(input_ids=x, adapter_names=mixed_names).last_hidden_state
    diff = float((dk_out - peft_out).abs().max())
    if not diff < 1e-3:
        notes.append(f"mixed batch: deltakit and PEFT outputs differ by {diff:.3g}")

    def dk_single(index: int) -> None:
        _forward(dk_backbone, x)

    def dk_mixed(index: int) -> None:
        with group.route(mixed_names):
            _forward(dk_backbone, x)

    def peft_single(index: int) -> None:
        _forward(model, x)

    def peft_mixed(index: int) -> None:
        _forward(model, x, adapter_names=mixed_names)

    group.switch(names[0])
    model.set_adapter(names[0])
    log(f"serving: mixed batch, {p['deltas']} deltas, batch {p['batch']} x {p['seq']}")
    with suite_utils.frozen_gc():
        result = common.run_interleaved(
            {"deltakit_single": dk_single, "deltakit_mixed": dk_mixed, "peft_single": peft_single,
             "peft_mixed": peft_mixed},
            rounds=p["mixed_rounds"], warmup=1, progress=log)
    out: dict[str, Any] = {
        "deltas": p["deltas"], "batch": p["batch"], "seq": p["seq"], "max_abs_diff_deltakit_vs_peft": diff,
        "time": suite_utils.stats(result),
        "ratios": suite_utils.ratios(result, [("deltakit_mixed", "deltakit_single"), ("peft_mixed", "peft_single"),
                                              ("deltakit_mixed", "peft_mixed")]),
    }

    xs = torch.randint(0, p["config"]["vocab_size"], (p["sweep_batch"], p["seq"]), generator=gen)
    # "base": the bare backbone (the group's deltas are all detached here), to see what each library adds.
    steps: dict[str, Callable[[int], Any]] = {"base": lambda index: _forward(dk_backbone, xs)}
    for n in p["sweep_deltas"]:
        routed = [names[i % n] for i in range(p["sweep_batch"])]
        steps[f"deltakit_{n}"] = (lambda routed: lambda index: _routed_forward(group, dk_backbone, xs, routed))(routed)
        steps[f"peft_{n}"] = (lambda routed: lambda index: _forward(model, xs, adapter_names=routed))(routed)
    group.switch(None)
    log(f"serving: throughput vs distinct deltas {list(p['sweep_deltas'])}, batch {p['sweep_batch']} x {p['seq']}")
    with suite_utils.frozen_gc():
        result = common.run_interleaved(steps, rounds=p["sweep_rounds"], warmup=1, progress=log)
    medians = {name: common.summarize(v)["median"] for name, v in result.times["cpu"].items()}
    cpu = result.times["cpu"]

    def added_ms(name: str) -> float:
        """Median over rounds of (variant - base) in the same round: the time the library adds, in ms."""
        return common.summarize([a - b for a, b in zip(cpu[name], cpu["base"])])["median"] * 1e3

    out["vs_deltas"] = {
        "batch": p["sweep_batch"], "seq": p["seq"], "loaded": n_max,
        "base_samples_per_s": p["sweep_batch"] / medians["base"],
        "points": [{"deltas": n,
                    "deltakit_added_ms": added_ms(f"deltakit_{n}"),
                    "peft_added_ms": added_ms(f"peft_{n}"),
                    "deltakit_samples_per_s": p["sweep_batch"] / medians[f"deltakit_{n}"],
                    "peft_samples_per_s": p["sweep_batch"] / medians[f"peft_{n}"],
                    # time ratio peft/deltakit per round = throughput ratio deltakit/peft
                    "throughput_deltakit/peft": suite_utils.ratios(
                        result, [(f"peft_{n}", f"deltakit_{n}")])[f"peft_{n}/deltakit_{n}"]}
                   for n in p["sweep_deltas"]],
    }
    return out


def _prefill(model: nn.Module, x: torch.Tensor, **kwargs: Any) -> Any:
    """The prompt's forward with ``use_cache=True``: returns ``(last_hidden_state, cache)``."""
    with torch.inference_mode():
        out = model(input_ids=x, use_cache=True, **kwargs)
    return out.last_hidden_state, out.past_key_values


def _decode(model: nn.Module, token: torch.Tensor, cache: Any, **kwargs: Any) -> torch.Tensor:
    """One decode step (one new token per sample) on ``cache``; returns the new token's hidden state."""
    with torch.inference_mode():
        return model(input_ids=token, past_key_values=cache, use_cache=True, **kwargs).last_hidden_state


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def measure_settings(p: dict[str, Any], log: Callable[[str], None], notes: list[str]) -> dict[str, Any]:
    """32 deltas, batch 32, every sample its own delta: q,v and all linear layers, prefill and decode steps.

    For each target set one pair (deltakit group, PEFT model; same factors) is built; the outputs of both
    libraries are compared (prefill and decode) before anything is timed.
    """
    n, batch, seq = max(p["sweep_deltas"]), p["sweep_batch"], p["seq"]
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, p["config"]["vocab_size"], (batch, seq), generator=gen)
    token = torch.randint(0, p["config"]["vocab_size"], (batch, 1), generator=gen)
    points: list[dict[str, Any]] = []
    for label, targets in SETTINGS_TARGETS:
        group, model, names = build_pair(p["config"], n, targets)
        backbone = group.backbone_model
        routed = [names[i % n] for i in range(batch)]
        group.switch(None)
        sites = len(group[names[0]].sites)

        # Check: same prefill and same decode step (each library on its own cache) with the same factors.
        base_h, base_cache = _prefill(backbone, x)
        with group.route(routed):
            dk_h, dk_cache = _prefill(backbone, x)
        peft_h, peft_cache = _prefill(model, x, adapter_names=routed)
        base_t = _decode(backbone, token, base_cache)
        with group.route(routed):
            dk_t = _decode(backbone, token, dk_cache)
        peft_t = _decode(model, token, peft_cache, adapter_names=routed)
        checks = {"prefill": (_max_diff(dk_h, peft_h), _max_diff(dk_h, base_h)),
                  "decode": (_max_diff(dk_t, peft_t), _max_diff(dk_t, base_t))}
        for step, (diff, vs_base) in checks.items():
            if not diff < 1e-3:
                notes.append(f"settings ({label}, {step}): deltakit and PEFT outputs differ by {diff:.3g}")
            if not vs_base > 0:
                notes.append(f"settings ({label}, {step}): routed output equals the bare backbone's")
        del base_h, dk_h, peft_h, base_t, dk_t, peft_t

        caches = {"base": base_cache, "deltakit": dk_cache, "peft": peft_cache}

        def prefill_variants() -> dict[str, suite_utils.Prepare]:
            def dk_call() -> None:
                with group.route(routed):
                    _forward(backbone, x)

            return {"base": lambda index: lambda: _forward(backbone, x),
                    "deltakit": lambda index: dk_call,
                    "peft": lambda index: lambda: _forward(model, x, adapter_names=routed)}

        def decode_variants() -> dict[str, suite_utils.Prepare]:
            def prepared(name: str, call: Callable[[Any], Any]) -> suite_utils.Prepare:
                def prepare(index: int) -> Callable[[], Any]:
                    cache = caches[name]
                    extra = cache.get_seq_length() - seq
                    if extra:  # untimed: back to the prompt, so every timed step sees the same cache length
                        cache.crop(-extra)
                    return lambda: call(cache)
                return prepare

            steps = p["decode_steps"]

            def dk_call(cache: Any) -> None:
                with group.route(routed):  # one block for all steps, as around generate()
                    for _ in range(steps):
                        _decode(backbone, token, cache)

            def base_call(cache: Any) -> None:
                for _ in range(steps):
                    _decode(backbone, token, cache)

            def peft_call(cache: Any) -> None:
                for _ in range(steps):
                    _decode(model, token, cache, adapter_names=routed)

            return {"base": prepared("base", base_call), "deltakit": prepared("deltakit", dk_call),
                    "peft": prepared("peft", peft_call)}

        for step, variants in (("prefill", prefill_variants()), ("decode", decode_variants())):
            log(f"serving: settings, {label} ({sites} sites), {step}, {n} deltas, batch {batch}")
            with suite_utils.frozen_gc():
                result = suite_utils.interleave(variants, rounds=p["settings_rounds"], warmup=1, progress=log)
            medians = {name: common.summarize(v)["median"] for name, v in result.times["cpu"].items()}
            calls = 1 if step == "prefill" else p["decode_steps"]  # forward calls per timed sample
            points.append({
                "targets": label, "modules": list(targets), "sites": sites, "step": step,
                "tokens_per_sample": seq if step == "prefill" else 1, "steps_per_sample": calls,
                "max_abs_diff_deltakit_vs_peft": checks[step][0], "max_abs_diff_deltakit_vs_base": checks[step][1],
                "time": suite_utils.stats(result),
                "samples_per_s": {name: batch * calls / t for name, t in medians.items()},
                # peft/deltakit time per round = deltakit/peft throughput; peft/base = that ratio's ceiling.
                "ratios": suite_utils.ratios(result, [("peft", "deltakit"), ("deltakit", "base"), ("peft", "base")]),
            })
        # Free this target set before the next is built (the closures above are only called in this iteration).
        group = model = backbone = caches = dk_cache = peft_cache = base_cache = None
    return {"deltas": n, "batch": batch, "prompt": seq, "rounds": p["settings_rounds"], "lora_r": LORA_R,
            "points": points}


def _routed_forward(group: Any, backbone: nn.Module, x: torch.Tensor, names: list[str]) -> None:
    with group.route(names):
        _forward(backbone, x)


def run(quick: bool = False, log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Run every part; see the module docstring.

    Returns:
        ``{"switch": ..., "mixed": ..., "notes": [...], "reference": PEFT figures, "targets": ...}``.
    """
    suite_utils.quiet()
    p = QUICK if quick else FULL
    notes: list[str] = []
    out: dict[str, Any] = {"model": p["config"], "lora": {"r": LORA_R, "alpha": LORA_ALPHA}, "notes": notes,
                           "peft_reference": PEFT_REFERENCE, "targets": TARGETS}
    out["switch"] = measure_switch(p, log)
    out["mixed"] = measure_mixed(p, log, notes)
    out["settings"] = measure_settings(p, log, notes)
    return out


def tables(section: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """Markdown/rich tables (title, headers, rows) of a :func:`run` result."""
    s = section["switch"]
    ms = s["per_switch_ms"]
    switch_rows = [[f"{s['sites']} sites, {s['deltas']} deltas", f"{ms['deltakit_switch']:.3f} ms",
                    f"{ms['peft_set_adapter']:.3f} ms", f"{ms['peft_disable_adapter']:.3f} ms",
                    common.format_ratio(s["ratios"]["deltakit_switch/peft_set_adapter"]["median"])]]
    for point in s["vs_sites"]:
        m = point["per_switch_ms"]
        switch_rows.append([f"{point['sites']} sites (7B shape, {'+'.join(t.split('_')[0] for t in point['targets'])})",
                            f"{m['deltakit_switch']:.3f} ms", f"{m['peft_set_adapter']:.3f} ms",
                            f"{m['peft_disable_adapter']:.3f} ms",
                            common.format_ratio(m["deltakit_switch"] / m["peft_set_adapter"])])
    m = section["mixed"]
    r = m["ratios"]
    mixed_rows = [[f"{m['deltas']} deltas, batch {m['batch']} x {m['seq']}",
                   common.format_ratio(r["deltakit_mixed/deltakit_single"]["median"]),
                   common.format_ratio(r["peft_mixed/peft_single"]["median"]),
                   common.format_ratio(r["deltakit_mixed/peft_mixed"]["median"])]]
    v = m["vs_deltas"]
    sweep_rows = [[pt["deltas"], f"{pt['deltakit_samples_per_s']:.1f}", f"{pt['peft_samples_per_s']:.1f}",
                   common.format_ratio(pt["throughput_deltakit/peft"]["median"]),
                   f"{pt.get('deltakit_added_ms', float('nan')):.1f} ms", f"{pt.get('peft_added_ms', float('nan')):.1f} ms"]
                  for pt in v["points"]]
    out = [
        ("Switching the active delta (CPU clock, median per switch)",
         ["model", "deltakit switch()", "peft set_adapter()", "peft disable_adapter() enter+exit", "deltakit / peft set"],
         switch_rows),
        ("Mixed batch vs one delta on the whole batch (paired median ratios)",
         ["setting", "deltakit mixed / single", "peft mixed / single", "deltakit mixed / peft mixed"], mixed_rows),
        (f"Mixed-batch throughput vs distinct deltas (batch {v['batch']} x {v['seq']}, {v['loaded']} loaded; the "
         f"'adds' columns are medians of per-round differences to the bare backbone, negative when below the noise)",
         ["distinct deltas", "deltakit samples/s", "peft samples/s", "deltakit / peft throughput",
          "deltakit adds (vs bare backbone)", "peft adds"], sweep_rows),
    ]
    st = section.get("settings")
    if st:
        rows = []
        for pt in st["points"]:
            r, sps = pt["ratios"], pt["samples_per_s"]
            step = (f"prefill ({pt['tokens_per_sample']} tokens)" if pt["step"] == "prefill"
                    else f"decode (1 token, KV cache {st['prompt']}; per step, {pt.get('steps_per_sample', 1)} steps "
                         f"per route() block)")
            rows.append([f"{pt['targets']} ({pt['sites']} sites)", step, f"{sps['base']:.1f}", f"{sps['deltakit']:.1f}",
                         f"{sps['peft']:.1f}", common.format_ratio(r["peft/deltakit"]["median"]),
                         common.format_ratio(r["deltakit/base"]["median"]), common.format_ratio(r["peft/base"]["median"]),
                         f"{pt['max_abs_diff_deltakit_vs_peft']:.1e}"])
        out.append((
            f"Mixed batch at {st['deltas']} deltas, batch {st['batch']}, every sample its own delta (LoRA r={st['lora_r']};"
            f" CPU clock, {st['rounds']} interleaved rounds, paired median ratios; 'peft / bare' is the ceiling of "
            f"'deltakit / peft': the ratio deltakit would reach if routing cost nothing)",
            ["LoRA on", "step", "bare samples/s", "deltakit samples/s", "peft samples/s", "deltakit / peft throughput",
             "deltakit time / bare", "peft time / bare (ceiling)", "max |deltakit - peft|"], rows))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: print the tables and the JSON."""
    parser = argparse.ArgumentParser(description="switching and mixed batches, deltakit vs PEFT")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    common.configure_threads(1)
    section = run(args.quick, log=suite_utils.log_to_stderr(True))
    for title, headers, rows in tables(section):
        common.print_rich_table(title, headers, rows)
    print(json.dumps(common._sanitize(section)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
