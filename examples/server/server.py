"""A many-delta inference server: one backbone, a store of deltas, requests batched across deltas.

Each request names its delta. Requests that arrive close together are collected into one routed batch (dynamic
batching: the first request waits at most ``max_wait_ms`` for company, a batch holds at most ``max_batch`` rows
and at most as many distinct deltas as the group may keep materialised) and run in one forward (``/v1/classify``:
the ``top_k`` most likely next tokens, best first, each with its logit and probability; ``label`` and ``score``
are the best one) or one ``generate()`` (``/v1/generate``: greedy tokens) inside ``DeltaGroup.route``. Only
requests of the same kind and the same input length share a batch, so no padding changes a result: every answer
equals the request's delta run alone (to rounding).

Errors are answered before a request joins a batch and never reach the others: an unknown delta (404), an input
longer than ``max_input_tokens`` or asking more than ``max_new_tokens`` (413), token ids outside the vocabulary, a
``top_k`` outside ``1..max_top_k`` or malformed JSON (422). A client that disconnects is dropped from the batch it
waits for (or its result discarded) and counted in ``/v1/stats``.

Run::

    pip install 'delta-tuning-kit[serve]'
    python examples/server/server.py --tiny --port 8000      # a random tiny Llama and 50 random LoRAs
    curl -s localhost:8000/v1/classify -d '{"delta": "d3", "input_ids": [5, 6, 7], "top_k": 3}'
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from torch import nn

_REPO_ROOT = Path(__file__).resolve().parents[2]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from deltakit import DeltaGroup, LoraModel  # noqa: E402


class Prompt(BaseModel):
    """What every request names: a delta and the token ids to run it on."""

    delta: str | None = Field(description="the delta's name in the group (null: the backbone)")
    input_ids: list[int]


class ClassifyRequest(Prompt):
    """``/v1/classify``: the ``top_k`` most likely next tokens after ``input_ids`` with ``delta``."""

    top_k: int = Field(default=5, description="how many of the best tokens to answer, best first")


class GenerateRequest(Prompt):
    """``/v1/generate``: ``max_new_tokens`` greedy tokens after ``input_ids`` with ``delta``."""

    max_new_tokens: int = 8


@dataclass
class Job:
    """One request waiting for its batch."""

    kind: str  # "classify" or "generate"
    delta: str | None
    input_ids: list[int]
    max_new_tokens: int = 0
    top_k: int = 0  # classify: how many tokens to answer
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    @property
    def key(self) -> tuple[str, int, int]:
        """Jobs with equal keys can share a batch (same kind, length and generation length: no padding)."""
        return (self.kind, len(self.input_ids), self.max_new_tokens)


class Batcher:
    """Collects jobs into routed batches and runs them on one worker thread (the model runs one batch at a time;
    torch uses the cores inside it).

    Args:
        model: The backbone (eval mode), a causal LM.
        group: Its :class:`DeltaGroup` (registered or loaded deltas).
        max_batch: Most rows per batch.
        max_wait_ms: Longest a first job waits for others before its batch runs.
    """

    def __init__(self, model: nn.Module, group: DeltaGroup, max_batch: int = 32, max_wait_ms: float = 5.0) -> None:
        self.model, self.group = model, group
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        limit = group.max_active
        self.max_distinct = max_batch if limit is None else max(1, limit - len(group.active))
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.held: list[Job] = []  # taken from the queue but left for a later batch
        self.stats = {"batches": 0, "rows": 0, "cancelled": 0, "failed": 0}
        self.running = threading.Event()  # cleared by hold(): the worker waits between batches
        self.running.set()
        self.thread = threading.Thread(target=self._run, name="deltakit-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        self.jobs.put(job)
        return job.future

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Keep the worker from starting batches while the block runs (maintenance, e.g. registering deltas or
        switching; jobs queue up meanwhile and are batched afterwards)."""
        self.running.clear()
        try:
            yield
        finally:
            self.running.set()

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    # -------------------------------------------------------------- the worker
    def _next(self, timeout: float | None) -> Job | None | bool:
        """The next job (held ones first); ``False`` when none came in time, ``None`` to stop."""
        if self.held:
            return self.held.pop(0)
        try:
            return self.jobs.get(timeout=timeout)
        except queue.Empty:
            return False

    def _collect(self, first: Job) -> list[Job]:
        """``first`` and the jobs that can join it within the wait (same key, room for their delta)."""
        batch, deltas, later = [first], {first.delta} - {None}, []
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            job = self._next(max(0.0, deadline - time.monotonic()))
            if job is False:
                break
            if job is None:
                later.append(job)
                break
            new = {job.delta} - {None} - deltas
            if job.key != first.key or len(deltas | new) > self.max_distinct:
                later.append(job)
                continue
            batch.append(job)
            deltas |= new
        self.held = later + self.held
        return batch

    def _run(self) -> None:
        while True:
            first = self._next(None)
            if first is None:
                return
            if first is False:
                continue
            self.running.wait()
            # A job whose client left before its batch ran was cancelled: skipped here.
            batch = [j for j in self._collect(first) if j.future.set_running_or_notify_cancel()]
            if batch:
                self._execute(batch)

    def _execute(self, batch: list[Job]) -> None:
        # Rows sorted by delta: the segmented routing path then needs no permutation.
        batch.sort(key=lambda j: (j.delta is None, j.delta or ""))
        names = [j.delta for j in batch]
        ids = torch.tensor([j.input_ids for j in batch], dtype=torch.long)
        try:
            with torch.inference_mode(), self.group.route(names):
                if batch[0].kind == "classify":
                    results: list[Any] = top_k_answers(last_logits(self.model, ids), [j.top_k for j in batch])
                else:
                    out = self.model.generate(
                        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=batch[0].max_new_tokens,
                        min_new_tokens=batch[0].max_new_tokens, do_sample=False, pad_token_id=0,
                    )
                    results = [row[ids.shape[1]:].tolist() for row in out]
        except Exception as exc:  # every job of the batch gets the error; the server answers 500 with it
            self.stats["failed"] += len(batch)
            for job in batch:
                job.future.set_exception(exc)
            return
        self.stats["batches"] += 1
        self.stats["rows"] += len(batch)
        for job, result in zip(batch, results):
            job.future.set_result(result)


@functools.cache
def _keeps_last_logits(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def last_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The logits at the last position, ``(rows, vocab)``. A transformers causal LM told ``logits_to_keep=1`` runs
    its output head on that position only: with a vocabulary of 8,000 and 16-token prompts, the head over every
    position was a quarter of the forward's work, all of it thrown away."""
    extra = {"logits_to_keep": 1} if _keeps_last_logits(type(model)) else {}
    return model(input_ids=ids, **extra).logits[:, -1]


def top_k_answers(logits: torch.Tensor, ks: list[int]) -> list[dict[str, Any]]:
    """Row ``i``'s answer: its ``ks[i]`` most likely tokens, best first, each with its logit and its probability
    (softmax over the whole vocabulary); ``label`` / ``score`` are the best token and its probability.

    A client of a classification endpoint needs the label and a few alternatives, not the vocabulary: sending the
    last position's ~8,000 logits as JSON cost as much as the batched forward that produced them.
    """
    k = max(ks)
    values, ids = logits.float().topk(k, dim=-1)  # sorted, best first
    probs = (values - logits.float().logsumexp(-1, keepdim=True)).exp()
    answers = []
    for tokens, row_logits, row_probs, k_row in zip(ids.tolist(), values.tolist(), probs.tolist(), ks):
        top = [{"token": t, "logit": v, "prob": p} for t, v, p in zip(tokens[:k_row], row_logits, row_probs)]
        answers.append({"label": tokens[0], "score": row_probs[0], "top_k": top})
    return answers


async def disconnected(request: Request) -> None:
    """Returns when the client has closed the connection. The body was read already, so the server's next message
    for this request is ``http.disconnect`` (sent when the connection drops, or once the response went out)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(
    model: nn.Module, group: DeltaGroup, *, max_batch: int = 32, max_wait_ms: float = 5.0,
    max_input_tokens: int = 256, max_new_tokens: int = 64, max_top_k: int = 50,
) -> Any:
    """The FastAPI application (the batcher starts with it and stops at shutdown)."""
    from contextlib import asynccontextmanager

    vocab = model.get_input_embeddings().num_embeddings
    state: dict[str, Batcher] = {}

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        state["batcher"] = app.state.batcher = Batcher(model, group, max_batch, max_wait_ms)
        yield
        state["batcher"].close()

    app = FastAPI(title="deltakit many-delta server", lifespan=lifespan)

    def check(body: Prompt, new_tokens: int = 0) -> None:
        if body.delta is not None and body.delta not in group:
            raise HTTPException(404, f"Unknown delta {body.delta!r}: this server has {len(group)} deltas "
                                     f"(GET /v1/deltas lists them).")
        if not body.input_ids or len(body.input_ids) > max_input_tokens:
            raise HTTPException(413, f"input_ids has {len(body.input_ids)} tokens; this server takes 1 to "
                                     f"{max_input_tokens} per request.")
        if not all(0 <= t < vocab for t in body.input_ids):
            raise HTTPException(422, f"input_ids must be token ids in [0, {vocab}).")
        if not 1 <= new_tokens <= max_new_tokens and new_tokens != 0:
            raise HTTPException(413, f"max_new_tokens={new_tokens}; this server generates 1 to {max_new_tokens}.")

    async def wait(request: Request, job: Job) -> Any:
        """The job's result, or ``None`` when the client went away first (the job is dropped)."""
        future = asyncio.wrap_future(state["batcher"].submit(job))
        # Waits for whichever comes first, the result or the client leaving, with no polling: polling
        # is_disconnected() every 20 ms cost each waiting request a wake-up (and a timer) per period.
        gone = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({future, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not future.done():
            job.future.cancel()  # not started: the worker skips it; started: its result is dropped
            state["batcher"].stats["cancelled"] += 1
            return None
        try:
            return future.result()
        except Exception as exc:
            raise HTTPException(500, f"The batch failed: {type(exc).__name__}: {exc}") from None

    # Answers are plain JSON made by json.dumps (JSONResponse), not FastAPI's default encoder, which walks a
    # returned value element by element in Python.
    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request) -> JSONResponse:
        check(body)
        if not 1 <= body.top_k <= min(max_top_k, vocab):
            raise HTTPException(422, f"top_k={body.top_k}; this server answers 1 to {min(max_top_k, vocab)} tokens.")
        answer = await wait(request, Job("classify", body.delta, body.input_ids, top_k=body.top_k))
        if answer is None:
            return Response(status_code=499)  # the client closed the connection: nobody reads this
        return JSONResponse({"delta": body.delta, **answer})

    @app.post("/v1/generate")
    async def generate(body: GenerateRequest, request: Request) -> JSONResponse:
        check(body, body.max_new_tokens)
        tokens = await wait(request, Job("generate", body.delta, body.input_ids, body.max_new_tokens))
        if tokens is None:
            return Response(status_code=499)
        return JSONResponse({"delta": body.delta, "tokens": tokens})

    @app.get("/v1/deltas")
    async def deltas() -> dict[str, Any]:
        return {"deltas": group.names, "resident": group.resident, "max_active": group.max_active}

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        return {**state["batcher"].stats, **group.store_stats}

    return app


def tiny_setup(root: Path, count: int = 50, max_active: int = 8, seed: int = 0) -> tuple[nn.Module, DeltaGroup]:
    """A random tiny Llama and ``count`` random LoRAs (ranks 2/4/8/16) saved under ``root`` and registered."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=0,
    )).eval()
    group = DeltaGroup(model, max_active=max_active)
    generator = torch.Generator().manual_seed(seed + 1)
    for i in range(count):
        path = root / f"d{i}"
        if not path.exists():
            delta = LoraModel(model, lora_r=(2, 4, 8, 16)[i % 4], name=f"d{i}")
            with torch.no_grad():
                for p in delta.parameters():
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
            delta.save_finetuned(path)
            delta.detach()
        group.register(f"d{i}", path)
    return model, group


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a random tiny Llama with random LoRAs (the only model "
                        "this example builds; serve your own with create_app)")
    parser.add_argument("--deltas", type=int, default=50)
    parser.add_argument("--max-active", type=int, default=8)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    if not args.tiny:
        parser.error("pass --tiny (or build your model and group and call create_app)")
    with tempfile.TemporaryDirectory() as root:
        model, group = tiny_setup(Path(root), args.deltas, args.max_active)
        uvicorn.run(create_app(model, group), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
