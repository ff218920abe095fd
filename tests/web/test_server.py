"""The picker's HTTP surface without a browser: token, POST-only API, Host/Origin checks, loopback binding, bounded
and malformed requests, timeouts, and the API object's lifecycle (start, url, wait, stop)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from deltakit import LoraModel, find_modules
from deltakit.errors import DeltaError
from deltakit.site import DeltaSite
from deltakit.structures import tiny_model
from deltakit.web import server as server_module
from deltakit.web.picker import Picker, PickerCancelled
from deltakit.web.server import MAX_BODY, TOKEN_HEADER
from tests.helpers import assert_state_equal, hook_counts, snapshot


@pytest.fixture
def picker() -> Iterator[Picker]:
    p = Picker(tiny_model("llama", num_layers=2), "lora").start()
    try:
        yield p
    finally:
        p.stop()


def request(p: Picker, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
            token: bool = True) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", p.server.port, timeout=10)
    hdrs = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        hdrs[TOKEN_HEADER] = p.server.token
    hdrs.update(headers or {})
    conn.request(method, path, body=body, headers=hdrs)
    response = conn.getresponse()
    out = response.status, dict(response.getheaders()), response.read()
    conn.close()
    return out


def post(p: Picker, path: str, payload: object, **kw: object) -> tuple[int, dict]:
    status, _, data = request(p, "POST", path, json.dumps(payload).encode(), **kw)  # type: ignore[arg-type]
    return status, json.loads(data)


def test_bound_to_loopback_on_an_ephemeral_port(picker: Picker) -> None:
    url = urlsplit(picker.url)
    assert url.hostname == "127.0.0.1" and url.port == picker.server.port > 0
    assert picker.server._httpd.server_address[0] == "127.0.0.1"
    assert len(picker.server.token) >= 40 and f"token={picker.server.token}" in picker.url


def test_the_page_needs_the_token(picker: Picker) -> None:
    page = "/?token=" + picker.server.token
    status, headers, body = request(picker, "GET", page, token=False)
    assert status == 200 and b"deltakit picker" in body
    assert "script-src 'nonce-" in headers["Content-Security-Policy"] and headers["X-Frame-Options"] == "DENY"
    for bad in ("/", "/?token=", "/?token=" + picker.server.token[:-1] + "x", page + "&token=again"):
        assert request(picker, "GET", bad, token=False)[0] == 403
    assert request(picker, "GET", "/other?token=" + picker.server.token, token=False)[0] == 404


def test_api_calls_need_the_token_header_and_post(picker: Picker) -> None:
    assert post(picker, "/api/tree", {})[0] == 200
    assert post(picker, "/api/tree", {}, token=False)[0] == 403
    assert post(picker, "/api/tree", {}, token=False, headers={TOKEN_HEADER: "guess"})[0] == 403
    assert post(picker, "/api/tree", {}, token=False, headers={TOKEN_HEADER: "é" * 43})[0] == 403  # not ASCII
    assert request(picker, "GET", "/api/tree?token=" + picker.server.token)[0] == 405
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
        assert request(picker, method, "/api/submit", b"{}")[0] == 405
    assert post(picker, "/api/nothing", {})[0] == 404


def test_host_and_origin_are_checked(picker: Picker) -> None:
    port = picker.server.port
    assert post(picker, "/api/tree", {}, headers={"Host": f"localhost:{port}"})[0] == 200
    status, answer = post(picker, "/api/tree", {}, headers={"Host": f"evil.example:{port}"})  # DNS rebinding
    assert status == 403 and "Host" in answer["error"]
    assert request(picker, "GET", "/?token=" + picker.server.token, headers={"Host": "evil.example"})[0] == 403
    assert post(picker, "/api/tree", {}, headers={"Origin": f"http://127.0.0.1:{port}"})[0] == 200
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{port + 1}"):
        assert post(picker, "/api/submit", {"selection": ["norm"]}, headers={"Origin": origin})[0] == 403
    assert post(picker, "/api/tree", {}, headers={"Sec-Fetch-Site": "cross-site"})[0] == 403
    assert picker.wait(timeout=0) is None  # nothing refused reached the selection


def test_malformed_and_oversized_requests(picker: Picker) -> None:
    tree = "/api/tree"
    assert request(picker, "POST", tree, b"{}", headers={"Content-Type": "text/plain"})[0] == 415
    assert request(picker, "POST", tree, b"{nope")[0] == 400
    assert request(picker, "POST", tree, b"[1, 2]")[0] == 400
    assert request(picker, "POST", tree, b'{"a": NaN}')[0] == 400
    assert request(picker, "POST", tree, b"\xff\xfe")[0] == 400
    assert post(picker, "/api/preview", {"selection": "q_proj"})[0] == 400
    assert post(picker, "/api/preview", {"selection": ["no.such.module"]})[0] == 422
    assert post(picker, "/api/preview", {"selection": ["norm"], "options": []})[0] == 400
    assert post(picker, "/api/preview", {"selection": ["norm"]})[0] == 422  # LoRA cannot modify an RMSNorm
    # a declared body over the limit is refused before it is read
    conn = socket.create_connection(("127.0.0.1", picker.server.port), timeout=10)
    conn.sendall((f"POST {tree} HTTP/1.1\r\nHost: 127.0.0.1:{picker.server.port}\r\n{TOKEN_HEADER}: "
                  f"{picker.server.token}\r\nContent-Type: application/json\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n"
                  ).encode())
    assert b" 413 " in conn.recv(4096).split(b"\r\n")[0] + b" "
    conn.close()
    conn = socket.create_connection(("127.0.0.1", picker.server.port), timeout=10)
    conn.sendall((f"POST {tree} HTTP/1.1\r\nHost: 127.0.0.1:{picker.server.port}\r\n{TOKEN_HEADER}: "
                  f"{picker.server.token}\r\nContent-Type: application/json\r\n\r\n").encode())
    assert b" 411 " in conn.recv(4096).split(b"\r\n")[0] + b" "
    conn.close()
    assert request(picker, "GET", "/?token=" + picker.server.token + "&x=" + "a" * 70000, token=False)[0] == 414


def test_a_silent_client_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module._RequestHandler, "timeout", 0.5)
    with Picker(tiny_model("llama", num_layers=1), "lora") as p:
        conn = socket.create_connection(("127.0.0.1", p.server.port), timeout=10)
        conn.sendall(b"POST /api/tree HTTP/1.1\r\n")  # ... and nothing more
        start = time.monotonic()
        assert conn.recv(1024) == b""  # closed by the server
        assert time.monotonic() - start < 5
        conn.close()
        assert post(p, "/api/tree", {})[0] == 200  # the server still answers others


def test_stop_ends_the_thread_and_closes_the_port() -> None:
    p = Picker(tiny_model("llama", num_layers=1), "lora").start()
    thread, port = p.server._thread, p.server.port
    assert thread.is_alive()
    p.stop()
    p.stop()  # idempotent
    assert not thread.is_alive()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_another_interface_only_when_asked_and_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="not only on this machine"):
        p = Picker(tiny_model("llama", num_layers=1), "lora", host="0.0.0.0").start()
    try:
        assert p.server._httpd.server_address[0] == "0.0.0.0"
        assert post(p, "/api/tree", {})[0] == 200
        assert post(p, "/api/tree", {}, headers={"Host": f"evil.example:{p.server.port}"})[0] == 403
    finally:
        p.stop()
    with pytest.raises(DeltaError, match="port"):
        Picker(tiny_model("llama", num_layers=1), "lora", port=70000)


def test_submit_hands_the_matchers_result_to_wait(picker: Picker) -> None:
    assert picker.wait(timeout=0.05) is None
    selection = ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj", "layers.1.mlp.down_proj"]
    status, preview = post(picker, "/api/preview", {"selection": selection, "options": {"lora_r": 4}})
    assert status == 200 and preview["sites"] == selection
    status, answer = post(picker, "/api/submit", {"selection": selection, "options": {"lora_r": 4}})
    assert status == 200 and answer["done"]
    result = picker.wait(timeout=5)
    assert result.sites == selection and result.options == {"lora_r": 4}
    assert [n for n, _ in find_modules(picker.model, result.modified_modules)] == selection
    expected = LoraModel(tiny_model("llama", num_layers=2), modified_modules=result.modified_modules, lora_r=4)
    assert result.parameters == expected.num_delta_parameters() == preview["parameters"]


def test_cancel(picker: Picker) -> None:
    assert post(picker, "/api/cancel", {})[0] == 200
    with pytest.raises(PickerCancelled):
        picker.wait(timeout=5)


def _run_constructor(model, capsys, **kwargs):
    box: dict = {}

    def target() -> None:
        try:
            box["delta"] = LoraModel(model, **kwargs)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.monotonic() + 30
    url = None
    while url is None and time.monotonic() < deadline:
        out = capsys.readouterr().out
        url = next((w for w in out.split() if w.startswith("http://127.0.0.1:")), None)
        time.sleep(0.05)
    assert url is not None, "the constructor printed no URL"
    return thread, box, url


def _post_url(url: str, path: str, payload: object) -> tuple[int, dict]:
    parts = urlsplit(url)
    token = parts.query.split("token=")[1]
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("POST", path, body=json.dumps(payload),
                 headers={"Content-Type": "application/json", TOKEN_HEADER: token})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def test_interactive_modify_on_the_constructor(capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_model("llama", num_layers=2)
    thread, box, url = _run_constructor(model, capsys, interactive_modify=True, lora_r=2)
    status, tree = _post_url(url, "/api/tree", {})
    assert status == 200 and not tree["editable"] and tree["options"]["lora_r"] == 2
    initial = [tree["tree"]["names"][i] for i in tree["initial"]]
    assert initial == [n for n, _ in find_modules(model, ["attn.q", "attn.v"])]  # the default positions, ticked
    assert _post_url(url, "/api/preview", {"selection": initial, "options": {"lora_r": 9}})[0] == 400  # fixed
    chosen = ["layers.1.mlp.gate_proj", "layers.1.mlp.up_proj"]
    assert _post_url(url, "/api/submit", {"selection": chosen})[0] == 200
    thread.join(30)
    delta = box["delta"]
    assert delta.modified_modules == chosen and delta.config.lora_r == 2
    assert [n for n, _ in find_modules(model, delta.config.modified_modules, skip_types=(DeltaSite,))] == chosen


def test_interactive_modify_cancelled_changes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_model("llama", num_layers=1)
    state, hooks = snapshot(model), hook_counts(model)
    thread, box, url = _run_constructor(model, capsys, interactive_modify=True)
    assert _post_url(url, "/api/cancel", {})[0] == 200
    thread.join(30)
    assert isinstance(box["error"], PickerCancelled)
    assert_state_equal(model, state)
    assert hook_counts(model) == hooks
    with pytest.raises(DeltaError, match="interactive_modify must be True"):
        LoraModel(model, interactive_modify="yes")
    with pytest.raises(DeltaError, match="interactive_modify must be True"):
        LoraModel(model, interactive_modify=0)
