"""A store of delta checkpoints registered by name, and the bookkeeping of the few kept materialised.

Serving systems for many adapters (vLLM's ``max_loras`` over ``max_cpu_loras``, S-LoRA, LoRAX) separate a large
store from a small active set. :class:`DeltaStore` is that store for :class:`deltakit.serving.DeltaGroup`:

* :meth:`DeltaStore.register` records a checkpoint directory under a name after reading and validating only its
  small parts: ``delta_config.json`` (every field, the delta type, the hyper-parameters) and the weights file's
  header (bounded, every dtype, shape and byte range; every tensor belongs to a saved site). No tensor byte is read
  and nothing is allocated, so thousands register in seconds.
* :meth:`DeltaStore.materialise` builds a stored delta on a miss. The first miss of each list of sites goes
  through the full checkpoint loader (:func:`deltakit.checkpoint.load_delta`), which resolves the saved sites on
  this backbone; later misses of that list reuse the resolution and read the checkpoint with the same checks
  (config, delta type, header against exactly the tensors the built delta needs, SHA-256, finiteness, backbone
  fingerprint) but read the weights file once, straight into the new parameters (no intermediate buffer, no
  decoded copies, no attach/detach round trip): see :func:`load_into`. A delta's task-head copies
  (``modules_to_save``, :mod:`deltakit.heads`) are built and resized to their recorded sizes there as the full
  loader does (a 6-label head on a 2-label backbone).
* This object keeps the least-recently-used order of the materialised ones and picks which to drop when more than
  ``max_active`` would be kept.

The store never touches the model; the group does, as a write (see docs/serving.md).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .checkpoint import (
    MAX_CONFIG_BYTES,
    WEIGHTS_NAME,
    backbone_fingerprint,
    check_finite,
    config_from_meta,
    parse_meta,
    refuse_stacked,
    saved_sites,
)
from .config import CONFIG_NAME
from .errors import CheckpointError, DeltaError
from .heads import head_tensor_key, resize_heads
from .io.files import at_end, open_regular, read_regular_file
from .io.tensor_file import DTYPE_NAMES, DTYPES, Header, check_entries, read_header
from .io.transaction import locked_view
from .registry import DELTA_REGISTRY
from .site import shared_tensor_key

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
        site_names: The saved sites' full names (what the first miss of this list resolves on the backbone).
        head_names: The modules the delta carries a copy of (``"heads"`` in its config), as saved.
    """

    name: str
    path: str
    delta_type: str
    config: Any
    sites: int
    nbytes: int
    load_options: dict[str, bool] = field(default_factory=dict)
    site_names: tuple[str, ...] = ()
    head_names: tuple[str, ...] = ()


def _check_tensors_belong(
    names: Iterable[str], sites: list[str], heads: list[str], delta_type: str, where: str
) -> None:
    """Every tensor of the weights header sits under a saved site, is a shared ``<type>_shared.`` tensor or one of a
    listed head's copy (``<type>_heads.<head>.``)."""
    prefixes = (
        *(s + "." for s in sites), shared_tensor_key(delta_type), *(head_tensor_key(delta_type, h + ".") for h in heads)
    )
    for name in names:
        if not name.startswith(prefixes):
            raise CheckpointError(
                f"{where!r} holds tensor {name[:200]!r}, which belongs to none of the sites and heads its config "
                f"lists; the two files do not belong together (or were edited). Save the delta again."
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
        heads = list(meta.get("heads") or [])
        weights_file = find(WEIGHTS_NAME)
        with open_regular(weights_file, "the weights file") as (fd, size):
            header, _ = read_header(fd, size, weights_file, max_header=_header_bound([*sites, *heads]))
        refuse_stacked(header, weights_file)
        _check_tensors_belong(header.entries, sites, heads, meta["delta_type"], weights_file)
    return StoredDelta(
        name, path, meta["delta_type"], config, len(sites), header.data_bytes, dict(load_options), tuple(sites),
        tuple(heads),
    )


def _header_bound(sites: Iterable[str]) -> int:
    """Bound on a weights header for these sites (and heads): a few entries of ~100 bytes plus the name per site,
    generously (as the loader bounds it)."""
    sites = list(sites)
    longest = max((len(s) for s in sites), default=0)
    return 65536 + (len(sites) + 1) * 16 * (512 + longest)


def _readv_into(fd: int, views: list[memoryview], where: str) -> None:
    """Fill ``views`` in order from ``fd`` (short reads retried; a file that ends early is an error)."""
    views = [v for v in views if len(v)]
    i = 0
    while i < len(views):
        try:
            if hasattr(os, "readv"):
                got = os.readv(fd, views[i : i + 512])
            else:
                chunk = os.read(fd, len(views[i]))
                views[i][: len(chunk)] = chunk
                got = len(chunk)
        except OSError as exc:
            raise CheckpointError(f"Cannot read {where!r}: {exc.strerror or exc}.") from None
        if got == 0:
            raise CheckpointError(f"{where!r} ended early: it is truncated, or it was changed while being read.")
        while got and i < len(views):
            if got >= len(views[i]):
                got -= len(views[i])
                i += 1
            else:
                views[i] = views[i][got:]
                got = 0


def _read_values(fd: int, header: Header, live: dict[str, torch.Tensor], digest: Any, where: str) -> None:
    """Read the data section of a validated header straight into the tensors ``live`` (same names), hashing the
    bytes where they land: each tensor whose stored dtype is its own receives its bytes directly; the others go
    through one buffer each and are converted (as the checkpoint loader converts them)."""
    order = sorted(header.entries, key=lambda n: header.entries[n].begin)
    buffers: list[torch.Tensor] = []
    for name in order:
        entry, target = header.entries[name], live[name]
        if DTYPES[entry.dtype] == target.dtype and target.is_contiguous():
            buffers.append(target.detach().reshape(-1).view(torch.uint8))
        else:
            buffers.append(torch.empty(entry.end - entry.begin, dtype=torch.uint8))
    _readv_into(fd, [memoryview(b.numpy()) for b in buffers], where)
    if not at_end(fd):
        raise CheckpointError(f"{where!r} grew while being read; it is being written by another process.")
    for name, buffer in zip(order, buffers):
        if buffer.numel():
            digest.update(memoryview(buffer.numpy()))
        target = live[name]
        if buffer.data_ptr() != target.data_ptr() and buffer.numel():
            entry = header.entries[name]
            with torch.no_grad():
                target.copy_(buffer.view(DTYPES[entry.dtype]).reshape(entry.shape))


def _check_finite(values: dict[str, torch.Tensor], where: str) -> None:
    """Refuse NaN or infinite values (two reductions per tensor; the full check names the culprit)."""
    for name, value in values.items():
        if value.is_floating_point() and value.numel():
            low, high = torch.aminmax(value.detach())  # NaN propagates; an infinity is the min or the max
            if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
                check_finite(name, value, where)


def _head_modules(backbone: nn.Module, names: tuple[str, ...]) -> list[tuple[str, nn.Module]] | None:
    """The backbone modules the saved heads name, or ``None`` when one is missing (the full loader then reports it).

    The fast path runs only for site lists that resolved to their saved names, i.e. under the identity placement,
    which places the heads at their saved names too."""
    try:
        return [(name, backbone.get_submodule(name)) for name in names]
    except AttributeError:
        return None


def _resize_heads(delta: Any, shapes: dict[str, list[int]], path: str) -> None:
    """Give the head copies their recorded sizes (a classifier with another number of labels than the backbone's),
    as the checkpoint loader does, before the header is compared with them."""
    if delta.head_container is None or not shapes:
        return
    try:
        resize_heads(delta.head_container, shapes, path)
    except DeltaError as exc:  # a config that does not fit this backbone: a checkpoint error, as in load_delta
        raise CheckpointError(str(exc)) from None


def load_into(entry: StoredDelta, backbone: nn.Module, hosts: list[tuple[str, nn.Module]]) -> Any:
    """Build the stored delta ``entry`` on ``hosts`` (its saved sites, resolved on ``backbone`` by an earlier full
    load of the same site list) and read its checkpoint into it, left detached. Head copies are built on the modules
    the config lists under ``"heads"`` and take the sizes recorded under ``"head_shapes"``, as in the full loader.
    Returns ``None`` when the config no longer describes those sites and heads (the checkpoint changed since it was
    registered) or a head is not a module of this backbone: the caller then runs the full loader, which validates it
    afresh.

    The checks are those of :func:`deltakit.checkpoint.load_delta` on a checkpoint whose saved names are the
    sites' names here: the config (strict, every field), the delta type, no backbone tensors, the header against
    exactly the tensors the built delta has (names, shapes, floating dtypes), the SHA-256 the config records over
    the very bytes that land in the parameters, finiteness (unless allowed) and the backbone fingerprint (unless
    ``check_backbone=False``). A refused checkpoint leaves nothing behind (the delta was never attached).

    Raises:
        CheckpointError: The checkpoint fails a check.
    """
    options = entry.load_options
    with locked_view(entry.path) as find:
        config_file = find(CONFIG_NAME)
        meta = parse_meta(read_regular_file(config_file, "the delta config", MAX_CONFIG_BYTES), config_file)
        if (meta["delta_type"] != entry.delta_type or meta["backbone_tensors"]
                or tuple(saved_sites(meta, config_file)) != entry.site_names
                or tuple(meta.get("heads") or []) != entry.head_names):
            return None
        heads = _head_modules(backbone, entry.head_names)
        if heads is None:
            return None
        config = config_from_meta(meta, config_file)
        delta = DELTA_REGISTRY[meta["delta_type"]].build_detached(backbone, config, hosts, name=entry.name, heads=heads)
        _resize_heads(delta, meta.get("head_shapes") or {}, entry.path)
        live = delta.delta_state_dict()
        expected = {
            k: (tuple(v.shape), "float" if v.is_floating_point() else DTYPE_NAMES[v.dtype]) for k, v in live.items()
        }
        weights_file = find(WEIGHTS_NAME)
        with open_regular(weights_file, "the weights file") as (fd, size):
            header, head = read_header(
                fd, size, weights_file, max_header=_header_bound([*entry.site_names, *entry.head_names])
            )
            refuse_stacked(header, weights_file)
            check_entries(header, expected, weights_file)
            digest = hashlib.sha256(head)
            with torch.inference_mode(False):
                _read_values(fd, header, live, digest, weights_file)
    recorded = meta.get("weights_sha256")
    if recorded is not None and digest.hexdigest() != recorded:
        raise CheckpointError(
            f"{weights_file!r} does not match the SHA-256 recorded in {config_file!r} when it was saved: the weights "
            f"file is corrupt or was modified (or the two files come from different saves). Save the delta again, "
            f"or restore both files from a copy."
        )
    if not options.get("allow_nonfinite", False):
        _check_finite(live, weights_file)
    if options.get("check_backbone", True) and isinstance(meta.get("fingerprint"), dict):
        fresh = backbone_fingerprint(backbone, [n for n, _ in hosts])
        for key in ("config", "host_shapes_sha256"):
            if meta["fingerprint"].get(key) != fresh.get(key):
                raise CheckpointError(
                    f"The backbone does not match the one {entry.path!r} was saved from ({key}: saved "
                    f"{str(meta['fingerprint'].get(key))[:300]}, this backbone {fresh.get(key)!r}). Register it with "
                    f"check_backbone=False to load anyway."
                )
    return delta


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
        # Saved site list -> its hosts on the backbone, learnt from the first full load of that list (None: that
        # list does not resolve to the same names here, so its deltas always take the full loader).
        self.hosts: dict[tuple[str, ...], list[tuple[str, nn.Module]] | None] = {}

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

    def _known_hosts(self, entry: StoredDelta, backbone: nn.Module) -> list[tuple[str, nn.Module]] | None:
        """The hosts an earlier full load resolved ``entry``'s sites to, if each is still that module."""
        hosts = self.hosts.get(entry.site_names)
        if not hosts:
            return None
        try:
            if all(backbone.get_submodule(name) is module for name, module in hosts):
                return hosts
        except AttributeError:  # a host module was removed from the backbone since
            pass
        del self.hosts[entry.site_names]
        return None

    def materialise(self, name: str, backbone: nn.Module, full_load: Callable[[StoredDelta], Any]) -> Any:
        """Build the stored ``name`` (detached), recording the miss and its time: by :func:`load_into` when an
        earlier full load resolved its list of sites, by ``full_load(entry)`` otherwise (which teaches the list)."""
        entry = self.entries[name]
        start = time.perf_counter()
        hosts = self._known_hosts(entry, backbone)
        delta = None if hosts is None else load_into(entry, backbone, hosts)
        if delta is None:
            delta = full_load(entry)
            resolved = [(s.name, s.host) for s in delta.sites]
            same = sorted(n for n, _ in resolved) == sorted(entry.site_names)
            self.hosts[entry.site_names] = resolved if same else None
        self.loaded(name, time.perf_counter() - start)
        return delta
