"""Reading a checkpoint directory consistently: its config, then exactly the tensors a plan expects."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

import torch

from ..errors import CheckpointError
from ..io.files import open_regular, read_regular_file
from ..io.tensor_file import DTYPE_NAMES, check_entries, decode, read_data, read_header
from ..io.transaction import locked_view
from .layout import CONFIG_NAME, MAX_CONFIG_BYTES, WEIGHTS_NAME
from .meta import parse_meta
from .weights import check_sha, refuse_stacked

#: ``{saved tensor name: (shape, kind)}``: what a checkpoint must hold (kind: "float" or a safetensors dtype name).
Expected = dict[str, tuple[tuple[int, ...], str]]


def tensor_kind(tensor: torch.Tensor) -> str:
    return "float" if tensor.is_floating_point() else DTYPE_NAMES[tensor.dtype]


def _max_header(expected: Expected) -> int:
    """Header bytes these tensors can need: ~100 per entry plus the name, generously, and room for metadata."""
    return 65536 + sum(len(name) + 512 for name in expected)


def read_checkpoint(
    path: str | os.PathLike[str],
    plan: Callable[[dict[str, Any], str], Expected] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a checkpoint directory consistently: its config, and its tensors checked against what ``plan`` expects.

    Under a shared lock on the directory (no save can run meanwhile): the config is read and validated, ``plan(meta,
    config_file)`` says which tensors must be there (or raises), the weights header is validated against it before
    any data is read, then the data is read once, hashed and decoded from the same bytes.

    Returns:
        ``(meta, {saved name: tensor})``.

    Raises:
        CheckpointError: Anything invalid, missing, or not matching the SHA-256 the config records.
    """
    path = os.fspath(path)
    with locked_view(path) as find:
        config_file = find(CONFIG_NAME)
        meta = parse_meta(read_regular_file(config_file, "the delta config", MAX_CONFIG_BYTES), config_file)
        expected = plan(meta, config_file) if plan is not None else None
        weights_file = find(WEIGHTS_NAME)
        with open_regular(weights_file, "the weights file") as (fd, size):
            header, head = read_header(
                fd, size, weights_file, **({"max_header": _max_header(expected)} if expected is not None else {})
            )
            refuse_stacked(header, weights_file)
            if expected is not None:
                check_entries(header, expected, weights_file)
            data = read_data(fd, header, weights_file)
    digest = hashlib.sha256(head)
    digest.update(data)
    check_sha(meta, digest.hexdigest(), config_file, weights_file)
    return meta, decode(header, data)


def check_finite(name: str, tensor: torch.Tensor, where: str) -> None:
    """Refuse NaN or infinite values in a floating tensor about to be loaded."""
    if tensor.is_floating_point():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int(finite.numel() - finite.sum())
            raise CheckpointError(
                f"{where!r}: tensor {name!r} holds {bad:,} NaN or infinite value(s) (after conversion to "
                f"{tensor.dtype}); loading it would make every output NaN. The training diverged or the file is "
                f"corrupt; pass allow_nonfinite=True to load it anyway."
            )
