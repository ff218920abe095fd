"""Helpers shared by the sections of the benchmark suite (``benchmarks/run_all.py``).

:func:`interleave` is :func:`benchmarks.common.run_interleaved` for calls that need an untimed set-up each time
(PEFT modifies a model in place, so every injection round needs a fresh model): every round prepares each variant
untimed, then times the variants in a rotated order, one call each. :func:`ratios` turns the samples into paired
per-round ratios, the figure every section reports.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from benchmarks import common  # noqa: E402

#: A variant: called untimed with the round index, returns the zero-argument call to time.
Prepare = Callable[[int], Callable[[], Any]]


def quiet() -> None:
    """Silence transformers / peft chatter (deprecations, load reports) so progress lines stay readable."""
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft.*")
    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:  # pragma: no cover - older transformers
        pass


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """Move every object alive now out of the garbage collector's sight for the duration of the block.

    The timing loops call ``gc.collect()`` (untimed) before every timed call; with torch, transformers and peft
    loaded that costs tens of milliseconds each, which dominates the wall time of short calls. Frozen objects
    (the models under test) are not scanned, so each collection only sees what the timed calls left behind.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def interleave(
    variants: Mapping[str, Prepare],
    rounds: int,
    warmup: int = 1,
    progress: Callable[[str], None] | None = None,
) -> common.InterleavedResult:
    """Time variants round-robin in one process, each call preceded by its own untimed set-up.

    Args:
        variants: Name -> preparer; ``prepare(index)`` runs untimed and returns the call to time.
        rounds: Timed rounds.
        warmup: Untimed rounds first (same work, not in the statistics).
        progress: Optional callback receiving one line per round.

    Returns:
        The samples, in the layout of :class:`benchmarks.common.InterleavedResult`.
    """
    names = list(variants)
    result = common.InterleavedResult(
        names=names,
        times={clock: {n: [] for n in names} for clock in common.CLOCKS},
        warmup_times={clock: {n: [] for n in names} for clock in common.CLOCKS},
    )
    for index in range(warmup + rounds):
        order = common.rotated_order(names, index)
        timed = index >= warmup
        sample: dict[str, dict[str, float]] = {}
        for name in order:
            call = variants[name](index)
            gc.collect()
            sample[name] = common.time_call(call)
            del call
        target = result.times if timed else result.warmup_times
        for clock in common.CLOCKS:
            for name in names:
                target[clock][name].append(sample[name][clock])
        if timed:
            result.orders.append(order)
        if progress is not None:
            label = f"round {index - warmup + 1}/{rounds}" if timed else f"warm-up {index + 1}/{warmup}"
            progress(label + "  " + "  ".join(f"{n}={sample[n]['cpu'] * 1e3:.2f}ms" for n in names))
    return result


def ratios(
    result: common.InterleavedResult, pairs: Sequence[tuple[str, str]], clock: str = "cpu"
) -> dict[str, dict[str, Any]]:
    """Paired per-round ratios ``num/den`` (median and quartiles; the per-round list is dropped for brevity).

    Args:
        result: Samples from :func:`interleave` or :func:`benchmarks.common.run_interleaved`.
        pairs: ``(numerator, denominator)`` variant names; pairs naming an absent variant are skipped.
        clock: Which clock (``cpu`` or ``wall``).

    Returns:
        ``{"num/den": summary}``.
    """
    out: dict[str, dict[str, Any]] = {}
    times = result.times[clock]
    for num, den in pairs:
        if num in times and den in times:
            summary = common.paired_ratio(times[num], times[den])
            summary.pop("ratios", None)
            out[f"{num}/{den}"] = summary
    return out


def stats(result: common.InterleavedResult, clock: str = "cpu") -> dict[str, dict[str, float]]:
    """Per-variant :func:`benchmarks.common.summarize` of one clock's samples."""
    return {name: common.summarize(samples) for name, samples in result.times[clock].items()}


def log_to_stderr(enabled: bool) -> Callable[[str], None]:
    """A progress callback printing to stderr, or a no-op."""
    if not enabled:
        return lambda line: None
    return lambda line: print(line, file=sys.stderr, flush=True)
