"""A hostile-checkpoint corpus (issue 10, section 2): every malformed, oversized or malicious input is one clear
``CheckpointError`` (or ``DeltaError``), quickly, with the model and the files unchanged.

Each case starts from a valid checkpoint (LoRA on query/value of a tiny BERT) and breaks one thing. Where the case
edits the weights file, the config's SHA-256 is recomputed to match, as an attacker who edits both files would do:
the structural checks, not the hash, must catch it. Every case runs through every loader it concerns:
``AutoDeltaModel.from_finetuned``, ``DeltaGroup.load``, ``integrations.distributed.load_delta_checkpoint`` (into a
live delta) and ``deltakit inspect`` (which reads headers only, so it refuses the structural cases and shows the
others). After each refusal: the same ``state_dict`` (keys and values, ``torch.equal``), the same hooks and
modules, the same bytes and file types in the checkpoint directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import torch

from deltakit import AutoDeltaConfig, AutoDeltaModel, CheckpointError, DeltaError, DeltaGroup, LoraModel
from deltakit.checkpoint import MAX_CONFIG_BYTES, WEIGHTS_NAME, read_checkpoint_meta, read_weights
from deltakit.cli import main as cli_main
from deltakit.config import CONFIG_NAME
from deltakit.integrations.distributed import load_delta_checkpoint

from tests.helpers import hook_counts, perturb, tiny_bert

#: A refusal must come quickly: a hang or a huge allocation fails the test instead of the machine.
DEADLINE_S = 20
QUERY = "bert.encoder.layer.0.attention.self.query"
LORA_A = f"{QUERY}.lora.lora_A"


# ----------------------------------------------------------------------------------------------- building blocks
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _layout(tensors: dict[str, torch.Tensor]) -> tuple[dict, bytes]:
    """A header dict and data bytes for ``tensors``, laid out contiguously in name order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    chunks, position = [], 0
    for name in sorted(tensors):
        raw = tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        dtype = {torch.float32: "F32", torch.float16: "F16", torch.float64: "F64", torch.int32: "I32",
                 torch.bool: "BOOL", torch.uint8: "U8"}[tensors[name].dtype]
        header[name] = {"dtype": dtype, "shape": list(tensors[name].shape),
                        "data_offsets": [position, position + len(raw)]}
        chunks.append(raw)
        position += len(raw)
    return header, b"".join(chunks)


def _file(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def _set_config(path, meta: dict | None = None, text: bytes | None = None) -> None:
    target = os.path.join(path, CONFIG_NAME)
    os.remove(target)
    with open(target, "wb") as handle:
        handle.write(text if text is not None else json.dumps(meta).encode())


def _meta(path) -> dict:
    with open(os.path.join(path, CONFIG_NAME), "rb") as handle:
        return json.loads(handle.read())


def _set_weights(path, data: bytes) -> None:
    """Replace the weights file and record its hash in the config (an attacker edits both)."""
    with open(os.path.join(path, WEIGHTS_NAME), "wb") as handle:
        handle.write(data)
    meta = _meta(path)
    meta["weights_sha256"] = _sha(data)
    _set_config(path, meta)


def _tensors(path) -> dict[str, torch.Tensor]:
    return read_weights(path)


def _with_tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[str], None]:
    def mutate(path: str) -> None:
        tensors = _tensors(path)
        edit(tensors)
        _set_weights(path, _file(*_layout(tensors)))
    return mutate


def _with_header(edit: Callable[[dict, bytes], tuple[dict | bytes, bytes] | None], length: int | None = None):
    def mutate(path: str) -> None:
        header, data = _layout(_tensors(path))
        result = edit(header, data)
        if result is not None:
            header, data = result
        _set_weights(path, _file(header, data, length))
    return mutate


def _with_meta(edit: Callable[[dict], None]) -> Callable[[str], None]:
    def mutate(path: str) -> None:
        meta = _meta(path)
        edit(meta)
        _set_config(path, meta)
    return mutate


def _with_config_text(text: bytes | Callable[[bytes], bytes]) -> Callable[[str], None]:
    def mutate(path: str) -> None:
        with open(os.path.join(path, CONFIG_NAME), "rb") as handle:
            old = handle.read()
        _set_config(path, text=text(old) if callable(text) else text)
    return mutate


def _replace_file(name: str, how: str) -> Callable[[str], None]:
    def mutate(path: str) -> None:
        target = os.path.join(path, name)
        os.remove(target)
        if how == "fifo":
            os.mkfifo(target)
        elif how == "dev_zero":
            os.symlink("/dev/zero", target)
        elif how == "directory":
            os.mkdir(target)
        elif how == "dangling":
            os.symlink(os.path.join(path, "nowhere"), target)
        elif how == "loop":
            os.symlink(target, target)
        elif how != "missing":
            raise AssertionError(how)
    return mutate


def _set(key: str, value) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        meta[key] = value
    return edit


def _set_config_field(key: str, value) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        meta["config"][key] = value
    return edit


def _entry(edit: Callable[[dict], None], name: str = LORA_A):
    def change(header: dict, data: bytes) -> None:
        edit(header[name])
    return change


# ----------------------------------------------------------------------------------------------- the corpus
ALL = ("auto", "group", "distributed", "inspect")
LOADERS = ("auto", "group", "distributed")  # the file is well formed; only a model can tell it is wrong


@dataclass
class Case:
    name: str
    mutate: Callable[[str], None]
    match: str
    loaders: tuple[str, ...] = ALL
    notes: list[str] = field(default_factory=list)


def _nan(tensors: dict) -> None:
    tensors[LORA_A] = tensors[LORA_A].clone()
    tensors[LORA_A].view(-1)[3] = float("nan")


def _inf(tensors: dict) -> None:
    tensors[LORA_A] = tensors[LORA_A].clone()
    tensors[LORA_A].view(-1)[0] = float("-inf")


def _overflowing_f64(tensors: dict) -> None:
    tensors[LORA_A] = tensors[LORA_A].double()
    tensors[LORA_A].view(-1)[0] = 1e300  # finite in F64, infinite once converted to the model's F32


def _overlap(header: dict, data: bytes) -> None:
    names = sorted(k for k in header if k != "__metadata__")
    header[names[1]]["data_offsets"][0] -= 4


def _gap(header: dict, data: bytes):
    names = sorted(k for k in header if k != "__metadata__")
    for name in names[1:]:
        header[name]["data_offsets"] = [o + 4 for o in header[name]["data_offsets"]]
    first_end = header[names[0]]["data_offsets"][1]
    return header, data[:first_end] + b"\0" * 4 + data[first_end:]


def _duplicate_key(header: dict, data: bytes):
    text = json.dumps(header)
    entry = json.dumps({LORA_A: header[LORA_A]})[1:-1]
    return (text[:-1] + ", " + entry + "}").encode(), data


CASES = [
    # --- delta_config.json: malformed JSON
    Case("config deep nesting", _with_config_text(b"[" * 100_000 + b"]" * 100_000), "nests JSON values too deeply"),
    Case("config nesting inside a field", _with_meta(_set("fingerprint", json.loads("[" * 200 + "]" * 200))),
         "nests JSON values too deeply|more than 64 levels"),
    Case("config 5000-digit integer", _with_config_text(lambda old: old.replace(b'"format_version": 4',
                                                                                 b'"format_version": ' + b"9" * 5000)),
         "integer with 5000 digits"),
    Case("config 5000-digit hyper-parameter", _with_config_text(lambda old: old.replace(b'"lora_r": 8',
                                                                                         b'"lora_r": ' + b"7" * 5000)),
         "integer with 5000 digits"),
    Case("config NaN", _with_config_text(lambda old: old.replace(b'"lora_alpha": 16', b'"lora_alpha": NaN')),
         "NaN, which is not valid JSON"),
    Case("config Infinity", _with_config_text(lambda old: old.replace(b'"lora_alpha": 16', b'"lora_alpha": Infinity')),
         "Infinity, which is not valid JSON"),
    Case("config 1e999", _with_config_text(lambda old: old.replace(b'"lora_alpha": 16', b'"lora_alpha": 1e999')),
         "overflows to infinity"),
    Case("config duplicate key", _with_config_text(
        lambda old: old.replace(b'"format": "deltakit-delta",', b'"format": "deltakit-delta", "format": "x",')),
         "key 'format' twice"),
    Case("config BOM", _with_config_text(lambda old: b"\xef\xbb\xbf" + old), "byte-order mark"),
    Case("config not UTF-8", _with_config_text(lambda old: old.replace(b"deltakit-delta", b"deltakit-\xff\xfe")),
         "not UTF-8"),
    Case("config lone surrogate", _with_config_text(lambda old: old.replace(b'"sites": [', b'"sites": ["\\ud800", ')),
         "unpaired surrogate"),
    Case("config empty", _with_config_text(b""), "not valid JSON"),
    Case("config garbage", _with_config_text(b"{not json"), "not valid JSON"),
    Case("config top-level array", _with_config_text(b"[1, 2]"), "must hold a JSON object"),
    Case("config top-level null", _with_config_text(b"null"), "must hold a JSON object"),
    Case("config too large", _with_config_text(lambda old: old[:-2] + b" " * (MAX_CONFIG_BYTES + 1) + b"}\n"),
         "more than the 16,777,216"),
    # --- delta_config.json: fields of the wrong type or value
    Case("delta_type list", _with_meta(_set("delta_type", ["lora"])), "field 'delta_type' must be a string"),
    Case("delta_type dict", _with_meta(_set("delta_type", {"a": "lora"})), "field 'delta_type' must be a string"),
    Case("delta_type unknown", _with_meta(_set("delta_type", "no_such_method")), "unknown to this deltakit"),
    Case("format wrong", _with_meta(_set("format", "peft")), "not a deltakit delta config"),
    Case("format_version bool", _with_meta(_set("format_version", True)), "format_version True"),
    Case("format_version future", _with_meta(_set("format_version", 99)), "reads versions 1 to 4"),
    Case("format_version string", _with_meta(_set("format_version", "4")), "format_version '4'"),
    Case("config not an object", _with_meta(_set("config", ["lora"])), "field 'config' must be an object"),
    Case("config of another type", _with_meta(_set_config_field("delta_type", "bitfit")), "field 'config' holds"),
    Case("config bad hyper-parameter", _with_meta(_set_config_field("lora_r", -3)), "field 'config' is not a valid"),
    Case("config list hyper-parameter", _with_meta(_set_config_field("lora_r", [8])), "field 'config' is not a valid"),
    Case("config unknown key", _with_meta(_set_config_field("lora_rank", 8)), "field 'config' is not a valid"),
    Case("config huge rank", _with_meta(_set_config_field("lora_r", 2**40)), "field 'config' is not a valid"),
    Case("sites a string", _with_meta(_set("sites", "bert.encoder.layer.0.attention.self.query")),
         "field 'sites' must be a list"),
    Case("sites holding a dict", _with_meta(_set("sites", [{"a": 1}])), "field 'sites' must hold non-empty strings"),
    Case("sites holding a list", _with_meta(_set("sites", [["a"]])), "field 'sites' must hold non-empty strings"),
    Case("sites empty", _with_meta(_set("sites", [])), "field 'sites' is empty"),
    Case("sites duplicate", _with_meta(_set("sites", [f"{QUERY}", f"{QUERY}"])), "lists a name twice"),
    Case("site range of 1e11", _with_meta(_set("sites", ["bert.encoder.layer.{0-100000000000}.attention.self.query"])),
         "malformed site range"),
    Case("site range of 1e9", _with_meta(_set("sites", ["bert.encoder.layer.{0-999999999}.attention.self.query"])),
         "more sites than the [0-9,]+ possible here"),
    Case("site range beyond the model", _with_meta(_set("sites", ["bert.encoder.layer.{0-5}.attention.self.query"])),
         "does not exist in this backbone|more sites than", loaders=LOADERS),
    Case("site range overlapping", _with_meta(_set("sites", ["bert.encoder.layer.{0-1,1}.attention.self.query"])),
         "twice"),
    Case("site range backwards", _with_meta(_set("sites", ["bert.encoder.layer.{1-0}.attention.self.query"])),
         "runs backwards"),
    Case("site range twice in a name", _with_meta(_set("sites", ["bert.encoder.layer.{0-1}.attention.{0-1}"])),
         "more than one range"),
    Case("backbone_tensors not strings", _with_meta(_set("backbone_tensors", [1])),
         "field 'backbone_tensors' must hold non-empty strings"),
    Case("backbone_tensors duplicate", _with_meta(_set("backbone_tensors", ["classifier.bias", "classifier.bias"])),
         "lists a name twice"),
    Case("backbone_tensors unknown", _with_meta(_set("backbone_tensors", ["bert.nothing.weight"])),
         "does not exist in this backbone|does not fit|backbone tensors", loaders=LOADERS),
    Case("fingerprint a list", _with_meta(_set("fingerprint", [1])), "field 'fingerprint' must be an object"),
    Case("weights_sha256 malformed", _with_meta(_set("weights_sha256", "abc")), "must be 64 lowercase hex"),
    Case("weights_sha256 a list", _with_meta(_set("weights_sha256", ["0" * 64])), "must be 64 lowercase hex"),
    # --- the files themselves
    Case("config is a directory", _replace_file(CONFIG_NAME, "directory"), "is a directory, not a regular file"),
    Case("config is a FIFO", _replace_file(CONFIG_NAME, "fifo"), "is a FIFO"),
    Case("config links to /dev/zero", _replace_file(CONFIG_NAME, "dev_zero"), "is a character device"),
    Case("config dangling link", _replace_file(CONFIG_NAME, "dangling"), "No delta_config.json|missing|neither"),
    Case("config link loop", _replace_file(CONFIG_NAME, "loop"), "Cannot open"),
    Case("config missing", _replace_file(CONFIG_NAME, "missing"), "No delta_config.json|neither"),
    Case("weights is a directory", _replace_file(WEIGHTS_NAME, "directory"), "is a directory, not a regular file"),
    Case("weights is a FIFO", _replace_file(WEIGHTS_NAME, "fifo"), "is a FIFO"),
    Case("weights links to /dev/zero", _replace_file(WEIGHTS_NAME, "dev_zero"), "is a character device"),
    Case("weights missing", _replace_file(WEIGHTS_NAME, "missing"), "No delta_model.safetensors"),
    # --- delta_model.safetensors: framing
    Case("weights empty", lambda p: _set_weights(p, b""), "too short for a safetensors file"),
    Case("weights 5 bytes", lambda p: _set_weights(p, b"\x10\0\0\0\0"), "too short for a safetensors file"),
    Case("weights truncated", lambda p: _set_weights(p, open(os.path.join(p, WEIGHTS_NAME), "rb").read()[:-100]),
         "corrupt or truncated"),
    Case("weights truncated header", lambda p: _set_weights(p, open(os.path.join(p, WEIGHTS_NAME), "rb").read()[:60]),
         "corrupt or truncated"),
    Case("header length beyond the file", _with_header(lambda h, d: None, length=10**6), "corrupt or truncated"),
    Case("header length 2**63", _with_header(lambda h, d: None, length=2**63), "corrupt or truncated"),
    Case("header length 1", _with_header(lambda h, d: (b"{", d), length=1), "corrupt or truncated|not valid JSON"),
    Case("header padded to 4 MB", _with_header(lambda h, d: (json.dumps(h).encode() + b" " * 4_000_000, d)),
         "more than the [0-9,]+ bytes its tensors can need", loaders=LOADERS),
    Case("header not JSON", _with_header(lambda h, d: (b"\x00" * 64, d)), "not valid JSON"),
    Case("header not UTF-8", _with_header(lambda h, d: (json.dumps(h).encode().replace(b"F32", b"F\xff2", 1), d)),
         "not UTF-8"),
    Case("header BOM", _with_header(lambda h, d: (b"\xef\xbb\xbf" + json.dumps(h).encode(), d)), "byte-order mark"),
    Case("header an array", _with_header(lambda h, d: (b"[]", d)), "not a JSON object"),
    Case("header deep nesting", _with_header(lambda h, d: (b"[" * 50_000 + b"]" * 50_000, d)),
         "too deeply|bytes its tensors can need"),
    Case("header huge integer", _with_header(lambda h, d: (json.dumps(h).encode().replace(
        b'"data_offsets": [0,', b'"data_offsets": [' + b"1" * 5000 + b",", 1), d)), "integer with 5000 digits"),
    Case("header NaN", _with_header(lambda h, d: (json.dumps(h).encode().replace(
        b'"data_offsets": [0,', b'"data_offsets": [NaN,', 1), d)), "NaN"),
    Case("header duplicate tensor", _with_header(_duplicate_key), "twice in one object"),
    Case("metadata not strings", _with_header(lambda h, d: (h.__setitem__("__metadata__", {"format": 1}), None)[1]),
         "__metadata__ that is not a map"),
    # --- delta_model.safetensors: entries
    Case("unknown dtype", _with_header(_entry(lambda e: e.__setitem__("dtype", "F128"))), "dtype 'F128'"),
    Case("dtype not a string", _with_header(_entry(lambda e: e.__setitem__("dtype", ["F32"]))), "dtype"),
    Case("huge shape", _with_header(_entry(lambda e: e.__setitem__("shape", [2**20, 2**20, 8]))),
         "declares shape .* data bytes"),
    Case("shape product overflow", _with_header(_entry(lambda e: e.__setitem__("shape", [2**40, 2**40, 2**40]))),
         "declares shape .* data bytes"),
    Case("zero-size shape with a huge dimension", _with_header(_entry(lambda e: (
        e.__setitem__("shape", [2**70, 0]), e.__setitem__("data_offsets", [0, 0])))),
         "declares a dimension too large|overlaps|leaves a gap"),
    Case("negative dimension", _with_header(_entry(lambda e: e.__setitem__("shape", [-8, 32]))), "invalid shape"),
    Case("float dimension", _with_header(_entry(lambda e: e.__setitem__("shape", [8.0, 32]))), "invalid shape"),
    Case("too many dimensions", _with_header(_entry(lambda e: e.__setitem__("shape", [1] * 40))), "invalid shape"),
    Case("offsets reversed", _with_header(_entry(lambda e: e.__setitem__("data_offsets", e["data_offsets"][::-1]))),
         "invalid data_offsets"),
    Case("offsets beyond the data", _with_header(_entry(lambda e: e.__setitem__(
        "data_offsets", [e["data_offsets"][0] + 10**9, e["data_offsets"][1] + 10**9]))), "leaves a gap|declares"),
    Case("offsets overlapping", _with_header(_overlap), "overlaps the previous tensor|declares shape"),
    Case("offsets with a gap", _with_header(_gap), "leaves a gap"),
    Case("offsets of three values", _with_header(_entry(lambda e: e.__setitem__("data_offsets", [0, 1, 2]))),
         "invalid data_offsets"),
    Case("entry without dtype", _with_header(_entry(lambda e: e.pop("dtype"))), "malformed header entry"),
    Case("entry with an extra field", _with_header(_entry(lambda e: e.__setitem__("x", 1))), "malformed header entry"),
    Case("entry not an object", _with_header(lambda h, d: (h.__setitem__(LORA_A, [1, 2]), None)[1]),
         "malformed header entry"),
    Case("empty tensor name", _with_header(lambda h, d: (h.__setitem__("", h.pop(LORA_A)), None)[1]), "invalid name"),
    Case("trailing bytes", _with_header(lambda h, d: (h, d + b"\0" * 16)), "unexpected bytes at its end"),
    Case("stacked layout", _with_header(lambda h, d: (h["__metadata__"].__setitem__("stacks", "{}"), None)[1]),
         "stacks tensors", loaders=LOADERS),
    # --- delta_model.safetensors: well formed, wrong for this delta (only a model can tell)
    Case("extra tensor named like a backbone weight", _with_tensors(
        lambda t: t.__setitem__(f"{QUERY}.weight", torch.zeros(32, 32))), "unexpected .*query.weight", loaders=LOADERS),
    Case("extra tensor named like a head", _with_tensors(
        lambda t: t.__setitem__("classifier.weight", torch.zeros(2, 32))), "unexpected .*classifier.weight",
         loaders=LOADERS),
    Case("extra embedding", _with_tensors(
        lambda t: t.__setitem__("bert.embeddings.word_embeddings.weight", torch.zeros(100, 32))),
         "unexpected .*word_embeddings", loaders=LOADERS),
    Case("missing tensor", _with_tensors(lambda t: t.pop(LORA_A)), "missing .*lora_A", loaders=LOADERS),
    Case("wrong shape", _with_tensors(lambda t: t.__setitem__(LORA_A, torch.zeros(4, 32))), "Shape mismatch",
         loaders=LOADERS),
    Case("I32 weights", _with_tensors(lambda t: t.__setitem__(LORA_A, torch.full((8, 32), 1_234_567_890,
                                                                                      dtype=torch.int32))),
         "stored as I32, but it must be a floating-point", loaders=LOADERS),
    Case("BOOL weights", _with_tensors(lambda t: t.__setitem__(LORA_A, torch.ones(8, 32, dtype=torch.bool))),
         "stored as BOOL", loaders=LOADERS),
    Case("U8 weights", _with_tensors(lambda t: t.__setitem__(LORA_A, torch.ones(8, 32, dtype=torch.uint8))),
         "stored as U8", loaders=LOADERS),
    Case("NaN weight", _with_tensors(_nan), "NaN or infinite.*allow_nonfinite=True", loaders=LOADERS),
    Case("Inf weight", _with_tensors(_inf), "NaN or infinite.*allow_nonfinite=True", loaders=LOADERS),
    Case("F64 overflowing F32", _with_tensors(_overflowing_f64), "after conversion to torch.float32",
         loaders=LOADERS),
    Case("declared backbone tensor missing from the file", _with_meta(_set("backbone_tensors", ["classifier.bias"])),
         "missing .*classifier.bias|backbone tensors", loaders=LOADERS),
    # --- integrity
    Case("flipped data byte", lambda p: _flip(p), "corrupt or was modified"),
    Case("weights of another save", lambda p: _other_save(p), "corrupt or was modified"),
]


def _flip(path) -> None:
    file = os.path.join(path, WEIGHTS_NAME)
    data = bytearray(open(file, "rb").read())
    data[-1] ^= 1
    open(file, "wb").write(bytes(data))


def _other_save(path) -> None:
    tensors = _tensors(path)
    tensors[LORA_A] = tensors[LORA_A] + 1
    with open(os.path.join(path, WEIGHTS_NAME), "wb") as handle:
        handle.write(_file(*_layout(tensors)))


# ----------------------------------------------------------------------------------------------- the harness
def _save(path) -> None:
    # The backbone the loaders below are given (the fingerprint compares sampled host weights).
    delta = LoraModel(tiny_bert(), modified_modules=["query", "value"], lora_r=8, lora_alpha=16)
    perturb(delta)
    delta.save_finetuned(path)


def _files(path) -> dict[str, object]:
    """Every entry of the directory (recursively): the bytes of regular files, the target of links, the type of
    anything else (a FIFO is never opened)."""
    out: dict[str, object] = {}
    for root, dirs, names in os.walk(path):
        for name in sorted(dirs + names):
            full = os.path.join(root, name)
            mode = os.lstat(full).st_mode
            key = os.path.relpath(full, path)
            if stat.S_ISLNK(mode):
                out[key] = ("link", os.readlink(full))
            elif stat.S_ISREG(mode):
                with open(full, "rb") as handle:
                    out[key] = handle.read()
            else:
                out[key] = ("type", stat.S_IFMT(mode))
    return out


def _model_state(model) -> tuple:
    return (
        [(k, v.detach().clone()) for k, v in model.state_dict().items()],
        hook_counts(model),
        [n for n, _ in model.named_modules()],
        [id(p) for p in model.parameters()],
    )


def _assert_same(before: tuple, after: tuple) -> None:
    assert [k for k, _ in after[0]] == [k for k, _ in before[0]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(after[0], before[0]))
    assert after[1:] == before[1:]


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    def expired(*_):
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def models():
    """One backbone per loader, reused: every case must leave it exactly as it was (which each test checks)."""
    live_model = tiny_bert()
    live = LoraModel(live_model, modified_modules=["query", "value"], lora_r=8, lora_alpha=16)
    return {"auto": tiny_bert(), "group": tiny_bert(), "distributed": (live_model, live)}


def _load(loader: str, path: str, models, capsys) -> None:
    if loader == "auto":
        AutoDeltaModel.from_finetuned(path, backbone_model=models["auto"])
    elif loader == "group":
        DeltaGroup(models["group"]).load("task", path)
    elif loader == "distributed":
        model, live = models["distributed"]
        load_delta_checkpoint(model, live, path)
    else:
        capsys.readouterr()
        code = cli_main(["inspect", path])
        _, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and lines[0].startswith("deltakit inspect: error: "), err
        raise CheckpointError(lines[0])


@pytest.fixture(scope="module")
def valid_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One valid checkpoint, saved once: each case breaks its own copy (a copy costs well under a millisecond, a
    save with its fsyncs tens of milliseconds, and the corpus has hundreds of cases)."""
    path = str(tmp_path_factory.mktemp("valid") / "ckpt")
    _save(path)
    return path


@pytest.mark.parametrize("loader", ALL)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_hostile_checkpoint_is_refused_and_changes_nothing(
    case: Case, loader: str, models, valid_checkpoint: str, tmp_path, capsys
) -> None:
    path = str(tmp_path / "ckpt")
    shutil.copytree(valid_checkpoint, path)
    case.mutate(path)
    model = models[loader][0] if loader == "distributed" else models.get(loader)
    before_files = _files(path)
    before_model = _model_state(model) if model is not None else None
    if loader not in case.loaders:  # inspect on a well-formed file: it shows it, one line per tensor
        with _deadline(DEADLINE_S):
            assert cli_main(["inspect", path, "--json"]) == 0
        assert _files(path) == before_files
        return
    with _deadline(DEADLINE_S), pytest.raises((CheckpointError, DeltaError)) as info:
        _load(loader, path, models, capsys)
    message = str(info.value)
    assert re_search(case.match, message), message
    assert "\n" not in message and len(message) < 2000
    assert _files(path) == before_files
    if model is not None:
        _assert_same(before_model, _model_state(model))


def re_search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text, flags=re.S) is not None


def test_the_corpus_loads_when_nothing_is_broken(models, tmp_path, capsys) -> None:
    """The harness itself: an unbroken checkpoint loads through every loader (so the refusals above are real)."""
    path = str(tmp_path / "ckpt")
    _save(path)
    _set_weights(path, _file(*_layout(_tensors(path))))  # rewritten by the corpus' own writer: still valid
    model = tiny_bert()
    AutoDeltaModel.from_finetuned(path, backbone_model=model).detach()
    DeltaGroup(tiny_bert()).load("task", path)
    live_model = tiny_bert()
    live = LoraModel(live_model, modified_modules=["query", "value"], lora_r=8, lora_alpha=16)
    load_delta_checkpoint(live_model, live, path)
    assert torch.equal(live.delta_state_dict()[LORA_A], _tensors(path)[LORA_A])
    assert cli_main(["inspect", path]) == 0
    assert AutoDeltaConfig.from_finetuned(path).lora_r == 8 and read_checkpoint_meta(path)["delta_type"] == "lora"


def test_non_finite_values_load_with_the_opt_out(tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    _save(path)
    _with_tensors(_nan)(path)
    for load in (
        lambda m: AutoDeltaModel.from_finetuned(path, backbone_model=m, allow_nonfinite=True),
        lambda m: LoraModel.from_finetuned(path, backbone_model=m, allow_nonfinite=True),
        lambda m: DeltaGroup(m).load("task", path, attach=True, allow_nonfinite=True),
    ):
        model = tiny_bert()
        delta = load(model)
        assert torch.isnan(delta.delta_state_dict()[LORA_A]).any()
    model = tiny_bert()
    live = LoraModel(model, modified_modules=["query", "value"], lora_r=8, lora_alpha=16)
    load_delta_checkpoint(model, live, path, allow_nonfinite=True)
    assert torch.isnan(live.delta_state_dict()[LORA_A]).any()
    with pytest.raises(DeltaError, match="allow_nonfinite"):
        AutoDeltaModel.from_finetuned(path, backbone_model=tiny_bert(), allow_nonfinite="yes")


def test_half_precision_checkpoints_still_load_into_float_models(tmp_path) -> None:
    """Floating dtypes are converted (a delta saved from a .half() model); only non-float data is refused."""
    path = str(tmp_path / "ckpt")
    _save(path)
    want = _tensors(path)
    _with_tensors(lambda t: t.update({k: v.half() for k, v in t.items()}))(path)
    delta = AutoDeltaModel.from_finetuned(path, backbone_model=tiny_bert())
    assert torch.equal(delta.delta_state_dict()[LORA_A], want[LORA_A].half().float())


def test_a_declared_backbone_tensor_is_the_only_way_into_the_backbone(tmp_path) -> None:
    """The backbone-overwrite finding: an extra tensor named like a backbone weight is refused (the corpus); what a
    checkpoint writes into the backbone is exactly what its config declares (here a head, saved by
    ``freeze_module(exclude=[..., "classifier"])``), and nothing else changes."""
    model = tiny_bert()
    delta = LoraModel(model, modified_modules=["query"], lora_r=2)
    delta.freeze_module(exclude=["deltas", "classifier"])
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    delta.save_finetuned(tmp_path / "ckpt")
    fresh = tiny_bert()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "ckpt", backbone_model=fresh)
    changed = {k for k, v in fresh.state_dict().items() if k in before and not torch.equal(v, before[k])}
    assert changed == {"classifier.weight"}
    assert set(loaded.unfrozen_parameter_names) == {"classifier.weight", "classifier.bias"}


# ------------------------------------------------------------------------- what a checkpoint writes comes back
def _head_checkpoint(path) -> torch.Tensor:
    """A LoRA checkpoint that carries a trained classifier head; returns the trained model's logits."""
    model = tiny_bert()
    delta = LoraModel(model, lora_r=2)
    delta.freeze_module(exclude=["deltas", "classifier"])
    perturb(delta)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    delta.save_finetuned(path)
    return model(torch.arange(2, 9).view(1, -1)).logits


def test_backbone_tensors_a_checkpoint_writes_come_back_on_detach(tmp_path) -> None:
    ids = torch.arange(2, 9).view(1, -1)
    trained = _head_checkpoint(tmp_path / "head")
    fresh = tiny_bert(seed=1)
    original = {k: v.clone() for k, v in fresh.state_dict().items()}
    # another backbone on purpose: the fingerprint's value check would refuse it (its documented opt-out)
    delta = AutoDeltaModel.from_finetuned(tmp_path / "head", fresh, check_backbone=False)
    assert delta.unfrozen_parameter_names == ["classifier.weight", "classifier.bias"]
    loaded = fresh(ids).logits
    delta.detach()  # the backbone is bit for bit what it was, its own (seed 1) head included
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in original.items())
    delta.attach()  # the checkpoint's head is back
    assert torch.equal(fresh(ids).logits, loaded)
    assert not torch.equal(loaded, trained)  # another backbone: only the head and the delta came from the file


def test_a_checkpoint_declaring_a_backbone_weight_cannot_change_it_for_good(tmp_path) -> None:
    """A crafted file that declares a backbone weight (not a head) among its backbone tensors loads it like a head,
    and detach() puts the backbone's own value back."""
    _head_checkpoint(tmp_path / "head")
    weight = f"{QUERY}.weight"
    meta = _meta(tmp_path / "head")
    meta["backbone_tensors"] = [*meta["backbone_tensors"], weight]
    _set_config(tmp_path / "head", meta)
    _with_tensors(lambda t: t.__setitem__(weight, torch.full((32, 32), 7.0)))(tmp_path / "head")
    model = tiny_bert()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    # check_backbone=False: the edited declaration also changes what the fingerprint's value sketch covers
    delta = AutoDeltaModel.from_finetuned(tmp_path / "head", model, check_backbone=False)
    assert torch.equal(model.get_parameter(weight), torch.full((32, 32), 7.0))
    delta.detach()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())
