"""A cheap fingerprint of a backbone, recorded at save and compared at load: structure and sampled weight values.

Structure: the model class, config essentials and a hash of the hosts' own parameter shapes. Values
(``host_values``): a few entries of every host tensor at fixed positions, summed into a sketch of
:data:`SKETCH_SLOTS` numbers, so that a delta loaded onto a backbone whose weights differ from the ones it was
trained on (a classifier head initialised with another seed, another fine-tune of the same architecture) is
detected. The sketch has a fixed size, so the config does not grow with the model. It is compared with a tolerance
of the coarser of the two dtypes: a model saved in float32 and served in bfloat16 still matches, independently
initialised or trained weights (which differ in every entry) do not. Checkpoints written before values were
recorded carry none and are not compared; nor are values that cannot be read (meta or sharded tensors).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..quantization import is_quantized, logical_shape
from ..structures import find_config

__all__ = [
    "SAMPLES_PER_TENSOR",
    "SKETCH_SLOTS",
    "ValueOf",
    "backbone_fingerprint",
    "check_fingerprint",
    "host_values",
    "model_order",
]

_ESSENTIALS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "is_encoder_decoder",
)

#: Slots of the value sketch: a fixed size, whatever the number of sites.
SKETCH_SLOTS = 16
#: Entries read per host tensor (consecutive entries go to consecutive slots).
SAMPLES_PER_TENSOR = 4

#: ``value_of(host name, parameter name, tensor)``: the values to sample (``None``: they cannot be known).
ValueOf = Callable[[str, str, torch.Tensor], "torch.Tensor | None"]


def _host_shapes(backbone: nn.Module, names: list[str]) -> dict[str, dict[str, list[int]]]:
    modules = dict(backbone.named_modules())
    return {
        n: {p: list(logical_shape(t)) for p, t in modules[n].named_parameters(recurse=False)}
        for n in names
    }


def model_order(backbone: nn.Module, names: list[str]) -> list[str]:
    """``names`` in the backbone's module order: the order values are sampled in, whatever order a caller has."""
    order = {n: i for i, (n, _) in enumerate(backbone.named_modules())}
    return sorted(names, key=lambda n: order.get(n, len(order)))


def _readable(tensor: torch.Tensor) -> bool:
    """Whether the tensor's values can be read here: materialised and not a shard."""
    if tensor.is_meta or tensor.numel() == 0 or hasattr(tensor, "ds_id"):
        return False  # ds_id: a DeepSpeed ZeRO-3 partition (its local data is not the tensor)
    return type(tensor).__name__ != "DTensor"


def _positions(numel: int) -> list[int]:
    """Fixed, evenly spread flat positions (the same for a tensor of the same size, whatever the dtype)."""
    return [(2 * j + 1) * numel // (2 * SAMPLES_PER_TENSOR) for j in range(SAMPLES_PER_TENSOR)]


def _eps(dtype_name: str) -> float:
    dtype = getattr(torch, dtype_name, None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return float(torch.finfo(dtype).eps)
    return float(torch.finfo(torch.bfloat16).eps)  # unknown name: the coarsest common dtype


def _sketch(
    backbone: nn.Module, site_names: list[str], value_of: ValueOf | None, skip: set[str]
) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]] | None:
    """``(sums, magnitudes, dtypes, tensor names)``, or ``None`` when some host tensor cannot be read (meta,
    sharded, merged without a copy of its own values): then no values are recorded or compared at all."""
    modules = dict(backbone.named_modules())
    sums = torch.zeros(SKETCH_SLOTS, dtype=torch.float64)
    magnitudes = torch.zeros(SKETCH_SLOTS, dtype=torch.float64)
    dtypes: list[str] = []
    names: list[str] = []
    slot = 0
    for host in model_order(backbone, site_names):
        for pname, tensor in modules[host].named_parameters(recurse=False):
            if is_quantized(tensor):
                # A delta trained on the float weights is loaded onto their quantized version and the other way
                # round (QLoRA): a legitimate change whose rounding is of another kind than a dtype's. Values
                # are not compared then; the shapes (logical, not a packed 4-bit weight's bytes) still are.
                return None
            if f"{host}.{pname}" in skip or not tensor.is_floating_point():
                continue  # written by the checkpoint itself / integer storage (a quantized weight): both sides alike
            values = tensor if value_of is None else value_of(host, pname, tensor)
            if values is None or not _readable(values):
                return None
            with torch.no_grad():
                flat = values.detach().reshape(-1)
                index = torch.tensor(_positions(flat.numel()), device=flat.device)
                picked = flat[index].to("cpu", torch.float64).tolist()
            for value in picked:
                sums[slot % SKETCH_SLOTS] += value
                magnitudes[slot % SKETCH_SLOTS] += abs(value)
                slot += 1
            dtypes.append(str(values.dtype).removeprefix("torch."))
            names.append(f"{host}.{pname}")
    if not bool(torch.isfinite(sums).all()):
        return None  # NaN never compares equal; the finiteness of the weights is not what this checks
    return sums, magnitudes, dtypes, names


def host_values(
    backbone: nn.Module, site_names: list[str], value_of: ValueOf | None = None, skip: set[str] | None = None
) -> dict[str, Any] | None:
    """The value sketch of the hosts' own weights (see the module docstring).

    Args:
        backbone: The model.
        site_names: The delta's sites (taken in the backbone's module order, so a wrapped backbone matches).
        value_of: Replaces a host tensor's values (a merged delta's pre-merge copy); ``None`` from it means they
            cannot be known, and nothing is recorded.
        skip: ``host.param`` names left out (backbone tensors the checkpoint itself writes).

    Returns:
        ``{"dtype": the coarsest, "sketch": base64 of the float32 sums}``, or ``None``.
    """
    made = _sketch(backbone, site_names, value_of, skip or set())
    if made is None:
        return None
    sums, _, dtypes, _ = made
    coarsest = max(dtypes, key=_eps, default="float32")
    # float32 sums: their rounding (2**-24 of a slot's magnitude) is far inside the comparison's tolerance.
    encoded = base64.b64encode(sums.numpy().astype("<f4").tobytes()).decode("ascii")
    return {"dtype": coarsest, "sketch": encoded}


def backbone_fingerprint(
    backbone: nn.Module, site_names: list[str], value_of: ValueOf | None = None
) -> dict[str, Any]:
    """A cheap fingerprint: class, config essentials, a hash of the hosts' own parameter shapes and a sketch of
    their values (see the module docstring).

    Host names are not part of it, so a backbone wrapped in another module still matches.
    """
    config = find_config(backbone)
    essentials = {}
    if config is not None:
        for key in _ESSENTIALS:
            value = getattr(config, key, None)
            if isinstance(value, (bool, int, float, str)):
                essentials[key] = value
    shapes = list(_host_shapes(backbone, site_names).values())
    digest = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "class": type(backbone).__name__,
        "config": essentials,
        "host_shapes_sha256": digest,
        "host_values": host_values(backbone, site_names, value_of),
    }


def _decode(saved: Any, path: str) -> tuple[str, torch.Tensor] | None:
    """The recorded sketch, checked; ``None`` when there is none (older checkpoints, unreadable hosts)."""
    if saved is None:
        return None
    bad = CheckpointError(
        f"{path!r}: the fingerprint's host_values {str(saved)[:120]} is malformed; the file is corrupt or was edited "
        f"by hand (check_backbone=False skips the fingerprint)."
    )
    if not (isinstance(saved, dict) and isinstance(saved.get("dtype"), str) and isinstance(saved.get("sketch"), str)
            and len(saved["sketch"]) < 16 * SKETCH_SLOTS):
        raise bad
    try:
        raw = base64.b64decode(saved["sketch"], validate=True)
    except ValueError:
        raise bad from None
    if len(raw) != 4 * SKETCH_SLOTS:
        raise bad
    sums = torch.frombuffer(bytearray(raw), dtype=torch.float32).to(torch.float64)
    if not bool(torch.isfinite(sums).all()):
        raise bad
    return saved["dtype"], sums


def _check_values(saved: Any, backbone: nn.Module, sites: list[str], skip: set[str], path: str) -> None:
    """Compare the recorded value sketch with this backbone's."""
    decoded = _decode(saved, path)
    if decoded is None:
        return
    saved_dtype, saved_sums = decoded
    made = _sketch(backbone, sites, None, skip)
    if made is None:
        return  # this backbone's values cannot be read here (meta, sharded): nothing to compare
    sums, magnitudes, dtypes, names = made
    # A slot sums a few entries, each rounded to the coarser dtype on one side: the difference stays below a few
    # units of roundoff of their magnitudes. Other weights differ by about the magnitudes themselves.
    coarsest = max([saved_dtype, *dtypes], key=_eps)
    tolerance = 4 * _eps(coarsest) * magnitudes + 1e-30
    bad = (sums - saved_sums).abs() > tolerance
    if bool(bad.any()):
        slot = int(bad.nonzero()[0])
        involved = [names[i // SAMPLES_PER_TENSOR] for i in range(slot, len(names) * SAMPLES_PER_TENSOR, SKETCH_SLOTS)]
        involved = sorted(set(involved))
        more = f" and {len(involved) - 3} more" if len(involved) > 3 else ""
        raise CheckpointError(
            f"The backbone's weights differ from those the delta in {path!r} was trained on: the values sampled from "
            f"{involved[:3]}{more} do not match ({int(bad.sum())} of {SKETCH_SLOTS} checks differ). The structure "
            f"matches, but the weights were initialised or trained differently (a head created with another seed, "
            f"another checkpoint of this architecture), so the delta would not reproduce its results. Load the "
            f"backbone it was trained on (a new task head belongs in the delta: modules_to_save=[...]), or pass "
            f"check_backbone=False to load anyway."
        )


def check_fingerprint(
    saved: Any, backbone: nn.Module, sites: list[str], path: str, skip: set[str] | None = None
) -> None:
    """Compare a recorded fingerprint with ``backbone``: config essentials, host shapes, then host values.

    Args:
        saved: The ``fingerprint`` field of a validated config (nothing is checked when it is not an object).
        sites: The delta's sites in this backbone.
        path: The checkpoint, for messages.
        skip: ``host.param`` names whose values the checkpoint itself writes (saved backbone tensors).

    Raises:
        CheckpointError: The backbone differs; the message says how and names ``check_backbone=False``.
    """
    if not isinstance(saved, dict):
        return
    fresh = backbone_fingerprint(backbone, sites, value_of=lambda *_: None)  # the structure; values below
    for key in ("config", "host_shapes_sha256"):
        if saved.get(key) != fresh.get(key):
            raise CheckpointError(
                f"The backbone does not match the one {path!r} was saved from ({key}: saved "
                f"{str(saved.get(key))[:300]}, this backbone {fresh.get(key)!r}; saved from a "
                f"{str(saved.get('class'))[:80]}). Pass check_backbone=False to load anyway."
            )
    _check_values(saved.get("host_values"), backbone, sites, skip or set(), path)
