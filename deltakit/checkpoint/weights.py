"""The weights file, ``delta_model.safetensors``: writing it, reading it alone, and its SHA-256."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch

from ..errors import CheckpointError
from ..io.files import open_regular
from ..io.tensor_file import Header, decode, read_data, read_header, write_tensor_file
from ..io.transaction import locked_view
from .layout import CONFIG_NAME, WEIGHTS_METADATA, WEIGHTS_NAME


def write_weights(file: str | os.PathLike[str], tensors: dict[str, torch.Tensor]) -> str:
    """Write named contiguous CPU tensors to the safetensors ``file`` (one tensor per name, deterministic bytes).

    Returns:
        The SHA-256 (hex) of the bytes written.
    """
    with open(file, "wb") as handle:
        return write_tensor_file(handle, tensors, WEIGHTS_METADATA)


def refuse_stacked(header: Header, where: str) -> None:
    if "stacks" in header.metadata or any("#" in name for name in header.entries):
        raise CheckpointError(
            f"{where!r} stacks tensors (keys like 'lora_A#0'), the layout of a development version of deltakit that "
            f"this version no longer reads. Load it with the deltakit that wrote it and save it again."
        )


def read_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a safetensors weights file, or of a checkpoint directory's ``delta_model.safetensors``.

    The result is keyed exactly like :meth:`DeltaBase.delta_state_dict` (plus any saved backbone tensors), each
    tensor with its own storage. The file's structure is validated before anything is allocated; the SHA-256
    recorded in the config is checked by the loaders, not here (this reads the weights file alone).

    Raises:
        CheckpointError: The file is missing, not a regular file, truncated or corrupt.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        with locked_view(path) as find:
            return _read_weights_file(find(WEIGHTS_NAME))
    return _read_weights_file(path)


def _read_weights_file(file: str) -> dict[str, torch.Tensor]:
    with open_regular(file, "the weights file") as (fd, size):
        header, _ = read_header(fd, size, file)
        refuse_stacked(header, file)
        return decode(header, read_data(fd, header, file))


def weights_sha256(file: str | os.PathLike[str]) -> str:
    """The SHA-256 (hex) of a regular file's bytes, read in chunks."""
    digest = hashlib.sha256()
    file = os.fspath(file)
    with open_regular(file, "the weights file") as (fd, _):
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_weights_hash(path: str | os.PathLike[str], meta: dict[str, Any]) -> bool | None:
    """Compare the weights file of the checkpoint directory ``path`` with the SHA-256 its config records.

    Returns:
        ``True`` when it matches, ``None`` when the config records none (a checkpoint from before deltakit
        recorded it).

    Raises:
        CheckpointError: The bytes differ (the file is corrupt or was modified after saving).
    """
    path = os.fspath(path)
    if meta.get("weights_sha256") is None:
        return None
    with locked_view(path) as find:
        file = find(WEIGHTS_NAME)
        check_sha(meta, weights_sha256(file), find(CONFIG_NAME), file)
    return True


def check_sha(meta: dict[str, Any], actual: str, config_file: str, weights_file: str) -> None:
    expected = meta.get("weights_sha256")
    if expected is not None and actual != expected:
        raise CheckpointError(
            f"{weights_file!r} does not match the SHA-256 recorded in {config_file!r} when it was saved: the weights "
            f"file is corrupt or was modified (or the two files come from different saves). Save the delta again, "
            f"or restore both files from a copy."
        )
