"""The ``deltakit`` command: show (structure tree, roles, delta preview), inspect (checkpoint tables), exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from deltakit import CompacterModel, LoraModel, __version__
from deltakit.cli import main, preview_delta
from deltakit.demo import real_model_path
from deltakit.integrations.peft import export_to_peft
from deltakit.structures import tiny_model

from tests.helpers import assert_state_equal, hook_counts, snapshot


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse: --help / --version (0), usage errors (2)
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_version_and_help(capsys) -> None:
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"deltakit {__version__}"
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "show" in out and "inspect" in out and "demo" in out
    code, out, _ = run_cli(capsys, "show", "--help")
    assert code == 0 and "--modified-modules" in out and "llama" in out
    code, _, err = run_cli(capsys)
    assert code == 2 and "usage" in err


def test_show_prints_the_tree_of_a_tiny_architecture(capsys) -> None:
    code, out, err = run_cli(capsys, "show", "llama", "--layers", "1")
    assert code == 0 and err == ""
    assert "LlamaModel" in out and "q_proj" in out and "down_proj" in out


def test_show_previews_exactly_the_sites_and_changes_nothing(capsys) -> None:
    code, out, _ = run_cli(capsys, "show", "bert", "--no-tree", "--delta", "lora", "--modified-modules", "query",
                           "value", "--option", "lora_r=4", "--json")
    assert code == 0
    preview = json.loads(out)["delta"]
    expected = [f"encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]
    assert [s["module"] for s in preview["sites"]] == expected
    assert preview["parameters"] == 4 * (4 * 32 + 32 * 4)
    # the same sites as a real LoraModel on the same architecture
    assert LoraModel(tiny_model("bert"), modified_modules=["query", "value"]).modified_modules == expected
    # defaults, as a table
    code, out, _ = run_cli(capsys, "show", "gpt2", "--no-tree", "--delta", "adapter")
    assert code == 0 and "adapter would modify 4 modules" in out and "nothing was changed" in out
    assert "h.0.attn.c_proj" in out and "h.1.mlp.c_proj" in out


def test_preview_never_touches_the_model() -> None:
    model = tiny_model("t5")
    keys, hooks, state = list(model.state_dict()), hook_counts(model), snapshot(model)
    preview = preview_delta(model, "compacter", options={"reduction_factor": 4})
    assert len(preview["sites"]) == 2 * 2 + 2 * 3  # attn.o (self + cross) and ff.w2, encoder and decoder
    compacter = CompacterModel(tiny_model("t5"), reduction_factor=4)
    assert [s["module"] for s in preview["sites"]] == compacter.modified_modules
    assert preview["shared_parameters"] == 4**3  # the shared PHM rules, counted once
    assert preview["parameters"] == compacter.num_delta_parameters()
    assert list(model.state_dict()) == keys and hook_counts(model) == hooks
    assert_state_equal(model, state)


def test_show_roles_from_the_table_and_inferred(capsys, monkeypatch) -> None:
    code, out, _ = run_cli(capsys, "show", "phi3", "--no-tree", "--roles", "--json")
    roles = json.loads(out)["roles"]
    assert code == 0 and "structure map" in roles["source"]
    assert roles["roles"]["attn.q"] == roles["roles"]["attn.v"] == [f"layers.{i}.self_attn.qkv_proj" for i in range(2)]
    from deltakit import structures

    monkeypatch.delitem(structures.STRUCTURES, "phi3")
    code, out, _ = run_cli(capsys, "show", "phi3", "--no-tree", "--roles")
    assert code == 0 and "inferred" in out and "layers.0.mlp.gate_up_proj" in out


def test_show_a_local_model_directory_without_loading_weights(capsys) -> None:
    code, out, _ = run_cli(capsys, "show", real_model_path(), "--delta", "lora", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["model"] == "BertModel" and len(info["delta"]["sites"]) == 12  # 6 layers x (query, value)
    code, out, _ = run_cli(capsys, "show", real_model_path(), "--layers", "1")
    assert code == 0 and "BertModel" in out and "encoder" in out


def test_inspect_a_checkpoint(capsys, tmp_path) -> None:
    model = tiny_model("bert")
    delta = LoraModel(model, lora_r=4)
    delta.freeze_module(exclude=["deltas", "pooler"])
    delta.save_finetuned(tmp_path / "ckpt")
    code, out, err = run_cli(capsys, "inspect", str(tmp_path / "ckpt"))
    assert code == 0 and err == ""
    for text in ("lora", "encoder.layer.0.attention.self.query.lora.lora_A", "(4, 32)", "F32", "512",
                 "pooler.dense.weight", "Backbone fingerprint", "host_shapes_sha256"):
        assert text in out, text
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path / "ckpt"), "--json")
    info = json.loads(out)
    saved = delta.delta_state_dict()
    assert set(info["tensors"]) == set(saved) | {"pooler.dense.weight", "pooler.dense.bias"}
    for name, tensor in saved.items():
        entry = info["tensors"][name]
        assert entry["shape"] == list(tensor.shape) and entry["dtype"] == "F32"
        assert entry["bytes"] == tensor.numel() * tensor.element_size()
    assert sorted(info["sites"]) == sorted(delta.modified_modules) and info["fingerprint"]["config"]["model_type"] == "bert"
    assert info["total_bytes"] == sum(e["bytes"] for e in info["tensors"].values())


def test_inspect_a_peft_adapter(capsys, tmp_path) -> None:
    delta = LoraModel(tiny_model("gpt2"), lora_r=2)
    export_to_peft(delta, tmp_path / "peft")
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path / "peft"), "--json")
    info = json.loads(out)
    assert code == 0 and info["kind"] == "PEFT adapter" and "from_peft" in info["note"]
    assert info["tensors"]["base_model.model.h.0.attn.c_attn.lora_B.weight"]["shape"] == [96, 2]


def test_failures_exit_1_with_a_message_and_no_traceback(capsys, tmp_path) -> None:
    code, out, err = run_cli(capsys, "show", "no-such-model")
    assert code == 1 and out == "" and "known names" in err and "llama" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "show", "bert", "--delta", "lora", "--modified-modules", "nothing")
    assert code == 1 and "'nothing' matches no module" in err
    code, _, err = run_cli(capsys, "show", "bert", "--delta", "lora", "--option", "lora_rank=3")
    assert code == 1 and "lora_rank" in err
    code, _, err = run_cli(capsys, "inspect", str(tmp_path))
    assert code == 1 and "neither" in err
    (tmp_path / "bad").mkdir()
    LoraModel(tiny_model("bert")).save_finetuned(tmp_path / "bad")
    (tmp_path / "bad" / "delta_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "bad"))
    assert code == 1 and "corrupt" in err
    with pytest.raises(Exception, match="known names"):
        main(["show", "no-such-model", "--debug"])


def test_usage_errors_exit_2(capsys) -> None:
    for argv in (["show"], ["show", "bert", "--bogus"], ["show", "bert", "--delta", "nolora"],
                 ["show", "bert", "--modified-modules", "query"], ["show", "bert", "--delta", "lora", "--option", "x"],
                 ["nonsense"]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and "usage" in err, argv


@pytest.mark.slow  # three fresh interpreters importing torch (about 8 CPU seconds); in-process tests cover the codes
def test_console_script_exit_codes() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "deltakit.cli"]
    ok = subprocess.run([*cmd, "show", "bert", "--layers", "1", "--no-tree", "--roles"], capture_output=True,
                        text=True, env=env, timeout=300)
    assert ok.returncode == 0 and "attn.q" in ok.stdout
    fail = subprocess.run([*cmd, "inspect", "/nonexistent"], capture_output=True, text=True, env=env, timeout=300)
    assert fail.returncode == 1 and "No checkpoint directory" in fail.stderr and "Traceback" not in fail.stderr
    usage = subprocess.run([*cmd, "show"], capture_output=True, text=True, env=env, timeout=300)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    assert torch.__version__  # the subprocess used the same interpreter and packages


@pytest.mark.parametrize("json_output", [False, True], ids=["tables", "json"])
def test_a_reader_that_closes_the_pipe_early_ends_the_command_quietly(tmp_path, json_output) -> None:
    """``deltakit inspect DIR | head``: a closed stdout is not a failure to report; exit 141 (128 + SIGPIPE) as
    cat, grep or git do, with nothing on stderr."""
    LoraModel(tiny_model("bert")).save_finetuned(tmp_path / "ckpt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "deltakit.cli", "inspect", str(tmp_path / "ckpt")]
    argv += ["--json"] if json_output else []
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader goes away before the command writes anything: every write hits a closed pipe
    _, err = proc.communicate(timeout=300)
    assert err.decode() == "" and proc.returncode == 141


def test_inspect_verifies_the_recorded_weights_hash(capsys, tmp_path) -> None:
    path = tmp_path / "ckpt"
    LoraModel(tiny_model("bert")).save_finetuned(path)
    meta = json.loads((path / "delta_config.json").read_text())
    code, out, err = run_cli(capsys, "inspect", str(path), "--json")
    info = json.loads(out)
    assert code == 0 and err == ""
    assert info["weights_sha256"] == meta["weights_sha256"] and info["weights_sha256_ok"] is True
    code, out, err = run_cli(capsys, "inspect", str(path))
    assert code == 0 and "weights sha256" in out and "matches" in out
    weights = path / "delta_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    code, out, err = run_cli(capsys, "inspect", str(path), "--json")
    assert code == 1 and json.loads(out)["weights_sha256_ok"] is False
    assert "delta_model.safetensors" in err and "corrupt or was modified" in err
    code, out, err = run_cli(capsys, "inspect", str(path))
    assert code == 1 and "MISMATCH" in out and "corrupt or was modified" in err
    del meta["weights_sha256"]  # a checkpoint written before the hash was recorded
    (path / "delta_config.json").write_text(json.dumps(meta))
    code, out, err = run_cli(capsys, "inspect", str(path), "--json")
    assert code == 0 and err == "" and json.loads(out)["weights_sha256_ok"] is None


def test_demo_failure_is_one_line_without_traceback(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    occupied = tmp_path / "afile"
    occupied.write_text("not a directory")
    code, out, err = run_cli(capsys, "demo", "--tiny", "--quiet", "--steps", "1", "--output-dir", str(occupied))
    assert code == 1
    assert err.startswith("deltakit demo: error: ") and "Traceback" not in err
    assert occupied.read_text() == "not a directory"
    with pytest.raises(OSError):  # --debug (after the command too) shows the real exception
        run_cli(capsys, "demo", "--debug", "--tiny", "--quiet", "--steps", "1", "--output-dir", str(occupied))


def test_output_follows_the_terminal_width_and_is_wide_in_a_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    from deltakit.cli import _console

    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert _console().width == 80  # a terminal: its own width, never forced wider
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert _console().width == 160  # a file or a pipe: wide, nothing cut
