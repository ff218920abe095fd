"""A store of delta checkpoints registered by name, and the bookkeeping of the few kept materialised.

Serving systems for many adapters (vLLM's ``max_loras`` over ``max_cpu_loras``, S-LoRA, LoRAX) separate a large
store from a small active set. :class:`DeltaStore` is that store for :class:`deltakit.serving.DeltaGroup`:

* :meth:`DeltaStore.register` records a checkpoint directory under a name after reading and validating only its
  small parts: ``delta_config.json`` (every field, the delta type, the hyper-parameters) and the weights file's
  header (bounded, every dtype, shape and byte range; every tensor belongs to a saved site). No tensor byte is read
  and nothing is allocated, so thousands register in seconds.
* The group materialises a stored delta on a miss with the full checkpoint loader
  (:func:`deltakit.checkpoint.load_delta`: every check again, the SHA-256 over the bytes read, the backbone
  fingerprint), and this object keeps the least-recently-used order of the materialised ones and picks which to
  drop when more than ``max_active`` would be kept.

The store never touches the model; the group does, as a write (see docs/serving.md).
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .checkpoint import MAX_CONFIG_BYTES, WEIGHTS_NAME, config_from_meta, parse_meta, refuse_stacked, saved_sites
from .config import CONFIG_NAME
from .errors import CheckpointError, DeltaError
from .io.files import open_regular, read_regular_file
from .io.tensor_file import read_header
from .io.transaction import locked_view

__all__ = ["DeltaStore", "StoredDelta"]


@dataclass(frozen=True)
class StoredDelta:
    """One registered checkpoint: where it is and what its validated config and header say.

    Attributes:
        name: The group name (a Python identifier: it becomes the child-module name when materialised).
        path: The checkpoint directory.
        delta_type: ``"lora"``, ...
        config: The validated hyper-parameters (a :class:`~deltakit.config.DeltaConfig`).
        sites: Number of modules the delta modifies.
        nbytes: Bytes of tensor data in its weights file (what materialising it costs, about).
        load_options: ``check_backbone`` / ``allow_nonfinite`` for the loader.
    """

    name: str
    path: str
    delta_type: str
    config: Any
    sites: int
    nbytes: int
    load_options: dict[str, bool] = field(default_factory=dict)


def _check_tensors_belong(names: Iterable[str], sites: list[str], delta_type: str, where: str) -> None:
    """Every tensor of the weights header sits under a saved site (or is a shared ``<type>_shared.`` tensor)."""
    prefixes = (*(s + "." for s in sites), f"{delta_type}_shared.")
    for name in names:
        if not name.startswith(prefixes):
            raise CheckpointError(
                f"{where!r} holds tensor {name[:200]!r}, which belongs to none of the sites its config lists; the "
                f"two files do not belong together (or were edited). Save the delta again."
            )


def read_stored(name: str, path: str | os.PathLike[str], **load_options: bool) -> StoredDelta:
    """Validate the config and the weights header of the checkpoint directory ``path`` (no tensor data is read).

    Raises:
        CheckpointError: A missing or malformed file, an unknown delta type, invalid hyper-parameters, a corrupt
            header, tensors that belong to no saved site.
        DeltaError: The checkpoint carries backbone tensors (a served backbone is shared by every delta).
    """
    path = os.fspath(path)
    with locked_view(path) as find:
        config_file = find(CONFIG_NAME)
        meta = parse_meta(read_regular_file(config_file, "the delta config", MAX_CONFIG_BYTES), config_file)
        config = config_from_meta(meta, config_file)
        if meta["backbone_tensors"]:
            raise DeltaError(
                f"The checkpoint {path!r} also holds backbone tensors {meta['backbone_tensors'][:3]}: deltas sharing "
                f"one backbone would overwrite each other's copies. Keep task-specific weights in the delta (e.g. "
                f"LoRA on the 'classifier' Linear) or load it with AutoDeltaModel.from_finetuned on its own backbone."
            )
        sites = saved_sites(meta, config_file)
        weights_file = find(WEIGHTS_NAME)
        with open_regular(weights_file, "the weights file") as (fd, size):
            # Bounded like the loader bounds it (a few entries of ~100 bytes plus the name per site), generously.
            longest = max(len(s) for s in sites)
            header, _ = read_header(fd, size, weights_file, max_header=65536 + (len(sites) + 1) * 16 * (512 + longest))
        refuse_stacked(header, weights_file)
        _check_tensors_belong(header.entries, sites, meta["delta_type"], weights_file)
    return StoredDelta(name, path, meta["delta_type"], config, len(sites), header.data_bytes, dict(load_options))


class DeltaStore:
    """Registered checkpoints by name, and the least-recently-used order of those currently materialised.

    Args:
        max_active: Most deltas the owning group keeps materialised at once (``None``: no bound).
    """

    def __init__(self, max_active: int | None = None) -> None:
        if max_active is not None and (isinstance(max_active, bool) or not isinstance(max_active, int)
                                       or max_active < 1):
            raise DeltaError(f"max_active must be a positive int (or None for no bound), got {max_active!r}.")
        self.max_active = max_active
        self.entries: dict[str, StoredDelta] = {}
        self.lru: OrderedDict[str, None] = OrderedDict()  # materialised stored deltas, least recently used first
        self.stats = {"hits": 0, "misses": 0, "evictions": 0, "load_seconds": 0.0}

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def forget(self, name: str) -> None:
        self.entries.pop(name, None)
        self.lru.pop(name, None)

    def used(self, names: Iterable[str]) -> None:
        """Count a use of materialised stored deltas (hits), most recent last."""
        for name in names:
            if name in self.lru:
                self.lru.move_to_end(name)
                self.stats["hits"] += 1

    def loaded(self, name: str, seconds: float) -> None:
        self.lru[name] = None
        self.stats["misses"] += 1
        self.stats["load_seconds"] += seconds

    def evicted(self, name: str) -> None:
        self.lru.pop(name, None)
        self.stats["evictions"] += 1

    def victims(self, excess: int, evictable: Callable[[str], bool]) -> list[str]:
        """Up to ``excess`` materialised stored deltas to drop, least recently used first, among ``evictable``."""
        out = []
        for name in self.lru:
            if len(out) == excess:
                break
            if evictable(name):
                out.append(name)
        return out

    def timed_load(self, name: str, load: Callable[[StoredDelta], Any]) -> Any:
        """Run ``load(entry)`` for the stored ``name``, recording the miss and its time."""
        start = time.perf_counter()
        delta = load(self.entries[name])
        self.loaded(name, time.perf_counter() - start)
        return delta
