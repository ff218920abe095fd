"""Where a saved delta sits in the backbone it is loaded into: one offset for the whole checkpoint.

Saved names are resolved as they are, with a prefix added (the new model wraps the saved backbone: saved from
``BertModel``, loaded into ``BertForSequenceClassification``), or with a leading prefix removed (the other way
round). Parts are never dropped from inside a name, so a delta saved on ``blocks.1.proj`` never lands on
``blocks.0.proj``.
"""

from __future__ import annotations

from torch import nn

from ..errors import CheckpointError

#: How the saved backbone sits in the one loaded into: ``(strip, add)``, dotted prefixes ending with ``"."`` (or
#: empty), at most one of them non-empty. A saved name ``strip + rest`` becomes ``add + rest``.
Placement = tuple[str, str]


def place(saved: str, placement: Placement) -> str | None:
    """The name ``saved`` gets under ``placement``, or ``None`` when it lies outside the part that was moved."""
    strip, add = placement
    if not saved.startswith(strip) or len(saved) == len(strip):
        return None
    return add + saved[len(strip) :]


def placements_of(saved: str, names: set[str]) -> list[Placement]:
    """Every placement under which ``saved`` names an existing module: as it is, inside a wrapper that this model
    adds (a model name ends with ``"." + saved``), or without the wrapper it was saved with (a model name equals
    ``saved`` without some leading parts). Parts are only ever added or removed in front, never from inside."""
    found: list[Placement] = [("", "")] if saved in names else []
    found += [("", n[: -len(saved)]) for n in sorted(names) if n.endswith("." + saved)]
    parts = saved.split(".")
    found += [(".".join(parts[:i]) + ".", "") for i in range(1, len(parts)) if ".".join(parts[i:]) in names]
    return found


def describe_placement(placement: Placement) -> str:
    strip, add = placement
    if add:
        return f"inside {add[:-1]!r} (this model wraps the saved backbone)"
    if strip:
        return f"without the saved wrapper {strip[:-1]!r} (the saved backbone wrapped this model)"
    return "under its saved name"


def similar_names(saved: str, names: list[str], least: int = 1) -> str:
    """A few names of this backbone ending the same way as ``saved`` (in at least ``least`` dotted parts): a hint
    for the error messages."""
    parts = saved.split(".")
    for keep in range(min(len(parts), 3), least - 1, -1):
        tail = "." + ".".join(parts[-keep:])
        similar = [n for n in names if ("." + n).endswith(tail)]
        if similar and len(similar) <= 50:
            more = f" and {len(similar) - 3} more" if len(similar) > 3 else ""
            return f" Names ending like it here: {similar[:3]}{more}."
    return ""


def resolve_placement(
    sites: list[str], tensors: list[str], modules: list[str], params: list[str], source: str, backbone: nn.Module
) -> Placement:
    """The one placement under which every saved site is a module of this backbone.

    A backbone wrapped in another module is fine in both directions (saved from ``BertModel`` and loaded into
    ``BertForSequenceClassification``, or the other way round), with one offset for the whole checkpoint. A saved
    site never moves elsewhere inside the model (``blocks.1.proj`` is never taken for ``blocks.0.proj``).

    Raises:
        CheckpointError: A site exists under no placement, the sites need different placements, or several
            placements fit (this backbone holds the saved one more than once).
    """
    where = f"this backbone ({type(backbone).__name__})"
    keys, names = (sites, set(modules)) if sites else (tensors, set(params))
    what = "Delta site" if sites else "Backbone tensor"
    if not keys:
        return ("", "")

    def missing(key: str) -> CheckpointError:
        return CheckpointError(
            f"{what} {key!r} saved in {source!r} does not exist in {where}: no "
            f"{'module' if sites else 'parameter'} there has this name, ends with it (a wrapper around the "
            f"saved backbone) or equals it without leading parts (the saved backbone wrapped around this one)."
            f"{similar_names(key, sorted(names))} The checkpoint was made for another architecture or another size."
        )

    common = placements_of(keys[0], names)
    if not common:
        raise missing(keys[0])
    for key in keys[1:]:
        fits = [p for p in common if place(key, p) in names]
        if not fits:
            own = placements_of(key, names)
            if not own:
                raise missing(key)
            raise CheckpointError(
                f"The saved sites of {source!r} do not sit together in {where}: {keys[0]!r} is found "
                f"{describe_placement(common[0])} but {key!r} only {describe_placement(own[0])}. Load into the "
                f"model the delta was trained on (or one of the same class)."
            )
        common = fits
    if len(common) > 1:
        at = [place(keys[0], p) for p in common]
        raise CheckpointError(
            f"{source!r} fits {where} in {len(common)} places: its {what.lower()} {keys[0]!r} could be {at[:4]}. "
            f"This model holds the saved backbone more than once; load into the submodule you mean "
            f"(backbone_model=<that submodule>)."
        )
    return common[0]


def backbone_targets(
    declared: list[str], placement: Placement, backbone_params: dict[str, nn.Parameter], backbone: nn.Module, path: str
) -> dict[str, str]:
    """``{saved name: parameter name here}`` of the backbone tensors a checkpoint declares (all must exist)."""
    out: dict[str, str] = {}
    for saved in declared:
        target = place(saved, placement)
        if target not in backbone_params:
            at = (
                f"which puts it at {target!r}, and there is no such parameter" if target is not None
                else f"and it lies outside {placement[0][:-1]!r}"
            )
            raise CheckpointError(
                f"Backbone tensor {saved!r} saved in {path!r} (kept trainable by freeze_module, e.g. a head) does not "
                f"exist in this backbone ({type(backbone).__name__}): the delta's sites are found "
                f"{describe_placement(placement)}, {at}.{similar_names(saved, list(backbone_params), least=2)} "
                f"Load into the model class the delta was trained on."
            )
        out[saved] = target
    return out
