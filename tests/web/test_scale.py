"""The picker on a meta-device Llama-7B (thousands of modules): the page's data loads and the preview is exact.
Timing is measured by ``python examples/screenshots.py --scale`` (docs/web.md), not asserted here."""

from __future__ import annotations

import http.client
import json

from benchmarks.injection import TARGETS, analytic_lora_params, llama_config, meta_model
from deltakit import find_modules
from deltakit.web.picker import Picker
from deltakit.web.server import TOKEN_HEADER
from deltakit.web.tree import selectable_names


def call(picker: Picker, path: str, payload: dict) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", picker.server.port, timeout=60)
    conn.request("POST", path, body=json.dumps(payload),
                 headers={"Content-Type": "application/json", TOKEN_HEADER: picker.server.token})
    response = conn.getresponse()
    assert response.status == 200
    return json.loads(response.read())


def test_llama_7b_tree_and_preview_are_exact() -> None:
    config = llama_config("llama-7b")
    model = meta_model(config)
    with Picker(model, "lora", options={"lora_r": 16, "lora_alpha": 32}) as picker:
        state = call(picker, "/api/tree", {})
        root = state["tree"]["root"]
        assert root["p"] == sum(p.numel() for p in model.parameters())
        layers = root["c"][0]["c"][1]["c"][0]  # model -> layers -> 0-31
        assert layers["l"] == "0-31" and len(layers["m"]) == 32
        names = [n for n in selectable_names(model) if n.endswith(TARGETS)]
        assert len(names) == 32 * 7
        answer = call(picker, "/api/preview", {"selection": names})
        assert answer["patterns"] == list(TARGETS)
        assert answer["parameters"] == analytic_lora_params(config, r=16)
        assert answer["sites"] == [n for n, _ in find_modules(model, list(TARGETS))]
        some = [n for n in names if n.endswith("q_proj") and int(n.split(".")[2]) < 16]
        answer = call(picker, "/api/preview", {"selection": some})
        assert answer["patterns"] == [r"[r]layers\.(?:[0-9]|1[0-5])\.self_attn\.q_proj"]
        assert answer["sites"] == some
