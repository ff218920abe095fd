"""Fault injection for checkpoint saves, run as its own process by ``tests/checkpoint/test_checkpoint_crash.py``.

One long-lived process imports deltakit once and then forks a fresh saver for every fault (a fork costs
milliseconds, an interpreter with torch and transformers seconds), so hundreds of real ``SIGKILL``s fit in a few
seconds. Usage::

    python -m tests.crash_worker kills DIR N SEED      # N kills of a process saving in a loop
    python -m tests.crash_worker full_disk DIR         # a save under RLIMIT_FSIZE
    python -m tests.crash_worker writers DIR N         # two processes saving N times each, one reader

Each prints one JSON line of figures; the test asserts on them.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import sys
import time

import torch

torch.set_num_threads(1)  # before any torch op: no thread pool, so forking stays safe

from torch import nn  # noqa: E402

from deltakit import AutoDeltaModel, CheckpointError, LoraModel  # noqa: E402
from deltakit.io.transaction import PENDING, STAGING_PREFIX  # noqa: E402

BLOCKS, WIDTH = 8, 64


class Blocks(nn.Module):
    """``blocks.<i>.proj``: a plain backbone (no transformers), quick to build."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential() for _ in range(BLOCKS))
        for block in self.blocks:
            block.add_module("proj", nn.Linear(WIDTH, WIDTH))


def make_delta(version: int) -> LoraModel:
    """Delta ``version`` (0 = old, 1 = new): other values and another ``lora_alpha`` (so a config/weights mix of
    the two would be a different delta, not only different numbers)."""
    delta = LoraModel(Blocks(), modified_modules=["proj"], lora_r=8, lora_alpha=8 + 8 * version)
    gen = torch.Generator().manual_seed(1000 + version)
    with torch.no_grad():
        for p in delta.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return delta


def which(path: str, expected: list[dict[str, torch.Tensor]], alphas: list[float]) -> int:
    """Load ``path`` onto a fresh backbone: the index of the delta it equals exactly, -1 if none, -2 if refused."""
    try:
        loaded = AutoDeltaModel.from_finetuned(path, backbone_model=Blocks())
    except CheckpointError:
        return -2
    state = loaded.delta_state_dict()
    for index, want in enumerate(expected):
        if loaded.config.lora_alpha == alphas[index] and set(state) == set(want) and all(
            torch.equal(state[k], want[k]) for k in want
        ):
            return index
    return -1


def leftovers(path: str) -> dict[str, int]:
    names = os.listdir(path)
    return {
        "staging": sum(n.startswith(STAGING_PREFIX) for n in names),
        "pending": sum(n == PENDING for n in names),
        "other": sum(n.startswith(".") and not n.startswith(STAGING_PREFIX) and n != PENDING for n in names),
    }


def _saver(path: str, deltas: list[LoraModel], start: int) -> None:
    """Child: save the deltas in turn, forever (until killed)."""
    i = start
    while True:
        deltas[i % 2].save_finetuned(path)
        i += 1


def kills(path: str, count: int, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    deltas = [make_delta(0), make_delta(1)]
    expected = [{k: v.detach().clone() for k, v in d.delta_state_dict().items()} for d in deltas]
    alphas = [d.config.lora_alpha for d in deltas]
    deltas[0].save_finetuned(path)
    started = time.perf_counter()
    for _ in range(5):
        deltas[1].save_finetuned(path)
    save_s = (time.perf_counter() - started) / 5
    figures = {"kills": 0, "old": 0, "new": 0, "neither": 0, "refused": 0, "mid_save": 0, "pending_seen": 0,
               "max_staging": 0, "max_pending": 0, "max_other": 0, "save_ms": round(save_s * 1e3, 2)}
    for round_ in range(count):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            try:
                _saver(path, deltas, round_)
            finally:
                os._exit(3)
        # Kill within the first few saves, at a uniformly random moment: every phase of a save gets hit.
        time.sleep(rng.uniform(0.0, 3.0 * save_s))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        figures["kills"] += 1
        left = leftovers(path)
        figures["mid_save"] += bool(left["staging"] or left["pending"])
        figures["pending_seen"] += bool(left["pending"])
        for key in ("staging", "pending", "other"):
            figures[f"max_{key}"] = max(figures[f"max_{key}"], left[key])
        outcome = which(path, expected, alphas)
        figures[{0: "old", 1: "new", -1: "neither", -2: "refused"}[outcome]] += 1
    deltas[0].save_finetuned(path)  # a completed save removes what crashed saves left
    figures["leftovers_after_a_save"] = sum(leftovers(path).values())
    figures["final_is_old"] = which(path, expected, alphas) == 0
    return figures


def full_disk(path: str) -> dict[str, object]:
    """Save delta 1 over delta 0 in a child whose file size limit is smaller than the weights file."""
    deltas = [make_delta(0), make_delta(1)]
    expected = [{k: v.detach().clone() for k, v in d.delta_state_dict().items()} for d in deltas]
    deltas[0].save_finetuned(path)
    before = {n: open(os.path.join(path, n), "rb").read() for n in os.listdir(path)}
    results = {}
    for limit in (0, 100, 4096, 30_000):  # nothing, inside the header, inside the data, almost everything
        pid = os.fork()
        if pid == 0:  # pragma: no cover
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes then fail with EFBIG instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            try:
                deltas[1].save_finetuned(path)
            except CheckpointError as exc:
                os._exit(0 if "unchanged" in str(exc) else 4)
            except BaseException:
                os._exit(5)
            os._exit(6)  # the save succeeded although it could not have
        _, status = os.waitpid(pid, 0)
        results[str(limit)] = os.waitstatus_to_exitcode(status)
    after = {n: open(os.path.join(path, n), "rb").read() for n in os.listdir(path)}
    return {"exit_codes": results, "files_unchanged": after == before,
            "loads_old": which(path, expected, [d.config.lora_alpha for d in deltas]) == 0}


def writers(path: str, count: int) -> dict[str, object]:
    """Two processes save deltas 0 and 1 ``count`` times each into one directory while this one loads."""
    deltas = [make_delta(0), make_delta(1)]
    expected = [{k: v.detach().clone() for k, v in d.delta_state_dict().items()} for d in deltas]
    alphas = [d.config.lora_alpha for d in deltas]
    deltas[0].save_finetuned(path)
    pids = []
    for version in (0, 1):
        pid = os.fork()
        if pid == 0:  # pragma: no cover
            code = 0
            try:
                for _ in range(count):
                    deltas[version].save_finetuned(path)
            except BaseException:
                code = 7
            os._exit(code)
        pids.append(pid)
    seen = {"reads": 0, "old": 0, "new": 0, "neither": 0, "refused": 0}
    running = set(pids)
    codes = []
    while running:
        outcome = which(path, expected, alphas)
        seen["reads"] += 1
        seen[{0: "old", 1: "new", -1: "neither", -2: "refused"}[outcome]] += 1
        for pid in list(running):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                running.discard(pid)
                codes.append(os.waitstatus_to_exitcode(status))
    seen["writer_exit_codes"] = codes
    seen["final"] = which(path, expected, alphas)
    seen["leftovers"] = sum(leftovers(path).values())
    return seen


def main(argv: list[str]) -> int:
    command, path, *rest = argv
    if command == "kills":
        out = kills(path, int(rest[0]), int(rest[1]))
    elif command == "full_disk":
        out = full_disk(path)
    elif command == "writers":
        out = writers(path, int(rest[0]))
    else:
        raise SystemExit(f"unknown command {command!r}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
