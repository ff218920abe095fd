"""Shared helpers for deltakit benchmarks.

The helpers here are deliberately framework-light so that every benchmark in
``benchmarks/`` measures things the same way:

* **Timing** -- :func:`run_interleaved` runs several variants round-robin in a
  single process (one call of each variant per round, with the order rotated
  every round), so slow drifts of a shared, noisy machine hit every variant
  alike.  :func:`paired_ratio` then compares two variants *per round* and takes
  the median of those ratios, which cancels most of the drift.
* **Statistics** -- :func:`summarize` gives the median, quartiles and
  extremes of a list of samples.
* **Memory** -- :func:`current_rss_bytes`, :func:`peak_rss_bytes` and
  :func:`reset_peak_rss` read and reset the kernel's resident-set high-water
  mark (``VmHWM``), so a child process can measure the peak of one phase only.
  :func:`run_json_child` runs such a child and parses its JSON answer.
* **Output** -- :func:`write_json`, :func:`markdown_table` and
  :func:`print_rich_table` write the same rows to a JSON file, a markdown file
  and the terminal.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

__all__ = [
    "CLOCKS",
    "InterleavedResult",
    "configure_threads",
    "current_rss_bytes",
    "environment_info",
    "format_bytes",
    "format_ratio",
    "format_seconds",
    "markdown_table",
    "paired_ratio",
    "peak_rss_bytes",
    "print_rich_table",
    "reset_peak_rss",
    "rotated_order",
    "run_interleaved",
    "run_json_child",
    "summarize",
    "tensor_memory_peak",
    "time_call",
    "trim_memory",
    "write_json",
    "write_text",
]


# --------------------------------------------------------------------------
# Threads and environment
# --------------------------------------------------------------------------


def configure_threads(num_threads: int) -> None:
    """Pin torch's intra-op thread pool to ``num_threads`` threads.

    On a small shared machine one thread gives by far the most stable timings;
    more threads mostly add scheduler noise.  The inter-op pool is left alone
    (it can only be set once per process and a training step does not use it).

    Args:
        num_threads: Number of intra-op threads, at least 1.

    Raises:
        ValueError: If ``num_threads`` is smaller than 1.
    """
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    import torch

    torch.set_num_threads(num_threads)


def environment_info() -> dict[str, Any]:
    """Describe the software and hardware the benchmark ran on.

    Returns:
        A JSON-serialisable dict with Python, torch, transformers and peft
        versions, the CPU model, the number of CPUs and torch's thread count.
    """
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
    }
    for name in ("transformers", "peft", "deltakit"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "unknown")
        except Exception:  # noqa: BLE001 - any import failure means "absent"
            info[name] = None
    return info


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


CLOCKS: tuple[str, ...] = ("cpu", "wall")
"""Clocks every timed call is measured with (see :func:`time_call`)."""


def time_call(fn: Callable[[], Any]) -> dict[str, float]:
    """Time a single call of ``fn`` on two clocks.

    ``wall`` is :func:`time.perf_counter`; ``cpu`` is
    :func:`time.process_time`, the CPU time of all threads of this process.
    With one compute thread the CPU clock is much less sensitive to other
    processes competing for the cores (being descheduled costs wall time, not
    CPU time), so on a shared machine it is the better measure of the work a
    call does. With several threads it also counts spin-waiting, so prefer
    ``wall`` there.

    Args:
        fn: Zero-argument callable.

    Returns:
        ``{"wall": seconds, "cpu": seconds}``.
    """
    wall = time.perf_counter()
    cpu = time.process_time()
    fn()
    return {"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall}


def rotated_order(names: Sequence[str], round_index: int) -> list[str]:
    """Return ``names`` rotated left by ``round_index`` positions.

    Args:
        names: Variant names in their canonical order.
        round_index: Zero-based round number.

    Returns:
        The rotated list; every name goes first equally often over
        ``len(names)`` consecutive rounds.
    """
    if not names:
        return []
    shift = round_index % len(names)
    return list(names[shift:]) + list(names[:shift])


@dataclass
class InterleavedResult:
    """Timings of an interleaved run.

    Attributes:
        names: Variant names in canonical order.
        times: ``times[clock][name][r]`` is round ``r``'s sample (seconds) of
            variant ``name`` on ``clock`` (one of :data:`CLOCKS`).
        orders: Order in which the variants ran in each timed round.
        warmup_times: Same layout as ``times``, for the warm-up rounds (not
            used in statistics).
    """

    names: list[str]
    times: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    orders: list[list[str]] = field(default_factory=list)
    warmup_times: dict[str, dict[str, list[float]]] = field(default_factory=dict)


def run_interleaved(
    steps: Mapping[str, Callable[[int], Any]],
    rounds: int,
    warmup: int = 1,
    collect_garbage: bool = True,
    progress: Callable[[str], None] | None = None,
) -> InterleavedResult:
    """Time several variants round-robin in one process.

    Each round calls every variant once, in an order rotated every round (see
    :func:`rotated_order`), so that no variant always follows the same
    neighbour or always runs first.  Warm-up rounds run the same way but are
    kept apart.  Every call is timed on all :data:`CLOCKS`.

    Args:
        steps: Mapping from variant name to a callable taking the global call
            index (warm-up rounds included; use it to pick an input batch so
            that all variants see the same batch in the same round).
        rounds: Number of timed rounds.
        warmup: Number of untimed warm-up rounds run first.
        collect_garbage: Run :func:`gc.collect` (untimed) before each call, so
            that a collection triggered by one variant's garbage is not billed
            to the next variant.
        progress: Optional callback receiving a one-line status per round.

    Returns:
        The collected :class:`InterleavedResult`.
    """
    names = list(steps)
    result = InterleavedResult(
        names=names,
        times={clock: {name: [] for name in names} for clock in CLOCKS},
        warmup_times={clock: {name: [] for name in names} for clock in CLOCKS},
    )
    for index in range(warmup + rounds):
        order = rotated_order(names, index)
        timed = index >= warmup
        sample: dict[str, dict[str, float]] = {}
        for name in order:
            if collect_garbage:
                gc.collect()
            sample[name] = time_call(lambda: steps[name](index))
        target = result.times if timed else result.warmup_times
        for clock in CLOCKS:
            for name in names:
                target[clock][name].append(sample[name][clock])
        if timed:
            result.orders.append(order)
        if progress is not None:
            label = f"round {index - warmup + 1}/{rounds}" if timed else f"warm-up {index + 1}/{warmup}"
            progress(
                label + "  " + "  ".join(
                    f"{n}={sample[n]['cpu']:.3f}s cpu/{sample[n]['wall']:.3f}s wall" for n in names
                )
            )
    return result


# --------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already-sorted values."""
    if not sorted_values:
        return math.nan
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = math.ceil(position)
    weight = position - low
    return float(sorted_values[low] * (1 - weight) + sorted_values[high] * weight)


def summarize(samples: Iterable[float]) -> dict[str, float]:
    """Summarise a list of samples.

    Args:
        samples: Numeric samples (e.g. seconds per step).

    Returns:
        A dict with ``n``, ``median``, ``q1``, ``q3``, ``min``, ``max``,
        ``mean`` and ``rel_iqr`` (interquartile range over the median).  All
        values are NaN (and ``n`` is 0) for an empty input.
    """
    values = sorted(float(v) for v in samples)
    if not values:
        nan = math.nan
        return {"n": 0, "median": nan, "q1": nan, "q3": nan, "min": nan, "max": nan, "mean": nan, "rel_iqr": nan}
    median = statistics.median(values)
    q1 = _quantile(values, 0.25)
    q3 = _quantile(values, 0.75)
    return {
        "n": len(values),
        "median": median,
        "q1": q1,
        "q3": q3,
        "min": values[0],
        "max": values[-1],
        "mean": statistics.fmean(values),
        "rel_iqr": (q3 - q1) / median if median else math.nan,
    }


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, Any]:
    """Median of per-round ratios ``numerator[r] / denominator[r]``.

    Pairing the samples of the same round cancels slow drifts in machine
    speed that would otherwise leak into a ratio of independent medians.

    Args:
        numerator: Samples of the variant on top of the ratio.
        denominator: Samples of the reference variant, same length.

    Returns:
        :func:`summarize` of the per-round ratios, plus ``ratio_of_medians``
        and the list of per-round ``ratios``.

    Raises:
        ValueError: If the two sequences differ in length.
    """
    if len(numerator) != len(denominator):
        raise ValueError(f"paired samples differ in length: {len(numerator)} vs {len(denominator)}")
    ratios = [a / b for a, b in zip(numerator, denominator) if b > 0]
    summary: dict[str, Any] = summarize(ratios)
    num_median = statistics.median(numerator) if numerator else math.nan
    den_median = statistics.median(denominator) if denominator else math.nan
    summary["ratio_of_medians"] = num_median / den_median if den_median else math.nan
    summary["ratios"] = ratios
    return summary


# --------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------


def _status_kib(key: str) -> int | None:
    """Read one ``kB`` field (e.g. ``VmRSS``) of ``/proc/self/status``."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss_bytes() -> int:
    """Current resident set size of this process.

    Returns:
        Bytes resident now (``VmRSS``); falls back to ``ru_maxrss`` where
        ``/proc`` is unavailable.
    """
    kib = _status_kib("VmRSS")
    if kib is None:
        return _ru_maxrss_bytes()
    return kib * 1024


def peak_rss_bytes() -> int:
    """Resident-set high-water mark of this process.

    Returns:
        Bytes (``VmHWM``, which :func:`reset_peak_rss` can reset); falls back
        to ``getrusage(RUSAGE_SELF).ru_maxrss`` where ``/proc`` is unavailable.
    """
    kib = _status_kib("VmHWM")
    if kib is None:
        return _ru_maxrss_bytes()
    return kib * 1024


def _ru_maxrss_bytes() -> int:
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the resident-set high-water mark to the current RSS.

    Uses Linux's ``/proc/self/clear_refs`` (value ``5``, Linux >= 4.0), after
    which :func:`peak_rss_bytes` reports the peak of what runs next only.

    Returns:
        True if the reset worked, False if it is unsupported here (the peak
        then covers the whole life of the process).
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        return False
    peak = _status_kib("VmHWM")
    rss = _status_kib("VmRSS")
    return peak is not None and rss is not None and peak <= rss + 64


def trim_memory() -> None:
    """Collect garbage and hand free heap memory back to the OS.

    Calls glibc's ``malloc_trim(0)`` where available, so that memory freed by
    earlier phases (model loading, temporary copies) is not counted as
    resident when a later phase's baseline is read.
    """
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return
    try:
        libc = ctypes.CDLL(libc_name)
        trim = getattr(libc, "malloc_trim", None)
        if trim is not None:
            trim(0)
    except OSError:
        pass


def tensor_memory_peak(fn: Callable[[], Any]) -> dict[str, int] | None:
    """Peak of live CPU tensor bytes while ``fn`` runs, from torch's profiler.

    Every allocation and free of torch's CPU allocator is recorded (with
    ``profile_memory=True``) and summed in time order; the peak of that sum
    is the most tensor memory ``fn`` held at once on top of what was live
    before.  Unlike RSS this does not depend on the C allocator's caching or
    fragmentation, so it is exact and repeatable -- but it sees only tensors
    allocated by torch's CPU allocator (not, say, oneDNN scratch space or
    Python objects).

    Args:
        fn: Zero-argument callable (e.g. one training step).

    Returns:
        ``{"peak": bytes, "net": bytes, "allocations": count}`` (``net`` is
        what was still live at the end), or None if the profiler's event tree
        is unavailable in this torch version.
    """
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:  # pragma: no cover - depends on the torch build
        return None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        roots = prof.profiler.kineto_results.experimental_event_tree()
    except AttributeError:  # pragma: no cover - private API moved
        return None
    events: list[tuple[int, int]] = []
    stack = list(roots)
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and str(event.extra_fields.device).startswith("cpu"):
            events.append((event.start_time_ns, int(event.extra_fields.alloc_size)))
        stack.extend(event.children)
    events.sort()
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return {"peak": peak, "net": live, "allocations": sum(1 for _, size in events if size > 0)}


# --------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------


def run_json_child(
    argv: Sequence[str],
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run a child process whose last stdout line is a JSON object.

    Args:
        argv: Full command line (e.g. ``[sys.executable, script, ...]``).
        timeout: Seconds before the child is killed.
        env: Extra environment variables layered over ``os.environ``.

    Returns:
        The parsed JSON object.

    Raises:
        RuntimeError: If the child fails, times out or prints no JSON.
    """
    child_env = dict(os.environ)
    if env:
        child_env.update(env)
    try:
        completed = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, env=child_env, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"child timed out after {timeout}s: {' '.join(argv)}") from exc
    if completed.returncode != 0:
        tail = (completed.stderr or completed.stdout or "").strip().splitlines()[-15:]
        raise RuntimeError(f"child exited {completed.returncode}: {' '.join(argv)}\n" + "\n".join(tail))
    for line in reversed(completed.stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"child printed no JSON: {' '.join(argv)}")


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _sanitize(value: Any) -> Any:
    """Replace non-finite floats by ``None`` so the JSON stays standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_sanitize(v) for v in value]
    return value


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented, standard JSON (NaN and inf become null).

    Args:
        path: Destination file; parent folders are created.
        data: JSON-serialisable data.

    Returns:
        The written path.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(
        json.dumps(_sanitize(data), indent=2, default=_json_default, allow_nan=False) + "\n", encoding="utf-8"
    )
    return target


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path``, creating parent folders.

    Args:
        path: Destination file.
        text: Content.

    Returns:
        The written path.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    return target


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Render a GitHub-flavoured markdown table.

    Args:
        headers: Column titles.
        rows: Rows of cells (converted with ``str``; ``|`` is escaped).

    Returns:
        The table, ending with a newline.
    """

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |"]
    lines.append("| " + " | ".join("---" for _ in headers) + " |")
    for row in rows:
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def print_rich_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], file: Any = None) -> None:
    """Print a table with :mod:`rich` (plain text if rich is missing).

    Args:
        title: Table title.
        headers: Column titles.
        rows: Rows of cells.
        file: Stream to print to (default stdout).
    """
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a dev dependency
        print(title, file=file)
        print(markdown_table(headers, rows), file=file)
        return
    table = Table(title=title)
    for index, header in enumerate(headers):
        table.add_column(str(header), justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*(str(v) for v in row))
    Console(file=file, width=max(120, len(headers) * 17)).print(table)


def format_seconds(seconds: float | None) -> str:
    """Format a duration compactly (``12.3 ms``, ``1.234 s``).

    Args:
        seconds: Duration, or None/NaN.

    Returns:
        The formatted string, ``-`` when missing.
    """
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.3f} s"


def format_bytes(num_bytes: float | None) -> str:
    """Format a byte count in MiB or GiB.

    Args:
        num_bytes: Bytes, or None/NaN.

    Returns:
        The formatted string, ``-`` when missing.
    """
    if num_bytes is None or not math.isfinite(num_bytes):
        return "-"
    mib = num_bytes / 2**20
    if abs(mib) >= 1024:
        return f"{mib / 1024:.2f} GiB"
    return f"{mib:.1f} MiB"


def format_ratio(ratio: float | None, digits: int = 3) -> str:
    """Format a ratio such as ``1.023``.

    Args:
        ratio: The ratio, or None/NaN.
        digits: Decimal places.

    Returns:
        The formatted string, ``-`` when missing.
    """
    if ratio is None or not math.isfinite(ratio):
        return "-"
    return f"{ratio:.{digits}f}"
