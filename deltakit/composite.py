"""``CompositeDelta``: several deltas of different types on one backbone, handled as one.

A composite holds member deltas (a LoRA on some projections, a BitFit on some norms, adapters in some blocks: what
a structure search selects, or any mix). It attaches, detaches, merges and unmerges them as a unit (a refused step
leaves every member as it was), counts and lists their parameters together, saves them as one checkpoint
directory and loads back in one ``AutoDeltaModel.from_finetuned`` call. ``DeltaGroup.add`` takes it like any
delta, so ``switch()`` serves it; per-sample ``route()`` does not (the group says so and suggests ``switch()``).

**Checkpoint layout.** Each member is an ordinary deltakit checkpoint (readable on its own by every tool that reads
one) in a sub-directory, and a small manifest names them::

    path/composite_delta.json          {"format": "deltakit-composite", "members": [{"name", "delta_type", "directory"}]}
    path/members-<token>/0-lora/       delta_config.json + delta_model.safetensors
    path/members-<token>/1-bitfit/     ...

A save writes every member into a *fresh* ``members-<token>`` directory, then replaces the manifest in one atomic,
durable step (:func:`deltakit.io.transaction.commit`), then removes the member directories the old manifest named.
So after a crash at any moment the manifest names a whole set of members, old or new.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ._version import __version__
from .base import DeltaBase
from .checkpoint import load_delta, make_directory
from .config import DeltaConfig
from .errors import CheckpointError, DeltaError, DeltaStateError
from .io.files import read_regular_file
from .io.safe_json import loads
from .io.transaction import commit, locked_view

__all__ = ["COMPOSITE_MANIFEST", "CompositeDelta", "is_composite_checkpoint", "load_composite"]

#: The manifest's file name (its presence makes a directory a composite checkpoint).
COMPOSITE_MANIFEST = "composite_delta.json"
COMPOSITE_FORMAT = "deltakit-composite"
COMPOSITE_VERSION = 1
_MEMBERS_PREFIX = "members-"
_MAX_MANIFEST_BYTES = 1 << 20
_MAX_MEMBERS = 1024
_ATTACHED, _DETACHED, _MERGED = "attached", "detached", "merged"


class CompositeDelta(DeltaBase, register_type=False):
    """Several deltas on one backbone, attached, detached, saved and loaded as one.

    Args:
        members: The member deltas, all on the same backbone and all in the same state (all attached or all
            detached). They keep their own names and hooks; the composite only moves them together.
        name: The composite's name (its name in a ``DeltaGroup``); a Python identifier.

    Raises:
        DeltaError: No members, a member given twice, members on different backbones, in different states, or a
            bad name. Nothing is changed.
    """

    delta_type = "composite"

    def __init__(self, members: Sequence[DeltaBase], *, name: str = "composite") -> None:
        members = _check_members(members)
        if not isinstance(name, str) or not name.isidentifier():
            raise DeltaError(f"A composite delta's name must be a Python identifier, got {name!r}.")
        self.members: list[DeltaBase] = members
        self.backbone_model = members[0].backbone_model
        self.config = DeltaConfig(modified_modules=self.modified_modules)
        self.child_name = name
        self.sites = []  # the members own the sites; an empty list also tells DeltaGroup.route() it is not routable
        self.shared = None
        self._state = members[0].state
        self._order_key = min(m._order_key for m in members)  # where DeltaGroup sorts it among deltas
        self._state_dict_handle = None
        self._set_state_dict = False
        self._extra = []
        self._merge_backup = {}  # read by DeltaBase.__deepcopy__; the members keep their own
        self.unfrozen_parameter_names = []

    # ---------------------------------------------------------------- what it is
    @property
    def modified_modules(self) -> list[str]:
        """Full names of the modules any member modifies (each once, in the members' order)."""
        return list(dict.fromkeys(n for m in self.members for n in m.modified_modules))

    def _describe(self) -> str:
        kinds = ", ".join(f"{m.name} ({m.delta_type})" for m in self.members)
        return f"CompositeDelta '{self.child_name}' [{kinds}]"

    def __repr__(self) -> str:
        return (f"CompositeDelta(name={self.child_name!r}, state={self._state!r}, members="
                f"{[m.name for m in self.members]}, parameters={self.num_delta_parameters()})")  # fmt: skip

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every member's parameters, named as in the backbone."""
        for member in self.members:
            yield from member.named_parameters()

    def delta_state_dict(self) -> dict[str, torch.Tensor]:
        """Every member's tensors, keyed ``<member name>/<the member's own key>`` (member keys may coincide)."""
        return {f"{m.name}/{k}": v for m in self.members for k, v in m.delta_state_dict().items()}

    # ---------------------------------------------------------------- lifecycle, all members or none
    def attach(self) -> CompositeDelta:
        """Attach every member (in order); if one is refused, the ones attached before are detached again."""
        self._require("attach", _DETACHED)
        self._all("attach", self.members, undo="detach")
        self._state = _ATTACHED
        if self._set_state_dict:
            self._install_state_dict_hook()
        return self

    def detach(self) -> CompositeDelta:
        """Detach every member (last first): the backbone is bit for bit what it was."""
        self._require("detach", _ATTACHED)
        self._all("detach", self.members[::-1], undo="attach")
        self._remove_state_dict_hook()
        self._state = _DETACHED
        return self

    def merge(self, exact_unmerge: bool = True, *, safe: bool = True) -> CompositeDelta:
        """Merge every member in order (see :meth:`DeltaBase.merge`); a refusal unmerges the ones merged before."""
        self._require("merge", _ATTACHED)
        self._all("merge", self.members, undo="unmerge", exact_unmerge=exact_unmerge, safe=safe)
        self._state = _MERGED
        return self

    def unmerge(self) -> CompositeDelta:
        """Unmerge every member, last merged first."""
        self._require("unmerge", _MERGED)
        self._all("unmerge", self.members[::-1], undo="merge")
        self._state = _ATTACHED
        return self

    def _all(self, action: str, members: Sequence[DeltaBase], undo: str, **kwargs: Any) -> None:
        done: list[DeltaBase] = []
        try:
            for member in members:
                getattr(member, action)(**kwargs)
                done.append(member)
        except BaseException:
            for member in reversed(done):
                getattr(member, undo)()
            raise

    def freeze_module(
        self, module: nn.Module | None = None, exclude: Any = None, set_state_dict: bool = False
    ) -> None:
        """See :meth:`DeltaBase.freeze_module` (``"deltas"`` means every member's parameters). Backbone tensors
        kept trainable (a classifier head) are saved with the first member, so they come and go with the unit."""
        super().freeze_module(module, exclude, set_state_dict)
        self.members[0].unfrozen_parameter_names = list(self.unfrozen_parameter_names)

    # ---------------------------------------------------------------- checkpoint
    def save_finetuned(self, path: str | os.PathLike[str], *, overwrite: bool = True) -> str:
        """Save every member into a fresh sub-directory of ``path``, then switch the manifest to them atomically.

        Raises:
            CheckpointError: ``path`` holds a single-delta checkpoint (``delta_config.json``), or a composite one
                and ``overwrite`` is false, or writing failed (the previous checkpoint is then unchanged).
        """
        path = os.fspath(path)
        if os.path.exists(path) and not os.path.isdir(path):
            raise CheckpointError(f"Cannot save the composite delta to {path!r}: it exists and is not a directory.")
        if os.path.lexists(os.path.join(path, "delta_config.json")):
            raise CheckpointError(
                f"{path!r} holds a single-delta checkpoint (delta_config.json); save the composite elsewhere, or "
                f"remove that checkpoint first."
            )
        if not overwrite and os.path.lexists(os.path.join(path, COMPOSITE_MANIFEST)):
            raise CheckpointError(f"{path!r} already holds a composite delta; pass overwrite=True to replace it.")
        make_directory(path)
        old = _referenced_directories(path)
        batch = f"{_MEMBERS_PREFIX}{secrets.token_hex(6)}"
        entries = []
        try:
            for k, member in enumerate(self.members):
                directory = f"{batch}/{k}-{member.name}"
                member.save_finetuned(os.path.join(path, directory))
                entries.append({"name": member.name, "delta_type": member.delta_type, "directory": directory})
            manifest = {"format": COMPOSITE_FORMAT, "format_version": COMPOSITE_VERSION,
                        "deltakit_version": __version__, "name": self.child_name, "members": entries}  # fmt: skip
            data = (json.dumps(manifest, indent=2) + "\n").encode()
            commit(path, {COMPOSITE_MANIFEST: lambda handle: handle.write(data)}, may_replace=overwrite)
        except BaseException:
            shutil.rmtree(os.path.join(path, batch), ignore_errors=True)
            raise
        for directory in old - {batch}:  # the old members, no longer named by the manifest
            shutil.rmtree(os.path.join(path, directory), ignore_errors=True)
        return path


def _check_members(members: Any) -> list[DeltaBase]:
    if isinstance(members, DeltaBase) or not isinstance(members, (list, tuple)) or not members:
        raise DeltaError(f"CompositeDelta needs a non-empty list of delta objects, got {members!r:.120}.")
    for k, member in enumerate(members):
        if not isinstance(member, DeltaBase) or isinstance(member, CompositeDelta):
            raise DeltaError(f"members[{k}] is a {type(member).__name__}; members must be (non-composite) deltas.")
    if len({id(m) for m in members}) != len(members):
        raise DeltaError("CompositeDelta got the same delta object twice; give each member once.")
    backbone = members[0].backbone_model
    if any(m.backbone_model is not backbone for m in members):
        raise DeltaError("The members of a composite delta must all be built on the same backbone model.")
    states = {m.state for m in members}
    if len(states) != 1 or states == {_MERGED}:
        raise DeltaStateError(
            f"The members of a composite delta must all be attached or all detached, got "
            f"{[(m.name, m.state) for m in members]}; attach or detach them first."
        )
    return list(members)


def _referenced_directories(path: str) -> set[str]:
    """The ``members-*`` directories the current manifest in ``path`` uses (none when there is none)."""
    if not os.path.lexists(os.path.join(path, COMPOSITE_MANIFEST)):
        return set()
    try:
        manifest = read_manifest(path)
    except CheckpointError:
        return set()  # a broken manifest: keep its files, never delete what we cannot account for
    return {m["directory"].split("/")[0] for m in manifest["members"]}


def is_composite_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether the directory ``path`` holds a composite delta's manifest."""
    return os.path.isdir(path) and os.path.lexists(os.path.join(os.fspath(path), COMPOSITE_MANIFEST))


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate the manifest of the composite checkpoint ``path``.

    Raises:
        CheckpointError: Missing or not a deltakit composite manifest, naming the file and the field.
    """
    path = os.fspath(path)
    with locked_view(path) as resolve:
        where = resolve(COMPOSITE_MANIFEST)
        manifest = loads(read_regular_file(where, "the composite delta manifest", _MAX_MANIFEST_BYTES), where)

    def bad(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{where!r}: field {field!r} {why}; the file is not a valid composite delta manifest.")

    if not isinstance(manifest, dict) or manifest.get("format") != COMPOSITE_FORMAT:
        raise bad("format", f"must be {COMPOSITE_FORMAT!r}")
    if manifest.get("format_version") != COMPOSITE_VERSION:
        raise bad("format_version", f"must be {COMPOSITE_VERSION} (this deltakit {__version__} reads version 1)")
    members = manifest.get("members")
    if not isinstance(members, list) or not 0 < len(members) <= _MAX_MEMBERS:
        raise bad("members", f"must be a list of 1 to {_MAX_MEMBERS} members")
    for k, member in enumerate(members):
        if not isinstance(member, dict) or set(member) != {"name", "delta_type", "directory"}:
            raise bad(f"members[{k}]", "must hold exactly name, delta_type and directory")
        if not isinstance(member["name"], str) or not member["name"].isidentifier():
            raise bad(f"members[{k}].name", "must be a Python identifier")
        directory = member["directory"]
        parts = directory.split("/") if isinstance(directory, str) else []
        # Only <members-token>/<k>-<name> inside the checkpoint: never an absolute path, '..' or a link elsewhere.
        if len(parts) != 2 or not parts[0].startswith(_MEMBERS_PREFIX) or any(
            not p or p in (".", "..") or "\\" in p for p in parts
        ):
            raise bad(f"members[{k}].directory", f"must be '{_MEMBERS_PREFIX}<token>/<k>-<name>', got {directory!r:.80}")
    return manifest


def load_composite(
    path: str | os.PathLike[str], backbone_model: nn.Module, *, name: str | None = None, **options: Any
) -> CompositeDelta:
    """Load a composite checkpoint onto ``backbone_model``, attached (``AutoDeltaModel.from_finetuned`` calls it).

    Each member is loaded with every check of :func:`deltakit.checkpoint.load_delta`; if one fails, the members
    loaded before it are detached again, so the backbone is unchanged. Members are named
    ``<composite name>_<member name>``, so two composites loaded on one backbone (e.g. in a ``DeltaGroup``) never
    claim the same child-module names.

    Args:
        path: The checkpoint directory.
        backbone_model: The model to load into.
        name: The composite's name (default: the saved one).
        **options: Passed to every member's ``load_delta`` (``check_backbone``, ``allow_nonfinite``).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise DeltaError(f"load_composite(path=...) must be a directory path, got {path!r:.80}.")
    path = os.fspath(path)
    manifest = read_manifest(path)
    name = manifest.get("name") if name is None else name
    if not isinstance(name, str) or not name.isidentifier():
        raise DeltaError(f"A composite delta's name must be a Python identifier, got {name!r:.80}.")
    loaded: list[DeltaBase] = []
    try:
        for entry in manifest["members"]:
            member_path = os.path.join(path, *entry["directory"].split("/"))
            if os.path.islink(member_path) or os.path.islink(os.path.dirname(member_path)):
                raise CheckpointError(f"{member_path!r} is a symbolic link; a composite's members live inside it.")
            member = load_delta(member_path, backbone_model, name=f"{name}_{entry['name']}", **options)
            loaded.append(member)
            if member.delta_type != entry["delta_type"]:
                raise CheckpointError(
                    f"{member_path!r} holds a {member.delta_type} delta, but the manifest says {entry['delta_type']}."
                )
    except BaseException:
        for member in reversed(loaded):
            member.detach()
        raise
    composite = CompositeDelta(loaded, name=name)
    composite.unfrozen_parameter_names = [n for m in loaded for n in m.unfrozen_parameter_names]
    return composite
