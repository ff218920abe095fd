"""Structure trees (bigmodelvis) with delta modules highlighted, and the parameter table of ``log()``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bigmodelvis import Visualization as _BigModelVis
from rich.console import Console
from rich.table import Table
from torch import nn

from .errors import DeltaError
from .site import DeltaSite

if TYPE_CHECKING:
    from .base import DeltaBase

DELTA_COLOR = "rgb(175,0,255)"


class Visualization(_BigModelVis):
    """Print a model's module tree, folding repeated blocks (``layer.0-11``), delta modules in purple.

    Example:
        >>> Visualization(model).structure_graph()

    Parameters are shown with their shapes: trainable ones in cyan, frozen ones in dark blue, delta parameters in
    purple. Works on models built on the meta device (only names and shapes are read).
    """

    def __init__(self, plm: nn.Module) -> None:
        if not isinstance(plm, nn.Module):
            raise DeltaError(
                f"Visualization needs an nn.Module (the model to draw), got {type(plm).__name__}: {plm!r:.80}. "
                f"Pass the model itself, e.g. Visualization(model).structure_graph()."
            )
        super().__init__(plm)

    def build_tree(self, module: nn.Module, tree: Any = None, in_delta: bool = False) -> None:
        for child_name, child in module.named_children():
            is_delta = in_delta or isinstance(child, DeltaSite)
            color = DELTA_COLOR if is_delta else self.normal_color
            node = tree.add(child_name, info=type(child).__name__, type_color=self.type_color, main_color=color)
            self.add_param_info_node(child, node, in_delta=is_delta)
            self.build_tree(child, node, in_delta=is_delta)

    def add_param_info_node(self, m: nn.Module, tree: Any, record_grad_state: bool = True, record_delta: bool = True, in_delta: bool = False) -> None:
        # Only the module's own parameters: children get their own nodes (bigmodelvis walks all descendants here).
        for name, param in m.named_parameters(recurse=False):
            if record_delta and (in_delta or isinstance(m, DeltaSite)):
                color = DELTA_COLOR
            elif record_grad_state and not param.requires_grad:
                color = self.no_grad_color
            else:
                color = self.param_color
            tree.add(info=f"{name}:{list(param.shape)}", is_param_node=True, param_color=color)

    def structure_graph(self, rootname: str | None = None, printTree: bool = True, **kwargs: Any) -> Any:  # noqa: N803
        """Build (and by default print) the folded module tree; returns the rich tree."""
        if rootname is None:
            rootname = type(self.plm).__name__
        return super().structure_graph(rootname=rootname, printTree=printTree, **kwargs)


def _fmt(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def parameter_table(delta: DeltaBase) -> Table:
    """A rich table of backbone, delta and trainable parameter counts with their ratio to the backbone."""
    delta_ids = set()
    for module in delta.backbone_model.modules():
        if isinstance(module, DeltaSite):
            delta_ids.update(id(p) for p in module.parameters())
    own = {id(p) for p in delta.parameters()}
    seen: set[int] = set()
    backbone = trainable = 0
    for param in delta.backbone_model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        if id(param) not in delta_ids:
            backbone += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    this_delta = sum(p.numel() for p in delta.parameters())
    all_deltas = sum(p.numel() for p in delta.backbone_model.parameters() if id(p) in delta_ids | own)

    def pct(n: int) -> str:
        return f"{100.0 * n / backbone:.4f}%" if backbone else "-"

    table = Table(title=f"{type(delta).__name__} '{delta.child_name}' ({delta.state}, {len(delta.sites)} sites)")
    table.add_column("parameters")
    table.add_column("count", justify="right")
    table.add_column("of backbone", justify="right")
    table.add_row("backbone", f"{backbone:,} ({_fmt(backbone)})", "100%")
    table.add_row("this delta", f"{this_delta:,} ({_fmt(this_delta)})", pct(this_delta))
    if all_deltas != this_delta:
        table.add_row("all attached deltas", f"{all_deltas:,} ({_fmt(all_deltas)})", pct(all_deltas))
    table.add_row("trainable", f"{trainable:,} ({_fmt(trainable)})", pct(trainable))
    return table


def log_delta(delta: DeltaBase, visualization: bool = True, delta_ratio: bool = True, trainable_ratio: bool = True) -> None:
    """What :meth:`DeltaBase.log` prints."""
    if visualization:
        Visualization(delta.backbone_model).structure_graph()
    if delta_ratio or trainable_ratio:
        Console().print(parameter_table(delta))
