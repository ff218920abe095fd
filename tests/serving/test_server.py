"""The example server (examples/server/server.py) on 127.0.0.1: batched answers equal single-delta ones, errors
stay with their request."""

from __future__ import annotations

import http.client
import json
import pathlib
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from deltakit import DeltaGroup  # noqa: E402
from tests.helpers import REPO_ROOT, load_script  # noqa: E402
from tests.tolerances import assert_same_function  # noqa: E402

DELTAS = 12


_server = load_script(REPO_ROOT / "examples/server/server.py", "deltakit_example_server")
create_app, tiny_setup = _server.create_app, _server.tiny_setup


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Any, DeltaGroup, pathlib.Path]]:
    root = tmp_path_factory.mktemp("deltas")
    model, group = tiny_setup(root, count=DELTAS, max_active=4)
    app = create_app(model, group, max_batch=8, max_wait_ms=20, max_input_tokens=16, max_new_tokens=6)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not (srv.started and srv.servers) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.started, "the server did not start"
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield port, model, group, root, app
    srv.should_exit = True
    thread.join(timeout=30)


def post(port: int, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def get(port: int, path: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def alone(root: pathlib.Path, name: str | None, ids: list[int], new_tokens: int = 0) -> Any:
    """The request's delta alone, on a fresh copy of the tiny model (same seed), no server, no batching."""
    model, _ = tiny_setup(root, count=0)
    group = DeltaGroup(model)
    if name is not None:
        group.load(name, root / name, attach=True)
    x = torch.tensor([ids])
    with torch.no_grad():
        if not new_tokens:
            return model(input_ids=x).logits[0, -1]
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return out[0, x.shape[1]:].tolist()


def assert_classify_answer(answer: dict[str, Any], expected: torch.Tensor, model: Any, k: int) -> None:
    """A /v1/classify answer against the request's delta alone: the ``k`` best tokens, best first, with their logits
    and probabilities (near-ties may swap two tokens; their values still agree to rounding)."""
    top = answer["top_k"]
    tokens = [entry["token"] for entry in top]
    assert len(top) == k and answer["label"] == tokens[0] and answer["score"] == top[0]["prob"]
    logits = torch.tensor([entry["logit"] for entry in top])
    assert_same_function(logits, expected[tokens], model=model)  # each named token's own logit
    assert_same_function(logits, expected.topk(k).values, model=model)  # and they are the k best, in order
    log_probs = torch.tensor([entry["prob"] for entry in top]).log()
    assert_same_function(log_probs, expected.log_softmax(-1)[tokens], model=model, scale=float(expected.abs().max()))


def requests(count: int, seed: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        delta = None if i % 7 == 3 else f"d{int(torch.randint(0, DELTAS, (1,), generator=g))}"
        length = 5 if i % 3 else 8
        out.append({"delta": delta, "input_ids": torch.randint(2, 100, (length,), generator=g).tolist()})
    return out


def test_concurrent_classify_requests_are_batched_and_each_equals_its_delta_alone(server: Any) -> None:
    port, model, group, root, app = server
    before = get(port, "/v1/stats")
    bodies = requests(24, seed=1)
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda b: post(port, "/v1/classify", b), bodies))
    stats = get(port, "/v1/stats")
    assert all(status == 200 for status, _ in answers), answers[:2]
    assert stats["rows"] - before["rows"] == 24
    assert stats["batches"] - before["batches"] < 24  # concurrent requests shared batches
    for body, (_, answer) in zip(bodies, answers):
        assert answer["delta"] == body["delta"]
        assert_classify_answer(answer, alone(root, body["delta"], body["input_ids"]), model, 5)  # the default top_k
    assert len(group.resident) <= 4


def test_classify_answers_as_many_tokens_as_asked_within_one_batch(server: Any) -> None:
    port, model, group, root, app = server
    bodies = [{**b, "top_k": k} for b, k in zip(requests(8, seed=5), (1, 3, 10, 1, 50, 2, 7, 1))]
    before = get(port, "/v1/stats")
    with ThreadPoolExecutor(max_workers=8) as pool:
        with app.state.batcher.hold():  # queued together: they share batches whatever their top_k
            futures = [pool.submit(post, port, "/v1/classify", b) for b in bodies]
            deadline = time.monotonic() + 10
            # (the worker has taken the first job already and waits, holding it, for the end of hold())
            while app.state.batcher.jobs.qsize() < len(bodies) - 1 and time.monotonic() < deadline:
                time.sleep(0.01)
        answers = [f.result() for f in futures]
    assert get(port, "/v1/stats")["batches"] - before["batches"] < len(bodies)
    for body, (status, answer) in zip(bodies, answers):
        assert status == 200
        assert_classify_answer(answer, alone(root, body["delta"], body["input_ids"]), model, body["top_k"])


def test_last_logits_runs_the_head_on_the_last_position_only_where_the_model_can() -> None:
    from transformers import BertConfig, BertForMaskedLM

    llama, _ = tiny_setup(pathlib.Path("unused"), count=0)
    ids = torch.randint(2, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    positions: list[int] = []
    hook = llama.lm_head.register_forward_hook(lambda m, args, out: positions.append(args[0].shape[1]))
    with torch.no_grad():
        last = _server.last_logits(llama, ids)
        hook.remove()
        assert positions == [1]  # the head ran on one position of seven
        assert_same_function(last, llama(input_ids=ids).logits[:, -1], model=llama)
        bert = BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=64)).eval()  # no logits_to_keep: the full forward
        assert torch.equal(_server.last_logits(bert, ids), bert(input_ids=ids).logits[:, -1])


def test_concurrent_generate_requests_equal_each_delta_alone(server: Any) -> None:
    port, model, group, root, app = server
    bodies = [{**b, "max_new_tokens": 4} for b in requests(10, seed=2)]
    with ThreadPoolExecutor(max_workers=5) as pool:
        answers = list(pool.map(lambda b: post(port, "/v1/generate", b), bodies))
    for body, (status, answer) in zip(bodies, answers):
        assert status == 200
        assert answer["tokens"] == alone(root, body["delta"], body["input_ids"], 4)


def test_bad_requests_get_clear_errors_and_do_not_disturb_others(server: Any) -> None:
    port, model, group, root, app = server
    good = requests(6, seed=3)
    bad = [
        ({"delta": "nope", "input_ids": [3, 4]}, 404, "Unknown delta 'nope'"),
        ({"delta": "d1", "input_ids": list(range(2, 40))}, 413, "1 to 16 per request"),
        ({"delta": "d1", "input_ids": [3, 400]}, 422, "token ids"),
        ({"delta": "d1", "input_ids": [3, 4], "max_new_tokens": 500}, 413, "generates 1 to 6"),
        ({"delta": "d1", "input_ids": [3, 4], "top_k": 0}, 422, "top_k=0; this server answers 1 to 50 tokens"),
        ({"delta": "d1", "input_ids": [3, 4], "top_k": 51}, 422, "top_k=51"),
    ]
    with ThreadPoolExecutor(max_workers=8) as pool:
        good_f = [pool.submit(post, port, "/v1/classify", b) for b in good]
        bad_f = [pool.submit(post, port, "/v1/generate" if "max_new_tokens" in b else "/v1/classify", b)
                 for b, _, _ in bad]
        for future, (_, status, message) in zip(bad_f, bad):
            got_status, answer = future.result()
            assert got_status == status and message in answer["detail"]
        for future, body in zip(good_f, good):
            status, answer = future.result()
            assert status == 200
            assert_classify_answer(answer, alone(root, body["delta"], body["input_ids"]), model, 5)


def test_a_client_disconnect_is_dropped_and_others_are_answered(server: Any) -> None:
    port, model, group, root, app = server
    before = get(port, "/v1/stats")["cancelled"]
    body = json.dumps({"delta": "d2", "input_ids": [5] * 16, "max_new_tokens": 6}).encode()
    with app.state.batcher.hold():  # the jobs queue up: their clients leave before any batch runs
        for _ in range(3):
            raw = socket.create_connection(("127.0.0.1", port))
            raw.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            raw.close()  # gone before the answer
        deadline = time.monotonic() + 10
        while get(port, "/v1/stats")["cancelled"] < before + 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    good = requests(4, seed=4)
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda b: post(port, "/v1/classify", b), good))
    for body_, (status, answer) in zip(good, answers):
        assert status == 200
        assert_classify_answer(answer, alone(root, body_["delta"], body_["input_ids"]), model, 5)
    stats = get(port, "/v1/stats")
    assert stats["cancelled"] == before + 3 and stats["failed"] == 0
