"""The safetensors layout, read defensively and written deterministically.

Layout: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON (``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}``), then the tensor bytes, offsets relative to the end of
the header. Any safetensors tool (``safetensors.load_file``, PEFT, mergekit, the hub viewer) reads what is written
here.

Reading never trusts the file: the header length is bounded before the header is read; every entry's dtype, shape
and byte range is checked (known dtype, ``numel * itemsize == end - begin``, ranges contiguous and exactly covering
the data, which must end where the file ends) before a single tensor byte is read, so a few hundred bytes cannot
declare terabytes. Callers check the entries against what they need (:func:`check_entries`) before reading the
data. The bytes parsed are the bytes hashed (:func:`read_tensor_file`), so a file replaced while being read can
never pass a SHA-256 check.

Writing builds the header itself (``safetensors.save_file`` orders ``__metadata__`` keys from a hash map, so two
saves of the same tensors gave different bytes): entries and metadata keys in a fixed order, tensors laid out by
decreasing element size then name (every tensor starts aligned to its element size), the header padded with spaces
to a multiple of 8 bytes, as safetensors does.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

from ..errors import CheckpointError
from . import safe_json
from .files import at_end, read_exact

#: safetensors dtype name -> torch dtype (the ones this torch has).
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in (
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
        ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"),
        ("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"), ("U8", "uint8"), ("BOOL", "bool"),
    )
    if hasattr(torch, attr)
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

#: The format's own bound on the header (safetensors refuses larger ones too).
MAX_HEADER_BYTES = 100_000_000
#: Most dimensions a tensor may declare (torch's own limit is 64).
MAX_DIMS = 16
#: Longest tensor name accepted.
MAX_NAME_CHARS = 4096


@dataclass(frozen=True)
class Entry:
    """One tensor of the header: its dtype name, shape and byte range within the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


@dataclass
class Header:
    """A validated header: entries by name, the string metadata, and the sizes that frame the data."""

    entries: dict[str, Entry]
    metadata: dict[str, str]
    header_bytes: int  # the JSON's length n (the data starts at 8 + n)
    data_bytes: int


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(name: Any, info: Any, where: str) -> Entry:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS or "\x00" in name:
        raise CheckpointError(f"{where!r} declares a tensor with an invalid name {str(name)[:80]!r}; file corrupt.")
    label = f"{where!r}: tensor {name[:200]!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(
            f"{label} has a malformed header entry (needs exactly dtype, shape, data_offsets); the file is corrupt."
        )
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(
            f"{label} has dtype {str(dtype)[:40]!r}, which this reader does not know (known: {sorted(DTYPES)}); the "
            f"file is corrupt or from a newer tool."
        )
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(
            f"{label} has an invalid shape {str(shape)[:80]} (a list of at most {MAX_DIMS} non-negative integers); "
            f"the file is corrupt."
        )
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{label} has invalid data_offsets {str(offsets)[:80]}; the file is corrupt.")
    entry = Entry(dtype, tuple(shape), offsets[0], offsets[1])
    # Python integers do not overflow: a product of huge dimensions is compared exactly with the byte range.
    if entry.numel * DTYPES[dtype].itemsize != entry.end - entry.begin:
        raise CheckpointError(
            f"{label} declares shape {list(shape)} of {dtype} ({entry.numel:,} elements) but "
            f"{entry.end - entry.begin:,} data bytes; the file is corrupt or hostile."
        )
    if any(d >= 2**62 for d in shape):
        raise CheckpointError(f"{label} declares a dimension too large for any tensor; the file is corrupt.")
    return entry


def parse_header(prefix: bytes, header: bytes, file_size: int, where: str) -> Header:
    """Validate a header already read (``prefix`` = the 8 length bytes) for a file of ``file_size`` bytes.

    Raises:
        CheckpointError: Any entry malformed, an unknown dtype, a shape that does not match its byte range, ranges
            that overlap, leave gaps or do not end where the file ends, duplicate names, bad metadata.
    """
    value = safe_json.loads(bytes(header), f"{where} (safetensors header)")
    if not isinstance(value, dict):
        raise CheckpointError(f"{where!r} has a safetensors header that is not a JSON object; the file is corrupt.")
    metadata = value.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{where!r} has __metadata__ that is not a map of strings; the file is corrupt.")
    entries = {name: _entry(name, info, where) for name, info in value.items()}
    data_bytes = file_size - 8 - len(header)
    position = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position:
            problem = "overlaps the previous tensor" if entry.begin < position else "leaves a gap before it"
            raise CheckpointError(
                f"{where!r}: tensor {name[:200]!r} starts at data byte {entry.begin:,} and {problem} (previous data "
                f"ends at {position:,}); the file is corrupt or hostile."
            )
        position = entry.end
    if position != data_bytes:
        raise CheckpointError(
            f"{where!r} declares {position:,} bytes of tensor data but holds {data_bytes:,}: the file is corrupt or "
            f"{'truncated' if position > data_bytes else 'has unexpected bytes at its end'}."
        )
    return Header(entries, dict(metadata), len(header), data_bytes)


def read_header(fd: int, file_size: int, where: str, max_header: int = MAX_HEADER_BYTES) -> tuple[Header, bytes]:
    """Read and validate the header of the open safetensors file ``fd`` (positioned at 0); no tensor data is read.

    Args:
        max_header: Bound on the header's JSON length (callers that know what they need pass a tighter one).

    Returns:
        The header and the raw bytes read (length prefix + JSON), to be hashed with the data.
    """
    if file_size < 8:
        raise CheckpointError(
            f"{where!r} is {file_size} bytes long, too short for a safetensors file: it is corrupt or truncated."
        )
    prefix = bytes(read_exact(fd, 8, where))
    (length,) = struct.unpack("<Q", prefix)
    if length < 2 or length > file_size - 8:
        raise CheckpointError(
            f"{where!r} declares a {length:,}-byte header in a {file_size:,}-byte file: it is corrupt or truncated, or "
            f"not a safetensors file."
        )
    if length > max_header:
        raise CheckpointError(
            f"{where!r} declares a {length:,}-byte header, more than the {max_header:,} bytes its tensors can need; "
            f"the file is corrupt or hostile."
        )
    raw = bytes(read_exact(fd, length, where))
    return parse_header(prefix, raw, file_size, where), prefix + raw


def check_entries(header: Header, expected: dict[str, tuple[tuple[int, ...], str]], where: str) -> None:
    """Refuse a header whose tensors are not exactly ``expected``: ``{name: (shape, kind)}`` where ``kind`` is
    ``"float"`` (any floating dtype; values are converted on load) or a safetensors dtype name (exact)."""
    names, wanted = set(header.entries), set(expected)
    if names != wanted:
        missing, extra = sorted(wanted - names), sorted(names - wanted)
        raise CheckpointError(
            f"{where!r} does not fit this delta on this backbone: missing {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''}, unexpected {extra[:3]}{' ...' if len(extra) > 3 else ''}. A "
            f"checkpoint may only hold the delta's own tensors and the backbone tensors its config declares."
        )
    for name, (shape, kind) in expected.items():
        entry = header.entries[name]
        if entry.shape != tuple(shape):
            raise CheckpointError(
                f"Shape mismatch for {name!r}: {where!r} has {entry.shape}, this backbone needs {tuple(shape)}. The "
                f"delta was trained on a backbone of another size or with other hyper-parameters."
            )
        ok = DTYPES[entry.dtype].is_floating_point if kind == "float" else entry.dtype == kind
        if not ok:
            raise CheckpointError(
                f"{where!r}: tensor {name!r} is stored as {entry.dtype}, but it must be "
                f"{'a floating-point dtype (F16, BF16, F32, F64)' if kind == 'float' else kind}; integer or boolean "
                f"data is never converted into weights. The file is corrupt or not a delta checkpoint."
            )


def read_data(fd: int, header: Header, where: str) -> bytearray:
    """The data section (after the header), read in full; the file must end right after it."""
    data = read_exact(fd, header.data_bytes, where)
    if not at_end(fd):
        raise CheckpointError(f"{where!r} grew while being read; it is being written by another process.")
    return data


def decode(header: Header, data: bytearray) -> dict[str, torch.Tensor]:
    """The tensors of a validated header, each with its own (aligned) storage."""
    if sys.byteorder != "little":
        raise CheckpointError("safetensors files are little-endian; this big-endian machine cannot read them.")
    out: dict[str, torch.Tensor] = {}
    for name, entry in header.entries.items():
        dtype = DTYPES[entry.dtype]
        if entry.end == entry.begin:
            out[name] = torch.empty(entry.shape, dtype=dtype)
            continue
        raw = torch.frombuffer(data, dtype=torch.uint8, count=entry.end - entry.begin, offset=entry.begin)
        out[name] = raw.clone().view(dtype).reshape(entry.shape)
    return out


def read_tensor_file(
    fd: int,
    file_size: int,
    where: str,
    *,
    expected: dict[str, tuple[tuple[int, ...], str]] | None = None,
    max_header: int = MAX_HEADER_BYTES,
) -> tuple[Header, dict[str, torch.Tensor], str]:
    """Read a whole safetensors file from ``fd``: header validated (and checked against ``expected``) first, then
    the data, then the tensors decoded from exactly the bytes hashed.

    Returns:
        ``(header, tensors, sha256 hex of every byte read)``.
    """
    header, head = read_header(fd, file_size, where, max_header)
    if expected is not None:
        check_entries(header, expected, where)
    data = read_data(fd, header, where)
    digest = hashlib.sha256(head)
    digest.update(data)
    return header, decode(header, data), digest.hexdigest()


def encode_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, list[str]]:
    """The header bytes (length prefix included) for ``tensors`` and the order their data follows in."""
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    offsets: dict[str, list[int]] = {}
    position = 0
    for name in order:
        size = tensors[name].numel() * tensors[name].element_size()
        offsets[name] = [position, position + size]
        position += size
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"Cannot save {name!r}: dtype {tensor.dtype} has no safetensors name.")
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": offsets[name]}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def write_tensor_file(handle: BinaryIO, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write ``tensors`` (contiguous CPU tensors) and ``metadata`` to ``handle``; returns the SHA-256 of the bytes.

    The same tensors and metadata always give the same bytes.
    """
    head, order = encode_header(tensors, metadata)
    digest = hashlib.sha256(head)
    handle.write(head)
    for name in order:
        tensor = tensors[name]
        if tensor.numel() == 0:
            continue
        raw = tensor.reshape(-1).view(torch.uint8).numpy()
        digest.update(raw)
        handle.write(memoryview(raw))
    return digest.hexdigest()
